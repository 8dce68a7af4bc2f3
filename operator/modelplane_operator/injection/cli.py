"""Command-line flags of the injection webhook and the operator's certificates.

`add_tls_arguments` (`--tls-*`) and `add_webhook_arguments` (`--webhook-*`, `--sidecar-*`,
`--control-plane-url`, `--token-*`) put the flags on any argparse parser (`modelplane operator`
and `modelplane webhook`), and `settings_from_args` turns them into validated settings, so the
Helm chart renders one list of flags whichever command serves the webhook.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from .settings import (
    AUDIT_KEY_FILE,
    DEFAULT_EXCLUDED_NAMESPACES,
    AuditSigningKey,
    InjectionError,
    InjectionSettings,
    SidecarResources,
)

# `modelplane serve` builds the same parser: the flags must not pull in kopf or cryptography
# (the sidecar image has neither installed), so the modules behind them load on use.
if TYPE_CHECKING:
    from .keeper import KeeperSettings
    from .webhook import WebhookServerSettings

log = logging.getLogger("modelplane.operator.injection")


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the operator's own certificates (`--tls-*`)."""
    tls = parser.add_argument_group("operator certificates (kept in a Secret, rotated)")
    tls.add_argument("--tls-namespace", help="namespace of the certificate Secret")
    tls.add_argument(
        "--tls-secret",
        default="modelplane-operator-tls",
        help="Secret holding the operator's CA and serving certificate",
    )
    tls.add_argument(
        "--tls-service",
        action="append",
        default=[],
        help="Service whose DNS names the serving certificate covers (repeatable)",
    )
    tls.add_argument(
        "--tls-host",
        action="append",
        default=[],
        help="extra DNS name or IP for the serving certificate (repeatable), e.g. 127.0.0.1",
    )
    tls.add_argument("--tls-dir", type=Path, help="where to write tls.crt/tls.key (a tmpfs)")
    tls.add_argument(
        "--tls-check-interval",
        type=float,
        default=60.0,
        help="seconds between certificate and caBundle checks (default: 60)",
    )
    tls.add_argument("--tls-cert-days", type=int, default=90, help="serving cert lifetime")
    tls.add_argument("--tls-ca-days", type=int, default=3650, help="CA lifetime")


def add_webhook_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """Flags of the webhook listener (`--webhook-*`) and of the sidecar it injects.

    With `required=False` (inside `modelplane operator`) the webhook runs only when
    `--sidecar-image` is given.
    """
    server = parser.add_argument_group("injection webhook")
    server.add_argument("--webhook-host", default="0.0.0.0", help="listen address")
    server.add_argument("--webhook-port", type=int, default=9443, help="listen port (HTTPS)")
    server.add_argument(
        "--webhook-configuration",
        help="MutatingWebhookConfiguration whose caBundle the operator keeps (default: none)",
    )
    server.add_argument(
        "--webhook-excluded-namespace",
        action="append",
        help="never inject here (repeatable; default: kube-system, kube-public, kube-node-lease)",
    )

    sidecar = parser.add_argument_group("injected sidecar")
    sidecar.add_argument("--sidecar-image", required=required, help="sidecar image reference")
    sidecar.add_argument("--sidecar-image-pull-policy", default="IfNotPresent")
    sidecar.add_argument(
        "--control-plane-url",
        help="the operator's config stream as sidecars reach it, e.g. "
        "https://modelplane-operator.modelplane.svc:8443",
    )
    sidecar.add_argument("--sidecar-port", type=int, default=15000, help="sidecar port for apps")
    sidecar.add_argument("--sidecar-health-port", type=int, default=15021)
    sidecar.add_argument("--sidecar-cpu-request", default=SidecarResources.cpu_request)
    sidecar.add_argument("--sidecar-cpu-limit", default=SidecarResources.cpu_limit)
    sidecar.add_argument("--sidecar-memory-request", default=SidecarResources.memory_request)
    sidecar.add_argument("--sidecar-memory-limit", default=SidecarResources.memory_limit)
    sidecar.add_argument("--sidecar-run-as-user", type=int, default=65532)
    sidecar.add_argument(
        "--sidecar-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sidecar.add_argument(
        "--no-sidecar-audit-log",
        dest="sidecar_audit_log",
        action="store_false",
        help="injected sidecars write no audit trail (default: one record per request on stdout)",
    )
    sidecar.add_argument(
        "--sidecar-audit-key-secret",
        metavar="NAME",
        help="Secret, in each injected Pod's namespace, with the Ed25519 key the sidecar signs "
        "its audit checkpoints with (mounted as a file; default: a new key per sidecar run)",
    )
    sidecar.add_argument(
        "--sidecar-audit-key-secret-key",
        default=AUDIT_KEY_FILE,
        metavar="KEY",
        help=f"the key of that Secret's data holding the PEM key (default: {AUDIT_KEY_FILE})",
    )
    sidecar.add_argument("--token-audience", default="modelplane")
    sidecar.add_argument("--token-expiration-seconds", type=int, default=3600)


