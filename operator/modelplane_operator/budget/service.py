"""The operator's budget books: ledgers per Budget, tied to the config stream and to status.

Sidecars send `usage` messages (cumulative per period: granted, settled, returned, per-endpoint
spend and tokens, and optionally how much more they want); the service applies them to the
Budget's ledger and answers each with a `lease` message. Grants are *written ahead*: the Budget's
status (which lists every holder's cumulative amounts) is written to the API server before the
grant is sent, so a restarted operator can never hand out money an earlier one already granted.
Settled spend is written at most once a second. When a request cannot be granted because other
sidecars hold idle leases, those are recalled (they return what they do not need) before the
answer is given. Period rollovers start new ledgers and tell every sidecar. Every second, holders
disconnected past a grace period are pruned from the ledgers (ledger.py says why that is safe),
so a Budget's status lists the sidecar processes of the period that still matter, not all of them.
Holder books are written ahead like grants: a lease message names a holder's book only once a
status holding it is stored.

The controller owns the Budget objects: it calls `sync()` on every reconcile, asks `status()` for
the ledger's part of each Budget's status, and is told through the callbacks when a status write
is due, when a budget's mode changed (a recompile ships it to the sidecars) and when a threshold
was passed (an Event).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Gauge
from pydantic import ValidationError

from modelplane_sidecar.config import BudgetMode
from modelplane_sidecar.spend import LEASE, EndpointUsage

from ..crd_models import BudgetSpec
from .ledger import (
    EPSILON,
    PRUNE_GRACE_SECONDS,
    PRUNE_SOFT_LIMIT,
    BudgetLedger,
    Report,
    Terms,
    Threshold,
)
from .period import epoch

log = logging.getLogger("modelplane.operator.budget")

#: How long a request that needs a recall waits for the recalled sidecars' answers.
RECALL_WAIT_SECONDS = 0.5
#: Settled spend is written to status at most this often (grants are written before sending).
STATUS_INTERVAL_SECONDS = 1.0

Send = Callable[[bytes], Awaitable[None]]
Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(eq=False)
class SpendSession:
    """One connected sidecar process as the budget books see it."""

    namespace: str
    holder: str
    send: Send


@dataclass
class _Parked:
    session: SpendSession
    budget: str
    want: float
    seq: int
    deadline: float
    #: Recalled holders that have not answered the recall yet, and the recall's id.
    waiting_on: set[str] = field(default_factory=set)
    recall: int = 0


@dataclass
class _Writer:
    """Coalesces status writes: a caller waits for a write that started after its change."""

    write: Callable[[], Awaitable[None]]
    _next: asyncio.Future[None] | None = None
    _running: bool = False
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def flush(self) -> None:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
        future = self._next
        if not self._running:
            self._running = True
            task = loop.create_task(self._run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.shield(future)

    async def _run(self) -> None:
        try:
            while self._next is not None:
                future, self._next = self._next, None
                try:
                    await self.write()
                except Exception as exc:  # reported to every waiter of this write
                    if not future.done():
                        future.set_exception(exc)
                    future.exception()  # the waiters raise it; never "never retrieved"
                else:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._running = False


class BudgetMetrics:
    """Operator-side gauges, per namespace and budget (docs/budgets.md)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        labels = ["namespace", "budget"]
        self.limit = Gauge(
            "modelplane_operator_budget_limit_usd", "Budget limit per period.", labels, registry=r
        )
        self.spent = Gauge(
            "modelplane_operator_budget_spent_usd",
            "Settled spend in the current period, as the sidecars reported it.",
            labels,
            registry=r,
        )
        self.leased = Gauge(
            "modelplane_operator_budget_leased_usd",
            "Spend leases granted to sidecars and not yet settled or returned.",
            labels,
            registry=r,
        )
        self.remaining = Gauge(
            "modelplane_operator_budget_remaining_usd",
            "Limit minus spent minus leased, for the current period.",
            labels,
            registry=r,
        )
        self.threshold = Gauge(
            "modelplane_operator_budget_threshold_reached",
            "1 when the budget's spend has passed the threshold this period, else 0.",
            [*labels, "percent", "action"],
            registry=r,
        )
        self.endpoint_spent = Gauge(
            "modelplane_operator_budget_endpoint_spent_usd",
            "Settled spend in the current period per endpoint in the budget's scope.",
            [*labels, "endpoint"],
            registry=r,
        )
        self.endpoint_tokens = Gauge(
            "modelplane_operator_budget_endpoint_tokens",
            "Tokens in the current period per endpoint in the budget's scope.",
            [*labels, "endpoint", "direction"],
            registry=r,
        )
        self.holders = Gauge(
            "modelplane_operator_budget_lease_holders",
            "Sidecar processes listed in the budget's status.leases (pruned ones are not).",
            labels,
            registry=r,
        )
        self.pruned = Gauge(
            "modelplane_operator_budget_pruned_holders",
            "Sidecar processes of the current period folded out of status.leases.",
            labels,
            registry=r,
        )

    def update(self, namespace: str, ledger: BudgetLedger) -> None:
        key = (namespace, ledger.name)
        self.limit.labels(*key).set(ledger.terms.limit)
        self.spent.labels(*key).set(ledger.spent)
        self.leased.labels(*key).set(ledger.leased)
        self.remaining.labels(*key).set(ledger.remaining)
        self.holders.labels(*key).set(len(ledger.holders))
        self.pruned.labels(*key).set(ledger.pruned.holders)
        passed = set(ledger.reached())
        for t in ledger.terms.thresholds:
            self.threshold.labels(*key, str(t.percent), t.action.value).set(1 if t in passed else 0)
        for name, usage in ledger.endpoints.items():
            self.endpoint_spent.labels(*key, name).set(usage.usd)
            tokens = self.endpoint_tokens
            tokens.labels(*key, name, "input").set(usage.input_tokens)
            tokens.labels(*key, name, "output").set(usage.output_tokens)
            tokens.labels(*key, name, "cached_input").set(usage.cached_input_tokens)

    def forget(self, namespace: str, ledger: BudgetLedger) -> None:
        key = (namespace, ledger.name)
        for gauge in (
            self.limit,
            self.spent,
            self.leased,
            self.remaining,
            self.holders,
            self.pruned,
        ):
            gauge.remove(*key)
        for t in ledger.terms.thresholds:
            self.threshold.remove(*key, str(t.percent), t.action.value)
        for name in ledger.endpoints:
            self.endpoint_spent.remove(*key, name)
            for direction in ("input", "output", "cached_input"):
                self.endpoint_tokens.remove(*key, name, direction)


