"""Self-hosted models against the real apiserver: EndpointSlices -> the sidecar's replicas,
readiness followed within seconds, and the vLLM template's Deployment + Service with honest
readiness in status.

A selector-less Service and hand-written EndpointSlices stand for a model server's pods (there
is no kubelet here). The apiserver refuses loopback addresses in EndpointSlices, and this test
may send traffic to loopback only, so the addresses are from the documentation range
192.0.2.0/24 and are never contacted: the endpoint has no engine (nothing is scraped), routing
is read through the explain endpoint, and the only chat request is sent when no replica is
ready (the sidecar refuses it itself). Real traffic over replicas, and the operator's shared
scrape, are exercised on loopback in tests/selfhosted/ and tests/operator/test_selfhosted.py.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from cluster import CertFiles, Cluster
from operator_helpers import Operator, Sidecar, apply, get, wait_for


def endpoint_slice(name: str, address: str, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "llama"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": ready}, "zone": "z1"}],
    }


def shipped_replicas(sidecar: Sidecar) -> list[tuple[str, bool]] | None:
    """The replicas of endpoint llama in the config the sidecar runs (its last-known-good)."""
    try:
        stored = json.loads((sidecar.state_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for endpoint in stored["config"]["endpoints"]:
        if endpoint["name"] == "llama":
            return [(r["url"], r["ready"]) for r in endpoint.get("replicas") or []]
    return None


def explained_replicas(sidecar: Sidecar) -> list[tuple[str, bool]]:
    """The replicas routing would choose among, from the sidecar's explain endpoint."""
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        sidecar.base_url + "/v1/modelplane/explain", data=body.encode(), method="POST"
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as resp:
        trace = json.loads(resp.read())
    return [(r["url"], r["ready"]) for r in (trace["replicas"] or {}).get("llama", [])]


