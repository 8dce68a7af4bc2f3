"""Secrets and the chart on the real apiserver: what the operator may read, a rotated API key
without a Secret watch, and the audit signing key mounted into injected sidecars.

The chart is installed in url mode with `operator.watchNamespaces` (the release namespace and one
app namespace) and `sidecar.auditSigningKey.existingSecret`; its Deployment's command runs as a
local process with the chart's own ServiceAccount, so the chart's RBAC is what is exercised. The
sidecar is `modelplane serve --control-plane`, the app the openai SDK, the upstream a stand-in.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster import Cluster
from injection_helpers import RUN_LABEL, Install, create_pod, get_pod, new_install, pod, sidecars
from operator_helpers import (
    MODELPLANE,
    Sidecar,
    StandIns,
    apply,
    endpoint,
    install_crds,
    policy,
    secret,
    service_account_token,
    wait_for,
)

from modelplane_sidecar.standins.openai import OpenAIStandIn

AUDIT_SECRET = "mp-audit-key"


@dataclass
class Deployed:
    install: Install
    #: Watched by the operator, labelled for injection, holds the audit key Secret.
    apps: str
    #: Not watched: the operator must not be able to read its Secrets.
    elsewhere: str


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    install_crds(cluster)
    install = new_install(cluster, tmp_path_factory.mktemp("chart-secrets"))
    labels = {"modelplane.io/inject": "enabled", RUN_LABEL: install.run_id}
    apps = cluster.create_namespace("e2e-apps", labels)
    elsewhere = cluster.create_namespace("e2e-elsewhere")
    try:
        install.helm(
            "install",
            *install.values(
                **{
                    "operator.watchNamespaces[1]": apps,
                    "sidecar.auditSigningKey.existingSecret": AUDIT_SECRET,
                }
            ),
        )
        install.start_operator()
        install.wait_until_serving(apps)
        yield Deployed(install, apps, elsewhere)
    finally:
        install.teardown()
        cluster.delete_namespace(apps)
        cluster.delete_namespace(elsewhere)


def can_i(deployed: Deployed, verb: str, *where: str, resource: str = "secrets") -> bool:
    """`kubectl auth can-i` as the chart's ServiceAccount (the admin may impersonate it)."""
    install = deployed.install
    account = f"system:serviceaccount:{install.namespace}:{install.fullname}"
    result = install.cluster.kubectl(
        "auth", "can-i", verb, resource, *where, f"--as={account}", check=False
    )
    answer = result.stdout.strip()
    assert answer in ("yes", "no"), result.stderr
    return answer == "yes"


def test_the_operator_may_get_secrets_of_watched_namespaces_and_never_list_or_watch(
    deployed: Deployed,
) -> None:
    apps, elsewhere, release = deployed.apps, deployed.elsewhere, deployed.install.namespace
    # The apiserver's authorizer learns of new Roles through a watch: allow it a moment.
    wait_for(lambda: can_i(deployed, "get", "-n", apps) or None, "the Role in the app namespace")
    assert not can_i(deployed, "list", "-n", apps)
    assert not can_i(deployed, "watch", "-n", apps)
    assert not can_i(deployed, "get", "-n", elsewhere)
    assert not can_i(deployed, "list", "--all-namespaces")
    assert not can_i(deployed, "watch", "--all-namespaces")
    # Its own certificate Secret (the release namespace is watched here too, so `get` there is
    # not limited to it by name); never a list or a watch there either.
    assert can_i(deployed, "get", "-n", release, resource=f"secrets/{deployed.install.secret}")
    assert not can_i(deployed, "list", "-n", release)


