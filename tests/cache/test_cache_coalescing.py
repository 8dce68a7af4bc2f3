"""Request coalescing (single flight) through a real sidecar, with the async `openai` SDK as apps.

Concurrency is made deterministic with the stand-in's `hold` behaviour: the first request's
upstream answer is held until the test has seen, in the sidecar's own gauge, that the other
requests are waiting for it; no test sleeps for a request to get somewhere. Every answer the
stand-in makes has a fresh `id`, so answers that share an id came from one upstream call.

An app can have a whole stream before the sidecar has accounted it: the openai SDK stops reading
at `[DONE]` (the async one drains the rest of the body for at most 0.1 s), and the sidecar
accounts a stream once its body has ended. Counts of streamed requests are therefore waited
for (bounded), never read right after the app's last chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from harness import AuditedRouter, Router, Upstreams, chain_config, endpoint
from redis_support import HeldGetReply, RedisServer

from modelplane_sidecar.cache.coalesce import Flights
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.standins.openai import Behaviour

QUESTION = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
WAITING = "modelplane_cache_coalesce_waiting"


def config(url: str, namespace: str = "team-a", **cache: Any) -> dict[str, Any]:
    raw = chain_config([endpoint("a", url)], retry={"maxAttempts": 1})
    raw["metadata"] = {"name": "team", "namespace": namespace}
    raw["models"][0]["cache"] = {"enabled": True, **cache}
    return raw


#: The SDK clients a test made, closed when it ends (`_close_clients`).
_CLIENTS: list[openai.AsyncOpenAI] = []


def client(router: Router) -> openai.AsyncOpenAI:
    sdk = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    _CLIENTS.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


async def until(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    """Wait until `check()` holds, for at most `seconds` of wall time (generous: the machine may
    be loaded; a check that never holds fails the test with `what`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.01)


def release(upstreams: Upstreams, gate: asyncio.Event) -> None:
    upstreams.servers.loop.call_soon_threadsafe(gate.set)


async def ask(
    app: openai.AsyncOpenAI, request_id: str, **kwargs: Any
) -> tuple[dict[str, str], Any]:
    """(response headers, the completion); a stream is read to its end and joined."""
    params: dict[str, Any] = {"model": "chat", "messages": QUESTION, "temperature": 0, **kwargs}
    raw = await app.chat.completions.with_raw_response.create(
        **params, extra_headers={"x-request-id": request_id}
    )
    parsed = raw.parse()
    if not params.get("stream"):
        return dict(raw.headers), parsed
    chunks = [chunk async for chunk in parsed]
    return dict(raw.headers), chunks


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


class Scene:
    """A sidecar before stand-in `a`; `lead()` sends the first request and holds its upstream
    answer (`gate`) until `release()`, `follow()` sends identical ones and waits until the
    sidecar says they are all waiting for it."""

    def __init__(self, upstreams: Upstreams, **cache: Any) -> None:
        self.upstreams = upstreams
        self.standin, url = upstreams.openai("a")
        self.router = upstreams.router(config(url, **cache))
        self.sdk = client(self.router)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def lead(self, *script: Behaviour, **kwargs: Any) -> asyncio.Task[Any]:
        self.standin.then(*(script or (Behaviour(hold=self.gate),)))
        task = asyncio.create_task(ask(self.sdk, "leader", **kwargs))
        await until(lambda: len(self.standin.received) == 1, "the leader's upstream call")
        return task

    async def follow(self, *ids: str, **kwargs: Any) -> list[asyncio.Task[Any]]:
        tasks = [asyncio.create_task(ask(self.sdk, i, **kwargs)) for i in ids]
        self.waiting += len(ids)
        await until(lambda: self.router.metric(WAITING) == self.waiting, f"{ids} waiting")
        return tasks

    def release(self) -> None:
        release(self.upstreams, self.gate)