def keeper_settings_from_args(args: argparse.Namespace) -> KeeperSettings:
    """The certificate keeper's settings; raises `InjectionError` naming the missing flag."""
    from .certs import CertificatePolicy, service_hosts
    from .keeper import KeeperSettings

    if not args.tls_namespace:
        raise InjectionError("--tls-namespace is needed: the namespace of the certificate Secret")
    hosts = [
        host for service in args.tls_service for host in service_hosts(service, args.tls_namespace)
    ]
    hosts += args.tls_host
    if not hosts:
        raise InjectionError(
            "the serving certificate needs a name: give --tls-service (in a cluster) or "
            "--tls-host (e.g. 127.0.0.1 when the apiserver calls a local process)"
        )
    return KeeperSettings(
        namespace=args.tls_namespace,
        secret_name=args.tls_secret,
        hosts=tuple(dict.fromkeys(hosts)),
        webhook_configuration=getattr(args, "webhook_configuration", None),
        policy=CertificatePolicy(
            ca_validity=datetime.timedelta(days=args.tls_ca_days),
            serving_validity=datetime.timedelta(days=args.tls_cert_days),
        ),
        check_interval=args.tls_check_interval,
    )


def settings_from_args(
    args: argparse.Namespace,
) -> tuple[InjectionSettings, WebhookServerSettings]:
    """Validated settings; raises `InjectionError` or `ValueError` with the flag's problem."""
    from .webhook import WebhookServerSettings

    if not args.control_plane_url:
        raise InjectionError(
            "--control-plane-url is needed: the config stream URL that injected sidecars use"
        )
    excluded = args.webhook_excluded_namespace
    injection = InjectionSettings(
        image=args.sidecar_image,
        control_plane_url=args.control_plane_url,
        image_pull_policy=args.sidecar_image_pull_policy,
        port=args.sidecar_port,
        health_port=args.sidecar_health_port,
        resources=SidecarResources(
            cpu_request=args.sidecar_cpu_request,
            cpu_limit=args.sidecar_cpu_limit,
            memory_request=args.sidecar_memory_request,
            memory_limit=args.sidecar_memory_limit,
        ),
        token_audience=args.token_audience,
        token_expiration_seconds=args.token_expiration_seconds,
        run_as_user=args.sidecar_run_as_user,
        log_level=args.sidecar_log_level,
        audit_log=args.sidecar_audit_log,
        audit_signing_key=(
            AuditSigningKey(args.sidecar_audit_key_secret, args.sidecar_audit_key_secret_key)
            if args.sidecar_audit_key_secret
            else None
        ),
        excluded_namespaces=(
            DEFAULT_EXCLUDED_NAMESPACES if excluded is None else frozenset(excluded)
        ),
    )
    server = WebhookServerSettings(
        keeper=keeper_settings_from_args(args),
        host=args.webhook_host,
        port=args.webhook_port,
        cert_dir=args.tls_dir,
    )
    return injection, server


async def run_webhook(injection: InjectionSettings, server: WebhookServerSettings) -> None:
    """`modelplane webhook`: serve until SIGINT/SIGTERM."""
    from ..kube import KubeClient, load_credentials
    from .webhook import serve_injection_webhook

    client = KubeClient(load_credentials())
    try:
        running = await serve_injection_webhook(injection, server, client)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            log.info("injection webhook stopping")
            await running.stop()
    finally:
        await client.close()
