"""The routing pipeline: classify -> match rule -> filter candidates -> pick -> (budget).

`decide()` runs the steps in that order and returns a RouteDecision: the endpoints to try, in
order, with the trace of every step (what the classifiers found, which rules were looked at and
why they did or did not match, which candidates were removed and by which filter, what the
strategy picked and why). Execution with retries and fallback, over exactly these candidates and
no others, lives in `forward.py`. `explain()` runs the same steps without calling anything.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy

from ..config import LaneName, ModelAlias, RouterConfig, Rule, Strategy
from ..errors import ApiError, bad_request
from ..providers.base import Operation
from ..runtime import EndpointRuntime, Snapshot
from .classify import Classification, classify
from .classify.complexity import ComplexityModel, default_model
from .filters import (
    Candidate,
    CandidateFilter,
    Removal,
    RouteContext,
    apply_filters,
    filters_for,
)
from .overflow import CapacityHold, apply_overflow
from .pickers import PICKERS, apply_budget
from .rules import Route, RuleCheck, alias_route, first_matching_rule, rule_route

_RANDOM = random.Random()


@dataclass(slots=True)
class RoutedRequest:
    """What the router knows about a request before it is sent anywhere."""

    op: Operation
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]
    model: str
    stream: bool


@dataclass(slots=True)
class DecisionTrace:
    """Why a request goes where it goes; `as_json()` is what explain returns."""

    model: str
    found: Classification | None = None
    rules: list[RuleCheck] = field(default_factory=list)
    route: Route | None = None
    considered: list[str] = field(default_factory=list)
    removed: list[Removal] = field(default_factory=list)
    pick: str = ""
    #: What the overflow step did (routes with `overflow` only).
    overflow: str = ""
    #: Self-hosted candidates' replicas as routing saw them (endpoint -> replica rows).
    replicas: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    budget: str = ""
    order: list[str] = field(default_factory=list)
    #: The request's strategy lane, once its rule is known.
    lane: LaneName | None = None
    error: ApiError | None = None
    micros: float = 0.0

    def as_json(self) -> dict[str, Any]:
        route = self.route
        return {
            "model": self.model,
            "classifiers": self.found.as_json() if self.found is not None else None,
            "rules": [check.as_json() for check in self.rules],
            "rule": route.name if route is not None else None,
            "strategy": route.strategy.value if route is not None else None,
            "lane": self.lane.value if self.lane is not None else None,
            "considered": self.considered,
            "removed": [r.as_json() for r in self.removed],
            "pick": self.pick,
            "overflow": self.overflow or None,
            "replicas": self.replicas or None,
            "budget": self.budget or None,
            "candidates": self.order,
            "error": (
                {
                    "status": self.error.status,
                    "code": self.error.code,
                    "message": self.error.message,
                }
                if self.error is not None
                else None
            ),
            "decisionMicroseconds": round(self.micros, 1),
        }


@dataclass(slots=True)
class RouteDecision:
    alias: ModelAlias
    #: Endpoints to try, in order; the first that succeeds serves the request.
    candidates: list[EndpointRuntime]
    #: Name of the rule that chose the candidates (`model:<alias>` when no rule matched).
    rule: str
    #: (endpoint, reason) for every endpoint considered but not kept.
    removed: list[tuple[str, str]] = field(default_factory=list)
    strategy: Strategy = Strategy.PRIORITY
    #: A/B arm label of the first candidate.
    arm: str = ""
    #: Estimated prompt tokens (fed to the endpoints' rate windows by the forwarder).
    input_tokens: int = 0
    trace: DecisionTrace | None = None
    #: A never-spill request that must wait for self-hosted capacity first (the forwarder waits).
    hold: CapacityHold | None = None
    #: What overflow did: "" (pool had capacity, or no overflow), "spilled" or "held".
    overflow: str = ""
    #: The strategy lane the request runs in (lanes.py).
    lane: LaneName = LaneName.REALTIME


def operation_for(body: dict[str, Any], wanted: str | None = None) -> Operation:
    """The operation named by `wanted`, else the one the body's shape implies (for explain)."""
    if wanted is None:
        shapes = (("messages", "chat"), ("prompt", "completions"), ("input", "embeddings"))
        wanted = next((op for key, op in shapes if key in body), "chat")
    try:
        return Operation(wanted)
    except ValueError:
        raise ValueError(
            f"operation must be one of chat, completions, embeddings (got {wanted!r})"
        ) from None


