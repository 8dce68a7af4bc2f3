"""Step 3 of the routing pipeline: filters remove candidates that must not or cannot serve.

Each filter is a small object with a name and one question per candidate: "why not this one?"
(None means keep), plus one per route and config: "could you ever remove one of these?" (a
route's filters are chosen once per config, so e.g. a route without limits never pays for the
rate-limit filter). They run in order, each over what the previous ones kept. When a filter removes
the last candidate, the request ends with that filter's own error: compliance fails closed with a
403 naming the rule, a prompt too big for every window is a 400, and so on. The forwarder only
ever tries the candidates that survive, on every retry and fallback, so a request can never reach
an endpoint a filter removed.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..breaker import BreakerState
from ..config import BudgetMode, BudgetState, ModelAlias, RouterConfig, SpendBudget, Tier
from ..errors import ApiError
from ..providers.base import Operation
from ..runtime import EndpointRuntime
from .classify import Classification
from .rules import Route


@dataclass(slots=True, frozen=True)
class Candidate:
    """One endpoint a route may use (shared by every request of a config: never mutated)."""

    endpoint: EndpointRuntime
    weight: int = 1
    tier: Tier | None = None
    arm: str = ""

    @property
    def name(self) -> str:
        return self.endpoint.config.name


@dataclass(slots=True, frozen=True)
class Removal:
    endpoint: str
    step: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"endpoint": self.endpoint, "step": self.step, "reason": self.reason}


@dataclass(slots=True)
class RouteContext:
    """Everything the filters and pickers may look at for one request."""

    op: Operation
    model: str
    stream: bool
    headers: Mapping[str, str]
    body: Mapping[str, Any]
    found: Classification
    alias: ModelAlias
    route: Route
    budget: BudgetState
    rng: random.Random
    #: The operator's budgets with their mode (scope per endpoint): see `WithinBudget`.
    budgets: tuple[SpendBudget, ...] = ()
    #: A batch-lane request: an endpoint that is momentarily full is kept, the batch lane waits
    #: for its room (lanes.py) instead of the request spilling to a pricier endpoint.
    batch: bool = False


class CandidateFilter(Protocol):
    name: str

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        """False when this filter can never remove any of `endpoints` under `config`."""
        ...

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        """Why `candidate` may not serve this request, or None to keep it."""
        ...

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        """The error when this filter removed the last candidate."""
        ...


def _removed_list(removed: list[Removal]) -> str:
    return "; ".join(f"{r.endpoint}: {r.reason}" for r in removed)


def refusal(ctx: RouteContext, status: int, code: str, message: str, **kwargs: Any) -> ApiError:
    """An error answered before any upstream call; it names the rule in a header too."""
    headers = {"x-modelplane-rule": ctx.route.name, **kwargs.pop("headers", {})}
    return ApiError(status, message, code=code, headers=headers, **kwargs)


class _UnavailableRefusal:
    """Default refusal: nothing left to try right now (503, the app may retry later)."""

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        return True

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        return refusal(
            ctx,
            503,
            "no_endpoint_available",
            f"No endpoint of model {ctx.model!r} could be tried under rule {ctx.route.name!r}: "
            f"{_removed_list(removed)}",
            type="upstream_error",
        )


class OperationSupported(_UnavailableRefusal):
    name = "operation"

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        return not all(e.adapter.supports(op) for e in endpoints for op in Operation)

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        endpoint = candidate.endpoint
        if endpoint.adapter.supports(ctx.op):
            return None
        return f"provider {endpoint.config.provider} has no {ctx.op} API"

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        return refusal(
            ctx,
            400,
            "unsupported_operation",
            f"Model {ctx.model!r} (rule {ctx.route.name!r}) cannot serve {ctx.op} requests: "
            f"{_removed_list(removed)}",
        )


class Compliance:
    """A request of a restricted data class only goes to endpoints with an allowed tag."""

    name = "compliance"

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        # Only classes with allowed tags restrict (see Sensitivity.allows).
        return any(c.allowed_tags for c in config.sensitivity.classes)

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        tags = candidate.endpoint.config.tags
        blocked = ctx.found.sensitivity.allows(tags)
        if blocked is None:
            return None
        has = ", ".join(tags) if tags else "no tags"
        return (
            f"data class {blocked.name!r} needs a tag in [{', '.join(blocked.allowed_tags)}]; "
            f"endpoint has [{has}]"
        )

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        sensitivity = ctx.found.sensitivity
        classes = ", ".join(
            f"{c.name!r} (allowed on: {', '.join(c.allowed_tags)})" for c in sensitivity.restricted
        )
        why = []
        if sensitivity.labels:
            why.append("detected: " + ", ".join(d.value for d in sensitivity.labels))
        if sensitivity.declared:
            why.append(f"declared: {sensitivity.declared}")
        because = f" ({'; '.join(why)})" if why else ""
        return refusal(
            ctx,
            403,
            "no_compliant_endpoint",
            f"Rule {ctx.route.name!r} has no endpoint allowed to receive this request's data: "
            f"class {classes}{because}. Not sent anywhere. Endpoints refused: "
            f"{_removed_list(removed)}",
        )


class WithinBudget:
    """Endpoints in the scope of a budget whose blocking threshold is spent are not tried.

    Endpoints outside its scope still serve, so a route can fall back to them; when none is
    left the app gets a 429 naming the budget. (Spend leases refuse calls whose worst case no
    longer fits even before the mode arrives: see spend.py.)
    """

    name = "budget"

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        return any(
            budget.mode is BudgetMode.STOP and budget.covers(e.name)
            for budget in config.budgets
            for e in endpoints
        )

    def _blocking(self, endpoint: str, ctx: RouteContext) -> SpendBudget | None:
        for budget in ctx.budgets:
            if budget.mode is BudgetMode.STOP and budget.covers(endpoint):
                return budget
        return None

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        budget = self._blocking(candidate.name, ctx)
        if budget is None:
            return None
        return f"budget {budget.name!r} is exhausted for this period"

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        names = [b.name for b in ctx.budgets if b.mode is BudgetMode.STOP]
        blocking = next(
            (b for r in removed if (b := self._blocking(r.endpoint, ctx)) is not None), None
        )
        name = blocking.name if blocking is not None else (names[0] if names else "")
        return refusal(
            ctx,
            429,
            "budget_exhausted",
            f"Budget {name!r} is exhausted for this period: requests it covers are refused "
            f"until the period rolls over or its limit is raised (rule {ctx.route.name!r}; "
            f"{_removed_list(removed)})",
            type="insufficient_quota",
            headers={"x-modelplane-budget": name},
        )


class CircuitClosed(_UnavailableRefusal):
    """Skip endpoints whose breaker is open (a half-open probe is left to the forwarder)."""

    name = "circuit-breaker"

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        breaker = candidate.endpoint.state.breaker
        if breaker.state is not BreakerState.OPEN:
            return None
        wait = breaker.retry_in(ctx.alias.circuit_breaker)
        if wait <= 0:
            return None
        return f"circuit breaker open (probe in {wait:.1f}s)"


class ReplicasReady(_UnavailableRefusal):
    """Skip self-hosted endpoints none of whose replicas is ready (e.g. all pods unready)."""

    name = "replicas"

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        return any(e.pool is not None for e in endpoints)

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        pool = candidate.endpoint.pool
        if pool is None or pool.ready():
            return None
        return f"no ready replica (0 of {len(pool.replicas)} ready)"


class ContextWindow:
    name = "context-window"

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        return any(e.config.context_window is not None for e in endpoints)

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        window = candidate.endpoint.config.context_window
        needed = ctx.found.size.context_tokens
        if window is None or needed <= window:
            return None
        return f"needs about {needed} tokens, context window is {window}"

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        return refusal(
            ctx,
            400,
            "context_length_exceeded",
            f"This request needs about {ctx.found.size.context_tokens} tokens (prompt plus "
            f"max_tokens), more than any endpoint of rule {ctx.route.name!r} can take: "
            f"{_removed_list(removed)}",
        )


class WithinLimits:
    """The endpoint's configured concurrency, requests-per-minute and tokens-per-minute.

    A batch request keeps an endpoint that is only full (`maxConcurrency` reached): the batch
    lane's admission waits for room there, bounded by the lane's queue (lanes.py).
    """

    name = "rate-limit"

    def needed(self, endpoints: Sequence[EndpointRuntime], config: RouterConfig) -> bool:
        return any(
            limits.max_concurrency is not None
            or limits.requests_per_minute is not None
            or limits.tokens_per_minute is not None
            for limits in (e.config.limits for e in endpoints)
        )

    def reason(self, candidate: Candidate, ctx: RouteContext) -> str | None:
        endpoint = candidate.endpoint
        limits = endpoint.config.limits
        state = endpoint.state
        limit = limits.max_concurrency
        if limit is not None and state.in_flight >= limit and not ctx.batch:
            return f"{state.in_flight} requests in flight, limit {limit}"
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return None
        requests, tokens = state.stats.rate()
        if limits.requests_per_minute is not None and requests >= limits.requests_per_minute:
            return f"{requests:.0f} requests in the last minute, limit {limits.requests_per_minute}"
        wanted = ctx.found.size.input_tokens
        if limits.tokens_per_minute is not None and tokens + wanted > limits.tokens_per_minute:
            return (
                f"{tokens:.0f} + {wanted} tokens in the last minute, "
                f"limit {limits.tokens_per_minute}"
            )
        return None

    def refuse(self, removed: list[Removal], ctx: RouteContext) -> ApiError:
        return refusal(
            ctx,
            429,
            "rate_limit_exceeded",
            f"Every endpoint of rule {ctx.route.name!r} is at its configured limit: "
            f"{_removed_list(removed)}",
            type="requests",
            headers={"retry-after": "1"},
        )


#: The filters, in the order they run. Compliance comes before anything about health, so a
#: sensitive request's error says "no compliant endpoint", not "endpoint down".
FILTERS: tuple[CandidateFilter, ...] = (
    OperationSupported(),
    Compliance(),
    WithinBudget(),
    CircuitClosed(),
    ReplicasReady(),
    ContextWindow(),
    WithinLimits(),
)


def filters_for(
    endpoints: Sequence[EndpointRuntime], config: RouterConfig
) -> tuple[CandidateFilter, ...]:
    """The filters, in order, that could remove one of a route's `endpoints` under `config`."""
    return tuple(f for f in FILTERS if f.needed(endpoints, config))


def apply_filters(
    candidates: list[Candidate],
    ctx: RouteContext,
    removed: list[Removal],
    filters: tuple[CandidateFilter, ...] = FILTERS,
) -> list[Candidate]:
    """Run every filter; raises the filter's refusal when one leaves nothing."""
    for step in filters:
        kept: list[Candidate] = []
        for candidate in candidates:
            why = step.reason(candidate, ctx)
            if why is None:
                kept.append(candidate)
            else:
                removed.append(Removal(candidate.name, step.name, why))
        if not kept:
            raise step.refuse(removed, ctx)
        candidates = kept
    return candidates
