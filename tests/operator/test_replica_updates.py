"""Replica updates on the config stream (the EDS beside the CDS), on loopback sockets.

The operator's hub and stream server, and either a real sidecar client (ControlPlaneClient with
its ConfigHolder and last-known-good file) or a hand-driven WebSocket that says exactly what a
sidecar would, to pin the protocol: when a replica update is sent instead of a snapshot, what
it carries, ACK/NACK, one push in flight, ordering against snapshots, late joiners and
reconnects. Only the TokenReview API is faked.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from config_stream import eventually

from modelplane_operator.distribution.auth import Authenticator
from modelplane_operator.distribution.hub import RECENT_VERSIONS, ConfigHub, SidecarCounts
from modelplane_operator.distribution.server import StreamServer
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.controlplane import (
    REPLICAS,
    REPLICAS_FEATURE,
    STREAM_PATH,
    Backoff,
    ControlPlaneClient,
    LastKnownGood,
    replicas_message,
)
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import ConfigHolder
from modelplane_sidecar.standins import start_site

NS = "team-a"
A, B, C = "http://10.0.3.7:8000/v1", "http://10.0.3.8:8000/v1", "http://10.0.3.9:8000/v1"


async def review(token: str, audiences: list[str]) -> Mapping[str, Any]:
    account = {"tok-a": "app", "tok-b": "worker"}.get(token)
    if account is None:
        return {"authenticated": False, "error": "invalid bearer token"}
    return {
        "authenticated": True,
        "audiences": audiences,
        "user": {
            "username": f"system:serviceaccount:{NS}:{account}",
            "extra": {"authentication.kubernetes.io/pod-name": [f"{account}-pod"]},
        },
    }


def pool_config(
    llama: list[tuple[str, bool]], mistral: list[tuple[str, bool]] | None = None, model: str = "m"
) -> dict[str, Any]:
    """The wire config of a namespace with two self-hosted pools and a cloud endpoint, versioned
    by its content hash as the compiler does."""

    def replicas(rows: list[tuple[str, bool]]) -> list[dict[str, Any]]:
        return [{"url": url, "ready": ready} for url, ready in rows]

    data: dict[str, Any] = {
        "endpoints": [
            {
                "name": "llama",
                "provider": "openai-compatible",
                "baseUrl": "http://llama.gpu.svc:8000/v1",
                "model": "llama-3.1-8b",
                "engine": "vllm",
                "replicas": replicas(llama),
                "loadMetrics": {"source": "push"},
            },
            {
                "name": "mistral",
                "provider": "openai-compatible",
                "baseUrl": "http://mistral.gpu.svc:8000/v1",
                "model": "mistral-7b",
                "replicas": replicas(mistral or [(C, True)]),
            },
            {
                "name": "cloud",
                "baseUrl": "https://api.openai.com/v1",
                "model": model,
                "apiKey": {"value": "sk-from-secret"},
            },
        ],
        "models": [
            {"name": "chat", "endpoints": ["llama", "cloud"]},
            {"name": "small", "endpoints": ["mistral"]},
        ],
    }
    data["metadata"] = {"name": NS, "namespace": NS, "version": parse_config(data).content_hash()}
    return data


def version_of(config: dict[str, Any]) -> str:
    return str(config["metadata"]["version"])


class Operator:
    def __init__(self, hub: ConfigHub, server: StreamServer, url: str) -> None:
        self.hub, self.server, self.url = hub, server, url
        self.clients: list[ControlPlaneClient] = []

    def publish(self, config: dict[str, Any]) -> str:
        version = version_of(config)
        self.hub.publish(NS, version, copy.deepcopy(config))
        return version

    def sidecar(self, tmp_path: Path, name: str = "s") -> tuple[ControlPlaneClient, ConfigHolder]:
        token = tmp_path / f"{name}.token"
        token.write_text("tok-a")
        holder = ConfigHolder(SidecarMetrics())
        client = ControlPlaneClient(
            self.url,
            token,
            holder,
            state=LastKnownGood(tmp_path / f"{name}-state"),
            node=name,
            backoff=Backoff(base_seconds=0.01, cap_seconds=0.05),
        )
        self.clients.append(client)
        return client, holder

    def counts(self) -> SidecarCounts:
        return self.hub.counts(NS)


@pytest.fixture
async def operator() -> AsyncIterator[Operator]:
    hub = ConfigHub()
    server = StreamServer(hub, Authenticator(review, "modelplane"))
    port = await server.start("127.0.0.1", 0, None)
    op = Operator(hub, server, f"http://127.0.0.1:{port}")
    try:
        yield op
    finally:
        for client in op.clients:
            await client.stop()
        await server.stop()


class Wire:
    """A hand-driven sidecar connection: exactly the messages a test sends."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def hello(self, version: str | None, features: list[str] | None = None) -> None:
        message: dict[str, Any] = {"type": "hello", "node": "wire", "version": version}
        if features is not None:
            message["features"] = features
        await self.ws.send_json(message)

    async def receive(self) -> dict[str, Any]:
        data = await self.ws.receive_json(timeout=30)
        assert isinstance(data, dict)
        return data

    async def nothing_more(self) -> None:
        with pytest.raises(TimeoutError):
            await self.ws.receive_json(timeout=0.3)

    async def answer(self, message: dict[str, Any], error: str | None = None) -> None:
        if error is None:
            await self.ws.send_json({"type": "ack", "version": message["version"]})
        else:
            await self.ws.send_json({"type": "nack", "version": message["version"], "error": error})