class BudgetService:
    def __init__(
        self,
        *,
        persist: Callable[[str, str], Awaitable[None]] | None = None,
        mode_changed: Callable[[str], None] | None = None,
        threshold_passed: Callable[[str, str, Threshold, BudgetLedger], None] | None = None,
        clock: Clock = _utcnow,
        metrics: BudgetMetrics | None = None,
        recall_wait_seconds: float = RECALL_WAIT_SECONDS,
        status_interval_seconds: float = STATUS_INTERVAL_SECONDS,
        prune_grace_seconds: float = PRUNE_GRACE_SECONDS,
        prune_soft_limit: int = PRUNE_SOFT_LIMIT,
    ) -> None:
        #: Writes the Budget's status (namespace, name); the controller's.
        self.persist = persist
        self.mode_changed = mode_changed
        self.threshold_passed = threshold_passed
        self.metrics = metrics or BudgetMetrics()
        self._clock = clock
        self._recall_wait = recall_wait_seconds
        self._status_interval = status_interval_seconds
        self._prune_grace = prune_grace_seconds
        self._prune_soft_limit = prune_soft_limit
        self._ledgers: dict[str, dict[str, BudgetLedger]] = {}
        self._sessions: dict[str, set[SpendSession]] = {}
        self._writers: dict[tuple[str, str], _Writer] = {}
        self._parked: list[_Parked] = []
        self._recalls = 0
        self._dirty: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None

    # --- books -----------------------------------------------------------------------------

    def ledger(self, namespace: str, name: str) -> BudgetLedger | None:
        return self._ledgers.get(namespace, {}).get(name)

    def ledgers(self, namespace: str) -> dict[str, BudgetLedger]:
        return dict(self._ledgers.get(namespace, {}))

    def sync(self, namespace: str, budgets: Iterable[Mapping[str, Any]]) -> None:
        """The namespace's Budget objects now (bodies as the API server has them).

        New ones get a ledger (restored from their status when it is for the current period),
        edited ones new terms, deleted ones are dropped. Invalid specs get no ledger.
        """
        now = self._clock()
        books = self._ledgers.setdefault(namespace, {})
        seen: set[str] = set()
        for body in budgets:
            name = str((body.get("metadata") or {}).get("name"))
            try:
                terms = Terms.from_spec(BudgetSpec.model_validate(body.get("spec") or {}))
                ledger = books.get(name)
                if ledger is None:
                    ledger = BudgetLedger(name, terms, now)
                    if ledger.restore(body.get("status") or {}, now):
                        log.info(
                            "budget %s/%s: restored %.6f USD spent and %d leases of period %s",
                            namespace,
                            name,
                            ledger.spent,
                            len(ledger.holders),
                            ledger.epoch,
                        )
                    for session in self._sessions.get(namespace, ()):
                        ledger.connect(session.holder)
                    books[name] = ledger
                    self._dirty.add((namespace, name))
                elif terms != ledger.terms:
                    ledger.set_terms(terms, now)
                    self._dirty.add((namespace, name))
            except (ValidationError, ValueError):
                continue
            seen.add(name)
        for name in set(books) - seen:
            self.metrics.forget(namespace, books.pop(name))
        for ledger in books.values():
            self.metrics.update(namespace, ledger)
        if not books:
            self._ledgers.pop(namespace, None)

    def spent(self, namespace: str) -> dict[str, float]:
        return {name: ledger.spent for name, ledger in self._ledgers.get(namespace, {}).items()}

    def status(self, namespace: str, name: str) -> dict[str, Any] | None:
        ledger = self.ledger(namespace, name)
        return ledger.status() if ledger is not None else None

    # --- the stream ------------------------------------------------------------------------

    async def connect(self, session: SpendSession) -> None:
        """A sidecar that speaks the spend protocol connected: tell it every budget's period,
        and its book in each (written to status first, when the entry is new)."""
        self._sessions.setdefault(session.namespace, set()).add(session)
        books = self._ledgers.get(session.namespace, {})
        for ledger in books.values():
            ledger.connect(session.holder)
        new = [name for name, ledger in books.items() if not ledger.holders[session.holder].written]
        if new:
            try:
                await self._persist_all(session.namespace, sorted(new))
            except Exception as exc:  # greeted without a book; the ticker writes and sends it
                log.warning("status of %s not written for a new holder: %s", session.namespace, exc)
                self._dirty.update((session.namespace, name) for name in new)
        # No grant amounts yet: the sidecar's resync (already on its way) says what it holds,
        # and the books follow it; an amount sent now could be one it never received.
        await self._send(session, None, {}, grants=False)

    def disconnect(self, session: SpendSession) -> None:
        sessions = self._sessions.get(session.namespace)
        if sessions is not None:
            sessions.discard(session)
        now = self._clock()
        for name, ledger in self._ledgers.get(session.namespace, {}).items():
            ledger.disconnect(session.holder, now)
            self._dirty.add((session.namespace, name))
        self._parked = [p for p in self._parked if p.session is not session]

    async def usage(self, session: SpendSession, message: Mapping[str, Any]) -> None:
        """Apply a usage message, grant what it asks for, and answer with a lease message."""
        seq = message.get("seq")
        seq = seq if isinstance(seq, int) else None
        resync = bool(message.get("resync"))
        books = self._ledgers.get(session.namespace, {})
        wants: dict[str, float] = {}
        for item in message.get("budgets") or []:
            if not isinstance(item, dict):
                continue
            ledger = books.get(str(item.get("budget")))
            if ledger is None:
                continue
            self._apply(session, ledger, item, resync)
            want = item.get("wantUSD")
            if isinstance(want, int | float) and not isinstance(want, bool):
                wants[ledger.name] = max(0.0, float(want))
        answered = message.get("recalled")
        if isinstance(answered, int):
            # This sidecar has acted on every recall up to `answered`.
            for parked in self._parked:
                if parked.recall <= answered:
                    parked.waiting_on.discard(session.holder)
        await self._retry_parked(session.namespace)
        if not wants:
            if seq is not None:
                await self._send(session, seq, {})
            return
        grants: list[tuple[BudgetLedger, str, float]] = []
        exhausted: dict[str, bool] = {}
        recall: dict[str, list[str]] = {}
        for name, want in wants.items():
            ledger = books[name]
            amount = ledger.grant(session.holder, want)
            if amount > EPSILON:
                grants.append((ledger, session.holder, amount))
            if amount + EPSILON < want or (amount <= EPSILON and ledger.terms.enforced):
                others = ledger.idle_holders(besides=session.holder)
                if others and seq is not None:
                    recall[name] = others
                else:
                    exhausted[name] = True
        if not await self._durably(session.namespace, grants):
            exhausted = {}  # nothing was granted; the sidecar asks again
            recall = {}
        for name, others in recall.items():
            self._recalls += 1
            self._park(session, name, wants[name], seq or 0, others, self._recalls)
            await self._recall(session.namespace, name, others, self._recalls)
        if seq is not None and recall and set(recall) == set(wants):
            return  # the answer waits for the recalled leases (or the deadline)
        await self._send(session, seq, exhausted, skip=set(recall))

    async def _durably(self, namespace: str, grants: list[tuple[BudgetLedger, str, float]]) -> bool:
        """Write the grants to status before they are sent; undo them when that fails."""
        if not grants:
            return True
        try:
            await self._persist_all(namespace, sorted({ledger.name for ledger, _, _ in grants}))
        except Exception as exc:  # the API server is away: grant nothing rather than unbooked
            log.warning("spend lease not granted: status of %s not written: %s", namespace, exc)
            for ledger, holder, amount in grants:
                found = ledger.holders.get(holder)
                if found is not None:
                    found.granted -= amount
            return False
        for ledger, _, _ in grants:
            self.metrics.update(namespace, ledger)
        return True

    def _apply(
        self, session: SpendSession, ledger: BudgetLedger, item: Mapping[str, Any], resync: bool
    ) -> None:
        epoch = item.get("epoch")
        endpoints = item.get("endpoints")
        book = item.get("book")
        report = Report(
            epoch=epoch if isinstance(epoch, str) else ledger.epoch,
            settled=_money(item.get("settledUSD")),
            returned=_money(item.get("returnedUSD")),
            granted=_money(item.get("grantedUSD")),
            endpoints={
                str(name): EndpointUsage.from_wire(totals)
                for name, totals in (endpoints.items() if isinstance(endpoints, dict) else [])
                if isinstance(totals, dict)
            },
            resync=resync,
            book=book if isinstance(book, str) else None,
        )
        mode_before = ledger.mode()
        passed = ledger.report(session.holder, report)
        self._dirty.add((session.namespace, ledger.name))
        self.metrics.update(session.namespace, ledger)
        for threshold in passed:
            log.warning(
                "budget %s/%s passed %d%% (%s): %.6f of %.2f USD spent",
                session.namespace,
                ledger.name,
                threshold.percent,
                threshold.action.value,
                ledger.spent,
                ledger.terms.limit,
            )
            if self.threshold_passed is not None:
                self.threshold_passed(session.namespace, ledger.name, threshold, ledger)
        if ledger.mode() != mode_before and self.mode_changed is not None:
            self.mode_changed(session.namespace)

    def _park(
        self,
        session: SpendSession,
        budget: str,
        want: float,
        seq: int,
        recalled: list[str],
        recall: int,
    ) -> None:
        deadline = asyncio.get_running_loop().time() + self._recall_wait
        self._parked.append(_Parked(session, budget, want, seq, deadline, set(recalled), recall))
        task = asyncio.get_running_loop().create_task(self._expire_later(self._recall_wait))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._retry_parked(None, expire=True)

    async def _retry_parked(self, namespace: str | None, expire: bool = False) -> None:
        """Grant parked requests what recalls freed; answer those that are done or expired."""
        if not self._parked:
            return
        now = asyncio.get_running_loop().time()
        keep: list[_Parked] = []
        answer: list[tuple[_Parked, bool]] = []
        grants: dict[str, list[tuple[BudgetLedger, str, float]]] = {}
        for parked in self._parked:
            ns = parked.session.namespace
            if namespace is not None and ns != namespace:
                keep.append(parked)
                continue
            ledger = self.ledger(ns, parked.budget)
            if ledger is None:
                answer.append((parked, True))
                continue
            amount = ledger.grant(parked.session.holder, parked.want)
            if amount > EPSILON:
                grants.setdefault(ns, []).append((ledger, parked.session.holder, amount))
            parked.want -= amount
            if parked.want <= EPSILON:
                answer.append((parked, False))
            elif not parked.waiting_on or now >= parked.deadline - 1e-3:
                # Every recalled sidecar answered (or the wait is over) and it still does not fit.
                answer.append((parked, True))
            else:
                keep.append(parked)
        self._parked = keep
        for ns, ns_grants in sorted(grants.items(), key=lambda item: item[0]):
            if not await self._durably(ns, ns_grants):
                answer = [(p, False) for p, _ in answer]
        for parked, exhausted in answer:
            await self._send(parked.session, parked.seq, {parked.budget: exhausted})

    async def _recall(self, namespace: str, budget: str, holders: list[str], recall: int) -> None:
        wanted = set(holders)
        for session in list(self._sessions.get(namespace, ())):
            if session.holder in wanted:
                await self._send(session, None, {}, recall={budget}, recall_id=recall)

    async def _send(
        self,
        session: SpendSession,
        ack: int | None,
        exhausted: Mapping[str, bool],
        *,
        recall: set[str] | None = None,
        skip: set[str] | None = None,
        recall_id: int | None = None,
        grants: bool = True,
    ) -> None:
        items = []
        for name, ledger in sorted(self._ledgers.get(session.namespace, {}).items()):
            if skip and name in skip:
                continue
            holder = ledger.holders.get(session.holder)
            mode, tier = ledger.mode()
            item: dict[str, Any] = {
                "budget": name,
                "epoch": ledger.epoch,
                "periodEnd": epoch(ledger.end),
                "grantedUSD": round(holder.granted, 12) if holder is not None else 0.0,
                "remainingUSD": round(ledger.remaining, 12),
                "mode": "block" if mode is BudgetMode.STOP else mode.value,
                "enforce": ledger.terms.enforced,
            }
            if not grants:
                del item["grantedUSD"]
            if holder is not None and holder.written:
                item["book"] = holder.book
            if tier is not None:
                item["tier"] = tier.value
            if exhausted.get(name):
                item["exhausted"] = True
            if recall and name in recall:
                item["recall"] = True
            items.append(item)
        message: dict[str, Any] = {"type": LEASE, "budgets": items}
        if ack is not None:
            message["ack"] = ack
        if recall_id is not None:
            message["recallId"] = recall_id
        try:
            await session.send(orjson.dumps(message))
        except (ConnectionError, RuntimeError) as exc:
            log.info("lease message to %s failed: %s", session.holder, exc)

    async def _persist_all(self, namespace: str, names: Iterable[str]) -> set[str]:
        """Write these Budgets' status now (grants are sent only after this returns).

        Returns the holders whose book this made known to the apiserver (and so sendable).
        """
        newly: set[str] = set()
        for name in names:
            key = (namespace, name)
            ledger = self.ledger(namespace, name)
            unwritten = [h for h in ledger.holders.values() if not h.written] if ledger else []
            if self.persist is not None:
                writer = self._writers.get(key)
                if writer is None:
                    writer = self._writers[key] = _Writer(self._write_call(namespace, name))
                self._dirty.discard(key)
                await writer.flush()  # a write that started after this call: it holds them
            for holder in unwritten:
                holder.written = True
                newly.add(holder.id)
        return newly

    def _write_call(self, namespace: str, name: str) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            assert self.persist is not None
            await self.persist(namespace, name)

        return write

    # --- time ------------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def close(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self._status_interval)
            try:
                await self.tick()
            except Exception:  # a bad tick must not end the ticker; the next one retries
                log.exception("budget tick failed")

    async def tick(self) -> None:
        """Roll periods over, prune idle holders, and write the status of budgets whose books
        changed (then tell sidecars the books that write made sendable)."""
        now = self._clock()
        for namespace, books in list(self._ledgers.items()):
            rolled = [ledger for ledger in books.values() if ledger.rollover(now)]
            for ledger in rolled:
                log.info("budget %s/%s: new period %s", namespace, ledger.name, ledger.epoch)
                self._dirty.add((namespace, ledger.name))
                self.metrics.update(namespace, ledger)
            if rolled:
                if self.mode_changed is not None:
                    self.mode_changed(namespace)
                for session in list(self._sessions.get(namespace, ())):
                    await self._send(session, None, {})
            for ledger in books.values():
                folded = ledger.prune(now, self._prune_grace, self._prune_soft_limit)
                if folded:
                    log.info(
                        "budget %s/%s: %d disconnected holders folded (%d in this period)",
                        namespace,
                        ledger.name,
                        folded,
                        ledger.pruned.holders,
                    )
                    self._dirty.add((namespace, ledger.name))
                    self.metrics.update(namespace, ledger)
        dirty, self._dirty = sorted(self._dirty), set()
        told: dict[str, set[str]] = {}
        for namespace, name in dirty:
            if self.ledger(namespace, name) is None:
                continue
            try:
                told.setdefault(namespace, set()).update(await self._persist_all(namespace, [name]))
            except Exception as exc:  # kept dirty: the next tick writes again
                log.warning("status of budget %s/%s not written: %s", namespace, name, exc)
                self._dirty.add((namespace, name))
        for namespace, holders in sorted(told.items()):
            for session in list(self._sessions.get(namespace, ())):
                if session.holder in holders:
                    # Its book is sendable now; no amounts (a grant may be mid-write).
                    await self._send(session, None, {}, grants=False)


def _money(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0
