"""EndpointSlices -> replicas: which addresses of a referenced Service may receive traffic.

Pure functions over the EndpointSlice objects the operator watches (label
`kubernetes.io/service-name`). An endpoint is ready when its `conditions.ready` is true or
unset (the API's own rule) and it is not terminating; not-ready addresses are still shipped, as
`ready: false`, so sidecars and status can say "1 of 3 ready", but no request goes to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from modelplane_sidecar import config as rc

from ..crd_models import ServiceRef

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

#: (namespace, Service name)
ServiceKey = tuple[str, str]


def service_key(ref: ServiceRef, namespace: str) -> ServiceKey:
    return (ref.namespace or namespace, ref.name)


def slice_service(body: Mapping[str, Any]) -> ServiceKey | None:
    meta = body.get("metadata") or {}
    name = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not isinstance(name, str) or not isinstance(meta.get("namespace"), str):
        return None
    return (meta["namespace"], name)


def _port(ref: ServiceRef, ports: Sequence[Mapping[str, Any]] | None) -> int | None:
    if not ports:
        return ref.port
    if ref.port_name is not None:
        named = [p for p in ports if p.get("name") == ref.port_name]
        return int(named[0]["port"]) if named and named[0].get("port") else None
    if len(ports) == 1:
        port = ports[0].get("port")
        return int(port) if port else None
    numbered = [p for p in ports if p.get("port") == ref.port]
    return ref.port if numbered else None


def _host(address: str, address_type: str) -> str:
    return f"[{address}]" if address_type == "IPv6" and not address.startswith("[") else address


def replicas(ref: ServiceRef, slices: Sequence[Mapping[str, Any]]) -> tuple[rc.Replica, ...]:
    """The Service's addresses as replicas (ready first wins on duplicates), sorted by URL."""
    found: dict[str, rc.Replica] = {}
    path = ref.path.rstrip("/")
    for body in slices:
        port = _port(ref, body.get("ports"))
        if port is None:
            continue
        address_type = str(body.get("addressType") or "IPv4")
        for endpoint in body.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            ready = (
                conditions.get("ready") is not False and conditions.get("terminating") is not True
            )
            zone = endpoint.get("zone") if isinstance(endpoint.get("zone"), str) else None
            for address in endpoint.get("addresses") or []:
                url = f"{ref.scheme}://{_host(str(address), address_type)}:{port}{path}"
                before = found.get(url)
                if before is None or (ready and not before.ready):
                    found[url] = rc.Replica(url=url, ready=ready, zone=zone)
    return tuple(found[url] for url in sorted(found))
