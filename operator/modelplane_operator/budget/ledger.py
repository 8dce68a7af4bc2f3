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
"""

from __future__ import annotations

import datetime as dt
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

    @property
    def outstanding(self) -> float:
        return self.granted - self.settled - self.returned


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

    # --- state -----------------------------------------------------------------------------

    @property
    def leased(self) -> float:
        return sum(max(0.0, h.outstanding) for h in self.holders.values())

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
        # Leases of the old period are void; holders start again from zero.
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
        self.holder(holder_id).connected = True

    def disconnect(self, holder_id: str) -> None:
        found = self.holders.get(holder_id)
        if found is None:
            return
        found.connected = False
        # Its cumulative amounts are kept for the period (a report it repeats after reconnecting
        # must not count twice); only a holder that never had any is forgotten.
        if max(found.granted, found.settled, found.returned) <= EPSILON and not found.endpoints:
            del self.holders[holder_id]

    def report(self, holder_id: str, report: Report) -> list[Threshold]:
        """Apply a holder's cumulative report; returns the thresholds it made spend pass."""
        if report.epoch != self.epoch:
            return []  # a past period's late settlement: that period is closed
        before = {t for t in self.reached()}
        h = self.holder(holder_id)
        h.connected = True
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
        return {
            "spentUSD": _round(self.spent),
            "leasedUSD": _round(self.leased),
            "remainingUSD": _round(self.remaining),
            "periodStart": self.epoch,
            "periodEnd": epoch(self.end),
            "thresholdsReached": sorted({t.percent for t in self.reached()}),
            "mode": "block" if mode is BudgetMode.STOP else mode.value,
            "endpoints": _endpoint_list(self.endpoints),
            "leases": [
                {
                    "holder": h.id,
                    "grantedUSD": _round(h.granted),
                    "settledUSD": _round(h.settled),
                    "returnedUSD": _round(h.returned),
                    "connected": h.connected,
                    "endpoints": _endpoint_list(h.endpoints),
                }
                for h in sorted(self.holders.values(), key=lambda h: h.id)
            ],
        }

    def restore(self, status: Mapping[str, Any]) -> bool:
        """Take over the books a previous operator wrote, if they are for this period.

        Holders come back disconnected: their outstanding leases stay counted until they
        reconnect and report (or the period ends); their cumulative amounts are kept, so a
        report they send again is not counted twice.
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
            self.holders[hid] = Holder(
                hid,
                granted=_money(lease.get("grantedUSD")),
                settled=_money(lease.get("settledUSD")),
                returned=_money(lease.get("returnedUSD")),
                endpoints=_endpoint_map(lease.get("endpoints")),
            )
        return True


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
