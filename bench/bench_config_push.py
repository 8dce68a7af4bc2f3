"""Config push benchmark: one `modelplane operator`, N simulated sidecars, a real apiserver.

For each N (1 as the baseline, then e.g. 100 and 1,000) the benchmark connects N WebSocket
clients to the operator's config stream over TLS, each with its own TokenRequest token (so the
operator runs N real TokenReviews), waits until all of them run the current config, and then
makes R changes through the API, of two kinds:

- `edit`: the RoutingPolicy changes (always a full snapshot);
- `replicas`: an address of the self-hosted endpoint's EndpointSlice turns unready or ready,
  once with sidecars that do not speak replica updates (`snapshot`: the full snapshot, as before
  replica updates existed) and once with sidecars that list `replicas/v1` in their hello
  (`update`: the light replica update), against the same operator in the same run.

It reports, side by side:

- all-ACKed: time from the PATCH to the last sidecar's ACK, p50 and p99 over the rounds;
- per-sidecar: time from the PATCH to each sidecar's ACK, p50 and p99 over all sidecars x rounds;
- the bytes of the message each sidecar received per change;
- connect: time for all N sidecars to connect and be counted current;
- the operator's RSS (now and peak) and the CPU seconds it used during the rounds.

Then, without a cluster, what one real sidecar spends applying a change (ControlPlaneClient with
its ConfigHolder, the last-known-good write excluded as it is the same for both): a full
snapshot (parse, build, routing table) against a replica update (patch, one endpoint, routing
table), for a small and a large namespace config.

The operator debounces bursts of changes (--debounce, default 0.2 s here as in production), so
that much of each latency is deliberate. Simulated sidecars decode the snapshot and ACK without
building a router (a real sidecar has its own CPU for that); all processes share this machine's
cores, so the numbers are an upper bound for the operator.

Usage: .venv/bin/python bench/bench_config_push.py [--sidecars 100 1000] [--rounds 10]
A control plane is started in a temp dir from the cached binaries (bash
e2e/cluster/build-binaries.sh builds them) and stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "e2e"))

from cluster import Cluster, start_cluster  # noqa: E402

NS = "bench"
STREAM = "/v1/config/stream"


@dataclass
class SimSidecar:
    token: str
    #: Hello features: ["replicas/v1"] for a sidecar that takes replica updates.
    features: list[str] = field(default_factory=list)
    version: str | None = None
    acks: dict[str, float] = field(default_factory=dict)
    #: (message type, bytes) of every versioned message received.
    received: list[tuple[str, int]] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(RSS MiB, peak RSS MiB, CPU seconds) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) / 1024
    peak = int(fields["VmHWM"].split()[0]) / 1024
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(stat[11]) + int(stat[12])) / ticks
    return rss, peak, cpu


class Api:
    """Direct apiserver calls with the admin client cert (no kubectl start-up in timings)."""

    def __init__(self, cluster: Cluster) -> None:
        context = ssl.create_default_context(cafile=str(cluster.ca_cert))
        admin = cluster.admin_cert
        context.load_cert_chain(str(admin.cert), str(admin.key))
        self.server = cluster.server
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=32))

    async def call(self, method: str, path: str, body: object, ctype: str) -> Any:
        async with self.http.request(
            method, self.server + path, data=orjson.dumps(body), headers={"content-type": ctype}
        ) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {data}")
            return data

    async def token(self, account: str) -> str:
        path = f"/api/v1/namespaces/{NS}/serviceaccounts/{account}/token"
        spec = {"spec": {"audiences": ["modelplane"], "expirationSeconds": 3600}}
        data = await self.call("POST", path, spec, "application/json")
        return str(data["status"]["token"])

    async def set_description(self, text: str) -> None:
        path = f"/apis/modelplane.io/v1alpha1/namespaces/{NS}/routingpolicies/routes"
        patch = [{"op": "replace", "path": "/spec/models/0/description", "value": text}]
        await self.call("PATCH", path, patch, "application/json-patch+json")

    async def set_ready(self, ready: bool) -> None:
        """The first address of the self-hosted model's EndpointSlice turns (un)ready."""
        path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices/llama-1"
        patch = [{"op": "replace", "path": "/endpoints/0/conditions/ready", "value": ready}]
        await self.call("PATCH", path, patch, "application/json-patch+json")


