"""The operator against the real apiserver: CRDs, status, and config pushed to real sidecars.

Each test runs its own `modelplane operator` process (watching only the test's namespaces) and
`modelplane serve --control-plane` sidecars authenticated with TokenRequest tokens; apps talk to
the sidecars with the official openai SDK, and the sidecars call a local OpenAI stand-in.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import CertFiles, Cluster
from operator_helpers import (
    EXAMPLES,
    Operator,
    Sidecar,
    StandIns,
    apply,
    condition,
    endpoint,
    get,
    policy,
    secret,
    service_account_token,
    wait_for,
)

from modelplane_sidecar.standins.openai import OpenAIStandIn


@pytest.fixture
def other_namespace(cluster: Cluster) -> Iterator[str]:
    name = cluster.create_namespace("e2e-other")
    yield name
    cluster.delete_namespace(name)


def ask(sidecar: Sidecar, model: str) -> str:
    reply = sidecar.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}]
    )
    return reply.choices[0].message.content or ""


def ready(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    obj = get(cluster, namespace, kind, name)
    c = condition(obj, "Ready")
    generation = obj["metadata"]["generation"]
    if c and c["status"] == "True" and obj["status"].get("observedGeneration") == generation:
        return obj
    return None


def applied_to(cluster: Cluster, namespace: str, name: str, current: int) -> dict[str, Any] | None:
    obj = get(cluster, namespace, "routingpolicy", name)
    c = condition(obj, "Applied")
    sidecars = (obj.get("status") or {}).get("sidecars") or {}
    if c and c["status"] == "True" and sidecars.get("current") == current:
        return c
    return None


def test_the_examples_apply_as_they_are_and_become_ready(
    cluster: Cluster, namespace: str, crds: None, operator_cert: CertFiles, tmp_path: Path
) -> None:
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES))
        listed = cluster.kubectl_json("get", "modelplane", "-n", namespace)["items"]
        assert {o["kind"] for o in listed} == {"ModelEndpoint", "RoutingPolicy", "Budget"}

        for obj in listed:
            kind, name = obj["kind"].lower(), obj["metadata"]["name"]
            wait_for(lambda k=kind, n=name: ready(cluster, namespace, k, n), f"{kind} {name} Ready")
        policy_obj = get(cluster, namespace, "routingpolicy", "default")
        assert policy_obj["status"]["configVersion"]
        applied = condition(policy_obj, "Applied")
        assert applied is not None and applied["reason"] == "NoSidecars"
        table = cluster.kubectl("get", "modelendpoints", "-n", namespace).stdout
        assert "READY" in table and "True" in table
    finally:
        operator.stop()


def test_cross_object_errors_are_precise_conditions_and_events(
    cluster: Cluster, namespace: str, crds: None, operator_cert: CertFiles, tmp_path: Path
) -> None:
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    try:
        apply(
            cluster,
            namespace,
            secret("key", "sk-1"),
            endpoint("good", "https://api.openai.com/v1", "key"),
            endpoint("no-secret", "https://api.openai.com/v1", "missing-secret"),
            policy("fine", "chat", "good"),
            policy("broken", "other", "ghost", "no-secret"),
        )

        wait_for(lambda: ready(cluster, namespace, "routingpolicy", "fine"), "the valid policy")
        broken = wait_for(
            lambda: condition(get(cluster, namespace, "routingpolicy", "broken"), "Ready"),
            "the broken policy's Ready condition",
        )
        assert broken["status"] == "False"
        assert broken["reason"] == "NothingRoutable"
        assert broken["message"] == (
            "model 'other': ModelEndpoint 'ghost' not found; model 'other': ModelEndpoint "
            "'no-secret' is not ready (SecretNotFound); model 'other': no usable target, so no "
            "endpoint can serve it"
        )
        endpoint_ready = condition(get(cluster, namespace, "modelendpoint", "no-secret"), "Ready")
        assert endpoint_ready is not None
        assert endpoint_ready["message"] == (
            f"Secret 'missing-secret' (spec.credentials.secretRef) not found in namespace "
            f"{namespace!r}"
        )

        def warning_events() -> list[dict[str, Any]]:
            events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
            return [e for e in events if e["type"] == "Warning"]

        events = wait_for(lambda: len(warning_events()) >= 2 and warning_events(), "events")
        assert {e["involvedObject"]["name"] for e in events} >= {"broken", "no-secret"}
        assert {e["reason"] for e in events} >= {"NothingRoutable", "SecretNotFound"}
        assert all("sk-1" not in e["message"] for e in events)

        # Creating the Secret repairs the endpoint without touching the endpoint object.
        apply(cluster, namespace, secret("missing-secret", "sk-2"))
        wait_for(lambda: ready(cluster, namespace, "modelendpoint", "no-secret"), "the repair")
    finally:
        operator.stop()


def test_sidecars_get_their_namespace_config_follow_edits_and_survive_the_operator(
    cluster: Cluster,
    namespace: str,
    other_namespace: str,
    crds: None,
    operator_cert: CertFiles,
    servers: StandIns,
    tmp_path: Path,
) -> None:
    standin = OpenAIStandIn("upstream", api_key="sk-team-a-key")
    upstream = servers.start(standin)
    apply(
        cluster,
        namespace,
        secret("openai", "sk-team-a-key"),
        endpoint("gpt", upstream, "openai"),
        policy("routes", "chat", "gpt"),
    )
    apply(
        cluster,
        other_namespace,
        secret("openai", "sk-team-b-key"),
        endpoint("gpt", upstream, "openai"),
        policy("routes", "b-chat", "gpt"),
    )
    operator = Operator(cluster, operator_cert, [namespace, other_namespace], tmp_path)
    sidecars: list[Sidecar] = []
    try:
        sidecar = Sidecar.for_account(operator, namespace, tmp_path / "a", "app-a")
        sidecars.append(sidecar)
        other = Sidecar.for_account(operator, other_namespace, tmp_path / "b", "app-b")
        sidecars.append(other)

        # The sidecar receives its namespace's config and serves a request through it.
        wait_for(sidecar.version, "the sidecar's first config")
        assert standin.reply in ask(sidecar, "chat")
        assert standin.received[-1].headers["Authorization"] == "Bearer sk-team-a-key"
        applied = wait_for(lambda: applied_to(cluster, namespace, "routes", 1), "Applied 1/1")
        assert applied["message"].startswith("1 of 1 connected sidecars run version ")

        # Another namespace's sidecar only ever sees its own config and credentials.
        wait_for(other.version, "the other sidecar's config")
        assert other.models() == ["b-chat"]
        other_version = other.version()
        assert other_version != sidecar.version()

        # A policy edit reaches the sidecar; the other namespace is untouched.
        cluster.kubectl(
            "patch", "routingpolicy", "routes", "-n", namespace, "--type=json",
            "-p", '[{"op": "replace", "path": "/spec/models/0/name", "value": "chat-v2"}]',
        )  # fmt: skip
        wait_for(lambda: sidecar.models() == ["chat-v2"], "the edit to reach the sidecar")
        assert standin.reply in ask(sidecar, "chat-v2")
        assert other.version() == other_version
        assert other.models() == ["b-chat"]

        # Killing the operator leaves the sidecar serving, also across the sidecar's restart.
        operator.stop(signal.SIGKILL)
        assert standin.reply in ask(sidecar, "chat-v2")
        sidecar.restart()
        assert sidecar.models() == ["chat-v2"]
        assert standin.reply in ask(sidecar, "chat-v2")

        # An edit made while the operator is away arrives once a new operator resyncs.
        cluster.kubectl(
            "patch", "routingpolicy", "routes", "-n", namespace, "--type=json",
            "-p", '[{"op": "replace", "path": "/spec/models/0/name", "value": "chat-v3"}]',
        )  # fmt: skip
        operator = Operator(
            cluster, operator_cert, [namespace, other_namespace], tmp_path, port=operator.port
        )
        wait_for(lambda: sidecar.models() == ["chat-v3"], "the resync", timeout=90)
        assert standin.reply in ask(sidecar, "chat-v3")
        wait_for(lambda: applied_to(cluster, namespace, "routes", 1), "Applied after resync")
        wait_for(lambda: applied_to(cluster, other_namespace, "routes", 1), "b resynced")
        assert other.version() == other_version
    finally:
        for s in sidecars:
            s.stop()
        operator.stop()


def test_bad_tokens_are_refused(
    cluster: Cluster, namespace: str, crds: None, operator_cert: CertFiles, tmp_path: Path
) -> None:
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    try:
        status, body = operator.stream_status("not-a-token")
        assert status == 401
        assert body["error"]["message"].startswith("token rejected by the TokenReview API")

        wrong_audience = service_account_token(cluster, namespace, "app", audience="other")
        status, body = operator.stream_status(wrong_audience)
        assert status == 401
        assert "audience" in body["error"]["message"]

        # A sidecar with a bad token is never given a config (and says why in its log).
        sidecar = Sidecar(
            cluster, operator.url, "not-a-token", operator_cert.ca, tmp_path / "s", "bad"
        )
        try:
            wait_for(
                lambda: "control plane refused the stream" in sidecar.process.log(),
                "the refusal in the sidecar's log",
            )
            assert sidecar.version() is None
        finally:
            sidecar.stop()
    finally:
        operator.stop()
