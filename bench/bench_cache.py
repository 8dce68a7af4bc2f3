"""What the response cache costs on the request path, beside the routing decision it follows.

In process, per request: `decide()` (the baseline every request pays), the cache's plan for a
route that does not cache (what every request pays once a config has a caching route
somewhere), the plan of a caching route (canonical form and key), a local hit (plan + lookup),
and building the SSE replay of a hit. Bodies: a one-line question, and a 20-turn chat of about
8 kB. Prints p50 and p99 in microseconds.

Run: .venv/bin/python bench/bench_cache.py   (about 10 s)
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.cache import ResponseCache, replay_frames
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.providers.base import Operation
from modelplane_sidecar.routing import RoutedRequest, decide
from modelplane_sidecar.runtime import Snapshot

ROUNDS = 3000


def _config() -> Snapshot:
    endpoint = {"name": "a", "provider": "openai", "baseUrl": "http://127.0.0.1:9/v1", "model": "m"}
    return Snapshot.build(
        parse_config(
            {
                "metadata": {"name": "bench", "namespace": "bench"},
                "endpoints": [endpoint],
                "models": [
                    {"name": "cached", "endpoints": ["a"], "cache": {"enabled": True}},
                    {"name": "plain", "endpoints": ["a"]},
                ],
            }
        )
    )


def _bodies() -> dict[str, list[dict[str, Any]]]:
    short = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
    long = []
    for i in range(10):
        long.append(
            {"role": "user", "content": f"Turn {i}: " + "please summarise the ledger " * 14}
        )
        long.append({"role": "assistant", "content": "Here is the summary of the ledger. " * 10})
    return {"one question": short, "20-turn chat (8 kB)": long}


def _time(call: Callable[[], object]) -> tuple[float, float]:
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1e6)
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49], cuts[98]


def _measure(
    label: str, messages: list[dict[str, Any]], cache: ResponseCache, snapshot: Snapshot
) -> None:
    headers = CIMultiDictProxy(CIMultiDict[str]())

    def request(model: str) -> RoutedRequest:
        body = {"model": model, "messages": messages, "temperature": 0}
        return RoutedRequest(Operation.CHAT, body, headers, model, False)

    plain, cached = request("plain"), request("cached")
    decision = decide(snapshot, cached)
    assert decision.trace is not None and decision.trace.found is not None
    sensitivity = decision.trace.found.sensitivity
    alias_plain, alias_cached = snapshot.aliases["plain"], snapshot.aliases["cached"]
    plan = cache.plan(snapshot, cached, alias_cached, "model:cached", sensitivity)
    assert plan is not None
    plan.store(ANSWER, "a")

    def hit() -> object:
        p = cache.plan(snapshot, cached, alias_cached, "model:cached", sensitivity)
        assert p is not None
        lookup = p.lookup()
        try:
            lookup.send(None)  # a local hit completes without suspending
        except StopIteration as done:
            return done.value
        raise AssertionError("the lookup went past the local store")

    steps: list[tuple[str, Callable[[], object]]] = [
        ("decide() (baseline)", lambda: decide(snapshot, plain)),
        (
            "plan, route without cache",
            lambda: cache.plan(snapshot, plain, alias_plain, "model:plain", sensitivity),
        ),
        (
            "plan, caching route (key)",
            lambda: cache.plan(snapshot, cached, alias_cached, "model:cached", sensitivity),
        ),
        ("plan + local hit", hit),
        ("SSE replay of the hit", lambda: replay_frames(ANSWER, True)),
    ]
    for name, call in steps:
        p50, p99 = _time(call)
        print(f"{label:<22}{name:<34}{p50:>9.1f}{p99:>9.1f}")


ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{'
    b'"index":0,"message":{"role":"assistant","content":"'
    + b"Water boils at 100 degrees Celsius at sea level. "
    * 8
    + b'","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":90,"total_tokens":102}}'
)


async def main() -> None:
    # The cache's Redis tasks need a running loop; nothing here suspends.
    cache = ResponseCache(SidecarMetrics())
    snapshot = _config()
    print(f"{'body':<22}{'step':<34}{'p50 us':>9}{'p99 us':>9}")
    for label, messages in _bodies().items():
        _measure(label, messages, cache, snapshot)


if __name__ == "__main__":
    asyncio.run(main())
