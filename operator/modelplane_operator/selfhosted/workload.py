"""The model server the operator runs for a ModelEndpoint's `template`: a vLLM Deployment and
its Service, both owned by the ModelEndpoint (deleted with it by the garbage collector).

Manifests are pure functions of the spec; the controller applies them with server-side apply
(field manager `modelplane`), so edits by others to fields we do not set survive, and reads the
Deployment's status back into the ModelEndpoint's `status.workload`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..crd_models import API_VERSION, MODEL_ENDPOINT, ModelEndpointSpec, ServerTemplate, ServiceRef

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "modelplane"
ENDPOINT_LABEL = "modelplane.io/endpoint"
PORT_NAME = "http"


def workload_name(endpoint: str) -> str:
    """A DNS-1035 label (Service names allow no dots) derived from the endpoint's name."""
    name = re.sub(r"[^a-z0-9-]", "-", endpoint.lower()).strip("-")
    name = name if name[:1].isalpha() else f"m-{name}"
    return name[:63].rstrip("-")


def template_service_ref(name: str, template: ServerTemplate) -> ServiceRef:
    return ServiceRef.model_validate(
        {"name": workload_name(name), "port": template.port, "engine": "vllm"}
    )


def _labels(endpoint: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/instance": workload_name(endpoint),
        MANAGED_BY: MANAGER,
        ENDPOINT_LABEL: endpoint,
    }


def _owner(endpoint: str, uid: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": API_VERSION,
            "kind": MODEL_ENDPOINT.kind,
            "name": endpoint,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def deployment(endpoint: str, uid: str, spec: ModelEndpointSpec) -> dict[str, Any]:
    template = spec.template
    assert template is not None
    labels = _labels(endpoint)
    args = [
        "--model",
        template.model or spec.model,
        "--served-model-name",
        spec.model,
        "--port",
        str(template.port),
    ]
    if template.gpus > 1:
        args += ["--tensor-parallel-size", str(template.gpus)]
    args += list(template.args)
    resources: dict[str, Any] = {}
    if template.gpus:
        resources = {"limits": {"nvidia.com/gpu": str(template.gpus)}}
    container: dict[str, Any] = {
        "name": "vllm",
        "image": template.image,
        "args": args,
        "ports": [{"name": PORT_NAME, "containerPort": template.port, "protocol": "TCP"}],
        "resources": resources,
        "readinessProbe": {
            "httpGet": {"path": "/health", "port": PORT_NAME},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 180,
        },
    }
    if template.env_from_secret is not None:
        container["envFrom"] = [{"secretRef": {"name": template.env_from_secret}}]
    pod_spec: dict[str, Any] = {"containers": [container]}
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in template.tolerations
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload_name(endpoint),
            "labels": labels,
            "ownerReferences": _owner(endpoint, uid),
        },
        "spec": {
            "replicas": template.replicas,
            "selector": {"matchLabels": {ENDPOINT_LABEL: endpoint, MANAGED_BY: MANAGER}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def service(endpoint: str, uid: str, spec: ModelEndpointSpec) -> dict[str, Any]:
    template = spec.template
    assert template is not None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": workload_name(endpoint),
            "labels": _labels(endpoint),
            "ownerReferences": _owner(endpoint, uid),
        },
        "spec": {
            "selector": {ENDPOINT_LABEL: endpoint, MANAGED_BY: MANAGER},
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": template.port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def workload_status(endpoint: str, deployment_body: Mapping[str, Any] | None) -> dict[str, Any]:
    """`status.workload` of the ModelEndpoint: "0/N ready" until the pods pass their probes."""
    name = workload_name(endpoint)
    if deployment_body is None:
        return {
            "deployment": name,
            "service": name,
            "replicas": 0,
            "readyReplicas": 0,
            "message": "Deployment not created yet",
        }
    desired = int((deployment_body.get("spec") or {}).get("replicas") or 0)
    status = deployment_body.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    message = f"{ready}/{desired} ready"
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("message"):
            message += f"; {condition.get('type')}: {condition['message']}"
            break
    return {
        "deployment": name,
        "service": name,
        "replicas": desired,
        "readyReplicas": ready,
        "message": message[:1024],
    }
