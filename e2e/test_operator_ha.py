"""Two operator replicas against the real apiserver: leader election, failover, fleet-wide counts.

The chart is installed with `operator.replicas=2` (url mode, short lease timings) and its
Deployment's command runs twice as local processes, each as the chart's own ServiceAccount (so the
chart's Lease RBAC is what is exercised), on its own ports and with its own identity. Sidecars
(`modelplane serve --control-plane`) connect one to each replica; the app is the openai SDK, the
upstream an OpenAI stand-in.
"""

from __future__ import annotations

import base64
import json
import signal
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from cluster import Cluster
from injection_helpers import Install, new_install
from operator_helpers import (
    MODELPLANE,
    Process,
    Sidecar,
    StandIns,
    apply,
    condition,
    free_port,
    get,
    install_crds,
    service_account_token,
    standins,
    wait_for,
)

from modelplane_sidecar.standins.openai import OpenAIStandIn

LEASE_SECONDS = 4
API = "modelplane.io/v1alpha1"


@pytest.fixture
def install(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    install_crds(cluster)
    installed = new_install(cluster, tmp_path_factory.mktemp("ha"))
    try:
        yield installed
    finally:
        installed.teardown()


@pytest.fixture
def servers() -> Iterator[StandIns]:
    with standins() as s:
        yield s


class Replica:
    """One replica: the chart's Deployment command as a local process, on ports of its own."""

    def __init__(self, install: Install, identity: str, webhook_port: int) -> None:
        self.identity = identity
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        tls_dir = install.workdir / f"tls-{identity}"
        tls_dir.mkdir(parents=True, exist_ok=True)
        local = {
            "--host": "127.0.0.1",
            "--port": str(self.port),
            "--webhook-host": "127.0.0.1",
            "--webhook-port": str(webhook_port),
            "--tls-dir": str(tls_dir),
        }
        command = install.deployment_command()
        assert command[:2] == ["modelplane", "operator"], command
        args = [f"--identity={identity}"]
        for arg in command[2:]:
            flag = arg.split("=", 1)[0]
            args.append(f"{flag}={local[flag]}" if flag in local else arg)
        env = install.cluster.env({"KUBECONFIG": str(install.service_account_kubeconfig())})
        log = install.cluster.log_dir / f"operator-{install.release}-{identity}.log"
        self.process = Process([MODELPLANE, "operator", *args], log, env)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.stop(sig)

    def leading(self, ca: Path) -> float | None:
        """The replica's `modelplane_operator_leader` gauge, from its /metrics (None: not up)."""
        return self.metric(ca, "modelplane_operator_leader ")

    def metric(self, ca: Path, series: str) -> float | None:
        """The value of the first line of the replica's /metrics that starts with `series`."""
        context = ssl.create_default_context(cafile=str(ca))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(self.url + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(series):
                return float(line.split()[-1])
        return None


def lease(cluster: Cluster, install: Install) -> dict[str, Any]:
    found: dict[str, Any] = cluster.kubectl_json(
        "get", "lease", install.fullname, "-n", install.namespace
    )
    return found


def holder(cluster: Cluster, install: Install) -> str | None:
    result = cluster.kubectl(
        "get", "lease", install.fullname, "-n", install.namespace, "-o", "json", check=False
    )
    if result.returncode != 0:
        return None
    spec = json.loads(result.stdout).get("spec") or {}
    return spec.get("holderIdentity") or None


def objects(upstream: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "openai"},
            "stringData": {"api-key": "sk-ha-test"},
        },
        {
            "apiVersion": API,
            "kind": "ModelEndpoint",
            "metadata": {"name": "gpt"},
            "spec": {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "baseURL": upstream,
                "credentials": {"secretRef": {"name": "openai", "key": "api-key"}},
                "pricing": {"inputPerMTok": 100.0, "outputPerMTok": 100.0},
            },
        },
        {
            # Its Secret is missing: a Warning Event, posted by the leader only.
            "apiVersion": API,
            "kind": "ModelEndpoint",
            "metadata": {"name": "broken"},
            "spec": {
                "provider": "openai",
                "model": "gpt-4o-mini",
                "baseURL": upstream,
                "credentials": {"secretRef": {"name": "missing", "key": "api-key"}},
            },
        },
        {
            "apiVersion": API,
            "kind": "RoutingPolicy",
            "metadata": {"name": "routes"},
            "spec": {"models": [{"name": "chat", "targets": [{"endpoint": "gpt"}]}]},
        },
        {
            # Blocking: every call needs a spend lease from the leader's books.
            "apiVersion": API,
            "kind": "Budget",
            "metadata": {"name": "daily"},
            "spec": {
                "period": "daily",
                "limitUSD": 5.0,
                "maxOutputTokens": 64,
                "thresholds": [{"percent": 100, "action": "block"}],
            },
        },
    ]


