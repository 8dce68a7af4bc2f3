"""The audit signing key in the injection patch: a Secret of the Pod's namespace, mounted as a file
into the sidecar container alone and named by `--audit-key`; never an environment variable.

Patches are applied with an independent RFC 6902 implementation (`jsonpatch`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import jsonpatch
import pytest

from modelplane_operator.injection import (
    InjectionError,
    InjectionSettings,
    SidecarSpec,
    build_patch,
)
from modelplane_operator.injection.cli import (
    add_tls_arguments,
    add_webhook_arguments,
    settings_from_args,
)
from modelplane_operator.injection.settings import AuditSigningKey

BASE = {
    "image": "ghcr.io/modelplane/sidecar:0.1.0",
    "control_plane_url": "https://modelplane-operator.modelplane.svc:8443",
}
WITH_KEY = InjectionSettings(**BASE, audit_signing_key=AuditSigningKey("mp-audit", "ed25519.pem"))
WITHOUT_KEY = InjectionSettings(**BASE)
CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}], **spec},
    }


def _inject(pod: dict[str, Any], settings: InjectionSettings) -> dict[str, Any]:
    patch = build_patch(pod, SidecarSpec.for_pod(settings, {}), settings, CA).patch
    patched: dict[str, Any] = jsonpatch.apply_patch(pod, patch)
    return patched


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "modelplane-sidecar"]
    return sidecar


def test_the_key_secret_is_mounted_into_the_sidecar_and_named_by_audit_key() -> None:
    pod = _inject(_pod(), WITH_KEY)

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["modelplane-audit-key"] == {
        "name": "modelplane-audit-key",
        "secret": {
            "secretName": "mp-audit",
            "items": [{"key": "ed25519.pem", "path": "signing-key.pem", "mode": 0o444}],
        },
    }
    sidecar = _sidecar(pod)
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "modelplane-audit-key")
    assert mount == {
        "name": "modelplane-audit-key",
        "mountPath": "/var/run/modelplane-audit",
        "readOnly": True,
    }
    command = sidecar["command"]
    assert command[command.index("--audit-log") + 1] == "-"
    assert command[command.index("--audit-key") + 1] == "/var/run/modelplane-audit/signing-key.pem"


def test_only_the_sidecar_mounts_the_key_and_no_environment_carries_it() -> None:
    pod = _inject(
        _pod(
            initContainers=[{"name": "migrate", "image": "registry.invalid/migrate:1"}],
            volumes=[{"name": "data", "emptyDir": {}}],
        ),
        WITH_KEY,
    )

    spec = pod["spec"]
    for container in [*spec["initContainers"], *spec["containers"]]:
        mounts = {m["name"] for m in container.get("volumeMounts") or []}
        assert ("modelplane-audit-key" in mounts) == (container["name"] == "modelplane-sidecar")
        assert "envFrom" not in container
        for variable in container.get("env") or []:
            assert "secretKeyRef" not in (variable.get("valueFrom") or {})
    # The Pod spec names the Secret, never holds its content.
    assert "PRIVATE KEY" not in json.dumps(pod)
    assert [v["name"] for v in spec["volumes"]] == [
        "data",
        "modelplane-token",
        "modelplane-state",
        "modelplane-audit-key",
    ]


def test_without_a_key_nothing_is_mounted_and_each_run_makes_its_own() -> None:
    pod = _inject(_pod(), WITHOUT_KEY)

    assert [v["name"] for v in pod["spec"]["volumes"]] == ["modelplane-token", "modelplane-state"]
    sidecar = _sidecar(pod)
    assert "--audit-key" not in sidecar["command"]
    assert "--audit-log" in sidecar["command"]


def test_a_pod_volume_with_the_key_volume_name_is_refused_only_when_a_key_is_set() -> None:
    pod = _pod(volumes=[{"name": "modelplane-audit-key", "emptyDir": {}}])

    with pytest.raises(InjectionError, match="already has a volume named modelplane-audit-key"):
        build_patch(pod, SidecarSpec.for_pod(WITH_KEY, {}), WITH_KEY, CA)
    assert _inject(pod, WITHOUT_KEY)["spec"]["volumes"][0]["name"] == "modelplane-audit-key"


@pytest.mark.parametrize(
    ("secret", "key", "message"),
    [
        ("MP_Audit", "signing-key.pem", "must be a Secret name"),
        ("", "signing-key.pem", "must be a Secret name"),
        ("mp-audit", "keys/signing.pem", "must be letters, digits"),
    ],
)
def test_bad_secret_names_and_keys_are_refused(secret: str, key: str, message: str) -> None:
    with pytest.raises(InjectionError, match=message):
        AuditSigningKey(secret, key)


def test_a_key_without_the_audit_log_is_refused() -> None:
    with pytest.raises(InjectionError, match="the sidecar audit log is off"):
        InjectionSettings(**BASE, audit_log=False, audit_signing_key=AuditSigningKey("mp-audit"))


def _parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_tls_arguments(parser)
    add_webhook_arguments(parser, required=True)
    return parser.parse_args(
        [
            "--sidecar-image=ghcr.io/modelplane/sidecar:0.1.0",
            "--control-plane-url=https://mp.modelplane.svc:8443",
            "--tls-namespace=modelplane",
            "--tls-service=mp",
            *flags,
        ]
    )


def test_the_operator_flags_set_the_key_secret() -> None:
    injection, _ = settings_from_args(
        _parse("--sidecar-audit-key-secret=mp-audit", "--sidecar-audit-key-secret-key=k.pem")
    )
    assert injection.audit_signing_key == AuditSigningKey("mp-audit", "k.pem")

    default, _ = settings_from_args(_parse("--sidecar-audit-key-secret=mp-audit"))
    assert default.audit_signing_key == AuditSigningKey("mp-audit", "signing-key.pem")
    assert settings_from_args(_parse())[0].audit_signing_key is None
    with pytest.raises(InjectionError, match="the sidecar audit log is off"):
        settings_from_args(_parse("--sidecar-audit-key-secret=mp-audit", "--no-sidecar-audit-log"))