async def run_sidecar(
    http: aiohttp.ClientSession,
    url: str,
    context: ssl.SSLContext,
    sim: SimSidecar,
    stop: asyncio.Event,
    connected: asyncio.Semaphore,
) -> None:
    async with http.ws_connect(
        url + STREAM,
        headers={"authorization": f"Bearer {sim.token}"},
        ssl=context,
        heartbeat=60,
        max_msg_size=0,
    ) as ws:
        connected.release()
        greeting = {"type": "hello", "node": "sim", "version": None, "features": sim.features}
        await ws.send_str(orjson.dumps(greeting).decode())
        receiver = asyncio.ensure_future(_receive(ws, sim))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({receiver, stopper}, return_when=asyncio.FIRST_COMPLETED)
        receiver.cancel()
        stopper.cancel()


async def _receive(ws: aiohttp.ClientWebSocketResponse, sim: SimSidecar) -> None:
    async for msg in ws:
        data = orjson.loads(msg.data)
        if data.get("type") in ("config", "replicas"):
            sim.received.append((data["type"], len(msg.data)))
            version = data["version"]
            await ws.send_str(orjson.dumps({"type": "ack", "version": version}).decode())
            sim.version = version
            sim.acks[version] = time.perf_counter()


async def wait_until(check: Any, what: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.005)
    raise TimeoutError(f"timed out waiting for {what}")


async def measure(
    cluster: Cluster,
    api: Api,
    operator_url: str,
    pid: int,
    n: int,
    rounds: int,
    kinds: list[str],
    features: list[str],
) -> list[dict[str, Any]]:
    """Connect n sims with `features`, then `rounds` changes of each kind; one row per kind."""
    tokens = await asyncio.gather(*(api.token(f"sim-{i % 10}") for i in range(n)))
    sims = [SimSidecar(t, list(features)) for t in tokens]
    context = ssl.create_default_context(cafile=str(cluster.ca_cert))
    stop = asyncio.Event()
    connected = asyncio.Semaphore(0)
    connector = aiohttp.TCPConnector(limit=0, ssl=context)
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.perf_counter()
        # Connect in waves of 100, as pods of a rollout would, not all in the same millisecond.
        tasks = []
        for i, sim in enumerate(sims):
            tasks.append(
                asyncio.ensure_future(
                    run_sidecar(http, operator_url, context, sim, stop, connected)
                )
            )
            if i % 100 == 99:
                for _ in range(100):
                    await connected.acquire()
        await wait_until(
            lambda: len({s.version for s in sims}) == 1 and sims[0].version is not None,
            "every sidecar on the current config",
            limit_s=300,
        )
        connect_s = time.perf_counter() - started
        for kind in kinds:
            rss_idle, _, cpu_before = proc_stats(pid)
            all_acked: list[float] = []
            each: list[float] = []
            sizes: list[int] = []
            types: set[str] = set()
            for r in range(rounds):
                before = sims[0].version
                seen = len(sims[0].received)
                t0 = time.perf_counter()
                if kind == "edit":
                    await api.set_description(f"bench round {r} n={n} {time.time()}")
                else:
                    await api.set_ready(r % 2 == 1)  # unready, ready, unready, ...
                await wait_until(
                    lambda b=before: (
                        all(s.version not in (None, b) for s in sims)
                        and len({s.version for s in sims}) == 1
                    ),
                    "all ACKed",
                    limit_s=120,
                )
                version = sims[0].version
                assert version is not None
                times = [s.acks[version] - t0 for s in sims]
                all_acked.append(max(times))
                each.extend(times)
                for kind_seen, size in sims[0].received[seen:]:
                    types.add(kind_seen)
                    sizes.append(size)
                await asyncio.sleep(0.3)  # let the operator settle its status writes
            rss, peak, cpu_after = proc_stats(pid)
            protocol = "update" if "replicas/v1" in features else "snapshot"
            rows.append(
                {
                    "n": n,
                    "change": kind,
                    "protocol": protocol if kind == "replicas" else "snapshot",
                    "sent": "+".join(sorted(types)),
                    "bytes": sum(sizes) / max(1, len(sizes)),
                    "connect_s": connect_s,
                    "all_p50_ms": percentile(all_acked, 50) * 1000,
                    "all_p99_ms": percentile(all_acked, 99) * 1000,
                    "each_p50_ms": percentile(each, 50) * 1000,
                    "each_p99_ms": percentile(each, 99) * 1000,
                    "rss_idle_mib": rss_idle,
                    "rss_mib": rss,
                    "peak_mib": peak,
                    "cpu_s_per_round": (cpu_after - cpu_before) / rounds,
                }
            )
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return rows


