"""The chart's life cycle against the real apiserver: lint, install, an operator outage under both
failure policies, upgrade, uninstall. Nothing may be left behind that blocks Pod creation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from cluster import Cluster, CommandFailed
from injection_helpers import (
    CHART,
    RUN_LABEL,
    Install,
    create_pod,
    get_pod,
    new_install,
    pod,
    sidecars,
)
from operator_helpers import wait_for


@pytest.fixture
def install(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    installed = new_install(cluster, tmp_path_factory.mktemp("chart"))
    try:
        yield installed
    finally:
        installed.teardown()


@pytest.fixture
def labelled(cluster: Cluster, install: Install) -> Iterator[str]:
    """Installed, the operator running, and a labelled namespace where injection works."""
    install.helm("install", *install.values())
    install.start_operator()
    labels = {"modelplane.io/inject": "enabled", RUN_LABEL: install.run_id}
    namespace = cluster.create_namespace("e2e-chart", labels)
    install.wait_until_serving(namespace)
    yield namespace
    cluster.delete_namespace(namespace)


def test_chart_lints_clean(cluster: Cluster) -> None:
    result = cluster.helm("lint", "--strict", str(CHART))
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses duplicate keys (a template bug other parsers hide)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    keys = [loader.construct_object(key) for key, _ in node.value]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    assert not duplicates, f"duplicate keys {duplicates} at line {node.start_mark.line + 1}"
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def test_every_option_renders_objects_the_apiserver_accepts(
    cluster: Cluster, namespace: str
) -> None:
    rendered = cluster.helm(
        "template",
        "full",
        str(CHART),
        "-n",
        namespace,
        "--set=networkPolicy.enabled=true",
        "--set=metrics.serviceMonitor.enabled=true",
        "--set=webhook.failurePolicy=Fail",
        "--set=operator.replicas=2",
        f"--set=operator.watchNamespaces[0]={namespace}",
        "--set=sidecar.auditSigningKey.existingSecret=modelplane-audit-key",
    ).stdout
    objects = [o for o in yaml.load_all(rendered, Loader=_StrictLoader) if o]

    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "MutatingWebhookConfiguration",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount",
            "ServiceMonitor",
        ]
    )
    # No Prometheus Operator here: everything but the ServiceMonitor goes to the apiserver.
    accepted = [o for o in objects if o["kind"] != "ServiceMonitor"]
    result = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input=yaml.safe_dump_all(accepted),
    )
    assert result.stdout.count("created (server dry run)") == len(accepted)
    # Secrets: get only, and only in the watched namespace; the audit key reaches the webhook.
    secret_rules = [
        rule
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
        for rule in o["rules"]
        if "secrets" in rule["resources"]
    ]
    assert all(set(rule["verbs"]) <= {"get", "create", "update"} for rule in secret_rules)
    (cluster_role,) = [o for o in objects if o["kind"] == "ClusterRole"]
    assert not any("secrets" in rule["resources"] for rule in cluster_role["rules"])
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--sidecar-audit-key-secret=modelplane-audit-key" in args


def test_operator_outage_blocks_pods_only_with_failure_policy_fail(
    cluster: Cluster, install: Install, labelled: str
) -> None:
    namespace = labelled
    assert install.operator is not None
    install.operator.stop()

    # Ignore (the default): the Pod is created, without the sidecar.
    create_pod(cluster, namespace, pod("during-outage"))
    assert sidecars(get_pod(cluster, namespace, "during-outage")) == []

    install.helm("upgrade", *install.values(**{"webhook.failurePolicy": "Fail"}))
    policies = {
        hook["failurePolicy"] for hook in install.webhook_configuration_object()["webhooks"]
    }
    assert policies == {"Fail"}
    with pytest.raises(CommandFailed) as refused:
        create_pod(cluster, namespace, pod("refused"))
    assert "failed calling webhook" in refused.value.result.stderr


def test_upgrade_keeps_injection_working_and_uninstall_removes_the_webhook(
    cluster: Cluster, install: Install, labelled: str
) -> None:
    namespace = labelled
    bundle = install.ca_bundle()

    install.helm("upgrade", *install.values(**{"sidecar.resources.limits.memory": "384Mi"}))

    # The chart leaves caBundle to the operator: an upgrade must not take it away.
    assert install.ca_bundle() == bundle
    assert "--sidecar-memory-limit=384Mi" in install.deployment_command()
    # A rollout: the operator restarts with the upgraded Deployment's flags.
    assert install.operator is not None
    install.operator.stop()
    install.start_operator()
    names = (f"after-upgrade-{i}" for i in itertools.count())

    def injected_with_new_limit() -> bool:
        # Until the new process listens, Pods are created without the sidecar (Ignore).
        found = sidecars(create_pod(cluster, namespace, pod(next(names))))
        return bool(found) and found[0]["resources"]["limits"]["memory"] == "384Mi"

    wait_for(injected_with_new_limit, "Pods injected with the upgraded settings")
    # Same Secret, same CA: Pods injected before the upgrade keep trusting the operator.
    assert install.ca_bundle() == bundle

    install.uninstall()

    assert install.webhook_configuration_object() is None
    leftovers = cluster.kubectl_json(
        "get",
        "mutatingwebhookconfigurations,clusterroles,clusterrolebindings",
        "-l",
        f"app.kubernetes.io/instance={install.release}",
    )
    assert leftovers["items"] == []
    install.operator.stop()
    created = create_pod(cluster, namespace, pod("after-uninstall"))
    assert sidecars(created) == []


def test_bad_values_are_refused_with_a_clear_message(cluster: Cluster) -> None:
    result = cluster.helm("template", "x", str(CHART), "--set", "webhook.mode=url", check=False)
    assert result.returncode != 0
    assert "webhook.mode=url needs webhook.url" in result.stderr
    result = cluster.helm(
        "template",
        "x",
        str(CHART),
        "--set=operator.replicas=2",
        "--set=operator.leaderElection.enabled=false",
        check=False,
    )
    assert "operator.replicas > 1 needs operator.leaderElection.enabled=true" in result.stderr
