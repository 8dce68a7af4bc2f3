"""A MutatingWebhookConfiguration in url mode, served by a local process, is called on Pod create.

This is how the operator's injection webhook is tested here: there are no Services to route to
and no kubelet, but the apiserver calls `clientConfig.url` and returns the mutated Pod.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from admission_server import PatchingWebhook, serving
from cluster import CertFiles, Cluster, CommandFailed

ANNOTATION = "e2e.modelplane.io/injected"


def _annotate(review: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Pod gets ANNOTATION."""
    return [{"op": "add", "path": "/metadata/annotations", "value": {ANNOTATION: "true"}}]


@pytest.fixture
def webhook_cert(cluster: Cluster) -> CertFiles:
    return cluster.issue_serving_cert("e2e-webhook")


@pytest.fixture
def webhook_server(webhook_cert: CertFiles) -> Iterator[PatchingWebhook]:
    with serving(PatchingWebhook(webhook_cert.cert, webhook_cert.key, _annotate)) as server:
        yield server


@pytest.fixture
def active_webhook(
    cluster: Cluster, webhook_server: PatchingWebhook, webhook_cert: CertFiles, namespace: str
) -> Iterator[PatchingWebhook]:
    """The webhook server, registered for Pod CREATE in `namespace` and already being called."""
    # Unique per run and scoped to the test namespace: a leftover failurePolicy=Fail webhook
    # would block every Pod in the cluster.
    name = f"e2e-inject-{uuid.uuid4().hex[:8]}"
    configuration = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "inject.e2e.modelplane.io",
                "clientConfig": {
                    "url": webhook_server.url,
                    "caBundle": webhook_cert.ca_bundle,
                },
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "failurePolicy": "Fail",
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10,
            }
        ],
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(configuration))
    wait_until_webhook_active(cluster, namespace)
    webhook_server.reviews.clear()
    yield webhook_server
    cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")


def pod(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
        }
    )


def wait_until_webhook_active(cluster: Cluster, namespace: str) -> None:
    # The apiserver picks up new webhook configurations from an informer, a moment after create.
    # Server-side dry run goes through admission (sideEffects: None allows it) but stores nothing.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = cluster.kubectl_json(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", input=pod("probe")
        )
        if ANNOTATION in probe["metadata"].get("annotations", {}):
            return
        time.sleep(0.5)
    pytest.fail("the webhook configuration never became active")


def test_webhook_mutates_pod_on_create(
    cluster: Cluster, namespace: str, active_webhook: PatchingWebhook
) -> None:
    created = cluster.kubectl_json("create", "-n", namespace, "-f", "-", input=pod("app"))

    assert created["metadata"]["annotations"] == {ANNOTATION: "true"}
    stored = cluster.kubectl_json("get", "pod", "app", "-n", namespace)
    assert stored["metadata"]["annotations"] == {ANNOTATION: "true"}
    (review,) = active_webhook.reviews
    request = review["request"]
    assert (request["operation"], request["namespace"]) == ("CREATE", namespace)
    assert request["kind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert request["object"]["metadata"]["name"] == "app"


def test_pod_create_fails_when_the_webhook_is_down(
    cluster: Cluster, namespace: str, active_webhook: PatchingWebhook
) -> None:
    active_webhook.shutdown()
    active_webhook.server_close()

    with pytest.raises(CommandFailed) as failure:
        cluster.kubectl("create", "-n", namespace, "-f", "-", input=pod("orphan"))

    assert 'failed calling webhook "inject.e2e.modelplane.io"' in str(failure.value)