@pytest.fixture
async def wire(operator: Operator) -> AsyncIterator[Wire]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            operator.url + STREAM_PATH, headers={"authorization": "Bearer tok-a"}
        ) as ws,
    ):
        yield Wire(ws)


# --- what the hub sends ------------------------------------------------------------------------


async def test_a_readiness_change_alone_goes_as_a_replica_update_of_the_changed_endpoint(
    operator: Operator, wire: Wire
) -> None:
    first = pool_config([(A, True), (B, True)])
    v1 = operator.publish(first)
    await wire.hello(None, [REPLICAS_FEATURE])
    snapshot = await wire.receive()
    assert (snapshot["type"], snapshot["version"]) == ("config", v1)
    await wire.answer(snapshot)
    await eventually(lambda: operator.counts().current == 1, "the ACK of the snapshot")

    v2 = operator.publish(pool_config([(A, True), (B, False)]))

    update = await wire.receive()
    assert update == replicas_message(
        v2, v1, {"llama": [{"url": A, "ready": True}, {"url": B, "ready": False}]}
    )
    assert operator.counts() == SidecarCounts(connected=1, current=0, stale=1)
    await wire.answer(update)
    await eventually(lambda: operator.counts().current == 1, "the ACK of the update")
    assert operator.hub.sessions(NS)[0].acked == v2


async def test_a_sidecar_that_does_not_speak_replica_updates_gets_snapshots(
    operator: Operator, wire: Wire
) -> None:
    v1 = operator.publish(pool_config([(A, True), (B, True)]))
    await wire.hello(v1, ["spend/v1"])
    await eventually(lambda: operator.counts().current == 1, "counted current")

    second = pool_config([(A, True), (B, False)])
    v2 = operator.publish(second)

    snapshot = await wire.receive()
    assert snapshot == {"type": "config", "version": v2, "config": second}


async def test_any_other_change_goes_as_a_snapshot_even_with_replica_changes(
    operator: Operator, wire: Wire
) -> None:
    v1 = operator.publish(pool_config([(A, True)]))
    await wire.hello(v1, [REPLICAS_FEATURE])
    await eventually(lambda: operator.counts().current == 1, "counted current")

    second = pool_config([(A, True), (B, True)], model="other-model")
    v2 = operator.publish(second)

    assert await wire.receive() == {"type": "config", "version": v2, "config": second}


async def test_a_late_sidecar_gets_the_full_state_in_one_snapshot(
    operator: Operator, wire: Wire
) -> None:
    operator.publish(pool_config([(A, True)]))
    latest = pool_config([(A, False), (B, True)], [(C, False)])
    v2 = operator.publish(latest)

    await wire.hello(None, [REPLICAS_FEATURE])

    assert await wire.receive() == {"type": "config", "version": v2, "config": latest}


