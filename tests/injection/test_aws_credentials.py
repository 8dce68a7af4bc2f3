"""EKS's AWS credentials (IRSA, Pod Identity) reach the injected sidecar whichever webhook runs
first: copied at injection, or on the re-invocation after EKS's webhook changed the Pod.

EKS's webhook is played by `eks_webhook.eks_patch` (its upstream logic); every patch is applied
with an independent RFC 6902 implementation (`jsonpatch`), as the apiserver would.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest
from eks_webhook import IRSA, IRSA_DIR, POD_IDENTITY, POD_IDENTITY_DIR, ROLE_ARN, eks_patch

from modelplane_operator.injection import InjectionSettings, complete_patch, review_pod

SETTINGS = InjectionSettings(image="sidecar:1", control_plane_url="https://operator:8443")
CA = "ca-pem"
UID = "9b1c7c0e-2f7e-4d7b-9d35-0d6f4b2f8a11"

IRSA_VARIABLES = [
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
]
POD_IDENTITY_VARIABLES = [
    "AWS_STS_REGIONAL_ENDPOINTS",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
]
SIDECAR_OWN = ["MODELPLANE_POD_NAME", "MODELPLANE_POD_NAMESPACE", "MODELPLANE_POD_SERVICE_ACCOUNT"]


def app_pod(**extra_spec: Any) -> dict[str, Any]:
    """An app whose container has env of its own that must never reach the sidecar."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "chat", "namespace": "apps"},
        "spec": {
            "serviceAccountName": "chat",
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "env": [
                        {"name": "LOG_LEVEL", "value": "debug"},
                        {
                            "name": "DATABASE_PASSWORD",
                            "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}},
                        },
                    ],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
            **extra_spec,
        },
    }


def review(pod: dict[str, Any], namespace: str = "apps") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": UID,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": pod,
        },
    }


def modelplane(pod: dict[str, Any], namespace: str = "apps") -> tuple[dict[str, Any], str]:
    """Our webhook, as the apiserver calls it: the Pod after its patch, and the result."""
    outcome = review_pod(
        review(pod, namespace), namespace_enabled=True, settings=SETTINGS, ca_bundle=CA
    )
    response = outcome.review["response"]
    assert response["allowed"] is True
    if "patch" not in response:
        return pod, outcome.result
    patch = json.loads(base64.b64decode(response["patch"]))
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return patched, outcome.result


def eks(
    pod: dict[str, Any], identity: Any = IRSA, *, init_containers: bool = True
) -> dict[str, Any]:
    patched: dict[str, Any] = jsonpatch.apply_patch(
        pod, eks_patch(pod, identity, init_containers=init_containers)
    )
    return patched


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        c for c in pod["spec"]["initContainers"] if c["name"] == "modelplane-sidecar"
    ]
    (sidecar,) = found
    assert not [c for c in pod["spec"]["containers"] if c["name"] == "modelplane-sidecar"]
    return sidecar


def env_names(container: dict[str, Any]) -> list[str]:
    return [variable["name"] for variable in container.get("env", [])]


def env_entry(container: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in container["env"] if v["name"] == name]
    (entry,) = found
    return entry


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["name"]: mount for mount in container.get("volumeMounts", [])}


@pytest.mark.parametrize(
    ("identity", "variables", "volume", "directory"),
    [
        (IRSA, IRSA_VARIABLES, "aws-iam-token", IRSA_DIR),
        (POD_IDENTITY, POD_IDENTITY_VARIABLES, "eks-pod-identity-token", POD_IDENTITY_DIR),
    ],
    ids=["irsa", "pod-identity"],
)
def test_eks_first_then_injection_copies_credentials_and_token_mount(
    identity: Any, variables: list[str], volume: str, directory: str
) -> None:
    before = eks(app_pod(), identity)

    pod, result = modelplane(before)

    assert result == "injected"
    sidecar = sidecar_of(pod)
    assert env_names(sidecar) == SIDECAR_OWN + variables
    app = pod["spec"]["containers"][0]
    for name in variables:
        assert env_entry(sidecar, name) == env_entry(app, name)
    assert mounts(sidecar)[volume] == {"name": volume, "mountPath": directory, "readOnly": True}
    # Nothing else of the app: neither its other variables nor its other volumes.
    assert not {"LOG_LEVEL", "DATABASE_PASSWORD"} & set(env_names(sidecar))
    assert set(mounts(sidecar)) == {"modelplane-token", "modelplane-state", volume}
    # The app container keeps what EKS gave it and gets the sidecar's base URLs on top.
    assert env_names(app)[: 2 + len(variables)] == ["LOG_LEVEL", "DATABASE_PASSWORD", *variables]
    assert "OPENAI_BASE_URL" in env_names(app)


def test_eks_re_invoked_after_injection_adds_nothing_twice() -> None:
    """EKS's webhook with reinvocationPolicy IfNeeded runs again after our injection: the
    sidecar already has everything it would add."""
    pod, _ = modelplane(eks(app_pod()))

    again = eks(pod)

    assert sidecar_of(again) == sidecar_of(pod)
    assert again["spec"]["containers"] == pod["spec"]["containers"]
    assert [v["name"] for v in again["spec"]["volumes"]].count("aws-iam-token") == 1


