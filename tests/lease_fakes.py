"""An in-memory stand-in for the apiserver's Lease API, and a clock the tests move by hand.

The store keeps wire bodies (what `LeaseRecord.body()` renders) and hands back records parsed
from them, with the apiserver's optimistic concurrency: a create of an existing Lease and a
replace at a stale resourceVersion are refused (409). `before_write` lets a test slip another
replica's write in between a read and a write; `before_read` and `after_write` let time pass
and others act while a read or a write's answer is on its way; `failures` makes the next calls
fail the way an unreachable apiserver does. e2e/test_operator_ha.py runs the same code against
a real apiserver.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable

from modelplane_operator.ha.lease import LeaseConflict, LeaseRecord
from modelplane_operator.kube import KubeError

START = dt.datetime(2026, 3, 14, 12, 0, tzinfo=dt.UTC)


class FakeClock:
    def __init__(self, skew: float = 0.0) -> None:
        self.t = 1000.0
        #: Seconds this machine's wall clock is off (monotonic clocks are unaffected).
        self.skew = skew

    def monotonic(self) -> float:
        return self.t

    def now(self) -> dt.datetime:
        return START + dt.timedelta(seconds=self.t - 1000.0 + self.skew)

    def advance(self, seconds: float) -> None:
        self.t += seconds


class SkewedClock:
    """Another replica's view of a shared `FakeClock`: same rate, its own wall-clock error."""

    def __init__(self, clock: FakeClock, skew: float) -> None:
        self._clock = clock
        self._skew = skew

    def monotonic(self) -> float:
        return self._clock.monotonic()

    def now(self) -> dt.datetime:
        return self._clock.now() + dt.timedelta(seconds=self._skew)


class FakeLeases:
    def __init__(self) -> None:
        self.store: dict[tuple[str, str], dict[str, object]] = {}
        self._version = 0
        self.writes: list[tuple[str, str | None]] = []
        #: Called before every create/replace reaches the store (another replica's write).
        self.before_write: Callable[[], None] | None = None
        #: Awaited before the next read is served (time passes, others write meanwhile).
        self.before_read: Callable[[], Awaitable[None]] | None = None
        #: Awaited after the next write is stored, before its answer arrives.
        self.after_write: Callable[[], Awaitable[None]] | None = None
        #: Exceptions the next calls raise, in order (an apiserver that is away).
        self.failures: list[Exception] = []

    def _fail(self) -> None:
        if self.failures:
            raise self.failures.pop(0)

    def _stored(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        self._version += 1
        body = record.replace(resource_version=str(self._version)).body(namespace, name)
        self.store[(namespace, name)] = body
        self.writes.append((name, record.holder))
        return LeaseRecord.from_body(body)

    async def _answer(self, record: LeaseRecord) -> LeaseRecord:
        if self.after_write is not None:
            hook, self.after_write = self.after_write, None
            await hook()
        return record

    def record(self, namespace: str, name: str) -> LeaseRecord | None:
        body = self.store.get((namespace, name))
        return LeaseRecord.from_body(body) if body is not None else None

    async def get(self, namespace: str, name: str) -> LeaseRecord | None:
        self._fail()
        if self.before_read is not None:
            hook, self.before_read = self.before_read, None
            await hook()
        return self.record(namespace, name)

    async def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        self._fail()
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook()
        if (namespace, name) in self.store:
            raise LeaseConflict("exists")
        return await self._answer(self._stored(namespace, name, record))

    def put(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        """Someone else's write (kubectl, another replica), with no concurrency check."""
        return self._stored(namespace, name, record)

    async def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        self._fail()
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook()
        current = self.record(namespace, name)
        if current is None or current.resource_version != record.resource_version:
            raise LeaseConflict("the object has been modified")
        return await self._answer(self._stored(namespace, name, record))

    async def list(self, namespace: str, selector: str) -> dict[str, LeaseRecord]:
        self._fail()
        key, _, value = selector.partition("=")
        out = {}
        for (ns, name), body in self.store.items():
            record = LeaseRecord.from_body(body)
            if ns == namespace and record.labels.get(key) == value:
                out[name] = record
        return out

    async def delete(self, namespace: str, name: str) -> None:
        self._fail()
        self.store.pop((namespace, name), None)


def unreachable() -> KubeError:
    return KubeError(503, "the apiserver is unavailable")
