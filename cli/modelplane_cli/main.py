"""`modelplane`: one command, a subcommand per entry point.

Subcommands import their implementation lazily so `modelplane serve` never loads the operator's
dependencies and starts fast.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any


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
        return _run(serve_file(Path(args.config), args.host, args.port))
    except ConfigError as exc:
        print(f"modelplane serve: invalid config: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelplane", description="Modelplane: an LLM router for Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the routing sidecar from a RouterConfig file")
    serve.add_argument("--config", required=True, help="RouterConfig YAML file")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=15000, help="listen port (default: 15000)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="start stand-in providers and the router, show routing")
    demo.set_defaults(func=_demo)

    crds = sub.add_parser("crds", help="generate the CRD YAML from the operator's spec models")
    crds.add_argument("--out", default="crds", help="output directory (default: crds)")
    crds.add_argument("--check", action="store_true", help="only fail when the files are stale")
    crds.set_defaults(func=_crds)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