def setup_namespace(cluster: Cluster, endpoints: int) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    for plural in ("modelendpoints", "routingpolicies", "budgets"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.modelplane.io")
    cluster.kubectl("create", "namespace", NS)
    for i in range(10):
        cluster.kubectl("create", "serviceaccount", f"sim-{i}", "-n", NS)
    objects = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "openai"},
            "stringData": {"api-key": "sk-bench"},
        },
        # A self-hosted model: a selector-less Service and its EndpointSlice of 4 addresses
        # (documentation range, never contacted: no engine, so nothing is scraped).
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "llama"},
            "spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "llama-1", "labels": {"kubernetes.io/service-name": "llama"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [f"192.0.2.{10 + i}"], "conditions": {"ready": True}}
                for i in range(4)
            ],
        },
        {
            "apiVersion": "modelplane.io/v1alpha1",
            "kind": "ModelEndpoint",
            "metadata": {"name": "llama"},
            "spec": {
                "provider": "openai-compatible",
                "model": "llama-3.1-8b",
                "serviceRef": {"name": "llama", "port": 8000},
            },
        },
        *(
            {
                "apiVersion": "modelplane.io/v1alpha1",
                "kind": "ModelEndpoint",
                "metadata": {"name": f"ep-{i}"},
                "spec": {
                    "provider": "openai",
                    "model": f"model-{i}",
                    "baseURL": "https://api.openai.com/v1",
                    "credentials": {"secretRef": {"name": "openai", "key": "api-key"}},
                },
            }
            for i in range(endpoints)
        ),
        {
            "apiVersion": "modelplane.io/v1alpha1",
            "kind": "RoutingPolicy",
            "metadata": {"name": "routes"},
            "spec": {
                "models": [
                    {
                        "name": "chat",
                        "targets": [{"endpoint": f"ep-{i}"} for i in range(min(endpoints, 32))],
                    },
                    {"name": "fast", "targets": [{"endpoint": "ep-0"}]},
                    # Every endpoint is routed to, so every one is shipped (32 targets at most).
                    *(
                        {"name": f"direct-{i}", "targets": [{"endpoint": f"ep-{i}"}]}
                        for i in range(32, endpoints)
                    ),
                    {"name": "local", "targets": [{"endpoint": "llama"}]},
                ]
            },
        },
    ]
    cluster.kubectl(
        "apply",
        "-n",
        NS,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_operator(cluster: Cluster, debounce: float) -> tuple[subprocess.Popen[bytes], str]:
    cert = cluster.issue_serving_cert("bench-operator")
    port = free_port()
    with (cluster.workdir / "operator.log").open("wb") as log:
        operator = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("modelplane")),
                "operator",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--tls-cert-file={cert.cert}",
                f"--tls-key-file={cert.key}",
                f"--namespace={NS}",
                f"--debounce={debounce}",
                "--log-level=warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cluster.env(),
        )
    return operator, f"https://127.0.0.1:{port}"