async def test_a_version_the_hub_no_longer_remembers_gets_the_snapshot(
    operator: Operator, wire: Wire
) -> None:
    oldest = pool_config([(A, True)])
    operator.publish(oldest)
    for i in range(RECENT_VERSIONS):
        latest = pool_config([(A, True), (f"http://10.0.4.{i}:8000/v1", True)])
        operator.publish(latest)

    await wire.hello(version_of(oldest), [REPLICAS_FEATURE])

    message = await wire.receive()
    assert (message["type"], message["version"]) == ("config", version_of(latest))


async def test_a_reconnecting_sidecar_gets_an_update_from_the_version_it_runs(
    operator: Operator, wire: Wire
) -> None:
    first = pool_config([(A, True), (B, True)])
    v1 = operator.publish(first)
    v2 = operator.publish(pool_config([(A, True), (B, True)], [(C, False)]))

    # Its hello names the version it runs (from its last-known-good file, say).
    await wire.hello(v1, [REPLICAS_FEATURE])

    assert await wire.receive() == replicas_message(
        v2, v1, {"mistral": [{"url": C, "ready": False}]}
    )


async def test_one_push_in_flight_and_then_only_the_newest_from_the_acked_base(
    operator: Operator, wire: Wire
) -> None:
    v1 = operator.publish(pool_config([(A, True), (B, True)]))
    await wire.hello(v1, [REPLICAS_FEATURE])
    await eventually(lambda: operator.counts().current == 1, "counted current")
    v2 = operator.publish(pool_config([(A, False), (B, True)]))
    update = await wire.receive()
    assert (update["type"], update["base"], update["version"]) == (REPLICAS, v1, v2)

    # While it is unanswered: an edit (snapshot) and another readiness change...
    operator.publish(pool_config([(A, False), (B, True)], model="edited"))
    v4 = operator.publish(pool_config([(A, True), (B, True)], model="edited"))
    await wire.nothing_more()
    # ...an answer for a version it was not sent changes nothing...
    await wire.answer({"version": v4})
    await wire.nothing_more()
    await wire.answer(update)

    # ...and then the newest version, as a snapshot: it changed more than replicas since v2.
    latest = await wire.receive()
    assert (latest["type"], latest["version"]) == ("config", v4)
    await wire.answer(latest)
    v5 = operator.publish(pool_config([(A, True), (B, False)], model="edited"))
    follow_up = await wire.receive()
    assert (follow_up["type"], follow_up["base"], follow_up["version"]) == (REPLICAS, v4, v5)


async def test_a_nacked_replica_update_is_followed_by_the_snapshot_of_that_version(
    operator: Operator, wire: Wire
) -> None:
    v1 = operator.publish(pool_config([(A, True)]))
    await wire.hello(v1, [REPLICAS_FEATURE])
    await eventually(lambda: operator.counts().current == 1, "counted current")
    second = pool_config([(A, True), (B, True)])
    v2 = operator.publish(second)
    update = await wire.receive()
    assert update["type"] == REPLICAS

    await wire.answer(update, "replica update applies to config x, but this sidecar runs y")

    assert await wire.receive() == {"type": "config", "version": v2, "config": second}
    assert operator.counts() == SidecarCounts(connected=1, current=0, stale=1)  # not rejected
    await wire.answer({"version": v2})
    await eventually(lambda: operator.counts().current == 1, "the ACK of the snapshot")
    # This sidecar and the hub disagreed once: from now on it gets snapshots only.
    third = pool_config([(A, False), (B, True)])
    assert (await _next_after(operator, wire, third))["type"] == "config"


async def test_a_nacked_snapshot_after_a_nacked_update_rejects_the_version(
    operator: Operator, wire: Wire
) -> None:
    v1 = operator.publish(pool_config([(A, True)]))
    await wire.hello(v1, [REPLICAS_FEATURE])
    await eventually(lambda: operator.counts().current == 1, "counted current")
    v2 = operator.publish(pool_config([(A, True), (B, True)]))
    await wire.answer(await wire.receive(), "bad replica")

    snapshot = await wire.receive()
    await wire.answer(snapshot, "bad replica")

    await eventually(lambda: operator.counts().rejected == 1, "the rejection")
    assert operator.counts().rejection == "bad replica"
    assert snapshot["version"] == v2
    await wire.nothing_more()  # a rejected version is not sent again


