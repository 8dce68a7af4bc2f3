"""Leader election with a coordination.k8s.io/v1 Lease, the way client-go's leaderelection does it.

One attempt (`try_acquire_or_renew`) reads the Lease and then either creates it, renews it (we
hold it), takes it over (nobody holds it, or its holder let it expire) or leaves it alone. Every
write is a replace at the resourceVersion that was read, so of two replicas that try at once the
apiserver lets exactly one through. A Lease counts as expired when it has not *changed* for
`leaseDurationSeconds` as this replica measures it on its own monotonic clock since it saw the
change; the holder's renewTime is written for people, never compared across machines.

The leader renews every `retry_period`. It is the leader (`is_leader()`) only until
`renew_deadline` after the start of its last successful renewal: past that, it stops writing at
once, even while a renewal is still in flight, and steps down. Because `renew_deadline <
lease_duration`, another replica can take the Lease over only after the old leader has stopped
counting itself leader (docs/operator.md has the argument and its one assumption: clocks on the
replicas run at about the same rate).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from ..kube import KubeError
from .lease import LeaseClient, LeaseConflict, LeaseRecord

log = logging.getLogger("modelplane.operator.election")

#: Candidates wait `retry_period` times up to this factor between attempts (client-go's jitter).
JITTER = 1.2


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def now(self) -> dt.datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ElectionSettings:
    identity: str
    name: str = "modelplane-operator"
    namespace: str = "default"
    #: How long a Lease that stopped changing keeps its holder (leaseDurationSeconds).
    lease_duration: float = 15.0
    #: How long a leader keeps acting on a renewal that succeeded (< lease_duration).
    renew_deadline: float = 10.0
    #: Between renewals, and between a candidate's attempts.
    retry_period: float = 2.0
    #: Annotations the holder writes on the Lease (the leader's stream URL, for relays).
    annotations: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.identity:
            raise ValueError("leader election needs an identity")
        if not self.name or not self.namespace:
            raise ValueError("leader election needs a lease name and namespace")
        if self.retry_period <= 0:
            raise ValueError(f"lease retry period must be positive, not {self.retry_period}")
        if self.renew_deadline <= JITTER * self.retry_period:
            raise ValueError(
                f"lease renew deadline ({self.renew_deadline:g}s) must be more than "
                f"{JITTER:g} x the retry period ({self.retry_period:g}s)"
            )
        if self.lease_duration <= self.renew_deadline:
            raise ValueError(
                f"lease duration ({self.lease_duration:g}s) must be more than the renew "
                f"deadline ({self.renew_deadline:g}s)"
            )
        if self.lease_duration != int(self.lease_duration):
            raise ValueError(f"lease duration is whole seconds, not {self.lease_duration:g}")


Callback = Callable[[], Awaitable[None]]


class LeaderElector:
    """The Lease state machine of one replica; `run()` drives it, `step()` is one round."""

    def __init__(
        self,
        client: LeaseClient,
        settings: ElectionSettings,
        clock: Clock | None = None,
        *,
        on_started: Callback | None = None,
        on_stopped: Callback | None = None,
        on_new_leader: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self.settings = settings
        self._clock = clock or SystemClock()
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.on_new_leader = on_new_leader
        #: The Lease as last read or written, and when (monotonic) it was seen to change.
        self.observed: LeaseRecord | None = None
        self._observed_at = 0.0
        #: When the last successful acquire/renew started (monotonic); None: not holding.
        self._renewed_at: float | None = None
        self._leading = False
        self._last_leader: str | None = None

    # --- state -----------------------------------------------------------------------------

    def is_leader(self) -> bool:
        """True while this replica may act as the leader: it renewed within the deadline."""
        if not self._leading or self._renewed_at is None:
            return False
        return self._clock.monotonic() < self._renewed_at + self.settings.renew_deadline

    def leader(self) -> str | None:
        """Who holds the Lease, as far as this replica can tell (None: nobody, or expired)."""
        record = self.observed
        if record is None or not record.holder or self._expired(record):
            return None
        return record.holder

    def leader_annotations(self) -> Mapping[str, str]:
        record = self.observed
        return record.annotations if record is not None and self.leader() else {}

    def _expired(self, record: LeaseRecord) -> bool:
        return self._observed_at + record.duration_seconds <= self._clock.monotonic()

    def _observe(self, record: LeaseRecord, at: float) -> None:
        previous = self.observed
        if previous is None or previous.resource_version != record.resource_version:
            self.observed = record
            self._observed_at = at

    # --- one attempt -----------------------------------------------------------------------

    async def try_acquire_or_renew(self) -> bool:
        """Read the Lease and write it if we hold it or may take it; True when we hold it now.

        Raises `KubeError`/`OSError`/`TimeoutError` when the apiserver cannot be asked.
        """
        s = self.settings
        started = self._clock.monotonic()
        now = self._clock.now()
        existing = await self._client.get(s.namespace, s.name)
        # Others' renewals count from when we saw them (after the read: the later, the safer);
        # our own from when we began (before the read: the earlier, the safer).
        seen = self._clock.monotonic()
        if existing is None:
            record = LeaseRecord(
                holder=s.identity,
                duration_seconds=int(s.lease_duration),
                acquire_time=now,
                renew_time=now,
                transitions=0,
                annotations=dict(s.annotations),
            )
            try:
                created = await self._client.create(s.namespace, s.name, record)
            except LeaseConflict:
                return False  # another replica created it first; read it next round
            self._observe(created, self._clock.monotonic())
            self._renewed_at = started
            return True
        self._observe(existing, seen)
        mine = existing.holder == s.identity
        if existing.holder and not mine and not self._expired(existing):
            return False
        record = existing.replace(
            holder=s.identity,
            duration_seconds=int(s.lease_duration),
            acquire_time=existing.acquire_time if mine else now,
            renew_time=now,
            transitions=existing.transitions if mine else existing.transitions + 1,
            annotations={**existing.annotations, **s.annotations},
        )
        try:
            stored = await self._client.replace(s.namespace, s.name, record)
        except LeaseConflict:
            return False  # someone wrote in between: whoever did, we read it again next round
        self._observe(stored, self._clock.monotonic())
        self._renewed_at = started
        return True

    # --- the loop --------------------------------------------------------------------------

    async def step(self) -> None:
        """One round: an attempt (bounded by the time we may still lead), then transitions."""
        s = self.settings
        if self._leading and not self.is_leader():
            # The term is over even if the next renewal would succeed: meanwhile another replica
            # may have led and written (and released the Lease), so leading again is a new term.
            await self._step_down("its lease could not be renewed within the renew deadline")
        budget = s.renew_deadline
        if self._leading and self._renewed_at is not None:
            budget = max(0.0, self._renewed_at + s.renew_deadline - self._clock.monotonic())
        held = False
        try:
            async with asyncio.timeout(max(budget, 0.001)):
                held = await self.try_acquire_or_renew()
        except (KubeError, OSError, TimeoutError) as exc:
            log.warning("lease %s/%s: could not read or write it: %s", s.namespace, s.name, exc)
        if held and not self._leading:
            self._leading = True
            record = self.observed
            log.info(
                "became the leader (lease %s/%s, transition %d)",
                s.namespace,
                s.name,
                record.transitions if record else 0,
                extra={"identity": s.identity},
            )
            if self.on_started is not None:
                await self.on_started()
        elif self._leading and not self.is_leader():
            await self._step_down("its lease could not be renewed within the renew deadline")
        elif self._leading and not held and self.leader() not in (None, s.identity):
            await self._step_down(f"{self.leader()} holds the lease now")
        await self._leader_changed()

    async def _step_down(self, why: str) -> None:
        self._leading = False
        self._renewed_at = None
        s = self.settings
        log.warning("stepped down as the leader (lease %s/%s): %s", s.namespace, s.name, why)
        if self.on_stopped is not None:
            await self.on_stopped()

    async def _leader_changed(self) -> None:
        leader = self.leader()
        if leader == self._last_leader:
            return
        self._last_leader = leader
        if leader is not None and leader != self.settings.identity:
            log.info("the leader is %s", leader)
        if self.on_new_leader is not None:
            await self.on_new_leader(leader)

    def next_delay(self) -> float:
        """Seconds until the next round: the retry period, jittered for candidates."""
        period = self.settings.retry_period
        return period if self._leading else period * random.uniform(1.0, JITTER)

    async def run(self) -> None:
        """Rounds until cancelled."""
        while True:
            await self.step()
            await asyncio.sleep(self.next_delay())

    async def release(self) -> None:
        """Leave the Lease to the others at once (a clean shutdown): stop leading, then clear
        its holder so a follower need not wait for it to expire."""
        if not self._leading:
            return
        self._leading = False
        self._renewed_at = None
        s = self.settings
        record = self.observed
        if record is None or record.holder != s.identity:
            return
        released = record.replace(
            holder=None,
            duration_seconds=1,
            renew_time=self._clock.now(),
            annotations={k: v for k, v in record.annotations.items() if k not in s.annotations},
        )
        try:
            await self._client.replace(s.namespace, s.name, released)
        except (LeaseConflict, KubeError, OSError, TimeoutError) as exc:
            log.warning("lease %s/%s not released (it will expire): %s", s.namespace, s.name, exc)
            return
        log.info("released the lease %s/%s", s.namespace, s.name)
