"""The injection webhook's HTTPS server (aiohttp) and its wiring to the certificate keeper.

Two admission paths, one per webhook in the MutatingWebhookConfiguration: the apiserver calls
`/inject/namespace` for Pods in namespaces labelled `modelplane.io/inject=enabled` and
`/inject/pod` for all other namespaces (where only Pods annotated `modelplane.io/inject: "true"`
are injected). The path is how the webhook learns the namespace label without reading Namespaces.
Handlers do no I/O besides the request itself: the review is a pure function, so the webhook
answers in well under a millisecond and within its timeout under load.

`serve_injection_webhook` is the entry point for the operator process: it makes sure the
certificates exist (see `keeper`), starts listening, and keeps the certificates current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from ..kube import KubeClient
from .admission import BadReview, review_pod
from .certs import TLSMaterial
from .keeper import CertificateKeeper, KeeperSettings
from .settings import InjectionSettings

log = logging.getLogger("modelplane.operator.injection")

NAMESPACE_PATH = "/inject/namespace"
POD_PATH = "/inject/pod"
#: A Pod object can be large (etcd allows ~1.5 MiB); the review wraps it once more.
_MAX_BODY = 8 * 1024 * 1024


class InjectionMetrics:
    """Prometheus metrics of the webhook, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.reviews = Counter(
            "modelplane_injection_reviews",
            "Admission reviews answered, by result (injected, updated, skipped, denied, invalid).",
            ["result"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "modelplane_injection_review_seconds",
            "Time to answer one admission review, body parsing included.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0),
            registry=self.registry,
        )


class InjectionWebhook:
    """The aiohttp application; `ca_bundle` is what injected Pods will trust."""

    def __init__(
        self, settings: InjectionSettings, ca_bundle: str, metrics: InjectionMetrics | None = None
    ) -> None:
        self.settings = settings
        self.ca_bundle = ca_bundle
        self.metrics = metrics or InjectionMetrics()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_post(NAMESPACE_PATH, self._reviewer(namespace_enabled=True))
        app.router.add_post(POD_PATH, self._reviewer(namespace_enabled=False))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        return app

    def _reviewer(
        self, *, namespace_enabled: bool
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def review(request: web.Request) -> web.Response:
            started = time.perf_counter()
            raw = await request.read()
            try:
                outcome = review_pod(
                    orjson.loads(raw),
                    namespace_enabled=namespace_enabled,
                    settings=self.settings,
                    ca_bundle=self.ca_bundle,
                )
            except (orjson.JSONDecodeError, BadReview) as error:
                self.metrics.reviews.labels("invalid").inc()
                return web.json_response(
                    {"error": f"not an AdmissionReview v1: {error}"}, status=400
                )
            self.metrics.reviews.labels(outcome.result).inc()
            self.metrics.seconds.observe(time.perf_counter() - started)
            level = logging.DEBUG if outcome.result == "skipped" else logging.INFO
            log.log(level, "pod %s %s: %s", outcome.subject, outcome.result, outcome.reason)
            return web.Response(body=orjson.dumps(outcome.review), content_type="application/json")

        return review

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


class ServingCertificate:
    """A server-side SSLContext whose certificate can be swapped while serving.

    `SSLContext.load_cert_chain` on a live context applies to handshakes that start afterwards;
    connections already open keep the certificate they were made with.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def load(self, material: TLSMaterial) -> None:
        cert, key = self._directory / "tls.crt", self._directory / "tls.key"
        # ssl loads keys only from files: write both atomically, the key never world-readable.
        for path, data in ((cert, material.cert), (key, material.key)):
            temporary = path.with_suffix(".tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            temporary.replace(path)
        self.context.load_cert_chain(cert, key)


class ManagedTLS:
    """The operator's serving certificate, kept current from its Secret by a `CertificateKeeper`.

    `context` is one SSLContext for every TLS server of the operator (the webhook and the config
    stream): a renewal reloads it in place. `listeners` are called with the new material.
    """

    def __init__(
        self, keeper: CertificateKeeper, serving: ServingCertificate, cleanup: contextlib.ExitStack
    ) -> None:
        self.keeper = keeper
        self.serving = serving
        self.listeners: list[Callable[[TLSMaterial], None]] = []
        self._cleanup = cleanup
        self._checks: asyncio.Task[None] | None = None

    @property
    def context(self) -> ssl.SSLContext:
        return self.serving.context

    @property
    def material(self) -> TLSMaterial:
        if self.keeper.current is None:
            raise RuntimeError("ManagedTLS.start() has not finished")
        return self.keeper.current

    @classmethod
    async def start(
        cls, settings: KeeperSettings, api: KubeClient, cert_dir: Path | None = None
    ) -> ManagedTLS:
        """Read or create the certificates (raises if that fails), then check periodically."""
        cleanup = contextlib.ExitStack()
        if cert_dir is None:
            cert_dir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mp-tls-")))
        serving = ServingCertificate(cert_dir)
        managed: ManagedTLS

        def changed(material: TLSMaterial) -> None:
            serving.load(material)
            log.info(
                "serving certificate loaded, valid until %s",
                material.serving.not_valid_after_utc.isoformat(),
            )
            for listener in managed.listeners:
                listener(material)

        managed = cls(CertificateKeeper(api, settings, on_change=changed), serving, cleanup)
        try:
            await managed.keeper.ensure()
        except BaseException:
            cleanup.close()
            raise
        managed._checks = asyncio.create_task(managed.keeper.run(), name="modelplane-tls-checks")
        return managed

    async def stop(self) -> None:
        if self._checks is not None:
            self._checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checks
        self._cleanup.close()


@dataclass(frozen=True)
class WebhookServerSettings:
    """Where the webhook listens, and the certificates it serves."""

    keeper: KeeperSettings
    host: str = "0.0.0.0"
    port: int = 9443
    #: Directory for the serving certificate files (a tmpfs in the operator Pod).
    cert_dir: Path | None = None


class RunningWebhook:
    """A started webhook server; `stop()` ends it (and its certificates, if it started them)."""

    def __init__(
        self,
        runner: web.AppRunner,
        webhook: InjectionWebhook,
        tls: ManagedTLS,
        port: int,
        owns_tls: bool,
    ) -> None:
        self.runner = runner
        self.webhook = webhook
        self.tls = tls
        self.port = port
        self._owns_tls = owns_tls

    async def stop(self) -> None:
        await self.runner.cleanup()
        if self._owns_tls:
            await self.tls.stop()


async def serve_injection_webhook(
    injection: InjectionSettings,
    server: WebhookServerSettings,
    api: KubeClient,
    tls: ManagedTLS | None = None,
    metrics: InjectionMetrics | None = None,
) -> RunningWebhook:
    """Start the HTTPS webhook server with `tls` (started here from `server.keeper` if None).

    Raises when the certificates cannot be read or written: the operator must not report ready
    without a webhook that the apiserver can call.
    """
    owns_tls = tls is None
    if tls is None:
        tls = await ManagedTLS.start(server.keeper, api, server.cert_dir)
    webhook = InjectionWebhook(injection, tls.material.ca_cert.decode("ascii"), metrics)

    def update_ca(material: TLSMaterial) -> None:
        webhook.ca_bundle = material.ca_cert.decode("ascii")

    tls.listeners.append(update_ca)
    runner = web.AppRunner(webhook.build_app(), access_log=None)
    try:
        await runner.setup()
        site = web.TCPSite(runner, server.host, server.port, ssl_context=tls.context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        if owns_tls:
            await tls.stop()
        raise
    port = server.port or _bound_port(runner)
    log.info("injection webhook listening on https://%s:%d", server.host, port)
    return RunningWebhook(runner, webhook, tls, port, owns_tls)


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the webhook server is not bound to a TCP port")
