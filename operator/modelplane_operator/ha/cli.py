"""Flags of leader election (`modelplane operator --leader-election ...`).

Declared next to the code that reads them, like `injection/cli.py`; importing this module pulls in
nothing but the standard library, since `modelplane serve` builds the same parser.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .replica import ReplicaSettings


def add_election_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("leader election (several replicas)")
    group.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="elect one replica with a Lease to write status and keep the budget books "
        "(default: off, this process does it all; the Helm chart turns it on)",
    )
    group.add_argument(
        "--lease-name", default="modelplane-operator", help="the election Lease's name"
    )
    group.add_argument(
        "--lease-namespace",
        help="the election Lease's namespace (default: $POD_NAMESPACE, else default)",
    )
    group.add_argument(
        "--identity", help="this replica's name in the Lease (default: $POD_NAME, else host-pid)"
    )
    group.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds a Lease that stopped changing keeps its holder (default: 15)",
    )
    group.add_argument(
        "--lease-renew-deadline",
        type=float,
        default=10.0,
        help="seconds a leader keeps leading without a successful renewal (default: 10)",
    )
    group.add_argument(
        "--lease-retry-period",
        type=float,
        default=2.0,
        help="seconds between renewals and between a candidate's attempts (default: 2)",
    )
    group.add_argument(
        "--advertise-url",
        help="this replica's config stream as the other replicas reach it; followers relay "
        "budget leases to the leader's (default: https://$POD_IP:<--port>)",
    )
    group.add_argument(
        "--tls-ca-file",
        help="CA of the replicas' serving certificate, to verify the leader's when relaying "
        "(default: the CA the operator keeps with --tls-namespace, else the system's)",
    )


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def default_advertise_url(host: str, port: int) -> str:
    address = os.environ.get("POD_IP") or (host if host not in ("", "0.0.0.0", "::") else "")
    address = address or "127.0.0.1"
    try:
        if ipaddress.ip_address(address).version == 6:
            address = f"[{address}]"
    except ValueError:
        pass  # a DNS name
    return f"https://{address}:{port}"


def replica_settings_from_args(
    args: argparse.Namespace, peer_server_name: str | None
) -> ReplicaSettings | None:
    """None without --leader-election; raises ValueError naming the flag that is wrong."""
    from pathlib import Path

    from .election import ElectionSettings
    from .replica import ReplicaSettings

    if not args.leader_election:
        return None
    election = ElectionSettings(
        identity=args.identity or default_identity(),
        name=args.lease_name,
        namespace=args.lease_namespace or os.environ.get("POD_NAMESPACE") or "default",
        lease_duration=args.lease_duration,
        renew_deadline=args.lease_renew_deadline,
        retry_period=args.lease_retry_period,
    )
    url = args.advertise_url or default_advertise_url(args.host, args.port)
    if not url.startswith("https://"):
        raise ValueError(f"--advertise-url must be an https:// URL, not {url!r}")
    return ReplicaSettings(
        election=election,
        advertise_url=url,
        peer_server_name=peer_server_name,
        peer_ca_file=Path(args.tls_ca_file) if args.tls_ca_file else None,
    )
