"""Real-time latency under a saturating batch load, with and without the batch lane.

One sidecar (`modelplane serve --config <generated>`, its own process) in front of one
self-hosted stand-in whose model server runs at most `--slots` requests at once (more wait in its
queue, as on a GPU server), each taking `--service-ms`; the endpoint declares that limit as
`limits.maxConcurrency`. Four runs of `--duration` seconds each:

  realtime only           `--realtime` clients, each sending its next request when the last
                          one is answered (closed loop)
  + batch, batch lane     the same, plus `--batch` clients sending `x-modelplane-priority:
                          batch` as fast as they are answered (saturating: far more than the
                          endpoint can serve)
  + batch, no lane        the same batch clients without the header: their requests compete
                          with real-time ones as equals, and the endpoint's limit refuses both
  + batch, no lane/limit  the same, through a second sidecar whose endpoint declares no limit
                          (as before lanes): every request queues at the model server

Printed side by side: real-time p50/p99 latency and refusals, batch requests completed and
refused. A client that is refused with 429 waits for its Retry-After (1 s), as the SDKs do.
The stand-in and the load generator share this process; the sidecar has its own.

Run: .venv/bin/python bench/bench_lanes.py   (about 40 s)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELPLANE = ROOT / ".venv" / "bin" / "modelplane"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ModelServer:
    """An OpenAI chat endpoint with `slots` concurrent requests at most (the rest queue)."""

    def __init__(self, slots: int, service_s: float) -> None:
        self._slots = asyncio.Semaphore(slots)
        self._service_s = service_s

    async def chat(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        async with self._slots:
            await asyncio.sleep(self._service_s)
        answer = {
            "id": f"chatcmpl-{time.monotonic_ns():x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
        }
        return web.Response(body=orjson.dumps(answer), content_type="application/json")


def router_config(upstream: str, slots: int | None, share: float) -> dict[str, Any]:
    limits = {"maxConcurrency": slots} if slots is not None else {}
    return {
        "apiVersion": "modelplane.io/v1alpha1",
        "kind": "RouterConfig",
        "server": {"watchConfig": False},
        "endpoints": [
            {
                "name": "llama",
                "provider": "openai-compatible",
                "baseUrl": upstream,
                "model": "llama-3.1-8b",
                "pricing": {"inputPerMtok": 0, "outputPerMtok": 0},
                "limits": limits,
            }
        ],
        "models": [{"name": "chat", "endpoints": ["llama"], "retry": {"maxAttempts": 1}}],
        "lanes": {
            "batch": {
                "maxConcurrency": 64,
                "maxQueue": 4096,
                "maxWaitSeconds": 600,
                "endpointShare": share,
            }
        },
    }


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    refused: dict[int, int] = field(default_factory=dict)


async def client_loop(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], until: float, tally: Tally
) -> None:
    body = orjson.dumps(
        {"model": "chat", "messages": [{"role": "user", "content": "Summarise this record."}]}
    )
    while time.monotonic() < until:
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            status = resp.status
            retry_after = resp.headers.get("retry-after")
        if status == 200:
            tally.ok += 1
            tally.latencies.append(time.perf_counter() - started)
            continue
        tally.refused[status] = tally.refused.get(status, 0) + 1
        await asyncio.sleep(float(retry_after) if retry_after else 0.05)


async def scenario(
    url: str, realtime: int, batch: int, batch_headers: dict[str, str] | None, duration: float
) -> tuple[Tally, Tally]:
    rt, bt = Tally(), Tally()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        until = time.monotonic() + duration
        base = {"content-type": "application/json"}
        loops = [client_loop(session, url, base, until, rt) for _ in range(realtime)]
        if batch_headers is not None:
            headers = {**base, **batch_headers}
            loops += [client_loop(session, url, headers, until, bt) for _ in range(batch)]
        await asyncio.gather(*loops)
    return rt, bt


def _ms(values: list[float], q: float) -> str:
    if len(values) < 2:
        return "-"
    return f"{statistics.quantiles(values, n=100)[int(q) - 1] * 1000:.1f}"


def _refusals(tally: Tally) -> str:
    if not tally.refused:
        return "0"
    return ", ".join(f"{n}x{status}" for status, n in sorted(tally.refused.items()))


async def wait_ready(port: int) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the sidecar did not become ready in 30 s")


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1/chat/completions"


async def main(args: argparse.Namespace) -> None:
    server = ModelServer(args.slots, args.service_ms / 1000)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()

    upstream = f"http://127.0.0.1:{upstream_port}/v1"
    limited, unlimited = free_port(), free_port()
    sidecars = []
    with tempfile.TemporaryDirectory() as tmp:
        for port, slots in ((limited, args.slots), (unlimited, None)):
            path = Path(tmp) / f"router-{port}.yaml"
            path.write_text(yaml.safe_dump(router_config(upstream, slots, args.share)))
            sidecars.append(
                await asyncio.create_subprocess_exec(
                    str(MODELPLANE),
                    "serve",
                    "--config",
                    str(path),
                    "--port",
                    str(port),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        try:
            for port in (limited, unlimited):
                await wait_ready(port)
                await scenario(_url(port), args.realtime, 0, None, 1.0)  # warm-up
            batch = {"x-modelplane-priority": "batch"}
            runs = [
                ("realtime only", limited, None),
                ("+ batch, batch lane", limited, batch),
                ("+ batch, no lane", limited, {}),
                ("+ batch, no lane/limit", unlimited, {}),
            ]
            rows = []
            for name, port, batch_headers in runs:
                rt, bt = await scenario(
                    _url(port), args.realtime, args.batch, batch_headers, args.duration
                )
                rows.append((name, rt, bt, batch_headers is not None))
                await asyncio.sleep(1.5)  # let refused clients' Retry-After pass
        finally:
            for sidecar in sidecars:
                sidecar.terminate()
                await asyncio.wait_for(sidecar.wait(), 10)
    await runner.cleanup()

    print(
        f"model server: {args.slots} slots, {args.service_ms:g} ms per request "
        f"(capacity {args.slots * 1000 / args.service_ms:.0f} req/s); batch endpointShare "
        f"{args.share:g}; {args.realtime} real-time + {args.batch} batch closed-loop clients; "
        f"{args.duration:g} s per run; load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'run':<22}{'rt done':>9}{'rt p50 ms':>11}{'rt p99 ms':>11}{'rt refused':>12}"
        f"{'batch done':>12}{'batch refused':>15}"
    )
    print(header)
    print("-" * len(header))
    for name, rt, bt, with_batch in rows:
        print(
            f"{name:<22}{rt.ok:>9}{_ms(rt.latencies, 50):>11}{_ms(rt.latencies, 99):>11}"
            f"{_refusals(rt):>12}{(bt.ok if with_batch else '-'):>12}"
            f"{(_refusals(bt) if with_batch else '-'):>15}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--service-ms", type=float, default=40.0)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--realtime", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--duration", type=float, default=6.0)
    if not MODELPLANE.exists():
        sys.exit(f"{MODELPLANE} not found: run `make install` first")
    asyncio.run(main(parser.parse_args()))