async def test_identical_requests_in_flight_share_one_upstream_call(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    raw = config(url)
    raw["endpoints"][0]["pricing"] = {"inputPerMtok": 5, "outputPerMtok": 15}
    router = AuditedRouter(upstreams.servers, raw)
    gate = asyncio.Event()
    standin.then(Behaviour(hold=gate))
    sdk = client(router)

    leader = asyncio.create_task(ask(sdk, "leader"))
    await until(lambda: len(standin.received) == 1, "the leader's upstream call")
    followers = [
        asyncio.create_task(ask(sdk, "plain-1")),
        asyncio.create_task(ask(sdk, "plain-2", top_p=1)),  # same question, default spelt out
        asyncio.create_task(ask(sdk, "stream-1", stream=True)),
        asyncio.create_task(
            ask(sdk, "stream-2", stream=True, stream_options={"include_usage": True})
        ),
    ]
    await until(lambda: router.metric(WAITING) == 4, "four followers waiting")
    assert len(standin.received) == 1
    release(upstreams, gate)
    lead_headers, answer = await leader
    plain = [await f for f in followers[:2]]
    streams = [await f for f in followers[2:]]

    assert lead_headers["x-modelplane-cache"] == "miss"
    assert len(standin.received) == 1
    for headers, completion in plain:
        assert headers["x-modelplane-cache"] == "coalesced"
        assert headers["x-modelplane-coalesced-with"] == "leader"
        assert headers["x-modelplane-endpoint"] == "a"
        assert completion.id == answer.id
        assert completion.choices[0].message.content == answer.choices[0].message.content
    for headers, chunks in streams:
        assert headers["x-modelplane-cache"] == "coalesced"
        assert headers["content-type"].startswith("text/event-stream")
        assert {c.id for c in chunks} == {answer.id}
        assert streamed_text(chunks) == answer.choices[0].message.content
    usage = streams[1][1][-1].usage
    assert usage is not None and usage.total_tokens == answer.usage.total_tokens
    assert router.metric("modelplane_cache_coalesced_total", model="chat") == 4
    # The streamed followers are accounted once their bodies have ended (see the module doc).
    await until(
        lambda: router.metric("modelplane_requests_total", outcome="coalesced") == 4,
        "the four followers to be accounted as coalesced",
    )
    assert router.metric("modelplane_requests_total", outcome="ok") == 1
    assert router.metric(WAITING) == 0
    # The leader's answer was stored as usual: the next one is a plain hit.
    headers, again = await ask(sdk, "later")
    assert headers["x-modelplane-cache"] == "hit" and again.id == answer.id

    await until(lambda: len(router.records()) == 6, "six audit records")
    by_id = {r["requestId"]: r for r in router.records()}
    assert by_id["leader"]["outcome"] == "ok" and by_id["leader"]["costUsd"] > 0
    assert "coalescedWith" not in by_id["leader"]
    for follower in ("plain-1", "plain-2", "stream-1", "stream-2"):
        record = by_id[follower]
        assert record["outcome"] == "coalesced" and record["status"] == 200
        assert record["coalescedWith"] == "leader"
        assert record["costUsd"] == 0 and record["tokens"] is None
        assert record["endpoint"] is None and record["attempts"] == []
    assert by_id["later"]["outcome"] == "cache_hit"
    spent = router.metric("modelplane_cost_usd_total", endpoint="a")
    assert spent == pytest.approx(by_id["leader"]["costUsd"])


async def test_a_streaming_leader_answers_plain_and_streaming_followers(
    upstreams: Upstreams,
) -> None:
    scene = Scene(upstreams)
    leader = await scene.lead(stream=True)
    (plain,) = await scene.follow("plain")
    (streamed,) = await scene.follow("streamed", stream=True)
    scene.release()
    (lead_headers, lead_chunks), (plain_headers, completion), (headers, chunks) = (
        await leader,
        await plain,
        await streamed,
    )
    assert lead_headers["x-modelplane-cache"] == "miss"
    assert plain_headers["x-modelplane-cache"] == headers["x-modelplane-cache"] == "coalesced"
    assert completion.choices[0].message.content == streamed_text(lead_chunks)
    assert completion.choices[0].finish_reason == "stop"
    assert streamed_text(chunks) == streamed_text(lead_chunks)
    assert len(scene.standin.received) == 1


async def test_a_streaming_leader_whose_app_leaves_after_the_last_event_still_answers(
    upstreams: Upstreams,
) -> None:
    """The upstream sends `[DONE]` and is slow to end its body; the leader's app (the openai
    SDK, which waits at most 0.1 s for the end after `[DONE]`) closes the connection before the
    sidecar has seen that end, and the sidecar drops the leader's handler. Its answer was
    complete: it is stored and handed to the followers, who do not call upstream again."""
    scene = Scene(upstreams)
    end = asyncio.Event()
    leader = await scene.lead(Behaviour(hold=scene.gate, hold_end=end), stream=True)
    (plain,) = await scene.follow("plain")
    (streamed,) = await scene.follow("streamed", stream=True)
    scene.release()
    try:
        lead_headers, lead_chunks = await leader
        (plain_headers, completion), (headers, chunks) = await plain, await streamed
    finally:
        release(upstreams, end)
    assert lead_headers["x-modelplane-cache"] == "miss"
    assert plain_headers["x-modelplane-cache"] == headers["x-modelplane-cache"] == "coalesced"
    assert completion.id == lead_chunks[0].id
    assert completion.choices[0].message.content == streamed_text(lead_chunks)
    assert streamed_text(chunks) == streamed_text(lead_chunks)
    assert len(scene.standin.received) == 1
    later_headers, again = await ask(scene.sdk, "later")
    assert later_headers["x-modelplane-cache"] == "hit" and again.id == completion.id


async def test_when_the_leader_fails_one_follower_calls_upstream_and_the_rest_follow_it(
    upstreams: Upstreams,
) -> None:
    scene = Scene(upstreams)
    standin, router = scene.standin, scene.router
    leader = await scene.lead(Behaviour("status", 500, hold=scene.gate))
    followers = await scene.follow("f0", "f1", "f2")
    scene.release()
    with pytest.raises(openai.InternalServerError) as caught:
        await leader
    assert caught.value.status_code == 502
    results = [await f for f in followers]
    states = sorted(headers["x-modelplane-cache"] for headers, _ in results)
    assert states == ["coalesced", "coalesced", "miss"]
    assert len({completion.id for _, completion in results}) == 1
    new_leader = next(h["x-request-id"] for h, _ in results if h["x-modelplane-cache"] == "miss")
    assert all(
        h["x-modelplane-coalesced-with"] == new_leader
        for h, _ in results
        if h["x-modelplane-cache"] == "coalesced"
    )
    assert len(standin.received) == 2
    fallbacks = "modelplane_cache_coalesce_fallbacks_total"
    assert router.metric(fallbacks, model="chat", reason="leader-failed") == 3


async def test_a_request_follows_at_most_two_flights_then_calls_upstream_itself(
    upstreams: Upstreams,
) -> None:
    scene = Scene(upstreams)
    standin, router = scene.standin, scene.router
    # The first leader fails once released; the second (the first follower to resume) fails at
    # once. Of the two left, each has followed two flights: one leads a third, and the other,
    # finding that one in the air, calls upstream on its own.
    leader = await scene.lead(Behaviour("status", 500, hold=scene.gate), Behaviour("status", 500))
    followers = await scene.follow("f0", "f1", "f2")
    scene.release()
    outcomes = await asyncio.gather(leader, *followers, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, openai.InternalServerError)]
    served = [o for o in outcomes if isinstance(o, tuple)]
    assert len(failed) == 2 and len(served) == 2
    assert [headers["x-modelplane-cache"] for headers, _ in served] == ["miss", "miss"]
    assert len(standin.received) == 4
    fallbacks = "modelplane_cache_coalesce_fallbacks_total"
    assert router.metric(fallbacks, reason="leader-failed") == 3 + 2
    assert router.metric(fallbacks, reason="follow-limit") == 1


