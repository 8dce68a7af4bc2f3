"""A real sidecar on an operator's config stream, for tests of the stream and the budget books.

The sidecar is the aiohttp app with its control-plane client and spend tracker on a loopback
port, and the official openai SDK is its app. Only the TokenReview API is faked: `review`
accepts the token `tok-a` as ServiceAccount `app` of pod `app-pod` in `NAMESPACE`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from aiohttp import web

from modelplane_operator.compile import NamespaceInputs, Resource, compile_namespace, wire_config
from modelplane_sidecar.controlplane import Backoff, ControlPlaneClient
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import HOLDER_KEY, ConfigHolder, create_app
from modelplane_sidecar.spend import SpendTracker
from modelplane_sidecar.standins import start_site

NAMESPACE = "team-a"


async def review(token: str, audiences: list[str]) -> Mapping[str, Any]:
    return {
        "authenticated": token == "tok-a",
        "audiences": audiences,
        "user": {
            "username": f"system:serviceaccount:{NAMESPACE}:app",
            "extra": {"authentication.kubernetes.io/pod-name": ["app-pod"]},
        },
    }


async def eventually(check: Callable[[], object], what: str, polls: int = 1500) -> None:
    """Wait (bounded: `polls` x 20 ms, 30 s by default: a loaded machine is slow) until `check`
    holds."""
    for _ in range(polls):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def budgeted_config(upstream: str, budget: dict[str, Any]) -> dict[str, Any]:
    """The wire config of NAMESPACE: model `chat` on endpoint `gpt` (OpenAI gpt-4o at
    `upstream`, priced from the built-in table: 2.50 / 10.00 per 1M tokens) under `budget`."""
    compiled = compile_namespace(
        NamespaceInputs(
            NAMESPACE,
            endpoints=[
                Resource("gpt", {"provider": "openai", "model": "gpt-4o", "baseURL": upstream})
            ],
            policies=[
                Resource("p", {"models": [{"name": "chat", "targets": [{"endpoint": "gpt"}]}]})
            ],
            budgets=[Resource.from_body(budget)],
        )
    )
    assert compiled.config is not None
    return wire_config(compiled.config)


@dataclass
class StreamedSidecar:
    metrics: SidecarMetrics
    tracker: SpendTracker
    app: web.Application
    #: The official openai SDK, talking to this sidecar.
    client: openai.AsyncOpenAI

    @property
    def holder(self) -> ConfigHolder:
        return self.app[HOLDER_KEY]


@asynccontextmanager
async def streamed_sidecar(stream_url: str, workdir: Path) -> AsyncIterator[StreamedSidecar]:
    """A sidecar of pod `app-pod` connected to the stream server at `stream_url`."""
    metrics = SidecarMetrics()
    tracker = SpendTracker("app-pod", on_settle=metrics.budget_settled)
    app = create_app(None, metrics, None, tracker)
    token = workdir / "token"
    token.write_text("tok-a")
    control = ControlPlaneClient(
        stream_url,
        token,
        app[HOLDER_KEY],
        node="app-pod",
        backoff=Backoff(0.01, 0.05),
        metrics=metrics,
        spend=tracker,
    )
    runner, port = await start_site(app)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
    )
    control.start()
    try:
        yield StreamedSidecar(metrics, tracker, app, client)
    finally:
        await client.close()
        await control.stop()
        await runner.cleanup()
