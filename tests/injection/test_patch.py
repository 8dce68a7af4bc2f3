"""The injection patch, applied with an independent RFC 6902 implementation (`jsonpatch`)."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from modelplane_operator.injection import (
    InjectionError,
    InjectionSettings,
    SidecarResources,
    SidecarSpec,
    already_injected,
    build_patch,
    should_inject,
)
from modelplane_operator.injection.patch import PLACEHOLDER_API_KEY

SETTINGS = InjectionSettings(
    image="ghcr.io/modelplane/sidecar:0.1.0",
    control_plane_url="https://modelplane-operator.modelplane.svc:8443",
)
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def inject(pod: dict[str, Any], settings: InjectionSettings = SETTINGS) -> dict[str, Any]:
    annotations = pod.get("metadata", {}).get("annotations") or {}
    spec = SidecarSpec.for_pod(settings, annotations)
    patch = build_patch(pod, spec, settings, CA).patch
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return patched


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {variable["name"]: variable.get("value") for variable in container.get("env", [])}


def sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    everything = spec.get("initContainers", []) + spec["containers"]
    return [c for c in everything if c["name"] == "modelplane-sidecar"]


def minimal_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }


def busy_pod() -> dict[str, Any]:
    """Three app containers, two init containers, env vars, volumes and annotations."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-",
            "annotations": {"team": "search", "modelplane.io/inject": "true"},
        },
        "spec": {
            "initContainers": [
                {"name": "migrate", "image": "registry.invalid/migrate:1"},
                {
                    "name": "warm",
                    "image": "registry.invalid/warm:1",
                    "env": [{"name": "A", "value": "1"}],
                },
            ],
            "containers": [
                {
                    "name": "api",
                    "image": "registry.invalid/api:1",
                    "env": [
                        {"name": "OPENAI_BASE_URL", "value": "https://proxy.example/v1"},
                        {
                            "name": "OPENAI_API_KEY",
                            "valueFrom": {"secretKeyRef": {"name": "openai", "key": "key"}},
                        },
                        {"name": "LOG_LEVEL", "value": "debug"},
                    ],
                    "ports": [{"containerPort": 8080}],
                },
                {"name": "worker", "image": "registry.invalid/worker:1", "env": []},
                {"name": "metrics", "image": "registry.invalid/exporter:1"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def test_minimal_pod_gets_a_native_sidecar_with_token_volume_and_env() -> None:
    pod = inject(minimal_pod())

    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["name"] == "modelplane-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == SETTINGS.image
    assert sidecar["command"][:2] == ["modelplane", "serve"]
    args = sidecar["command"][2:]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags == {
        "--control-plane": "https://modelplane-operator.modelplane.svc:8443",
        "--token-file": "/var/run/modelplane/token",
        "--ca-file": "/var/run/modelplane/ca.crt",
        "--state-dir": "/var/lib/modelplane",
        "--host": "127.0.0.1",
        "--port": "15000",
        "--health-port": "15021",
        "--log-level": "info",
        "--audit-log": "-",
    }
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15021}
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 65532
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["volumeMounts"] == [
        {"name": "modelplane-token", "mountPath": "/var/run/modelplane", "readOnly": True},
        {"name": "modelplane-state", "mountPath": "/var/lib/modelplane"},
    ]

    volume, state = pod["spec"]["volumes"]
    assert state == {"name": "modelplane-state", "emptyDir": {"sizeLimit": "16Mi"}}
    token, ca = volume["projected"]["sources"]
    assert token["serviceAccountToken"] == {
        "audience": "modelplane",
        "expirationSeconds": 3600,
        "path": "token",
    }
    assert ca["downwardAPI"]["items"] == [
        {
            "path": "ca.crt",
            "fieldRef": {"fieldPath": "metadata.annotations['modelplane.io/ca-bundle']"},
        }
    ]
    assert pod["metadata"]["annotations"] == {
        "modelplane.io/injected": "true",
        "modelplane.io/ca-bundle": CA,
    }
    # A projected token needs a ServiceAccount; `default` is what admission would have set.
    assert pod["spec"]["serviceAccountName"] == "default"
    (app,) = pod["spec"]["containers"]
    assert env_of(app) == {
        "OPENAI_BASE_URL": "http://127.0.0.1:15000/v1",
        "OPENAI_API_BASE": "http://127.0.0.1:15000/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:15000",
        "OPENAI_API_KEY": PLACEHOLDER_API_KEY,
        "ANTHROPIC_API_KEY": PLACEHOLDER_API_KEY,
    }


def test_busy_pod_keeps_everything_it_had_and_gets_env_in_every_container() -> None:
    original = busy_pod()
    pod = inject(copy.deepcopy(original))

    init_names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert init_names == ["modelplane-sidecar", "migrate", "warm"]
    assert pod["spec"]["initContainers"][1:] == original["spec"]["initContainers"]
    assert [v["name"] for v in pod["spec"]["volumes"]] == [
        "data",
        "modelplane-token",
        "modelplane-state",
    ]
    assert pod["metadata"]["annotations"]["team"] == "search"
    assert pod["metadata"]["generateName"] == "web-"

    api, worker, metrics = pod["spec"]["containers"]
    # The app's own settings win, in their original order; only missing variables are added.
    assert api["env"][:3] == original["spec"]["containers"][0]["env"]
    assert [v["name"] for v in api["env"][3:]] == [
        "OPENAI_API_BASE",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
    ]
    assert env_of(api)["OPENAI_BASE_URL"] == "https://proxy.example/v1"
    for container in (worker, metrics):
        assert env_of(container)["OPENAI_BASE_URL"] == "http://127.0.0.1:15000/v1"
        assert len(container["env"]) == 5
    # Init containers are not app containers.
    assert pod["spec"]["initContainers"][2]["env"] == [{"name": "A", "value": "1"}]
    assert api["ports"] == [{"containerPort": 8080}]


def test_existing_service_account_is_kept() -> None:
    pod = minimal_pod()
    pod["spec"]["serviceAccountName"] = "search-api"
    assert inject(pod)["spec"]["serviceAccountName"] == "search-api"


def test_app_that_sets_its_own_base_url_gets_a_warning() -> None:
    pod = busy_pod()
    injection = build_patch(pod, SidecarSpec.for_pod(SETTINGS, {}), SETTINGS, CA)

    assert injection.warnings == [
        "container 'api' sets OPENAI_BASE_URL itself; its calls go where that says, not "
        "necessarily through the modelplane sidecar"
    ]


def test_injected_pod_is_recognised_and_never_injected_twice() -> None:
    for original in (minimal_pod(), busy_pod()):
        once = inject(original)
        assert already_injected(once)
        decision = should_inject(once, "apps", namespace_enabled=True, settings=SETTINGS)
        assert (decision.inject, decision.reason) == (
            False,
            "the Pod already has the modelplane sidecar",
        )
        assert len(sidecars(once)) == 1


def test_patch_is_deterministic() -> None:
    spec = SidecarSpec.for_pod(SETTINGS, {})
    assert build_patch(busy_pod(), spec, SETTINGS, CA) == build_patch(
        busy_pod(), spec, SETTINGS, CA
    )


def test_sidecar_copied_by_hand_without_annotation_still_counts_as_injected() -> None:
    pod = inject(minimal_pod())
    del pod["metadata"]["annotations"]["modelplane.io/injected"]
    assert already_injected(pod)


def test_empty_lists_and_missing_annotations_are_handled() -> None:
    pod = minimal_pod()
    pod["spec"]["initContainers"] = []
    pod["spec"]["volumes"] = []
    pod["metadata"]["annotations"] = {}

    patched = inject(pod)

    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["modelplane-sidecar"]
    assert [v["name"] for v in patched["spec"]["volumes"]] == [
        "modelplane-token",
        "modelplane-state",
    ]
    assert set(patched["metadata"]["annotations"]) == {
        "modelplane.io/injected",
        "modelplane.io/ca-bundle",
    }


def test_annotations_override_port_image_and_resources() -> None:
    pod = minimal_pod()
    pod["metadata"]["annotations"] = {
        "modelplane.io/sidecar-port": "16000",
        "modelplane.io/sidecar-health-port": "16001",
        "modelplane.io/sidecar-image": "registry.invalid/sidecar:dev",
        "modelplane.io/sidecar-cpu-request": "250m",
        "modelplane.io/sidecar-memory-limit": "1Gi",
    }

    patched = inject(pod)

    (sidecar,) = patched["spec"]["initContainers"]
    assert sidecar["image"] == "registry.invalid/sidecar:dev"
    assert sidecar["command"][sidecar["command"].index("--port") + 1] == "16000"
    assert sidecar["readinessProbe"]["httpGet"]["port"] == 16001
    assert sidecar["resources"] == {
        "requests": {"cpu": "250m", "memory": "128Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert env_of(patched["spec"]["containers"][0])["OPENAI_BASE_URL"] == (
        "http://127.0.0.1:16000/v1"
    )


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"modelplane.io/sidecar-port": "http"},
            "annotation modelplane.io/sidecar-port: 'http' is not a port number",
        ),
        (
            {"modelplane.io/sidecar-port": "70000"},
            "annotation modelplane.io/sidecar-port must be a port number between 1 and 65535, "
            "not 70000",
        ),
        (
            {"modelplane.io/sidecar-port": "15021"},
            "the sidecar port and health port are both 15021",
        ),
        (
            {"modelplane.io/sidecar-memory-limit": "lots"},
            "modelplane.io/sidecar-memory-limit must be a Kubernetes quantity",
        ),
        (
            {"modelplane.io/sidecar-image": "has space:1"},
            "annotation modelplane.io/sidecar-image: 'has space:1' is not an image",
        ),
    ],
)
def test_bad_annotations_name_the_annotation(annotations: dict[str, str], message: str) -> None:
    with pytest.raises(InjectionError, match="^" + message.replace("(", r"\(")):
        SidecarSpec.for_pod(SETTINGS, annotations)