async def test_waiters_are_bounded_and_the_next_request_calls_upstream(
    upstreams: Upstreams,
) -> None:
    scene = Scene(upstreams, coalesceMaxWaiters=2)
    standin, router, sdk = scene.standin, scene.router, scene.sdk
    leader = await scene.lead()
    followers = await scene.follow("f0", "f1")
    # The flight is full: this one calls upstream itself, and is answered while the leader
    # is still held.
    headers, own = await ask(sdk, "third")
    assert headers["x-modelplane-cache"] == "miss"
    assert router.metric("modelplane_cache_coalesce_fallbacks_total", reason="waiters-full") == 1
    scene.release()
    _, answer = await leader
    for follower in followers:
        headers, completion = await follower
        assert headers["x-modelplane-cache"] == "coalesced" and completion.id == answer.id
    assert own.id != answer.id
    assert len(standin.received) == 2


async def test_a_follower_that_goes_away_does_not_cancel_the_leader(upstreams: Upstreams) -> None:
    scene = Scene(upstreams)
    standin, router = scene.standin, scene.router
    leader = await scene.lead()
    quitter, stayer = await scene.follow("quitter", "stayer")
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    await until(lambda: router.metric(WAITING) == 1, "the quitter's wait to end")
    await until(
        lambda: router.metric("modelplane_requests_total", outcome="client_disconnected") == 1,
        "the quitter to be accounted",
    )
    scene.release()
    lead_headers, answer = await leader
    headers, completion = await stayer
    assert lead_headers["x-modelplane-cache"] == "miss"
    assert headers["x-modelplane-cache"] == "coalesced" and completion.id == answer.id
    assert len(standin.received) == 1 and standin.cancelled == 0


