"""Step 2 of the routing pipeline: the first rule whose conditions all hold chooses the route.

Conditions are checked cheapest first, so a rule that fails on the model name or a header never
runs the complexity classifier. A request that no rule matches takes its model alias's own route
(`model:<alias>`). Every rule looked at is recorded with the first condition that failed, which is
what `explain` shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ModelAlias, Overflow, Rule, RuleMatch, Strategy, StrategyOptions, Target
from .classify import Classification


@dataclass(slots=True, frozen=True)
class Route:
    """What a matched rule (or the alias default) decided: targets, how to order them."""

    name: str
    strategy: Strategy
    #: Targets, or plain endpoint names (an alias's `endpoints` chain: weight 1, no tier).
    targets: tuple[Target, ...] | tuple[str, ...]
    options: StrategyOptions
    #: Where requests spill while these targets are saturated (routing/overflow.py).
    overflow: Overflow | None = None


@dataclass(slots=True, frozen=True)
class RuleCheck:
    """One rule as seen by one request: matched, or the first condition that did not hold."""

    rule: str
    failed: str | None = None
    observed: Any = None

    def as_json(self) -> dict[str, Any]:
        if self.failed is None:
            return {"rule": self.rule, "matched": True}
        return {
            "rule": self.rule,
            "matched": False,
            "failed": self.failed,
            "observed": self.observed,
        }


def _values_match(accepted: tuple[str, ...], value: str | None) -> bool:
    if value is None:
        return False
    return "*" in accepted or value in accepted


def _mapping_mismatch(
    wanted: dict[str, tuple[str, ...]], source: Mapping[str, Any] | None
) -> tuple[str, Any] | None:
    for key, accepted in wanted.items():
        raw = source.get(key) if source is not None else None
        value = raw if isinstance(raw, str) else None
        if not _values_match(accepted, value):
            return key, value
    return None


def first_mismatch(
    match: RuleMatch,
    model: str,
    operation: str,
    stream: bool,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    found: Classification,
) -> tuple[str, Any] | None:
    """(condition, observed value) of the first condition that fails, or None if all hold."""
    if match.models and model not in match.models:
        return "models", model
    if match.operations and operation not in match.operations:
        return "operations", operation
    if match.stream is not None and match.stream != stream:
        return "stream", stream
    text = found.text
    if match.tools is not None and match.tools != text.has_tools:
        return "tools", text.has_tools
    if match.images is not None and match.images != text.has_images:
        return "images", text.has_images
    if match.headers:
        miss = _mapping_mismatch(match.headers, headers)
        if miss is not None:
            return f"headers.{miss[0]}", miss[1]
    if match.metadata:
        metadata = body.get("metadata")
        miss = _mapping_mismatch(match.metadata, metadata if isinstance(metadata, dict) else None)
        if miss is not None:
            return f"metadata.{miss[0]}", miss[1]
    if match.tokens is not None and not match.tokens.contains(found.size.input_tokens):
        return "tokens", found.size.input_tokens
    sensitivity = found.sensitivity
    if match.labels and not any(label in sensitivity.labels for label in match.labels):
        return "labels", [label.value for label in sensitivity.labels]
    if match.data_classes and not any(c in sensitivity.classes for c in match.data_classes):
        return "dataClasses", sorted(sensitivity.classes)
    if match.complexity is not None:
        score = found.complexity().score
        if not match.complexity.contains(score):
            return "complexity", round(score, 4)
    return None


def first_matching_rule(
    rules: tuple[Rule, ...],
    alias: ModelAlias,
    operation: str,
    stream: bool,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    found: Classification,
) -> tuple[Rule | None, list[RuleCheck]]:
    """The first rule whose conditions all hold (None: the alias's own route), and every rule
    looked at on the way."""
    checks: list[RuleCheck] = []
    for rule in rules:
        miss = first_mismatch(rule.match, alias.name, operation, stream, headers, body, found)
        if miss is None:
            checks.append(RuleCheck(rule.name))
            return rule, checks
        checks.append(RuleCheck(rule.name, miss[0], miss[1]))
    return None, checks


def rule_route(rule: Rule) -> Route:
    return Route(rule.name, rule.strategy, rule.targets, rule.options, rule.overflow)


def alias_route(alias: ModelAlias) -> Route:
    """The route of requests for `alias` that no rule matched."""
    return Route(
        f"model:{alias.name}",
        alias.strategy,
        alias.targets or alias.endpoints,
        alias.options,
        alias.overflow,
    )
