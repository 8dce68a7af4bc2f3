"""`dev-cluster up|down|env|status`: a long-lived control plane a developer can poke with kubectl.

`up` starts it in the background and returns; its state lives in a fixed dir (default
~/.cache/modelplane/dev-cluster, or --dir / MODELPLANE_DEV_CLUSTER_DIR), so `down` works from any
shell. `env` prints shell exports: `eval "$(e2e/cluster/dev-cluster env)"`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from .binaries import MissingBinaries
from .control_plane import STATE_FILE, Cluster, ClusterStartError, load_cluster, start_cluster


def _default_dir() -> Path:
    configured = os.environ.get("MODELPLANE_DEV_CLUSTER_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "modelplane" / "dev-cluster"


def _running(workdir: Path) -> Cluster | None:
    if not (workdir / STATE_FILE).exists():
        return None
    cluster = load_cluster(workdir)
    return cluster if cluster.is_ready() else None


def _exports(cluster: Cluster) -> str:
    env = cluster.env()
    names = (
        *("KUBECONFIG", "NO_PROXY", "no_proxy", "PATH", "KUBECACHEDIR"),
        *("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"),
    )
    return "".join(f"export {name}={shlex.quote(env[name])}\n" for name in names)


def _up(workdir: Path, controller_manager: bool) -> int:
    if (cluster := _running(workdir)) is not None:
        print(f"already running: {cluster.server} (state in {workdir})", file=sys.stderr)
        return 0
    if (workdir / STATE_FILE).exists():
        load_cluster(workdir).stop()  # leftovers of a half-dead cluster
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        cluster = start_cluster(workdir, controller_manager=controller_manager)
    except (MissingBinaries, ClusterStartError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"kube-apiserver ready at {cluster.server}", file=sys.stderr)
    print(f"logs: {cluster.log_dir}", file=sys.stderr)
    print(f"use it:  export KUBECONFIG={cluster.kubeconfig}", file=sys.stderr)
    print('or:      eval "$(e2e/cluster/dev-cluster env)"', file=sys.stderr)
    return 0


def _down(workdir: Path) -> int:
    if not (workdir / STATE_FILE).exists():
        print(f"no cluster state in {workdir}", file=sys.stderr)
        return 0
    load_cluster(workdir).stop()
    shutil.rmtree(workdir, ignore_errors=True)
    print("stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev-cluster", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "env", "status"))
    parser.add_argument("--dir", type=Path, default=_default_dir(), help="state/work dir")
    parser.add_argument(
        "--controller-manager",
        action="store_true",
        help="also run kube-controller-manager (default ServiceAccounts, namespace deletion, GC)",
    )
    args = parser.parse_args(argv)
    workdir: Path = args.dir.expanduser().resolve()
    if args.command == "up":
        return _up(workdir, args.controller_manager)
    if args.command == "down":
        return _down(workdir)
    cluster = _running(workdir)
    if cluster is None:
        print(f"no running cluster in {workdir}; start one with `up`", file=sys.stderr)
        return 1
    if args.command == "env":
        sys.stdout.write(_exports(cluster))
    else:
        print(f"running: {cluster.server} (state in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
