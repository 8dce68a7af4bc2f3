"""Many sidecars, thousands of concurrent requests, one Budget: the bound holds.

Everything here is the real code: the operator's BudgetService and ledger, one SpendTracker per
simulated sidecar, the pure compiler turning the Budget's mode into each config, and the routing
pipeline (`decide`) choosing endpoints from that config. The config stream is an in-memory link
per sidecar (messages serialised with orjson, processed in order per sidecar, like the socket);
only the upstream calls are simulated: a delay, then a cost the provider would report (at most
the reserved worst case), a 5xx (released), or a timeout (charged its worst case).

Asserted: the settled spend never exceeds the cap by more than the stated bound (sum over settled
calls of (actual - reserved)^+, here 0); the operator's books equal what the sidecars settled;
each downgrade tier takes over at its threshold; calls are refused only once the money is
committed (spent or reserved by calls in flight), i.e. the block starts at 100%.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from modelplane_operator.budget.service import BudgetService, SpendSession
from modelplane_operator.compile import NamespaceInputs, Resource, compile_namespace
from modelplane_sidecar.config import BudgetMode, Tier
from modelplane_sidecar.errors import ApiError
from modelplane_sidecar.providers.base import Operation, Usage
from modelplane_sidecar.routing import RoutedRequest, decide
from modelplane_sidecar.runtime import Snapshot
from modelplane_sidecar.spend import BudgetRefusal, SpendTracker, plan_call

NAMESPACE = "team-a"
LIMIT = 5.0
SIDECARS = 24
REQUESTS = 4000
IN_FLIGHT = 300
NOW = dt.datetime(2026, 3, 14, 12, tzinfo=dt.UTC)

PRICES = {  # USD per 1M tokens: input, output
    "premium": (15.0, 75.0),
    "standard": (3.0, 15.0),
    "cheap": (0.15, 0.60),
}


def endpoint(name: str) -> Resource:
    price_in, price_out = PRICES[name]
    return Resource(
        name,
        {
            "provider": "openai",
            "model": f"{name}-model",
            "baseURL": "http://127.0.0.1:9/v1",
            "pricing": {"inputPerMTok": price_in, "outputPerMTok": price_out},
        },
    )


POLICY = Resource(
    "routes",
    {
        "models": [
            {
                "name": "chat",
                "strategy": "priority",
                "targets": [
                    {"endpoint": "premium", "tier": "premium"},
                    {"endpoint": "standard", "tier": "standard"},
                    {"endpoint": "cheap", "tier": "cheap"},
                ],
            }
        ]
    },
)
BUDGET = {
    "metadata": {"name": "daily", "namespace": NAMESPACE},
    "spec": {
        "period": "daily",
        "limitUSD": LIMIT,
        "maxOutputTokens": 400,
        "thresholds": [
            {"percent": 50, "action": "alert"},
            {"percent": 70, "action": "downgrade", "tier": "standard"},
            {"percent": 90, "action": "downgrade", "tier": "cheap"},
            {"percent": 100, "action": "block"},
        ],
    },
}
HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


@dataclass
class Record:
    decided: list[tuple[float, BudgetMode, Tier | None, str]] = field(default_factory=list)
    switches: list[tuple[BudgetMode, Tier | None, float]] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    blocked_by_mode: int = 0
    charged: float = 0.0
    overrun: float = 0.0
    served: int = 0
    #: The most spend one usage message added (how far past a threshold a switch can come).
    largest_report: float = 0.0


@dataclass
class Link:
    """One sidecar's stream: usage messages up (in order), lease messages down."""

    service: BudgetService
    tracker: SpendTracker
    up: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.session = SpendSession(NAMESPACE, self.tracker.holder, self.down)

    async def down(self, message: bytes) -> None:
        self.tracker.on_lease(orjson.loads(message))

    def send(self, message: dict[str, Any]) -> None:
        self.up.put_nowait(orjson.dumps(message))

    async def pump(self, record: Record) -> None:
        while True:
            message = await self.up.get()
            ledger = self.service.ledger(NAMESPACE, "daily")
            before = ledger.spent if ledger is not None else 0.0
            try:
                await self.service.usage(self.session, orjson.loads(message))
            finally:
                self.up.task_done()
            if ledger is not None:
                record.largest_report = max(record.largest_report, ledger.spent - before)


