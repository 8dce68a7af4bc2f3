"""The certificate keeper against the real apiserver: Secret creation, adoption by a second
replica, a race between two replicas, rotation before expiry, and caBundle drift repair.

Time is moved forward with the keeper's clock, so rotation is exercised without waiting months.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cluster import Cluster
from cryptography import x509

from modelplane_operator.injection.certs import CertificatePolicy
from modelplane_operator.injection.keeper import (
    CertificateKeeper,
    KeeperSettings,
    material_from_secret,
)
from modelplane_operator.kube import KubeClient, load_credentials

HOSTS = ("modelplane-webhook.e2e.svc", "127.0.0.1")
POLICY = CertificatePolicy()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


@pytest.fixture
def webhook_configuration(cluster: Cluster, namespace: str) -> Iterator[str]:
    """Two webhooks that can never match a Pod (selector on a label nobody has)."""
    name = f"e2e-keeper-{namespace}"
    hooks = [
        {
            "name": f"{which}.keeper.e2e.modelplane.io",
            "clientConfig": {"url": f"https://127.0.0.1:1/{which}"},
            "rules": [
                {
                    "operations": ["CREATE"],
                    "apiGroups": [""],
                    "apiVersions": ["v1"],
                    "resources": ["pods"],
                }
            ],
            "namespaceSelector": {"matchLabels": {"e2e.modelplane.io/never": namespace}},
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }
        for which in ("one", "two")
    ]
    configuration = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": hooks,
    }
    cluster.kubectl("create", "-f", "-", input=json.dumps(configuration))
    yield name
    cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")


@pytest.fixture
async def kube(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[KubeClient]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = KubeClient(load_credentials())
    yield client
    await client.close()


def settings(namespace: str, webhook_configuration: str | None) -> KeeperSettings:
    return KeeperSettings(
        namespace=namespace,
        secret_name="operator-tls",
        hosts=HOSTS,
        webhook_configuration=webhook_configuration,
        policy=POLICY,
    )


def stored_secret(cluster: Cluster, namespace: str) -> dict[str, Any]:
    secret: dict[str, Any] = cluster.kubectl_json("get", "secret", "operator-tls", "-n", namespace)
    return secret


def ca_bundles(cluster: Cluster, name: str) -> list[str]:
    configuration = cluster.kubectl_json("get", "mutatingwebhookconfiguration", name)
    return [hook["clientConfig"].get("caBundle", "") for hook in configuration["webhooks"]]


async def test_first_replica_creates_the_secret_and_a_second_adopts_it(
    cluster: Cluster, namespace: str, webhook_configuration: str, kube: KubeClient
) -> None:
    first = CertificateKeeper(kube, settings(namespace, webhook_configuration))
    material = await first.ensure()

    secret = stored_secret(cluster, namespace)
    assert secret["type"] == "kubernetes.io/tls"
    assert material_from_secret(secret) == material
    expected = base64.b64encode(material.ca_cert).decode()
    assert ca_bundles(cluster, webhook_configuration) == [expected, expected]

    version = secret["metadata"]["resourceVersion"]
    changes: list[Any] = []
    second = CertificateKeeper(kube, settings(namespace, webhook_configuration), changes.append)
    assert await second.ensure() == material
    assert changes == [material]
    assert stored_secret(cluster, namespace)["metadata"]["resourceVersion"] == version


async def test_replicas_racing_on_an_empty_namespace_end_with_one_certificate(
    cluster: Cluster, namespace: str, kube: KubeClient
) -> None:
    keepers = [CertificateKeeper(kube, settings(namespace, None)) for _ in range(3)]

    results = await asyncio.gather(*(keeper.ensure() for keeper in keepers))

    assert results[0] == results[1] == results[2]
    assert material_from_secret(stored_secret(cluster, namespace)) == results[0]


async def test_rotation_before_expiry_keeps_the_ca_key(
    cluster: Cluster, namespace: str, webhook_configuration: str, kube: KubeClient
) -> None:
    clock = Clock()
    keeper = CertificateKeeper(kube, settings(namespace, webhook_configuration), clock=clock)
    original = await keeper.ensure()

    clock.now += datetime.timedelta(days=59)  # more than a third of 90 days left: nothing due
    assert await keeper.ensure() == original

    clock.now += datetime.timedelta(days=2)
    renewed = await keeper.ensure()
    assert renewed.cert != original.cert
    assert renewed.ca_cert == original.ca_cert and renewed.ca_key == original.ca_key
    assert material_from_secret(stored_secret(cluster, namespace)) == renewed
    assert renewed.serving.not_valid_after_utc > original.serving.not_valid_after_utc

    clock.now += datetime.timedelta(days=int(3650 * 0.7))  # the CA itself is due
    rotated = await keeper.ensure()
    assert rotated.ca_cert != original.ca_cert
    assert rotated.ca_key == original.ca_key
    # Sidecars injected years ago hold the old CA certificate: it still verifies the new cert.
    x509.load_pem_x509_certificate(rotated.cert).verify_directly_issued_by(original.ca)
    expected = base64.b64encode(rotated.ca_cert).decode()
    assert ca_bundles(cluster, webhook_configuration) == [expected, expected]


async def test_ca_bundle_drift_is_repaired(
    cluster: Cluster, namespace: str, webhook_configuration: str, kube: KubeClient
) -> None:
    keeper = CertificateKeeper(kube, settings(namespace, webhook_configuration))
    material = await keeper.ensure()
    broken = [
        {"op": "replace", "path": "/webhooks/1/clientConfig/caBundle", "value": "Zm9v"},
    ]
    cluster.kubectl(
        "patch",
        "mutatingwebhookconfiguration",
        webhook_configuration,
        "--type=json",
        "-p",
        json.dumps(broken),
    )

    await keeper.ensure()

    expected = base64.b64encode(material.ca_cert).decode()
    assert ca_bundles(cluster, webhook_configuration) == [expected, expected]


async def test_a_foreign_secret_of_another_type_is_not_overwritten(
    cluster: Cluster, namespace: str, kube: KubeClient
) -> None:
    cluster.kubectl(
        "create", "secret", "generic", "operator-tls", "-n", namespace, "--from-literal=a=b"
    )
    keeper = CertificateKeeper(kube, settings(namespace, None))

    with pytest.raises(RuntimeError, match="exists with type 'Opaque'"):
        await keeper.ensure()
    assert stored_secret(cluster, namespace)["data"] == {"a": "Yg=="}
