"""A stream's idle timeout that costs one clock read per chunk.

`asyncio.timeout(idle)` re-armed with `reschedule()` after every chunk cancels and creates a loop
timer each time: about a microsecond per chunk, tens per stream. `IdleTimeout` only notes when
the last chunk passed (`touch()`); its timer wakes at most once per `idle` seconds, re-arms itself
for `last + idle` while chunks keep coming, and cancels the task once nothing passed for `idle`
seconds. Leaving the block then raises TimeoutError, exactly like `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class IdleTimeout:
    __slots__ = ("_cancelling", "_handle", "_idle", "_loop", "_task", "expired", "last")

    def __init__(self, idle: float) -> None:
        self._idle = idle
        self.expired = False

    async def __aenter__(self) -> IdleTimeout:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("IdleTimeout must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
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
        self.expired = True
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._handle.cancel()
        # As asyncio.timeout does: our own cancellation becomes TimeoutError; one that came from
        # outside as well (the app went away) stays a cancellation.
        if (
            self.expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
