"""Starts and stops a real Kubernetes control plane (etcd + kube-apiserver) as local processes.

Everything listens on free 127.0.0.1 ports and lives in one work dir: certificates (pki/), etcd's
data, logs (logs/), the admin kubeconfig and state.json (pids, ports, paths). The state file is
what lets `dev-cluster down` stop a cluster started from another shell. There is no kubelet and,
unless asked for, no kube-controller-manager: objects are stored, validated and admitted (webhooks
are really called) but Pods never run and namespaces never finish deleting.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from .binaries import BUILD_SCRIPT, Binaries, MissingBinaries, find_binaries
from .certs import CertFiles, CertificateAuthority, write_service_account_keys

STATE_FILE = "state.json"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
_LOOPBACK = "127.0.0.1"
# Clients must never send loopback traffic through a proxy configured in the environment.
_NO_PROXY = "127.0.0.1,localhost"
_STOP_GRACE_SECONDS = 10.0


class ClusterStartError(RuntimeError):
    """A component exited or never became ready; the message carries the tail of its log."""


class CommandFailed(RuntimeError):
    """kubectl or helm exited non-zero; keeps the result so callers can read stderr."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        command = " ".join(str(a) for a in result.args)
        super().__init__(f"`{command}` exited {result.returncode}:\n{result.stderr.strip()}")


@dataclass(frozen=True)
class ClusterState:
    """What a running cluster is made of; saved as state.json in its work dir."""

    workdir: str
    bin_dir: str
    server: str
    etcd_url: str
    etcd_pid: int
    apiserver_pid: int
    controller_manager_pid: int | None = None

    def save(self) -> None:
        path = Path(self.workdir) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, workdir: Path) -> ClusterState:
        return cls(**json.loads((workdir / STATE_FILE).read_text()))


