"""RoutingPolicy spec.sidecar against the real apiserver, operator and sidecars.

Two policies set the request size limit differently: both say so in their Conflicted condition
and the older one's limit is what the sidecars enforce. The cache store's Redis (a real
`redis-server` that requires a password) gets its password from a Secret: a second sidecar
answers from what the first stored in Redis, which it can only read after authenticating.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from cluster import CertFiles, Cluster
from operator_helpers import (
    API,
    Operator,
    Sidecar,
    StandIns,
    apply,
    condition,
    endpoint,
    get,
    secret,
    wait_for,
)
from redis_support import RedisServer

from modelplane_sidecar.standins.openai import OpenAIStandIn

PASSWORD = "e2e-redis-password-7f3a"
QUESTION = [{"role": "user", "content": "Name the largest planet of the solar system."}]


def policy(name: str, alias: str, sidecar: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "RoutingPolicy",
        "metadata": {"name": name},
        "spec": {
            "models": [{"name": alias, "targets": [{"endpoint": "gpt"}]}],
            "sidecar": sidecar,
            **spec,
        },
    }


def conflicted(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    found = condition(get(cluster, namespace, "routingpolicy", name), "Conflicted")
    return found if found is not None and found["status"] == "True" else None


def ask(client: openai.OpenAI) -> tuple[str, str]:
    """(x-modelplane-cache, answer id) of one deterministic chat request."""
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=QUESTION, temperature=0
    )
    return raw.headers.get("x-modelplane-cache", ""), raw.parse().id


def test_namespace_settings_conflicts_and_a_redis_password_from_a_secret(
    cluster: Cluster,
    namespace: str,
    crds: None,
    operator_cert: CertFiles,
    servers: StandIns,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path, password=PASSWORD)
    redis.start()
    standin = OpenAIStandIn("upstream", api_key="sk-settings")
    upstream = servers.start(standin)
    settings = {
        "server": {"maxBodyBytes": 4096},
        "cache": {
            "maxBytes": 1 << 20,
            "redis": {
                "url": redis.url,
                "passwordSecretRef": {"name": "redis", "key": "password"},
                # Generous: on a loaded machine a first round trip with AUTH can take a second,
                # and a timed-out read makes the second sidecar miss the entry.
                "timeoutSeconds": 5,
            },
        },
        "lanes": {"batch": {"maxQueue": 8}},
    }
    apply(
        cluster,
        namespace,
        secret("openai", "sk-settings"),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "redis"},
            "stringData": {"password": PASSWORD},
        },
        endpoint("gpt", upstream, "openai"),
        # Created together: the first by name wins.
        policy("a-platform", "chat", settings, cache={"enabled": True}),
        policy("b-team", "team-chat", {"server": {"maxBodyBytes": 8192}}),
    )
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    sidecars: list[Sidecar] = []
    try:
        won = wait_for(lambda: conflicted(cluster, namespace, "a-platform"), "Conflicted")
        lost = wait_for(lambda: conflicted(cluster, namespace, "b-team"), "Conflicted")
        precedence = "the older policy wins, the first by name when created together"
        assert won["reason"] == lost["reason"] == "SidecarSettings"
        assert won["message"] == (
            "spec.sidecar.server.maxBodyBytes is 4096 here but 8192 in RoutingPolicy 'b-team'; "
            f"this policy's value applies ({precedence})"
        )
        assert lost["message"] == (
            "spec.sidecar.server.maxBodyBytes is 8192 here but 4096 in RoutingPolicy "
            f"'a-platform', whose value applies ({precedence})"
        )
        ready = condition(get(cluster, namespace, "routingpolicy", "b-team"), "Ready")
        assert ready is not None and (ready["status"], ready["reason"]) == (
            "False",
            "SettingsConflict",
        )
        ready = condition(get(cluster, namespace, "routingpolicy", "a-platform"), "Ready")
        assert ready is not None and ready["status"] == "True"

        first = Sidecar.for_account(operator, namespace, tmp_path / "s1", "app-1")
        sidecars.append(first)
        wait_for(first.version, "the first sidecar's config")
        client = first.client()

        # The older policy's limit: a 5 kB body is refused before anything goes upstream.
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x" * 5000}]
            )
        assert refused.value.status_code == 413
        assert standin.received == []

        state, answer = ask(client)
        assert state == "miss"
        wait_for(lambda: b"modelplane:cache:" in redis.command("KEYS", "*"), "the entry in Redis")

        # Another pod's sidecar finds it there: it authenticated with the Secret's password.
        second = Sidecar.for_account(operator, namespace, tmp_path / "s2", "app-2")
        sidecars.append(second)
        wait_for(second.version, "the second sidecar's config")
        assert ask(second.client()) == ("hit", answer)
        assert len(standin.received) == 1

        # The password went to the sidecars only: not into status, Events or logs.
        events = cluster.kubectl("get", "events", "-n", namespace, "-o", "yaml").stdout
        policies = cluster.kubectl("get", "routingpolicies", "-n", namespace, "-o", "yaml").stdout
        logs = operator.process.log() + "".join(s.process.log() for s in sidecars)
        for text in (events, policies, logs):
            assert PASSWORD not in text
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        operator.stop()
        redis.kill()
