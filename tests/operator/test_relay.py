"""Budget spend from a sidecar connected to a follower replica, relayed to the leader's books.

Two real stream servers on loopback (the leader's keeps the budget books; the follower's relays),
a real sidecar (aiohttp app, control-plane client, spend tracker) connected to the follower, an
OpenAI stand-in upstream and the official openai SDK as the app. Only the TokenReview API is
faked, as in tests/operator/test_distribution.py; e2e/test_operator_ha.py runs real operator
processes against a real apiserver.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from config_stream import NAMESPACE, budgeted_config, eventually, review, streamed_sidecar

from modelplane_operator.budget.ledger import BudgetLedger
from modelplane_operator.budget.service import BudgetService
from modelplane_operator.distribution.auth import Authenticator
from modelplane_operator.distribution.hub import ConfigHub
from modelplane_operator.distribution.relay import RELAY_PATH, Peer, SpendRelays
from modelplane_operator.distribution.server import StreamServer
from modelplane_sidecar.controlplane import STREAM_PATH
from modelplane_sidecar.spend import SpendTracker
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.openai import OpenAIStandIn

NOW = dt.datetime(2026, 3, 14, 12, tzinfo=dt.UTC)
BUDGET = {
    "metadata": {"name": "daily", "namespace": NAMESPACE},
    "spec": {
        "period": "daily",
        "limitUSD": 5.0,
        "maxOutputTokens": 50,
        "leaseUSD": 0.01,
        "thresholds": [{"percent": 100, "action": "block"}],
    },
}


@dataclass
class Fleet:
    leader: StreamServer
    leader_hub: ConfigHub
    books: BudgetService
    follower: StreamServer
    follower_hub: ConfigHub
    #: What the follower believes about the leader (None: no leader known).
    peer: list[Peer | None]
    tracker: SpendTracker
    holder: Any
    app: openai.AsyncOpenAI
    standin: OpenAIStandIn

    def ledger(self) -> BudgetLedger:
        ledger = self.books.ledger(NAMESPACE, "daily")
        assert ledger is not None
        return ledger

    def accepted(self, server: StreamServer) -> float:
        value: float = server.metrics.connections.labels("accepted")._value.get()
        return value

    async def ask(self) -> None:
        await self.app.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hello there"}]
        )


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    standin = OpenAIStandIn("upstream")
    up_runner, up_port = await start_site(standin.app())
    config = budgeted_config(f"http://127.0.0.1:{up_port}/v1", BUDGET)

    leader_hub = ConfigHub()
    books = BudgetService(clock=lambda: NOW)
    books.sync(NAMESPACE, [BUDGET])
    leader = StreamServer(leader_hub, Authenticator(review))
    leader.budgets = books
    leader_port = await leader.start("127.0.0.1", 0, None)
    leader_hub.publish(NAMESPACE, config["metadata"]["version"], config)

    peer: list[Peer | None] = [Peer(f"http://127.0.0.1:{leader_port}")]
    follower_hub = ConfigHub()
    follower = StreamServer(follower_hub, Authenticator(review))
    follower.budgets = BudgetService(clock=lambda: NOW)  # no ledgers: it is not the leader
    follower.keeps_budgets = lambda: False
    follower.relays = SpendRelays(lambda: peer[0], "operator-1")
    follower_port = await follower.start("127.0.0.1", 0, None)
    follower_hub.publish(NAMESPACE, config["metadata"]["version"], config)

    try:
        async with streamed_sidecar(f"http://127.0.0.1:{follower_port}", tmp_path) as sidecar:
            yield Fleet(
                leader,
                leader_hub,
                books,
                follower,
                follower_hub,
                peer,
                sidecar.tracker,
                sidecar.holder,
                sidecar.client,
                standin,
            )
    finally:
        await follower.stop()
        await leader.stop()
        await books.close()
        await up_runner.cleanup()


async def test_a_sidecar_on_a_follower_gets_configs_there_and_leases_from_the_leaders_books(
    fleet: Fleet,
) -> None:
    await eventually(lambda: fleet.holder.snapshot is not None, "the config from the follower")
    await eventually(lambda: fleet.tracker.lease("daily").epoch, "the leader's first lease")

    for _ in range(5):
        await fleet.ask()

    # The follower counts the sidecar; the leader sees only its relayed spend stream.
    assert fleet.follower_hub.counts(NAMESPACE).current == 1
    assert fleet.leader_hub.counts(NAMESPACE).connected == 0
    ledger = fleet.ledger()
    (holder,) = ledger.holders.values()
    assert holder.id.startswith("app-pod/") and holder.connected
    assert holder.granted > 0
    await eventually(
        lambda: ledger.endpoints.get("gpt") and ledger.endpoints["gpt"].requests == 5,
        "the usage reports",
    )
    assert ledger.spent == pytest.approx(holder.settled)
    assert ledger.spent > 0
    assert fleet.follower.budgets is not None and fleet.follower.budgets.ledgers(NAMESPACE) == {}


async def test_when_the_leader_drops_spend_the_sidecar_resyncs_without_double_counting(
    fleet: Fleet,
) -> None:
    await eventually(lambda: fleet.tracker.lease("daily").epoch, "the leader's first lease")
    for _ in range(3):
        await fleet.ask()
    ledger = fleet.ledger()
    await eventually(
        lambda: ledger.endpoints.get("gpt") and ledger.endpoints["gpt"].requests == 3,
        "the usage reports",
    )
    spent_before = ledger.spent
    connections = fleet.accepted(fleet.follower)

    # The leader stepped down (or changed): its spend streams close, relays with them.
    assert await fleet.leader.drop_spend_streams("stepped down") == 1
    await eventually(
        lambda: fleet.accepted(fleet.follower) > connections, "the sidecar to reconnect"
    )
    await eventually(lambda: fleet.tracker.connected, "the relay to the leader again")

    for _ in range(2):
        await fleet.ask()
    await eventually(lambda: ledger.endpoints["gpt"].requests == 5, "the usage after the resync")
    (holder,) = ledger.holders.values()
    assert holder.connected
    assert ledger.spent == pytest.approx(holder.settled)
    assert ledger.spent > spent_before
    assert ledger.leased == pytest.approx(max(0.0, holder.outstanding))
    assert fleet.follower_hub.counts(NAMESPACE).current == 1


async def test_without_a_leader_the_sidecar_still_gets_its_config_and_spend_waits(
    fleet: Fleet,
) -> None:
    # No leader is known, and the replica the follower believes leads refuses relays.
    fleet.peer[0] = None
    assert await fleet.follower.drop_spend_streams("the leader changed") in (0, 1)
    await eventually(lambda: fleet.holder.snapshot is not None, "the config from the follower")
    await eventually(lambda: fleet.follower_hub.counts(NAMESPACE).current == 1, "the ACK")
    assert fleet.ledger().holders == {} or not any(
        h.connected for h in fleet.ledger().holders.values()
    )

    fleet.leader.keeps_budgets = lambda: False
    connections = fleet.accepted(fleet.follower)
    fleet.peer[0] = Peer(f"http://127.0.0.1:{_port(fleet.leader)}")
    # The relay is refused (1013), so the follower closes the sidecar's stream; it reconnects.
    await eventually(
        lambda: fleet.accepted(fleet.follower) > connections, "the sidecar to reconnect"
    )

    fleet.leader.keeps_budgets = lambda: True
    await eventually(
        lambda: any(h.connected for h in fleet.ledger().holders.values()), "the relay to land"
    )
    await fleet.ask()
    assert fleet.standin.received


def _port(server: StreamServer) -> int:
    runner = server._runner
    assert runner is not None
    (address,) = runner.addresses
    return int(address[1])


async def test_the_leader_holds_one_relay_connection_for_all_of_a_followers_sidecars(
    fleet: Fleet, tmp_path: Path
) -> None:
    follower_url = f"http://127.0.0.1:{_port(fleet.follower)}"
    for name in ("b", "c"):
        (tmp_path / name).mkdir()
    async with (
        streamed_sidecar(follower_url, tmp_path / "b") as second,
        streamed_sidecar(follower_url, tmp_path / "c") as third,
    ):
        trackers = [fleet.tracker, second.tracker, third.tracker]
        await eventually(
            lambda: all(t.lease("daily").epoch for t in trackers), "every sidecar's first lease"
        )
        for app in (fleet.app, second.client, third.client):
            await app.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hello there"}]
            )
        ledger = fleet.ledger()
        await eventually(
            lambda: ledger.endpoints.get("gpt") and ledger.endpoints["gpt"].requests == 3,
            "the usage reports",
        )

        # Three holders on the books, each with its own lease and spend, over one connection.
        holders = {t.holder for t in trackers}
        assert set(ledger.holders) == holders
        assert all(h.connected and h.granted > 0 and h.settled > 0 for h in ledger.holders.values())
        assert ledger.spent == pytest.approx(sum(h.settled for h in ledger.holders.values()))
        assert fleet.leader.metrics.connections.labels("relay")._value.get() == 1
        assert fleet.leader.metrics.connections.labels("accepted")._value.get() == 0
        assert fleet.follower.relays is not None and fleet.follower.relays.connections == 1


async def test_each_relayed_stream_is_reviewed_and_a_refused_one_closes_alone(
    fleet: Fleet,
) -> None:
    """A hand-driven follower: one stream with a sidecar's token, one with a bad token."""
    await eventually(lambda: fleet.tracker.lease("daily").epoch, "the real sidecar's lease")
    url = f"http://127.0.0.1:{_port(fleet.leader)}{RELAY_PATH}"
    hello = {"type": "hello", "node": "n", "features": ["spend/v1"], "holder": "x/abcd"}
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_json({"type": "hello", "relay": "operator-2"})
        await ws.send_json({"type": "open", "stream": 7, "token": "forged", "hello": hello})
        await ws.send_json({"type": "open", "stream": 8, "token": "tok-a", "hello": hello})
        await ws.send_json({"type": "data", "stream": 7, "message": {"type": "usage"}})

        frames = {}
        for _ in range(20):
            data = await ws.receive_json(timeout=30)
            frames.setdefault(data["stream"], data)
            if len(frames) == 2:
                break

    assert frames[7]["type"] == "close"
    assert frames[7]["reason"].startswith("401: ")
    # The good stream is a holder of its own (pod from the review, process from the hello).
    assert frames[8]["type"] == "data" and frames[8]["message"]["type"] == "lease"
    assert "app-pod/abcd" in fleet.ledger().holders
    # The real sidecar's stream, relayed by the real follower, was not disturbed.
    assert fleet.ledger().holders[fleet.tracker.holder].connected


async def test_the_leader_still_serves_the_per_sidecar_relay_of_an_older_follower(
    fleet: Fleet,
) -> None:
    """During a rolling update a follower of the previous version relays each sidecar on a
    stream of its own, as that sidecar, with `relay` in the hello."""
    url = f"http://127.0.0.1:{_port(fleet.leader)}{STREAM_PATH}"
    hello = {
        "type": "hello",
        "node": "n",
        "version": None,
        "features": ["spend/v1"],
        "holder": "x/beef",
        "relay": "operator-old",
    }
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, headers={"authorization": "Bearer tok-a"}) as ws,
    ):
        await ws.send_json(hello)
        lease = await ws.receive_json(timeout=30)

        assert lease["type"] == "lease"
        assert fleet.ledger().holders["app-pod/beef"].connected
    # Served as spend only: the leader counts no sidecar of its own.
    assert fleet.leader_hub.counts(NAMESPACE).connected == 0
