"""One Budget's books for the current period: spent, leases, thresholds. Pure, no I/O.

Money moves in two steps. The operator *grants* a sidecar (a holder) a slice of what is left; the
sidecar reserves each request's worst-case cost from its slice before calling, and reports the
*settled* actual cost afterwards (and *returns* slices it does not need). Every amount a holder
reports is cumulative for the period, so a report that is lost or repeated changes nothing, and
a holder's outstanding lease is `granted - settled - returned`.

The invariant the grant policy keeps is

    spent + sum(max(0, outstanding_h)) <= cap          (cap = limit x block% / 100)

so what the whole fleet can commit is never more than the cap, whatever the concurrency: a request
is only sent when its worst case fits in its sidecar's lease. The overspend past the cap is at
most the sum, over settled requests, of (actual - reserved)^+ (docs/budgets.md).

A holder that disconnects keeps its outstanding lease counted (its in-flight requests may still
be billed) until it comes back with the same holder id and reports, or the period ends.

Holders are one per sidecar process, so their list would grow for the whole period. A holder
that has been disconnected longer than a grace period, and whose lease is fully accounted for
(settled plus returned covers what it was granted), is *pruned*: folded into one aggregate
(`pruned`), its spend already being in `spent`. What keeps a repeated report from counting twice
across pruning is the holder's *book*: a nonce the operator gives each holder entry (written to
status before any sidecar is told it), which the sidecar names in its reports. A report naming a
book the ledger no longer has is from a pruned entry and counts nothing; the sidecar is told its
new book and starts that one's cumulative amounts from zero, like a new period. A report naming
no book (the sidecar has not learned one yet) counts against the holder's entry as before, so an
entry whose amounts came from such reports is only pruned once the sidecar has named its book.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelplane_sidecar.config import BudgetMode, Tier
from modelplane_sidecar.spend import EndpointUsage

from ..crd_models import BudgetAction, BudgetSpec
from .period import epoch, period_bounds

#: Amounts below this are rounding noise (1e-9 USD).
EPSILON = 1e-9
#: A blocking Budget's default largest lease, as a share of its cap.
DEFAULT_LEASE_SHARE = 0.02


def _money(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


def _count(value: object) -> int:
    return int(value) if isinstance(value, int | float) and value > 0 else 0


#: A pruned holder's lease is folded only after it has been disconnected this long.
PRUNE_GRACE_SECONDS = 600.0
#: Past this many holders, disconnected ones past the grace period are folded even with lease
#: outstanding (it stays counted as leased until the period ends), so status stays bounded.
PRUNE_SOFT_LIMIT = 1024


def new_book() -> str:
    """A holder entry's nonce: never the same twice for one holder in one period."""
    return secrets.token_hex(6)


@dataclass(slots=True)
class Holder:
    """One sidecar process's lease in this period (amounts cumulative)."""

    id: str
    granted: float = 0.0
    settled: float = 0.0
    returned: float = 0.0
    connected: bool = False
    #: What this holder reported per endpoint (to turn cumulative reports into deltas).
    endpoints: dict[str, EndpointUsage] = field(default_factory=dict)
    #: This entry's nonce; reports naming another book are from a pruned entry.
    book: str = field(default_factory=new_book)
    #: The book is in a status the apiserver stored: only then may a sidecar be told it.
    written: bool = False
    #: The sidecar named the book in a report: it will never report without one again.
    confirmed: bool = False
    #: When it disconnected (None while connected).
    disconnected_at: dt.datetime | None = None

    @property
    def outstanding(self) -> float:
        return self.granted - self.settled - self.returned

    @property
    def counted_nothing(self) -> bool:
        """No report of it changed the books (so none can be counted twice)."""
        return self.settled <= EPSILON and self.returned <= EPSILON and not self.endpoints

    def prunable(self, now: dt.datetime, grace: float) -> bool:
        """Disconnected past the grace period, and its process can never count again here:
        it knows the book (a late report is recognised) or nothing of it was counted."""
        if self.connected or self.disconnected_at is None:
            return False
        if (now - self.disconnected_at).total_seconds() < grace:
            return False
        return self.confirmed or self.counted_nothing


@dataclass(slots=True)
class Pruned:
    """What the holders folded out of the list in this period amounted to (cumulative)."""

    holders: int = 0
    granted: float = 0.0
    settled: float = 0.0
    returned: float = 0.0
    #: Their leases outstanding when folded: counted as leased until the period ends.
    leased: float = 0.0