def uses_complexity(config: RouterConfig) -> bool:
    routes = [(r.strategy, r.match.complexity) for r in config.rules]
    routes += [(m.strategy, None) for m in config.models]
    return any(s is Strategy.COMPLEXITY_TIERS or c is not None for s, c in routes)


def prepare_routing(config: RouterConfig) -> None:
    """Load what `config`'s rules need before the first request does (the complexity model)."""
    if uses_complexity(config):
        default_model()


def _unknown_model(snapshot: Snapshot, model: str) -> ApiError:
    offered = ", ".join(sorted(snapshot.aliases)) or "none"
    return ApiError(
        404,
        f"The model {model!r} does not exist on this router; offered models: {offered}",
        code="model_not_found",
        param="model",
    )


@dataclass(slots=True, frozen=True)
class PreparedRoute:
    """A route with everything that depends only on the config resolved (once per snapshot)."""

    route: Route
    #: Its targets as candidates, in config order (each request filters a copy).
    candidates: tuple[Candidate, ...]
    names: tuple[str, ...]
    #: The filters that could remove one of its candidates under this config.
    filters: tuple[CandidateFilter, ...]


def _prepare(route: Route, snapshot: Snapshot) -> PreparedRoute:
    endpoints = snapshot.endpoints
    candidates: list[Candidate] = []
    for target in route.targets:
        if isinstance(target, str):
            candidates.append(Candidate(endpoints[target], 1, None, target))
        else:
            candidates.append(
                Candidate(
                    endpoints[target.endpoint], target.weight, target.tier, target.arm_label()
                )
            )
    return PreparedRoute(
        route,
        tuple(candidates),
        tuple(c.name for c in candidates),
        filters_for([c.endpoint for c in candidates], snapshot.config),
    )


@dataclass(slots=True, frozen=True)
class RouteTable:
    """Every route of a config, prepared: by rule name, and the alias routes by alias name."""

    rules: dict[str, PreparedRoute]
    aliases: dict[str, PreparedRoute]


def route_table(snapshot: Snapshot) -> RouteTable:
    """Built once per snapshot (`snapshot.derived(route_table)`)."""
    config = snapshot.config
    return RouteTable(
        {rule.name: _prepare(rule_route(rule), snapshot) for rule in config.rules},
        {alias.name: _prepare(alias_route(alias), snapshot) for alias in config.models},
    )


def request_lane(
    config: RouterConfig, request: RoutedRequest, alias: ModelAlias, rule: Rule | None
) -> LaneName:
    """The request's strategy lane (lanes.py): the rule's, else the alias's, else the one the
    app's header asks for, else real-time. An invalid header is a 400."""
    lane = (rule.lane if rule is not None else None) or alias.lane
    if lane is not None:
        return lane
    header = config.lanes.header
    raw = request.headers.get(header)
    if raw is None:
        return LaneName.REALTIME
    try:
        return LaneName(raw.strip().lower())
    except ValueError:
        raise bad_request(
            f"Header {header} must be realtime or batch (got {raw.strip()[:40]!r})",
            param=header,
        ) from None


