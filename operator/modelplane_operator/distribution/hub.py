"""Who runs which config: one channel per namespace, one session per connected sidecar.

The xDS rule the hub keeps: at most one config in flight per sidecar. A new version is pushed to a
sidecar only when it has answered the previous push (ACK or NACK); a sidecar that is still busy
gets the newest version as soon as it answers, never the versions in between. A version a sidecar
NACKed is not pushed to it again. The snapshot message is serialised once per version and shared
by every session of the namespace.

Replica updates (the EDS beside the CDS): when a new version differs from the one a sidecar runs
only in the replica lists of self-hosted endpoints (EndpointSlice readiness), a sidecar whose
hello lists `replicas/v1` gets a `replicas` message instead of the snapshot: the changed lists,
the version it applies to (`base`, exactly the one the sidecar ACKed) and the version it makes.
The version line stays one: ACK/NACK, "current" and Applied count the same versions whichever
message carried them, and a sidecar that connects late, reconnects, or runs a version the hub no
longer remembers gets the full snapshot, which always holds every replica. A NACKed replica
update is answered with the full snapshot of the same version (the two disagree about the base,
so the hub stops sending that sidecar updates); only a NACKed snapshot marks a version rejected.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from modelplane_sidecar.controlplane import config_message, replicas_message

if TYPE_CHECKING:
    from ..metrics import OperatorMetrics

log = logging.getLogger("modelplane.operator.hub")


@dataclass(frozen=True)
class Identity:
    """Who a sidecar is, as the TokenReview API vouched for it."""

    namespace: str
    service_account: str
    username: str
    pod: str | None = None


@dataclass(frozen=True)
class SidecarCounts:
    connected: int = 0
    current: int = 0
    stale: int = 0
    rejected: int = 0
    #: One NACK error for the current version, for the Applied condition's message.
    rejection: str | None = None


Send = Callable[[bytes], Awaitable[None]]

#: Versions per namespace whose replica lists the hub remembers, to send a replica update to a
#: sidecar that runs one of them; a sidecar on an older version gets the full snapshot.
RECENT_VERSIONS = 8


@dataclass(frozen=True)
class PoolState:
    """A config version's replica lists and a digest of everything else (its shape)."""

    #: Equal shapes: the two versions differ in their replica lists at most.
    shape: bytes
    #: Endpoint name -> its replica list in wire form (endpoints that have one).
    replicas: dict[str, list[Any]]

    @classmethod
    def of(cls, config: dict[str, Any]) -> PoolState:
        replicas: dict[str, list[Any]] = {}
        endpoints = []
        for endpoint in config.get("endpoints") or []:
            listed = endpoint.get("replicas") if isinstance(endpoint, dict) else None
            if isinstance(listed, list):
                replicas[str(endpoint.get("name"))] = listed
                endpoint = {**endpoint, "replicas": []}  # still a pool, whatever it lists
            endpoints.append(endpoint)
        metadata = {**(config.get("metadata") or {}), "version": None}
        rest = orjson.dumps(
            {**config, "endpoints": endpoints, "metadata": metadata},
            option=orjson.OPT_SORT_KEYS,
        )
        return cls(hashlib.sha256(rest).digest(), replicas)


class Session:
    """One connected sidecar and where it stands."""

    def __init__(
        self,
        identity: Identity,
        node: str,
        send: Send,
        running: str | None,
        replica_updates: bool = False,
    ) -> None:
        self.identity = identity
        self.node = node
        self._send = send
        #: The version the sidecar runs (its hello, then every ACK).
        self.acked: str | None = running
        #: The last version it refused, with its error.
        self.rejected: tuple[str, str] | None = None
        #: The version pushed and not yet answered, and when it was pushed (monotonic).
        self.inflight: str | None = None
        self.pushed_at = 0.0
        #: Whether the sidecar takes replica updates (its hello lists `replicas/v1`; cleared
        #: when it NACKs one), and whether the push in flight is one.
        self.replica_updates = replica_updates
        self.inflight_update = False
        self._task: asyncio.Task[None] | None = None
        self._notify: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def namespace(self) -> str:
        return self.identity.namespace

    def __repr__(self) -> str:
        return f"Session({self.namespace}/{self.node}, acked={self.acked})"

    def offer(self, channel: Channel) -> None:
        """Push the channel's version unless one is in flight or the sidecar has answered it."""
        version, message = channel.version, channel.message
        if self.closed or version is None or message is None or self.inflight is not None:
            return
        if version == self.acked or (self.rejected is not None and self.rejected[0] == version):
            return
        update = (
            channel.replica_update(self.acked)
            if self.replica_updates and self.acked is not None
            else None
        )
        self.inflight = version
        self.inflight_update = update is not None
        self.pushed_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._push(update or message))

    async def _push(self, message: bytes) -> None:
        try:
            await self._send(message)
        except (ConnectionError, RuntimeError) as exc:
            log.info("push to %s failed: %s", self, exc)
            self.closed = True

    def notify(self, message: bytes) -> bool:
        """Send a message that needs no answer (a load snapshot); skipped while the previous
        one is still being written, since the next one supersedes it."""
        if self.closed or (self._notify is not None and not self._notify.done()):
            return False
        self._notify = asyncio.get_running_loop().create_task(self._push(message))
        return True

    def answered(self, version: str, error: str | None) -> bool:
        """Record an ACK (error None) or NACK; False when it answers nothing we sent."""
        if version != self.inflight:
            return False
        self.inflight = None
        if error is None:
            self.acked, self.rejected = version, None
        elif self.inflight_update:
            # Not a verdict on the version: the snapshot of the same version goes next.
            self.replica_updates = False
        else:
            self.rejected = (version, error)
        return True


