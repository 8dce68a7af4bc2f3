"""Fixed-rate (open-loop) load: latency at a steady request rate, wrk2-style.

Requests are scheduled at exact intervals (`rate` per second) over a pool of `connections`
keep-alive HTTP/1.1 connections. Each latency is measured from the request's *scheduled* send
time to the last byte of its response, so a slow server cannot hide its stalls by slowing the
client down (no coordinated omission). Prints one JSON object on stdout.

Run: python bench/paced.py --port 18003 --body body.json --rate 200 --duration 5 --connections 8
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """Read one response; returns (status, body bytes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
        return status, length
    if not chunked:
        raise RuntimeError("response has neither content-length nor chunked encoding")
    total = 0
    for _ in range(1_000_000):
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        await reader.readexactly(size + 2)
        total += size
        if size == 0:
            return status, total
    raise RuntimeError("too many chunks")


async def run(args: argparse.Namespace, body: bytes) -> dict[str, Any]:
    request = (
        f"POST {args.path} HTTP/1.1\r\nhost: 127.0.0.1:{args.port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(args.connections):
        reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
        pool.put_nowait(Conn(reader, writer))

    latencies: list[float] = []
    errors = 0
    statuses: dict[int, int] = {}

    async def one(scheduled: float) -> None:
        nonlocal errors
        conn = await pool.get()
        try:
            conn.writer.write(request)
            status, _ = await _read_response(conn.reader)
        except (OSError, asyncio.IncompleteReadError, RuntimeError, ValueError):
            errors += 1
            reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
            pool.put_nowait(Conn(reader, writer))
            return
        latencies.append(time.perf_counter() - scheduled)
        statuses[status] = statuses.get(status, 0) + 1
        pool.put_nowait(conn)

    total = int(args.rate * args.duration)
    interval = 1.0 / args.rate
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "errors": errors,
        "non_2xx": sum(n for s, n in statuses.items() if not 200 <= s < 300),
        "rate": len(latencies) / elapsed,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": latencies[-1] * 1000 if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body", required=True, help="file with the JSON request body")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds")
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    import uvloop

    with open(args.body, "rb") as f:
        body = f.read()
    print(orjson.dumps(uvloop.run(run(args, body))).decode())


if __name__ == "__main__":
    main()