@dataclass(frozen=True, slots=True)
class Report:
    """One budget's part of a holder's usage message (cumulative amounts for `epoch`)."""

    epoch: str
    settled: float
    returned: float
    #: What the holder has received in grants; trusted only on `resync` (a new connection).
    granted: float
    endpoints: Mapping[str, EndpointUsage]
    resync: bool = False
    #: The holder entry's book the amounts belong to; None: the sidecar has not learned one.
    book: str | None = None


@dataclass(frozen=True, slots=True)
class Threshold:
    percent: int
    action: BudgetAction
    tier: Tier | None

    @property
    def blocks(self) -> bool:
        return self.action in (BudgetAction.BLOCK, BudgetAction.HARD_STOP)


@dataclass(frozen=True, slots=True)
class Terms:
    """What a Budget's spec says, in the ledger's terms."""

    limit: float
    period: Any  # BudgetPeriod
    timezone: str
    thresholds: tuple[Threshold, ...]
    max_output_tokens: int = 4096
    lease_usd: float | None = None

    @classmethod
    def from_spec(cls, spec: BudgetSpec) -> Terms:
        thresholds = tuple(
            sorted(
                (Threshold(t.percent, t.action, t.tier) for t in spec.thresholds),
                key=lambda t: (t.percent, t.action.value),
            )
        )
        return cls(
            spec.limit_usd,
            spec.period,
            spec.timezone,
            thresholds,
            spec.max_output_tokens,
            spec.lease_usd,
        )

    @property
    def enforced(self) -> bool:
        """Spend needs leases only when some threshold blocks."""
        return any(t.blocks for t in self.thresholds)

    @property
    def cap(self) -> float:
        """What the fleet may commit in a period: the limit at the lowest blocking threshold."""
        blocking = [t.percent for t in self.thresholds if t.blocks]
        return self.limit * min(blocking) / 100 if blocking else self.limit

    @property
    def lease_cap(self) -> float:
        return self.lease_usd if self.lease_usd is not None else self.cap * DEFAULT_LEASE_SHARE


def reached(terms: Terms, spent: float) -> list[Threshold]:
    """Thresholds `spent` has passed, lowest first."""
    return [t for t in terms.thresholds if spent + EPSILON >= terms.limit * t.percent / 100]


def mode_for(terms: Terms, spent: float) -> tuple[BudgetMode, Tier | None]:
    """What the sidecars should do: block once the cap is spent, else the last downgrade."""
    passed = reached(terms, spent)
    if any(t.blocks for t in passed):
        return BudgetMode.STOP, None
    downgrades = [t for t in passed if t.action is BudgetAction.DOWNGRADE]
    if downgrades:
        return BudgetMode.DOWNGRADE, downgrades[-1].tier
    return BudgetMode.NORMAL, None