@dataclass
class Channel:
    """A namespace's current config and the sessions that should run it."""

    version: str | None = None
    message: bytes | None = None
    sessions: set[Session] = field(default_factory=set)
    #: The replica lists of the latest versions (oldest first), and the replica update to the
    #: current version from each base asked for so far (None: that base needs the snapshot).
    recent: dict[str, PoolState] = field(default_factory=dict)
    updates: dict[str, bytes | None] = field(default_factory=dict)

    def remember(self, version: str, config: dict[str, Any]) -> None:
        self.recent.pop(version, None)
        self.recent[version] = PoolState.of(config)
        while len(self.recent) > RECENT_VERSIONS:
            del self.recent[next(iter(self.recent))]
        self.updates = {}

    def replica_update(self, base: str) -> bytes | None:
        """The `replicas` message from version `base` to the current one, if that is all that
        changed between them (None: send the snapshot)."""
        if base in self.updates:
            return self.updates[base]
        old, new = self.recent.get(base), self.recent.get(self.version or "")
        message = None
        if old is not None and new is not None and old.shape == new.shape:
            changed = {n: r for n, r in new.replicas.items() if old.replicas.get(n) != r}
            if changed and self.version is not None:
                message = orjson.dumps(replicas_message(self.version, base, changed))
        self.updates[base] = message
        return message

    def counts(self) -> SidecarCounts:
        current = rejected = 0
        rejection = None
        for s in self.sessions:
            if self.version is not None and s.acked == self.version:
                current += 1
            elif s.rejected is not None and s.rejected[0] == self.version:
                rejected += 1
                rejection = rejection or s.rejected[1]
        connected = len(self.sessions)
        return SidecarCounts(
            connected, current, connected - current - rejected, rejected, rejection
        )


class ConfigHub:
    """Namespace channels; `on_change(namespace)` is called whenever its counts may change."""

    def __init__(
        self,
        on_change: Callable[[str], None] | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self._channels: dict[str, Channel] = {}
        self.on_change = on_change
        self._metrics = metrics
        if metrics is not None:
            metrics.watch(self)

    def _channel(self, namespace: str) -> Channel:
        channel = self._channels.get(namespace)
        if channel is None:
            channel = self._channels[namespace] = Channel()
        return channel

    def _changed(self, namespace: str) -> None:
        if self.on_change is not None:
            self.on_change(namespace)

    def namespaces(self) -> list[str]:
        return sorted(self._channels)

    def version(self, namespace: str) -> str | None:
        channel = self._channels.get(namespace)
        return channel.version if channel else None

    def counts(self, namespace: str) -> SidecarCounts:
        channel = self._channels.get(namespace)
        return channel.counts() if channel else SidecarCounts()

    def sessions(self, namespace: str) -> list[Session]:
        channel = self._channels.get(namespace)
        return sorted(channel.sessions, key=lambda s: s.node) if channel else []

    def publish(self, namespace: str, version: str | None, config: dict[str, Any] | None) -> bool:
        """Make `config` the namespace's current one and offer it to every session.

        Returns False when the version is already current. None withdraws the config: sidecars
        keep what they run (as they do while the operator is away) but get nothing new.
        """
        channel = self._channel(namespace)
        if version == channel.version:
            return False
        channel.version = version
        channel.message = (
            orjson.dumps(config_message(version, config))
            if version is not None and config is not None
            else None
        )
        channel.updates = {}
        if version is not None and config is not None:
            channel.remember(version, config)
        for session in channel.sessions:
            session.offer(channel)
        self._changed(namespace)
        return True

    def broadcast(self, namespace: str, message: bytes) -> int:
        """Send an unversioned message (load snapshots) to the namespace's sidecars."""
        channel = self._channels.get(namespace)
        if channel is None:
            return 0
        return sum(session.notify(message) for session in channel.sessions)

    def connect(self, session: Session) -> None:
        channel = self._channel(session.namespace)
        channel.sessions.add(session)
        session.offer(channel)
        self._changed(session.namespace)

    def disconnect(self, session: Session) -> None:
        session.closed = True
        channel = self._channels.get(session.namespace)
        if channel is not None:
            channel.sessions.discard(session)
            self._changed(session.namespace)

    def answer(self, session: Session, version: str, error: str | None) -> None:
        """An ACK (error None) or NACK from a session; pushes the newest version if it moved on."""
        if not session.answered(version, error):
            log.debug("ignoring an answer for version %s that %s was not sent", version, session)
            return
        if self._metrics is not None:
            answer = "ack" if error is None else "nack"
            self._metrics.answers.labels(session.namespace, answer).inc()
            self._metrics.push_duration.labels(answer).observe(time.monotonic() - session.pushed_at)
        if error is not None and (session.rejected is None or session.rejected[0] != version):
            log.warning(
                "sidecar %s in %s rejected the replica update to %s, sending the snapshot: %s",
                session.node,
                session.namespace,
                version,
                error,
            )
        elif error is not None:
            log.warning(
                "sidecar %s in %s rejected config %s: %s",
                session.node,
                session.namespace,
                version,
                error,
            )
        channel = self._channel(session.namespace)
        session.offer(channel)
        self._changed(session.namespace)
