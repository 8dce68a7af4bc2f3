"""A small async Kubernetes API client for the calls kopf does not make for us.

Status patches on any object, Events, Secrets reads, TokenReviews, and server-side apply of the
model servers the operator runs for ModelEndpoint templates. It uses the same
credentials as kopf (in-cluster ServiceAccount, else the kubeconfig), found by kopf's own
piggy-backing login functions, so no `kubernetes` package is needed.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

log = logging.getLogger("modelplane.operator.kube")


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


def load_credentials() -> kopf.ConnectionInfo:
    """The operator's own API credentials: in-cluster ServiceAccount first, then kubeconfig."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no credentials: neither a ServiceAccount nor a kubeconfig found")
    return info


class KubeClient:
    """JSON requests against the apiserver with the operator's credentials."""

    def __init__(self, info: kopf.ConnectionInfo) -> None:
        self._info = info
        self._server = str(info.server).rstrip("/")
        self._ssl: ssl.SSLContext = info.as_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        #: Who posts Events (`reportingInstance`): the replica's identity with leader election.
        self.instance = os.uname().nodename

    @property
    def default_namespace(self) -> str | None:
        return self._info.default_namespace

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._info.as_http_headers(),
                timeout=aiohttp.ClientTimeout(total=30, connect=10),
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: object | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"content-type": content_type} if body is not None else {}
        async with self._http().request(
            method, self._server + path, json=body, headers=headers
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                message = data.get("message", "") if isinstance(data, dict) else str(data)
                raise KubeError(resp.status, message)
            return data

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            data: Mapping[str, Any] = await self.request(
                "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
            )
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return data

    async def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: object,
        resource_version: str | None = None,
    ) -> Any:
        """Merge-patch `status`; with `resource_version`, only if the object is still at it
        (the apiserver answers 409 otherwise). Returns the object as stored."""
        path = f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status"
        patch: dict[str, Any] = {"status": status}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def apply(self, path: str, body: Mapping[str, Any]) -> Any:
        """Server-side apply `body` at `path` as field manager `modelplane`."""
        return await self.request(
            "PATCH",
            f"{path}?fieldManager=modelplane&force=true",
            body,
            content_type="application/apply-patch+yaml",
        )

    async def post_event(
        self,
        involved: Mapping[str, str],
        type_: str,
        reason: str,
        message: str,
    ) -> None:
        """A core/v1 Event about `involved` (apiVersion, kind, namespace, name, uid)."""
        namespace = involved["namespace"]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": dict(involved),
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "modelplane-operator"},
            "reportingComponent": "modelplane.io/operator",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", event)

    async def token_review(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences},
        }
        result = await self.request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", review)
        status: Mapping[str, Any] = result.get("status") or {}
        return status
