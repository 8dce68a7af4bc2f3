"""`modelplane serve --health-port`: what the injected sidecar's probes call, as a real process.

The router listens on loopback only; the kubelet probes the Pod IP, so health and readiness are
also served on all interfaces at the health port, and nothing else is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_ports import free_port

ROUTER_YAML = """
apiVersion: modelplane.io/v1alpha1
kind: RouterConfig
metadata: {name: health}
endpoints:
  - name: local
    provider: openai-compatible
    baseUrl: http://127.0.0.1:9/v1
    model: m
models:
  - name: chat
    endpoints: [local]
"""


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[int, int]]:
    config = tmp_path / "router.yaml"
    config.write_text(ROUTER_YAML)
    port, health_port = free_port(), free_port()
    modelplane = str(Path(sys.executable).with_name("modelplane"))
    flags = ["--config", str(config), "--port", str(port), "--health-port", str(health_port)]
    process = subprocess.Popen(
        [modelplane, "serve", *flags],
        env={**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            process.kill()
            pytest.fail(f"sidecar did not start: {process.communicate()[1].decode()[-2000:]}")
        yield port, health_port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_health_port_serves_probes_and_nothing_else(sidecar: tuple[int, int]) -> None:
    port, health_port = sidecar

    status, body = get(f"http://127.0.0.1:{health_port}/readyz")
    assert status == 200
    assert json.loads(body)["status"] == "ready"
    assert get(f"http://127.0.0.1:{health_port}/healthz")[0] == 200
    assert get(f"http://127.0.0.1:{health_port}/v1/models")[0] == 404
    assert get(f"http://127.0.0.1:{port}/v1/models")[0] == 200
