"""Timeouts of the request path, all on one loop timer, with asyncio.timeout's semantics
(TimeoutError when the time is up, never early; an outside cancellation stays one): attempt
deadlines, a stream's idle deadline that `touch()` restarts with every chunk; and end to end, a
stream whose upstream goes silent ends with an error event."""

from __future__ import annotations

import asyncio

import openai
import pytest
from harness import Upstreams, chain_config, endpoint

from modelplane_sidecar.timeouts import Timeouts


async def _run_for(timeouts: Timeouts, limit: float, work: float) -> str:
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with timeouts(limit):
            await asyncio.sleep(work)
    except TimeoutError:
        assert loop.time() - started >= limit, "a deadline never fires early"
        return "timeout"
    return "done"


async def test_attempt_deadlines_fire_for_the_late_ones_only() -> None:
    # A second of slack between the quick ones' work and their deadline: a loaded machine may
    # stall the loop, and a stall past the deadline would let the timer fire first.
    timeouts = Timeouts()
    results = await asyncio.gather(
        _run_for(timeouts, 1.0, 0.01),
        _run_for(timeouts, 1.0, 30),
        _run_for(timeouts, 1.0, 0.05),
        _run_for(timeouts, 1.0, 30),
    )
    assert results == ["done", "timeout", "done", "timeout"]


async def test_a_shorter_deadline_started_later_fires_first() -> None:
    timeouts = Timeouts()
    finish = asyncio.Event()

    async def long_attempt() -> str:
        with timeouts(30.0):
            await finish.wait()
        return "done"

    long = asyncio.create_task(long_attempt())
    await asyncio.sleep(0.02)
    assert await _run_for(timeouts, 0.05, 30.0) == "timeout"
    assert not long.done()
    finish.set()
    assert await long == "done"


async def test_an_attempt_deadline_cancelled_from_outside_stays_cancelled() -> None:
    timeouts = Timeouts()
    entered = asyncio.Event()

    async def attempt() -> None:
        with timeouts(10):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(attempt())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _run_for(timeouts, 0.05, 1) == "timeout", "the shared timer still works"


def test_one_timeouts_serves_event_loops_one_after_another() -> None:
    timeouts = Timeouts()

    async def late_attempt() -> str:
        return await _run_for(timeouts, 0.05, 5.0)

    async def left_running() -> None:
        # A deadline whose loop ends before its timer fires (the block is never left).
        timeouts(0.01).__enter__()

    asyncio.run(left_running())
    assert asyncio.run(late_attempt()) == "timeout"
    assert asyncio.run(late_attempt()) == "timeout"


async def test_chunks_keep_the_deadline_moving() -> None:
    """Chunks 20 ms apart for longer than the 0.5 s idle limit: none is late. (The limit leaves
    the loop almost half a second of slack per chunk, for a loaded machine.)"""
    loop = asyncio.get_running_loop()
    timeouts = Timeouts()
    with timeouts(0.5) as idle:
        started = loop.time()
        for _ in range(1000):
            if loop.time() - started > 0.8:
                break
            await asyncio.sleep(0.02)
            idle.touch()
    assert loop.time() - started > 0.5, "the chunks outlasted the idle limit"
    assert not idle.expired


async def test_touching_one_deadline_leaves_the_others_of_its_length_on_time() -> None:
    loop = asyncio.get_running_loop()
    timeouts = Timeouts()
    silent = asyncio.create_task(_run_for(timeouts, 0.5, 30.0))
    with timeouts(0.5) as idle:
        started = loop.time()
        for _ in range(1000):
            if silent.done() and loop.time() - started > 0.8:
                break
            await asyncio.sleep(0.02)
            idle.touch()
    assert await silent == "timeout"


async def test_silence_longer_than_idle_raises_timeout_error() -> None:
    timeouts = Timeouts()
    with pytest.raises(TimeoutError), timeouts(0.05) as idle:
        idle.touch()
        await asyncio.sleep(10)
    assert idle.expired
    current = asyncio.current_task()
    assert current is not None and current.cancelling() == 0


def test_upstream_silent_mid_stream_ends_with_error_event(upstreams: Upstreams) -> None:
    # The next chunk would come long after the idle limit, even on a stalled loop.
    _, url_a = upstreams.openai("a", chunk_delay=3.0)
    timeouts = {"streamIdleSeconds": 0.15}
    router = upstreams.router(chain_config([endpoint("a", url_a, timeouts=timeouts)]))
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert len(received) == 1, "the first chunk reached the app before the silence"
    assert "went silent for more than 0.15s" in caught.value.message
    assert router.metric("modelplane_stream_failures_total", endpoint="a", reason="timeout") == 1