class Fleet:
    def __init__(self) -> None:
        self.record = Record()
        self.service = BudgetService(
            persist=self._persist,
            mode_changed=lambda ns: self.recompile(),
            clock=lambda: NOW,
        )
        self.service.sync(NAMESPACE, [BUDGET])
        self.trackers = [
            # Every refusal asks the operator (no refuse-without-asking window), so the check
            # of refusals below measures the books, not the window.
            # A generous wait: on a loaded CI machine 4,000 calls through one event loop can
            # keep a request waiting for its lease for many seconds, and a refusal for "the
            # operator did not answer in time" would not be the books' answer this test checks.
            SpendTracker(
                f"pod-{i}", wait_seconds=600.0, exhausted_seconds=0.0, on_settle=self._settled
            )
            for i in range(SIDECARS)
        ]
        self.links = [Link(self.service, t) for t in self.trackers]
        self.snapshot = self._compile()

    async def _persist(self, namespace: str, name: str) -> None:
        await asyncio.sleep(0)  # the status write (e2e covers the real one)

    def _settled(
        self, budget: str, endpoint: str, charged: float, overrun: float, usage: Usage | None
    ) -> None:
        self.record.charged += charged
        self.record.overrun += overrun
        # The invariant at every settlement: no more settled than the cap plus the bound.
        assert self.record.charged <= LIMIT + self.record.overrun + 1e-9

    @property
    def ledger(self) -> Any:
        return self.service.ledger(NAMESPACE, "daily")

    def _compile(self) -> Snapshot:
        compiled = compile_namespace(
            NamespaceInputs(
                NAMESPACE,
                endpoints=[endpoint(n) for n in PRICES],
                policies=[POLICY],
                budgets=[Resource.from_body(BUDGET)],
                spent=self.service.spent(NAMESPACE),
            )
        )
        assert compiled.config is not None
        return Snapshot.build(compiled.config, getattr(self, "snapshot", None))

    def recompile(self) -> None:
        """The operator recompiles on a mode change; here the push reaches every sidecar at once."""
        self.snapshot = self._compile()
        (budget,) = self.snapshot.config.budgets
        self.record.switches.append((budget.mode, budget.tier, self.ledger.spent))

    def fleet_state(self) -> tuple[float, float, float]:
        """(settled, reserved by calls in flight, idle lease) summed over every sidecar."""
        leases = [t.lease("daily") for t in self.trackers]
        return (
            sum(x.settled for x in leases),
            sum(x.reserved for x in leases),
            sum(max(0.0, x.available) for x in leases),
        )

    async def call(self, index: int, rng: random.Random) -> None:
        tracker = self.trackers[index % SIDECARS]
        snapshot = self.snapshot
        (budget,) = snapshot.config.budgets
        words = " ".join(rng.choice(("plan", "the", "quarterly", "review")) for _ in range(60))
        body = {"model": "chat", "messages": [{"role": "user", "content": words}]}
        routed = RoutedRequest(Operation.CHAT, body, HEADERS, "chat", False)
        try:
            decision = decide(snapshot, routed, rng=rng)
        except ApiError as exc:
            assert (exc.status, exc.code) == (429, "budget_exhausted")
            assert "'daily'" in exc.message
            self.record.blocked_by_mode += 1
            return
        chosen = decision.candidates[0]
        self.record.decided.append((self.ledger.spent, budget.mode, budget.tier, chosen.name))
        found = decision.trace.found if decision.trace is not None else None
        plan = plan_call(
            snapshot.config.budgets,
            chosen.config,
            routed.op,
            body,
            found.text if found is not None else None,
        )
        assert plan is not None and plan.body["max_completion_tokens"] == 400
        try:
            hold = await tracker.reserve(plan.budgets, chosen.name, plan.worst_case)
        except BudgetRefusal as refusal:
            assert refusal.budget == "daily"
            settled, reserved, idle = self.fleet_state()
            self.record.refusals.append(
                {
                    "worst_case": plan.worst_case,
                    "spent": settled,
                    "reserved": reserved,
                    "idle": idle,
                    "free": self.ledger.free,
                    "answered": float("is exhausted for this period" in refusal.message),
                    "message": refusal.message,
                }
            )
            return
        await asyncio.sleep(rng.uniform(0.0, 0.004))
        outcome = rng.random()
        if outcome < 0.04:
            tracker.release(hold)  # the upstream answered 5xx: nothing billed
        elif outcome < 0.07:
            tracker.settle(hold, None, None)  # timed out: may be billed, charged the worst case
        else:
            price_in, price_out = PRICES[chosen.name]
            usage = Usage(input_tokens=rng.randint(60, 120), output_tokens=rng.randint(1, 400))
            cost = (usage.input_tokens * price_in + usage.output_tokens * price_out) / 1e6
            assert cost <= plan.worst_case
            tracker.settle(hold, cost, usage)
            self.record.served += 1


