"""The cache key: one key for the same question however it is spelt, another for anything else."""

from __future__ import annotations

from typing import Any

import pytest
from harness import chain_config, endpoint

from modelplane_sidecar.cache.key import (
    cache_key,
    canonical_body,
    deterministic,
    policy_version,
    tenant_of,
)
from modelplane_sidecar.config import parse_config

BASE: dict[str, Any] = {
    "model": "chat",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the boiling point of water?"},
    ],
    "temperature": 0,
    "max_tokens": 50,
}


def key(body: dict[str, Any], **overrides: str) -> str:
    where = {"tenant": "ns:a", "version": "v1", "op": "chat", "alias": "chat", "route": "r"}
    where.update(overrides)
    return cache_key(
        where["tenant"], where["version"], where["op"], where["alias"], where["route"], body
    )


@pytest.mark.parametrize(
    "variant",
    [
        # Field order, at the top level and inside messages.
        {
            "max_tokens": 50,
            "temperature": 0,
            "messages": [
                {"content": "Be brief.", "role": "system"},
                {"content": "What is the boiling point of water?", "role": "user"},
            ],
            "model": "chat",
        },
        # Defaults spelt out, nulls, and integer vs float.
        {
            **BASE,
            "temperature": 0.0,
            "top_p": 1,
            "n": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "stop": None,
            "logprobs": False,
            "response_format": {"type": "text"},
            "seed": None,
        },
        # Fields that do not change the answer.
        {**BASE, "stream": True, "stream_options": {"include_usage": True}},
        {**BASE, "user": "u-1", "metadata": {"team": "x"}, "store": False},
        # Chat's two spellings of the output limit.
        {**{k: v for k, v in BASE.items() if k != "max_tokens"}, "max_completion_tokens": 50},
        # A one-part text content list is the plain string.
        {
            **BASE,
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "What is the boiling point of water?", "name": None},
            ],
        },
        # No tools: tool_choice "none" is the default; empty lists are no lists.
        {**BASE, "tool_choice": "none", "tools": []},
    ],
)
def test_same_request_however_spelt_has_one_key(variant: dict[str, Any]) -> None:
    assert key(variant) == key(BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.2},
        {"top_p": 0.5},
        {"max_tokens": 51},
        {"stop": ["\n"]},
        {"seed": 7},
        {"n": 2},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"messages": [{"role": "user", "content": "What is the boiling point of water?"}]},
        {"messages": [*BASE["messages"][:1], {"role": "user", "content": "Freezing point?"}]},
    ],
)
def test_any_change_of_meaning_changes_the_key(change: dict[str, Any]) -> None:
    assert key({**BASE, **change}) != key(BASE)


def test_tool_choice_auto_is_the_default_only_with_tools() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert key({**BASE, "tools": tools, "tool_choice": "auto"}) == key({**BASE, "tools": tools})
    assert key({**BASE, "tools": tools, "tool_choice": "required"}) != key({**BASE, "tools": tools})


@pytest.mark.parametrize("where", ["tenant", "version", "op", "alias", "route"])
def test_tenant_policy_operation_alias_and_route_are_part_of_the_key(where: str) -> None:
    assert key(BASE, **{where: "other"}) != key(BASE)


def test_canonical_body_leaves_the_request_alone() -> None:
    body = {**BASE, "stream": True, "top_p": 1}
    before = repr(body)
    canonical_body(body)
    assert repr(body) == before


@pytest.mark.parametrize(
    ("op", "body", "expected"),
    [
        ("chat", {"temperature": 0}, True),
        ("chat", {"temperature": 0.0}, True),
        ("chat", {}, False),
        ("chat", {"temperature": 0.7}, False),
        ("chat", {"temperature": False}, False),
        ("completions", {"temperature": 0}, True),
        ("embeddings", {}, True),
    ],
)
def test_deterministic(op: str, body: dict[str, Any], expected: bool) -> None:
    assert deterministic(op, body) is expected


def _config(**changes: Any) -> Any:
    raw = chain_config(
        [
            endpoint("a", "http://127.0.0.1:9/v1", apiKey={"value": "k1"}),
            endpoint("b", "http://127.0.0.1:9/v1"),
        ]
    )
    raw["metadata"] = {"name": "team", "namespace": "team-a"}
    for path, value in changes.items():
        target = raw
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return parse_config(raw)


def test_policy_version_ignores_credentials_prices_budgets_and_cache_settings() -> None:
    base = policy_version(_config())
    assert policy_version(_config(**{"endpoints.0.apiKey": {"value": "rotated"}})) == base
    assert policy_version(_config(**{"endpoints.0.pricing": {"inputPerMtok": 9}})) == base
    assert policy_version(_config(budget={"mode": "downgrade"})) == base
    assert policy_version(_config(**{"models.0.cache": {"enabled": True}})) == base
    assert policy_version(_config(**{"models.0.retry": {"maxAttempts": 1}})) == base


def test_policy_version_follows_routes_and_upstream_models() -> None:
    base = policy_version(_config())
    assert policy_version(_config(**{"endpoints.0.model": "gpt-x"})) != base
    assert policy_version(_config(**{"models.0.endpoints": ["b", "a"]})) != base
    assert policy_version(_config(sensitivity={"defaultClass": "pii"})) != base


def test_tenant_is_the_namespace_or_the_standalone_config() -> None:
    assert tenant_of(_config()) == "ns:team-a"
    assert tenant_of(_config(metadata={"name": "solo"})) == "config:solo"
