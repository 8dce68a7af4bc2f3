"""Prometheus metrics of one sidecar, on a registry of its own (no global state).

Labels are bounded: model aliases, endpoints, providers, rules, strategies, detectors, data classes
and outcomes come from the config or from fixed sets in the code, never from request content or
user identities (a requested model the config does not know is recorded as `model=""`).

The request path stays cheap: the families every request updates are tallies (`tally.py`: plain
number adds, turned into Prometheus samples at scrape time), and the series of one endpoint are
bound once and kept in an `EndpointSeries`, so accounting a request is a few dict lookups and
additions instead of a label resolution and a lock per metric. State that changes without any
request (circuit breakers moving to half-open, in-flight counts) is read from the serving snapshot
when Prometheus scrapes, so it is never stale and costs the request path nothing.
docs/observability.md lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from .breaker import BreakerState
from .tally import CounterSeries, HistogramSeries, TallyCollector

if TYPE_CHECKING:
    from .providers.base import Usage
    from .runtime import Snapshot

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Outcome(StrEnum):
    """How a request ended (the `outcome` label and the audit record's `outcome`)."""

    OK = "ok"
    #: The upstream answered 4xx because of the request itself; the app got that answer.
    CLIENT_ERROR = "client_error"
    #: Every candidate failed or was skipped; the app got a 502/503 listing the attempts.
    EXHAUSTED = "exhausted"
    #: A stream broke after its first byte; the app's stream ended with an error event.
    STREAM_ERROR = "stream_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    #: The router refused before calling anything (bad request, unknown model, compliance,
    #: context window, budget): the app got a 4xx/5xx from the router itself.
    REFUSED = "refused"
    #: Answered from the response cache; nothing was sent upstream.
    CACHE_HIT = "cache_hit"
    #: Every endpoint failed (or none could be tried); the app got the last cached answer.
    CACHE_STALE = "cache_stale"
    #: Answered by an identical request's upstream call that was in flight; nothing was sent
    #: upstream for this one (request coalescing).
    COALESCED = "coalesced"


class SyncState(StrEnum):
    """Whether the serving config is current (`modelplane_config_sync_state{state}`)."""

    #: Standalone: the config is a file (`modelplane serve --config`).
    STANDALONE = "standalone"
    #: No stream to the operator right now (serving last-known-good, or nothing yet).
    CONNECTING = "connecting"
    #: Stream up and the last config the operator pushed was applied (ACK).
    SYNCED = "synced"
    #: Stream up but the last config pushed was refused (NACK); an older one keeps serving.
    REJECTED = "rejected"


class EndpointSeries:
    """The label children of one endpoint, bound once (labels come from the config)."""

    __slots__ = (
        "_latency",
        "_metrics",
        "_requests",
        "_ttft",
        "attempt_ok",
        "cost",
        "endpoint",
        "input_tokens",
        "output_tokens",
        "provider",
    )

    def __init__(self, metrics: SidecarMetrics, endpoint: str, provider: str) -> None:
        self._metrics = metrics
        self.endpoint = endpoint
        self.provider = provider
        self.attempt_ok = metrics.attempts.labels(endpoint, provider, "ok")
        self.input_tokens = metrics.tokens.labels(endpoint, provider, "input")
        self.output_tokens = metrics.tokens.labels(endpoint, provider, "output")
        self.cost = metrics.cost.labels(endpoint, provider)
        self._requests: dict[tuple[str, str, str], CounterSeries] = {}
        self._latency: dict[str, HistogramSeries] = {}
        self._ttft: dict[str, HistogramSeries] = {}

    def requests(self, model: str, rule: str, outcome: str) -> CounterSeries:
        key = (model, rule, outcome)
        child = self._requests.get(key)
        if child is None:
            child = self._metrics.requests.labels(
                model, self.endpoint, self.provider, rule, outcome
            )
            self._requests[key] = child
        return child

    def latency(self, model: str) -> HistogramSeries:
        child = self._latency.get(model)
        if child is None:
            child = self._metrics.latency.labels(model, self.endpoint, self.provider)
            self._latency[model] = child
        return child

    def ttft(self, model: str) -> HistogramSeries:
        child = self._ttft.get(model)
        if child is None:
            child = self._metrics.ttft.labels(model, self.endpoint, self.provider)
            self._ttft[model] = child
        return child


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._endpoints: dict[tuple[str, str], EndpointSeries] = {}
        self._decided: dict[tuple[str, str, str, str], CounterSeries] = {}
        self._live: _LiveState | None = None
        tally = TallyCollector()
        self.requests = tally.counter(
            "modelplane_requests",
            "Requests answered by the sidecar, by model alias, serving endpoint and its provider, "
            "rule and outcome (endpoint is empty when no endpoint answered).",
            ["model", "endpoint", "provider", "rule", "outcome"],
        )
        self.attempts = tally.counter(
            "modelplane_upstream_attempts",
            "Attempts sent to upstream endpoints, by result (ok or the failure kind).",
            ["endpoint", "provider", "result"],
        )
        self.fallbacks = Counter(
            "modelplane_fallbacks",
            "Times a request moved on to the next endpoint of its chain.",
            ["model", "from_endpoint"],
            registry=r,
        )
        self.retries = Counter(
            "modelplane_retries",
            "Retries of the same endpoint after a retriable failure.",
            ["endpoint"],
            registry=r,
        )
        self.stream_failures = Counter(
            "modelplane_stream_failures",
            "Streams that failed after the first byte reached the app (ended with an error event).",
            ["endpoint", "reason"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "modelplane_client_disconnects",
            "Requests whose app went away before the response was complete.",
            ["model"],
            registry=r,
        )
        self.tokens = tally.counter(
            "modelplane_tokens",
            "Tokens processed, by endpoint and direction (input/output).",
            ["endpoint", "provider", "direction"],
        )
        self.cost = tally.counter(
            "modelplane_cost_usd",
            "Spend in US dollars computed from usage and endpoint prices.",
            ["endpoint", "provider"],
        )
        self.latency = tally.histogram(
            "modelplane_request_duration_seconds",
            "Time from request received to response complete.",
            ["model", "endpoint", "provider"],
            buckets=_LATENCY_BUCKETS,
        )
        self.ttft = tally.histogram(
            "modelplane_time_to_first_token_seconds",
            "For streams: time from request received to the first byte sent to the app.",
            ["model", "endpoint", "provider"],
            buckets=_LATENCY_BUCKETS,
        )
        self.decision = tally.histogram(
            "modelplane_decision_duration_seconds",
            "Time spent deciding where a request goes (before any upstream call).",
            buckets=_DECISION_BUCKETS,
        )
        self.overflow = Counter(
            "modelplane_overflow_decisions",
            "Requests of routes with overflow while their self-hosted targets were saturated: "
            "spilled to an overflow target, held (never-spill class), or refused after the hold.",
            ["model", "rule", "outcome"],
            registry=r,
        )
        self.decisions = tally.counter(
            "modelplane_route_decisions",
            "Routing decisions by rule, strategy and A/B arm (the arm of the first candidate).",
            ["model", "rule", "strategy", "arm"],
        )
        self.refusals = Counter(
            "modelplane_route_refusals",
            "Requests refused by the routing pipeline before any upstream call, by rule and "
            "error code (e.g. no_compliant_endpoint, context_length_exceeded).",
            ["rule", "code"],
            registry=r,
        )
        self.classifier_hits = Counter(
            "modelplane_classifier_hits",
            "Classifier findings by classifier and label: sensitivity detectors (email, "
            "payment-card, ...) and data classes declared in the request header.",
            ["classifier", "label"],
            registry=r,
        )
        self.complexity = Histogram(
            "modelplane_complexity_score",
            "Complexity scores (0..1) of the requests whose route needed the classifier.",
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "modelplane_cache_hits",
            "Requests answered from the response cache, by model alias.",
            ["model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "modelplane_cache_misses",
            "Cacheable requests the response cache could not answer, by model alias.",
            ["model"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "modelplane_budget_remaining_usd",
            "Spend left in the current period of each budget that applies to this sidecar.",
            ["budget"],
            registry=r,
        )
        self.budget_spend = Counter(
            "modelplane_budget_spend_usd",
            "Spend settled against each budget, by endpoint (a call whose cost is unknown, e.g. "
            "a timeout, is charged its worst case).",
            ["budget", "endpoint"],
            registry=r,
        )
        self.budget_tokens = Counter(
            "modelplane_budget_tokens",
            "Tokens of the calls settled against each budget, by endpoint and direction.",
            ["budget", "endpoint", "direction"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "modelplane_budget_refusals",
            "Calls not sent because no spend lease of the budget could cover their worst case.",
            ["budget"],
            registry=r,
        )
        self.budget_overrun = Counter(
            "modelplane_budget_overrun_usd",
            "Actual cost above the reserved worst case (the overspend bound's only term).",
            ["budget"],
            registry=r,
        )
        self.budget_lease = Gauge(
            "modelplane_budget_lease_available_usd",
            "Spend lease this sidecar holds for each budget and has not reserved.",
            ["budget"],
            registry=r,
        )
        self.config_info = Gauge(
            "modelplane_config_info",
            "The config version being served (value is always 1).",
            ["version", "source"],
            registry=r,
        )
        self.config_applied = Gauge(
            "modelplane_config_last_applied_timestamp_seconds",
            "Unix time at which the serving config was applied.",
            registry=r,
        )
        self.config_reloads = Counter(
            "modelplane_config_reloads",
            "Config load attempts by result (applied, rejected, unchanged).",
            ["result"],
            registry=r,
        )
        self.sync_state = Gauge(
            "modelplane_config_sync_state",
            "1 for the state the sidecar's config is in (standalone, connecting, synced, "
            "rejected), 0 for the others.",
            ["state"],
            registry=r,
        )
        self.audit_records = Counter(
            "modelplane_audit_records",
            "Request records written to the audit chain.",
            registry=r,
        )
        self.audit_write_errors = Counter(
            "modelplane_audit_write_errors",
            "Failed writes of the audit log (the lines are kept and written again).",
            registry=r,
        )
        r.register(tally)

    def decided(self, model: str, rule: str, strategy: str, arm: str) -> CounterSeries:
        """The `modelplane_route_decisions` child of these labels, bound on first use."""
        key = (model, rule, strategy, arm)
        child = self._decided.get(key)
        if child is None:
            child = self._decided[key] = self.decisions.labels(model, rule, strategy, arm)
        return child

    def endpoint(self, name: str, provider: str) -> EndpointSeries:
        """The bound series of one endpoint (created on first use, then reused)."""
        series = self._endpoints.get((name, provider))
        if series is None:
            series = self._endpoints[(name, provider)] = EndpointSeries(self, name, provider)
        return series

    def budget_settled(
        self, budget: str, endpoint: str, charged: float, overrun: float, usage: Usage | None
    ) -> None:
        """A call settled against `budget` (SpendTracker's on_settle)."""
        self.budget_spend.labels(budget, endpoint).inc(charged)
        if overrun > 0:
            self.budget_overrun.labels(budget).inc(overrun)
        if usage is not None:
            tokens = self.budget_tokens
            tokens.labels(budget, endpoint, "input").inc(usage.input_tokens)
            tokens.labels(budget, endpoint, "output").inc(usage.output_tokens)

    def set_sync_state(self, state: SyncState) -> None:
        for each in SyncState:
            self.sync_state.labels(each.value).set(1 if each is state else 0)

    def config_applied_now(self, version: str, source: str) -> None:
        self.config_info.clear()
        self.config_info.labels(version, source).set(1)
        self.config_applied.set(time.time())

    def watch(self, current: Callable[[], Snapshot | None]) -> None:
        """Report breaker states and in-flight counts of `current()`'s endpoints at scrape."""
        if self._live is None:
            self._live = _LiveState(current)
            self.registry.register(self._live)
        else:
            self._live.current = current


class _LiveState:
    """A scrape-time collector over the serving snapshot's endpoints."""

    def __init__(self, current: Callable[[], Snapshot | None]) -> None:
        self.current = current

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "modelplane_circuit_breaker_open",
                "1 when the endpoint's circuit breaker is open or half-open, else 0.",
                labels=["endpoint", "provider"],
            ),
            GaugeMetricFamily(
                "modelplane_circuit_breaker_state",
                "1 for the endpoint's circuit breaker state (closed, open, half-open), 0 for "
                "the others.",
                labels=["endpoint", "provider", "state"],
            ),
            GaugeMetricFamily(
                "modelplane_endpoint_in_flight_requests",
                "Upstream calls to the endpoint that have not finished yet.",
                labels=["endpoint", "provider"],
            ),
            GaugeMetricFamily(
                "modelplane_endpoint_replicas",
                "Replicas of a self-hosted endpoint, ready or not (from its EndpointSlices).",
                labels=["endpoint", "state"],
            ),
            GaugeMetricFamily(
                "modelplane_endpoint_queue_depth",
                "Requests queued on the least-loaded ready replica of a self-hosted endpoint (the "
                "engine's own count when its metrics are fresh, else this sidecar's in flight).",
                labels=["endpoint"],
            ),
            GaugeMetricFamily(
                "modelplane_endpoint_info",
                "The endpoints of the serving config with their provider, upstream model and "
                "region (value is always 1).",
                labels=["endpoint", "provider", "upstream_model", "region"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        open_, state, in_flight, replicas, queue, info = families = self._families()
        snapshot = self.current()
        if snapshot is None:
            return families
        for name, endpoint in snapshot.endpoints.items():
            provider = endpoint.config.provider.value
            current = endpoint.state.breaker.state
            open_.add_metric([name, provider], 0 if current is BreakerState.CLOSED else 1)
            for each in BreakerState:
                state.add_metric([name, provider, each.value], 1 if each is current else 0)
            in_flight.add_metric([name, provider], endpoint.state.in_flight)
            region = endpoint.config.region or ""
            info.add_metric([name, provider, endpoint.config.model, region], 1)
            pool = endpoint.pool
            if pool is not None:
                ready = len(pool.ready())
                replicas.add_metric([name, "ready"], ready)
                replicas.add_metric([name, "not_ready"], len(pool.replicas) - ready)
                sat = pool.saturation(endpoint.state.stats.latency_seconds)
                if sat is not None:
                    queue.add_metric([name], sat.queue_depth)
        return families
