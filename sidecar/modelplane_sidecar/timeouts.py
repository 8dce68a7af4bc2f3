"""Timeouts of the request path that cost the request almost nothing.

`asyncio.timeout` arms a loop timer when a block starts and cancels it when the block ends: a
few microseconds per upstream attempt under uvloop, and a stream's idle timeout re-armed per
chunk paid that again for every chunk. `Timeouts` runs all the deadlines of the process on one
loop timer. Deadlines of the same length end in the order they (re)start, so each length keeps
its running deadlines in an insertion-ordered dict: starting, ending or restarting a deadline
(`touch()`, a stream's idle timeout after each chunk) is a dict insert or delete, and the
timer sleeps until the earliest head. Ended deadlines are not unscheduled: the timer wakes at a
stale head at most once and sleeps until the next live one.

A deadline fires on time, never early; leaving the block then raises TimeoutError, and a
cancellation from outside stays a cancellation, exactly as with `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class Timeouts:
    """Deadlines of the request path, all on one loop timer (one instance per event loop)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Running deadlines by length, each dict in the order they end.
        self._running: dict[float, dict[Deadline, None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __call__(self, seconds: float) -> Deadline:
        """`with timeouts(seconds):` in a task, like `async with asyncio.timeout(seconds):` (a
        plain `with`: starting and ending a deadline awaits nothing)."""
        return Deadline(self, seconds)

    def _start(self, deadline: Deadline) -> None:
        """Run `deadline` from now: at the end of its length's order."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Another event loop than before (an app started again): the deadlines and the
            # timer of the old one went with it.
            self._loop, self._running, self._timer = loop, {}, None
        deadline.when = when = loop.time() + deadline.seconds
        running = self._running.get(deadline.seconds)
        if running is None:
            running = self._running[deadline.seconds] = {}
        else:
            running.pop(deadline, None)
        running[deadline] = None
        if self._timer is None or when < self._timer_at:
            self._arm(loop, when)

    def _end(self, deadline: Deadline) -> None:
        running = self._running.get(deadline.seconds)
        if running is not None:
            running.pop(deadline, None)
            if not running:
                del self._running[deadline.seconds]

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(when, self._fire, loop)
        self._timer_at = when

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        earliest: float | None = None
        for seconds, running in list(self._running.items()):
            while running:
                deadline = next(iter(running))
                if deadline.when > now:
                    if earliest is None or deadline.when < earliest:
                        earliest = deadline.when
                    break
                del running[deadline]
                deadline._expire()
            if not running:
                del self._running[seconds]
        if earliest is not None:
            self._arm(loop, earliest)


class Deadline:
    """One block's deadline; cancels the block's task once when it passes."""

    __slots__ = ("_cancelling", "_task", "_timeouts", "expired", "seconds", "when")

    def __init__(self, timeouts: Timeouts, seconds: float) -> None:
        self._timeouts = timeouts
        self.seconds = seconds
        self.when = 0.0
        self.expired = False

    def __enter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("timeouts must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._timeouts._start(self)
        return self

    def touch(self) -> None:
        """Something happened: the countdown starts again from now (a stream's idle timeout)."""
        if not self.expired:
            self._timeouts._start(self)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.expired:
            self._timeouts._end(self)
        # As asyncio.timeout does: our own cancellation becomes TimeoutError; one that came from
        # outside as well (the app went away) stays a cancellation.
        elif self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
