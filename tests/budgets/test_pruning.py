"""Pruning a Budget's holders: the arithmetic, and that a report never counts twice across it.

Holders disconnected past the grace period whose lease is accounted for are folded into the
ledger's `pruned` aggregate; each holder entry has a book (nonce) that the sidecar names in its
reports, so reports of a pruned entry are recognised and count nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from modelplane_operator.budget.ledger import EPSILON, BudgetLedger, Report, Terms
from modelplane_operator.budget.service import BudgetService, SpendSession
from modelplane_operator.crd_models import BudgetSpec, BudgetStatus
from modelplane_sidecar.config import SpendBudget
from modelplane_sidecar.spend import EndpointUsage, SpendTracker

NOW = dt.datetime(2026, 3, 14, 9, tzinfo=dt.UTC)
GRACE = 600.0
LATER = NOW + dt.timedelta(seconds=GRACE + 1)
CAP = 20.0
TOLERANCE = 1e-6


def terms(limit: float = CAP, block: bool = True) -> Terms:
    thresholds = [{"percent": 100, "action": "block"}] if block else []
    spec = {"period": "daily", "limitUSD": limit, "thresholds": thresholds, "leaseUSD": 1}
    return Terms.from_spec(BudgetSpec.model_validate(spec))


def usage(ledger: BudgetLedger, book: str | None, settled: float, **kw: Any) -> Report:
    return Report(
        epoch=ledger.epoch,
        settled=settled,
        returned=float(kw.get("returned", 0.0)),
        granted=float(kw.get("granted", 0.0)),
        endpoints=kw.get("endpoints", {}),
        resync=bool(kw.get("resync", False)),
        book=book,
    )


def gpt(usd: float, requests: int) -> dict[str, EndpointUsage]:
    return {"gpt": EndpointUsage(usd, 10 * requests, 5 * requests, 0, requests)}


def settled_holder(ledger: BudgetLedger, hid: str, spend: float) -> str:
    """A holder that was granted 4, spent `spend`, returned the rest, and went away."""
    ledger.connect(hid)
    h = ledger.holders[hid]
    h.written = True  # as after the status write that precedes telling the sidecar
    ledger.grant(hid, 4.0)
    ledger.report(hid, usage(ledger, h.book, spend, returned=4.0 - spend, endpoints=gpt(spend, 2)))
    ledger.disconnect(hid, NOW)
    return h.book


def test_accounted_holders_past_the_grace_period_fold_into_the_aggregate() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    settled_holder(ledger, "pod-1/a", 1.0)
    settled_holder(ledger, "pod-2/b", 2.5)
    ledger.connect("pod-3/c")
    ledger.grant("pod-3/c", 3.0)
    spent, leased, endpoints = ledger.spent, ledger.leased, dict(ledger.endpoints)

    assert ledger.prune(NOW + dt.timedelta(seconds=GRACE - 1), GRACE) == 0  # still in grace
    assert ledger.prune(LATER, GRACE) == 2

    assert sorted(ledger.holders) == ["pod-3/c"]
    assert (ledger.spent, ledger.leased, ledger.endpoints) == (spent, leased, endpoints)
    assert ledger.pruned.holders == 2
    assert ledger.pruned.granted == pytest.approx(8.0)
    assert ledger.pruned.settled == pytest.approx(3.5)
    assert ledger.pruned.returned == pytest.approx(4.5)
    assert ledger.pruned.leased == 0.0
    status = ledger.status()
    assert [lease["holder"] for lease in status["leases"]] == ["pod-3/c"]
    assert status["pruned"] == {
        "holders": 2,
        "grantedUSD": 8.0,
        "settledUSD": 3.5,
        "returnedUSD": 4.5,
        "leasedUSD": 0.0,
    }
    BudgetStatus.model_validate(status)  # what the CRD's status schema says


def test_holders_that_may_still_change_the_books_are_kept() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    ledger.connect("connected")
    ledger.holders["connected"].written = True
    ledger.connect("holding")  # disconnected with lease outstanding
    ledger.holders["holding"].written = True
    ledger.grant("holding", 2.0)
    ledger.disconnect("holding", NOW)
    # Counted by reports naming no book, and has never named its book since: a process that
    # never learned the book could report again without one, into a fresh entry.
    ledger.connect("unconfirmed")
    ledger.holders["unconfirmed"].written = True
    ledger.report("unconfirmed", usage(ledger, None, 0.5))
    ledger.disconnect("unconfirmed", NOW)

    assert ledger.prune(LATER, GRACE) == 0
    assert sorted(ledger.holders) == ["connected", "holding", "unconfirmed"]


def test_a_holder_that_never_got_anything_is_forgotten_unless_its_book_was_sent() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    ledger.connect("never-told")
    ledger.disconnect("never-told", NOW)
    assert "never-told" not in ledger.holders  # no sidecar can know its book: nothing to keep

    ledger.connect("told")
    ledger.holders["told"].written = True
    ledger.disconnect("told", NOW)
    assert "told" in ledger.holders  # kept through the grace period, then pruned
    assert ledger.prune(LATER, GRACE) == 1 and ledger.pruned.holders == 1


def test_above_the_soft_limit_held_leases_are_folded_and_stay_counted() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    for i in range(4):
        hid = f"pod/{i}"
        ledger.connect(hid)
        ledger.holders[hid].written = True
        ledger.grant(hid, 1.0 + i)
        ledger.disconnect(hid, NOW + dt.timedelta(seconds=i))
    committed, free = ledger.committed, ledger.free

    assert ledger.prune(LATER + dt.timedelta(seconds=10), GRACE, soft_limit=2) == 2
    # The two disconnected longest go first; their leases are still committed money.
    assert sorted(ledger.holders) == ["pod/2", "pod/3"]
    assert ledger.pruned.leased == pytest.approx(1.0 + 2.0)
    assert (ledger.committed, ledger.free) == (pytest.approx(committed), pytest.approx(free))
    # They are counted until the period ends, then void like every lease.
    assert ledger.rollover(NOW + dt.timedelta(days=1))
    assert (ledger.pruned.holders, ledger.leased) == (0, 0.0)


def test_a_pruned_holder_that_reports_again_counts_nothing_twice() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    old_book = settled_holder(ledger, "pod/a", 1.5)
    assert ledger.prune(LATER, GRACE) == 1
    spent = ledger.spent

    # It comes back and repeats everything it reported, resync and all, under the old book.
    ledger.connect("pod/a")
    again = usage(ledger, old_book, 1.5, returned=2.5, granted=4.0, resync=True)
    assert ledger.report("pod/a", again) == []
    ledger.report("pod/a", usage(ledger, old_book, 1.9, returned=2.5, endpoints=gpt(1.9, 3)))
    assert ledger.spent == spent == pytest.approx(1.5)
    assert ledger.endpoints["gpt"] == EndpointUsage(1.5, 20, 10, 0, 2)
    fresh = ledger.holders["pod/a"]
    assert fresh.book != old_book
    assert (fresh.granted, fresh.settled, fresh.confirmed) == (0.0, 0.0, False)

    # Told the new book, it starts from zero there: what it spends now counts once.
    fresh.written = True
    ledger.grant("pod/a", 1.0)
    ledger.report("pod/a", usage(ledger, fresh.book, 0.25, endpoints=gpt(0.25, 1)))
    ledger.report("pod/a", usage(ledger, fresh.book, 0.25, endpoints=gpt(0.25, 1)))  # repeated
    assert ledger.spent == pytest.approx(1.75)
    assert ledger.endpoints["gpt"] == EndpointUsage(1.75, 30, 15, 0, 3)
    assert fresh.confirmed


def test_a_resync_naming_a_stale_book_reclaims_grants_of_the_new_entry() -> None:
    # The new entry was granted 2.0 on a connection that broke before the grant (and so the
    # new book) arrived: the sidecar still names its old book, so it received none of it.
    ledger = BudgetLedger("b", terms(), NOW)
    old_book = settled_holder(ledger, "pod/a", 1.0)
    ledger.prune(LATER, GRACE)
    ledger.connect("pod/a")
    ledger.grant("pod/a", 2.0)
    assert ledger.leased == pytest.approx(2.0)

    ledger.report("pod/a", usage(ledger, old_book, 1.0, returned=3.0, granted=4.0, resync=True))
    assert ledger.leased == 0.0 and ledger.spent == pytest.approx(1.0)


def test_books_and_the_aggregate_survive_an_operator_restart() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    settled_holder(ledger, "gone/1", 1.0)
    book = settled_holder(ledger, "back/2", 2.0)
    ledger.holders["back/2"].confirmed = True
    ledger.prune(LATER, GRACE)
    ledger.connect("live/3")
    ledger.holders["live/3"].written = True
    ledger.grant("live/3", 1.0)
    status = ledger.status()

    restarted = BudgetLedger("b", terms(), LATER)
    assert restarted.restore(status, LATER)
    assert restarted.pruned == ledger.pruned
    assert (restarted.spent, restarted.leased) == (ledger.spent, pytest.approx(ledger.leased))
    live = restarted.holders["live/3"]
    assert live.book == ledger.holders["live/3"].book and live.written
    assert live.disconnected_at == LATER  # connected when written: disconnected since now
    # A pruned holder is still recognised after the restart: its old book is not in the books.
    restarted.report("back/2", usage(restarted, book, 2.0, returned=2.0))
    assert restarted.spent == pytest.approx(3.0)


def test_a_status_written_before_books_existed_is_taken_over() -> None:
    ledger = BudgetLedger("b", terms(), NOW)
    status = {
        "periodStart": ledger.epoch,
        "spentUSD": 1.0,
        "leases": [{"holder": "pod/old", "grantedUSD": 2.0, "settledUSD": 1.0}],
    }
    assert ledger.restore(status, NOW)
    h = ledger.holders["pod/old"]
    assert not h.written and not h.confirmed  # a new book, never sent: it reports without one
    ledger.report("pod/old", usage(ledger, None, 1.5, returned=0.5))
    assert ledger.spent == pytest.approx(1.5) and ledger.leased == 0.0
    ledger.disconnect("pod/old", NOW)
    assert ledger.prune(LATER, GRACE) == 0  # counted without its book: kept until it names it


# --- the property ------------------------------------------------------------------------------


@dataclass
class Process:
    """One sidecar process as the books cannot see it: what it really holds and spent."""

    id: str
    book: str | None = None
    granted: float = 0.0
    settled: float = 0.0
    returned: float = 0.0
    connected: bool = False
    #: Everything it ever settled, across the entries it had.
    spent: float = 0.0
    sent: list[Report] = field(default_factory=list)

    @property
    def available(self) -> float:
        return self.granted - self.settled - self.returned

    def report(self, ledger: BudgetLedger, resync: bool = False) -> Report:
        return Report(
            ledger.epoch,
            self.settled,
            self.returned,
            self.granted,
            {},
            resync=resync,
            book=self.book,
        )


class Fleet:
    """The ledger, the status last written to the apiserver, and the processes around it."""

    def __init__(self, soft_limit: int, tracked: bool) -> None:
        self.terms = terms(block=not tracked)
        self.ledger = BudgetLedger("b", self.terms, NOW)
        self.written: dict[str, Any] = self.ledger.status()
        self.now = NOW
        self.soft_limit = soft_limit
        self.tracked = tracked
        self.processes = [Process(f"pod/{i}") for i in range(2)]

    def send(self, p: Process, resync: bool = False) -> None:
        report = p.report(self.ledger, resync)
        p.sent.append(report)
        self.ledger.report(p.id, report)

    def write(self) -> None:
        """A status write, as the service does before telling a sidecar a grant or a book."""
        self.written = self.ledger.status()
        for h in self.ledger.holders.values():
            h.written = True

    def tell(self, p: Process) -> None:
        """A lease message reaches the process: its book (a new one starts it from zero)."""
        h = self.ledger.holders.get(p.id)
        if h is None or not h.written or h.book == p.book:
            return
        if p.book is not None:
            p.granted = p.settled = p.returned = 0.0
        p.book = h.book
        self.send(p)

    def connect(self, p: Process, told: bool = True) -> None:
        p.connected = True
        self.send(p, resync=True)  # the resync is the first message on a connection
        self.ledger.connect(p.id)
        if told:
            self.write()
            self.tell(p)

    def leave(self, p: Process) -> None:
        p.connected = False
        self.ledger.disconnect(p.id, self.now)

    def spend(self, p: Process, amount: float) -> None:
        # An enforced budget: only what it holds (reservations are worst cases).
        cost = amount if self.tracked else min(amount, max(0.0, p.available))
        p.settled += cost
        p.spent += cost

    def step(self, action: str, p: Process, amount: float) -> None:
        ledger = self.ledger
        if action == "work":
            if not p.connected:
                self.connect(p)
            got = ledger.grant(p.id, amount)
            self.write()
            self.tell(p)
            p.granted += got
            self.spend(p, amount / 2)
            self.send(p)
        elif action == "flaky-connect" and not p.connected:
            self.connect(p, told=False)
            self.leave(p)  # the connection broke before the greeting arrived
        elif action == "lost-grant" and not p.connected:
            # It asks for money at once; the connection breaks before the answer (the grant,
            # and the book it would have learned from the greeting) arrives.
            self.connect(p, told=False)
            ledger.grant(p.id, amount)
            self.write()
            self.leave(p)
        elif action == "spend":  # connected or not
            self.spend(p, amount)
        elif action == "repeat" and p.connected and p.sent:
            # A repeated or late usage message, of any entry it had (a resync is only ever the
            # first message of a connection, so it comes back as a plain report).
            old = p.sent[int(amount * 7) % len(p.sent)]
            ledger.report(p.id, dataclasses.replace(old, resync=False))
        elif action == "leave" and p.connected:
            if amount < 1.5:  # a SIGTERM: idle lease back and a last report, then gone
                p.returned += max(0.0, p.available)
                self.send(p)
            self.leave(p)
        elif action == "wait":
            self.now += dt.timedelta(seconds=GRACE * amount)
            ledger.prune(self.now, GRACE, self.soft_limit)
        elif action == "restart":
            self.ledger = BudgetLedger("b", self.terms, self.now)
            assert self.ledger.restore(self.written, self.now)
            for q in self.processes:
                q.connected = False

    def check(self) -> None:
        # Status amounts are rounded to 1e-9 USD, so a restart may move them by that much.
        ledger = self.ledger
        truth = sum(p.spent for p in self.processes)
        assert ledger.spent <= truth + TOLERANCE, "a report was counted twice"
        if not self.tracked:
            assert ledger.spent + ledger.leased <= CAP + TOLERANCE, "more committed than the cap"
            # Nothing spent escapes the books: settled there, or still counted as a lease.
            assert truth <= ledger.spent + ledger.leased + TOLERANCE, "spend the books lost"


ACTIONS = ["work", "flaky-connect", "lost-grant", "spend", "repeat", "leave", "wait", "restart"]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(ACTIONS),
            st.integers(min_value=0, max_value=1),
            st.sampled_from([0.0, 0.25, 1.0, 2.0]),
        ),
        max_size=30,
    ),
    st.sampled_from([1, 1024]),
    st.booleans(),
)
# The cases the design is about, always run: a pruned sidecar back with its old book; one whose
# entry counted reports without a book; a grant to its new entry lost before the book arrived.
@example([("work", 0, 1.0), ("leave", 0, 0.0), ("wait", 0, 2.0), ("work", 0, 1.0)], 1024, False)
@example([("spend", 0, 1.0), ("flaky-connect", 0, 0.0), ("wait", 0, 2.0)], 1024, True)
@example([("work", 0, 1.0), ("leave", 0, 0.0), ("wait", 0, 2.0), ("lost-grant", 0, 1.0)], 1, False)
@example(
    [("work", 0, 1.0), ("work", 1, 1.0), ("leave", 0, 2.0), ("wait", 0, 2.0), ("spend", 0, 1.0)],
    1,
    False,
)
def test_reports_never_count_twice_across_pruning_restarts_and_reconnects(
    steps: list[tuple[str, int, float]], soft_limit: int, tracked: bool
) -> None:
    fleet = Fleet(soft_limit, tracked)
    for action, index, amount in steps:
        fleet.step(action, fleet.processes[index], amount)
        fleet.check()
    # In the end everyone reconnects, gives back what it holds and reports: no lease is left
    # outstanding but the folded ones, and unless leases were folded while held (or a tracked
    # budget's process spent away while its entry was pruned), the books are exact.
    fleet.write()
    for p in fleet.processes:
        if p.connected:
            fleet.leave(p)
        fleet.connect(p)
        p.returned += max(0.0, p.available)
        fleet.send(p)
        fleet.check()
    ledger = fleet.ledger
    assert ledger.leased == pytest.approx(ledger.pruned.leased, abs=TOLERANCE)
    truth = sum(p.spent for p in fleet.processes)
    if not tracked and ledger.pruned.leased <= EPSILON:
        assert ledger.spent == pytest.approx(truth, abs=TOLERANCE)


# --- through the service, with real SpendTrackers ----------------------------------------------


NAMESPACE = "team-a"


def budget_body() -> dict[str, Any]:
    return {
        "metadata": {"name": "daily", "namespace": NAMESPACE},
        "spec": {
            "period": "daily",
            "limitUSD": 10,
            "leaseUSD": 2,
            "thresholds": [{"percent": 100, "action": "block"}],
        },
        "status": {},
    }


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


class Books:
    """A BudgetService whose status writes land in `written` (or fail while `down`)."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.service = BudgetService(clock=self.clock, prune_grace_seconds=GRACE)
        self.service.persist = self.persist
        self.service.sync(NAMESPACE, [budget_body()])
        self.written: list[dict[str, Any]] = []
        self.down = False

    async def persist(self, namespace: str, name: str) -> None:
        if self.down:
            raise ConnectionError("apiserver away")
        status = self.service.status(namespace, name)
        assert status is not None
        self.written.append(status)

    def written_books(self) -> set[str]:
        return {lease["book"] for status in self.written for lease in status["leases"]}

    @property
    def ledger(self) -> BudgetLedger:
        found = self.service.ledger(NAMESPACE, "daily")
        assert found is not None
        return found


