"""coordination.k8s.io/v1 Leases: the record, its wire form, and the calls replicas make.

`LeaseClient` is the boundary the election and the fleet counts talk through; `KubeLeases`
implements it against the apiserver. Writes are optimistic: a replace carries the
resourceVersion that was read, and the apiserver refuses it (409) when someone wrote in between,
which the client reports as `LeaseConflict`, as it does for a create that finds the Lease there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..kube import KubeClient, KubeError

API_VERSION = "coordination.k8s.io/v1"
_MICRO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class LeaseConflict(Exception):
    """The Lease changed since it was read (or already exists): read it again."""


def micro_time(value: dt.datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 in UTC with microseconds."""
    return value.astimezone(dt.UTC).strftime(_MICRO_FORMAT)


def parse_time(value: object) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says, plus the metadata replicas use (labels, annotations, version)."""

    holder: str | None = None
    duration_seconds: int = 15
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    transitions: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str | None = None

    def replace(self, **changes: Any) -> LeaseRecord:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> LeaseRecord:
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        duration = spec.get("leaseDurationSeconds")
        transitions = spec.get("leaseTransitions")
        return cls(
            holder=spec.get("holderIdentity") or None,
            duration_seconds=duration if isinstance(duration, int) and duration > 0 else 1,
            acquire_time=parse_time(spec.get("acquireTime")),
            renew_time=parse_time(spec.get("renewTime")),
            transitions=transitions if isinstance(transitions, int) else 0,
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            resource_version=meta.get("resourceVersion"),
        )

    def body(self, namespace: str, name: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": namespace}
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        if self.resource_version is not None:
            metadata["resourceVersion"] = self.resource_version
        spec: dict[str, Any] = {
            "holderIdentity": self.holder or "",
            "leaseDurationSeconds": self.duration_seconds,
            "leaseTransitions": self.transitions,
        }
        if self.acquire_time is not None:
            spec["acquireTime"] = micro_time(self.acquire_time)
        if self.renew_time is not None:
            spec["renewTime"] = micro_time(self.renew_time)
        return {"apiVersion": API_VERSION, "kind": "Lease", "metadata": metadata, "spec": spec}


class LeaseClient(Protocol):
    async def get(self, namespace: str, name: str) -> LeaseRecord | None: ...

    async def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord: ...

    async def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord: ...

    async def list(self, namespace: str, selector: str) -> dict[str, LeaseRecord]: ...

    async def delete(self, namespace: str, name: str) -> None: ...


class KubeLeases:
    """`LeaseClient` on the apiserver, with the operator's credentials."""

    def __init__(self, kube: KubeClient) -> None:
        self._kube = kube

    @staticmethod
    def _path(namespace: str, name: str = "") -> str:
        base = f"/apis/{API_VERSION}/namespaces/{namespace}/leases"
        return f"{base}/{name}" if name else base

    async def get(self, namespace: str, name: str) -> LeaseRecord | None:
        try:
            body = await self._kube.request("GET", self._path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return LeaseRecord.from_body(body)

    async def create(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        body = record.replace(resource_version=None).body(namespace, name)
        try:
            created = await self._kube.request("POST", self._path(namespace), body)
        except KubeError as exc:
            if exc.status == 409:
                raise LeaseConflict(f"lease {namespace}/{name} already exists") from None
            raise
        return LeaseRecord.from_body(created)

    async def replace(self, namespace: str, name: str, record: LeaseRecord) -> LeaseRecord:
        if record.resource_version is None:
            raise ValueError("a Lease is replaced only at the resourceVersion that was read")
        try:
            stored = await self._kube.request(
                "PUT", self._path(namespace, name), record.body(namespace, name)
            )
        except KubeError as exc:
            if exc.status in (404, 409):
                raise LeaseConflict(f"lease {namespace}/{name} changed: {exc}") from None
            raise
        return LeaseRecord.from_body(stored)

    async def list(self, namespace: str, selector: str) -> dict[str, LeaseRecord]:
        found = await self._kube.request("GET", f"{self._path(namespace)}?labelSelector={selector}")
        return {
            str((item.get("metadata") or {}).get("name")): LeaseRecord.from_body(item)
            for item in found.get("items") or []
        }

    async def delete(self, namespace: str, name: str) -> None:
        try:
            await self._kube.request("DELETE", self._path(namespace, name))
        except KubeError as exc:
            if exc.status != 404:
                raise
