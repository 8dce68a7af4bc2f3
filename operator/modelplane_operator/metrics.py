"""Prometheus metrics of the operator, on one registry shared by all of its HTTP servers.

Events are counted where they happen (stream connections, ACK/NACK answers with the time from
push to answer, reconciles); how many sidecars each namespace has and which config version they
run is read from the config hub when Prometheus scrapes, so it is never stale. Labels are bounded:
namespaces that have Modelplane resources or sidecars, and fixed sets of results. Config
versions appear only in `modelplane_operator_config_info`, one series per namespace.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from .distribution.hub import ConfigHub

_PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._hub_state: _HubState | None = None
        self.connections = Counter(
            "modelplane_operator_stream_connections",
            "Sidecar connections to the config stream, by result (accepted, unauthenticated, "
            "auth_unavailable when the TokenReview API could not be asked; relay: a follower's "
            "multiplexed spend connection, whose streams count as unauthenticated or "
            "auth_unavailable when refused).",
            ["result"],
            registry=r,
        )
        self.answers = Counter(
            "modelplane_operator_config_answers",
            "Sidecars' answers to pushed configs, by namespace and answer (ack, nack).",
            ["namespace", "answer"],
            registry=r,
        )
        self.push_duration = Histogram(
            "modelplane_operator_config_push_duration_seconds",
            "From sending a config to a sidecar to its ACK or NACK.",
            ["answer"],
            buckets=_PUSH_BUCKETS,
            registry=r,
        )
        self.reconciles = Counter(
            "modelplane_operator_reconciles",
            "Namespace reconciles by result (ok; error: reading Secrets failed, retried).",
            ["result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "modelplane_operator_reconcile_duration_seconds",
            "Time to reconcile one namespace: read Secrets, compile, publish, write statuses.",
            buckets=_RECONCILE_BUCKETS,
            registry=r,
        )
        self.status_errors = Counter(
            "modelplane_operator_status_write_errors",
            "Failed writes of a resource's status, by kind.",
            ["kind"],
            registry=r,
        )

    def watch(self, hub: ConfigHub) -> None:
        """Report the hub's sidecars and versions at scrape time."""
        if self._hub_state is None:
            self._hub_state = _HubState(hub)
            self.registry.register(self._hub_state)
        else:
            self._hub_state.hub = hub


class _HubState:
    def __init__(self, hub: ConfigHub) -> None:
        self.hub = hub

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "modelplane_operator_connected_sidecars",
                "Sidecars connected to the config stream, by namespace.",
                labels=["namespace"],
            ),
            GaugeMetricFamily(
                "modelplane_operator_sidecars",
                "Connected sidecars by namespace and state: current (ACKed the namespace's "
                "version), stale (runs an older one, push in flight or pending), rejected "
                "(NACKed it).",
                labels=["namespace", "state"],
            ),
            GaugeMetricFamily(
                "modelplane_operator_config_info",
                "The config version the operator serves each namespace (value is always 1).",
                labels=["namespace", "version"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        connected, states, info = families = self._families()
        for namespace in self.hub.namespaces():
            counts = self.hub.counts(namespace)
            connected.add_metric([namespace], counts.connected)
            states.add_metric([namespace, "current"], counts.current)
            states.add_metric([namespace, "stale"], counts.stale)
            states.add_metric([namespace, "rejected"], counts.rejected)
            version = self.hub.version(namespace)
            if version is not None:
                info.add_metric([namespace, version], 1)
        return families