class Wire:
    """One connection of a sidecar: messages go up in order when `drain` runs."""

    def __init__(self, books: Books, tracker: SpendTracker) -> None:
        self.books = books
        self.tracker = tracker
        self.up: list[bytes] = []
        self.session = SpendSession(NAMESPACE, tracker.holder, self.down)
        self.books_seen: list[str | None] = []

    async def down(self, message: bytes) -> None:
        data = orjson.loads(message)
        for item in data["budgets"]:
            book = item.get("book")
            # Books are written ahead: a sidecar is never told one the apiserver lacks.
            assert book is None or book in self.books.written_books()
            self.books_seen.append(book)
        self.tracker.on_lease(data)

    def send(self, message: dict[str, Any]) -> None:
        self.up.append(orjson.dumps(message))

    async def open(self) -> None:
        self.tracker.attach(self.send)
        await self.books.service.connect(self.session)
        await self.drain()

    def close(self) -> None:
        self.tracker.detach()
        self.books.service.disconnect(self.session)

    async def drain(self) -> None:
        for _ in range(50):
            if not self.up:
                return
            await self.books.service.usage(self.session, orjson.loads(self.up.pop(0)))


DAILY = [SpendBudget(name="daily", enforce=True)]


async def spend(wire: Wire, amount: float) -> None:
    reserving = asyncio.create_task(wire.tracker.reserve(DAILY, "gpt", amount))
    for _ in range(100):
        await wire.drain()
        await asyncio.sleep(0)
        if reserving.done():
            break
    wire.tracker.settle(await reserving, amount, None)
    wire.tracker.flush()
    await wire.drain()