class Cluster:
    """A handle on a running control plane: paths, client environment, kubectl and helm."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.workdir = Path(state.workdir)
        self.binaries = Binaries(Path(state.bin_dir))

    def __repr__(self) -> str:
        return f"Cluster(server={self.server!r}, workdir={str(self.workdir)!r})"

    @property
    def server(self) -> str:
        """The apiserver's URL, https://127.0.0.1:<port>."""
        return self.state.server

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def admin_cert(self) -> CertFiles:
        return CertFiles(self.pki_dir / "admin.crt", self.pki_dir / "admin.key", self.ca_cert)

    @property
    def certificate_authority(self) -> CertificateAuthority:
        return CertificateAuthority.load(self.ca_cert, self.pki_dir / "ca.key")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for any client process: KUBECONFIG, no proxy for loopback, the cached
        kubectl/helm first on PATH, and kubectl/helm caches kept inside the work dir."""
        env = dict(os.environ)
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            NO_PROXY=_NO_PROXY,
            no_proxy=_NO_PROXY,
            PATH=f"{self.binaries.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            KUBECACHEDIR=str(self.workdir / "kube-cache"),
            HELM_CACHE_HOME=str(self.workdir / "helm" / "cache"),
            HELM_CONFIG_HOME=str(self.workdir / "helm" / "config"),
            HELM_DATA_HOME=str(self.workdir / "helm" / "data"),
        )
        env.update(extra or {})
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the cached kubectl against this cluster; raises CommandFailed unless check=False."""
        return self._run(self.binaries.kubectl, args, input, check, timeout)

    def kubectl_json(self, *args: str, input: str | None = None) -> Any:
        """Runs kubectl with `-o json` and returns the parsed output."""
        return json.loads(self.kubectl(*args, "-o", "json", input=input).stdout)

    def apply(self, manifest: str | Path) -> subprocess.CompletedProcess[str]:
        """`kubectl apply` of a file or of YAML text."""
        if isinstance(manifest, Path):
            return self.kubectl("apply", "-f", str(manifest))
        return self.kubectl("apply", "-f", "-", input=manifest)

    def helm(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the cached helm against this cluster; raises CommandFailed unless check=False."""
        return self._run(self.binaries.helm, args, None, check, timeout)

    def create_namespace(self, prefix: str = "e2e", labels: Mapping[str, str] | None = None) -> str:
        """Creates a namespace with a unique name and returns that name."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        manifest = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels or {})},
        }
        self.kubectl("create", "-f", "-", input=json.dumps(manifest))
        return name

    def delete_namespace(self, name: str) -> None:
        # Without kube-controller-manager the namespace stays Terminating: never wait for it.
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")

    def issue_serving_cert(
        self, name: str, hosts: Sequence[str] = (_LOOPBACK, "localhost")
    ) -> CertFiles:
        """A serving cert signed by the cluster CA, written to pki/<name>.crt/.key.

        Give a webhook server the cert and key, and put `ca_bundle` into the webhook
        configuration's `clientConfig.caBundle` so the apiserver trusts it.
        """
        issued = self.certificate_authority.issue(name, hosts=tuple(hosts))
        return issued.write(self.pki_dir, name, self.ca_cert)

    def is_ready(self) -> bool:
        try:
            return _apiserver_ready(self.server, self.admin_cert)
        except OSError:
            return False

    def stop(self) -> None:
        """Stops every component, dependants first; safe to call twice."""
        pids = (
            (self.state.controller_manager_pid, self.binaries.kube_controller_manager),
            (self.state.apiserver_pid, self.binaries.kube_apiserver),
            (self.state.etcd_pid, self.binaries.etcd),
        )
        for pid, binary in pids:
            if pid is not None:
                _stop_process(pid, binary)

    def _run(
        self,
        binary: Path,
        args: Sequence[str],
        input: str | None,
        check: bool,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(binary), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise CommandFailed(result)
        return result


def start_cluster(
    workdir: Path,
    binaries: Binaries | None = None,
    *,
    controller_manager: bool = False,
    exit_with_parent: bool = False,
    timeout: float = 90.0,
) -> Cluster:
    """Starts etcd and kube-apiserver (and optionally kube-controller-manager) and waits until
    the apiserver answers /readyz. On failure everything started so far is stopped again.

    With `exit_with_parent` the components get SIGTERM when the calling process dies, even by
    SIGKILL (a test run killed by a CI timeout leaves nothing behind); leave it off for a
    cluster that must outlive its starter, like `dev-cluster up`.
    """
    binaries = binaries or find_binaries()
    if controller_manager and not os.access(binaries.kube_controller_manager, os.X_OK):
        raise MissingBinaries(f"{binaries.kube_controller_manager} not found; see {BUILD_SCRIPT}")
    workdir = workdir.resolve()
    pki, logs = workdir / "pki", workdir / "logs"
    for directory in (pki, logs):
        directory.mkdir(parents=True, exist_ok=True)
    etcd_client_port, etcd_peer_port, apiserver_port = _free_ports(3)
    server = f"https://{_LOOPBACK}:{apiserver_port}"
    etcd_url = f"http://{_LOOPBACK}:{etcd_client_port}"

    ca = CertificateAuthority.create()
    ca_cert, _ = ca.write(pki)
    serving = ca.issue("kube-apiserver", hosts=(_LOOPBACK, "localhost", "kubernetes"))
    apiserver_cert = serving.write(pki, "apiserver", ca_cert)
    admin = ca.issue("modelplane-e2e-admin", organizations=("system:masters",), client=True)
    admin_cert = admin.write(pki, "admin", ca_cert)
    sa_private, sa_public = write_service_account_keys(pki)
    _write_kubeconfig(workdir / "kubeconfig", server, admin_cert)

    started: list[tuple[int, Path]] = []
    try:
        etcd_pid = _spawn(
            binaries.etcd,
            _etcd_args(workdir / "etcd-data", etcd_client_port, etcd_peer_port),
            logs / "etcd.log",
            exit_with_parent,
        )
        started.append((etcd_pid, binaries.etcd))
        _wait_until(lambda: _etcd_healthy(etcd_url), etcd_pid, logs / "etcd.log", "etcd", timeout)
        apiserver_args = _apiserver_args(
            etcd_url, apiserver_port, workdir, apiserver_cert, sa_private, sa_public
        )
        apiserver_pid = _spawn(
            binaries.kube_apiserver, apiserver_args, logs / "kube-apiserver.log", exit_with_parent
        )
        started.append((apiserver_pid, binaries.kube_apiserver))
        _wait_until(
            lambda: _apiserver_ready(server, admin_cert),
            apiserver_pid,
            logs / "kube-apiserver.log",
            "kube-apiserver",
            timeout,
        )
        controller_manager_pid = None
        if controller_manager:
            controller_manager_pid = _spawn(
                binaries.kube_controller_manager,
                _controller_manager_args(workdir, ca_cert, sa_private),
                logs / "kube-controller-manager.log",
                exit_with_parent,
            )
            started.append((controller_manager_pid, binaries.kube_controller_manager))
    except BaseException:
        for pid, binary in reversed(started):
            _stop_process(pid, binary)
        raise
    state = ClusterState(
        workdir=str(workdir),
        bin_dir=str(binaries.bin_dir),
        server=server,
        etcd_url=etcd_url,
        etcd_pid=etcd_pid,
        apiserver_pid=apiserver_pid,
        controller_manager_pid=controller_manager_pid,
    )
    state.save()
    return Cluster(state)


def load_cluster(workdir: Path) -> Cluster:
    """The cluster whose state.json is in `workdir` (it may have stopped since)."""
    return Cluster(ClusterState.load(workdir))


def _etcd_args(data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client_url = f"http://{_LOOPBACK}:{client_port}"
    # The peer URL must be set explicitly: etcd's default :2380 collides with any other etcd.
    peer_url = f"http://{_LOOPBACK}:{peer_port}"
    return [
        "--name=default",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}",
        f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}",
        f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=default={peer_url}",
        # Throwaway data: durability is not worth the fsync latency on a slow test disk.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def _apiserver_args(
    etcd_url: str,
    port: int,
    workdir: Path,
    serving: CertFiles,
    sa_private: Path,
    sa_public: Path,
) -> list[str]:
    return [
        f"--etcd-servers={etcd_url}",
        f"--bind-address={_LOOPBACK}",
        f"--advertise-address={_LOOPBACK}",
        f"--secure-port={port}",
        # No real endpoints: keep the apiserver from managing the `kubernetes` Service endpoints.
        "--endpoint-reconciler-type=none",
        f"--cert-dir={workdir / 'pki'}",
        f"--tls-cert-file={serving.cert}",
        f"--tls-private-key-file={serving.key}",
        f"--client-ca-file={serving.ca}",
        f"--service-account-issuer=https://{_LOOPBACK}:{port}",
        f"--service-account-key-file={sa_public}",
        f"--service-account-signing-key-file={sa_private}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        # Without kube-controller-manager no `default` ServiceAccount exists, and this plugin
        # would reject every Pod that does not name an existing one.
        "--disable-admission-plugins=ServiceAccount",
        "--profiling=false",
    ]


