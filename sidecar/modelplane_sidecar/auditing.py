"""The compliance audit record of one request, and the trail it is appended to.

One record per request that reached a routing route, whatever its end: served, refused by the
router (bad request, unknown model, compliance, context window, budget), upstream client error,
every endpoint failed, stream broken, app gone. A record says who asked (namespace, pod,
ServiceAccount of this sidecar), under which policy and config version, what the classifiers
found (detector names and data classes only), which rule matched, which candidates were removed
and why, where the request went and how each attempt ended, tokens, cost and outcome.

What a record never holds: prompt or completion text, the values a detector matched, header
values, upstream error messages (they may echo the request), or a model name the config does not
know. Everything in it is a name from the config, a fixed code from the router, or a number.
`audit.py` chains and signs the records; this module decides what goes into them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .audit import AuditLog, generate_key, load_private_key, public_key_text
from .metrics import Outcome, SidecarMetrics
from .providers.base import Usage

if TYPE_CHECKING:
    from .routing import DecisionTrace
    from .runtime import EndpointRuntime, Snapshot

log = logging.getLogger("modelplane.sidecar.audit")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this sidecar serves: read once at start (Downward API env vars when injected)."""

    namespace: str | None = None
    pod: str | None = None
    service_account: str | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Identity:
        """The variables the injection webhook sets from the Pod (Downward API)."""
        return cls(
            env.get("MODELPLANE_POD_NAMESPACE") or None,
            env.get("MODELPLANE_POD_NAME") or None,
            env.get("MODELPLANE_POD_SERVICE_ACCOUNT") or None,
        )

    def as_json(self) -> dict[str, str | None]:
        return {
            "namespace": self.namespace,
            "pod": self.pod,
            "serviceAccount": self.service_account,
        }


@dataclass(frozen=True)
class AuditSettings:
    """`modelplane serve --audit-log ... --audit-key ... --audit-checkpoint-every ...`."""

    #: A file to append to, or "-" for stdout (the sidecar's logs go to stderr).
    destination: str
    #: PEM Ed25519 private key (`modelplane audit keygen`); None: a new key for this run.
    key_file: Path | None = None
    checkpoint_every: int = 100
    checkpoint_seconds: float = 60.0
    identity: Identity = field(default_factory=Identity)


@dataclass(slots=True)
class RequestEnd:
    """How one request ended, as the forwarder or the front door saw it."""

    request_id: str
    outcome: Outcome
    #: HTTP status the app got (499: the app went away before the answer).
    status: int
    api: str
    snapshot: Snapshot | None
    #: The model alias, or None when the request named none the config knows.
    model: str | None = None
    stream: bool = False
    trace: DecisionTrace | None = None
    rule: str | None = None
    endpoint: EndpointRuntime | None = None
    #: {endpoint, attempt, result, status} per upstream attempt or skipped endpoint, in order.
    attempts: list[dict[str, Any]] | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    #: The router's error code when the app got an error (never the message).
    error: str | None = None
    duration_s: float = 0.0
    decision_ms: float | None = None
    ttft_s: float | None = None
    #: Fields only some records have: `coalescedWith` (the request whose upstream call answered
    #: this one), `batchApi` (a Batch API call passed through, `frontdoors/batch_api.py`).
    extra: dict[str, Any] | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _classification(trace: DecisionTrace | None) -> dict[str, Any] | None:
    found = trace.found if trace is not None else None
    if found is None:
        return None
    sensitivity = found.sensitivity
    return {
        "labels": [detector.value for detector in sensitivity.labels],
        "classes": sorted(sensitivity.classes),
        "declared": sensitivity.declared,
    }


def record_fields(end: RequestEnd, identity: Identity) -> dict[str, Any]:
    """The audit record of one request (without the chain fields `audit.py` adds)."""
    snapshot = end.snapshot
    trace = end.trace
    route = trace.route if trace is not None else None
    endpoint = end.endpoint
    usage = end.usage
    fields: dict[str, Any] = {
        "requestId": end.request_id,
        **identity.as_json(),
        "policy": snapshot.config.metadata.name if snapshot is not None else None,
        "configVersion": snapshot.version if snapshot is not None else None,
        "api": end.api,
        "model": end.model,
        "stream": end.stream,
        "rule": route.name if route is not None else end.rule,
        "strategy": route.strategy.value if route is not None else None,
        "classification": _classification(trace),
        "removed": [r.as_json() for r in trace.removed] if trace is not None else [],
        "endpoint": endpoint.name if endpoint is not None else None,
        "provider": endpoint.config.provider.value if endpoint is not None else None,
        "region": endpoint.config.region if endpoint is not None else None,
        "upstreamModel": endpoint.config.model if endpoint is not None else None,
        "attempts": end.attempts or [],
        "tokens": (
            {
                "input": usage.input_tokens,
                "output": usage.output_tokens,
                "cachedInput": usage.cached_input_tokens,
                "estimated": usage.estimated,
            }
            if usage is not None
            else None
        ),
        "costUsd": round(end.cost_usd, 9),
        "outcome": end.outcome.value,
        "status": end.status,
        "error": end.error,
        "durationMs": _ms(end.duration_s),
        "decisionMs": None if end.decision_ms is None else round(end.decision_ms, 3),
        "ttftMs": _ms(end.ttft_s),
    }
    if end.extra:
        fields.update(end.extra)
    return fields


class AuditTrail:
    """Appends request records to a hash-chained, signed `AuditLog`."""

    def __init__(
        self, log: AuditLog, identity: Identity, metrics: SidecarMetrics | None = None
    ) -> None:
        self.log = log
        self.identity = identity
        self._metrics = metrics

    def request(self, end: RequestEnd) -> None:
        self.log.record(record_fields(end, self.identity))
        if self._metrics is not None:
            self._metrics.audit_records.inc()

    def start(self) -> None:
        self.log.start()

    async def close(self) -> None:
        await self.log.close()


def open_trail(settings: AuditSettings, metrics: SidecarMetrics) -> AuditTrail:
    """Open the audit log; the public key goes to the sidecar's log, never the private one."""
    if settings.key_file is not None:
        key = load_private_key(settings.key_file)
        source = str(settings.key_file)
    else:
        key = generate_key()
        source = "generated at start"
    audit_log = AuditLog.open(
        settings.destination,
        key,
        settings.identity.as_json(),
        checkpoint_every=settings.checkpoint_every,
        checkpoint_seconds=settings.checkpoint_seconds,
        on_write_error=lambda _: metrics.audit_write_errors.inc(),
    )
    public = public_key_text(key.public_key())
    log.info(
        "audit trail to %s, chain %s, checkpoints signed with Ed25519 public key %s (%s)",
        "stdout" if settings.destination in ("-", "stdout") else settings.destination,
        audit_log.chain.chain,
        public,
        source,
        extra={"auditPublicKey": public, "auditChain": audit_log.chain.chain},
    )
    if settings.key_file is None:
        log.warning(
            "audit key generated for this run only: verifiers can pin it from this log line; "
            "give --audit-key for a key that survives restarts"
        )
    return AuditTrail(audit_log, settings.identity, metrics)
