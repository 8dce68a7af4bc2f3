"""Rule matching: first match wins, every condition kind, cheapest conditions first."""

from __future__ import annotations

import pytest
from routing_helpers import config, ep, fixed_model, names, request, route, snapshot

from modelplane_sidecar.config import ScoreRange, TokenRange
from modelplane_sidecar.providers.base import Operation
from modelplane_sidecar.routing import decide

ENDPOINTS = [ep("cheap"), ep("premium"), ep("onprem", tags=["on-prem"])]


def _rules(*rules: dict[str, object]) -> dict[str, object]:
    return config(ENDPOINTS, rules=list(rules))


def test_no_rules_routes_by_alias_chain() -> None:
    decision = route(snapshot(config(ENDPOINTS)), request())
    assert decision.rule == "model:chat"
    assert names(decision) == ["cheap", "premium", "onprem"]


def test_first_matching_rule_wins() -> None:
    snap = snapshot(
        _rules(
            {"name": "never", "match": {"models": ["chat"], "tools": True}, "targets": ["onprem"]},
            {"name": "first", "match": {"models": ["chat"]}, "targets": ["premium"]},
            {"name": "second", "targets": ["cheap"]},
        )
    )
    decision = route(snap, request())
    assert decision.rule == "first" and names(decision) == ["premium"]
    assert decision.trace is not None
    checks = [c.as_json() for c in decision.trace.rules]
    assert checks == [
        {"rule": "never", "matched": False, "failed": "tools", "observed": False},
        {"rule": "first", "matched": True},
    ]


@pytest.mark.parametrize(
    ("match", "req", "matches"),
    [
        ({"operations": ["embeddings"]}, request(op=Operation.EMBEDDINGS), True),
        ({"operations": ["embeddings"]}, request(), False),
        ({"stream": True}, request(stream=True), True),
        ({"headers": {"X-Team": ["search", "ads"]}}, request(headers={"x-team": "ads"}), True),
        ({"headers": {"x-team": ["search"]}}, request(headers={"x-team": "ads"}), False),
        ({"headers": {"x-team": ["*"]}}, request(headers={"X-Team": "anything"}), True),
        ({"headers": {"x-team": ["*"]}}, request(), False),
        ({"metadata": {"task": ["summarize"]}}, request(metadata={"task": "summarize"}), True),
        ({"metadata": {"task": ["summarize"]}}, request(metadata={"task": "code"}), False),
        ({"metadata": {"task": ["summarize"]}}, request(), False),
        ({"tokens": {"min": 1000}}, request("word " * 2000), True),
        ({"tokens": {"max": 100}}, request("word " * 2000), False),
        ({"tools": True}, request(tools=[{"type": "function", "function": {"name": "f"}}]), True),
        (
            {"images": True},
            request(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:..."}},
                        ],
                    }
                ]
            ),
            True,
        ),
        ({"labels": ["email"]}, request("mail bob@example.org"), True),
        ({"labels": ["email"]}, request("call (415) 555-2671"), False),
        ({"dataClasses": ["pii"]}, request("call (415) 555-2671"), True),
        (
            {"dataClasses": ["secret"]},
            request("hi", headers={"x-modelplane-data-class": "secret"}),
            True,
        ),
        ({"dataClasses": ["pii"]}, request("hi"), False),
    ],
)
def test_condition_kinds(match: dict[str, object], req: object, matches: bool) -> None:
    snap = snapshot(_rules({"name": "r", "match": match, "targets": ["onprem"]}))
    decision = route(snap, req)  # type: ignore[arg-type]
    assert (decision.rule == "r") is matches


def test_ranges_include_min_and_exclude_max() -> None:
    score = ScoreRange(min=0.3, max=0.7)
    assert score.contains(0.3) and not score.contains(0.7) and not score.contains(0.29)
    assert ScoreRange(min=0.7).contains(1.0)
    tokens = TokenRange(min=10, max=20)
    assert tokens.contains(10) and tokens.contains(19) and not tokens.contains(20)
    assert TokenRange(min=5).contains(10**9)


@pytest.mark.parametrize(("score", "matches"), [(0.69, False), (0.71, True), (1.0, True)])
def test_complexity_range(score: float, matches: bool) -> None:
    snap = snapshot(
        _rules({"name": "hard", "match": {"complexity": {"min": 0.7}}, "targets": ["premium"]})
    )
    assert (route(snap, request(), score=score).rule == "hard") is matches


def test_complexity_runs_only_when_a_rule_reaches_it() -> None:
    snap = snapshot(
        _rules(
            {
                "name": "hard",
                "match": {"models": ["chat"], "tools": True, "complexity": {"min": 0.5}},
                "targets": ["premium"],
            }
        )
    )
    decision = route(snap, request())
    assert decision.trace is not None and decision.trace.found is not None
    assert not decision.trace.found.complexity_known
    decision = route(snap, request(tools=[{"type": "function"}]))
    assert decision.trace is not None and decision.trace.found is not None
    assert decision.trace.found.complexity_known


def test_unknown_model_is_404_before_any_rule() -> None:
    from modelplane_sidecar.errors import ApiError

    snap = snapshot(_rules({"name": "all", "targets": ["cheap"]}))
    with pytest.raises(ApiError) as caught:
        decide(snap, request(model="gpt-9"), model=lambda: fixed_model(0.5))
    assert caught.value.status == 404 and "offered models: chat" in caught.value.message
