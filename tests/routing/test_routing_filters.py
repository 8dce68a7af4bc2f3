"""Filters: each removes what it must, says why, and refuses with its own error when it empties
the candidate set (compliance fails closed with a 403 naming the rule)."""

from __future__ import annotations

from typing import Any

import pytest
from routing_helpers import config, ep, names, request, route, snapshot

from modelplane_sidecar.errors import ApiError
from modelplane_sidecar.providers.base import Operation

SENSITIVITY = {
    "classes": [
        {"name": "public"},
        {"name": "pii", "allowedTags": ["on-prem", "gdpr"]},
        {"name": "secret", "allowedTags": ["on-prem"]},
    ]
}


def _compliance_config(endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return config(
        endpoints,
        rules=[{"name": "default-chat", "targets": [e["name"] for e in endpoints]}],
        sensitivity=SENSITIVITY,
    )


def test_pii_only_goes_to_endpoints_with_an_allowed_tag() -> None:
    snap = snapshot(
        _compliance_config(
            [ep("cloud", tags=["cloud"]), ep("eu", tags=["gdpr"]), ep("onprem", tags=["on-prem"])]
        )
    )
    decision = route(snap, request("My card is 4111 1111 1111 1111, why was it declined?"))
    assert names(decision) == ["eu", "onprem"]
    assert decision.removed == [
        ("cloud", "data class 'pii' needs a tag in [on-prem, gdpr]; endpoint has [cloud]")
    ]
    # A secret narrows it further; classes add up.
    decision = route(snap, request("mail ops@example.com the key AKIAIOSFODNN7EXAMPLE"))
    assert names(decision) == ["onprem"]


def test_plain_request_may_use_every_endpoint() -> None:
    snap = snapshot(
        _compliance_config([ep("cloud", tags=["cloud"]), ep("onprem", tags=["on-prem"])])
    )
    assert names(route(snap, request("What is a Pod?"))) == ["cloud", "onprem"]


def test_declared_class_header_restricts_like_a_finding() -> None:
    snap = snapshot(_compliance_config([ep("cloud"), ep("onprem", tags=["on-prem"])]))
    decision = route(snap, request("hello", headers={"X-Modelplane-Data-Class": "secret"}))
    assert names(decision) == ["onprem"]


def test_nothing_compliant_fails_closed_with_403_naming_the_rule() -> None:
    snap = snapshot(_compliance_config([ep("cloud-a", tags=["cloud"]), ep("cloud-b")]))
    with pytest.raises(ApiError) as caught:
        route(snap, request("Patient SSN 123-45-6789, summarize the chart"))
    error = caught.value
    assert error.status == 403 and error.code == "no_compliant_endpoint"
    assert "Rule 'default-chat'" in error.message and "us-ssn" in error.message
    assert "cloud-a" in error.message and "cloud-b: data class 'pii'" in error.message
    assert "123-45-6789" not in error.message
    assert error.headers["x-modelplane-rule"] == "default-chat"


def test_default_class_can_restrict_every_request() -> None:
    data = _compliance_config([ep("cloud"), ep("onprem", tags=["on-prem"])])
    data["sensitivity"] = {**SENSITIVITY, "defaultClass": "pii"}
    assert names(route(snapshot(data), request("hi"))) == ["onprem"]


def test_open_breaker_is_removed_and_expired_one_is_kept() -> None:
    snap = snapshot(config([ep("a"), ep("b")]))
    policy = snap.aliases["chat"].circuit_breaker
    breaker = snap.endpoints["a"].state.breaker
    for _ in range(policy.failure_threshold):
        breaker.record_failure(policy)
    decision = route(snap, request())
    assert names(decision) == ["b"]
    assert decision.removed[0][0] == "a" and "circuit breaker open" in decision.removed[0][1]
    breaker._opened_at -= policy.open_seconds + 1  # the open period has passed: probe allowed
    assert names(route(snap, request())) == ["a", "b"]


def test_all_breakers_open_is_503_naming_the_rule() -> None:
    snap = snapshot(config([ep("a")]))
    policy = snap.aliases["chat"].circuit_breaker
    for _ in range(policy.failure_threshold):
        snap.endpoints["a"].state.breaker.record_failure(policy)
    with pytest.raises(ApiError) as caught:
        route(snap, request())
    assert caught.value.status == 503 and caught.value.code == "no_endpoint_available"
    assert "rule 'model:chat'" in caught.value.message


def test_context_window_too_small() -> None:
    snap = snapshot(config([ep("small", contextWindow=1000), ep("large", contextWindow=200000)]))
    decision = route(snap, request("word " * 2000))
    assert names(decision) == ["large"]
    assert "context window is 1000" in decision.removed[0][1]
    # max_tokens counts too.
    assert names(route(snap, request("hi", max_tokens=5000))) == ["large"]
    with pytest.raises(ApiError) as caught:
        route(snap, request("word " * 900_000))
    assert caught.value.status == 400 and caught.value.code == "context_length_exceeded"


def test_limits_concurrency_rpm_and_tpm() -> None:
    snap = snapshot(
        config(
            [
                ep("busy", limits={"maxConcurrency": 2}),
                ep("rpm", limits={"requestsPerMinute": 3}),
                ep("tpm", limits={"tokensPerMinute": 100}),
                ep("free"),
            ]
        )
    )
    snap.endpoints["busy"].state.in_flight = 2
    for _ in range(3):
        snap.endpoints["rpm"].state.stats.note_request(1)
    snap.endpoints["tpm"].state.stats.note_request(90)
    decision = route(snap, request("a prompt of more than forty characters in all"))
    assert names(decision) == ["free"]
    assert [r[0] for r in decision.removed] == ["busy", "rpm", "tpm"]


def test_all_at_limit_is_429() -> None:
    snap = snapshot(config([ep("busy", limits={"maxConcurrency": 1})]))
    snap.endpoints["busy"].state.in_flight = 1
    with pytest.raises(ApiError) as caught:
        route(snap, request())
    assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"


def test_operation_the_provider_lacks() -> None:
    endpoints = [
        ep("claude", provider="anthropic", apiKey={"value": "k"}, baseUrl="https://a.example"),
        ep("gpt"),
    ]
    snap = snapshot(config(endpoints))
    assert names(route(snap, request(op=Operation.EMBEDDINGS))) == ["gpt"]
    snap = snapshot(config(endpoints[:1]))
    with pytest.raises(ApiError) as caught:
        route(snap, request(op=Operation.EMBEDDINGS))
    assert caught.value.status == 400 and caught.value.code == "unsupported_operation"
