"""Sidecar injection end to end: `helm install` the chart in url mode, run the operator as the
chart's Deployment would (as a local process, as the chart's ServiceAccount), create Pods, and
check what the apiserver stored.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest
from admission_server import serving
from cluster import Cluster, CommandFailed
from eks_webhook import IRSA, IRSA_DIR, EksWebhook, eks_patch
from injection_helpers import (
    RUN_LABEL,
    Install,
    create_pod,
    dry_run_pod,
    env_of,
    get_pod,
    new_install,
    pod,
    sidecars,
)
from operator_helpers import wait_for


@pytest.fixture(scope="module")
def install(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    installed = new_install(cluster, tmp_path_factory.mktemp("injection"))
    try:
        installed.helm("install", *installed.values())
        installed.start_operator()
        yield installed
    finally:
        installed.teardown()


@pytest.fixture(scope="module")
def labelled(cluster: Cluster, install: Install) -> Iterator[str]:
    labels = {"modelplane.io/inject": "enabled", RUN_LABEL: install.run_id}
    name = cluster.create_namespace("e2e-inject", labels)
    install.wait_until_serving(name)
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="module")
def unlabelled(cluster: Cluster, install: Install, labelled: str) -> Iterator[str]:
    name = cluster.create_namespace("e2e-plain", {RUN_LABEL: install.run_id})
    yield name
    cluster.delete_namespace(name)


def assert_injected_once(stored: dict[str, Any], install: Install) -> dict[str, Any]:
    (sidecar,) = sidecars(stored)
    assert stored["spec"]["initContainers"][0] is not None
    assert stored["spec"]["initContainers"][0]["name"] == "modelplane-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "ghcr.io/modelplane/sidecar:0.1.0"
    command = sidecar["command"]
    url = command[command.index("--control-plane") + 1]
    # Sidecars reach the stream through its Service (port 8443), whatever port the Pod uses.
    assert url == f"https://{install.fullname}.{install.namespace}.svc:8443"
    assert sidecar["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": 15021,
        "scheme": "HTTP",
    }
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["resources"]["limits"] == {"cpu": "1", "memory": "256Mi"}
    volumes = {volume["name"]: volume for volume in stored["spec"]["volumes"]}
    sources = volumes["modelplane-token"]["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["audience"] == "modelplane"
    annotations = stored["metadata"]["annotations"]
    assert annotations["modelplane.io/injected"] == "true"
    # The CA injected Pods trust is the operator's own, the one the apiserver trusts too.
    assert annotations["modelplane.io/ca-bundle"] == base64.b64decode(install.stored_ca()).decode()
    return sidecar


def test_pod_in_labelled_namespace_gets_the_sidecar_and_env(
    cluster: Cluster, install: Install, labelled: str
) -> None:
    created = create_pod(cluster, labelled, pod("app"))
    stored = get_pod(cluster, labelled, "app")

    assert created["spec"] == stored["spec"]
    assert_injected_once(stored, install)
    (app,) = stored["spec"]["containers"]
    assert env_of(app) == {
        "OPENAI_BASE_URL": "http://127.0.0.1:15000/v1",
        "OPENAI_API_BASE": "http://127.0.0.1:15000/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:15000",
        "OPENAI_API_KEY": "modelplane-sidecar",
        "ANTHROPIC_API_KEY": "modelplane-sidecar",
    }


def test_busy_pod_keeps_its_containers_env_and_init_containers(
    cluster: Cluster, install: Install, labelled: str
) -> None:
    manifest = pod(
        "busy",
        initContainers=[{"name": "migrate", "image": "registry.invalid/migrate:1"}],
        containers=[
            {
                "name": "api",
                "image": "registry.invalid/api:1",
                "env": [{"name": "ANTHROPIC_BASE_URL", "value": "https://elsewhere.invalid"}],
            },
            {"name": "worker", "image": "registry.invalid/worker:1"},
        ],
    )
    result = cluster.kubectl(
        "create", "-n", labelled, "-f", "-", "-o", "json", input=json.dumps(manifest)
    )

    # The apiserver hands the webhook's warnings to the client.
    assert "container 'api' sets ANTHROPIC_BASE_URL itself" in result.stderr
    stored = get_pod(cluster, labelled, "busy")
    assert_injected_once(stored, install)
    assert [c["name"] for c in stored["spec"]["initContainers"]] == [
        "modelplane-sidecar",
        "migrate",
    ]
    api, worker = stored["spec"]["containers"]
    assert env_of(api)["ANTHROPIC_BASE_URL"] == "https://elsewhere.invalid"
    assert env_of(api)["OPENAI_BASE_URL"] == "http://127.0.0.1:15000/v1"
    assert env_of(worker)["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:15000"


def test_opted_out_pod_in_labelled_namespace_is_left_alone(cluster: Cluster, labelled: str) -> None:
    manifest = pod("opted-out", annotations={"modelplane.io/inject": "false"})
    create_pod(cluster, labelled, manifest)

    stored = get_pod(cluster, labelled, "opted-out")
    assert sidecars(stored) == []
    assert "initContainers" not in stored["spec"]
    assert "env" not in stored["spec"]["containers"][0]
    assert "modelplane.io/injected" not in stored["metadata"]["annotations"]


def test_host_network_pod_is_never_injected(cluster: Cluster, labelled: str) -> None:
    manifest = pod("host", hostNetwork=True, annotations={"modelplane.io/inject": "true"})
    create_pod(cluster, labelled, manifest)

    assert sidecars(get_pod(cluster, labelled, "host")) == []


def test_unlabelled_namespace_injects_only_pods_that_ask(
    cluster: Cluster, install: Install, unlabelled: str
) -> None:
    create_pod(cluster, unlabelled, pod("plain"))
    create_pod(cluster, unlabelled, pod("asks", annotations={"modelplane.io/inject": "true"}))

    plain = get_pod(cluster, unlabelled, "plain")
    assert sidecars(plain) == []
    assert "env" not in plain["spec"]["containers"][0]
    assert_injected_once(get_pod(cluster, unlabelled, "asks"), install)


def test_already_injected_pod_is_not_injected_twice(
    cluster: Cluster, install: Install, labelled: str, unlabelled: str
) -> None:
    """A Pod spec copied from an injected Pod (kubectl get -o yaml | kubectl create)."""
    # Its own injected Pod to copy (not another test's, so the order of the tests is free).
    create_pod(cluster, labelled, pod("original"))
    original = get_pod(cluster, labelled, "original")
    copy = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "copied",
            "annotations": original["metadata"]["annotations"],
        },
        "spec": {
            key: original["spec"][key]
            for key in ("initContainers", "containers", "volumes", "serviceAccountName")
        },
    }
    for namespace in (labelled, unlabelled):
        create_pod(cluster, namespace, copy)
        stored = get_pod(cluster, namespace, "copied")
        assert_injected_once(stored, install)
        assert [v["name"] for v in stored["spec"]["volumes"]] == [
            "modelplane-token",
            "modelplane-state",
        ]
        assert len(stored["spec"]["containers"][0]["env"]) == 5


def test_bad_override_annotation_is_refused_with_the_reason(
    cluster: Cluster, labelled: str
) -> None:
    manifest = pod("bad", annotations={"modelplane.io/sidecar-port": "fifteen"})

    with pytest.raises(CommandFailed) as failure:
        create_pod(cluster, labelled, manifest)

    message = failure.value.result.stderr
    assert "modelplane sidecar injection: annotation modelplane.io/sidecar-port" in message
    assert "'fifteen' is not a port number" in message


def test_override_annotations_reach_the_stored_pod(cluster: Cluster, labelled: str) -> None:
    annotations = {
        "modelplane.io/sidecar-port": "16000",
        "modelplane.io/sidecar-memory-limit": "1Gi",
        "modelplane.io/sidecar-image": "registry.invalid/sidecar:canary",
    }
    create_pod(cluster, labelled, pod("custom", annotations=annotations))

    stored = get_pod(cluster, labelled, "custom")
    (sidecar,) = sidecars(stored)
    assert sidecar["image"] == "registry.invalid/sidecar:canary"
    assert sidecar["resources"]["limits"]["memory"] == "1Gi"
    assert env_of(stored["spec"]["containers"][0])["OPENAI_BASE_URL"] == (
        "http://127.0.0.1:16000/v1"
    )


def test_operator_keeps_its_certificates_in_a_tls_secret(
    cluster: Cluster, install: Install
) -> None:
    def written() -> dict[str, Any] | None:
        """The Secret once the operator has written it and set the caBundle from it (this test
        may run before any other has waited for the operator to start)."""
        found = cluster.kubectl(
            "get", "secret", install.secret, "-n", install.namespace, "-o", "json", check=False
        )
        if found.returncode != 0:
            return None
        stored: dict[str, Any] = json.loads(found.stdout)
        return stored if install.ca_bundle() is not None else None

    secret = wait_for(written, "the operator's TLS Secret and caBundle", timeout=60)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "modelplane-operator"
    assert install.ca_bundle() == secret["data"]["ca.crt"]


# EKS's AWS credentials (IRSA here; Pod Identity is the same code path with other names).
IRSA_VARIABLES = (
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


def eks_configuration(name: str, server: EksWebhook, ca_bundle: str, namespace: str) -> str:
    hook = {
        "name": "pod-identity-webhook.amazonaws.com",
        "clientConfig": {"url": server.url, "caBundle": ca_bundle},
        "rules": [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
            }
        ],
        # Only this test's namespace: a leftover Fail webhook must not block other Pods.
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "failurePolicy": "Fail",
        "reinvocationPolicy": "Never",
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 10,
    }
    return json.dumps(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [hook],
        }
    )


@pytest.fixture(params=["eks-first", "modelplane-first"])
def eks_namespace(
    request: pytest.FixtureRequest, cluster: Cluster, install: Install, labelled: str
) -> Iterator[tuple[str, EksWebhook, str]]:
    """A namespace with injection enabled where a stand-in of EKS's webhook gives every Pod IRSA
    credentials, in its app containers only. The apiserver calls mutating webhook
    configurations in the order of their names: the stand-in's name puts it before, or after,
    the chart's."""
    name = f"{'a' if request.param == 'eks-first' else 'zz'}-eks-{uuid.uuid4().hex[:8]}"
    assert (name < install.webhook_configuration) == (request.param == "eks-first")
    labels = {"modelplane.io/inject": "enabled", RUN_LABEL: install.run_id}
    namespace = cluster.create_namespace("e2e-eks", labels)
    cert = cluster.issue_serving_cert("eks-standin")
    with serving(EksWebhook(cert.cert, cert.key, IRSA, init_containers=False)) as server:
        cluster.kubectl(
            "create", "-f", "-", input=eks_configuration(name, server, cert.ca_bundle, namespace)
        )
        try:

            def both_webhooks_called() -> bool:
                probe = dry_run_pod(cluster, namespace)
                return bool(sidecars(probe)) and "AWS_ROLE_ARN" in env_of(
                    probe["spec"]["containers"][0]
                )

            wait_for(both_webhooks_called, "the EKS stand-in and the injector", timeout=60)
            server.reviews.clear()
            yield namespace, server, request.param
        finally:
            cluster.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")
            cluster.delete_namespace(namespace)


