"""RoutingPolicy spec.sidecar: server, cache store (Redis with its password Secret) and lanes,
compiled into the namespace's RouterConfig; merging over policies, conflicts, broken references."""

from __future__ import annotations

from typing import Any

import pytest

from modelplane_operator.compile import (
    COMPILED,
    INVALID_REFERENCES,
    INVALID_SPEC,
    NOTHING_ROUTABLE,
    SETTINGS_CONFLICT,
    CompiledNamespace,
    NamespaceInputs,
    Resource,
    compile_namespace,
    secret_names,
    wire_config,
)
from modelplane_operator.controller import conflicted_condition
from modelplane_sidecar import config as rc
from modelplane_sidecar.config import parse_config

NS = "team-a"
KEY = "sk-test-secret-value-123"
REDIS_PASSWORD = "redis-pass-never-shown-42"
OLD, NEW = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"

EVERYTHING: dict[str, Any] = {
    "server": {"maxBodyBytes": 2 * 1024 * 1024},
    "cache": {
        "maxBytes": 8 * 1024 * 1024,
        "maxEntries": 500,
        "redis": {
            "url": "redis://redis.cache.svc:6379/2",
            "passwordSecretRef": {"name": "redis", "key": "password"},
            "keyPrefix": "team-a:",
            "timeoutSeconds": 0.05,
            "retrySeconds": 10,
        },
    },
    "lanes": {
        "header": "X-Lane",
        "realtime": {"maxConcurrency": 64, "maxQueue": 16, "maxWaitSeconds": 5},
        "batch": {
            "maxConcurrency": 0,
            "maxQueue": 1000,
            "maxWaitSeconds": 600,
            "endpointShare": 0.25,
            "cheapestFirst": False,
            "batchApiEndpoint": "batch-api",
        },
    },
}


def endpoint(name: str, provider: str = "openai", secret: str | None = "openai") -> Resource:
    spec: dict[str, Any] = {"provider": provider, "model": "m", "baseURL": "https://x.test/v1"}
    if secret is not None:
        spec["credentials"] = {"secretRef": {"name": secret, "key": "api-key"}}
    return Resource(name, spec)


def policy(
    name: str, sidecar: dict[str, Any] | None, created: str = OLD, model: str = "", **spec: Any
) -> Resource:
    body: dict[str, Any] = {
        "models": [{"name": model or f"{name}-chat", "targets": [{"endpoint": "gpt"}]}],
        **spec,
    }
    if sidecar is not None:
        body["sidecar"] = sidecar
    return Resource(name, body, created=created)


def secrets(**extra: dict[str, str]) -> dict[str, dict[str, str]]:
    return {"openai": {"api-key": KEY}, "redis": {"password": REDIS_PASSWORD + "\n"}, **extra}


def compile_(
    *policies: Resource,
    endpoints: list[Resource] | None = None,
    given: dict[str, dict[str, str]] | None = None,
) -> CompiledNamespace:
    eps = endpoints if endpoints is not None else [endpoint("gpt"), endpoint("batch-api")]
    return compile_namespace(
        NamespaceInputs(NS, eps, list(policies), (), secrets() if given is None else given)
    )


def config_of(result: CompiledNamespace) -> rc.RouterConfig:
    assert result.config is not None
    return result.config


def test_every_setting_reaches_the_router_config() -> None:
    result = compile_(policy("p", EVERYTHING))

    verdict = result.verdict("RoutingPolicy", "p")
    assert (verdict.ready, verdict.reason, verdict.message, verdict.conflict) == (
        True,
        COMPILED,
        "",
        "",
    )
    config = config_of(result)
    assert config.server == rc.ServerSettings(max_body_bytes=2 * 1024 * 1024)
    assert config.cache.max_bytes == 8 * 1024 * 1024
    assert config.cache.max_entries == 500
    redis = config.cache.redis
    assert redis is not None
    assert (redis.url, redis.key_prefix, redis.timeout_seconds, redis.retry_seconds) == (
        "redis://redis.cache.svc:6379/2",
        "team-a:",
        0.05,
        10.0,
    )
    assert redis.password is not None and redis.password.resolve() == REDIS_PASSWORD
    assert config.lanes == rc.Lanes(
        header="x-lane",
        realtime=rc.LaneSettings(max_concurrency=64, max_queue=16, max_wait_seconds=5),
        batch=rc.BatchLaneSettings(
            max_concurrency=None,  # 0 in the CRD: no limit of its own
            max_queue=1000,
            max_wait_seconds=600,
            endpoint_share=0.25,
            cheapest_first=False,
            batch_api_endpoint="batch-api",
        ),
    )


