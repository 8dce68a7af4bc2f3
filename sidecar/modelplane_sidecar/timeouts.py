"""Timeouts of the request path that cost the request almost nothing.

`asyncio.timeout` arms a loop timer when a block starts and cancels it when the block ends: a
few microseconds per upstream attempt under uvloop, and a stream's idle timeout re-armed per
chunk paid that again for every chunk. Here:

* `AttemptTimeouts` runs every attempt's deadline on one loop timer. Deadlines of the same
  length end in the order they start, so each length keeps its running deadlines in an
  insertion-ordered dict (start and end of a block: one dict insert and one delete), and the
  timer sleeps until the earliest head. Ended deadlines are not unscheduled: the timer wakes at
  a stale head at most once and sleeps until the next live one.
* `IdleTimeout` notes when the last chunk passed (`touch()`); its one timer wakes at most once
  per idle period, re-arms itself for `last + idle` while chunks keep coming, and cancels the
  task once nothing passed for `idle` seconds.

Both fire on time, never early; leaving the block then raises TimeoutError, and a cancellation
from outside stays a cancellation, exactly as with `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class _Expiring:
    """What both timeouts share: cancel the block's task once, turn that into TimeoutError."""

    __slots__ = ("_cancelling", "_task", "expired")

    def _enter(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("timeouts must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def _exit(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        # As asyncio.timeout does: our own cancellation becomes TimeoutError; one that came from
        # outside as well (the app went away) stays a cancellation.
        if (
            self.expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc


class AttemptTimeouts:
    """Deadlines of upstream attempts, all on one loop timer (one instance per event loop)."""

    def __init__(self) -> None:
        #: Running deadlines by length, each dict in the order they end.
        self._running: dict[float, dict[_Deadline, None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __call__(self, seconds: float) -> _Deadline:
        """`with timeouts(seconds):` in a task, like `async with asyncio.timeout(seconds):` (a
        plain `with`: starting and ending a deadline awaits nothing)."""
        return _Deadline(self, seconds)

    def _start(self, deadline: _Deadline) -> None:
        loop = asyncio.get_running_loop()
        deadline.when = when = loop.time() + deadline.seconds
        running = self._running.get(deadline.seconds)
        if running is None:
            running = self._running[deadline.seconds] = {}
        running[deadline] = None
        if self._timer is None or when < self._timer_at:
            self._arm(loop, when)

    def _end(self, deadline: _Deadline) -> None:
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


class _Deadline(_Expiring):
    __slots__ = ("_timeouts", "seconds", "when")

    def __init__(self, timeouts: AttemptTimeouts, seconds: float) -> None:
        self._timeouts = timeouts
        self.seconds = seconds
        self.when = 0.0

    def __enter__(self) -> _Deadline:
        self._enter()
        self._timeouts._start(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.expired:
            self._timeouts._end(self)
        self._exit(exc_type, exc)


class IdleTimeout(_Expiring):
    """A stream's idle timeout: `touch()` after every chunk restarts the countdown."""

    __slots__ = ("_handle", "_idle", "_loop", "last")

    def __init__(self, idle: float) -> None:
        self._idle = idle
        self.expired = False

    async def __aenter__(self) -> IdleTimeout:
        self._enter()
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + self._idle, self._check)
        return self

    def touch(self) -> None:
        """Something passed: the idle time starts again from now."""
        self.last = self._loop.time()

    def _check(self) -> None:
        due = self.last + self._idle
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._expire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        self._exit(exc_type, exc)