def test_a_rotated_api_key_reaches_the_sidecar_without_a_secret_watch(
    deployed: Deployed, servers: StandIns, tmp_path: Path
) -> None:
    cluster, apps = deployed.install.cluster, deployed.apps
    standin = OpenAIStandIn("upstream", api_key="sk-before-rotation")
    upstream = servers.start(standin)
    apply(
        cluster,
        apps,
        secret("openai", "sk-before-rotation"),
        endpoint("gpt", upstream, "openai"),
        policy("routes", "chat", "gpt"),
    )
    ca = tmp_path / "ca.crt"
    ca.write_bytes(base64.b64decode(deployed.install.stored_ca()))
    sidecar = Sidecar(
        cluster,
        f"https://127.0.0.1:{deployed.install.stream_port}",
        service_account_token(cluster, apps, "app"),
        ca,
        tmp_path / "sidecar",
        "app",
    )
    try:
        first = wait_for(sidecar.version, "the sidecar's first config", timeout=60)

        def ask() -> str:
            reply = sidecar.client().chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hello"}]
            )
            return reply.choices[0].message.content or ""

        assert standin.reply in ask()
        assert standin.received[-1].headers["Authorization"] == "Bearer sk-before-rotation"

        # Rotate the key: the provider accepts only the new one from now on.
        standin.api_key = "sk-after-rotation"
        apply(cluster, apps, secret("openai", "sk-after-rotation"))
        wait_for(lambda: sidecar.version() not in (None, first), "the rotated key's version")
        assert standin.reply in ask()
        assert standin.received[-1].headers["Authorization"] == "Bearer sk-after-rotation"
    finally:
        sidecar.stop()


def test_injected_sidecars_mount_the_audit_signing_key_secret(
    deployed: Deployed, tmp_path: Path
) -> None:
    cluster, apps = deployed.install.cluster, deployed.apps
    # What the platform team does once per namespace: make a key, keep its public half.
    key_file = tmp_path / "signing-key.pem"
    made = subprocess.run(
        [MODELPLANE, "audit", "keygen", "--out", str(key_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    published = made.stdout.strip()
    cluster.kubectl(
        "create", "secret", "generic", AUDIT_SECRET, "-n", apps,
        f"--from-file=signing-key.pem={key_file}",
    )  # fmt: skip

    created = create_pod(cluster, apps, pod("audited"))
    stored = get_pod(cluster, apps, "audited")

    assert created["spec"] == stored["spec"]
    (sidecar,) = sidecars(stored)
    command = sidecar["command"]
    assert command[command.index("--audit-log") + 1] == "-"
    key_path = command[command.index("--audit-key") + 1]
    assert key_path == "/var/run/modelplane-audit/signing-key.pem"
    volumes = {v["name"]: v for v in stored["spec"]["volumes"]}
    assert volumes["modelplane-audit-key"]["secret"] == {
        "secretName": AUDIT_SECRET,
        "items": [{"key": "signing-key.pem", "path": "signing-key.pem", "mode": 0o444}],
        # The apiserver's defaults for a Secret volume.
        "defaultMode": 0o644,
    }
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["modelplane-audit-key"]["mountPath"] == "/var/run/modelplane-audit"
    assert mounts["modelplane-audit-key"]["readOnly"] is True
    # The app container neither mounts the key nor gets it through its environment.
    (app,) = stored["spec"]["containers"]
    assert "modelplane-audit-key" not in {m["name"] for m in app.get("volumeMounts") or []}
    assert "envFrom" not in app and "envFrom" not in sidecar
    for container in (app, sidecar):
        for variable in container.get("env") or []:
            assert "secretKeyRef" not in (variable.get("valueFrom") or {})
    assert "PRIVATE KEY" not in json.dumps(stored)

    # The file the kubelet would write from the Secret is the key whose public half was
    # published: `audit verify --public-key` with that value checks this sidecar's trail.
    stored_secret = cluster.kubectl_json("get", "secret", AUDIT_SECRET, "-n", apps)
    mounted = tmp_path / "mounted-signing-key.pem"
    mounted.write_bytes(base64.b64decode(stored_secret["data"]["signing-key.pem"]))
    shown = subprocess.run(
        [MODELPLANE, "audit", "public-key", str(mounted)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert shown.stdout.strip() == published
