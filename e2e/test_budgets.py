"""Budgets against the real apiserver: status follows spend, and an operator restart keeps it.

A real `modelplane operator` and a real `modelplane serve --control-plane` sidecar (TokenRequest
token), an OpenAI stand-in upstream, the official openai SDK as the app. The Budget's status is
what the apiserver stores: spent, remaining, leases, per-endpoint breakdown, conditions, Events.
"""

from __future__ import annotations

import signal
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
    policy,
    secret,
    wait_for,
)

from modelplane_sidecar.standins.openai import OpenAIStandIn

#: USD per 1M tokens: high on purpose, so a handful of requests moves a small budget.
PRICE = 1000.0
LIMIT = 1.0


def objects(upstream: str) -> list[dict[str, Any]]:
    return [
        secret("openai", "sk-budget-test"),
        endpoint(
            "gpt", upstream, "openai", pricing={"inputPerMTok": PRICE, "outputPerMTok": PRICE}
        ),
        policy("routes", "chat", "gpt"),
        {
            "apiVersion": API,
            "kind": "Budget",
            "metadata": {"name": "daily"},
            "spec": {
                "period": "daily",
                "limitUSD": LIMIT,
                "timezone": "Europe/Berlin",
                "maxOutputTokens": 64,
                # A sidecar holds up to this much: what it can spend while the operator is away.
                "leaseUSD": 0.4,
                "thresholds": [
                    {"percent": 10, "action": "alert"},
                    {"percent": 100, "action": "block"},
                ],
            },
        },
    ]


def ask(client: openai.OpenAI) -> int:
    """One request; returns the tokens the provider reported."""
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "how much does this cost?"}]
    )
    assert reply.usage is not None
    return reply.usage.prompt_tokens + reply.usage.completion_tokens


def budget_status(cluster: Cluster, namespace: str) -> dict[str, Any]:
    return dict(get(cluster, namespace, "budget", "daily").get("status") or {})


def settled(cluster: Cluster, namespace: str, requests: int) -> dict[str, Any] | None:
    """The Budget's status once it counts `requests` requests on endpoint gpt."""
    status = budget_status(cluster, namespace)
    per_endpoint = {e["name"]: e for e in status.get("endpoints") or []}
    gpt = per_endpoint.get("gpt")
    return status if gpt is not None and gpt["requests"] == requests else None


def test_budget_status_follows_spend_and_an_operator_restart_keeps_it(
    cluster: Cluster,
    namespace: str,
    crds: None,
    operator_cert: CertFiles,
    servers: StandIns,
    tmp_path: Path,
) -> None:
    standin = OpenAIStandIn("upstream", api_key="sk-budget-test")
    upstream = servers.start(standin)
    apply(cluster, namespace, *objects(upstream))
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    sidecar: Sidecar | None = None
    try:
        sidecar = Sidecar.for_account(operator, namespace, tmp_path / "s", "app-pod")
        wait_for(sidecar.version, "the sidecar's config")
        client = sidecar.client()

        tokens = sum(ask(client) for _ in range(8))
        status = wait_for(lambda: settled(cluster, namespace, 8), "spend in the Budget's status")
        cost = tokens * PRICE / 1e6
        assert status["spentUSD"] == pytest.approx(cost)
        (gpt,) = status["endpoints"]
        assert gpt["spentUSD"] == pytest.approx(cost)
        assert gpt["inputTokens"] + gpt["outputTokens"] == tokens
        assert status["periodStart"].endswith(("T22:00:00Z", "T23:00:00Z"))  # Berlin midnight
        assert status["remainingUSD"] == pytest.approx(
            LIMIT - status["spentUSD"] - status["leasedUSD"]
        )
        (lease,) = status["leases"]
        assert lease["holder"].startswith("app-pod/") and lease["connected"]
        assert lease["settledUSD"] == pytest.approx(cost)
        # Its book went to status before the sidecar was told it, and the sidecar names it.
        assert lease["book"] and lease["confirmed"]
        # The cap went upstream on every call.
        assert {r.body.get("max_completion_tokens") for r in standin.received} == {64}

        # Past 10%: the alert shows as a condition and a Warning Event.
        reached = condition(get(cluster, namespace, "budget", "daily"), "ThresholdReached")
        assert reached is not None and reached["status"] == "True"
        assert reached["reason"] == "Alert"
        assert status["thresholdsReached"] == [10]

        def alert_events() -> list[dict[str, Any]]:
            events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
            return [e for e in events if e["reason"] == "BudgetThresholdReached"]

        (event,) = wait_for(alert_events, "the threshold Event")
        assert event["type"] == "Warning" and "Budget 'daily'" in event["message"]
        printed = cluster.kubectl("get", "budgets", "-n", namespace).stdout
        assert "REMAINING" in printed and "normal" in printed

        # The operator dies without warning; the sidecar keeps serving from its lease.
        operator.stop(signal.SIGKILL)
        tokens += ask(client)
        operator = Operator(cluster, operator_cert, [namespace], tmp_path, port=operator.port)
        # The new operator takes the books over from status and counts what the sidecar
        # reports on reconnecting exactly once.
        tokens += sum(ask(client) for _ in range(3))
        status = wait_for(lambda: settled(cluster, namespace, 12), "spend after the restart", 60)
        assert status["spentUSD"] == pytest.approx(tokens * PRICE / 1e6)
        assert [lease["connected"] for lease in status["leases"]] == [True]
        assert status["leases"][0]["book"] == lease["book"]  # the same entry, taken over

        # A sidecar restart (SIGTERM) gives its idle lease back and loses nothing settled.
        sidecar.restart()
        wait_for(sidecar.version, "the restarted sidecar's config")
        tokens += ask(sidecar.client())

        def after_sidecar_restart() -> dict[str, Any] | None:
            found = settled(cluster, namespace, 13)
            if found is None or len(found["leases"]) != 2:
                return None
            return found

        status = wait_for(after_sidecar_restart, "spend after the sidecar's restart", 60)
        assert status["spentUSD"] == pytest.approx(tokens * PRICE / 1e6)
        gone = next(lease for lease in status["leases"] if not lease["connected"])
        outstanding = gone["grantedUSD"] - gone["settledUSD"] - gone["returnedUSD"]
        assert outstanding == pytest.approx(0.0, abs=1e-9)
    finally:
        if sidecar is not None:
            sidecar.stop()
        operator.stop()
