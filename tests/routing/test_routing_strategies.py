"""Strategies order the candidates (first serves, the rest are fallbacks); the budget hook."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from routing_helpers import config, ep, names, request, route, snapshot

from modelplane_sidecar.endpoint_stats import EndpointStats
from modelplane_sidecar.errors import ApiError


def _one_rule(
    endpoints: list[dict[str, Any]], strategy: str, targets: list[Any], **extra: Any
) -> dict[str, Any]:
    rule = {"name": "r", "strategy": strategy, "targets": targets, **extra}
    return config(endpoints, rules=[rule])


def test_priority_keeps_target_order() -> None:
    snap = snapshot(_one_rule([ep("a"), ep("b"), ep("c")], "priority", ["c", "a", "b"]))
    decision = route(snap, request())
    assert names(decision) == ["c", "a", "b"]
    assert decision.trace is not None and decision.trace.pick == "c: first in priority order"


def test_fallback_disabled_leaves_one_candidate() -> None:
    snap = snapshot(
        _one_rule([ep("a"), ep("b")], "priority", ["a", "b"], options={"fallback": False})
    )
    assert names(route(snap, request())) == ["a"]


WEIGHTED = _one_rule(
    [ep("control"), ep("variant")],
    "weighted",
    [
        {"endpoint": "control", "weight": 90, "arm": "A"},
        {"endpoint": "variant", "weight": 10, "arm": "B"},
    ],
)


def test_weighted_is_sticky_per_user_header() -> None:
    snap = snapshot(WEIGHTED)
    for user in ("alice", "bob", "carol", "dave"):
        arms = {
            route(snap, request(headers={"x-user-id": user}), seed=seed).arm for seed in range(10)
        }
        assert len(arms) == 1, user


def test_weighted_split_follows_weights_and_keeps_the_other_arm_as_fallback() -> None:
    snap = snapshot(WEIGHTED)
    counts: collections.Counter[str] = collections.Counter()
    for i in range(2000):
        decision = route(snap, request(headers={"x-modelplane-session": f"s{i}"}))
        counts[decision.arm] += 1
        assert len(decision.candidates) == 2
    assert 0.85 < counts["A"] / 2000 < 0.95
    decision = route(snap, request(user="end-user-7"))
    assert decision.trace is not None and "hash of body field user" in decision.trace.pick


def test_weighted_without_key_draws_at_random_and_zero_weight_never_leads() -> None:
    snap = snapshot(
        _one_rule(
            [ep("a"), ep("b")],
            "weighted",
            [{"endpoint": "a", "weight": 1}, {"endpoint": "b", "weight": 0}],
        )
    )
    firsts = {names(route(snap, request(), seed=s))[0] for s in range(50)}
    assert firsts == {"a"}


def test_lowest_latency_uses_ewma_and_tries_unobserved_first() -> None:
    snap = snapshot(
        _one_rule(
            [ep("slow"), ep("fast"), ep("new")],
            "lowest-latency",
            ["slow", "fast", "new"],
            options={"exploration": 0},
        )
    )
    snap.endpoints["slow"].state.stats.observe_latency(2.0)
    snap.endpoints["fast"].state.stats.observe_latency(0.2)
    assert names(route(snap, request())) == ["new", "fast", "slow"]
    snap.endpoints["new"].state.stats.observe_latency(0.5)
    decision = route(snap, request())
    assert names(decision) == ["fast", "new", "slow"]
    assert decision.trace is not None and "lowest latency EWMA 200 ms" in decision.trace.pick


def test_lowest_latency_streams_use_time_to_first_token() -> None:
    snap = snapshot(
        _one_rule([ep("a"), ep("b")], "lowest-latency", ["a", "b"], options={"exploration": 0})
    )
    for name, latency, ttft in (("a", 1.0, 0.5), ("b", 0.8, 0.9)):
        snap.endpoints[name].state.stats.observe_latency(latency)
        snap.endpoints[name].state.stats.observe_ttft(ttft)
    assert names(route(snap, request()))[0] == "b"
    assert names(route(snap, request(stream=True)))[0] == "a"


def test_lowest_latency_explores_so_a_recovered_endpoint_is_seen() -> None:
    snap = snapshot(
        _one_rule([ep("a"), ep("b")], "lowest-latency", ["a", "b"], options={"exploration": 0.2})
    )
    snap.endpoints["a"].state.stats.observe_latency(0.1)
    snap.endpoints["b"].state.stats.observe_latency(5.0)
    firsts = collections.Counter(names(route(snap, request(), seed=s))[0] for s in range(500))
    assert 20 < firsts["b"] < 100  # about exploration / 2 of the requests


def test_lowest_cost_uses_prices_and_estimated_tokens() -> None:
    endpoints = [
        ep("in-cheap", pricing={"inputPerMtok": 0.1, "outputPerMtok": 10.0}),
        ep("out-cheap", pricing={"inputPerMtok": 5.0, "outputPerMtok": 0.5}),
    ]
    snap = snapshot(_one_rule(endpoints, "lowest-cost", ["in-cheap", "out-cheap"]))
    # Long prompt, short answer: input price dominates.
    assert names(route(snap, request("word " * 20000, max_tokens=10)))[0] == "in-cheap"
    # Short prompt, long answer: output price dominates.
    assert names(route(snap, request("hi", max_tokens=4000)))[0] == "out-cheap"


def test_least_loaded_counts_in_flight_relative_to_limit() -> None:
    endpoints = [ep("a", limits={"maxConcurrency": 100}), ep("b", limits={"maxConcurrency": 4})]
    snap = snapshot(_one_rule(endpoints, "least-loaded", ["a", "b"]))
    snap.endpoints["a"].state.in_flight = 10
    snap.endpoints["b"].state.in_flight = 2
    assert names(route(snap, request())) == ["a", "b"]
    snap.endpoints["a"].state.in_flight = 60
    assert names(route(snap, request())) == ["b", "a"]


TIERS = _one_rule(
    [ep("small"), ep("mid"), ep("large")],
    "complexity-tiers",
    [
        {"endpoint": "small", "tier": "cheap"},
        {"endpoint": "mid", "tier": "standard"},
        {"endpoint": "large", "tier": "premium"},
    ],
    options={"tiers": {"standard": 0.4, "premium": 0.8}},
)


@pytest.mark.parametrize(
    ("score", "order"),
    [
        (0.1, ["small", "mid", "large"]),
        (0.5, ["mid", "large", "small"]),
        (0.9, ["large", "mid", "small"]),
    ],
)
def test_complexity_tiers(score: float, order: list[str]) -> None:
    decision = route(snapshot(TIERS), request(), score=score)
    assert names(decision) == order
    assert decision.trace is not None and "complexity" in decision.trace.pick


def test_complexity_tiers_moves_up_when_its_tier_is_gone() -> None:
    snap = snapshot(TIERS)
    snap.endpoints["small"].state.in_flight = 0
    policy = snap.aliases["chat"].circuit_breaker
    for _ in range(policy.failure_threshold):
        snap.endpoints["small"].state.breaker.record_failure(policy)
    decision = route(snap, request(), score=0.1)
    assert names(decision) == ["mid", "large"]
    assert decision.trace is not None and "no cheap endpoint left" in decision.trace.pick


def test_alias_default_route_can_use_a_strategy() -> None:
    data = config(
        [ep("a"), ep("b")],
        models=[
            {
                "name": "chat",
                "strategy": "weighted",
                "targets": [{"endpoint": "a", "weight": 0}, {"endpoint": "b", "weight": 5}],
            }
        ],
    )
    decision = route(snapshot(data), request())
    assert decision.rule == "model:chat" and names(decision) == ["b", "a"]


PRICED = [
    ep("premium", pricing={"inputPerMtok": 10, "outputPerMtok": 30}),
    ep("budget", pricing={"inputPerMtok": 0.1, "outputPerMtok": 0.4}),
]


def test_budget_downgrade_goes_cheapest_first() -> None:
    data = _one_rule(PRICED, "priority", ["premium", "budget"])
    assert names(route(snapshot(data), request())) == ["premium", "budget"]
    data["budget"] = {"mode": "downgrade", "budget": "team-a-monthly"}
    decision = route(snapshot(data), request())
    assert names(decision) == ["budget", "premium"]
    assert decision.trace is not None and "team-a-monthly" in decision.trace.budget


def test_budget_downgrade_respects_opt_out() -> None:
    data = _one_rule(PRICED, "priority", ["premium", "budget"], options={"budgetDowngrade": False})
    data["budget"] = {"mode": "downgrade"}
    assert names(route(snapshot(data), request())) == ["premium", "budget"]


def test_budget_stop_refuses_with_429() -> None:
    data = _one_rule(PRICED, "priority", ["premium", "budget"])
    data["budget"] = {"mode": "stop", "budget": "team-a-monthly"}
    with pytest.raises(ApiError) as caught:
        route(snapshot(data), request())
    assert caught.value.status == 429 and caught.value.code == "budget_exhausted"
    assert "team-a-monthly" in caught.value.message


def test_endpoint_stats_ewma_and_sliding_window() -> None:
    now = [1000.0]
    stats = EndpointStats(clock=lambda: now[0])
    stats.observe_latency(1.0)
    stats.observe_latency(2.0)
    assert stats.latency_seconds == pytest.approx(1.3)
    for _ in range(10):
        stats.note_request(100)
    assert stats.rate() == (10, 1000)
    now[0] += 90  # half-way through the next minute: half of the previous minute still counts
    assert stats.rate() == pytest.approx((5, 500))
    now[0] += 200
    assert stats.rate() == (0, 0)
