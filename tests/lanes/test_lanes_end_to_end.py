"""Lanes through a real sidecar with the `openai` SDK: which requests are batch, where they go,
their queue's 429 and 503, and a saturating batch load that completes without ever taking more
than its share of the self-hosted endpoint from real-time requests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from harness import Router, Upstreams, endpoint, http

from modelplane_sidecar.config import RouterConfig
from modelplane_sidecar.standins.openai import Behaviour, OpenAIStandIn

HELLO = [{"role": "user", "content": "hello"}]
BATCH = {"x-modelplane-priority": "batch"}


class Concurrency:
    """Counts requests in flight at a stand-in, apart for batch and real-time ones."""

    def __init__(self) -> None:
        self.now = {"batch": 0, "realtime": 0}
        self.peak = {"batch": 0, "realtime": 0}

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        kind = "batch" if b"batch-job" in await request.read() else "realtime"
        self.now[kind] += 1
        self.peak[kind] = max(self.peak[kind], self.now[kind])
        try:
            return await handler(request)
        finally:
            self.now[kind] -= 1


def _world(
    upstreams: Upstreams,
    lanes: dict[str, Any],
    *,
    delay: float = 0.0,
    llama_slots: int = 4,
    **model: Any,
) -> tuple[Router, OpenAIStandIn, OpenAIStandIn, Concurrency]:
    counter = Concurrency()
    llama = OpenAIStandIn(name="llama", default=Behaviour(delay=delay))
    app = llama.app()
    app.middlewares.append(counter.middleware)
    llama_url = f"http://127.0.0.1:{upstreams.servers.serve(app)}/v1"
    cloud, cloud_url = upstreams.openai("cloud")
    config = {
        "endpoints": [
            endpoint("cloud", cloud_url, pricing={"inputPerMtok": 2.5, "outputPerMtok": 10}),
            endpoint(
                "llama",
                llama_url,
                pricing={"inputPerMtok": 0, "outputPerMtok": 0},
                limits={"maxConcurrency": llama_slots},
            ),
        ],
        "models": [
            {"name": "chat", "endpoints": ["cloud", "llama"], **model},
            {"name": "local", "endpoints": ["llama"]},
        ],
        "lanes": lanes,
    }
    return upstreams.router(config), cloud, llama, counter


def _sync(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)


def test_batch_requests_go_cheapest_first_realtime_keeps_the_route(upstreams: Upstreams) -> None:
    router, *_ = _world(upstreams, {})
    client = _sync(router)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-modelplane-endpoint"] == "cloud"
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=HELLO, extra_headers=BATCH
    )
    assert raw.headers["x-modelplane-endpoint"] == "llama"
    assert router.metric("modelplane_lane_admitted_total", lane="batch") == 1
    assert router.metric("modelplane_lane_admitted_total", lane="realtime") == 0
    # The explain trace says which lane routing put the request in.
    body = orjson.dumps({"model": "chat", "messages": HELLO})
    for headers, lane in (({}, "realtime"), (BATCH, "batch")):
        reply = http("POST", router.url + "/v1/modelplane/explain", body, **headers)
        assert reply.status_code == 200 and reply.json()["lane"] == lane


def test_a_rule_or_an_alias_puts_requests_in_the_batch_lane(upstreams: Upstreams) -> None:
    router, _, _, _ = _world(upstreams, {})
    config = router.holder.snapshot.config.model_dump(by_alias=True)  # type: ignore[union-attr]
    config["rules"] = [
        {
            "name": "nightly",
            "match": {"metadata": {"job": ["nightly"]}},
            "targets": ["cloud", "llama"],
            "lane": "batch",
        }
    ]
    router.holder.apply(RouterConfig.model_validate(config), "test")
    raw = _sync(router).chat.completions.with_raw_response.create(
        model="chat", messages=HELLO, metadata={"job": "nightly"}
    )
    assert raw.headers["x-modelplane-endpoint"] == "llama"
    assert raw.headers["x-modelplane-rule"] == "nightly"

    offline, _, _, _ = _world(upstreams, {}, lane="batch")
    raw = _sync(offline).chat.completions.with_raw_response.create(model="chat", messages=HELLO)
    assert raw.headers["x-modelplane-endpoint"] == "llama"
    # The platform's lane wins over the app's header.
    raw = _sync(offline).chat.completions.with_raw_response.create(
        model="chat", messages=HELLO, extra_headers={"x-modelplane-priority": "realtime"}
    )
    assert raw.headers["x-modelplane-endpoint"] == "llama"


def test_unknown_priority_is_a_clear_400(upstreams: Upstreams) -> None:
    router, cloud, llama, _ = _world(upstreams, {})
    with pytest.raises(openai.BadRequestError) as caught:
        _sync(router).chat.completions.create(
            model="chat", messages=HELLO, extra_headers={"x-modelplane-priority": "urgent"}
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "x-modelplane-priority" and "'urgent'" in error["message"]
    assert not cloud.received and not llama.received


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in 10 s"
        time.sleep(0.005)


def _in_background(call: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def _expect_error(call: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        with pytest.raises(openai.APIStatusError):
            call()

    return run


def test_full_batch_queue_is_429_and_a_long_wait_is_503(upstreams: Upstreams) -> None:
    # The queued request must still be waiting when the third one arrives (maxWaitSeconds),
    # and give up before the running one ends (delay): a second and more of slack each.
    lanes = {"batch": {"maxConcurrency": 1, "maxQueue": 1, "maxWaitSeconds": 1.5}}
    router, _, llama, _ = _world(upstreams, lanes, delay=3.5)
    client = _sync(router)

    def batch() -> object:
        return client.chat.completions.create(model="chat", messages=HELLO, extra_headers=BATCH)

    running = _in_background(batch)
    _wait_for(lambda: len(llama.received) == 1)
    waiter = _in_background(_expect_error(batch))
    _wait_for(lambda: router.metric("modelplane_lane_queued_requests", lane="batch") == 1)
    with pytest.raises(openai.RateLimitError) as full:
        batch()
    assert full.value.body["code"] == "lane_queue_full"  # type: ignore[index]
    waiter.join(10)
    running.join(10)
    assert router.metric("modelplane_lane_rejected_total", lane="batch", reason="lane_queue_full")
    assert (
        router.metric("modelplane_lane_rejected_total", lane="batch", reason="lane_wait_timeout")
        == 1
    )
    assert router.metric("modelplane_requests_total", outcome="refused") == 2
    assert len(llama.received) == 1


async def test_saturating_batch_load_completes_within_its_share(upstreams: Upstreams) -> None:
    lanes = {"batch": {"maxConcurrency": 16, "maxQueue": 64, "endpointShare": 0.5}}
    # Four slots: the batch share is 2, the two real-time users take the other two. A batch
    # request that finds llama full (2 batch + 2 real-time) waits for it in the batch queue; it
    # never goes to the cloud (maxWaitSeconds 300).
    router, cloud, _, counter = _world(upstreams, lanes, delay=0.02)
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)

    async def batch_job(n: int) -> str:
        raw = await client.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "user", "content": f"batch-job {n}"}],
            extra_headers=BATCH,
        )
        return raw.headers["x-modelplane-endpoint"]

    async def realtime_user(n: int) -> list[str]:
        served = []
        for i in range(5):
            raw = await client.chat.completions.with_raw_response.create(
                model="local",
                messages=[{"role": "user", "content": f"user {n} question {i}"}],
                extra_headers={"x-modelplane-priority": "realtime"},
            )
            served.append(raw.headers["x-modelplane-endpoint"])
        return served

    results = await asyncio.gather(
        *(batch_job(n) for n in range(40)), *(realtime_user(n) for n in range(2))
    )
    batch_served, realtime_served = results[:40], results[40:]
    assert batch_served == ["llama"] * 40
    # Real-time requests on the same self-hosted endpoint were never refused for capacity.
    assert all(served == ["llama"] * 5 for served in realtime_served)
    assert counter.peak["batch"] == 2  # half of llama's maxConcurrency of 4, and no more
    assert counter.peak["realtime"] >= 1
    assert not cloud.received
    assert router.metric("modelplane_lane_admitted_total", lane="batch") == 40
    assert router.metric("modelplane_lane_wait_seconds_count", lane="batch") > 0
    await client.close()


def test_a_batch_request_waits_where_real_time_would_get_429(upstreams: Upstreams) -> None:
    router, _, llama, _ = _world(upstreams, {})
    # The four busy requests hold llama long enough for the next ones to find it full.
    llama.then(*(Behaviour(delay=2.0) for _ in range(4)))
    client = _sync(router)

    def local(**extra: Any) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="local", messages=HELLO, **extra
        )

    busy = [_in_background(local) for _ in range(4)]  # llama's maxConcurrency
    _wait_for(lambda: len(llama.received) == 4)
    with pytest.raises(openai.RateLimitError) as caught:
        local()
    assert caught.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    raw = local(extra_headers=BATCH)
    assert raw.headers["x-modelplane-endpoint"] == "llama"
    for thread in busy:
        thread.join(10)
    assert len(llama.received) == 5


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait until `check()` holds, for at most 60 s of wall time (the machine may be loaded)."""
    for _ in range(6000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


class HeldLlama:
    """llama (maxConcurrency 2) full of two real-time requests held at the stand-in until
    `release()`; while they are held, llama stays full whatever the machine's speed."""

    def __init__(self, upstreams: Upstreams, lanes: dict[str, Any]) -> None:
        self.upstreams = upstreams
        self.router, self.cloud, self.llama, _ = _world(upstreams, lanes, llama_slots=2)
        self.client = openai.AsyncOpenAI(
            base_url=self.router.url + "/v1", api_key="x", max_retries=0
        )
        self.gate = asyncio.Event()
        self.busy: list[asyncio.Task[Any]] = []

    async def fill(self) -> None:
        self.llama.then(Behaviour(hold=self.gate), Behaviour(hold=self.gate))
        self.busy = [asyncio.create_task(self.ask("local")) for _ in range(2)]
        await until(lambda: len(self.llama.received) == 2, "llama holding two requests")

    def ask(self, model: str, **extra: Any) -> Any:
        return self.client.chat.completions.with_raw_response.create(
            model=model, messages=HELLO, **extra
        )

    async def release(self) -> None:
        self.upstreams.servers.loop.call_soon_threadsafe(self.gate.set)
        for raw in await asyncio.gather(*self.busy):
            assert raw.headers["x-modelplane-endpoint"] == "llama"


async def test_a_batch_request_waits_for_the_busy_cheap_endpoint(upstreams: Upstreams) -> None:
    scene = HeldLlama(upstreams, {})
    await scene.fill()
    # Real-time traffic is unchanged: llama is full, a real-time request is refused at once.
    with pytest.raises(openai.RateLimitError) as refused:
        await scene.ask("local")
    assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    # A batch request of `chat` (cloud, llama) waits in the batch queue for llama, instead of
    # going to the cloud because llama is full right now.
    batch = asyncio.create_task(scene.ask("chat", extra_headers=BATCH))
    router = scene.router
    await until(
        lambda: router.metric("modelplane_lane_queued_requests", lane="batch") == 1, "queued"
    )
    assert not batch.done() and not scene.cloud.received
    await scene.release()
    raw = await batch
    assert raw.headers["x-modelplane-endpoint"] == "llama"
    assert not scene.cloud.received
    assert len(scene.llama.received) == 3
    assert router.metric("modelplane_lane_wait_seconds_count", lane="batch") == 1
    assert router.metric("modelplane_lane_spilled_total") == 0
    await scene.client.close()


async def test_a_batch_request_spills_after_its_wait_bound(upstreams: Upstreams) -> None:
    # llama stays full (held) for the whole test: past maxWaitSeconds, whatever the machine's
    # speed, the batch request goes to the next candidate with room.
    scene = HeldLlama(upstreams, {"batch": {"maxWaitSeconds": 0.2}})
    await scene.fill()
    raw = await scene.ask("chat", extra_headers=BATCH)
    assert raw.headers["x-modelplane-endpoint"] == "cloud"
    assert len(scene.cloud.received) == 1
    router = scene.router
    assert router.metric("modelplane_lane_spilled_total", reason="wait_bound") == 1
    # `local` has no other endpoint: past the bound, the batch request gets a clear 503.
    with pytest.raises(openai.InternalServerError) as timed_out:
        await scene.ask("local", extra_headers=BATCH)
    assert timed_out.value.status_code == 503
    assert timed_out.value.body["code"] == "lane_wait_timeout"  # type: ignore[index]
    assert len(scene.llama.received) == 2  # nothing more reached llama while it was full
    await scene.release()
    assert router.metric("modelplane_lane_rejected_total", reason="lane_wait_timeout") == 1
    await scene.client.close()
