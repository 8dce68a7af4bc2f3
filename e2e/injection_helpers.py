"""Helpers for the injection and chart e2e tests: `helm install charts/modelplane` in url mode,
then run the operator exactly as the chart's Deployment would, as a local process.

There is no kubelet, so the Deployment the chart creates is stored but never runs. The helpers
read its container command and flags back from the apiserver and start that command locally,
authenticated as the chart's own ServiceAccount (a TokenRequest token), so the chart's flags and
its RBAC are what the test exercises. Only the listen addresses and the certificate directory
are swapped for local ones.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cluster import Cluster
from operator_helpers import MODELPLANE, Process, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "modelplane"
RUN_LABEL = "e2e.modelplane.io/injection-run"


@dataclass
class Install:
    """One `helm install` of the chart, and the local operator process serving it."""

    cluster: Cluster
    release: str
    namespace: str
    run_id: str
    webhook_port: int
    stream_port: int
    workdir: Path
    operator: Process | None = None

    @property
    def fullname(self) -> str:
        return f"{self.release}-modelplane"

    @property
    def webhook_configuration(self) -> str:
        return f"{self.fullname}-{self.namespace}-injector"

    @property
    def secret(self) -> str:
        return f"{self.fullname}-tls"

    def values(self, **extra: str) -> list[str]:
        """`--set` flags: url mode on local ports, scoped to namespaces labelled for this run."""
        scope = [{"key": RUN_LABEL, "operator": "In", "values": [self.run_id]}]
        settings = {
            "webhook.mode": "url",
            "webhook.url": f"https://127.0.0.1:{self.webhook_port}",
            "webhook.port": str(self.webhook_port),
            "operator.streamPort": str(self.stream_port),
            "operator.watchNamespaces[0]": self.namespace,
            "certificates.checkIntervalSeconds": "1",
            "operator.secretResyncSeconds": "1",
            **extra,
        }
        flags = [f"--set={key}={value}" for key, value in settings.items()]
        return [*flags, f"--set-json=webhook.namespaceSelectorExpressions={json.dumps(scope)}"]

    def helm(self, command: str, *flags: str) -> None:
        self.cluster.helm(command, self.release, str(CHART), "-n", self.namespace, *flags)

    def uninstall(self) -> None:
        self.cluster.helm("uninstall", self.release, "-n", self.namespace, "--wait")

    def deployment_command(self) -> list[str]:
        deployment = self.cluster.kubectl_json(
            "get", "deployment", self.fullname, "-n", self.namespace
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return [*container["command"], *container["args"]]

    def start_operator(self) -> Process:
        """Run the Deployment's command locally, as the chart's ServiceAccount."""
        command = self.deployment_command()
        assert command[:2] == ["modelplane", "operator"], command
        local = {
            "--host": "127.0.0.1",
            "--webhook-host": "127.0.0.1",
            "--tls-dir": str(self.workdir / "tls"),
        }
        args = []
        for arg in command[2:]:
            flag = arg.split("=", 1)[0]
            args.append(f"{flag}={local[flag]}" if flag in local else arg)
        (self.workdir / "tls").mkdir(parents=True, exist_ok=True)
        kubeconfig = self.service_account_kubeconfig()
        env = self.cluster.env({"KUBECONFIG": str(kubeconfig)})
        log = self.cluster.log_dir / f"operator-{self.release}.log"
        self.operator = Process([MODELPLANE, "operator", *args], log, env)
        return self.operator

    def service_account_kubeconfig(self) -> Path:
        token = self.cluster.kubectl(
            "create", "token", self.fullname, "-n", self.namespace, "--duration=1h"
        ).stdout.strip()
        ca = base64.b64encode(self.cluster.ca_cert.read_bytes()).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "e2e",
                    "cluster": {"server": self.cluster.server, "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "operator"}}],
            "current-context": "e2e",
        }
        path = self.workdir / "operator.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def webhook_configuration_object(self) -> dict[str, Any] | None:
        result = self.cluster.kubectl(
            "get",
            "mutatingwebhookconfiguration",
            self.webhook_configuration,
            "-o",
            "json",
            check=False,
        )
        return json.loads(result.stdout) if result.returncode == 0 else None

    def ca_bundle(self) -> str | None:
        """The caBundle both webhooks carry, once the operator has set it on both."""
        configuration = self.webhook_configuration_object() or {}
        bundles = {
            (hook.get("clientConfig") or {}).get("caBundle")
            for hook in configuration.get("webhooks", [])
        }
        return bundles.pop() if len(bundles) == 1 and None not in bundles else None

    def stored_ca(self) -> str:
        secret = self.cluster.kubectl_json("get", "secret", self.secret, "-n", self.namespace)
        ca: str = secret["data"]["ca.crt"]
        return ca

    def wait_until_serving(self, probe_namespace: str) -> None:
        """caBundle set by the operator, and the apiserver calling the webhook."""
        assert self.operator is not None

        def bundle() -> str | None:
            if not self.operator or not self.operator.alive():
                raise AssertionError(f"operator exited:\n{self.operator and self.operator.log()}")
            return self.ca_bundle()

        wait_for(bundle, "the operator to set the webhook's caBundle", timeout=60)
        # The apiserver picks up webhook configuration changes a moment later; server-side dry
        # runs go through admission and store nothing.
        wait_for(
            lambda: sidecars(dry_run_pod(self.cluster, probe_namespace)) or None,
            "the apiserver to call the injection webhook",
            timeout=60,
        )

    def teardown(self) -> None:
        if self.operator is not None:
            self.operator.stop()
        self.cluster.helm("uninstall", self.release, "-n", self.namespace, check=False)
        # Never leave a webhook configuration behind, whatever happened above.
        self.cluster.kubectl(
            "delete",
            "mutatingwebhookconfiguration",
            self.webhook_configuration,
            "--ignore-not-found",
        )
        self.cluster.delete_namespace(self.namespace)


def new_install(cluster: Cluster, workdir: Path) -> Install:
    run_id = uuid.uuid4().hex[:8]
    namespace = cluster.create_namespace("mp-system")
    return Install(
        cluster=cluster,
        release=f"mp-{run_id}",
        namespace=namespace,
        run_id=run_id,
        webhook_port=free_port(),
        stream_port=free_port(),
        workdir=workdir,
    )


def pod(name: str, **overrides: Any) -> dict[str, Any]:
    annotations = overrides.pop("annotations", None)
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}], **overrides},
    }
    if annotations:
        manifest["metadata"]["annotations"] = annotations
    return manifest


def create_pod(cluster: Cluster, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = cluster.kubectl_json(
        "create", "-n", namespace, "-f", "-", input=json.dumps(manifest)
    )
    return created


def get_pod(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    stored: dict[str, Any] = cluster.kubectl_json("get", "pod", name, "-n", namespace)
    return stored


def dry_run_pod(cluster: Cluster, namespace: str) -> dict[str, Any]:
    """A Pod created with a server-side dry run (admitted, not stored); raises if refused."""
    probe: dict[str, Any] = cluster.kubectl_json(
        "create",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps(pod(f"probe-{int(time.monotonic() * 1000)}")),
    )
    return probe


def sidecars(stored: dict[str, Any]) -> list[dict[str, Any]]:
    spec = stored.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    return [c for c in containers if c["name"] == "modelplane-sidecar"]


def env_of(container: dict[str, Any]) -> dict[str, str | None]:
    return {v["name"]: v.get("value") for v in container.get("env") or []}
