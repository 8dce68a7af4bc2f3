"""Operator and sidecar metrics of the config stream, scraped after real pushes over sockets.

The operator's stream server and hub run with the real sidecar client on loopback; the one fake is
the TokenReview API (a table of tokens, as in tests/operator/test_distribution.py). A good config
is ACKed, a bad one NACKed, a bad token refused; then the operator's /metrics and the sidecar's
sync state must say so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from config_stream import eventually
from prometheus_client.parser import text_string_to_metric_families

from modelplane_operator.distribution.auth import Authenticator
from modelplane_operator.distribution.hub import ConfigHub
from modelplane_operator.distribution.server import StreamServer
from modelplane_operator.metrics import OperatorMetrics
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.controlplane import STREAM_PATH, Backoff, ControlPlaneClient
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import ConfigHolder

AUDIENCE = "modelplane"


async def fake_review(token: str, audiences: list[str]) -> Mapping[str, Any]:
    if token != "tok-a":
        return {"authenticated": False, "error": "invalid bearer token"}
    return {
        "authenticated": True,
        "audiences": [AUDIENCE],
        "user": {
            "username": "system:serviceaccount:team-a:app",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:team-a"],
            "extra": {"authentication.kubernetes.io/pod-name": ["app-pod"]},
        },
    }


def router_config(alias: str = "chat", endpoints: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "endpoints": [{"name": "openai", "baseUrl": "https://api.openai.com/v1", "model": "m"}],
        "models": [{"name": alias, "endpoints": endpoints or ["openai"]}],
    }
    version = parse_config(data).content_hash() if endpoints is None else "broken"
    data["metadata"] = {"name": "team-a", "version": version}
    return data


def value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


class Stack:
    def __init__(
        self, hub: ConfigHub, server: StreamServer, url: str, http: aiohttp.ClientSession
    ) -> None:
        self.hub = hub
        self.server = server
        self.url = url
        self.http = http

    async def scrape(self) -> str:
        async with self.http.get(self.url + "/metrics") as response:
            assert response.status == 200
            return await response.text()


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    metrics = OperatorMetrics()
    hub = ConfigHub(metrics=metrics)
    server = StreamServer(hub, Authenticator(fake_review, AUDIENCE), metrics)
    port = await server.start("127.0.0.1", 0, None)
    async with aiohttp.ClientSession() as http:
        try:
            yield Stack(hub, server, f"http://127.0.0.1:{port}", http)
        finally:
            await server.stop()


async def test_acks_nacks_push_latency_and_sync_state(stack: Stack, tmp_path: Path) -> None:
    good = router_config()
    stack.hub.publish("team-a", good["metadata"]["version"], good)
    token = tmp_path / "token"
    token.write_text("tok-a")
    sidecar_metrics = SidecarMetrics()
    holder = ConfigHolder(sidecar_metrics)
    client = ControlPlaneClient(
        stack.url,
        token,
        holder,
        node="app-pod",
        backoff=Backoff(base_seconds=0.01, cap_seconds=0.05),
        metrics=sidecar_metrics,
    )
    client.start()
    try:
        await eventually(lambda: stack.hub.counts("team-a").current == 1, "the ACK")
        text = await stack.scrape()
        assert value(text, "modelplane_operator_connected_sidecars", namespace="team-a") == 1
        assert value(text, "modelplane_operator_sidecars", namespace="team-a", state="current") == 1
        version = good["metadata"]["version"]
        assert value(text, "modelplane_operator_config_info", namespace="team-a", version=version)
        answers = "modelplane_operator_config_answers_total"
        assert value(text, answers, namespace="team-a", answer="ack") == 1
        pushes = "modelplane_operator_config_push_duration_seconds_count"
        assert value(text, pushes, answer="ack") == 1
        assert value(text, "modelplane_operator_stream_connections_total", result="accepted") == 1
        registry = sidecar_metrics.registry
        assert registry.get_sample_value("modelplane_config_sync_state", {"state": "synced"}) == 1

        bad = router_config(endpoints=["missing"])
        stack.hub.publish("team-a", "broken", bad)
        await eventually(lambda: stack.hub.counts("team-a").rejected == 1, "the NACK")
        text = await stack.scrape()
        assert value(text, answers, namespace="team-a", answer="nack") == 1
        assert value(text, pushes, answer="nack") == 1
        assert (
            value(text, "modelplane_operator_sidecars", namespace="team-a", state="rejected") == 1
        )
        await eventually(
            lambda: (
                registry.get_sample_value("modelplane_config_sync_state", {"state": "rejected"})
                == 1
            ),
            "the sidecar's rejected state",
        )
        # The old config keeps serving, and says so.
        assert holder.snapshot is not None and holder.snapshot.version == version
        info = {"version": version, "source": f"control-plane:{version}"}
        assert registry.get_sample_value("modelplane_config_info", info) == 1

        await stack.server.stop()
        await eventually(
            lambda: (
                registry.get_sample_value("modelplane_config_sync_state", {"state": "connecting"})
                == 1
            ),
            "the sidecar's connecting state once the operator is gone",
        )
    finally:
        await client.stop()


async def test_refused_tokens_are_counted(stack: Stack) -> None:
    headers = {"authorization": "Bearer not-a-token"}
    async with stack.http.get(stack.url + STREAM_PATH, headers=headers) as response:
        assert response.status == 401
    async with stack.http.get(stack.url + STREAM_PATH) as response:
        assert response.status == 401
    text = await stack.scrape()
    assert (
        value(text, "modelplane_operator_stream_connections_total", result="unauthenticated") == 2
    )
    assert value(text, "modelplane_operator_connected_sidecars") == 0