def test_the_wire_form_carries_the_redis_password_and_round_trips() -> None:
    result = compile_(policy("p", EVERYTHING))
    config = config_of(result)

    wire = wire_config(config)
    assert wire["cache"]["redis"]["password"] == {"value": REDIS_PASSWORD}
    shipped = parse_config(wire)
    assert shipped.cache.redis is not None and shipped.cache.redis.password is not None
    assert shipped.cache.redis.password.resolve() == REDIS_PASSWORD
    assert shipped.endpoint("gpt").api_key is not None
    assert shipped.endpoint("gpt").api_key.resolve() == KEY
    assert shipped.version() == result.version == config.content_hash()
    # Only the wire form reveals it: every other rendering masks it.
    assert REDIS_PASSWORD not in repr(config)
    assert REDIS_PASSWORD not in str(config.model_dump(mode="json"))
    for verdict in result.verdicts.values():
        assert REDIS_PASSWORD not in verdict.message


def test_rotating_the_redis_password_changes_the_version() -> None:
    def version(password: str) -> str | None:
        given = secrets(redis={"password": password})
        return compile_(policy("p", EVERYTHING), given=given).version

    assert version("one") == version("one")
    assert version("one") != version("two")


def test_unset_settings_keep_the_sidecar_defaults() -> None:
    config = config_of(compile_(policy("p", None)))

    assert config.server == rc.ServerSettings()
    assert config.cache == rc.CacheStore()
    assert config.lanes == rc.Lanes()
    assert [e.name for e in config.endpoints] == ["gpt"]  # batch-api is shipped only when named


def test_the_store_size_falls_back_to_the_largest_caching_policy() -> None:
    caching = {"enabled": True, "maxEntries": 300}
    derived = compile_(policy("p", {"cache": {"maxBytes": 4096}}, cache=caching))
    assert config_of(derived).cache == rc.CacheStore(max_bytes=4096, max_entries=300)

    explicit = compile_(policy("p", {"cache": {"maxEntries": 50}}, cache=caching))
    assert config_of(explicit).cache.max_entries == 50


def test_a_batch_api_endpoint_no_route_uses_is_shipped_with_its_key() -> None:
    result = compile_(policy("p", {"lanes": {"batch": {"batchApiEndpoint": "batch-api"}}}))

    config = config_of(result)
    assert [e.name for e in config.endpoints] == ["batch-api", "gpt"]
    assert wire_config(config)["endpoints"][0]["apiKey"]["value"] == KEY
    batch = result.verdict("ModelEndpoint", "batch-api")
    assert batch.ready and batch.in_config and batch.message == ""


def test_policies_share_the_settings_they_set_alike_or_apart() -> None:
    result = compile_(
        policy("a", {"server": {"maxBodyBytes": 4096}, "lanes": {"batch": {"maxQueue": 9}}}),
        policy(
            "b",
            {"server": {"maxBodyBytes": 4096}, "lanes": {"realtime": {"maxConcurrency": 3}}},
            created=NEW,
        ),
    )

    config = config_of(result)
    assert config.server.max_body_bytes == 4096
    assert config.lanes.batch.max_queue == 9
    assert config.lanes.realtime.max_concurrency == 3
    for name in ("a", "b"):
        verdict = result.verdict("RoutingPolicy", name)
        assert verdict.ready and verdict.conflict == ""
        assert conflicted_condition(verdict) == (
            "False",
            "NoConflicts",
            "no other RoutingPolicy sets spec.sidecar fields differently",
        )


def test_a_conflict_goes_to_the_older_policy_and_both_say_so() -> None:
    result = compile_(
        policy("young", {"server": {"maxBodyBytes": 2048}, "lanes": {"header": "x-b"}}, NEW),
        policy("old", {"server": {"maxBodyBytes": 4096}, "lanes": {"header": "x-b"}}, OLD),
    )

    assert config_of(result).server.max_body_bytes == 4096
    young, old = result.verdict("RoutingPolicy", "young"), result.verdict("RoutingPolicy", "old")
    lost = (
        "spec.sidecar.server.maxBodyBytes is 2048 here but 4096 in RoutingPolicy 'old', whose "
        "value applies (the older policy wins, the first by name when created together)"
    )
    won = (
        "spec.sidecar.server.maxBodyBytes is 4096 here but 2048 in RoutingPolicy 'young'; this "
        "policy's value applies (the older policy wins, the first by name when created together)"
    )
    assert (young.ready, young.reason, young.message, young.in_config) == (
        False,
        SETTINGS_CONFLICT,
        lost,
        True,
    )
    assert young.conflict == lost
    assert (old.ready, old.reason, old.conflict) == (True, COMPILED, won)
    assert conflicted_condition(old) == ("True", "SidecarSettings", won)
    assert conflicted_condition(young) == ("True", "SidecarSettings", lost)
    # Its models still route: only the overruled setting is not applied.
    assert {m.name for m in config_of(result).models} == {"young-chat", "old-chat"}


