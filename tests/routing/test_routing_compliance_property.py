"""Property: a sensitive request never reaches a non-compliant endpoint.

Not just `decide()`: every example goes through the real sidecar over sockets, with the real
Forwarder retrying, falling back and tripping breakers against stand-in upstreams that fail in
scripted ways (5xx, 429 with and without Retry-After, connection resets, client errors). Hypothesis
draws the endpoints' tags, the chain order, the strategy, the retry policy, the failure scripts,
streaming, and whether the prompt carries personal data or a secret, or is declared sensitive.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from harness import Router, Upstreams, http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelplane_sidecar.config import parse_config
from modelplane_sidecar.standins.openai import Behaviour, OpenAIStandIn

NAMES = ("e0", "e1", "e2", "e3")
TAG_SETS = ((), ("cloud",), ("on-prem",), ("gdpr",), ("on-prem", "gdpr"))
SENSITIVITY = {
    "classes": [
        {"name": "public"},
        {"name": "pii", "allowedTags": ["on-prem", "gdpr"]},
        {"name": "secret", "allowedTags": ["on-prem"]},
    ]
}
PROMPTS = {
    "plain": ("What is a Kubernetes Pod?", None, set()),
    "email": ("Reply to jane.doe@example.com about the invoice", None, {"pii"}),
    "card": ("Why was card 4111 1111 1111 1111 declined?", None, {"pii"}),
    "secret": ("Debug this: AWS_KEY=AKIAIOSFODNN7EXAMPLE fails", None, {"secret"}),
    "declared": ("Summarise the board minutes", "secret", {"secret"}),
}
FAILURES = st.sampled_from(
    [
        Behaviour("ok"),
        Behaviour("status", 500),
        Behaviour("status", 503),
        Behaviour("status", 429),
        Behaviour("status", 429, retry_after="60"),
        Behaviour("status", 400),
        Behaviour("reset"),
    ]
)


class World:
    """Four stand-ins and one router, reused across examples (configs are swapped in)."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.standins: dict[str, OpenAIStandIn] = {}
        self.urls: dict[str, str] = {}
        for name in NAMES:
            self.standins[name], self.urls[name] = upstreams.openai(name)
        self.router: Router = upstreams.router(self.config({n: () for n in NAMES}, list(NAMES)))
        self.counter = itertools.count()

    def config(
        self,
        tags: dict[str, tuple[str, ...]],
        chain: list[str],
        strategy: str = "priority",
        attempts: int = 2,
        threshold: int = 2,
    ) -> dict[str, Any]:
        endpoints = [
            {
                "name": n,
                "provider": "openai",
                "baseUrl": self.urls[n],
                "model": f"{n}-model",
                "tags": list(tags[n]),
                "pricing": {"inputPerMtok": i, "outputPerMtok": i},
            }
            for i, n in enumerate(NAMES)
        ]
        targets = [{"endpoint": n, "weight": 1, "tier": "standard"} for n in chain]
        return {
            "endpoints": endpoints,
            "models": [
                {
                    "name": "chat",
                    "endpoints": chain,
                    "retry": {
                        "maxAttempts": attempts,
                        "backoffBaseSeconds": 0.001,
                        "backoffMaxSeconds": 0.002,
                        "maxRetryAfterSeconds": 0.01,
                    },
                    "circuitBreaker": {"failureThreshold": threshold, "openSeconds": 0.05},
                }
            ],
            "rules": [{"name": "everything", "strategy": strategy, "targets": targets}],
            "sensitivity": SENSITIVITY,
        }


@pytest.fixture
def world(upstreams: Upstreams) -> Iterator[World]:
    yield World(upstreams)


def _allowed(tags: tuple[str, ...], classes: set[str]) -> bool:
    allowed = {c["name"]: set(c.get("allowedTags", [])) for c in SENSITIVITY["classes"]}
    return all(not allowed[c] or allowed[c] & set(tags) for c in classes)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tags=st.fixed_dictionaries({n: st.sampled_from(TAG_SETS) for n in NAMES}),
    chain=st.permutations(NAMES).flatmap(lambda p: st.integers(1, 4).map(lambda k: list(p[:k]))),
    strategy=st.sampled_from(
        [
            "priority",
            "weighted",
            "lowest-latency",
            "lowest-cost",
            "least-loaded",
            "complexity-tiers",
        ]
    ),
    attempts=st.integers(1, 3),
    threshold=st.integers(1, 3),
    scripts=st.fixed_dictionaries({n: st.lists(FAILURES, max_size=6) for n in NAMES}),
    prompt=st.sampled_from(sorted(PROMPTS)),
    stream=st.booleans(),
    repeats=st.integers(1, 3),
)
def test_sensitive_requests_never_reach_a_non_compliant_endpoint(
    world: World,
    tags: dict[str, tuple[str, ...]],
    chain: list[str],
    strategy: str,
    attempts: int,
    threshold: int,
    scripts: dict[str, list[Behaviour]],
    prompt: str,
    stream: bool,
    repeats: int,
) -> None:
    router = world.router
    config = world.config(tags, chain, strategy, attempts, threshold)
    world.router.servers.run(_apply(router, config))
    for name, standin in world.standins.items():
        standin.script.clear()
        standin.then(*scripts[name])
        standin.received.clear()
    text, declared, classes = PROMPTS[prompt]
    compliant = [n for n in chain if _allowed(tags[n], classes)]
    headers = {"content-type": "application/json"}
    if declared:
        headers["x-modelplane-data-class"] = declared
    statuses = []
    for _ in range(repeats):
        marker = f"[req {next(world.counter)}]"
        body = {
            "model": "chat",
            "stream": stream,
            "messages": [{"role": "user", "content": f"{text} {marker}"}],
        }
        reply = http("POST", router.url + "/v1/chat/completions", orjson.dumps(body), **headers)
        statuses.append(reply.status_code)
        if not compliant:
            assert reply.status_code == 403, reply.text
            assert reply.json()["error"]["code"] == "no_compliant_endpoint"
            assert "Rule 'everything'" in reply.json()["error"]["message"]
        elif reply.status_code == 200:
            assert reply.headers["x-modelplane-endpoint"] in compliant
    for name, standin in world.standins.items():
        if name not in compliant:
            leaked = [r for r in standin.received if text in str(r.body)]
            assert leaked == [], f"{prompt} request reached non-compliant endpoint {name}"


async def _apply(router: Router, config: dict[str, Any]) -> None:
    router.holder.apply(parse_config(config, "property test"), "test")


def test_world_is_wired(world: World) -> None:
    """The stand-ins answer: the property above is not vacuous."""
    reply = http(
        "POST",
        world.router.url + "/v1/chat/completions",
        orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}),
        **{"content-type": "application/json"},
    )
    assert reply.status_code == 200 and reply.headers["x-modelplane-endpoint"] == "e0"
    assert len(world.standins["e0"].received) == 1