async def wait_listening(cluster: Cluster, url: str, limit_s: float) -> None:
    """Until the operator's stream server answers (its start-up is slow on a loaded machine)."""
    context = ssl.create_default_context(cafile=str(cluster.ca_cert))
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the operator at {url} did not start listening")


async def bench(
    cluster: Cluster, operator_url: str, pid: int, sizes: list[int], rounds: int
) -> list[dict[str, Any]]:
    api = Api(cluster)
    results: list[dict[str, Any]] = []
    try:
        await wait_listening(cluster, operator_url, limit_s=120)
        await asyncio.sleep(2.0)  # the operator lists the namespace and compiles it
        for n in sizes:
            # Before: sidecars that take only snapshots. After: the same with replica updates.
            for kinds, features in ((["edit", "replicas"], []), (["replicas"], ["replicas/v1"])):
                results += await measure(
                    cluster, api, operator_url, pid, n, rounds, kinds, features
                )
            print(f"  measured N={n}", file=sys.stderr)
    finally:
        await api.http.close()
    return results


def report(results: list[dict[str, Any]], rounds: int, debounce: float) -> None:
    print(
        f"\nconfig push: one operator, N simulated sidecars over TLS, {rounds} changes of each "
        f"kind, debounce {debounce * 1000:.0f} ms (N=1 is the baseline; replicas/snapshot is "
        "the path before replica updates)\n"
    )
    header = (
        f"{'N':>6} {'change':>9} {'protocol':>9} {'sent':>9} {'bytes':>6} {'connect s':>10} "
        f"{'all-ACKed p50':>14} {'p99':>8} {'per-sidecar p50':>16} {'p99':>8} {'RSS MiB':>8} "
        f"{'peak MiB':>9} {'CPU s/change':>13}"
    )
    print(header)
    for r in results:
        print(
            f"{r['n']:>6.0f} {r['change']:>9} {r['protocol']:>9} {r['sent']:>9} "
            f"{r['bytes']:>6.0f} {r['connect_s']:>10.2f} {r['all_p50_ms']:>11.0f} ms "
            f"{r['all_p99_ms']:>5.0f} ms {r['each_p50_ms']:>13.0f} ms {r['each_p99_ms']:>5.0f} ms "
            f"{r['rss_mib']:>8.1f} {r['peak_mib']:>9.1f} {r['cpu_s_per_round']:>13.3f}"
        )


def sidecar_config(cloud_endpoints: int) -> dict[str, Any]:
    """A namespace's wire config: `cloud_endpoints` cloud endpoints, a model per endpoint, and
    a self-hosted pool of 8 replicas, versioned by its content hash."""
    from modelplane_sidecar.config import parse_config

    endpoints: list[dict[str, Any]] = [
        {
            "name": f"ep-{i}",
            "baseUrl": "https://api.openai.com/v1",
            "model": f"gpt-4o-mini-{i}",
            "apiKey": {"value": f"sk-bench-{i}"},
        }
        for i in range(cloud_endpoints)
    ]
    endpoints.append(
        {
            "name": "llama",
            "provider": "openai-compatible",
            "baseUrl": "http://llama.gpu.svc:8000/v1",
            "model": "llama-3.1-8b",
            "replicas": [{"url": f"http://192.0.2.{10 + i}:8000/v1"} for i in range(8)],
        }
    )
    data: dict[str, Any] = {
        "endpoints": endpoints,
        "models": [
            {"name": f"m-{i}", "endpoints": [f"ep-{i}", "llama"]} for i in range(cloud_endpoints)
        ],
    }
    data["metadata"] = {"name": NS, "version": parse_config(data).content_hash()}
    return data