def _run(
    snapshot: Snapshot,
    request: RoutedRequest,
    trace: DecisionTrace,
    rng: random.Random,
    model: Callable[[], ComplexityModel],
    explaining: bool = False,
) -> RouteDecision:
    alias = snapshot.aliases.get(request.model)
    if alias is None:
        raise _unknown_model(snapshot, request.model)
    config = snapshot.config
    found = classify(request.body, request.headers, config.sensitivity, model)
    trace.found = found
    table = snapshot.derived(route_table)
    rule, trace.rules = first_matching_rule(
        config.rules, alias, request.op.value, request.stream, request.headers, request.body, found
    )
    prepared = table.aliases[alias.name] if rule is None else table.rules[rule.name]
    route = trace.route = prepared.route
    lane = trace.lane = request_lane(config, request, alias, rule)
    candidates = list(prepared.candidates)
    trace.considered = list(prepared.names)
    if explaining:
        trace.replicas = {
            c.name: c.endpoint.pool.describe() for c in candidates if c.endpoint.pool is not None
        }
    ctx = RouteContext(
        request.op,
        request.model,
        request.stream,
        request.headers,
        request.body,
        found,
        alias,
        route,
        config.budget,
        rng,
        config.budgets,
        lane is LaneName.BATCH,
    )
    unavailable: ApiError | None = None
    try:
        candidates = apply_filters(candidates, ctx, trace.removed, prepared.filters)
    except ApiError as exc:
        # With overflow, a pool that cannot serve at all is the extreme of saturated.
        if route.overflow is None or exc.status != 503:
            raise
        candidates, unavailable = [], exc
    hold = None
    overflowed = ""
    if candidates:
        candidates, trace.pick = PICKERS[route.strategy].order(candidates, ctx)
    if route.overflow is not None:
        candidates, hold, trace.overflow = apply_overflow(
            candidates, ctx, snapshot, trace.removed, unavailable
        )
        spill = {t.endpoint for t in route.overflow.targets}
        if hold is not None:
            overflowed = "held"
        elif candidates and candidates[0].name in spill:
            overflowed = "spilled"
        if trace.overflow:
            trace.considered.extend(t.endpoint for t in route.overflow.targets)
    candidates, trace.budget = apply_budget(candidates, ctx)
    if not route.options.fallback:
        for dropped in candidates[1:]:
            trace.removed.append(Removal(dropped.name, "pick", "route has fallback disabled"))
        candidates = candidates[:1]
    trace.order = [c.name for c in candidates]
    return RouteDecision(
        alias,
        [c.endpoint for c in candidates],
        route.name,
        [(r.endpoint, r.reason) for r in trace.removed],
        route.strategy,
        candidates[0].arm,
        found.size.input_tokens,
        trace,
        hold,
        overflowed,
        lane,
    )


def decide(
    snapshot: Snapshot,
    request: RoutedRequest,
    *,
    rng: random.Random = _RANDOM,
    model: Callable[[], ComplexityModel] = default_model,
    trace: DecisionTrace | None = None,
) -> RouteDecision:
    """Where this request goes; raises ApiError when it may go nowhere (fail closed).

    Pass a `trace` to keep what the steps found even when it raises (the audit record of a
    refused request needs its classification, rule and removed candidates).
    """
    started = time.perf_counter()
    if trace is None:
        trace = DecisionTrace(request.model)
    try:
        return _run(snapshot, request, trace, rng, model)
    finally:
        trace.micros = (time.perf_counter() - started) * 1e6


def explain(
    snapshot: Snapshot,
    request: RoutedRequest,
    *,
    rng: random.Random = _RANDOM,
    model: Callable[[], ComplexityModel] = default_model,
) -> DecisionTrace:
    """The full decision trace for a request, refusals included, without calling any model.

    Unlike `decide`, every classifier runs (complexity too, even when no rule needs it), so the
    trace shows what rules *could* match on.
    """
    started = time.perf_counter()
    trace = DecisionTrace(request.model)
    try:
        _run(snapshot, request, trace, rng, model, explaining=True)
    except ApiError as exc:
        trace.error = exc
    if trace.found is not None:
        trace.found.complexity()
    trace.micros = (time.perf_counter() - started) * 1e6
    return trace