class BudgetLedger:
    def __init__(self, name: str, terms: Terms, now: dt.datetime) -> None:
        self.name = name
        self.terms = terms
        self.start, self.end = period_bounds(terms.period, terms.timezone, now)
        self.epoch = epoch(self.start)
        self.spent = 0.0
        self.endpoints: dict[str, EndpointUsage] = {}
        self.holders: dict[str, Holder] = {}
        self.pruned = Pruned()
        self._created = now

    # --- state -----------------------------------------------------------------------------

    @property
    def leased(self) -> float:
        held = sum(max(0.0, h.outstanding) for h in self.holders.values())
        return held + self.pruned.leased

    @property
    def committed(self) -> float:
        return self.spent + self.leased

    @property
    def free(self) -> float:
        """What can still be granted without breaking the invariant."""
        return max(0.0, self.terms.cap - self.committed)

    @property
    def remaining(self) -> float:
        return max(0.0, self.terms.limit - self.committed)

    def percent_spent(self) -> float:
        return 100.0 * self.spent / self.terms.limit

    def reached(self) -> list[Threshold]:
        """Thresholds the settled spend has passed this period, lowest first."""
        return reached(self.terms, self.spent)

    def mode(self) -> tuple[BudgetMode, Tier | None]:
        return mode_for(self.terms, self.spent)

    # --- changes ---------------------------------------------------------------------------

    def set_terms(self, terms: Terms, now: dt.datetime) -> None:
        """A spec edit: new limit or thresholds apply at once; a new period kind starts anew."""
        same_period = (terms.period, terms.timezone) == (self.terms.period, self.terms.timezone)
        self.terms = terms
        if not same_period:
            self._start_period(now)

    def rollover(self, now: dt.datetime) -> bool:
        """Start a new period when `now` is past this one; True when it did."""
        if now < self.end:
            return False
        self._start_period(now)
        return True

    def _start_period(self, now: dt.datetime) -> None:
        self.start, self.end = period_bounds(self.terms.period, self.terms.timezone, now)
        self.epoch = epoch(self.start)
        self.spent = 0.0
        self.endpoints = {}
        self.pruned = Pruned()
        # Leases of the old period are void; holders start again from zero (with new books).
        self.holders = {
            hid: Holder(hid, connected=h.connected)
            for hid, h in self.holders.items()
            if h.connected
        }

    def holder(self, holder_id: str) -> Holder:
        found = self.holders.get(holder_id)
        if found is None:
            found = self.holders[holder_id] = Holder(holder_id)
        return found

    def connect(self, holder_id: str) -> None:
        found = self.holder(holder_id)
        found.connected = True
        found.disconnected_at = None

    def disconnect(self, holder_id: str, now: dt.datetime) -> None:
        found = self.holders.get(holder_id)
        if found is None:
            return
        found.connected = False
        found.disconnected_at = now
        # Its cumulative amounts are kept (a report it repeats after reconnecting must not count
        # twice) until it is pruned; a holder that never had any, and whose book no sidecar can
        # know yet, is forgotten at once.
        if found.granted <= EPSILON and found.counted_nothing and not found.written:
            del self.holders[holder_id]

    def report(self, holder_id: str, report: Report) -> list[Threshold]:
        """Apply a holder's cumulative report; returns the thresholds it made spend pass."""
        if report.epoch != self.epoch:
            return []  # a past period's late settlement: that period is closed
        before = {t for t in self.reached()}
        h = self.holder(holder_id)
        h.connected = True
        h.disconnected_at = None
        if report.book is not None and report.book != h.book:
            # Amounts of a pruned entry: they were counted before it was folded. The sidecar
            # starts anew once told this entry's book; it never received any of its grants.
            if report.resync:
                h.granted = 0.0
            return []
        if report.book is not None:
            h.confirmed = True
        if report.resync:
            # A new connection: grants sent on the old one may never have arrived.
            h.granted = report.granted
        settled = max(h.settled, report.settled)
        self.spent += settled - h.settled
        h.settled = settled
        h.returned = max(h.returned, report.returned)
        for name, total in report.endpoints.items():
            seen = h.endpoints.get(name) or EndpointUsage()
            delta = total.minus(seen)
            self.endpoints.setdefault(name, EndpointUsage()).add(delta)
            seen.add(delta)
            h.endpoints[name] = seen
        return [t for t in self.reached() if t not in before]

    def grant(self, holder_id: str, want: float) -> float:
        """Grant `holder_id` a slice; at least `want` when that much is free, else what fits.

        The slice is a fair share of what is free (half of it split over the connected holders),
        at most the lease cap, but never less than `want` when `want` fits: a request whose worst
        case fits in the budget is never refused because slices are small.
        """
        if not self.terms.enforced:
            return 0.0
        free = self.free
        if free <= EPSILON:
            return 0.0
        active = max(1, sum(1 for h in self.holders.values() if h.connected))
        fair = min(free / (2 * active), self.terms.lease_cap)
        amount = min(free, max(want, fair))
        self.holder(holder_id).granted += amount
        return amount

    def prune(
        self,
        now: dt.datetime,
        grace: float = PRUNE_GRACE_SECONDS,
        soft_limit: int = PRUNE_SOFT_LIMIT,
    ) -> int:
        """Fold holders that can no longer change the books into `pruned`; how many were.

        Those past the grace period whose lease is fully accounted for go first (nothing of
        theirs is outstanding, so nothing is lost). Above `soft_limit` holders, those with lease
        outstanding follow, longest disconnected first: their outstanding lease stays counted
        (as `pruned.leased`), so the cap still holds; only that money is idle until the period
        ends, as it would be for a sidecar that never comes back.
        """
        candidates = [h for h in self.holders.values() if h.prunable(now, grace)]
        folded = [h for h in candidates if h.outstanding <= EPSILON]
        over = len(self.holders) - len(folded) - soft_limit
        if over > 0:
            held = [h for h in candidates if h.outstanding > EPSILON]
            held.sort(key=lambda h: (h.disconnected_at or now, h.id))
            folded.extend(held[:over])
        for h in folded:
            self.pruned.holders += 1
            self.pruned.granted += h.granted
            self.pruned.settled += h.settled
            self.pruned.returned += h.returned
            self.pruned.leased += max(0.0, h.outstanding)
            del self.holders[h.id]
        return len(folded)

    def idle_holders(self, besides: str) -> list[str]:
        """Connected holders with lease outstanding that a recall could free."""
        return [
            h.id
            for h in self.holders.values()
            if h.connected and h.id != besides and h.outstanding > EPSILON
        ]

    # --- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        mode, _ = self.mode()
        out: dict[str, Any] = {
            "spentUSD": _round(self.spent),
            "leasedUSD": _round(self.leased),
            "remainingUSD": _round(self.remaining),
            "periodStart": self.epoch,
            "periodEnd": epoch(self.end),
            "thresholdsReached": sorted({t.percent for t in self.reached()}),
            "mode": "block" if mode is BudgetMode.STOP else mode.value,
            "endpoints": _endpoint_list(self.endpoints),
            "leases": [_lease(h) for h in sorted(self.holders.values(), key=lambda h: h.id)],
        }
        if self.pruned.holders:
            out["pruned"] = {
                "holders": self.pruned.holders,
                "grantedUSD": _round(self.pruned.granted),
                "settledUSD": _round(self.pruned.settled),
                "returnedUSD": _round(self.pruned.returned),
                "leasedUSD": _round(self.pruned.leased),
            }
        return out

    def restore(self, status: Mapping[str, Any], now: dt.datetime | None = None) -> bool:
        """Take over the books a previous operator wrote, if they are for this period.

        Holders come back disconnected: their outstanding leases stay counted until they
        reconnect and report (or the period ends); their cumulative amounts and books are kept,
        so a report they send again is not counted twice. A holder without a disconnection time
        counts as disconnected from `now` (default: when this ledger was made).
        """
        if status.get("periodStart") != self.epoch:
            return False
        self.spent = _money(status.get("spentUSD"))
        self.endpoints = _endpoint_map(status.get("endpoints"))
        self.holders = {}
        for lease in _dicts(status.get("leases")):
            hid = lease.get("holder")
            if not isinstance(hid, str):
                continue
            book = lease.get("book")
            holder = Holder(
                hid,
                granted=_money(lease.get("grantedUSD")),
                settled=_money(lease.get("settledUSD")),
                returned=_money(lease.get("returnedUSD")),
                endpoints=_endpoint_map(lease.get("endpoints")),
                disconnected_at=_time(lease.get("disconnectedAt")) or now or self._created,
            )
            if isinstance(book, str) and book:
                # Written (this is the status), so its sidecar may know it.
                holder.book, holder.written = book, True
                holder.confirmed = lease.get("confirmed") is True
            self.holders[hid] = holder
        pruned = status.get("pruned")
        pruned = pruned if isinstance(pruned, dict) else {}
        self.pruned = Pruned(
            _count(pruned.get("holders")),
            _money(pruned.get("grantedUSD")),
            _money(pruned.get("settledUSD")),
            _money(pruned.get("returnedUSD")),
            _money(pruned.get("leasedUSD")),
        )
        return True


