"""Budget modes in the routing pipeline: per-endpoint scope, the tier ladder, and the 429."""

from __future__ import annotations

from typing import Any

import pytest
from routing_helpers import config, ep, names, request, route, snapshot

from modelplane_sidecar.errors import ApiError
from modelplane_sidecar.pricing import builtin_pricing, lookup

LADDER = [
    ep("claude", pricing={"inputPerMtok": 3, "outputPerMtok": 15}),
    ep("mini", pricing={"inputPerMtok": 0.15, "outputPerMtok": 0.6}),
    ep("llama", pricing={"inputPerMtok": 0, "outputPerMtok": 0}),
]
TARGETS = [
    {"endpoint": "claude", "tier": "premium"},
    {"endpoint": "mini", "tier": "standard"},
    {"endpoint": "llama", "tier": "cheap"},
]


def with_budgets(*budgets: dict[str, Any], strategy: str = "priority") -> dict[str, Any]:
    models = [{"name": "chat", "strategy": strategy, "targets": TARGETS}]
    return config(LADDER, models=models, budgets=list(budgets))


@pytest.mark.parametrize(
    ("tier", "order"),
    [
        (None, ["claude", "mini", "llama"]),
        ("standard", ["mini", "llama", "claude"]),
        ("cheap", ["llama", "claude", "mini"]),
    ],
)
def test_the_downgrade_ladder_moves_tiers_above_the_cap_behind(
    tier: str | None, order: list[str]
) -> None:
    budget: dict[str, Any] = {"name": "team", "mode": "downgrade" if tier else "normal"}
    if tier:
        budget["tier"] = tier
    decision = route(snapshot(with_budgets(budget)), request())
    assert names(decision) == order
    if tier:
        assert (
            decision.trace is not None
            and "budget 'team' in downgrade mode" in decision.trace.budget
        )


def test_a_downgrade_without_a_tier_goes_cheapest_first() -> None:
    decision = route(snapshot(with_budgets({"name": "team", "mode": "downgrade"})), request())
    assert names(decision) == ["llama", "mini", "claude"]


def test_a_scoped_downgrade_only_acts_on_routes_through_its_endpoints() -> None:
    elsewhere = {"name": "gpu", "mode": "downgrade", "tier": "cheap", "endpoints": ["ghost"]}
    data = with_budgets()
    data["endpoints"].append(ep("ghost"))
    data["budgets"] = [elsewhere]
    assert names(route(snapshot(data), request())) == ["claude", "mini", "llama"]


def test_the_strongest_downgrade_of_the_covering_budgets_wins() -> None:
    data = with_budgets(
        {"name": "org", "mode": "downgrade", "tier": "standard"},
        {"name": "premium-only", "mode": "downgrade", "tier": "cheap", "endpoints": ["claude"]},
    )
    decision = route(snapshot(data), request())
    assert names(decision)[0] == "llama"
    assert decision.trace is not None and "'premium-only'" in decision.trace.budget


def test_a_blocked_budget_removes_only_its_endpoints() -> None:
    data = with_budgets({"name": "cloud", "mode": "stop", "endpoints": ["claude", "mini"]})
    decision = route(snapshot(data), request())
    assert names(decision) == ["llama"]
    assert ("claude", "budget 'cloud' is exhausted for this period") in decision.removed


def test_when_every_candidate_is_blocked_the_429_names_the_budget() -> None:
    data = with_budgets({"name": "team", "mode": "stop"})
    with pytest.raises(ApiError) as refused:
        route(snapshot(data), request())
    error = refused.value
    assert (error.status, error.type, error.code) == (429, "insufficient_quota", "budget_exhausted")
    assert error.message.startswith("Budget 'team' is exhausted for this period")
    assert error.headers["x-modelplane-budget"] == "team"
    assert error.headers["x-modelplane-rule"] == "model:chat"


def test_budgets_must_name_endpoints_of_the_config() -> None:
    from modelplane_sidecar.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="budget 'x' refers to unknown endpoint"):
        parse_config(with_budgets({"name": "x", "endpoints": ["nowhere"]}))


@pytest.mark.parametrize(
    ("model", "prices"),
    [
        ("gpt-4o", (2.5, 10.0, 1.25)),
        ("gpt-4o-2024-08-06", (2.5, 10.0, 1.25)),
        ("gpt-4o-mini", (0.15, 0.6, 0.075)),
        ("us.anthropic.claude-sonnet-4-20250514-v1:0", (3.0, 15.0, 0.3)),
        ("claude-3-5-haiku-latest", (0.8, 4.0, 0.08)),
        ("models/gemini-2.5-flash-lite", (0.1, 0.4, 0.025)),
        ("text-embedding-3-small", (0.02, 0.0, None)),
    ],
)
def test_the_builtin_price_table_matches_versions_and_provider_prefixes(
    model: str, prices: tuple[float, float, float | None]
) -> None:
    assert lookup(model) == prices


def test_unknown_models_have_no_builtin_price_and_endpoint_pricing_wins() -> None:
    assert lookup("llama-3.1-70b-instruct") is None
    assert builtin_pricing("gpt-4") is None  # a prefix of known names is not a match
    snap = snapshot(config([ep("a", model="gpt-4o"), ep("b", model="gpt-4o", pricing={})]))
    assert snap.endpoints["a"].config.pricing.output_per_mtok == 10.0
    assert snap.endpoints["b"].config.pricing.output_per_mtok == 0.0
