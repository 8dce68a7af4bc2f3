"""`modelplane`: one command, a subcommand per entry point.

Subcommands import their implementation lazily so `modelplane serve` never loads the operator's
dependencies and starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from . import audit as audit_cli


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    try:
        import uvloop

        runner: Callable[[Coroutine[Any, Any, int | None]], int | None] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    return runner(coro) or 0


def _serve(args: argparse.Namespace) -> int:
    from modelplane_sidecar import logs
    from modelplane_sidecar.config import ConfigError
    from modelplane_sidecar.server import serve_file

    logs.configure(args.log_level)
    try:
        args.audit = audit_cli.settings_from_args(args)
    except ValueError as exc:
        print(f"modelplane serve: {exc}", file=sys.stderr)
        return 2
    if args.control_plane is not None:
        return _serve_control_plane(args)
    try:
        return _run(
            serve_file(Path(args.config), args.host, args.port, args.health_port, audit=args.audit)
        )
    except ConfigError as exc:
        print(f"modelplane serve: invalid config: {exc}", file=sys.stderr)
        return 2


def _serve_control_plane(args: argparse.Namespace) -> int:
    from modelplane_sidecar.controlplane import serve_control_plane

    if args.token_file is None:
        print("modelplane serve: --control-plane needs --token-file", file=sys.stderr)
        return 2
    if not args.control_plane.startswith(("https://", "wss://")):
        print("modelplane serve: --control-plane must be an https:// URL", file=sys.stderr)
        return 2
    return _run(
        serve_control_plane(
            args.control_plane,
            Path(args.token_file),
            args.host,
            args.port,
            ca_file=Path(args.ca_file) if args.ca_file else None,
            state_dir=Path(args.state_dir) if args.state_dir else None,
            node=os.environ.get("MODELPLANE_POD_NAME", ""),
            health_port=args.health_port,
            audit=args.audit,
        )
    )


def _operator(args: argparse.Namespace) -> int:
    from modelplane_operator.ha.cli import replica_settings_from_args
    from modelplane_operator.injection import InjectionError
    from modelplane_operator.injection.cli import keeper_settings_from_args, settings_from_args
    from modelplane_operator.main import OperatorOptions, run_operator
    from modelplane_sidecar import logs

    logs.configure(args.log_level)
    certificates = injection = webhook = None
    try:
        if args.tls_namespace:
            certificates = keeper_settings_from_args(args)
            if args.sidecar_image:
                injection, webhook = settings_from_args(args)
        elif args.sidecar_image:
            raise InjectionError("the injection webhook needs --tls-namespace (its certificates)")
        elif not (args.tls_cert_file and args.tls_key_file):
            raise InjectionError("give --tls-cert-file and --tls-key-file, or --tls-namespace")
        replica = replica_settings_from_args(
            args, certificates.hosts[0] if certificates is not None else None
        )
        if args.secret_resync_seconds <= 0:
            raise ValueError("--secret-resync-seconds must be more than 0")
    except (InjectionError, ValueError) as exc:
        print(f"modelplane operator: {exc}", file=sys.stderr)
        return 2
    options = OperatorOptions(
        host=args.host,
        port=args.port,
        tls_cert_file=Path(args.tls_cert_file) if args.tls_cert_file else None,
        tls_key_file=Path(args.tls_key_file) if args.tls_key_file else None,
        certificates=certificates,
        tls_dir=args.tls_dir,
        injection=injection,
        webhook=webhook,
        audience=args.audience,
        debounce_seconds=args.debounce,
        secret_resync_seconds=args.secret_resync_seconds,
        namespaces=tuple(args.namespace or ()),
        replica=replica,
    )
    return _run(run_operator(options))


def _explain(args: argparse.Namespace) -> int:
    from .explain import main as explain_main

    return explain_main(args.config, args.request, args.header, args.operation)


def _demo(args: argparse.Namespace) -> int:
    from modelplane_sidecar import logs

    from .demo.run import run_demo

    # The table is the demo's output; only problems should interrupt it.
    logs.configure("warning", json_lines=False)
    return _run(run_demo())


def _crds(args: argparse.Namespace) -> int:
    from modelplane_operator import crdgen

    directory = Path(args.out)
    if args.check:
        stale = crdgen.stale(directory)
        if stale:
            print(f"modelplane crds: stale in {directory}: {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    for path in crdgen.write(directory):
        print(f"wrote {path}")
    return 0


def _add_injection_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    # The flags are declared next to the code that reads them; argparse itself is cheap.
    from modelplane_operator.injection.cli import add_tls_arguments, add_webhook_arguments

    add_tls_arguments(parser)
    add_webhook_arguments(parser, required=required)


def _webhook(args: argparse.Namespace) -> int:
    from modelplane_operator.injection import InjectionError
    from modelplane_operator.injection.cli import run_webhook, settings_from_args
    from modelplane_sidecar import logs

    logs.configure(args.log_level)
    try:
        injection, server = settings_from_args(args)
    except (InjectionError, ValueError) as exc:
        print(f"modelplane webhook: {exc}", file=sys.stderr)
        return 2
    return _run(run_webhook(injection, server))


#: Subcommands whose flags are declared by the operator's modules (imported to build them).
_OPERATOR_COMMANDS = ("operator", "webhook")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. With `command`, only that subcommand's flags need to be complete: the
    operator's and the webhook's flags (declared in the operator's modules, ~0.6 MB of memory
    once imported) are left out for any other command, so `modelplane serve` stays lean."""
    operator_flags = command is None or command in _OPERATOR_COMMANDS
    parser = argparse.ArgumentParser(
        prog="modelplane", description="Modelplane: an LLM router for Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the routing sidecar from a RouterConfig file")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="RouterConfig YAML file (standalone)")
    source.add_argument(
        "--control-plane",
        metavar="URL",
        help="the operator's config stream, e.g. https://modelplane-operator.modelplane:8443",
    )
    serve.add_argument("--token-file", help="projected ServiceAccount token (audience modelplane)")
    serve.add_argument("--ca-file", help="CA bundle that signed the operator's serving cert")
    serve.add_argument("--state-dir", help="where the last-known-good config is kept")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=15000, help="listen port (default: 15000)")
    serve.add_argument(
        "--health-port",
        type=int,
        help="also serve /healthz and /readyz on all interfaces here, for the kubelet's probes",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    audit_cli.add_serve_arguments(serve)
    serve.set_defaults(func=_serve)
    audit_cli.add_audit_command(sub)

    explain = sub.add_parser(
        "explain", help="show the routing decision for a request, offline (calls no model)"
    )
    explain.add_argument("--config", required=True, help="RouterConfig YAML file")
    explain.add_argument("--request", required=True, help="request body JSON file ('-': stdin)")
    explain.add_argument(
        "--header", action="append", default=[], help="request header 'Name: value' (repeatable)"
    )
    explain.add_argument(
        "--operation",
        choices=["chat", "completions", "embeddings"],
        help="default: implied by the body (messages, prompt or input)",
    )
    explain.set_defaults(func=_explain)

    demo = sub.add_parser("demo", help="start stand-in providers and the router, show routing")
    demo.set_defaults(func=_demo)

    op = sub.add_parser("operator", help="run the operator (reconciler + config stream server)")
    op.add_argument("--host", default="0.0.0.0", help="stream server address (default: 0.0.0.0)")
    op.add_argument("--port", type=int, default=8443, help="stream server port (default: 8443)")
    op.add_argument("--tls-cert-file", help="stream server certificate (PEM)")
    op.add_argument("--tls-key-file", help="stream server private key (PEM)")
    op.add_argument("--audience", default="modelplane", help="token audience sidecars must use")
    op.add_argument(
        "--debounce", type=float, default=0.2, help="seconds to gather a burst of changes"
    )
    op.add_argument(
        "--namespace", action="append", help="watch only this namespace (repeatable; default: all)"
    )
    op.add_argument(
        "--secret-resync-seconds",
        type=float,
        default=30.0,
        help="seconds between re-reads of the Secrets resources reference (they are read by "
        "name, never watched; a rotated key reaches sidecars within this; default: 30)",
    )
    op.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    if operator_flags:
        _add_injection_arguments(op, required=False)
        from modelplane_operator.ha.cli import add_election_arguments

        add_election_arguments(op)
    op.set_defaults(func=_operator)

    webhook = sub.add_parser("webhook", help="run only the sidecar injection webhook")
    webhook.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    if operator_flags:
        _add_injection_arguments(webhook, required=True)
    webhook.set_defaults(func=_webhook)

    crds = sub.add_parser("crds", help="generate the CRD YAML from the operator's spec models")
    crds.add_argument("--out", default="crds", help="output directory (default: crds)")
    crds.add_argument("--check", action="store_true", help="only fail when the files are stale")
    crds.set_defaults(func=_crds)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words and not words[0].startswith("-") else None
    args = build_parser(command).parse_args(words)
    from prometheus_client import disable_created_metrics

    # One series per counter and histogram, without a `_created` gauge beside each: a sidecar
    # runs in every pod, so its series count multiplies. (The function has no annotations.)
    cast(Callable[[], None], disable_created_metrics)()
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