def test_policies_created_together_are_ordered_by_name() -> None:
    result = compile_(
        policy("b", {"lanes": {"batch": {"endpointShare": 0.75}}}),
        policy("a", {"lanes": {"batch": {"endpointShare": 0.5}}}),
    )

    assert config_of(result).lanes.batch.endpoint_share == 0.5
    assert result.verdict("RoutingPolicy", "a").ready
    assert result.verdict("RoutingPolicy", "b").reason == SETTINGS_CONFLICT


def test_redis_is_one_unit_and_conflicts_name_both_values() -> None:
    mine = {"url": "redis://one:6379/0"}
    theirs = {"url": "redis://two:6379/0", "keyPrefix": "x:"}
    result = compile_(
        policy("old", {"cache": {"redis": mine}}),
        policy("new", {"cache": {"redis": theirs, "maxBytes": 4096}}, NEW),
    )

    redis = config_of(result).cache.redis
    assert redis is not None and redis.url == "redis://one:6379/0"
    assert redis.key_prefix == "modelplane:cache:"  # never mixed with the other policy's
    assert redis.password is None
    assert config_of(result).cache.max_bytes == 4096
    assert result.verdict("RoutingPolicy", "new").message == (
        'spec.sidecar.cache.redis is {"keyPrefix":"x:","url":"redis://two:6379/0"} here but '
        '{"url":"redis://one:6379/0"} in RoutingPolicy \'old\', whose value applies (the older '
        "policy wins, the first by name when created together)"
    )


def test_a_loser_with_other_problems_keeps_their_reason() -> None:
    result = compile_(
        policy("old", {"server": {"maxBodyBytes": 4096}}),
        Resource(
            "new",
            {
                "models": [{"name": "chat", "targets": [{"endpoint": "gpt"}, {"endpoint": "x"}]}],
                "sidecar": {"server": {"maxBodyBytes": 8192}},
            },
            created=NEW,
        ),
    )

    new = result.verdict("RoutingPolicy", "new")
    assert new.reason == INVALID_REFERENCES
    assert new.message.startswith("model 'chat': ModelEndpoint 'x' not found; ")
    assert new.message.endswith("the first by name when created together)")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            {"openai": {"api-key": KEY}},
            "spec.sidecar.cache.redis: Secret 'redis' "
            "(spec.sidecar.cache.redis.passwordSecretRef) not found in namespace 'team-a'; "
            "this policy's Redis settings are not applied",
        ),
        (
            {"openai": {"api-key": KEY}, "redis": {"pass": REDIS_PASSWORD}},
            "spec.sidecar.cache.redis: Secret 'redis' has no key 'password' (keys: pass); "
            "this policy's Redis settings are not applied",
        ),
        (
            {"openai": {"api-key": KEY}, "redis": {"password": " \n"}},
            "spec.sidecar.cache.redis: Secret 'redis' key 'password' is empty; "
            "this policy's Redis settings are not applied",
        ),
    ],
)
def test_a_redis_password_secret_that_is_missing_drops_redis_only(
    given: dict[str, dict[str, str]], expected: str
) -> None:
    result = compile_(policy("p", EVERYTHING), given=given)

    verdict = result.verdict("RoutingPolicy", "p")
    assert (verdict.ready, verdict.reason, verdict.message) == (False, INVALID_REFERENCES, expected)
    config = config_of(result)
    assert config.cache.redis is None
    assert config.cache.max_bytes == 8 * 1024 * 1024  # the rest still applies
    assert config.lanes.batch.batch_api_endpoint == "batch-api"


def test_a_broken_redis_of_an_older_policy_leaves_the_unit_to_a_younger_one() -> None:
    result = compile_(
        policy("old", {"cache": {"redis": EVERYTHING["cache"]["redis"]}}),
        policy("new", {"cache": {"redis": {"url": "redis://fallback:6379/0"}}}, NEW),
        given={"openai": {"api-key": KEY}},
    )

    redis = config_of(result).cache.redis
    assert redis is not None and redis.url == "redis://fallback:6379/0"
    assert not result.verdict("RoutingPolicy", "old").ready
    new = result.verdict("RoutingPolicy", "new")
    assert new.ready and new.conflict == ""


def test_a_password_in_the_redis_url_is_refused_without_showing_it() -> None:
    # The CRD's CEL rule refuses it in the apiserver; the compiler checks again (no CEL, old
    # objects).
    url = f"redis://user:{REDIS_PASSWORD}@redis:6379/0"
    result = compile_(policy("p", {"cache": {"redis": {"url": url}}}))

    verdict = result.verdict("RoutingPolicy", "p")
    assert verdict.message == (
        "spec.sidecar.cache.redis.url: the Redis password goes in passwordSecretRef, never in "
        "the URL; this policy's Redis settings are not applied"
    )
    assert config_of(result).cache.redis is None