async def _next_after(operator: Operator, wire: Wire, config: dict[str, Any]) -> dict[str, Any]:
    operator.publish(config)
    return await wire.receive()


# --- what the sidecar does with it ------------------------------------------------------------


async def test_the_sidecar_applies_an_update_without_rebuilding_the_other_endpoints(
    operator: Operator, tmp_path: Path
) -> None:
    v1 = operator.publish(pool_config([(A, True), (B, True)]))
    client, holder = operator.sidecar(tmp_path)
    client.start()
    await eventually(lambda: operator.counts().current == 1, "the first ACK")
    before = holder.snapshot
    assert before is not None and before.version == v1
    llama = before.endpoints["llama"].pool
    assert llama is not None
    llama.by_url[A].outstanding = 3  # this sidecar's own load on a replica that stays

    latest = pool_config([(A, True), (B, False), (C, True)])
    v2 = operator.publish(latest)
    await eventually(lambda: operator.counts().current == 1, "the ACK of the update")

    after = holder.snapshot
    assert after is not None and after.version == v2
    # Exactly the config a full snapshot of v2 would have made...
    assert after.config == parse_config(latest)
    # ...but only llama was touched: its health state, adapter and replica state carried over.
    for name in ("mistral", "cloud"):
        assert after.endpoints[name] is before.endpoints[name]
    assert after.endpoints["llama"].state is before.endpoints["llama"].state
    assert after.endpoints["llama"].adapter is before.endpoints["llama"].adapter
    pool = after.endpoints["llama"].pool
    assert pool is not None
    assert [(r.url, r.ready) for r in pool.replicas] == [(A, True), (B, False), (C, True)]
    assert pool.by_url[A].outstanding == 3
    assert [r.url for r in pool.ready()] == [A, C]
    assert holder.source == f"control-plane-replicas:{v2}"
    # The last-known-good file holds v2, and restores to the same config.
    saved = json.loads((tmp_path / "s-state" / "config.json").read_text())
    assert saved["version"] == v2
    stored = LastKnownGood(tmp_path / "s-state").load()
    assert stored is not None and stored[0] == parse_config(latest)


async def test_a_sidecar_restarted_from_last_known_good_takes_an_update_from_it(
    operator: Operator, tmp_path: Path
) -> None:
    v1 = operator.publish(pool_config([(A, True), (B, True)]))
    client, _ = operator.sidecar(tmp_path)
    client.start()
    await eventually(lambda: operator.counts().current == 1, "the first ACK")
    await client.stop()
    await eventually(lambda: operator.counts().connected == 0, "the disconnect")
    latest = pool_config([(A, False), (B, True)])
    v2 = operator.publish(latest)

    restarted, holder = operator.sidecar(tmp_path)
    assert restarted.restore()
    assert holder.snapshot is not None and holder.snapshot.version == v1
    restarted.start()

    await eventually(lambda: operator.counts().current == 1, "the ACK of the update")
    assert holder.source == f"control-plane-replicas:{v2}"
    assert holder.snapshot is not None and holder.snapshot.config == parse_config(latest)


async def test_a_bad_replica_is_nacked_and_the_old_config_serves(
    operator: Operator, tmp_path: Path
) -> None:
    good = pool_config([(A, True)])
    v1 = operator.publish(good)
    client, holder = operator.sidecar(tmp_path)
    client.start()
    await eventually(lambda: operator.counts().current == 1, "the first ACK")
    bad = copy.deepcopy(good)
    bad["endpoints"][0]["replicas"].append({"url": "ftp://10.0.3.8/v1", "ready": True})
    bad["metadata"]["version"] = "bad-version"

    operator.hub.publish(NS, "bad-version", bad)

    # The update is NACKed, then the snapshot of the same version too: rejected.
    await eventually(lambda: operator.counts().rejected == 1, "the NACKs")
    rejection = operator.counts().rejection
    assert rejection is not None and "replica url must start with http:// or https://" in rejection
    assert holder.snapshot is not None and holder.snapshot.version == v1
    saved = json.loads((tmp_path / "s-state" / "config.json").read_text())
    assert saved["version"] == v1


