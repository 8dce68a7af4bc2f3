"""Prometheus metrics of one sidecar, on a registry of its own (no global state).

Labels are bounded: aliases, endpoints, rules and outcomes come from the config, never from
request content or user identities.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "modelplane_requests",
            "Requests answered by the sidecar, by model alias, serving endpoint and outcome.",
            ["model", "endpoint", "rule", "outcome"],
            registry=r,
        )
        self.attempts = Counter(
            "modelplane_upstream_attempts",
            "Attempts sent to upstream endpoints, by result (ok or the failure kind).",
            ["endpoint", "result"],
            registry=r,
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
        self.tokens = Counter(
            "modelplane_tokens",
            "Tokens processed, by endpoint and direction (input/output).",
            ["endpoint", "direction"],
            registry=r,
        )
        self.cost = Counter(
            "modelplane_cost_usd",
            "Spend in US dollars computed from usage and endpoint prices.",
            ["endpoint"],
            registry=r,
        )
        self.latency = Histogram(
            "modelplane_request_duration_seconds",
            "Time from request received to response complete.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "modelplane_time_to_first_token_seconds",
            "For streams: time from request received to the first byte sent to the app.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decision = Histogram(
            "modelplane_decision_duration_seconds",
            "Time spent deciding where a request goes (before any upstream call).",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.decisions = Counter(
            "modelplane_route_decisions",
            "Routing decisions by rule, strategy and A/B arm (the arm of the first candidate).",
            ["model", "rule", "strategy", "arm"],
            registry=r,
        )
        self.refusals = Counter(
            "modelplane_route_refusals",
            "Requests refused by the routing pipeline before any upstream call, by rule and "
            "error code (e.g. no_compliant_endpoint, context_length_exceeded).",
            ["rule", "code"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "modelplane_circuit_breaker_open",
            "1 when the endpoint's circuit breaker is open or half-open, else 0.",
            ["endpoint"],
            registry=r,
        )
        self.config_info = Gauge(
            "modelplane_config_info",
            "The config version being served (value is always 1).",
            ["version", "source"],
            registry=r,
        )
        self.config_reloads = Counter(
            "modelplane_config_reloads",
            "Config load attempts by result (applied, rejected, unchanged).",
            ["result"],
            registry=r,
        )
