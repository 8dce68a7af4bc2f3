"""Load benchmark of the sidecar injection webhook, side by side with a bare TLS webhook.

The apiserver gives a webhook `timeoutSeconds` (5 by default in the chart) per call; with
failurePolicy Ignore a slow webhook silently produces Pods without the sidecar. This measures,
in one run and the same way for both servers (each its own process, pinned to CPU 1 when
possible, the client pinned to CPU 0):
  * bare: aiohttp over TLS that parses the review and allows it (the floor for Python);
  * real: the operator's InjectionWebhook (decision + JSON Patch for a Pod with three containers,
    an init container, env vars and volumes), or the same for a ~200 KB Pod.
Closed loop with `--concurrency` reviews in flight over keep-alive connections, like the
apiserver's connection pool under a burst of Pod creations. Prints throughput, p50/p99/max
latency, and the max latency as a fraction of the timeout.

Run: .venv/bin/python bench/bench_webhook.py [--duration 5] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from modelplane_operator.injection.certs import CertificatePolicy, renew

HERE = Path(__file__).resolve().parent
TIMEOUT_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pod(padding: int) -> dict[str, Any]:
    env = [{"name": f"SETTING_{i}", "value": "x" * 32} for i in range(8)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "namespace": "apps",
            "labels": {"app": "web"},
            "annotations": {"padding": "p" * padding},
        },
        "spec": {
            "initContainers": [{"name": "migrate", "image": "registry.invalid/migrate:1"}],
            "containers": [
                {"name": name, "image": f"registry.invalid/{name}:1", "env": env}
                for name in ("api", "worker", "exporter")
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def review(padding: int) -> bytes:
    return orjson.dumps(
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "bench",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "namespace": "apps",
                "operation": "CREATE",
                "object": pod(padding),
            },
        }
    )


def start_server(mode: str, port: int, files: dict[str, Path]) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(HERE / "webhook_server.py"), "--mode", mode]
    command += ["--port", str(port)] + [f"--{k}={v}" for k, v in files.items()]
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        command = ["taskset", "-c", "1", *command]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr and process.stderr.read()!r}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("server did not listen")


async def load(
    url: str, body: bytes, ca: Path, concurrency: int, duration: float
) -> tuple[list[float], int]:
    context = ssl.create_default_context(cafile=str(ca))
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.read()
                if response.status != 200 or b'"allowed":true' not in answer:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        # Warm up connections and caches, then measure.
        await asyncio.gather(*(session.post(url, data=body, headers=headers) for _ in range(4)))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def row(name: str, latencies: list[float], errors: int, duration: float) -> str:
    ordered = sorted(latencies)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return (
        f"{name:<22} {len(latencies) / duration:>9.0f} {statistics.median(ordered) * 1000:>9.2f}"
        f" {p99 * 1000:>9.2f} {ordered[-1] * 1000:>9.2f} {ordered[-1] / TIMEOUT_SECONDS:>11.4%}"
        f" {errors:>6}"
    )


async def run(duration: float, concurrency: int) -> None:
    material = renew(None, ["127.0.0.1"], datetime.datetime.now(datetime.UTC), CertificatePolicy())
    with tempfile.TemporaryDirectory() as tmp:
        files = {"cert": Path(tmp, "tls.crt"), "key": Path(tmp, "tls.key"), "ca": Path(tmp, "ca")}
        files["cert"].write_bytes(material.cert)
        files["key"].write_bytes(material.key)
        files["ca"].write_bytes(material.ca_cert)
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {0})
        print(f"concurrency {concurrency}, {duration:.0f}s per target, timeoutSeconds 5")
        print(
            f"{'target':<22} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}"
            f" {'max/timeout':>11} {'errors':>6}"
        )
        for mode, padding, name in (
            ("bare", 0, "bare TLS webhook"),
            ("real", 0, "injection, 5 KB Pod"),
            ("bare", 200_000, "bare TLS, 200 KB Pod"),
            ("real", 200_000, "injection, 200 KB Pod"),
        ):
            port = free_port()
            process = start_server(mode, port, files)
            try:
                await wait_listening(port, process)
                url = f"https://127.0.0.1:{port}/inject/namespace"
                latencies, errors = await load(
                    url, review(padding), files["ca"], concurrency, duration
                )
                print(row(name, latencies, errors, duration))
            finally:
                process.terminate()
                process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(run(args.duration, args.concurrency))


if __name__ == "__main__":
    main()
