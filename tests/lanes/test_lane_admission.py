"""Lane admission alone: slots, the bounded FIFO queue, wait limits, the batch share of an
endpoint, and cheapest-first ordering."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from harness import endpoint
from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_sidecar.config import LaneName, LaneSettings, parse_config
from modelplane_sidecar.errors import ApiError
from modelplane_sidecar.lanes import Lane, LaneGate, cheapest_first, endpoint_room
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.providers.base import Operation
from modelplane_sidecar.routing import RoutedRequest, decide
from modelplane_sidecar.runtime import Snapshot


async def test_slots_then_queue_then_429() -> None:
    lane = Lane(LaneName.BATCH)
    settings = LaneSettings(max_concurrency=2, max_queue=1, max_wait_seconds=30)
    assert await lane.acquire(settings, None) == 0.0
    assert await lane.acquire(settings, None) == 0.0
    waiting = asyncio.create_task(lane.acquire(settings, None))
    await asyncio.sleep(0)
    assert (lane.in_flight, lane.queued) == (2, 1)
    with pytest.raises(ApiError) as caught:
        await lane.acquire(settings, None)
    assert caught.value.status == 429 and caught.value.code == "lane_queue_full"
    assert caught.value.headers["retry-after"] == "1"
    lane.release()
    assert await waiting >= 0
    assert (lane.in_flight, lane.queued) == (2, 0)


async def test_waiters_are_admitted_in_arrival_order() -> None:
    lane = Lane(LaneName.BATCH)
    settings = LaneSettings(max_concurrency=1, max_queue=10, max_wait_seconds=30)
    await lane.acquire(settings, None)
    order: list[int] = []

    async def wait(n: int) -> None:
        await lane.acquire(settings, None)
        order.append(n)

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(wait(n)))
        await asyncio.sleep(0)
    for _ in range(5):
        lane.release()
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_request_that_waited_too_long_gets_503_and_leaves_the_queue() -> None:
    lane = Lane(LaneName.REALTIME)
    settings = LaneSettings(max_concurrency=1, max_queue=5, max_wait_seconds=0.05)
    await lane.acquire(settings, None)
    with pytest.raises(ApiError) as caught:
        await lane.acquire(settings, None)
    assert caught.value.status == 503 and caught.value.code == "lane_wait_timeout"
    assert (lane.in_flight, lane.queued) == (1, 0)


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    lane = Lane(LaneName.BATCH)
    settings = LaneSettings(max_concurrency=1, max_queue=5, max_wait_seconds=30)
    await lane.acquire(settings, None)
    waiting = asyncio.create_task(lane.acquire(settings, None))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert (lane.in_flight, lane.queued) == (1, 0)


async def test_waits_for_endpoint_room_even_with_free_slots() -> None:
    lane = Lane(LaneName.BATCH)
    settings = LaneSettings(max_concurrency=10, max_queue=5, max_wait_seconds=30)
    room = {"free": False}
    waiting = asyncio.create_task(lane.acquire(settings, lambda: room["free"]))
    await asyncio.sleep(0.05)
    assert not waiting.done() and lane.queued == 1
    room["free"] = True  # e.g. a real-time request finished: no release of this lane
    assert await asyncio.wait_for(waiting, 5) > 0
    assert lane.in_flight == 1


def _snapshot(
    lanes: dict[str, Any] | None = None, chain: tuple[str, ...] = ("cloud", "llama"), **limits: Any
) -> Snapshot:
    config = parse_config(
        {
            "endpoints": [
                endpoint(
                    "cloud",
                    "http://127.0.0.1:9/v1",
                    pricing={"inputPerMtok": 2.5, "outputPerMtok": 10},
                ),
                endpoint(
                    "llama",
                    "http://127.0.0.1:9/v1",
                    pricing={"inputPerMtok": 0, "outputPerMtok": 0},
                    limits=limits,
                ),
            ],
            "models": [{"name": "chat", "endpoints": list(chain)}],
            "lanes": lanes or {},
        }
    )
    return Snapshot.build(config)


@pytest.mark.parametrize(
    ("limit", "share", "batch", "in_flight", "room"),
    [
        (None, 0.5, 1000, 1000, True),
        (4, 0.5, 1, 3, True),  # one real-time slot still free
        (4, 0.5, 2, 2, False),  # the batch share is used up
        (4, 0.5, 1, 4, False),  # full of real-time requests
        (4, 1.0, 3, 3, True),
        (1, 0.5, 0, 0, True),  # a share always allows one
        (1, 0.5, 1, 1, False),
    ],
)
def test_endpoint_room(
    limit: int | None, share: float, batch: int, in_flight: int, room: bool
) -> None:
    snapshot = _snapshot(maxConcurrency=limit)
    llama = snapshot.endpoints["llama"]
    llama.state.in_flight = in_flight
    assert endpoint_room(llama, share, batch) is room


def test_cheapest_first_reorders_and_says_so_in_the_trace() -> None:
    snapshot = _snapshot()
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    request = RoutedRequest(Operation.CHAT, body, CIMultiDictProxy(CIMultiDict()), "chat", False)
    decision = decide(snapshot, request)
    assert [e.name for e in decision.candidates] == ["cloud", "llama"]
    cheapest_first(decision, request)
    assert [e.name for e in decision.candidates] == ["llama", "cloud"]
    assert decision.trace is not None
    assert decision.trace.order == ["llama", "cloud"]
    assert "batch lane: llama first (cheapest)" in decision.trace.pick


def _batch_request() -> RoutedRequest:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    headers = CIMultiDictProxy(CIMultiDict({"x-modelplane-priority": "batch"}))
    return RoutedRequest(Operation.CHAT, body, headers, "chat", False)


def test_routing_keeps_a_full_endpoint_for_batch_requests_only() -> None:
    snapshot = _snapshot(maxConcurrency=1)
    snapshot.endpoints["llama"].state.in_flight = 1
    realtime = RoutedRequest(
        Operation.CHAT, _batch_request().body, CIMultiDictProxy(CIMultiDict()), "chat", False
    )
    assert [e.name for e in decide(snapshot, realtime).candidates] == ["cloud"]
    # The batch lane waits for room at llama instead (LaneGate.admit).
    assert [e.name for e in decide(snapshot, _batch_request()).candidates] == ["cloud", "llama"]


async def _queued(gate: LaneGate, count: int) -> None:
    """Bounded wait (60 s of wall time) until `count` requests wait in the batch queue."""
    for _ in range(6000):
        if gate.lane(LaneName.BATCH).queued == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} requests in the batch queue")


async def test_a_waiting_batch_request_spills_once_its_endpoint_is_unhealthy() -> None:
    snapshot = _snapshot(maxConcurrency=1)
    llama = snapshot.endpoints["llama"]
    llama.state.in_flight = 1  # full of real-time requests
    metrics = SidecarMetrics()
    gate = LaneGate(metrics)
    request = _batch_request()
    decision = decide(snapshot, request)
    admitting = asyncio.create_task(gate.admit(snapshot, request, decision, LaneName.BATCH))
    await _queued(gate, 1)
    assert not admitting.done()
    policy = decision.alias.circuit_breaker
    for _ in range(policy.failure_threshold):
        llama.state.breaker.record_failure(policy)
    release = await asyncio.wait_for(admitting, 60)
    # Admitted for the cloud; llama, still full, is no fallback either.
    assert [e.name for e in decision.candidates] == ["cloud"]
    assert ("llama", "1 requests in flight, limit 1 (batch lane)") in decision.removed
    assert decision.trace is not None
    assert "batch lane: llama not healthy" in decision.trace.pick
    reason = {"reason": "unhealthy"}
    assert metrics.registry.get_sample_value("modelplane_lane_spilled_total", reason) == 1
    assert release is not None
    release()
    assert gate.lane(LaneName.BATCH).in_flight == 0


async def test_a_batch_request_with_nowhere_to_spill_gets_503_after_its_wait() -> None:
    snapshot = _snapshot({"batch": {"maxWaitSeconds": 0.05}}, ("llama",), maxConcurrency=1)
    snapshot.endpoints["llama"].state.in_flight = 1  # stays full
    gate = LaneGate(SidecarMetrics())
    request = _batch_request()
    decision = decide(snapshot, request)
    with pytest.raises(ApiError) as caught:
        await gate.admit(snapshot, request, decision, LaneName.BATCH)
    assert caught.value.status == 503 and caught.value.code == "lane_wait_timeout"
    assert gate.lane(LaneName.BATCH).in_flight == 0