async def _apply_changes(
    protocol: str, configs: list[dict[str, Any]], iterations: int
) -> list[float]:
    """CPU seconds of each change between the two `configs` (which differ in one replica's
    readiness), applied by a real sidecar client as snapshots or as replica updates."""
    from modelplane_sidecar.controlplane import ControlPlaneClient, replicas_message
    from modelplane_sidecar.metrics import SidecarMetrics
    from modelplane_sidecar.routing.decision import route_table
    from modelplane_sidecar.server import ConfigHolder

    holder = ConfigHolder(SidecarMetrics())
    client = ControlPlaneClient("http://127.0.0.1:1", Path("/dev/null"), holder)
    versions = [str(c["metadata"]["version"]) for c in configs]
    await client._apply({"type": "config", "version": versions[0], "config": configs[0]})
    timings = []
    for i in range(iterations):
        now, target = i % 2, (i + 1) % 2
        t0 = time.process_time()
        if protocol == "snapshot":
            message = {"type": "config", "version": versions[target], "config": configs[target]}
            reply = await client._apply(message)
        else:
            replicas = {"llama": configs[target]["endpoints"][-1]["replicas"]}
            message = replicas_message(versions[target], versions[now], replicas)
            reply = await client._apply_replicas(message)
        snapshot = holder.snapshot
        assert snapshot is not None
        snapshot.derived(route_table)  # what the first request would build
        timings.append(time.process_time() - t0)
        assert reply["type"] == "ack", reply
    return timings


def sidecar_apply(iterations: int) -> list[dict[str, Any]]:
    """One real sidecar client applying a change: full snapshot vs replica update (CPU time)."""
    import copy

    from modelplane_sidecar.config import parse_config

    rows: list[dict[str, Any]] = []
    for cloud in (5, 50):
        base = sidecar_config(cloud)
        changed = copy.deepcopy(base)
        changed["endpoints"][-1]["replicas"][0]["ready"] = False
        changed["metadata"]["version"] = parse_config(changed).content_hash()
        for protocol in ("snapshot", "update"):
            values = asyncio.run(_apply_changes(protocol, [base, changed], iterations))
            rows.append(
                {
                    "endpoints": cloud + 1,
                    "config_bytes": len(orjson.dumps(base)),
                    "protocol": protocol,
                    "p50_ms": percentile(values, 50) * 1000,
                    "p99_ms": percentile(values, 99) * 1000,
                }
            )
    return rows


def report_sidecar(rows: list[dict[str, Any]], iterations: int) -> None:
    print(
        f"\nsidecar apply: one ControlPlaneClient, {iterations} changes of one replica's "
        "readiness each way, CPU time per change (routing table included, last-known-good "
        "write excluded; snapshot is the baseline)\n"
    )
    print(f"{'endpoints':>9} {'config bytes':>13} {'protocol':>9} {'p50':>10} {'p99':>10}")
    for r in rows:
        print(
            f"{r['endpoints']:>9} {r['config_bytes']:>13} {r['protocol']:>9} "
            f"{r['p50_ms']:>7.3f} ms {r['p99_ms']:>7.3f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--debounce", type=float, default=0.2)
    parser.add_argument("--apply-iterations", type=int, default=200)
    parser.add_argument(
        "--endpoints", type=int, default=5, help="cloud ModelEndpoints in the namespace (size)"
    )
    parser.add_argument(
        "--sidecar-only", action="store_true", help="only the sidecar apply part (no cluster)"
    )
    args = parser.parse_args()
    applied = sidecar_apply(args.apply_iterations)
    if args.sidecar_only:
        report_sidecar(applied, args.apply_iterations)
        return 0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the operator inherits it
    sizes = [1, *[n for n in args.sidecars if n != 1]]
    workdir = Path(tempfile.mkdtemp(prefix="modelplane-bench-"))
    cluster = start_cluster(workdir)
    try:
        setup_namespace(cluster, args.endpoints)
        operator, url = start_operator(cluster, args.debounce)
        try:
            results = asyncio.run(bench(cluster, url, operator.pid, sizes, args.rounds))
        finally:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait(15)
        report(results, args.rounds, args.debounce)
        report_sidecar(applied, args.apply_iterations)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