async def test_a_leader_that_goes_away_does_not_strand_its_followers(
    upstreams: Upstreams,
) -> None:
    scene = Scene(upstreams)
    standin, router = scene.standin, scene.router
    leader = await scene.lead()
    followers = await scene.follow("f0", "f1")
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    results = [await f for f in followers]
    assert sorted(h["x-modelplane-cache"] for h, _ in results) == ["coalesced", "miss"]
    assert results[0][1].id == results[1][1].id
    assert len(standin.received) == 2
    assert router.metric("modelplane_requests_total", outcome="client_disconnected") == 1
    await until(lambda: standin.cancelled == 1, "the abandoned upstream call to be dropped")
    scene.release()


async def test_a_follower_waits_no_longer_than_its_own_deadline(upstreams: Upstreams) -> None:
    """The leader waits in a full real-time lane (its deadline starts once admitted); the
    follower's deadline covers its wait and ends it with the router's 503. (The leader's own
    answer is not checked: its short deadline is only there to be the follower's.)"""
    standin, url = upstreams.openai("a")
    busy, busy_url = upstreams.openai("busy")
    raw = config(url)
    raw["models"][0]["timeout"] = {"totalSeconds": 1}
    raw["endpoints"].append(endpoint("busy", busy_url))
    raw["models"].append({"name": "slow", "endpoints": ["busy"]})
    raw["lanes"] = {"realtime": {"maxConcurrency": 1, "maxQueue": 4, "maxWaitSeconds": 60}}
    router = upstreams.router(raw)
    gate = asyncio.Event()
    busy.then(Behaviour(hold=gate))
    sdk = client(router)
    occupier = asyncio.create_task(ask(sdk, "occupier", model="slow"))
    await until(lambda: len(busy.received) == 1, "the lane's one slot to be taken")
    leader = asyncio.create_task(ask(sdk, "leader"))
    await until(
        lambda: router.metric("modelplane_lane_queued_requests", lane="realtime") == 1,
        "the leader to queue for the lane",
    )
    with pytest.raises(openai.APIStatusError) as caught:
        await ask(sdk, "follower")
    assert caught.value.status_code == 503
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "no_endpoint_available"
    assert "waiting for an identical request in flight" in error["message"]
    assert len(standin.received) == 0
    release(upstreams, gate)
    await occupier
    await asyncio.gather(leader, return_exceptions=True)
    assert router.metric("modelplane_cache_coalesced_total") == 0