def assert_sidecar_has_the_apps_irsa_credentials(stored: dict[str, Any], install: Install) -> None:
    sidecar = assert_injected_once(stored, install)
    app = env_of(stored["spec"]["containers"][0])
    own = env_of(sidecar)
    assert {name: own.get(name) for name in IRSA_VARIABLES} == {
        name: app[name] for name in IRSA_VARIABLES
    }
    assert [name for name in own if name.startswith("AWS_")] == list(IRSA_VARIABLES)
    assert {"name": "aws-iam-token", "mountPath": IRSA_DIR, "readOnly": True} in sidecar[
        "volumeMounts"
    ]
    assert [v["name"] for v in stored["spec"]["volumes"]].count("aws-iam-token") == 1


def test_eks_credentials_reach_the_sidecar_whichever_webhook_runs_first(
    cluster: Cluster,
    install: Install,
    eks_namespace: tuple[str, EksWebhook, str],
) -> None:
    namespace, eks, first = eks_namespace
    configuration = install.webhook_configuration_object() or {}
    assert {hook["reinvocationPolicy"] for hook in configuration["webhooks"]} == {"IfNeeded"}

    create_pod(cluster, namespace, pod("bedrock-app"))

    assert_sidecar_has_the_apps_irsa_credentials(
        get_pod(cluster, namespace, "bedrock-app"), install
    )
    # Which order the apiserver really used: what the stand-in was sent. When it ran second, the
    # sidecar it saw had no AWS credentials and it added none to it (init containers are not
    # its business), so they came from the injector called again (reinvocationPolicy IfNeeded).
    # (Called once; a call the apiserver might retry would have been sent the same Pod.)
    assert eks.reviews
    for review in eks.reviews:
        seen = review["request"]["object"]
        if first == "eks-first":
            assert sidecars(seen) == []
        else:
            (sidecar,) = sidecars(seen)
            assert not [name for name in env_of(sidecar) if name.startswith("AWS_")]


def test_pod_created_with_irsa_credentials_gets_them_in_the_sidecar(
    cluster: Cluster, install: Install, labelled: str
) -> None:
    """What EKS's webhook produced, as if written by hand: no second webhook involved."""
    manifest = pod("irsa-by-hand")
    create_pod(cluster, labelled, jsonpatch.apply_patch(manifest, eks_patch(manifest, IRSA)))

    assert_sidecar_has_the_apps_irsa_credentials(
        get_pod(cluster, labelled, "irsa-by-hand"), install
    )