def test_port_conflict_with_an_app_container_is_refused() -> None:
    pod = minimal_pod()
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 15000}]

    with pytest.raises(InjectionError, match="container 'app' declares containerPort 15000"):
        build_patch(pod, SidecarSpec.for_pod(SETTINGS, {}), SETTINGS, CA)


@pytest.mark.parametrize("name", ["modelplane-token", "modelplane-state"])
def test_volume_name_conflict_is_refused(name: str) -> None:
    pod = minimal_pod()
    pod["spec"]["volumes"] = [{"name": name, "emptyDir": {}}]

    with pytest.raises(InjectionError, match=f"already has a volume named {name}"):
        build_patch(pod, SidecarSpec.for_pod(SETTINGS, {}), SETTINGS, CA)


def test_annotation_keys_are_escaped_in_json_pointers() -> None:
    pod = minimal_pod()
    pod["metadata"]["annotations"] = {"a/b~c": "kept"}

    patch = build_patch(pod, SidecarSpec.for_pod(SETTINGS, {}), SETTINGS, CA).patch

    paths = [op["path"] for op in patch if op["path"].startswith("/metadata")]
    assert paths == [
        "/metadata/annotations/modelplane.io~1injected",
        "/metadata/annotations/modelplane.io~1ca-bundle",
    ]
    assert jsonpatch.apply_patch(pod, patch)["metadata"]["annotations"]["a/b~c"] == "kept"


def test_settings_reject_bad_values_with_a_clear_message() -> None:
    with pytest.raises(InjectionError, match="must be an https:// URL"):
        InjectionSettings(image="x:1", control_plane_url="http://operator:8443")
    with pytest.raises(InjectionError, match="at least 600 seconds"):
        InjectionSettings(image="x:1", control_plane_url="https://o:1", token_expiration_seconds=60)
    with pytest.raises(InjectionError, match="non-root uid"):
        InjectionSettings(image="x:1", control_plane_url="https://o:1", run_as_user=0)
    with pytest.raises(InjectionError, match="sidecar memory limit must be a Kubernetes quantity"):
        SidecarResources(memory_limit="256MB")
