"""Sidecar counts of the whole fleet of operator replicas, for the `Applied` condition.

Sidecars connect to any replica, so no replica sees them all. Each replica publishes, in a Lease
of its own (`<election lease>-<hash of identity>`, labelled `modelplane.io/replica-of`), a tally
per namespace of its connected sidecars: how many, and how many run (ACKed) or refused (NACKed)
each version. It rewrites it when its sidecars change (at most once per `publish_interval`) and
at least every third of its `ttl` otherwise. The leader lists these Leases and adds the fresh
ones to its own live tally: a Lease is fresh while it changed less than its
leaseDurationSeconds ago on the leader's own clock (the first time the leader sees one, its age
is taken from its renewTime). So a replica that dies stops being counted after at most `ttl`,
and one that shuts down cleanly deletes its Lease at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..distribution.hub import ConfigHub, Session, SidecarCounts
from ..kube import KubeError
from .election import Clock, SystemClock
from .lease import LeaseClient, LeaseConflict, LeaseRecord

log = logging.getLogger("modelplane.operator.fleet")

REPLICA_OF_LABEL = "modelplane.io/replica-of"
SIDECARS_ANNOTATION = "modelplane.io/sidecars"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class SidecarTally:
    """One replica's sidecars of one namespace."""

    connected: int = 0
    #: version -> sidecars that run it (their hello or last ACK).
    acked: Mapping[str, int] = field(default_factory=dict)
    #: version -> (sidecars whose last answer refused it, one of their errors).
    rejected: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "acked": dict(self.acked),
            "rejected": {v: [n, error] for v, (n, error) in self.rejected.items()},
        }

    @classmethod
    def from_wire(cls, data: object) -> SidecarTally | None:
        if not isinstance(data, dict):
            return None
        connected = data.get("connected")
        acked = data.get("acked")
        rejected = data.get("rejected")
        return cls(
            connected=connected if isinstance(connected, int) and connected > 0 else 0,
            acked={
                str(v): n
                for v, n in (acked.items() if isinstance(acked, dict) else [])
                if isinstance(n, int) and n > 0
            },
            rejected={
                str(v): (pair[0], str(pair[1]))
                for v, pair in (rejected.items() if isinstance(rejected, dict) else [])
                if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int)
            },
        )


def tally(sessions: Iterable[Session]) -> SidecarTally:
    connected = 0
    acked: dict[str, int] = {}
    rejected: dict[str, tuple[int, str]] = {}
    for session in sessions:
        connected += 1
        if session.acked is not None:
            acked[session.acked] = acked.get(session.acked, 0) + 1
        if session.rejected is not None:
            version, error = session.rejected
            count, first = rejected.get(version, (0, error))
            rejected[version] = (count + 1, first)
    return SidecarTally(connected, acked, rejected)


def fleet_counts(tallies: Iterable[SidecarTally], version: str | None) -> SidecarCounts:
    """Sidecars of every tally against `version`: current, rejected, and the rest stale."""
    connected = current = rejected = 0
    rejection: str | None = None
    for t in tallies:
        connected += t.connected
        if version is None:
            continue
        current += t.acked.get(version, 0)
        count, error = t.rejected.get(version, (0, ""))
        rejected += count
        if count and rejection is None:
            rejection = error
    return SidecarCounts(connected, current, connected - current - rejected, rejected, rejection)


def encode(tallies: Mapping[str, SidecarTally]) -> str:
    return orjson.dumps({ns: t.wire() for ns, t in sorted(tallies.items())}).decode()


def decode(text: str | None) -> dict[str, SidecarTally]:
    try:
        data = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {}
    out: dict[str, SidecarTally] = {}
    for namespace, raw in data.items() if isinstance(data, dict) else []:
        parsed = SidecarTally.from_wire(raw)
        if parsed is not None:
            out[str(namespace)] = parsed
    return out


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def replica_lease_name(group: str, identity: str) -> str:
    return f"{group[:240]}-{_digest(identity, 12)}"


def group_label(group: str) -> str:
    return group if _LABEL_VALUE.match(group) else _digest(group, 16)


@dataclass(frozen=True)
class FleetSettings:
    #: The election Lease's name: replicas of one operator share it.
    group: str
    namespace: str
    identity: str
    #: leaseDurationSeconds of this replica's Lease: it is counted this long after a change.
    ttl: int = 15
    publish_interval: float = 1.0
    poll_interval: float = 1.0
    #: The leader deletes Leases of replicas that have been gone this long.
    forget_after: float = 600.0


@dataclass
class _Seen:
    record: LeaseRecord
    observed_at: float
    tallies: dict[str, SidecarTally]


