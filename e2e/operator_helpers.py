"""Helpers for the operator e2e tests: real `modelplane operator` / `modelplane serve` processes,
ServiceAccount tokens from the TokenRequest API, a stand-in provider, and bounded waits.

Every process is started by these helpers and stopped by its own pid.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import openai
from cluster import CertFiles, Cluster
from harness import ServerThread
from loopback_ports import free_port

from modelplane_sidecar.standins.openai import OpenAIStandIn

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
EXAMPLES = REPO / "examples" / "operator"
MODELPLANE = str(Path(sys.executable).with_name("modelplane"))
AUDIENCE = "modelplane"
GROUP = "modelplane.io"
API = f"{GROUP}/v1alpha1"

T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll `check` every 0.1 s until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def install_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(CRDS))
    for path in sorted(CRDS.glob("*.yaml")):
        name = path.name.split("_", 1)[1].removesuffix(".yaml") + "." + GROUP
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")


def apply(cluster: Cluster, namespace: str, *objects: dict[str, Any]) -> None:
    """`kubectl apply` of `objects`, as one List, in `namespace`."""
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )


def secret(name: str, key: str) -> dict[str, Any]:
    """A Secret holding a provider API key under `api-key`."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"api-key": key},
    }


def endpoint(name: str, base_url: str, secret_name: str, **spec: Any) -> dict[str, Any]:
    """An OpenAI ModelEndpoint (gpt-4o-mini at `base_url`); `spec` adds fields to its spec."""
    return {
        "apiVersion": API,
        "kind": "ModelEndpoint",
        "metadata": {"name": name},
        "spec": {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "baseURL": base_url,
            "credentials": {"secretRef": {"name": secret_name, "key": "api-key"}},
            **spec,
        },
    }


def policy(name: str, alias: str, *endpoints: str) -> dict[str, Any]:
    """A RoutingPolicy with one model `alias` over `endpoints`, in that order."""
    return {
        "apiVersion": API,
        "kind": "RoutingPolicy",
        "metadata": {"name": name},
        "spec": {"models": [{"name": alias, "targets": [{"endpoint": e} for e in endpoints]}]},
    }


def service_account_token(
    cluster: Cluster, namespace: str, account: str, audience: str = AUDIENCE
) -> str:
    """A TokenRequest token for a (created if missing) ServiceAccount."""
    cluster.kubectl("create", "serviceaccount", account, "-n", namespace, check=False)
    result = cluster.kubectl(
        "create", "token", account, "-n", namespace, f"--audience={audience}", "--duration=1h"
    )
    return result.stdout.strip()


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.kubectl_json("get", kind, name, "-n", namespace)
    return obj


class Process:
    """A child process with its output in a log file; stopped by pid."""

    def __init__(self, args: Sequence[str], log_file: Path, env: dict[str, str]) -> None:
        self.args = list(args)
        self.log_file = log_file
        self._log = log_file.open("ab")
        self.popen = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.alive():
            os.kill(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._log.close()


def _tls_get(url: str, ca: Path, token: str | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Operator:
    def __init__(
        self,
        cluster: Cluster,
        cert: CertFiles,
        namespaces: Sequence[str],
        log_dir: Path,
        port: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.cert = cert
        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        args = [
            MODELPLANE,
            "operator",
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--tls-cert-file={cert.cert}",
            f"--tls-key-file={cert.key}",
            "--debounce=0.1",
            # Secrets are re-read, not watched: keep a created or rotated one's delay short.
            "--secret-resync-seconds=1",
        ]
        args += [f"--namespace={ns}" for ns in namespaces]
        self.process = Process(args, log_dir / f"operator-{self.port}.log", cluster.env())
        wait_for(self._healthy, "the operator's stream server")

    def _healthy(self) -> bool:
        if not self.process.alive():
            raise AssertionError(f"operator exited:\n{self.process.log()}")
        try:
            return _tls_get(self.url + "/healthz", self.cert.ca)[0] == 200
        except OSError:
            return False

    def stream_status(self, token: str) -> tuple[int, dict[str, Any]]:
        """What the stream endpoint answers a plain GET with this token (401 for bad ones)."""
        status, body = _tls_get(self.url + "/v1/config/stream", self.cert.ca, token)
        return status, json.loads(body) if body.startswith(b"{") else {}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.process.stop(sig)


class Sidecar:
    def __init__(
        self,
        cluster: Cluster,
        operator_url: str,
        token: str,
        ca: Path,
        workdir: Path,
        name: str,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.token_file = workdir / f"{name}.token"
        self.token_file.write_text(token)
        self.state_dir = workdir / f"{name}-state"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._args = [
            MODELPLANE,
            "serve",
            f"--control-plane={operator_url}",
            f"--token-file={self.token_file}",
            f"--ca-file={ca}",
            f"--state-dir={self.state_dir}",
            "--host=127.0.0.1",
            f"--port={self.port}",
        ]
        self._env = cluster.env({"MODELPLANE_POD_NAME": name})
        self._log = workdir / f"{name}.log"
        self.process = self._start()

    @classmethod
    def for_account(
        cls, operator: Operator, namespace: str, workdir: Path, name: str, account: str = "app"
    ) -> Sidecar:
        """A sidecar of `operator` with a TokenRequest token of ServiceAccount `account`."""
        token = service_account_token(operator.cluster, namespace, account)
        return cls(operator.cluster, operator.url, token, operator.cert.ca, workdir, name)

    def _start(self) -> Process:
        process = Process(self._args, self._log, self._env)
        wait_for(lambda: self._get("/healthz")[0] == 200 or None, "the sidecar to listen")
        return process

    def restart(self) -> None:
        self.process.stop()
        self.process = self._start()

    def _get(self, path: str) -> tuple[int, dict[str, Any]]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.base_url + path, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    def client(self) -> openai.OpenAI:
        """The official openai SDK as an app of this sidecar (no SDK retries)."""
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0)

    def version(self) -> str | None:
        status, body = self._get("/readyz")
        return body.get("configVersion") if status == 200 else None

    def models(self) -> list[str]:
        status, body = self._get("/v1/models")
        return [m["id"] for m in body.get("data", [])] if status == 200 else []

    def stop(self) -> None:
        self.process.stop()


class StandIns(ServerThread):
    """OpenAI stand-ins served from an event loop in a background thread (the unit tests'
    server thread)."""

    def start(self, standin: OpenAIStandIn) -> str:
        return f"http://127.0.0.1:{self.serve(standin.app())}/v1"


@contextmanager
def standins() -> Iterator[StandIns]:
    servers = StandIns()
    try:
        yield servers
    finally:
        servers.close()