def test_a_redis_url_the_sidecar_rejects_is_reported() -> None:
    result = compile_(policy("p", {"cache": {"redis": {"url": "redis:///0"}}}))

    message = result.verdict("RoutingPolicy", "p").message
    assert message.startswith("spec.sidecar.cache.redis: url: Value error, redis url must look")
    assert config_of(result).cache.redis is None


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        (
            [endpoint("gpt")],
            "spec.sidecar.lanes.batch.batchApiEndpoint: ModelEndpoint 'batch-api' not found",
        ),
        (
            [endpoint("gpt"), endpoint("batch-api", secret="missing")],
            "spec.sidecar.lanes.batch.batchApiEndpoint: ModelEndpoint 'batch-api' is not ready "
            "(SecretNotFound)",
        ),
        (
            [endpoint("gpt"), endpoint("batch-api", provider="anthropic")],
            "spec.sidecar.lanes.batch.batchApiEndpoint: ModelEndpoint 'batch-api' has provider "
            "anthropic; the Batch API pass-through needs openai or openai-compatible",
        ),
    ],
)
def test_an_unusable_batch_api_endpoint_is_dropped_with_the_reason(
    endpoints: list[Resource], expected: str
) -> None:
    lanes = {"batch": {"batchApiEndpoint": "batch-api", "maxQueue": 5}}
    result = compile_(policy("p", {"lanes": lanes}), endpoints=endpoints)

    verdict = result.verdict("RoutingPolicy", "p")
    assert (verdict.ready, verdict.reason, verdict.message) == (False, INVALID_REFERENCES, expected)
    config = config_of(result)
    assert config.lanes.batch.batch_api_endpoint is None
    assert config.lanes.batch.max_queue == 5
    assert "batch-api" not in [e.name for e in config.endpoints]


@pytest.mark.parametrize(
    ("sidecar", "expected"),
    [
        ({"server": {"maxBodyBytes": 10}}, "spec.sidecar.server.maxBodyBytes: Input should be"),
        ({"server": {"watchConfig": False}}, "spec.sidecar.server.watchConfig: Extra inputs"),
        ({"cache": {"maxBytes": 0}}, "spec.sidecar.cache.maxBytes: Input should be"),
        ({"cache": {"redis": {"url": "http://r:1"}}}, "spec.sidecar.cache.redis.url: String"),
        ({"cache": {"redis": {"keyPrefix": "x"}}}, "spec.sidecar.cache.redis.url: Field required"),
        (
            {"cache": {"redis": {"url": "redis://r", "password": {"value": "x"}}}},
            "spec.sidecar.cache.redis.password: Extra inputs",
        ),
        ({"lanes": {"batch": {"endpointShare": 0}}}, "spec.sidecar.lanes.batch.endpointShare:"),
        ({"lanes": {"realtime": {"maxQueue": -1}}}, "spec.sidecar.lanes.realtime.maxQueue:"),
        ({"lanes": {"realtime": {"endpointShare": 1}}}, "spec.sidecar.lanes.realtime.endpoint"),
        ({"lanes": {"header": "x lane"}}, "spec.sidecar.lanes.header: String should match"),
    ],
)
def test_invalid_settings_are_spec_errors(sidecar: dict[str, Any], expected: str) -> None:
    result = compile_(policy("p", sidecar))

    verdict = result.verdict("RoutingPolicy", "p")
    assert (verdict.ready, verdict.reason) == (False, INVALID_SPEC)
    assert expected in verdict.message
    assert REDIS_PASSWORD not in verdict.message


def test_a_policy_that_routes_nothing_still_sets_the_namespace_settings() -> None:
    result = compile_(
        policy("routes", None),
        Resource(
            "settings-only",
            {
                "models": [{"name": "x", "targets": [{"endpoint": "ghost"}]}],
                "sidecar": {"server": {"maxBodyBytes": 4096}},
            },
            created=NEW,
        ),
    )

    assert config_of(result).server.max_body_bytes == 4096
    verdict = result.verdict("RoutingPolicy", "settings-only")
    assert verdict.reason == NOTHING_ROUTABLE
    assert verdict.in_config  # its settings are part of the config the sidecars run


def test_secret_names_follow_both_kinds_of_reference() -> None:
    assert secret_names("RoutingPolicy", {"sidecar": EVERYTHING}) == {"redis"}
    assert secret_names("RoutingPolicy", {"sidecar": {"cache": {"redis": {"url": "r"}}}}) == set()
    assert secret_names("RoutingPolicy", {}) == set()
    ref = {"credentials": {"secretRef": {"name": "openai", "key": "k"}}}
    assert secret_names("ModelEndpoint", ref) == {"openai"}
    assert secret_names("Budget", {"sidecar": EVERYTHING}) == set()