def test_eks_after_injection_touching_app_containers_only_is_completed_on_reinvocation() -> None:
    injected, result = modelplane(app_pod())
    assert result == "injected"
    assert not set(IRSA_VARIABLES) & set(env_names(sidecar_of(injected)))

    changed = eks(injected, init_containers=False)
    assert not set(IRSA_VARIABLES) & set(env_names(sidecar_of(changed)))

    completed, result = modelplane(changed)

    assert result == "updated"
    sidecar = sidecar_of(completed)
    assert env_names(sidecar) == SIDECAR_OWN + IRSA_VARIABLES
    assert env_entry(sidecar, "AWS_ROLE_ARN") == {"name": "AWS_ROLE_ARN", "value": ROLE_ARN}
    assert mounts(sidecar)["aws-iam-token"]["mountPath"] == IRSA_DIR
    # Only the sidecar changed: no second sidecar, volume, annotation or env of the apps.
    without_sidecar = dict(completed["spec"], initContainers=[])
    assert without_sidecar == dict(changed["spec"], initContainers=[])
    assert completed["metadata"] == changed["metadata"]

    # A further re-invocation finds nothing missing and answers without a patch.
    final, result = modelplane(completed)
    assert (final, result) == (completed, "skipped")


def test_eks_after_injection_touching_every_container_needs_no_completion() -> None:
    """Upstream EKS mutates init containers too, so the native sidecar gets it all directly."""
    injected, _ = modelplane(app_pod())
    changed = eks(injected, POD_IDENTITY)

    assert set(POD_IDENTITY_VARIABLES) <= set(env_names(sidecar_of(changed)))
    assert sidecar_of(changed)["restartPolicy"] == "Always"
    assert complete_patch(changed) is None
    assert modelplane(changed) == (changed, "skipped")


def test_sidecar_keeps_what_it_has_and_gets_only_the_rest() -> None:
    injected, _ = modelplane(app_pod())
    sidecar = sidecar_of(injected)
    sidecar["env"].append({"name": "AWS_REGION", "value": "us-east-1"})
    sidecar["volumeMounts"].append(
        {"name": "aws-iam-token", "mountPath": IRSA_DIR, "readOnly": True}
    )
    changed = eks(injected, init_containers=False)

    completed, result = modelplane(changed)

    assert result == "updated"
    names = env_names(sidecar_of(completed))
    assert names == [
        *SIDECAR_OWN,
        "AWS_REGION",
        "AWS_STS_REGIONAL_ENDPOINTS",
        "AWS_DEFAULT_REGION",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ]
    assert env_entry(sidecar_of(completed), "AWS_REGION")["value"] == "us-east-1"
    assert [m["name"] for m in sidecar_of(completed)["volumeMounts"]].count("aws-iam-token") == 1


def test_credentials_come_from_the_first_app_container_that_has_them() -> None:
    pod = app_pod()
    pod["spec"]["containers"].insert(
        0,
        {
            "name": "region-only",
            "image": "registry.invalid/exporter:1",
            "env": [{"name": "AWS_REGION", "value": "ap-south-1"}],
        },
    )
    pod["spec"]["containers"][1]["env"] += [
        {"name": "AWS_ROLE_ARN", "valueFrom": {"configMapKeyRef": {"name": "aws", "key": "role"}}},
        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{IRSA_DIR}/token"},
    ]
    pod["spec"]["containers"][1]["volumeMounts"].append(
        {"name": "aws-iam-token", "mountPath": IRSA_DIR + "/", "readOnly": True}
    )
    pod["spec"]["volumes"].append(
        {
            "name": "aws-iam-token",
            "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]},
        }
    )

    injected, _ = modelplane(pod)

    sidecar = sidecar_of(injected)
    assert env_names(sidecar) == [*SIDECAR_OWN, "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"]
    # A variable from a ConfigMap is copied as the reference it is.
    assert env_entry(sidecar, "AWS_ROLE_ARN")["valueFrom"] == {
        "configMapKeyRef": {"name": "aws", "key": "role"}
    }
    assert mounts(sidecar)["aws-iam-token"]["mountPath"] == IRSA_DIR + "/"


def test_token_on_a_volume_that_is_not_a_token_volume_is_not_mounted_and_warned_about() -> None:
    pod = app_pod()
    pod["spec"]["containers"][0]["env"] += [
        {"name": "AWS_ROLE_ARN", "value": ROLE_ARN},
        {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/data/aws/token"},
    ]

    outcome = review_pod(review(pod), namespace_enabled=True, settings=SETTINGS, ca_bundle=CA)

    patch = json.loads(base64.b64decode(outcome.review["response"]["patch"]))
    sidecar = sidecar_of(jsonpatch.apply_patch(pod, patch))
    assert env_names(sidecar) == [*SIDECAR_OWN, "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"]
    assert "data" not in mounts(sidecar)
    assert outcome.review["response"]["warnings"] == [
        "container 'app' reads AWS_WEB_IDENTITY_TOKEN_FILE from volume 'data', which is not a "
        "ServiceAccount token volume: the modelplane sidecar does not mount it"
    ]


def test_pod_without_aws_credentials_gets_no_aws_anything() -> None:
    pod = app_pod()
    pod["spec"]["containers"][0]["env"].append({"name": "AWS_REGION", "value": "eu-west-1"})

    injected, _ = modelplane(pod)

    assert env_names(sidecar_of(injected)) == SIDECAR_OWN
    assert complete_patch(injected) is None
    assert modelplane(injected) == (injected, "skipped")


def test_reason_names_variables_and_volume_but_no_values() -> None:
    outcome = review_pod(
        review(eks(app_pod())), namespace_enabled=True, settings=SETTINGS, ca_bundle=CA
    )

    assert outcome.reason == (
        "namespace apps has injection enabled; AWS credentials of container 'app' copied into "
        "the sidecar: " + ", ".join(IRSA_VARIABLES) + ", volume aws-iam-token"
    )
    assert ROLE_ARN not in outcome.reason


def test_excluded_namespace_is_never_completed() -> None:
    injected, _ = modelplane(app_pod())
    changed = eks(injected, init_containers=False)

    assert modelplane(changed, namespace="kube-system") == (changed, "skipped")
