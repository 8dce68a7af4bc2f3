"""Route decision: which endpoints may serve a request, in which order, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy

from ..config import ModelAlias
from ..errors import ApiError
from ..providers.base import Operation
from ..runtime import EndpointRuntime, Snapshot


@dataclass(slots=True)
class RoutedRequest:
    """What the router knows about a request before it is sent anywhere."""

    op: Operation
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]
    model: str
    stream: bool


@dataclass(slots=True)
class RouteDecision:
    alias: ModelAlias
    #: Endpoints to try, in order; the first that succeeds serves the request.
    candidates: list[EndpointRuntime]
    #: Name of the rule that chose the candidates (the alias itself when no rule matched).
    rule: str
    #: (endpoint, reason) for every endpoint considered but not kept.
    removed: list[tuple[str, str]] = field(default_factory=list)


def decide(snapshot: Snapshot, request: RoutedRequest) -> RouteDecision:
    alias = snapshot.aliases.get(request.model)
    if alias is None:
        offered = ", ".join(sorted(snapshot.aliases)) or "none"
        raise ApiError(
            404,
            f"The model {request.model!r} does not exist on this router; offered models: {offered}",
            code="model_not_found",
            param="model",
        )
    candidates: list[EndpointRuntime] = []
    removed: list[tuple[str, str]] = []
    for target in alias.route_targets():
        name = target.endpoint
        endpoint = snapshot.endpoints[name]
        if not endpoint.adapter.supports(request.op):
            removed.append((name, f"provider {endpoint.config.provider} has no {request.op} API"))
            continue
        candidates.append(endpoint)
    return RouteDecision(alias, candidates, f"model:{alias.name}", removed)
