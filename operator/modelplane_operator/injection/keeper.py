"""Keeps the operator's TLS material in a Secret, current, and trusted by the apiserver.

On start and then every `check_interval` seconds: read the Secret, renew what `plan_renewal` says
is due and write it back (optimistic concurrency: with several operator replicas, the first writer
wins and the others adopt its material), then make every webhook in the
MutatingWebhookConfiguration carry the CA as its caBundle (a `helm upgrade` or a hand edit that
drops it is repaired on the next check). Each change is handed to `on_change`, which reloads the
serving certificate of the webhook server.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..kube import KubeClient, KubeError
from .certs import CertificatePolicy, TLSMaterial, plan_renewal, renew

log = logging.getLogger("modelplane.operator.certs")

_WRITE_ATTEMPTS = 5
_SECRET_KEYS = {"ca_cert": "ca.crt", "ca_key": "ca.key", "cert": "tls.crt", "key": "tls.key"}
_MWC_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/"


@dataclass(frozen=True)
class KeeperSettings:
    namespace: str
    secret_name: str
    #: Names the serving certificate must cover (Service DNS names, or 127.0.0.1 in url mode).
    hosts: tuple[str, ...]
    #: The MutatingWebhookConfiguration whose caBundle to keep; None to leave it alone.
    webhook_configuration: str | None
    policy: CertificatePolicy = field(default_factory=CertificatePolicy)
    check_interval: float = 60.0

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError("the serving certificate needs at least one host")
        if self.check_interval <= 0:
            raise ValueError(f"check interval must be positive, not {self.check_interval}")


async def _get(api: KubeClient, path: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = await api.request("GET", path)
    except KubeError as error:
        if error.status == 404:
            return None
        raise
    return found


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def material_from_secret(secret: dict[str, Any]) -> TLSMaterial | None:
    data = secret.get("data") or {}
    try:
        return TLSMaterial(
            **{attr: base64.b64decode(data[key]) for attr, key in _SECRET_KEYS.items()}
        )
    except (KeyError, ValueError):
        return None


def _secret_data(material: TLSMaterial) -> dict[str, str]:
    return {
        key: base64.b64encode(getattr(material, attr)).decode("ascii")
        for attr, key in _SECRET_KEYS.items()
    }


class CertificateKeeper:
    """Owns the Secret and the caBundle; `current` is the material in use."""

    def __init__(
        self,
        api: KubeClient,
        settings: KeeperSettings,
        on_change: Callable[[TLSMaterial], None] | None = None,
        clock: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self._api = api
        self._settings = settings
        self._on_change = on_change
        self._clock = clock
        self.current: TLSMaterial | None = None

    @property
    def _secret_path(self) -> str:
        return f"/api/v1/namespaces/{self._settings.namespace}/secrets/{self._settings.secret_name}"

    async def ensure(self) -> TLSMaterial:
        """Bring the Secret and the caBundle up to date; returns the material in use."""
        material = await self._ensure_secret()
        if material != self.current:
            self.current = material
            if self._on_change is not None:
                self._on_change(material)
        if self._settings.webhook_configuration is not None:
            await self._ensure_ca_bundle(self._settings.webhook_configuration, material.ca_cert)
        return material

    async def run(self) -> None:
        """Check forever, every `check_interval` seconds; errors are logged and retried."""
        while True:
            await asyncio.sleep(self._settings.check_interval)
            try:
                await self.ensure()
            except (KubeError, OSError, TimeoutError) as error:
                log.warning("certificate check failed, retrying later: %s", error)

    async def _ensure_secret(self) -> TLSMaterial:
        settings = self._settings
        for _ in range(_WRITE_ATTEMPTS):
            secret = await _get(self._api, self._secret_path)
            stored = material_from_secret(secret) if secret is not None else None
            plan = plan_renewal(stored, settings.hosts, self._clock(), settings.policy)
            if stored is not None and not plan.due:
                return stored
            material = renew(stored, settings.hosts, self._clock(), settings.policy, plan)
            try:
                await self._write_secret(secret, material)
            except KubeError as error:
                if error.status != 409:
                    raise
                continue  # another replica wrote first: read its material and judge it again
            log.info(
                "operator certificates written to secret %s/%s: %s",
                settings.namespace,
                settings.secret_name,
                "; ".join(plan.reasons),
            )
            return material
        raise RuntimeError(
            f"secret {settings.namespace}/{settings.secret_name} kept changing while the "
            f"certificates were renewed ({_WRITE_ATTEMPTS} attempts)"
        )

    async def _write_secret(self, existing: dict[str, Any] | None, material: TLSMaterial) -> None:
        metadata: dict[str, Any] = {
            "name": self._settings.secret_name,
            "namespace": self._settings.namespace,
            "labels": {"app.kubernetes.io/managed-by": "modelplane-operator"},
        }
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": metadata,
            "data": _secret_data(material),
        }
        if existing is None:
            path = f"/api/v1/namespaces/{self._settings.namespace}/secrets"
            await self._api.request("POST", path, body)
            return
        # resourceVersion makes the replace fail with 409 if someone wrote in between.
        existing_metadata = existing.get("metadata") or {}
        metadata["resourceVersion"] = existing_metadata.get("resourceVersion")
        metadata["labels"] = {**(existing_metadata.get("labels") or {}), **metadata["labels"]}
        if existing.get("type") != "kubernetes.io/tls":
            raise RuntimeError(
                f"secret {self._settings.namespace}/{self._settings.secret_name} exists with "
                f"type {existing.get('type')!r}; the operator stores its certificates in a "
                "kubernetes.io/tls secret: delete it or choose another name"
            )
        await self._api.request("PUT", self._secret_path, body)

    async def _ensure_ca_bundle(self, name: str, ca_cert: bytes) -> None:
        configuration = await _get(self._api, _MWC_PATH + name)
        if configuration is None:
            log.warning("mutatingwebhookconfiguration %s not found; caBundle not set yet", name)
            return
        bundle = base64.b64encode(ca_cert).decode("ascii")
        patch: list[dict[str, Any]] = []
        for index, webhook in enumerate(configuration.get("webhooks") or []):
            if (webhook.get("clientConfig") or {}).get("caBundle") != bundle:
                # The test op makes the patch fail rather than touch the wrong webhook if the
                # list changed since it was read.
                patch.append(
                    {"op": "test", "path": f"/webhooks/{index}/name", "value": webhook["name"]}
                )
                patch.append(
                    {
                        "op": "add",
                        "path": f"/webhooks/{index}/clientConfig/caBundle",
                        "value": bundle,
                    }
                )
        if patch:
            await self._api.request("PATCH", _MWC_PATH + name, patch, "application/json-patch+json")
            log.info("caBundle set on %d webhook(s) of %s", len(patch) // 2, name)
