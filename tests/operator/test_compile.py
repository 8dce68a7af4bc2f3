"""The CR -> RouterConfig compiler on many combinations of objects, valid and broken."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from modelplane_operator.compile import (
    COMPILED,
    ENDPOINT_INVALID,
    INVALID_REFERENCES,
    INVALID_SPEC,
    NOTHING_ROUTABLE,
    SECRET_KEY_NOT_FOUND,
    SECRET_NOT_FOUND,
    CompiledNamespace,
    NamespaceInputs,
    Resource,
    compile_namespace,
    decode_secret,
    wire_config,
)
from modelplane_sidecar import config as rc
from modelplane_sidecar.config import parse_config

NS = "team-a"
KEY = "sk-test-secret-value-123"


def endpoint(name: str, **spec: Any) -> Resource:
    base: dict[str, Any] = {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "baseURL": "https://api.openai.com/v1",
        "credentials": {"secretRef": {"name": "openai", "key": "api-key"}},
    }
    base.update(spec)
    return Resource(name, {k: v for k, v in base.items() if v is not None})


def policy(name: str, *models: dict[str, Any], created: str = "", **spec: Any) -> Resource:
    return Resource(name, {"models": list(models), **spec}, created=created)


def route(name: str, *targets: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "targets": [{"endpoint": t} for t in targets], **extra}


def chain(result: CompiledNamespace, index: int = 0) -> list[str]:
    assert result.config is not None
    return [t.endpoint for t in result.config.models[index].route_targets()]


def compile_(
    endpoints: list[Resource],
    policies: list[Resource],
    budgets: list[Resource] | None = None,
    secrets: dict[str, dict[str, str]] | None = None,
) -> CompiledNamespace:
    return compile_namespace(
        NamespaceInputs(
            NS,
            endpoints,
            policies,
            budgets or [],
            {"openai": {"api-key": KEY}} if secrets is None else secrets,
        )
    )


def test_a_policy_and_its_endpoints_compile_into_a_config_the_sidecar_accepts() -> None:
    result = compile_(
        [
            endpoint("gpt"),
            endpoint(
                "llama",
                provider="openai-compatible",
                credentials=None,
                baseURL=None,
                serviceRef={"name": "vllm", "port": 8000},
            ),
        ],
        [policy("p", route("chat", "gpt", "llama"))],
    )

    assert result.config is not None
    assert [e.name for e in result.config.endpoints] == ["gpt", "llama"]
    assert chain(result) == ["gpt", "llama"]
    assert result.config.endpoint("llama").base_url == "http://vllm.team-a.svc:8000/v1"
    assert result.config.metadata.namespace == NS
    assert result.version == result.config.content_hash()
    for key, verdict in result.verdicts.items():
        assert verdict.ready, key
        assert verdict.in_config, key
    # What goes over the wire round-trips through the sidecar's own validation, key included.
    shipped = parse_config(wire_config(result.config))
    assert shipped.endpoint("gpt").api_key is not None
    assert shipped.endpoint("gpt").api_key.resolve() == KEY
    assert shipped.version() == result.version


def test_policy_settings_map_onto_every_alias() -> None:
    result = compile_(
        [endpoint("gpt")],
        [
            policy(
                "p",
                route("chat", "gpt", description="General chat"),
                route("fast", "gpt"),
                retry={"maxAttempts": 4, "backoffBaseSeconds": 0.2, "retryOn": ["timeout"]},
                timeout={"attemptSeconds": 9, "totalSeconds": 30},
                circuitBreaker={"failureThreshold": 7, "openSeconds": 11},
            )
        ],
    )

    assert result.config is not None
    for alias in result.config.models:
        assert alias.retry.max_attempts == 4
        assert alias.retry.backoff_base_seconds == 0.2
        assert [r.value for r in alias.retry.retry_on] == ["timeout"]
        assert alias.timeout.attempt_seconds == 9
        assert alias.timeout.total_seconds == 30
        assert alias.circuit_breaker.failure_threshold == 7
        assert alias.circuit_breaker.open_seconds == 11
    assert result.config.models[0].description == "General chat"


def test_endpoint_fields_map_onto_the_router_endpoint() -> None:
    result = compile_(
        [
            endpoint(
                "gpt",
                region="eu-west-1",
                residency="eu",
                compliance=["gdpr", "hipaa"],
                pricing={"inputPerMTok": 0.15, "outputPerMTok": 0.6, "cachedInputPerMTok": 0.07},
                contextWindow=128000,
                timeouts={"connectSeconds": 2, "requestSeconds": 20, "streamIdleSeconds": 15},
                headers={"OpenAI-Organization": "org-1"},
            )
        ],
        [policy("p", route("chat", "gpt"))],
    )

    assert result.config is not None
    ep = result.config.endpoint("gpt")
    assert ep.region == "eu-west-1"
    assert ep.tags == ("gdpr", "hipaa", "residency:eu")
    assert (ep.pricing.input_per_mtok, ep.pricing.output_per_mtok) == (0.15, 0.6)
    assert ep.pricing.cached_input_per_mtok == 0.07
    assert ep.context_window == 128000
    assert (ep.timeouts.connect_seconds, ep.timeouts.request_seconds) == (2, 20)
    assert ep.timeouts.stream_idle_seconds == 15
    assert ep.headers == {"OpenAI-Organization": "org-1"}


def test_the_version_is_stable_and_changes_with_content_and_secret_rotation() -> None:
    def version(key: str, model: str = "gpt-4o-mini") -> str | None:
        return compile_(
            [endpoint("gpt", model=model)],
            [policy("p", route("chat", "gpt"))],
            secrets={"openai": {"api-key": key}},
        ).version

    assert version("k1") == version("k1")
    assert version("k1") != version("k2")
    assert version("k1") != version("k1", model="gpt-4o")


def test_object_order_does_not_change_the_version() -> None:
    eps = [endpoint("a"), endpoint("b"), endpoint("c")]
    pols = [policy("p1", route("x", "a")), policy("p2", route("y", "b", "c"))]

    assert compile_(eps, pols).version == compile_(eps[::-1], pols[::-1]).version


def test_missing_endpoint_marks_the_policy_and_keeps_the_rest() -> None:
    result = compile_(
        [endpoint("gpt")],
        [
            policy("good", route("chat", "gpt")),
            policy("partial", route("a", "gpt", "ghost"), route("b", "ghost")),
        ],
    )

    assert result.config is not None
    assert [m.name for m in result.config.models] == ["chat", "a"]
    assert chain(result, 1) == ["gpt"]
    good = result.verdict("RoutingPolicy", "good")
    assert good.ready
    partial = result.verdict("RoutingPolicy", "partial")
    assert not partial.ready
    assert partial.reason == INVALID_REFERENCES
    assert partial.in_config
    assert "model 'a': ModelEndpoint 'ghost' not found" in partial.message
    assert "model 'b': no usable target" in partial.message


def test_a_policy_with_nothing_usable_is_not_in_the_config() -> None:
    result = compile_([endpoint("gpt")], [policy("p", route("chat", "ghost"))])

    assert result.config is None
    verdict = result.verdict("RoutingPolicy", "p")
    assert verdict.reason == NOTHING_ROUTABLE
    assert not verdict.in_config
    assert result.verdict("ModelEndpoint", "gpt").message == (
        "valid, but no RoutingPolicy routes to it"
    )


def test_missing_secret_is_reported_on_the_endpoint_and_on_the_policy() -> None:
    result = compile_(
        [
            endpoint("gpt"),
            endpoint("other", credentials={"secretRef": {"name": "nope", "key": "k"}}),
        ],
        [policy("p", route("chat", "gpt", "other"))],
    )

    other = result.verdict("ModelEndpoint", "other")
    assert not other.ready
    assert other.reason == SECRET_NOT_FOUND
    assert other.message == (
        "Secret 'nope' (spec.credentials.secretRef) not found in namespace 'team-a'"
    )
    p = result.verdict("RoutingPolicy", "p")
    assert not p.ready
    assert "ModelEndpoint 'other' is not ready (SecretNotFound)" in p.message
    assert chain(result) == ["gpt"]


def test_missing_secret_key_names_the_keys_that_exist_but_never_values() -> None:
    result = compile_(
        [endpoint("gpt", credentials={"secretRef": {"name": "openai", "key": "token"}})],
        [policy("p", route("chat", "gpt"))],
    )

    verdict = result.verdict("ModelEndpoint", "gpt")
    assert verdict.reason == SECRET_KEY_NOT_FOUND
    assert verdict.message == "Secret 'openai' has no key 'token' (keys: api-key)"
    for v in result.verdicts.values():
        assert KEY not in v.message


def test_empty_secret_value_is_an_error() -> None:
    result = compile_(
        [endpoint("gpt")],
        [policy("p", route("chat", "gpt"))],
        secrets={"openai": {"api-key": " \n"}},
    )

    assert result.verdict("ModelEndpoint", "gpt").message == (
        "Secret 'openai' key 'api-key' is empty"
    )


def test_secret_values_are_stripped_of_the_trailing_newline() -> None:
    result = compile_(
        [endpoint("gpt")],
        [policy("p", route("chat", "gpt"))],
        secrets={"openai": {"api-key": KEY + "\n"}},
    )

    assert result.config is not None
    assert wire_config(result.config)["endpoints"][0]["apiKey"]["value"] == KEY


def test_config_repr_and_version_never_contain_the_key() -> None:
    result = compile_([endpoint("gpt")], [policy("p", route("chat", "gpt"))])

    assert result.config is not None
    assert KEY not in repr(result.config)
    assert KEY not in result.config.model_dump_json()
    assert KEY not in (result.version or "")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"provider": "openai"}, "spec.model: Field required"),
        ({"provider": "cohere", "model": "m", "baseURL": "https://x"}, "spec.provider: Input"),
        (
            {"provider": "openai", "model": "m"},
            "exactly one of spec.baseURL, spec.serviceRef or spec.template",
        ),
        (
            {"provider": "openai", "model": "m", "baseURL": "ftp://x"},
            "spec.baseURL: String should match pattern",
        ),
        (
            {"provider": "openai", "model": "m", "baseURL": "https://x", "colour": "red"},
            "spec.colour: Extra inputs are not permitted",
        ),
        (
            {
                "provider": "openai",
                "model": "m",
                "baseURL": "https://x",
                "pricing": {"inputPerMTok": -1},
            },
            "spec.pricing.inputPerMTok: Input should be greater than or equal to 0",
        ),
    ],
)
def test_invalid_endpoint_specs(spec: dict[str, Any], expected: str) -> None:
    result = compile_([Resource("bad", spec)], [])

    verdict = result.verdict("ModelEndpoint", "bad")
    assert not verdict.ready
    assert verdict.reason == INVALID_SPEC
    assert expected in verdict.message


def test_a_bedrock_endpoint_on_the_pods_own_aws_role_needs_no_secret() -> None:
    bedrock = endpoint(
        "claude",
        provider="bedrock",
        model="eu.anthropic.claude-sonnet-4-20250514-v1:0",
        baseURL="https://bedrock-runtime.eu-central-1.amazonaws.com",
        region="eu-central-1",
        credentials=None,
        options={"credentialSource": "webIdentity", "countTokensModel": "anthropic.claude-x"},
    )
    result = compile_([bedrock], [policy("p", route("chat", "claude"))], secrets={})

    assert result.verdict("ModelEndpoint", "claude").ready
    assert result.config is not None
    shipped = parse_config(wire_config(result.config)).endpoint("claude")
    assert shipped.api_key is None
    assert shipped.options["credentialSource"] == "webIdentity"
    assert shipped.options["countTokensModel"] == "anthropic.claude-x"

    wrong = endpoint(
        "claude",
        provider="bedrock",
        baseURL="https://bedrock-runtime.eu-central-1.amazonaws.com",
        credentials=None,
        options={"credentialSource": "instanceMetadata"},
    )
    verdict = compile_([wrong], [policy("p", route("chat", "claude"))], secrets={}).verdict(
        "ModelEndpoint", "claude"
    )
    assert verdict.reason == ENDPOINT_INVALID
    assert "credentialSource" in verdict.message


def test_options_the_sidecar_rejects_are_reported_on_the_endpoint() -> None:
    result = compile_(
        [endpoint("gpt", options={"noSuchOption": True})],
        [policy("p", route("chat", "gpt"))],
    )

    verdict = result.verdict("ModelEndpoint", "gpt")
    assert verdict.reason == ENDPOINT_INVALID
    assert "noSuchOption" in verdict.message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "spec.models: Field required"),
        ({"models": []}, "spec.models: List should have at least 1 item"),
        ({"models": [{"name": "chat", "targets": []}]}, "spec.models.0.targets: List should"),
        (
            {"models": [{"name": "chat", "targets": [{"endpoint": "gpt"}], "strategy": "random"}]},
            "spec.models.0.strategy: Input should be",
        ),
        (
            {"models": [route("chat", "gpt")], "retry": {"maxAttempts": 0}},
            "spec.retry.maxAttempts: Input should be greater than or equal to 1",
        ),
        (
            {"models": [route("chat", "gpt")], "cache": {"coalesceMaxWaiters": 0}},
            "spec.cache.coalesceMaxWaiters: Input should be greater than or equal to 1",
        ),
        (
            {"models": [route("chat", "gpt")], "cache": {"coalesce": "sometimes"}},
            "spec.cache.coalesce: Input should be a valid boolean",
        ),
        (
            {"models": [route("chat", "gpt")], "cache": {"maxEntryBytes": 100}},
            "spec.cache.maxEntryBytes: Input should be greater than or equal to 256",
        ),
    ],
)
def test_invalid_policy_specs(spec: dict[str, Any], expected: str) -> None:
    result = compile_([endpoint("gpt")], [Resource("bad", spec)])

    verdict = result.verdict("RoutingPolicy", "bad")
    assert verdict.reason == INVALID_SPEC
    assert expected in verdict.message
    assert result.config is None


def test_an_invalid_policy_does_not_take_down_a_valid_one() -> None:
    result = compile_(
        [endpoint("gpt")],
        [Resource("bad", {"models": []}), policy("good", route("chat", "gpt"))],
    )

    assert result.config is not None
    assert [m.name for m in result.config.models] == ["chat"]
    assert result.verdict("RoutingPolicy", "good").ready


def test_the_older_policy_wins_an_alias_conflict() -> None:
    result = compile_(
        [endpoint("a"), endpoint("b")],
        [
            policy("young", route("chat", "b"), created="2026-01-02T00:00:00Z"),
            policy("old", route("chat", "a"), created="2026-01-01T00:00:00Z"),
        ],
    )

    assert result.config is not None
    assert chain(result) == ["a"]
    young = result.verdict("RoutingPolicy", "young")
    assert young.message == ("model 'chat' is already defined by RoutingPolicy 'old' (older wins)")
    assert result.verdict("RoutingPolicy", "old").ready
    assert result.verdict("ModelEndpoint", "b").message == (
        "valid, but no RoutingPolicy routes to it"
    )


def test_only_endpoints_in_use_are_shipped_with_their_credentials() -> None:
    result = compile_([endpoint("used"), endpoint("idle")], [policy("p", route("chat", "used"))])

    assert result.config is not None
    assert [e.name for e in result.config.endpoints] == ["used"]
    assert not result.verdict("ModelEndpoint", "idle").in_config
    assert result.verdict("ModelEndpoint", "idle").ready


ONPREM_ONLY = {
    "defaultClass": "public",
    "classes": [{"name": "public"}, {"name": "pii", "allowedTags": ["on-prem"]}],
    "detectors": {"email": "pii"},
}


def test_rules_compile_in_policy_order_and_stay_within_their_policy() -> None:
    rules = [
        {
            "name": "pii-on-prem",
            "match": {"dataClasses": ["pii"]},
            "targets": [{"endpoint": "llama"}],
        },
        {
            "name": "ab",
            "match": {"headers": {"X-Team": ["ml"]}, "complexity": {"min": 0.5}},
            "strategy": "weighted",
            "targets": [{"endpoint": "gpt", "weight": 90}, {"endpoint": "llama", "weight": 10}],
            "options": {"stickyHeaders": ["x-user"]},
        },
    ]
    result = compile_(
        [endpoint("gpt"), endpoint("llama", compliance=["on-prem"])],
        [
            policy(
                "p",
                route("chat", "gpt"),
                rules=rules,
                sensitivity=ONPREM_ONLY,
                created="2026-01-01T00:00:00Z",
            ),
            policy("q", route("other", "gpt"), created="2026-01-02T00:00:00Z"),
        ],
    )

    assert result.config is not None
    assert [r.name for r in result.config.rules] == ["pii-on-prem", "ab"]
    first, second = result.config.rules
    # A rule without match.models routes only the models of its own policy.
    assert first.match.models == ("chat",)
    assert first.match.data_classes == ("pii",)
    assert second.strategy.value == "weighted"
    assert [(t.endpoint, t.weight) for t in second.targets] == [("gpt", 90), ("llama", 10)]
    assert second.match.headers == {"x-team": ("ml",)}
    assert second.match.complexity is not None and second.match.complexity.min == 0.5
    assert second.options.sticky_headers == ("x-user",)
    assert result.config.sensitivity.data_class("pii") is not None
    assert result.verdict("RoutingPolicy", "p").ready


def test_model_strategies_and_targets_map_onto_the_alias() -> None:
    result = compile_(
        [endpoint("small"), endpoint("big")],
        [
            policy(
                "p",
                {
                    "name": "auto",
                    "strategy": "complexity-tiers",
                    "targets": [
                        {"endpoint": "small", "tier": "cheap"},
                        {"endpoint": "big", "tier": "premium"},
                    ],
                    "options": {"tiers": {"standard": 0.3, "premium": 0.6}},
                },
            )
        ],
    )

    assert result.config is not None
    alias = result.config.models[0]
    assert alias.strategy.value == "complexity-tiers"
    assert [(t.endpoint, t.tier and t.tier.value) for t in alias.targets] == [
        ("small", "cheap"),
        ("big", "premium"),
    ]
    assert alias.options.tiers.premium == 0.6


def test_a_rule_no_endpoint_can_satisfy_is_an_error() -> None:
    rules = [{"name": "pii", "match": {"dataClasses": ["pii"]}, "targets": [{"endpoint": "gpt"}]}]
    result = compile_(
        [endpoint("gpt", compliance=["gdpr"])],
        [policy("p", route("chat", "gpt"), rules=rules, sensitivity=ONPREM_ONLY)],
    )

    verdict = result.verdict("RoutingPolicy", "p")
    assert not verdict.ready
    assert verdict.message == (
        "rule 'pii': no endpoint can satisfy it: data class 'pii' may only go to endpoints "
        "tagged on-prem, and none of gpt is"
    )
    assert result.config is not None  # the aliases still route
    assert result.config.rules == ()


def test_a_rule_whose_prompt_fits_no_context_window_is_an_error() -> None:
    rules = [{"name": "long", "match": {"tokens": {"min": 200000}}, "targets": ["small"]}]
    rules[0]["targets"] = [{"endpoint": "small"}]
    result = compile_(
        [endpoint("small", contextWindow=8192)],
        [policy("p", route("chat", "small"), rules=rules)],
    )

    assert result.verdict("RoutingPolicy", "p").message == (
        "rule 'long': no endpoint can satisfy it: requests of at least 200000 tokens exceed "
        "the context window of every target (small)"
    )


def test_a_rule_naming_unknown_models_classes_or_endpoints_is_an_error() -> None:
    rules = [
        {"name": "r1", "match": {"models": ["nope"]}, "targets": [{"endpoint": "gpt"}]},
        {"name": "r2", "match": {"dataClasses": ["top-secret"]}, "targets": [{"endpoint": "gpt"}]},
        {"name": "r3", "targets": [{"endpoint": "ghost"}]},
    ]
    result = compile_([endpoint("gpt")], [policy("p", route("chat", "gpt"), rules=rules)])

    assert result.verdict("RoutingPolicy", "p").message.split("; ") == [
        "rule 'r1': match.models names nope, not a model of this policy (models: chat)",
        "rule 'r2': match.dataClasses names top-secret, not a data class of the namespace "
        "(classes: pii, public, secret)",
        "rule 'r3': ModelEndpoint 'ghost' not found",
        "rule 'r3': no usable target, so no endpoint can serve it",
    ]
    assert result.config is not None
    assert result.config.rules == ()


def test_rule_names_and_sensitivity_conflicts_resolve_to_the_older_policy() -> None:
    rule = {"name": "same", "targets": [{"endpoint": "gpt"}]}
    result = compile_(
        [endpoint("gpt")],
        [
            policy(
                "old",
                route("a", "gpt"),
                rules=[rule],
                sensitivity=ONPREM_ONLY,
                created="2026-01-01T00:00:00Z",
            ),
            policy(
                "new",
                route("b", "gpt"),
                rules=[rule],
                sensitivity=ONPREM_ONLY,
                created="2026-01-02T00:00:00Z",
            ),
        ],
    )

    assert result.verdict("RoutingPolicy", "new").message == (
        "spec.sensitivity is already set by RoutingPolicy 'old' (older wins); "
        "rule 'same' is already defined by RoutingPolicy 'old' (older wins)"
    )
    assert result.config is not None
    assert [m.name for m in result.config.models] == ["a", "b"]


def test_invalid_sensitivity_is_reported() -> None:
    bad = {"defaultClass": "nope", "classes": [{"name": "public"}]}
    result = compile_([endpoint("gpt")], [policy("p", route("chat", "gpt"), sensitivity=bad)])

    assert "spec.sensitivity: " in result.verdict("RoutingPolicy", "p").message
    assert "defaultClass 'nope' is not one of the classes" in (
        result.verdict("RoutingPolicy", "p").message
    )


def test_fields_without_a_sidecar_counterpart_are_named_in_the_ready_message() -> None:
    result = compile_(
        [endpoint("gpt", limits={"requestsPerMinute": 60})],
        [
            policy(
                "p",
                route("chat", "gpt"),
                default={"targets": [{"endpoint": "gpt"}]},
                cache={"enabled": True},
                podSelector={"matchLabels": {"app": "x"}},
            )
        ],
    )

    verdict = result.verdict("RoutingPolicy", "p")
    assert verdict.ready
    assert verdict.message == (
        "not applied by this sidecar version: default route; "
        "podSelector (every sidecar in the namespace gets this policy)"
    )
    assert result.config is not None
    assert result.config.endpoint("gpt").limits.requests_per_minute == 60


def test_cache_and_lanes_compile_into_the_sidecar_config() -> None:
    cache = {
        "enabled": True,
        "ttlSeconds": 600,
        "maxEntries": 5000,
        "deterministicOnly": False,
        "staleOnError": True,
        "staleSeconds": 3600,
        "coalesce": False,
        "coalesceMaxWaiters": 8,
        "maxEntryBytes": 4096,
    }
    batch_rule = {
        "name": "nightly",
        "match": {"metadata": {"job": ["nightly"]}},
        "targets": [{"endpoint": "gpt"}],
        "lane": "batch",
    }
    result = compile_(
        [endpoint("gpt"), endpoint("llama")],
        [
            policy(
                "critical",
                route("chat", "gpt"),
                cache=cache,
                rules=[batch_rule],
                created="2026-01-01T00:00:00Z",
            ),
            policy(
                "offline",
                {**route("bulk", "llama"), "lane": "batch"},
                cache={"enabled": True, "maxEntries": 200},
                created="2026-01-02T00:00:00Z",
            ),
            policy("plain", route("other", "gpt"), created="2026-01-03T00:00:00Z"),
        ],
    )

    assert result.verdict("RoutingPolicy", "critical").message == ""
    config = result.config
    assert config is not None
    models = {m.name: m for m in config.models}
    assert models["chat"].cache == rc.CachePolicy(
        enabled=True,
        ttl_seconds=600,
        deterministic_only=False,
        stale_on_error=True,
        stale_seconds=3600,
        coalesce=False,
        coalesce_max_waiters=8,
        max_entry_bytes=4096,
    )
    assert models["chat"].lane is None
    assert models["bulk"].lane is rc.LaneName.BATCH and models["bulk"].cache.enabled
    # Unset: the sidecar's defaults (coalescing on, 64 waiters per flight).
    assert models["bulk"].cache.coalesce and models["bulk"].cache.coalesce_max_waiters == 64
    # Unset: the sidecar's default largest answer (1 MiB).
    assert models["bulk"].cache.max_entry_bytes == rc.CachePolicy().max_entry_bytes
    shipped = {m.name: m.cache for m in parse_config(wire_config(config)).models}
    assert shipped["chat"].coalesce_max_waiters == 8
    assert shipped["chat"].max_entry_bytes == 4096
    assert not models["other"].cache.enabled
    (rule,) = config.rules
    assert rule.lane is rc.LaneName.BATCH and rule.cache is None
    assert config.cache.max_entries == 5000


def test_budgets_validate_their_references() -> None:
    budgets = [
        Resource("ok", {"period": "monthly", "limitUSD": 100, "scope": {"policies": ["p"]}}),
        Resource(
            "broken",
            {"period": "daily", "limitUSD": 5, "scope": {"endpoints": ["ghost"]}},
        ),
        Resource("invalid", {"period": "yearly", "limitUSD": 0}),
    ]
    result = compile_([endpoint("gpt")], [policy("p", route("chat", "gpt"))], budgets)

    assert result.verdict("Budget", "ok").ready
    assert [b.endpoints for b in result.budgets] == [("gpt",)]
    broken = result.verdict("Budget", "broken")
    assert broken.reason == INVALID_REFERENCES
    assert broken.message == "scope.endpoints: ModelEndpoint 'ghost' not found"
    invalid = result.verdict("Budget", "invalid")
    assert invalid.reason == INVALID_SPEC
    assert "spec.period" in invalid.message
    assert "spec.limitUSD" in invalid.message


@pytest.mark.parametrize(
    ("spent", "mode", "tier"),
    [
        (None, "normal", None),
        (10, "normal", None),
        (75, "downgrade", "standard"),
        (92, "downgrade", "cheap"),
        (100, "stop", None),
    ],
)
def test_the_strongest_budget_threshold_passed_sets_the_mode(
    spent: float | None, mode: str, tier: str | None
) -> None:
    thresholds = [
        {"percent": 50, "action": "alert"},
        {"percent": 70, "action": "downgrade", "tier": "standard"},
        {"percent": 90, "action": "downgrade", "tier": "cheap"},
        {"percent": 100, "action": "block"},
    ]
    status = {} if spent is None else {"spentUSD": spent}
    budget = Resource(
        "b", {"period": "daily", "limitUSD": 100, "thresholds": thresholds}, status=status
    )
    result = compile_([endpoint("gpt")], [policy("p", route("chat", "gpt"))], [budget])

    assert result.config is not None
    (shipped,) = result.config.budgets
    assert (shipped.name, shipped.mode.value, shipped.tier) == ("b", mode, tier)
    assert shipped.enforce and shipped.endpoints == ()
    assert result.config.budget.mode.value == "normal"


def test_budgets_scope_by_tags_and_ship_only_what_is_routed() -> None:
    onprem = endpoint("local", compliance=["on-prem"])
    budgets = [
        Resource("tagged", {"period": "weekly", "limitUSD": 5, "scope": {"tags": ["on-prem"]}}),
        Resource("nothing", {"period": "weekly", "limitUSD": 5, "scope": {"tags": ["gdpr"]}}),
        Resource("bad-zone", {"period": "daily", "limitUSD": 5, "timezone": "Mars/Olympus"}),
    ]
    result = compile_(
        [endpoint("gpt"), onprem], [policy("p", route("chat", "gpt", "local"))], budgets
    )

    assert result.config is not None
    assert [(b.name, b.endpoints, b.enforce) for b in result.config.budgets] == [
        ("tagged", ("local",), False)
    ]
    assert "matches no endpoint" in result.verdict("Budget", "nothing").message
    bad = result.verdict("Budget", "bad-zone")
    assert (bad.ready, bad.reason) == (False, INVALID_SPEC)
    assert "Mars/Olympus" in bad.message


def test_an_empty_namespace_compiles_to_nothing() -> None:
    result = compile_([], [])

    assert result.config is None
    assert result.version is None
    assert result.verdicts == {}


def test_every_verdict_carries_the_generation() -> None:
    res = Resource("gpt", endpoint("gpt").spec, generation=7)
    result = compile_([res], [])

    assert result.verdict("ModelEndpoint", "gpt").generation == 7
    assert result.verdict("ModelEndpoint", "gpt").reason == COMPILED


def test_secret_bodies_decode_data_and_string_data() -> None:
    body = {
        "data": {"a": base64.b64encode(b"one").decode(), "bad": "%%%"},
        "stringData": {"b": "two"},
    }

    assert decode_secret(body) == {"a": "one", "b": "two"}


def test_resources_read_from_api_bodies() -> None:
    body = {
        "metadata": {"name": "x", "generation": 3, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"a": 1},
    }

    assert Resource.from_body(body) == Resource("x", {"a": 1}, 3, "2026-01-01T00:00:00Z")