async def test_sensitive_requests_and_other_tenants_never_coalesce(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    raw = config(url, deterministicOnly=False)
    router = upstreams.router(raw)
    sdk = client(router)
    personal = [{"role": "user", "content": "Write to jane.doe@example.com about the invoice."}]
    gate = asyncio.Event()
    standin.then(Behaviour(hold=gate), Behaviour(hold=gate))
    first = asyncio.create_task(ask(sdk, "p1", messages=personal))
    second = asyncio.create_task(ask(sdk, "p2", messages=personal))
    # Both reach the upstream while the first is held: the second did not wait for it.
    await until(lambda: len(standin.received) == 2, "both sensitive requests upstream")
    assert router.metric(WAITING) == 0
    release(upstreams, gate)
    assert [(await t)[0]["x-modelplane-cache"] for t in (first, second)] == ["bypass", "bypass"]

    gate = asyncio.Event()
    standin.then(Behaviour(hold=gate))
    team_a = asyncio.create_task(ask(sdk, "team-a"))
    await until(lambda: len(standin.received) == 3, "team-a's upstream call")
    router.holder.apply(parse_config(config(url, "team-b", deterministicOnly=False)), "test")
    headers, own = await ask(sdk, "team-b")  # answered while team-a's call is still held
    assert headers["x-modelplane-cache"] == "miss"
    release(upstreams, gate)
    _, other = await team_a
    assert own.id != other.id and len(standin.received) == 4
    assert router.metric("modelplane_cache_coalesced_total") == 0


async def test_a_flight_that_never_lands_times_a_waiter_out_and_stays_in_the_air() -> None:
    flights = Flights()
    flight = flights.take_off("k", "leader")
    with pytest.raises(TimeoutError):
        await flight.wait(0.01)
    assert flight.waiters == 0 and flights.get("k") is flight
    waiter = asyncio.create_task(flight.wait(30))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not flight.landed and flight.waiters == 0
    flights.land(flight, None)
    assert flights.get("k") is None and len(flights) == 0
    assert await flight.wait(30) is None


async def test_a_request_whose_redis_lookup_outlasts_the_flight_is_answered_from_the_cache(
    upstreams: Upstreams, redis_server: RedisServer
) -> None:
    # With a shared Redis, a lookup that misses locally waits for Redis. If the leader of the
    # identical request's flight stores its answer and lands meanwhile, the request finds no
    # flight when Redis says "none": it must find the answer in the local store, not call
    # upstream a second time. The relay answers the second request's GET (Redis: none) but
    # holds that answer until the leader's app has its response.
    relay = HeldGetReply(redis_server.port)
    await relay.start()
    try:
        standin, url = upstreams.openai("a")
        raw = config(url)
        raw["cache"] = {"redis": {"url": relay.url, "timeoutSeconds": 10, "retrySeconds": 60}}
        router = upstreams.router(raw)
        sdk = client(router)
        gate = asyncio.Event()
        standin.then(Behaviour(hold=gate))
        leader = asyncio.create_task(ask(sdk, "leader"))
        await until(lambda: len(standin.received) == 1, "the leader's upstream call")
        relay.arm()
        late = asyncio.create_task(ask(sdk, "late"))
        await asyncio.wait_for(relay.held.wait(), 60)
        release(upstreams, gate)
        lead_headers, answer = await leader
        assert lead_headers["x-modelplane-cache"] == "miss"
        relay.release()
        headers, completion = await late
        # The sidecar's Redis writes go through the relay too: let them end before it does.
        shared = router.sidecar.cache.redis
        assert shared is not None
        servers = upstreams.servers
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(shared.drain(), servers.loop))
    finally:
        await relay.close()
    assert completion.id == answer.id and len(standin.received) == 1
    # Unless the held GET timed out (10 s, the most the config allows; then the request may
    # also have found the leader still in flight), the answer came from the local store.
    if router.metric("modelplane_cache_backend_errors_total", backend="redis") == 0:
        assert headers["x-modelplane-cache"] == "hit"