def config_source(sidecar: Sidecar) -> str:
    """Where the config the sidecar serves came from (its modelplane_config_info metric)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(sidecar.base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'^modelplane_config_info\{[^}]*source="([^"]*)"', text, re.MULTILINE)
    return found.group(1) if found else ""


def replica_status(cluster: Cluster, namespace: str) -> dict[str, int] | None:
    status = get(cluster, namespace, "modelendpoint", "llama").get("status") or {}
    replicas: dict[str, int] | None = status.get("replicas")
    return replicas


def set_ready(cluster: Cluster, namespace: str, name: str, ready: bool) -> None:
    patch = [{"op": "replace", "path": "/endpoints/0/conditions/ready", "value": ready}]
    cluster.kubectl(
        "patch", "endpointslice", name, "-n", namespace, "--type=json", "-p", json.dumps(patch)
    )


A = "http://192.0.2.10:8000/v1"
B = "http://192.0.2.11:8000/v1"


def test_endpoint_slices_reach_the_sidecar_and_unready_addresses_leave_routing(
    cluster: Cluster, namespace: str, crds: None, operator_cert: CertFiles, tmp_path: Path
) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "llama"},
            "spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "modelplane.io/v1alpha1",
            "kind": "ModelEndpoint",
            "metadata": {"name": "llama"},
            "spec": {
                "provider": "openai-compatible",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "serviceRef": {"name": "llama", "port": 8000},
                "compliance": ["on-prem"],
            },
        },
        {
            "apiVersion": "modelplane.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "routes"},
            "spec": {"models": [{"name": "chat", "targets": [{"endpoint": "llama"}]}]},
        },
        endpoint_slice("llama-a", "192.0.2.10", ready=True),
        endpoint_slice("llama-b", "192.0.2.11", ready=True),
    )
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    sidecar: Sidecar | None = None
    try:
        sidecar = Sidecar.for_account(operator, namespace, tmp_path / "s", "app")
        running = sidecar
        wait_for(
            lambda: shipped_replicas(running) == [(A, True), (B, True)],
            "both ready addresses in the sidecar's config",
        )
        assert explained_replicas(running) == [(A, True), (B, True)]
        assert wait_for(lambda: replica_status(cluster, namespace), "status.replicas") == {
            "ready": 2,
            "total": 2,
        }
        ready = get(cluster, namespace, "modelendpoint", "llama")["status"]["conditions"][0]
        assert ready["message"] == f"Service {namespace}/llama: 2 of 2 replicas ready"

        # A pod becomes unready: within seconds routing no longer considers it. Only replicas
        # changed, so it came as a replica update, not a full snapshot (docs/operator.md).
        set_ready(cluster, namespace, "llama-b", False)
        wait_for(lambda: explained_replicas(running) == [(A, True), (B, False)], "B unready")
        assert config_source(running).startswith("control-plane-replicas:")
        wait_for(
            lambda: shipped_replicas(running) == [(A, True), (B, False)],
            "the update in the last-known-good file",
        )
        wait_for(
            lambda: replica_status(cluster, namespace) == {"ready": 1, "total": 2},
            "status.replicas after the change",
        )

        # Both unready: the sidecar refuses by itself, naming why; nothing is sent anywhere.
        set_ready(cluster, namespace, "llama-a", False)
        wait_for(lambda: explained_replicas(running) == [(A, False), (B, False)], "A unready")
        with pytest.raises(openai.InternalServerError) as refused:
            running.client().chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hello"}]
            )
        assert refused.value.status_code == 503
        error = refused.value.response.json()["error"]
        assert error["code"] == "no_endpoint_available"
        assert "llama: no ready replica (0 of 2 ready)" in error["message"]

        # Ready again, then a slice deleted: the address leaves the config altogether.
        set_ready(cluster, namespace, "llama-a", True)
        cluster.kubectl("delete", "endpointslice", "llama-b", "-n", namespace)
        wait_for(lambda: shipped_replicas(running) == [(A, True)], "the deleted slice")
    finally:
        if sidecar is not None:
            sidecar.stop()
        operator.stop()


def test_a_template_creates_the_vllm_deployment_and_service_and_reports_readiness(
    cluster: Cluster, namespace: str, crds: None, operator_cert: CertFiles, tmp_path: Path
) -> None:
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "modelplane.io/v1alpha1",
            "kind": "ModelEndpoint",
            "metadata": {"name": "llama-70b"},
            "spec": {
                "provider": "openai-compatible",
                "model": "llama-3.1-70b",
                "template": {
                    "model": "meta-llama/Llama-3.1-70B-Instruct",
                    "gpus": 4,
                    "replicas": 2,
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                },
            },
        },
    )
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    try:
        deployment = wait_for(
            lambda: cluster.kubectl_json(
                "get", "deployments", "-n", namespace, "-l", "modelplane.io/endpoint=llama-70b"
            )["items"],
            "the Deployment",
        )[0]
        owner = deployment["metadata"]["ownerReferences"][0]
        endpoint = get(cluster, namespace, "modelendpoint", "llama-70b")
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "ModelEndpoint",
            "llama-70b",
            endpoint["metadata"]["uid"],
        )
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
        assert deployment["spec"]["replicas"] == 2
        assert deployment["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        service = get(cluster, namespace, "service", "llama-70b")
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

        # No kube-controller-manager or kubelet here: nothing is ready, and status says so.
        workload = wait_for(
            lambda: (get(cluster, namespace, "modelendpoint", "llama-70b").get("status") or {}).get(
                "workload"
            ),
            "status.workload",
        )
        assert (workload["replicas"], workload["readyReplicas"]) == (2, 0)
        assert workload["message"].startswith("0/2 ready")
        assert workload["deployment"] == workload["service"] == "llama-70b"
    finally:
        operator.stop()


def test_the_self_hosted_examples_pass_the_crd_schema(
    cluster: Cluster, namespace: str, crds: None
) -> None:
    examples = Path(__file__).resolve().parents[1] / "examples" / "selfhosted"
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(examples))
    assert result.stdout.count("(server dry run)") == 4
    # The CEL rules of the new fields hold: one of baseURL/serviceRef/template, and overflow
    # needs a threshold.
    both = {
        "apiVersion": "modelplane.io/v1alpha1",
        "kind": "ModelEndpoint",
        "metadata": {"name": "both"},
        "spec": {
            "provider": "openai-compatible",
            "model": "m",
            "serviceRef": {"name": "s", "port": 8000},
            "template": {"gpus": 1},
        },
    }
    refused = cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(both), check=False
    )
    assert "exactly one of baseURL, serviceRef or template must be set" in refused.stderr
    no_threshold = {
        "apiVersion": "modelplane.io/v1alpha1",
        "kind": "RoutingPolicy",
        "metadata": {"name": "p"},
        "spec": {
            "models": [
                {
                    "name": "chat",
                    "targets": [{"endpoint": "a"}],
                    "overflow": {"targets": [{"endpoint": "b"}]},
                }
            ]
        },
    }
    refused = cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-",
        input=json.dumps(no_threshold), check=False,
    )  # fmt: skip
    assert "overflow needs maxQueueDepth or maxPredictedWaitSeconds" in refused.stderr
