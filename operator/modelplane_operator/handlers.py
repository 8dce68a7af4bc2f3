"""kopf handlers: thin on purpose. Each one hands what the API server said to the Controller.

There are no create/update/delete handlers, so kopf never writes finalizers or annotations to
our objects; all writes (status, Events) go through the controller. Secrets are deliberately not
watched: the controller reads the referenced ones by name and re-reads them periodically
(`Controller.resync_secrets`), so the operator needs only `get` on Secrets, never list/watch.
"""

from __future__ import annotations

from typing import Any

import kopf

from .controller import Controller
from .crd_models import GROUP, KINDS, VERSION, Kind
from .selfhosted.discovery import SERVICE_NAME_LABEL
from .selfhosted.workload import MANAGED_BY, MANAGER


def build_registry(
    controller: Controller, credentials: kopf.ConnectionInfo
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return credentials

    async def on_resource(event: kopf.RawEvent, param: Any = None, **_: Any) -> None:
        kind: Kind = param
        controller.observe(kind, event["type"], event["object"])

    for kind in KINDS:
        kopf.on.event(GROUP, VERSION, kind.plural, registry=registry, param=kind, id=kind.plural)(
            on_resource
        )

    # Self-hosted models: the EndpointSlices of Services (the controller keeps only those that
    # ModelEndpoints reference) and the Deployments the operator runs for templates.
    @kopf.on.event(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        registry=registry,
        labels={SERVICE_NAME_LABEL: kopf.PRESENT},
    )
    async def on_endpoint_slice(event: kopf.RawEvent, **_: Any) -> None:
        controller.slice_changed(event["type"], event["object"])

    @kopf.on.event("apps", "v1", "deployments", registry=registry, labels={MANAGED_BY: MANAGER})
    async def on_deployment(event: kopf.RawEvent, **_: Any) -> None:
        controller.deployment_changed(event["type"], event["object"])

    return registry
