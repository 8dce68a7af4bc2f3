"""Test harness: stand-in upstreams and a real sidecar on loopback ports.

Servers run on an event loop in a background thread so that both the synchronous and the async
`openai` SDK clients can talk to them over real sockets, exactly as an app would.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web

from modelplane_sidecar.audit import AuditChain, AuditLog, generate_key
from modelplane_sidecar.auditing import AuditTrail, Identity
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import HOLDER_KEY, SIDECAR_KEY, ConfigHolder, Sidecar, create_app
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.openai import OpenAIStandIn

T = TypeVar("T")


class ServerThread:
    """An asyncio loop in a daemon thread hosting any number of aiohttp apps."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def serve(self, app: web.Application) -> int:
        runner, port = self.run(start_site(app))
        self._runners.append(runner)
        return port

    def close(self) -> None:
        for runner in reversed(self._runners):
            self.run(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class Router:
    """A running sidecar plus handles on its config holder and metrics."""

    def __init__(self, servers: ServerThread, app: web.Application, port: int) -> None:
        self.servers = servers
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def holder(self) -> ConfigHolder:
        return self.app[HOLDER_KEY]

    @property
    def sidecar(self) -> Sidecar:
        return self.app[SIDECAR_KEY]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for family in self.sidecar.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    total += sample.value
        return total


class KeptBytes(io.BytesIO):
    """An audit sink whose bytes stay readable after AuditLog.close() closes it."""

    def close(self) -> None:
        pass


class AuditedRouter(Router):
    """A running sidecar whose audit trail (namespace team-a, pod p, ServiceAccount sa) is
    written to `sink`, in memory."""

    def __init__(self, servers: ServerThread, config: dict[str, Any]) -> None:
        self.sink = KeptBytes()
        self.metrics = SidecarMetrics()
        chain = AuditChain(generate_key(), checkpoint_every=1000)
        log = AuditLog(chain, self.sink, {"pod": "p"}, flush_interval=0.01)
        trail = AuditTrail(log, Identity("team-a", "p", "sa"), self.metrics)
        app = create_app(parse_config(config, "test config"), self.metrics, trail)
        super().__init__(servers, app, servers.serve(app))

    def records(self) -> list[dict[str, Any]]:
        """The request records written so far."""
        return request_records(self.sink.getvalue())

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        """The request records once there are `count` (bounded wait: 30 s)."""
        return wait_for_records(self.sink.getvalue, count)


class Upstreams:
    """Factory for stand-ins and routers, all torn down at the end of the test."""

    def __init__(self, servers: ServerThread) -> None:
        self.servers = servers

    def openai(self, name: str, **kwargs: Any) -> tuple[OpenAIStandIn, str]:
        standin = OpenAIStandIn(name=name, **kwargs)
        port = self.servers.serve(standin.app())
        return standin, f"http://127.0.0.1:{port}/v1"

    def router(self, config: dict[str, Any]) -> Router:
        app = create_app(parse_config(config, "test config"))
        port = self.servers.serve(app)
        return Router(self.servers, app, port)


def endpoint(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": "openai", "baseUrl": url, "model": f"{name}-model", **extra}


def chain_config(
    endpoints: list[dict[str, Any]], alias: str = "chat", **alias_settings: Any
) -> dict[str, Any]:
    """A config with one alias whose fallback chain is `endpoints` in order."""
    settings: dict[str, Any] = {
        "retry": {"maxAttempts": 2, "backoffBaseSeconds": 0.01, "backoffMaxSeconds": 0.05},
        "circuitBreaker": {"failureThreshold": 50, "openSeconds": 30},
    }
    settings.update(alias_settings)
    return {
        "apiVersion": "modelplane.io/v1alpha1",
        "kind": "RouterConfig",
        "endpoints": endpoints,
        "models": [{"name": alias, "endpoints": [e["name"] for e in endpoints], **settings}],
    }


class HttpReply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode()

    def json(self) -> Any:
        return json.loads(self.content)


def http(method: str, url: str, body: bytes | None = None, **headers: str) -> HttpReply:
    """A plain HTTP call for what the SDKs won't send (malformed bodies, raw probes)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return HttpReply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        return HttpReply(err.code, dict(err.headers), err.read())


def complete_jsonl(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects of `data`'s complete lines: a file another thread is still writing may
    end in half a line, which is left for the next read."""
    return [orjson.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def request_records(data: bytes) -> list[dict[str, Any]]:
    """The audit request records among `data`'s complete lines."""
    return [r for r in complete_jsonl(data) if r["type"] == "request"]


def wait_for_records(read: Callable[[], bytes], count: int) -> list[dict[str, Any]]:
    """The audit request records in what `read()` returns, once there are `count` of them (a
    bounded wait, 30 s at most, for the sidecar's batched writes)."""
    deadline = time.monotonic() + 30.0
    while len(records := request_records(read())) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(records)} audit records written, expected {count}")
        time.sleep(0.01)
    return records


def audit_requests(path: Path, count: int) -> list[dict[str, Any]]:
    """The request records of the audit file at `path` once there are `count` of them."""
    return wait_for_records(path.read_bytes, count)
