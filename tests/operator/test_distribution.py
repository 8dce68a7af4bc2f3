"""The config stream end to end on loopback: operator hub + server, sidecar client, real sockets.

The TokenReview API is the one boundary faked here (a table of tokens -> review statuses shaped
like the apiserver's); e2e/test_operator.py runs the same paths against a real apiserver.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from config_stream import eventually
from hypothesis import given
from hypothesis import strategies as st

from modelplane_operator.controller import applied_condition
from modelplane_operator.distribution.auth import Authenticator, AuthError, identity_from_review
from modelplane_operator.distribution.hub import ConfigHub, SidecarCounts
from modelplane_operator.distribution.server import StreamServer
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.controlplane import (
    STREAM_PATH,
    Backoff,
    ControlPlaneClient,
    LastKnownGood,
)
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import ConfigHolder

AUDIENCE = "modelplane"
TOKENS = {"tok-a": ("team-a", "app"), "tok-a2": ("team-a", "worker"), "tok-b": ("team-b", "app")}


def review_status(namespace: str, account: str) -> dict[str, Any]:
    return {
        "authenticated": True,
        "audiences": [AUDIENCE],
        "user": {
            "username": f"system:serviceaccount:{namespace}:{account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
            "extra": {"authentication.kubernetes.io/pod-name": [f"{account}-pod"]},
        },
    }


async def fake_review(token: str, audiences: list[str]) -> Mapping[str, Any]:
    if token not in TOKENS:
        return {"authenticated": False, "error": "invalid bearer token"}
    return review_status(*TOKENS[token])


def router_config(model: str = "gpt-4o-mini", alias: str = "chat") -> dict[str, Any]:
    data: dict[str, Any] = {
        "endpoints": [
            {
                "name": "openai",
                "baseUrl": "https://api.openai.com/v1",
                "model": model,
                "apiKey": {"value": "sk-from-secret"},
            }
        ],
        "models": [{"name": alias, "endpoints": ["openai"]}],
    }
    data["metadata"] = {"name": "ns", "version": parse_config(data).content_hash()}
    return data


def version_of(config: dict[str, Any]) -> str:
    return str(config["metadata"]["version"])


class Stack:
    def __init__(self, hub: ConfigHub, server: StreamServer, url: str) -> None:
        self.hub = hub
        self.server = server
        self.url = url
        self.clients: list[ControlPlaneClient] = []

    def client(
        self, tmp_path: Path, token: str, state: bool = True, name: str = "c"
    ) -> tuple[ControlPlaneClient, ConfigHolder]:
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(token + "\n")
        holder = ConfigHolder(SidecarMetrics())
        client = ControlPlaneClient(
            self.url,
            token_file,
            holder,
            state=LastKnownGood(tmp_path / f"{name}-state") if state else None,
            node=name,
            backoff=Backoff(base_seconds=0.01, cap_seconds=0.05),
        )
        self.clients.append(client)
        return client, holder


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    hub = ConfigHub()
    server = StreamServer(hub, Authenticator(fake_review, AUDIENCE))
    port = await server.start("127.0.0.1", 0, None)
    s = Stack(hub, server, f"http://127.0.0.1:{port}")
    try:
        yield s
    finally:
        for client in s.clients:
            await client.stop()
        await server.stop()


async def test_a_sidecar_gets_its_namespace_config_acks_and_keeps_it(
    stack: Stack, tmp_path: Path
) -> None:
    config = router_config()
    stack.hub.publish("team-a", version_of(config), config)
    client, holder = stack.client(tmp_path, "tok-a")
    client.start()

    await eventually(lambda: stack.hub.counts("team-a").current == 1, "the ACK")

    assert holder.snapshot is not None
    assert holder.snapshot.version == version_of(config)
    api_key = holder.snapshot.config.endpoint("openai").api_key
    assert api_key is not None and api_key.resolve() == "sk-from-secret"
    assert stack.hub.counts("team-a") == SidecarCounts(connected=1, current=1)
    saved = json.loads((tmp_path / "c-state" / "config.json").read_text())
    assert saved["version"] == version_of(config)
    assert (tmp_path / "c-state" / "config.json").stat().st_mode & 0o777 == 0o600
    (session,) = stack.hub.sessions("team-a")
    assert session.identity.service_account == "app"
    assert session.node == "app-pod"  # from the TokenReview, not from what the sidecar says


async def test_a_sidecar_never_sees_another_namespace(stack: Stack, tmp_path: Path) -> None:
    a, b = router_config(alias="a-only"), router_config(alias="b-only")
    client_b, holder_b = stack.client(tmp_path, "tok-b", name="b")
    client_b.start()
    await eventually(lambda: stack.hub.counts("team-b").connected == 1, "b connected")

    stack.hub.publish("team-a", version_of(a), a)
    client_a, holder_a = stack.client(tmp_path, "tok-a", name="a")
    client_a.start()
    await eventually(lambda: holder_a.snapshot is not None, "a's config")
    stack.hub.publish("team-b", version_of(b), b)
    await eventually(lambda: holder_b.snapshot is not None, "b's config")

    assert holder_b.snapshot is not None and list(holder_b.snapshot.aliases) == ["b-only"]
    assert holder_a.snapshot is not None and list(holder_a.snapshot.aliases) == ["a-only"]


async def test_an_edit_reaches_every_sidecar_of_the_namespace(stack: Stack, tmp_path: Path) -> None:
    first, second = router_config(), router_config(model="gpt-4o")
    stack.hub.publish("team-a", version_of(first), first)
    holders = []
    for i, token in enumerate(["tok-a", "tok-a2"]):
        client, holder = stack.client(tmp_path, token, name=f"s{i}")
        client.start()
        holders.append(holder)
    await eventually(lambda: stack.hub.counts("team-a").current == 2, "both on v1")

    stack.hub.publish("team-a", version_of(second), second)

    await eventually(lambda: stack.hub.counts("team-a").current == 2, "both on v2")
    for holder in holders:
        assert holder.snapshot is not None
        assert holder.snapshot.config.endpoint("openai").model == "gpt-4o"


async def test_a_config_the_sidecar_cannot_apply_is_nacked_and_the_old_one_serves(
    stack: Stack, tmp_path: Path
) -> None:
    good = router_config()
    stack.hub.publish("team-a", version_of(good), good)
    client, holder = stack.client(tmp_path, "tok-a")
    client.start()
    await eventually(lambda: stack.hub.counts("team-a").current == 1, "the ACK")
    bad = router_config()
    bad["models"][0]["endpoints"] = ["missing"]
    bad["metadata"]["version"] = "bad-version"

    stack.hub.publish("team-a", "bad-version", bad)

    await eventually(lambda: stack.hub.counts("team-a").rejected == 1, "the NACK")
    counts = stack.hub.counts("team-a")
    assert counts.rejection is not None
    assert "refers to unknown endpoint(s): missing" in counts.rejection
    assert holder.snapshot is not None and holder.snapshot.version == version_of(good)
    saved = json.loads((tmp_path / "c-state" / "config.json").read_text())
    assert saved["version"] == version_of(good)


async def test_the_operator_waits_for_an_answer_before_the_next_push(stack: Stack) -> None:
    configs = [router_config(model=f"m{i}") for i in range(3)]
    stack.hub.publish("team-a", version_of(configs[0]), configs[0])
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(stack.url + STREAM_PATH, headers={"authorization": "Bearer tok-a"}) as ws,
    ):
        await ws.send_json({"type": "hello", "node": "manual", "version": None})
        first = await ws.receive_json(timeout=30)
        assert first["version"] == version_of(configs[0])

        for config in configs[1:]:
            stack.hub.publish("team-a", version_of(config), config)
        # Nothing more arrives while the first push is unanswered...
        with pytest.raises(TimeoutError):
            await ws.receive_json(timeout=0.3)
        await ws.send_json({"type": "ack", "version": first["version"]})
        # ...and then only the newest version, never the one in between.
        latest = await ws.receive_json(timeout=30)
        assert latest["version"] == version_of(configs[2])


async def test_a_sidecar_already_running_the_current_version_gets_no_push(
    stack: Stack,
) -> None:
    config = router_config()
    stack.hub.publish("team-a", version_of(config), config)
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(stack.url + STREAM_PATH, headers={"authorization": "Bearer tok-a"}) as ws,
    ):
        await ws.send_json({"type": "hello", "node": "n", "version": version_of(config)})
        await eventually(lambda: stack.hub.counts("team-a").current == 1, "counted current")
        with pytest.raises(TimeoutError):
            await ws.receive_json(timeout=0.3)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, "missing bearer token"),
        ({"authorization": "Basic abc"}, "missing bearer token"),
        ({"authorization": "Bearer nope"}, "token rejected by the TokenReview API"),
    ],
)
async def test_bad_tokens_are_refused_before_the_upgrade(
    stack: Stack, headers: dict[str, str], expected: str
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(stack.url + STREAM_PATH, headers=headers) as resp,
    ):
        body = await resp.json()

    assert resp.status == 401
    assert expected in body["error"]["message"]
    assert stack.hub.counts("team-a").connected == 0


async def test_last_known_good_serves_across_a_sidecar_restart_without_operator(
    stack: Stack, tmp_path: Path
) -> None:
    config = router_config()
    stack.hub.publish("team-a", version_of(config), config)
    client, _ = stack.client(tmp_path, "tok-a")
    client.start()
    await eventually(lambda: stack.hub.counts("team-a").current == 1, "the ACK")
    await client.stop()
    await stack.server.stop()

    restarted, holder = stack.client(tmp_path, "tok-a")  # same state dir, operator gone

    assert restarted.restore()
    assert holder.snapshot is not None
    assert holder.snapshot.version == version_of(config)
    assert holder.source == "last-known-good"


async def test_the_sidecar_reconnects_and_reports_what_it_runs(
    stack: Stack, tmp_path: Path
) -> None:
    config = router_config()
    stack.hub.publish("team-a", version_of(config), config)
    port = int(stack.url.rsplit(":", 1)[1])
    client, holder = stack.client(tmp_path, "tok-a")
    client.start()
    await eventually(lambda: stack.hub.counts("team-a").current == 1, "the ACK")
    await stack.server.stop()
    await eventually(lambda: not client.connected.is_set(), "the disconnect")

    # A restarted operator (fresh hub) learns from the hello that the sidecar is current.
    hub = ConfigHub()
    hub.publish("team-a", version_of(config), config)
    server = StreamServer(hub, Authenticator(fake_review, AUDIENCE))
    await server.start("127.0.0.1", port, None)
    try:
        await eventually(lambda: hub.counts("team-a").current == 1, "the resync")
        assert holder.snapshot is not None and holder.snapshot.version == version_of(config)
    finally:
        await client.stop()
        await server.stop()


def test_a_corrupt_last_known_good_file_is_ignored(tmp_path: Path) -> None:
    state = LastKnownGood(tmp_path)
    state.path.write_bytes(b"{not json")
    assert state.load() is None
    state.path.write_bytes(orjson.dumps({"version": "v", "config": {"endpoints": []}}))
    assert state.load() is None


@given(st.integers(min_value=0, max_value=10_000))
def test_backoff_stays_within_the_cap(attempt: int) -> None:
    backoff = Backoff(base_seconds=0.5, cap_seconds=30)
    delay = backoff.delay(attempt)
    assert 0 <= delay <= min(30, 0.5 * 2 ** min(attempt, 30))


def test_identity_comes_only_from_the_review() -> None:
    identity = identity_from_review(review_status("team-a", "app"), AUDIENCE)

    assert (identity.namespace, identity.service_account, identity.pod) == (
        "team-a",
        "app",
        "app-pod",
    )


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ({"authenticated": False, "error": "expired"}, "token rejected by the TokenReview API"),
        ({**review_status("a", "b"), "audiences": ["other"]}, "not for audience 'modelplane'"),
        (
            {"authenticated": True, "audiences": [AUDIENCE], "user": {"username": "alice"}},
            "only ServiceAccount tokens are accepted",
        ),
    ],
)
def test_reviews_that_do_not_identify_a_service_account_are_refused(
    status: dict[str, Any], message: str
) -> None:
    with pytest.raises(AuthError, match=message):
        identity_from_review(status, AUDIENCE)


async def test_positive_reviews_are_cached() -> None:
    calls: list[str] = []

    async def review(token: str, audiences: list[str]) -> Mapping[str, Any]:
        calls.append(token)
        return await fake_review(token, audiences)

    auth = Authenticator(review, AUDIENCE)
    for _ in range(3):
        await auth.authenticate("tok-a")
    with pytest.raises(AuthError):
        await auth.authenticate("bad")
    with pytest.raises(AuthError):
        await auth.authenticate("bad")

    assert calls == ["tok-a", "bad", "bad"]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (SidecarCounts(3, 3, 0, 0), ("True", "AllSidecarsCurrent")),
        (SidecarCounts(3, 1, 2, 0), ("False", "Progressing")),
        (SidecarCounts(3, 2, 0, 1, "bad"), ("False", "Rejected")),
        (SidecarCounts(), ("Unknown", "NoSidecars")),
    ],
)
def test_applied_condition(counts: SidecarCounts, expected: tuple[str, str]) -> None:
    status, reason, message = applied_condition(True, "v1", counts)

    assert (status, reason) == expected
    if counts.connected:
        assert message.startswith(f"{counts.current} of {counts.connected} connected sidecars")


def test_applied_condition_for_an_object_outside_the_config() -> None:
    assert applied_condition(False, "v1", SidecarCounts(1, 1))[1] == "NotInConfig"