async def test_a_sidecar_is_told_its_book_only_once_written_and_names_it() -> None:
    books = Books()
    tracker = SpendTracker("pod-a")
    wire = Wire(books, tracker)
    await wire.open()

    entry = books.ledger.holders[tracker.holder]
    assert tracker.lease("daily").book == entry.book
    assert wire.books_seen[0] == entry.book  # in the greeting, after the write
    assert entry.confirmed  # its next report named the book
    await spend(wire, 0.5)
    assert books.ledger.spent == pytest.approx(0.5)
    assert books.written[-1]["leases"][0]["book"] == entry.book


async def test_while_status_cannot_be_written_no_book_is_sent_then_a_tick_sends_it() -> None:
    books = Books()
    books.down = True
    tracker = SpendTracker("pod-a")
    wire = Wire(books, tracker)
    await wire.open()
    assert tracker.lease("daily").book is None and set(wire.books_seen) == {None}

    books.down = False
    await books.service.tick()
    await wire.drain()
    entry = books.ledger.holders[tracker.holder]
    assert tracker.lease("daily").book == entry.book and entry.confirmed


async def test_a_sidecar_pruned_while_away_starts_anew_and_nothing_counts_twice() -> None:
    books = Books()
    tracker = SpendTracker("pod-a", idle_return_seconds=0.0)
    first = Wire(books, tracker)
    await first.open()
    await spend(first, 0.75)
    old_book = tracker.lease("daily").book
    tracker.flush()  # idle: everything not spent goes back
    await first.drain()
    first.close()
    assert books.ledger.holders[tracker.holder].outstanding == pytest.approx(0.0)

    books.clock.now = LATER
    await books.service.tick()
    assert tracker.holder not in books.ledger.holders
    assert books.ledger.pruned.holders == 1
    assert books.written[-1]["leases"] == []
    assert books.written[-1]["pruned"]["settledUSD"] == pytest.approx(0.75)

    # Back again: its resync repeats everything under the old book, and counts nothing.
    second = Wire(books, tracker)
    await second.open()
    lease = tracker.lease("daily")
    assert lease.book is not None and lease.book != old_book
    assert (lease.granted, lease.settled, lease.returned) == (0.0, 0.0, 0.0)
    assert books.ledger.spent == pytest.approx(0.75)
    await spend(second, 0.5)
    await spend(second, 0.25)
    assert books.ledger.spent == pytest.approx(1.5)
    entry = books.ledger.holders[tracker.holder]
    assert (entry.book, entry.confirmed) == (lease.book, True)
    assert entry.settled == pytest.approx(0.75)