def current(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    """The object once its status is Ready for its current generation."""
    obj = get(cluster, namespace, kind, name)
    ready = condition(obj, "Ready")
    observed = (obj.get("status") or {}).get("observedGeneration")
    if ready and ready["status"] == "True" and observed == obj["metadata"]["generation"]:
        return obj
    return None


def applied(cluster: Cluster, namespace: str, connected: int) -> dict[str, Any] | None:
    obj = get(cluster, namespace, "routingpolicy", "routes")
    c = condition(obj, "Applied")
    sidecars = (obj.get("status") or {}).get("sidecars") or {}
    if (
        c
        and c["status"] == "True"
        and sidecars
        == {
            "connected": connected,
            "current": connected,
            "stale": 0,
            "rejected": 0,
        }
    ):
        return c
    return None


def budget_requests(cluster: Cluster, namespace: str, holder_prefix: str) -> int:
    status = get(cluster, namespace, "budget", "daily").get("status") or {}
    leases = [x for x in status.get("leases") or [] if x["holder"].startswith(holder_prefix)]
    return sum(e["requests"] for x in leases for e in x.get("endpoints") or [])


def ask(sidecar: Sidecar, model: str) -> None:
    client = openai.OpenAI(base_url=sidecar.base_url + "/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_two_replicas_one_leader_fleet_counts_and_failover(
    cluster: Cluster,
    install: Install,
    namespace: str,
    servers: StandIns,
    tmp_path: Path,
) -> None:
    standin = OpenAIStandIn("upstream", api_key="sk-ha-test")
    upstream = servers.start(standin)
    install.helm(
        "install",
        *install.values(
            **{
                "operator.replicas": "2",
                "operator.watchNamespaces[1]": namespace,
                "operator.leaderElection.leaseDurationSeconds": str(LEASE_SECONDS),
                "operator.leaderElection.renewDeadlineSeconds": "3",
                "operator.leaderElection.retryPeriodSeconds": "0.5",
            }
        ),
    )
    assert "--leader-election" in install.deployment_command()
    replicas = {
        "op-a": Replica(install, "op-a", install.webhook_port),
        "op-b": Replica(install, "op-b", free_port()),
    }
    sidecars: list[Sidecar] = []
    try:
        # Exactly one replica holds the Lease.
        first = wait_for(lambda: holder(cluster, install), "a leader", timeout=60)
        assert first in replicas
        other = next(name for name in replicas if name != first)
        leader, follower = replicas[first], replicas[other]
        spec = lease(cluster, install)["spec"]
        assert spec["leaseDurationSeconds"] == LEASE_SECONDS
        assert spec["acquireTime"] and spec["renewTime"]
        transitions = spec.get("leaseTransitions", 0)

        apply(cluster, namespace, *objects(upstream))
        for kind, name in [
            ("modelendpoint", "gpt"),
            ("routingpolicy", "routes"),
            ("budget", "daily"),
        ]:
            wait_for(lambda k=kind, n=name: current(cluster, namespace, k, n), f"{kind} {name}")

        # Events come from the leader alone (reportingInstance is the replica's identity).
        def warnings() -> list[dict[str, Any]]:
            events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
            return [e for e in events if e["involvedObject"]["name"] == "broken"]

        events = wait_for(warnings, "the broken endpoint's Warning Event")
        assert {e.get("reportingInstance") for e in events} == {first}

        # Each replica says whether it leads; exactly one does.
        ca = tmp_path / "ca.crt"
        ca.write_bytes(base64.b64decode(install.stored_ca()))
        wait_for(
            lambda: (leader.leading(ca), follower.leading(ca)) == (1.0, 0.0),
            "one replica to say it leads and the other that it follows",
        )

        # A sidecar on each replica: both get the config, and Applied counts both.
        for name, replica in (("app-a", leader), ("app-b", follower)):
            sidecars.append(
                Sidecar(
                    cluster,
                    replica.url,
                    service_account_token(cluster, namespace, "app"),
                    ca,
                    tmp_path / name,
                    name,
                )
            )
        on_leader, on_follower = sidecars
        wait_for(on_follower.version, "the config from the follower")
        wait_for(on_leader.version, "the config from the leader")
        assert on_leader.version() == on_follower.version()
        c = wait_for(lambda: applied(cluster, namespace, 2), "Applied 2 of 2 across replicas")
        assert c["message"].startswith("2 of 2 connected sidecars run version ")

        # The follower's sidecar spends under the leader's books (its leases are relayed).
        ask(on_follower, "chat")
        wait_for(lambda: budget_requests(cluster, namespace, "app-b/") == 1, "relayed spend")
        # ...over the follower's multiplexed relay connection, not a connection per sidecar.
        relays = leader.metric(ca, 'modelplane_operator_stream_connections_total{result="relay"}')
        assert relays is not None and relays >= 1

        # The leader dies without a word; the follower takes over once the Lease expires.
        leader.stop(signal.SIGKILL)
        wait_for(
            lambda: holder(cluster, install) == other,
            "the follower to take the Lease over",
            timeout=LEASE_SECONDS + 10,
        )
        assert lease(cluster, install)["spec"]["leaseTransitions"] == transitions + 1
        wait_for(lambda: follower.leading(ca) == 1.0, "the survivor to say it leads")

        # It keeps status current: an edit after the failover is compiled, pushed and reported.
        cluster.kubectl(
            "patch", "routingpolicy", "routes", "-n", namespace, "--type=json",
            "-p", '[{"op": "replace", "path": "/spec/models/0/name", "value": "chat-v2"}]',
        )  # fmt: skip
        wait_for(lambda: current(cluster, namespace, "routingpolicy", "routes"), "status")
        wait_for(lambda: on_follower.models() == ["chat-v2"], "the edit on the follower's sidecar")
        # The dead replica's sidecar count expires with its Lease; the survivor's stays.
        wait_for(lambda: applied(cluster, namespace, 1), "Applied 1 of 1 after the failover")

        # The new leader keeps the books now: spend on its sidecar still lands in status.
        wait_for(lambda: follower_serves(on_follower), "a lease from the new leader", timeout=30)
        wait_for(lambda: budget_requests(cluster, namespace, "app-b/") >= 2, "spend after failover")
        events = warnings()
        assert {e.get("reportingInstance") for e in events} <= {first, other}
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        for replica in replicas.values():
            replica.stop()


def follower_serves(sidecar: Sidecar) -> bool:
    """One call that needs a spend lease; False while the sidecar resyncs with the new leader."""
    try:
        ask(sidecar, "chat-v2")
    except openai.APIStatusError as exc:
        if exc.status_code == 429:
            return False
        raise
    return True