@pytest.mark.parametrize("seed", [8, 2026])
async def test_thousands_of_concurrent_requests_never_overspend_one_budget(seed: int) -> None:
    fleet = Fleet()
    pumps = [asyncio.create_task(link.pump(fleet.record)) for link in fleet.links]
    for tracker, link in zip(fleet.trackers, fleet.links, strict=True):
        await fleet.service.connect(link.session)
        tracker.attach(link.send)

    async def flusher() -> None:
        while True:
            await asyncio.sleep(0.02)
            for tracker in fleet.trackers:
                tracker.flush()

    flushing = asyncio.create_task(flusher())
    gate = asyncio.Semaphore(IN_FLIGHT)
    rng = random.Random(seed)

    async def one(index: int) -> None:
        async with gate:
            await fleet.call(index, random.Random(rng.random()))

    await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    flushing.cancel()
    for tracker in fleet.trackers:
        tracker.release_all()
    await asyncio.gather(*(link.up.join() for link in fleet.links))
    for task in [*pumps, flushing]:
        task.cancel()
    await asyncio.gather(*pumps, flushing, return_exceptions=True)
    await fleet.service.close()

    record = fleet.record
    ledger = fleet.ledger
    # The bound: settled spend <= cap + sum((actual - reserved)^+), and that sum is 0 here.
    assert record.overrun == 0.0
    assert ledger.spent <= LIMIT + 1e-9
    # Nothing settled was lost on the way up: the books equal what the sidecars settled.
    assert ledger.spent == pytest.approx(record.charged, abs=1e-9)
    assert ledger.spent == pytest.approx(
        sum(t.lease("daily").settled for t in fleet.trackers), abs=1e-9
    )
    assert ledger.leased == pytest.approx(0.0, abs=1e-9)  # every idle lease came back

    # The budget was used up: what is left cannot pay for one more cheap call's worst case.
    assert LIMIT - ledger.spent < 0.01 * LIMIT
    assert record.refusals or record.blocked_by_mode

    # Downgrade tiers take over at their thresholds, and routing follows the shipped mode.
    modes = [(mode, tier) for mode, tier, _ in record.switches]
    assert modes[:2] == [(BudgetMode.DOWNGRADE, Tier.STANDARD), (BudgetMode.DOWNGRADE, Tier.CHEAP)]
    # A switch comes with the usage report that crosses the threshold, so at most one report
    # past it (reports are cumulative and arrive every second per sidecar in production).
    standard_at, cheap_at = record.switches[0][2], record.switches[1][2]
    assert 0.70 * LIMIT <= standard_at <= 0.70 * LIMIT + record.largest_report
    assert 0.90 * LIMIT <= cheap_at <= 0.90 * LIMIT + record.largest_report
    expected = {
        (BudgetMode.NORMAL, None): "premium",
        (BudgetMode.DOWNGRADE, Tier.STANDARD): "standard",
        (BudgetMode.DOWNGRADE, Tier.CHEAP): "cheap",
    }
    for spent, mode, tier, chosen in record.decided:
        assert chosen == expected[(mode, tier)]
        band = "premium" if spent < 0.7 * LIMIT else "standard" if spent < 0.9 * LIMIT else "cheap"
        assert chosen == band, (spent, chosen)
    assert {chosen for *_, chosen in record.decided} == {"premium", "standard", "cheap"}

    # The block starts at 100%: every refusal is the operator's "exhausted" answer, given after
    # it recalled the idle leases of the other sidecars (not a sidecar giving up), and by the end
    # less than 1% of the limit is left (asserted above).
    for refusal in record.refusals:
        assert refusal["answered"], f"refused without the operator saying so: {refusal['message']}"
