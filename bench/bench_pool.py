"""Replica choice under skewed load: least-loaded (the sidecar's pool) vs round-robin.

Three vLLM stand-ins (`standins/vllm.py`: at most `--slots` requests decode at once, the rest
wait in FIFO order, vLLM-format /metrics) serve a fixed service time each. One of them is also
busy with other clients' traffic (background requests that occupy its slots and that no
balancer here sends), so its queue is longer than its share of our traffic suggests. The same
synthetic open-loop workload (Poisson arrivals at `--rate` for `--seconds`, the same seed) is
sent three times, once per policy:

  * round-robin            replicas in turn, blind to load (what a plain Service/kube-proxy or
                           a naive gateway does)
  * least-outstanding      the sidecar's ReplicaPool without engine metrics: power of two
                           choices on requests this client has in flight
  * least-loaded           the sidecar's ReplicaPool with the engine metrics scraped by its
                           LoadScraper (queue depth, KV-cache use) plus outstanding requests

Requests go over real HTTP on loopback, with outstanding counts kept as the forwarder keeps
them. Queue wait is what each replica measured: the time a request waited for a free slot.
Printed side by side: mean / p50 / p99 / max queue wait, end-to-end latency, and the share of
our requests the busy replica got.

Run: .venv/bin/python bench/bench_pool.py [--rate 150] [--seconds 8] [--slots 4]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from modelplane_sidecar.config import parse_config
from modelplane_sidecar.pool import LoadScraper, ReplicaPool, ReplicaState
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.vllm import VLLMStandIn

BODY = orjson.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})


@dataclass
class Result:
    policy: str
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    to_busy: int = 0
    errors: int = 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def background(busy: VLLMStandIn, rate: float, service: float, until: float) -> None:
    """Other clients' requests on the busy replica: Poisson arrivals, each holding a slot."""
    rng = random.Random(99)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    while loop.time() < until:
        await asyncio.sleep(rng.expovariate(rate))
        task = loop.create_task(busy.hold(service))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


async def run_policy(
    name: str,
    replicas: list[VLLMStandIn],
    urls: list[str],
    args: argparse.Namespace,
) -> Result:
    engine = "vllm" if name == "least-loaded" else None
    config = parse_config(
        {
            "endpoints": [
                {
                    "name": "llama",
                    "provider": "openai-compatible",
                    "baseUrl": "http://llama.bench.svc:8000/v1",
                    "model": "llama",
                    "replicas": [{"url": u} for u in urls],
                    **({"engine": engine} if engine else {}),
                    "loadMetrics": {"scrapeIntervalSeconds": args.scrape_interval},
                }
            ],
            "models": [{"name": "llama", "endpoints": ["llama"]}],
        }
    )
    pool = ReplicaPool.build(config.endpoints[0], None)
    assert pool is not None
    for r in replicas:
        r.queue_waits.clear()
        r.api.received.clear()
    rr = itertools.cycle(pool.replicas)
    rng = random.Random(42)
    pick_rng = random.Random(7)
    result = Result(name)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        scraper = LoadScraper(lambda: [pool] if engine else [], session)
        scraper.start()
        loop = asyncio.get_running_loop()
        # Every policy gets the same timeline: the background load starts, then ours.
        until = loop.time() + args.scrape_interval * 1.5 + args.seconds
        bg = loop.create_task(background(replicas[0], args.background, args.service, until))
        await asyncio.sleep(args.scrape_interval * 1.5)

        def choose() -> ReplicaState:
            if name == "round-robin":
                return next(rr)
            picked = pool.pick(pick_rng)
            assert picked is not None
            return picked

        async def one() -> None:
            replica = choose()
            replica.outstanding += 1
            sent = time.perf_counter()
            try:
                async with session.post(
                    replica.url + "/chat/completions",
                    data=BODY,
                    headers={"content-type": "application/json"},
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            finally:
                replica.outstanding -= 1
            if not ok:
                result.errors += 1
                return
            result.latencies.append(time.perf_counter() - sent)
            if replica.url == urls[0]:
                result.to_busy += 1

        tasks: list[asyncio.Task[None]] = []
        while loop.time() < until:
            await asyncio.sleep(rng.expovariate(args.rate))
            tasks.append(loop.create_task(one()))
        await asyncio.gather(*tasks)
        await bg
        await scraper.stop()
    for r in replicas:
        result.waits.extend(r.queue_waits)
    return result


async def main(args: argparse.Namespace) -> None:
    replicas = [
        VLLMStandIn(f"r{i}", slots=args.slots, service_seconds=args.service) for i in range(3)
    ]
    runners, urls = [], []
    for r in replicas:
        runner, port = await start_site(r.app())
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{port}/v1")
    capacity = len(replicas) * args.slots / args.service
    print(
        f"3 replicas x {args.slots} slots, service {args.service * 1000:.0f} ms "
        f"(capacity {capacity:.0f} req/s); replica r0 also serves {args.background:.0f} req/s of "
        f"other clients' traffic ({args.background * args.service / args.slots:.0%} of its slots); "
        f"our load {args.rate:.0f} req/s for {args.seconds:.0f} s, same seed per policy; "
        f"scrape every {args.scrape_interval:g} s; load average {os.getloadavg()[0]:.1f}"
    )
    results: list[Result] = []
    try:
        for policy in ("round-robin", "least-outstanding", "least-loaded"):
            results.append(await run_policy(policy, replicas, urls, args))
            await asyncio.sleep(0.5)
    finally:
        for runner in runners:
            await runner.cleanup()
    header = (
        f"{'policy':<18} {'requests':>8} {'to busy r0':>10} {'wait mean':>10} {'wait p50':>9} "
        f"{'wait p99':>9} {'wait max':>9} {'latency mean':>13} {'latency p99':>12} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    ms: Callable[[float], str] = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    for r in results:
        n = len(r.latencies)
        print(
            f"{r.policy:<18} {n:>8} {r.to_busy / max(1, n):>10.0%} "
            f"{ms(statistics.fmean(r.waits)):>10} {ms(pct(r.waits, 0.5)):>9} "
            f"{ms(pct(r.waits, 0.99)):>9} {ms(max(r.waits)):>9} "
            f"{ms(statistics.fmean(r.latencies)):>13} {ms(pct(r.latencies, 0.99)):>12} "
            f"{r.errors:>6}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rate", type=float, default=150.0, help="our requests per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--service", type=float, default=0.04, help="seconds per request")
    parser.add_argument("--background", type=float, default=80.0, help="other clients' req/s on r0")
    parser.add_argument("--scrape-interval", type=float, default=0.5)
    asyncio.run(main(parser.parse_args()))
