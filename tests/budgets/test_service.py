"""The operator's budget service with real SpendTrackers on an in-memory stream."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import orjson
import pytest

from modelplane_operator.budget.service import BudgetService, SpendSession
from modelplane_sidecar.config import SpendBudget
from modelplane_sidecar.spend import SpendTracker

NAMESPACE = "team-a"
NOW = dt.datetime(2026, 3, 14, 12, tzinfo=dt.UTC)
EPOCH = "2026-03-14T00:00:00Z"


def budget(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "daily", "namespace": NAMESPACE},
        "spec": {
            "period": "daily",
            "limitUSD": 10,
            "thresholds": [{"percent": 100, "action": "block"}],
        },
        "status": status or {},
    }


class Wire:
    """Both directions of one sidecar's stream, delivered in order when `drain` runs."""

    def __init__(self, service: BudgetService, tracker: SpendTracker) -> None:
        self.service = service
        self.tracker = tracker
        self.up: list[bytes] = []
        self.session = SpendSession(NAMESPACE, tracker.holder, self.down)

    async def down(self, message: bytes) -> None:
        self.tracker.on_lease(orjson.loads(message))

    def send(self, message: dict[str, Any]) -> None:
        self.up.append(orjson.dumps(message))

    async def drain(self) -> None:
        while self.up:
            await self.service.usage(self.session, orjson.loads(self.up.pop(0)))


async def test_a_grant_a_crashed_operator_wrote_but_never_sent_is_reclaimed() -> None:
    # The previous operator wrote a grant of 3.0 (write-ahead) and died before sending the
    # last 1.0 of it: the sidecar holds 2.0, 1.0 of which it settled.
    lease = {"holder": "pod/ab", "grantedUSD": 3.0, "settledUSD": 1.0, "returnedUSD": 0.0}
    service = BudgetService(clock=lambda: NOW)
    service.sync(NAMESPACE, [budget({"periodStart": EPOCH, "spentUSD": 1.0, "leases": [lease]})])
    ledger = service.ledger(NAMESPACE, "daily")
    assert ledger is not None and ledger.leased == pytest.approx(2.0)

    tracker = SpendTracker("pod")
    tracker.holder = "pod/ab"
    held = tracker.lease("daily")
    held.epoch, held.granted, held.settled = EPOCH, 2.0, 1.0
    wire = Wire(service, tracker)
    tracker.attach(wire.send)  # the resync is the first message on the new connection
    await service.connect(wire.session)  # the operator's greeting carries no amounts
    await wire.drain()

    assert held.granted == pytest.approx(2.0)
    assert ledger.holders["pod/ab"].granted == pytest.approx(2.0)
    assert ledger.leased == pytest.approx(1.0)
    assert ledger.spent == pytest.approx(1.0)


async def test_a_request_that_needs_recalled_money_is_granted_once_it_is_back() -> None:
    service = BudgetService(clock=lambda: NOW, recall_wait_seconds=5.0)
    service.sync(NAMESPACE, [budget()])
    idle = SpendTracker("idle", low_water=0.0)
    busy = SpendTracker("busy", wait_seconds=5.0)
    wires = [Wire(service, idle), Wire(service, busy)]
    for wire in wires:
        wire.tracker.attach(wire.send)
        await service.connect(wire.session)
        await wire.drain()

    # `idle` takes a big slice and sits on it.
    hold = await asyncio.gather(
        idle.reserve(_enforcing(), "gpt", 9.0), _pump(wires, until=lambda: True)
    )
    idle.release(hold[0])
    ledger = service.ledger(NAMESPACE, "daily")
    assert ledger is not None and ledger.free < 2.0

    # `busy` needs 5.0: the operator recalls from `idle`, then grants.
    reserving = asyncio.create_task(busy.reserve(_enforcing(), "gpt", 5.0))
    await _pump(wires, until=reserving.done)
    busy_hold = await reserving
    assert busy.lease("daily").reserved == pytest.approx(5.0)
    assert idle.lease("daily").returned > 0
    assert ledger.spent + ledger.leased <= 10.0 + 1e-9
    busy.release(busy_hold)


def _enforcing() -> list[SpendBudget]:
    return [SpendBudget(name="daily", enforce=True)]


async def _pump(wires: list[Wire], until: Any, rounds: int = 400) -> None:
    for _ in range(rounds):
        for wire in wires:
            await wire.drain()
        await asyncio.sleep(0.005)
        if until():
            return