def _controller_manager_args(workdir: Path, ca_cert: Path, sa_private: Path) -> list[str]:
    kubeconfig = str(workdir / "kubeconfig")
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        # Nothing scrapes it; 0 turns the serving endpoint off instead of taking a port.
        "--secure-port=0",
        "--leader-elect=false",
        "--use-service-account-credentials=false",
        f"--service-account-private-key-file={sa_private}",
        f"--root-ca-file={ca_cert}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
    ]


def _write_kubeconfig(path: Path, server: str, admin: CertFiles) -> None:
    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    name = "modelplane-e2e"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {"server": server, "certificate-authority-data": b64(admin.ca)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": b64(admin.cert),
                    "client-key-data": b64(admin.key),
                },
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": "admin"}}],
        "current-context": name,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is chosen so the kernel cannot hand one out twice.
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((_LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]


def _terminate_when_parent_dies() -> None:
    # Runs in the child between fork and exec. PR_SET_PDEATHSIG is Linux-only, like /proc use here.
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _spawn(binary: Path, args: list[str], log_file: Path, exit_with_parent: bool) -> int:
    env = dict(os.environ, NO_PROXY=_NO_PROXY, no_proxy=_NO_PROXY)
    with log_file.open("ab") as log:
        # A session of its own: the process outlives `dev-cluster up`, and Ctrl-C in the
        # developer's terminal does not reach it.
        process = subprocess.Popen(
            [str(binary), *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_terminate_when_parent_dies if exit_with_parent else None,
        )
    return process.pid


def _wait_until(
    probe: Callable[[], bool], pid: int, log_file: Path, component: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not _is_running(pid):
            raise ClusterStartError(f"{component} exited during startup:\n{_tail(log_file)}")
        with contextlib.suppress(OSError):
            if probe():
                return
        if time.monotonic() > deadline:
            raise ClusterStartError(
                f"{component} not ready after {timeout:.0f}s:\n{_tail(log_file)}"
            )
        time.sleep(0.25)


def _direct_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def _etcd_healthy(etcd_url: str) -> bool:
    with _direct_opener().open(f"{etcd_url}/health", timeout=2) as response:
        return bool(json.load(response).get("health") == "true")


def _apiserver_ready(server: str, admin: CertFiles) -> bool:
    # With the admin cert: anonymous requests get 403 until the RBAC bootstrap has run.
    context = ssl.create_default_context(cafile=str(admin.ca))
    context.load_cert_chain(str(admin.cert), str(admin.key))
    try:
        with _direct_opener(context).open(f"{server}/readyz", timeout=2) as response:
            return bool(response.read().decode().strip() == "ok")
    except urllib.error.HTTPError:
        return False


def _is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] != "Z":
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # reap the zombie if it is our own child
    return False


def _is_process_of(pid: int, binary: Path) -> bool:
    # Guards against a recycled pid: only signal a process that runs the binary we started.
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return exe.removesuffix(" (deleted)") == str(binary)


def _stop_process(pid: int, binary: Path) -> None:
    """SIGTERM to the process group, then SIGKILL if it is still there after a grace period."""
    if not _is_running(pid) or not _is_process_of(pid, binary):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        while _is_running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _is_running(pid):
            return


def _tail(log_file: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {log_file})"
