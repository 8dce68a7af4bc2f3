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
from modelplane_sidecar.lanes import Lane, cheapest_first, endpoint_room
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


def _snapshot(**limits: Any) -> Snapshot:
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
            "models": [{"name": "chat", "endpoints": ["cloud", "llama"]}],
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
