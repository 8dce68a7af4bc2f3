"""What the controller knows about self-hosted models besides the Modelplane objects.

The EndpointSlices of Services that ModelEndpoints reference, the Deployments the operator runs
for templates, and the shared load scrape. The controller feeds it watch events and asks it for
compile inputs and status; everything that talks to the API server or the network is here, the
decisions are in `discovery.py` and `workload.py`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from modelplane_sidecar import config as rc

from ..crd_models import ModelEndpointSpec
from ..distribution.hub import ConfigHub
from ..kube import KubeClient, KubeError
from . import workload
from .discovery import ServiceKey, service_key, slice_service
from .loadshare import LoadShare

log = logging.getLogger("modelplane.operator.selfhosted")


def _spec(body: Mapping[str, Any]) -> ModelEndpointSpec | None:
    try:
        return ModelEndpointSpec.model_validate(body.get("spec") or {})
    except ValidationError:
        return None


def referenced_service(body: Mapping[str, Any]) -> ServiceKey | None:
    """The Service a ModelEndpoint body routes to (serviceRef or its template's), if any."""
    meta = body.get("metadata") or {}
    spec = _spec(body)
    if spec is None:
        return None
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))
    if spec.service_ref is not None:
        return service_key(spec.service_ref, namespace)
    if spec.template is not None:
        return (namespace, workload.workload_name(name))
    return None


class SelfHosted:
    def __init__(self, kube: KubeClient, hub: ConfigHub) -> None:
        self._kube = kube
        self.load = LoadShare(hub)
        #: (namespace, service) -> slice name -> body
        self._slices: dict[ServiceKey, dict[str, Mapping[str, Any]]] = {}
        #: (namespace, endpoint name) -> Deployment body
        self._deployments: dict[tuple[str, str], Mapping[str, Any]] = {}
        #: What was last applied per (namespace, endpoint), to apply only on change.
        self._applied: dict[tuple[str, str], Any] = {}

    # --- watch events ------------------------------------------------------------------------

    def observe_slice(self, event_type: str | None, body: Mapping[str, Any]) -> ServiceKey | None:
        key = slice_service(body)
        name = (body.get("metadata") or {}).get("name")
        if key is None or not isinstance(name, str):
            return None
        if event_type == "DELETED":
            slices = self._slices.get(key, {})
            slices.pop(name, None)
            if not slices:
                self._slices.pop(key, None)
        else:
            self._slices.setdefault(key, {})[name] = body
        return key

    def observe_deployment(
        self, event_type: str | None, body: Mapping[str, Any]
    ) -> tuple[str, str] | None:
        meta = body.get("metadata") or {}
        endpoint = (meta.get("labels") or {}).get(workload.ENDPOINT_LABEL)
        if not isinstance(endpoint, str):
            return None
        key = (str(meta.get("namespace")), endpoint)
        if event_type == "DELETED":
            self._deployments.pop(key, None)
            self._applied.pop(key, None)
        else:
            self._deployments[key] = body
        return key

    # --- compile inputs and status -----------------------------------------------------------

    def slices_for(
        self, endpoints: Iterable[Mapping[str, Any]]
    ) -> dict[ServiceKey, list[Mapping[str, Any]]]:
        out: dict[ServiceKey, list[Mapping[str, Any]]] = {}
        for body in endpoints:
            key = referenced_service(body)
            if key is not None:
                out[key] = [self._slices[key][n] for n in sorted(self._slices.get(key, {}))]
        return out

    def workload_status(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        spec = _spec(body)
        if spec is None or spec.template is None:
            return None
        name = str((body.get("metadata") or {}).get("name"))
        return workload.workload_status(name, self._deployments.get((namespace, name)))

    def published(self, namespace: str, config: rc.RouterConfig | None) -> None:
        self.load.update(namespace, config)

    # --- the template's Deployment and Service -------------------------------------------------

    async def ensure_workloads(
        self, namespace: str, endpoints: Iterable[Mapping[str, Any]]
    ) -> None:
        """Server-side apply the Deployment + Service of every endpoint with a template."""
        for body in endpoints:
            spec = _spec(body)
            meta = body.get("metadata") or {}
            if spec is None or spec.template is None or not meta.get("uid"):
                continue
            name = str(meta["name"])
            manifests = (
                workload.deployment(name, str(meta["uid"]), spec),
                workload.service(name, str(meta["uid"]), spec),
            )
            key = (namespace, name)
            if self._applied.get(key) == manifests:
                continue
            try:
                await self._kube.apply(
                    f"/apis/apps/v1/namespaces/{namespace}/deployments/"
                    f"{workload.workload_name(name)}",
                    manifests[0],
                )
                await self._kube.apply(
                    f"/api/v1/namespaces/{namespace}/services/{workload.workload_name(name)}",
                    manifests[1],
                )
            except (KubeError, OSError, TimeoutError) as exc:
                log.error("creating the model server of %s/%s failed: %s", namespace, name, exc)
                raise
            self._applied[key] = manifests

    async def close(self) -> None:
        await self.load.stop()