class FleetCounts:
    """This replica's published tally, and (on the leader) the other replicas' fresh ones."""

    def __init__(
        self,
        client: LeaseClient,
        hub: ConfigHub,
        settings: FleetSettings,
        clock: Clock | None = None,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._hub = hub
        self.settings = settings
        self._clock = clock or SystemClock()
        self._is_leader = is_leader
        self.on_change = on_change
        self.name = replica_lease_name(settings.group, settings.identity)
        self._label = group_label(settings.group)
        self._dirty = True
        self._published_at: float | None = None
        self._resource_version: str | None = None
        self._acquired: dt.datetime | None = None
        self._seen: dict[str, _Seen] = {}
        self._view: dict[str, dict[str, SidecarTally]] = {}

    # --- this replica ----------------------------------------------------------------------

    def mark(self, namespace: str | None = None) -> None:
        """This replica's sidecars changed: publish on the next tick."""
        self._dirty = True

    def local(self) -> dict[str, SidecarTally]:
        tallies = {ns: tally(self._hub.sessions(ns)) for ns in self._hub.namespaces()}
        return {ns: t for ns, t in tallies.items() if t.connected}

    def _record(self) -> LeaseRecord:
        now = self._clock.now()
        self._acquired = self._acquired or now
        return LeaseRecord(
            holder=self.settings.identity,
            duration_seconds=self.settings.ttl,
            acquire_time=self._acquired,
            renew_time=now,
            labels={REPLICA_OF_LABEL: self._label},
            annotations={SIDECARS_ANNOTATION: encode(self.local())},
            resource_version=self._resource_version,
        )

    async def publish(self) -> None:
        """Write this replica's Lease now (create it, or replace it at the version we know)."""
        s = self.settings
        self._dirty = False
        started = self._clock.monotonic()
        try:
            if self._resource_version is None:
                stored = await self._client.create(s.namespace, self.name, self._record())
            else:
                stored = await self._client.replace(s.namespace, self.name, self._record())
        except LeaseConflict:
            # Ours changed under us (a previous run of this replica, or the leader forgot it):
            # take its version and write again on the next tick.
            found = await self._client.get(s.namespace, self.name)
            self._resource_version = found.resource_version if found is not None else None
            self._dirty = True
            return
        self._resource_version = stored.resource_version
        self._published_at = started

    def _publish_due(self) -> bool:
        if self._dirty or self._published_at is None:
            return True
        return self._clock.monotonic() - self._published_at >= self.settings.ttl / 3

    async def withdraw(self) -> None:
        """A clean shutdown: delete this replica's Lease so the leader stops counting it."""
        try:
            await self._client.delete(self.settings.namespace, self.name)
        except (KubeError, OSError, TimeoutError) as exc:
            log.warning("replica lease %s not deleted (it will expire): %s", self.name, exc)

    # --- the other replicas (the leader) ---------------------------------------------------

    def _fresh(self, seen: _Seen) -> bool:
        return self._clock.monotonic() < seen.observed_at + seen.record.duration_seconds

    async def poll(self) -> set[str]:
        """Read the other replicas' Leases; returns the namespaces whose fleet counts moved."""
        s = self.settings
        records = await self._client.list(s.namespace, f"{REPLICA_OF_LABEL}={self._label}")
        now = self._clock.monotonic()
        wall = self._clock.now()
        for name, record in records.items():
            if name == self.name:
                continue
            seen = self._seen.get(name)
            if seen is not None and seen.record.resource_version == record.resource_version:
                continue
            if seen is not None:
                observed_at = now
            else:
                # First sight: as old as its renewTime says (a dead replica's Lease is stale).
                age = (wall - record.renew_time).total_seconds() if record.renew_time else 1e9
                observed_at = now - max(0.0, age)
            tallies = decode(record.annotations.get(SIDECARS_ANNOTATION))
            self._seen[name] = _Seen(record, observed_at, tallies)
        for name in set(self._seen) - set(records):
            del self._seen[name]
        await self._forget_gone(now)
        return self._refresh_view()

    async def _forget_gone(self, now: float) -> None:
        for name, seen in list(self._seen.items()):
            if now - seen.observed_at < self.settings.forget_after:
                continue
            log.info("deleting the lease of replica %s, gone for a while", seen.record.holder)
            try:
                await self._client.delete(self.settings.namespace, name)
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("lease %s of a gone replica not deleted: %s", name, exc)
                continue
            del self._seen[name]

    def _refresh_view(self) -> set[str]:
        view: dict[str, dict[str, SidecarTally]] = {}
        for name, seen in self._seen.items():
            if self._fresh(seen):
                for namespace, t in seen.tallies.items():
                    view.setdefault(namespace, {})[name] = t
        changed = {ns for ns in set(view) | set(self._view) if view.get(ns) != self._view.get(ns)}
        self._view = view
        return changed

    def replicas(self) -> list[str]:
        """Identities of the other replicas counted now."""
        return sorted(str(s.record.holder) for s in self._seen.values() if self._fresh(s))

    def counts(self, namespace: str, version: str | None) -> SidecarCounts:
        """Sidecars of `namespace` on every fresh replica (this one live) against `version`."""
        remote = self._view.get(namespace, {}).values()
        return fleet_counts([tally(self._hub.sessions(namespace)), *remote], version)

    # --- the loop --------------------------------------------------------------------------

    async def tick(self) -> None:
        if self._publish_due():
            await self.publish()
        if self._is_leader():
            changed = await self.poll()
            if self.on_change is not None:
                for namespace in sorted(changed):
                    self.on_change(namespace)
        else:
            self._seen.clear()
            self._view = {}

    async def run(self) -> None:
        """Publish and (while leading) poll, until cancelled; errors are retried next tick."""
        interval = min(self.settings.publish_interval, self.settings.poll_interval)
        while True:
            try:
                await self.tick()
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("replica lease %s: %s", self.name, exc)
                self._dirty = True
            await asyncio.sleep(interval)
