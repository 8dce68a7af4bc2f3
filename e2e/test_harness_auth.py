"""ServiceAccount tokens (TokenRequest), TokenReview and RBAC against the real apiserver."""

from __future__ import annotations

import json

from cluster import Cluster

AUDIENCE = "modelplane"


def review(cluster: Cluster, token: str, audiences: list[str]) -> dict[str, object]:
    token_review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences},
    }
    result: dict[str, object] = cluster.kubectl_json(
        "create", "-f", "-", input=json.dumps(token_review)
    )["status"]
    return result


def test_token_request_token_passes_token_review(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "sidecar", "-n", namespace)
    token = cluster.kubectl(
        "create", "token", "sidecar", "-n", namespace, f"--audience={AUDIENCE}", "--duration=10m"
    ).stdout.strip()

    status = review(cluster, token, [AUDIENCE])

    assert status["authenticated"] is True
    assert status["audiences"] == [AUDIENCE]
    user = status["user"]
    assert isinstance(user, dict)
    assert user["username"] == f"system:serviceaccount:{namespace}:sidecar"
    assert f"system:serviceaccounts:{namespace}" in user["groups"]


def test_token_review_rejects_a_token_for_another_audience(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl("create", "serviceaccount", "sidecar", "-n", namespace)
    token = cluster.kubectl(
        "create", "token", "sidecar", "-n", namespace, "--audience=someone-else"
    ).stdout.strip()

    status = review(cluster, token, [AUDIENCE])

    assert status.get("authenticated") is not True
    assert "audience" in str(status.get("error", ""))


def test_rbac_is_enforced(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    subject = f"system:serviceaccount:{namespace}:reader"

    def can_list_configmaps() -> str:
        result = cluster.kubectl(
            "auth", "can-i", "list", "configmaps", "-n", namespace, f"--as={subject}", check=False
        )
        return result.stdout.strip()

    assert can_list_configmaps() == "no"
    cluster.kubectl(
        "create", "role", "read-cm", "-n", namespace, "--verb=list", "--resource=configmaps"
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "read-cm",
        "-n",
        namespace,
        "--role=read-cm",
        f"--serviceaccount={namespace}:reader",
    )
    assert can_list_configmaps() == "yes"
