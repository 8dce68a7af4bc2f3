"""The webhook's HTTPS server over real TLS: routing by path, errors, metrics, cert reload."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from modelplane_operator.injection import InjectionSettings
from modelplane_operator.injection.certs import CertificatePolicy, TLSMaterial, renew
from modelplane_operator.injection.webhook import InjectionWebhook, ServingCertificate

SETTINGS = InjectionSettings(image="sidecar:1", control_plane_url="https://operator:8443")


def material() -> TLSMaterial:
    return renew(None, ["127.0.0.1"], datetime.datetime.now(datetime.UTC), CertificatePolicy())


class Server:
    def __init__(self, webhook: InjectionWebhook, serving: ServingCertificate, port: int) -> None:
        self.webhook, self.serving, self.port = webhook, serving, port

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    tls = material()
    serving = ServingCertificate(tmp_path)
    serving.load(tls)
    webhook = InjectionWebhook(SETTINGS, ca_bundle=tls.ca_cert.decode())
    runner = web.AppRunner(webhook.build_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=serving.context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(webhook, serving, port)
    finally:
        await runner.cleanup()


def client_for(ca_pem: bytes) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context))


def review(namespace: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": namespace,
            "operation": "CREATE",
            "object": {
                "metadata": {"name": "p", "annotations": annotations or {}},
                "spec": {"containers": [{"name": "app", "image": "a:1"}]},
            },
        },
    }


async def test_paths_tell_labelled_namespaces_from_the_rest(server: Server) -> None:
    async with client_for(server.webhook.ca_bundle.encode()) as client:
        async with client.post(server.url("/inject/namespace"), json=review("apps")) as response:
            labelled = await response.json()
        async with client.post(server.url("/inject/pod"), json=review("apps")) as response:
            unlabelled = await response.json()
        asked = review("apps", {"modelplane.io/inject": "true"})
        async with client.post(server.url("/inject/pod"), json=asked) as response:
            annotated = await response.json()
        async with client.get(server.url("/metrics")) as response:
            metrics = await response.text()

    assert labelled["response"]["allowed"] is True
    patch = json.loads(base64.b64decode(labelled["response"]["patch"]))
    assert patch[0]["value"][0]["name"] == "modelplane-sidecar"
    assert unlabelled["response"] == {"uid": "u-1", "allowed": True}
    assert "patch" in annotated["response"]
    assert 'modelplane_injection_reviews_total{result="injected"} 2.0' in metrics
    assert 'modelplane_injection_reviews_total{result="skipped"} 1.0' in metrics


async def test_garbage_gets_400_with_the_reason(server: Server) -> None:
    async with client_for(server.webhook.ca_bundle.encode()) as client:
        async with client.post(server.url("/inject/pod"), data=b"{not json") as response:
            assert response.status == 400
            body = await response.json()
        assert body["error"].startswith("not an AdmissionReview v1: ")
        wrong = {"apiVersion": "v1", "kind": "Pod"}
        async with client.post(server.url("/inject/pod"), json=wrong) as response:
            assert response.status == 400
            assert "expected kind AdmissionReview" in (await response.json())["error"]


async def test_reloaded_certificate_is_served_to_new_connections(server: Server) -> None:
    old_ca = server.webhook.ca_bundle.encode()
    rotated = material()  # a different CA altogether

    server.serving.load(rotated)

    served = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", server.port))
    assert x509.load_pem_x509_certificate(served.encode()) == rotated.serving
    async with client_for(rotated.ca_cert) as client, client.get(server.url("/healthz")) as ok:
        assert ok.status == 200
    async with client_for(old_ca) as client:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await client.get(server.url("/healthz"))


def test_key_file_is_private(tmp_path: Path) -> None:
    ServingCertificate(tmp_path).load(material())
    assert (tmp_path / "tls.key").stat().st_mode & 0o777 == 0o600
