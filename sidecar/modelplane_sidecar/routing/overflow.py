"""Step 4b of the routing pipeline: overflow from self-hosted endpoints to others (e.g. cloud).

A route with `overflow` serves from its own targets (the self-hosted pool) while they have
capacity. When every one of them is saturated (even its least-loaded ready replica has more
requests queued than `maxQueueDepth`, or a predicted wait above `maxPredictedWaitSeconds`), a
request may spill to the overflow targets, with the pool kept as its fallback. A request in a
never-spill data class (by default every class with `allowedTags`, i.e. sensitive data) never
spills: it is held until the pool has capacity again, for at most `sensitiveWaitSeconds`, and
then refused with a 503 that names the rule. The hold is awaited by the forwarder (the decision
itself never waits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..config import Overflow
from ..errors import ApiError
from ..pool import Saturation
from ..runtime import EndpointRuntime, Snapshot
from .filters import Candidate, Removal, RouteContext, apply_filters

#: How often a held request looks at the pool again.
HOLD_POLL_SECONDS = 0.05


def saturation(
    candidates: list[Candidate] | list[EndpointRuntime], overflow: Overflow
) -> list[Saturation] | None:
    """Each pool's saturation when every candidate is saturated; None when any has capacity
    (or is not a self-hosted pool, whose capacity is unknown)."""
    found: list[Saturation] = []
    for item in candidates:
        endpoint = item.endpoint if isinstance(item, Candidate) else item
        pool = endpoint.pool
        if pool is None:
            return None
        sat = pool.saturation(endpoint.state.stats.latency_seconds)
        if sat is None:
            continue  # no ready replica: no capacity here either
        deep = overflow.max_queue_depth is not None and sat.queue_depth > overflow.max_queue_depth
        wait = overflow.max_predicted_wait_seconds
        slow = wait is not None and sat.predicted_wait is not None and sat.predicted_wait > wait
        if not (deep or slow):
            return None
        found.append(sat)
    return found


def never_spilling_classes(ctx: RouteContext, overflow: Overflow) -> list[str]:
    """The request's data classes that must stay on the route's own endpoints."""
    sensitivity = ctx.found.sensitivity
    if overflow.never_spill is not None:
        blocked = set(overflow.never_spill)
    else:
        blocked = {c.name for c in sensitivity.restricted}
    return sorted(c for c in sensitivity.classes if c in blocked)


def _describe(sats: list[Saturation]) -> str:
    return "; ".join(s.describe() for s in sats) or "no ready replica"


@dataclass(slots=True)
class CapacityHold:
    """A never-spill request waiting for the pool to have capacity (awaited by the forwarder)."""

    rule: str
    overflow: Overflow
    endpoints: list[EndpointRuntime]
    classes: list[str]

    async def wait(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> float:
        """Seconds waited; raises the 503 when the pool stays saturated past the limit."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.overflow.sensitive_wait_seconds
        while True:
            sats = saturation(self.endpoints, self.overflow)
            if sats is None:
                return loop.time() - started
            if loop.time() >= deadline:
                raise self.refusal(sats)
            await sleep(min(HOLD_POLL_SECONDS, max(0.0, deadline - loop.time())))

    def refusal(self, sats: list[Saturation]) -> ApiError:
        classes = ", ".join(repr(c) for c in self.classes)
        waited = self.overflow.sensitive_wait_seconds
        return ApiError(
            503,
            f"Rule {self.rule!r} keeps requests of data class {classes} on its self-hosted "
            f"endpoints (overflow never spills them), and they stayed saturated for {waited:g}s: "
            f"{_describe(sats)}. Not sent anywhere; retry later.",
            type="server_error",
            code="self_hosted_saturated",
            headers={"x-modelplane-rule": self.rule, "retry-after": "1"},
        )


def _overflow_candidates(overflow: Overflow, snapshot: Snapshot) -> list[Candidate]:
    return [
        Candidate(snapshot.endpoints[t.endpoint], t.weight, t.tier, t.arm_label())
        for t in overflow.targets
    ]


def apply_overflow(
    primary: list[Candidate],
    ctx: RouteContext,
    snapshot: Snapshot,
    removed: list[Removal],
    unavailable: ApiError | None = None,
) -> tuple[list[Candidate], CapacityHold | None, str]:
    """(candidates, hold, why) once the primary candidates are filtered and ordered.

    `unavailable` is the filters' refusal when no primary candidate was left (all replicas
    unready, breakers open): non-sensitive requests then spill too, sensitive ones get it.
    """
    overflow = ctx.route.overflow
    assert overflow is not None
    sats = saturation(primary, overflow) if primary else []
    if sats is None:
        return primary, None, ""
    state = _describe(sats) if primary else "no self-hosted endpoint available"
    classes = never_spilling_classes(ctx, overflow)
    spill = _overflow_candidates(overflow, snapshot)
    if classes:
        why = f"data class {', '.join(classes)} never spills (rule {ctx.route.name!r})"
        removed.extend(Removal(c.name, "overflow", why) for c in spill)
        if unavailable is not None:
            raise unavailable
        hold = CapacityHold(ctx.route.name, overflow, [c.endpoint for c in primary], classes)
        return primary, hold, f"saturated ({state}); held: {why}"
    try:
        spill = apply_filters(spill, ctx, removed)
    except ApiError:
        if unavailable is not None:
            raise unavailable from None
        return primary, None, f"saturated ({state}); no overflow target may serve it"
    names = ", ".join(c.name for c in spill)
    return [*spill, *primary], None, f"saturated ({state}); spilled to {names}"
