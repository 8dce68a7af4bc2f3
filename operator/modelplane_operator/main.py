"""`modelplane operator`: the reconciler (kopf) and the config stream server in one process."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import kopf

from .budget.service import BudgetMetrics, BudgetService
from .controller import Controller
from .distribution.auth import Authenticator
from .distribution.hub import ConfigHub
from .distribution.server import StreamServer, server_ssl_context
from .ha.replica import Replica, ReplicaSettings
from .handlers import build_registry
from .injection import InjectionSettings
from .injection.keeper import KeeperSettings
from .injection.webhook import (
    InjectionMetrics,
    ManagedTLS,
    RunningWebhook,
    WebhookServerSettings,
    serve_injection_webhook,
)
from .kube import KubeClient, load_credentials
from .metrics import OperatorMetrics

log = logging.getLogger("modelplane.operator")


@dataclass(frozen=True)
class OperatorOptions:
    #: The stream server's certificate from files, or (`certificates`) kept by the operator itself.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    certificates: KeeperSettings | None = None
    tls_dir: Path | None = None
    #: The sidecar injection webhook (needs `certificates`); None: no webhook.
    injection: InjectionSettings | None = None
    webhook: WebhookServerSettings | None = None
    host: str = "0.0.0.0"
    port: int = 8443
    audience: str = "modelplane"
    debounce_seconds: float = 0.2
    #: Seconds between re-reads of the referenced Secrets (they are not watched).
    secret_resync_seconds: float = 30.0
    #: Namespaces to watch; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    #: Leader election among several replicas; None: this process is the only writer.
    replica: ReplicaSettings | None = None


def operator_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = [1, 2, 5, 10]
    return settings


async def run_operator(options: OperatorOptions) -> int:
    # kopf logs every handler run at info level, with its settings attached: keep only problems.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    credentials = load_credentials()
    kube = KubeClient(credentials)
    # One registry: /metrics on the stream port and on the webhook port serve the same series.
    metrics = OperatorMetrics()
    hub = ConfigHub(metrics=metrics)
    budgets = BudgetService(metrics=BudgetMetrics(metrics.registry))
    controller = Controller(kube, hub, options.debounce_seconds, metrics=metrics, budgets=budgets)
    stream = StreamServer(hub, Authenticator(kube.token_review, options.audience), metrics)
    stream.budgets = budgets
    budgets.start()
    tls: ManagedTLS | None = None
    webhook: RunningWebhook | None = None
    if options.certificates is not None:
        # One certificate, kept current in a Secret, for the stream and the webhook alike.
        tls = await ManagedTLS.start(options.certificates, kube, options.tls_dir)
        context = tls.context
        if options.injection is not None and options.webhook is not None:
            webhook = await serve_injection_webhook(
                options.injection,
                options.webhook,
                kube,
                tls,
                InjectionMetrics(metrics.registry),
            )
    elif options.tls_cert_file is not None and options.tls_key_file is not None:
        context = server_ssl_context(str(options.tls_cert_file), str(options.tls_key_file))
    else:
        raise ValueError("the stream server needs --tls-cert-file/--tls-key-file or --tls-secret")
    replica: Replica | None = None
    if options.replica is not None:
        peer_ca = (lambda: tls.material.ca_cert) if tls is not None else None
        replica = Replica(
            options.replica,
            kube,
            controller,
            stream,
            hub,
            peer_ca=peer_ca,
            registry=metrics.registry,
        )
        replica.start()
    await stream.start(options.host, options.port, context)
    controller.start_secret_resync(options.secret_resync_seconds)
    try:
        await kopf.operator(
            registry=build_registry(controller, credentials),
            settings=operator_settings(),
            standalone=True,
            clusterwide=not options.namespaces,
            namespaces=options.namespaces,
        )
    finally:
        if replica is not None:
            await replica.stop()  # hands the lease over before anything else stops
        await controller.close()
        await budgets.close()
        await stream.stop()
        if webhook is not None:
            await webhook.stop()
        if tls is not None:
            await tls.stop()
        await kube.close()
    return 0