def _lease(h: Holder) -> dict[str, Any]:
    out: dict[str, Any] = {
        "holder": h.id,
        "book": h.book,
        "grantedUSD": _round(h.granted),
        "settledUSD": _round(h.settled),
        "returnedUSD": _round(h.returned),
        "connected": h.connected,
        "confirmed": h.confirmed,
        "endpoints": _endpoint_list(h.endpoints),
    }
    if h.disconnected_at is not None:
        out["disconnectedAt"] = epoch(h.disconnected_at)
    return out


def _time(value: object) -> dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _dicts(value: object) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, dict)]
    return []


def _endpoint_list(usage: Mapping[str, EndpointUsage]) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "spentUSD": _round(u.usd),
            "inputTokens": u.input_tokens,
            "outputTokens": u.output_tokens,
            "cachedInputTokens": u.cached_input_tokens,
            "requests": u.requests,
        }
        for name, u in sorted(usage.items())
    ]


def _endpoint_map(value: object) -> dict[str, EndpointUsage]:
    return {
        str(e["name"]): EndpointUsage(
            _money(e.get("spentUSD")),
            _count(e.get("inputTokens")),
            _count(e.get("outputTokens")),
            _count(e.get("cachedInputTokens")),
            _count(e.get("requests")),
        )
        for e in _dicts(value)
        if isinstance(e.get("name"), str)
    }


def _round(value: float) -> float:
    return round(value, 9)