# --- the sidecar's NACKs, message by message -----------------------------------------------------


class ScriptedOperator:
    """A stream endpoint that sends what a test gives it and records the sidecar's answers."""

    def __init__(self) -> None:
        self.hellos: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []
        self.ws: web.WebSocketResponse | None = None

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        async for msg in ws:
            data = json.loads(msg.data)
            (self.hellos if data["type"] == "hello" else self.answers).append(data)
        return ws

    async def send(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one message and wait (bounded) for the sidecar's answer to it."""
        assert self.ws is not None
        count = len(self.answers)
        await self.ws.send_json(message)
        await eventually(lambda: len(self.answers) > count, "the answer")
        return self.answers[count]


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[ScriptedOperator, ConfigHolder]]:
    script = ScriptedOperator()
    app = web.Application()
    app.router.add_get(STREAM_PATH, script.handle)
    runner, port = await start_site(app)
    token = tmp_path / "token"
    token.write_text("tok-a")
    holder = ConfigHolder(SidecarMetrics())
    client = ControlPlaneClient(
        f"http://127.0.0.1:{port}", token, holder, state=LastKnownGood(tmp_path / "state")
    )
    client.start()
    try:
        await eventually(lambda: script.hellos, "the hello")
        yield script, holder
    finally:
        await client.stop()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {"base": "not-v1"},
            "replica update applies to config not-v1, but this sidecar runs ",
        ),
        (
            {"endpoints": {"gemma": [{"url": A}]}},
            "replica update names endpoint 'gemma', which the config lacks",
        ),
        (
            {"endpoints": {"cloud": [{"url": A}]}},
            "replica update for endpoint 'cloud', which has no replica list",
        ),
        (
            {"endpoints": {"llama": {"url": A}}},
            "replica update for endpoint 'llama': replicas must be a list",
        ),
        (
            {"endpoints": {"llama": [{"url": A, "weight": 2}]}},
            "replica update for endpoint 'llama': replicas.0.weight: Extra inputs are not "
            "permitted",
        ),
        ({"endpoints": {}}, "malformed replica update: needs a base version and endpoints"),
    ],
)
async def test_the_sidecar_nacks_an_update_it_cannot_apply_exactly(
    scripted: tuple[ScriptedOperator, ConfigHolder], change: dict[str, Any], error: str
) -> None:
    script, holder = scripted
    assert script.hellos[0]["features"] == [REPLICAS_FEATURE]
    first = pool_config([(A, True)])
    v1 = version_of(first)
    assert await script.send({"type": "config", "version": v1, "config": first}) == {
        "type": "ack",
        "version": v1,
    }
    update = replicas_message("v2", v1, {"llama": [{"url": B}]})
    update.update(change)

    answer = await script.send(update)

    assert answer["type"] == "nack" and answer["version"] == "v2"
    assert error in answer["error"]
    assert holder.snapshot is not None and holder.snapshot.version == v1
    # The stream goes on: a good update from the right base applies.
    good = await script.send(replicas_message("v3", v1, {"llama": [{"url": B}]}))
    assert good == {"type": "ack", "version": "v3"}
    assert holder.snapshot is not None and holder.snapshot.version == "v3"
    llama = holder.snapshot.endpoints["llama"].pool
    assert llama is not None and [r.url for r in llama.replicas] == [B]


async def test_an_update_before_any_config_is_nacked(
    scripted: tuple[ScriptedOperator, ConfigHolder],
) -> None:
    script, holder = scripted

    answer = await script.send(replicas_message("v2", "v1", {"llama": [{"url": B}]}))

    assert answer == {
        "type": "nack",
        "version": "v2",
        "error": "replica update applies to config v1, but this sidecar runs none",
    }
    assert holder.snapshot is None
