"""This operator process as one of several replicas: what leading and following change.

While this replica leads (and once it has read the budget books afresh), the controller writes
status and Events and the stream server keeps the books for spend-speaking sidecars. While it
follows, the controller still compiles and the stream server still serves configs to the sidecars
connected here, but their spend messages are relayed to the leader, whose stream URL is an
annotation of the election Lease. Every transition closes the streams that carry spend, so each
sidecar resynchronises its leases with the replica that keeps the books now.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge

from ..controller import Controller
from ..distribution.hub import ConfigHub
from ..distribution.relay import Peer, SpendRelays
from ..distribution.server import StreamServer
from ..kube import KubeClient, KubeError
from .election import Clock, ElectionSettings, LeaderElector
from .fleet import FleetCounts, FleetSettings
from .lease import KubeLeases, LeaseClient

log = logging.getLogger("modelplane.operator.replica")

#: The annotation on the election Lease with the leader's config stream URL.
STREAM_URL_ANNOTATION = "modelplane.io/stream-url"
#: A new leader retries reading the budget books this often (about a minute) before it lets
#: another replica try.
TAKEOVER_ATTEMPTS = 30


@dataclass(frozen=True)
class ReplicaSettings:
    election: ElectionSettings
    #: This replica's config stream as the other replicas reach it (https://POD_IP:PORT).
    advertise_url: str
    #: The name the leader's certificate must carry (None: the host of its URL).
    peer_server_name: str | None = None
    #: CA that signed the replicas' serving certificate (None: `peer_ca`, else the system's).
    peer_ca_file: Path | None = None


class Replica:
    """Wires leader election and the fleet counts into the controller and the stream server."""

    def __init__(
        self,
        settings: ReplicaSettings,
        kube: KubeClient,
        controller: Controller,
        stream: StreamServer,
        hub: ConfigHub,
        *,
        peer_ca: Callable[[], bytes] | None = None,
        leases: LeaseClient | None = None,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        leases = leases or KubeLeases(kube)
        election = dataclasses.replace(
            settings.election,
            annotations={
                **settings.election.annotations,
                STREAM_URL_ANNOTATION: settings.advertise_url,
            },
        )
        self.identity = election.identity
        self._settings = settings
        self._controller = controller
        self._stream = stream
        self._peer_ca = peer_ca
        self.elector = LeaderElector(
            leases,
            election,
            clock,
            on_started=self._started,
            on_stopped=self._stopped,
            on_new_leader=self._new_leader,
        )
        self.fleet = FleetCounts(
            leases,
            hub,
            FleetSettings(
                group=election.name,
                namespace=election.namespace,
                identity=election.identity,
                ttl=int(election.lease_duration),
            ),
            clock,
            is_leader=self.elector.is_leader,
            on_change=controller.sidecars_changed,
        )
        self._taken_over = False
        self._takeover: asyncio.Task[None] | None = None
        self._previous_leader: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._drops: set[asyncio.Task[int]] = set()

        controller.leading = self.elector.is_leader
        controller.keeps_budgets = self.keeps_budgets
        controller.sidecar_counts = self.fleet.counts
        stream.keeps_budgets = self.keeps_budgets
        stream.relays = SpendRelays(self.leader_peer, self.identity)
        kube.instance = self.identity
        counted = hub.on_change

        def sidecars_changed(namespace: str) -> None:
            self.fleet.mark(namespace)
            if counted is not None:
                counted(namespace)

        hub.on_change = sidecars_changed
        if registry is not None:
            Gauge(
                "modelplane_operator_leader",
                "1 while this operator replica holds the leader lease (writes status, keeps "
                "the budget books), else 0.",
                registry=registry,
            ).set_function(lambda: 1.0 if self.elector.is_leader() else 0.0)

    def keeps_budgets(self) -> bool:
        return self._taken_over and self.elector.is_leader()

    def leader_peer(self) -> Peer | None:
        """The leader's config stream, when another replica leads."""
        leader = self.elector.leader()
        url = self.elector.leader_annotations().get(STREAM_URL_ANNOTATION)
        if leader is None or leader == self.identity or not url:
            return None
        return Peer(url, self._peer_ssl(), self._settings.peer_server_name)

    def _peer_ssl(self) -> ssl.SSLContext:
        if self._settings.peer_ca_file is not None:
            return ssl.create_default_context(cafile=str(self._settings.peer_ca_file))
        if self._peer_ca is not None:
            return ssl.create_default_context(cadata=self._peer_ca().decode("ascii"))
        return ssl.create_default_context()

    # --- transitions -----------------------------------------------------------------------

    async def _started(self) -> None:
        self._takeover = asyncio.get_running_loop().create_task(self._take_over())

    async def _take_over(self) -> None:
        for attempt in range(TAKEOVER_ATTEMPTS):
            if not self.elector.is_leader():
                return
            try:
                await self._controller.take_over()
            except (KubeError, OSError, TimeoutError) as exc:
                log.warning("reading the budget books as the new leader failed: %s", exc)
                await asyncio.sleep(min(5.0, 0.5 * 2**attempt))
                continue
            if not self.elector.is_leader():
                return
            self._taken_over = True
            log.info("keeping the budget books and writing status as the leader")
            self._drop_spend_streams("the operator leader changed")
            return
        log.error("could not read the budget books as the leader; leaving the lease to another")
        await self.elector.release()
        await self._stopped()

    async def _stopped(self) -> None:
        self._taken_over = False
        task, self._takeover = self._takeover, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._controller.stand_down()
        self._drop_spend_streams("this operator replica stopped leading")

    async def _new_leader(self, leader: str | None) -> None:
        previous, self._previous_leader = self._previous_leader, leader
        if previous is not None and leader is not None and self.identity not in (leader, previous):
            # Relays to the old leader must not outlive its term.
            self._drop_spend_streams(f"the operator leader is {leader} now")

    def _drop_spend_streams(self, reason: str) -> None:
        # In the background: closing waits for each sidecar's answer, the election must not.
        task = asyncio.get_running_loop().create_task(self._stream.drop_spend_streams(reason))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self.elector.run(), name="modelplane-election"),
            loop.create_task(self.fleet.run(), name="modelplane-fleet"),
        ]

    async def stop(self) -> None:
        """A clean shutdown: stop writing, hand the lease over, and withdraw our counts."""
        tasks = [*self._tasks, *([self._takeover] if self._takeover else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._drops, return_exceptions=True)
        self._taken_over = False
        await self.elector.release()
        await self.fleet.withdraw()
