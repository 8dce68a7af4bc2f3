"""Spend leases: the sidecar's side of distributed budget enforcement.

The operator grants this sidecar a slice of each blocking Budget's remaining money (a lease) over
the config stream. Before a call to an endpoint in a budget's scope, the forwarder reserves the
request's worst-case cost from the lease: (input upper bound x input price + max_tokens x output
price), with max_tokens forced into the upstream request when the app set none. After the call
the reservation is settled at the actual cost the provider reported (or kept whole when the cost
is unknown: a timeout, a broken stream, a vanished client), or released when the upstream
refused the call. So a request is sent only when its worst case fits in money the operator set
aside for this sidecar, and the fleet cannot commit more than the budget, whatever the
concurrency. When the lease runs low the tracker asks for more; when none can be had, the
request is refused with a 429 naming the budget.

Everything reported up the stream is cumulative for the budget's period (granted, settled,
returned, per-endpoint spend and tokens), so a lost or repeated report changes nothing.
docs/budgets.md describes the protocol and the overspend bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import Endpoint, Provider, SpendBudget
from .errors import ApiError
from .providers.base import Operation, Usage
from .routing.classify.text import RequestText, read_request

log = logging.getLogger("modelplane.sidecar.spend")

#: Message types of the spend protocol (docs/budgets.md). Sidecar -> operator: usage.
#: Operator -> sidecar: lease.
USAGE, LEASE = "usage", "lease"
#: Feature named in the hello by sidecars that speak the spend protocol.
SPEND_FEATURE = "spend/v1"

#: Below this a money amount is rounding noise.
EPSILON = 1e-9
#: After the operator said "exhausted", requests that do not fit are refused without asking
#: again for this long (a burst of refusals costs the operator nothing).
_EXHAUSTED_FRESH_SECONDS = 0.1
_RETRY_ASK_SECONDS = 0.05
#: Providers whose chat API wants max_completion_tokens (reasoning models refuse max_tokens).
_COMPLETION_TOKENS = {Provider.OPENAI, Provider.AZURE_OPENAI}


class BudgetRefusal(Exception):
    """No lease can cover this call's worst case; the message names the budget."""

    def __init__(self, budget: str, message: str) -> None:
        super().__init__(message)
        self.budget = budget
        self.message = message

    def error(self, headers: Mapping[str, str] | None = None) -> ApiError:
        return ApiError(
            429,
            self.message,
            type="insufficient_quota",
            code="budget_exhausted",
            headers=dict(headers or {}),
        )


def upstream_max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def with_max_tokens(
    body: dict[str, Any], op: Operation, provider: Provider, cap: int
) -> dict[str, Any]:
    """`body` with an output limit forced in when it has none (embeddings have no output)."""
    if op is Operation.EMBEDDINGS or upstream_max_tokens(body) is not None:
        return body
    key = (
        "max_completion_tokens"
        if op is Operation.CHAT and provider in _COMPLETION_TOKENS
        else "max_tokens"
    )
    return {**body, key: cap}


def input_token_bound(text: RequestText) -> int:
    """An upper bound of the prompt's tokens: every token of a byte-level BPE or SentencePiece
    tokenizer covers at least one byte of text, plus the estimate for framing, tools and images.
    """
    return len(text.full.encode()) + text.overhead_tokens


@dataclass(frozen=True, slots=True)
class CallPlan:
    """What a call to one endpoint reserves: in which budgets, how much, with which body."""

    budgets: list[SpendBudget]
    worst_case: float
    body: dict[str, Any]


def plan_call(
    budgets: Sequence[SpendBudget],
    endpoint: Endpoint,
    op: Operation,
    body: dict[str, Any],
    text: RequestText | None,
) -> CallPlan | None:
    """The budgets covering `endpoint` and the call's worst case; None when none covers it.

    When an enforcing budget covers the endpoint and the app set no output limit, the smallest
    `maxOutputTokens` of those budgets is forced into the body, so the worst case holds.
    """
    covering = [b for b in budgets if b.covers(endpoint.name)]
    if not covering:
        return None
    enforcing = [b for b in covering if b.enforce]
    if not enforcing:
        return CallPlan(covering, 0.0, body)
    cap = min(b.max_output_tokens for b in enforcing)
    body = with_max_tokens(body, op, endpoint.provider, cap)
    output = 0 if op is Operation.EMBEDDINGS else upstream_max_tokens(body) or cap
    if text is None:
        text = read_request(body)
    return CallPlan(covering, worst_case_usd(endpoint, input_token_bound(text), output), body)


def worst_case_usd(endpoint: Endpoint, input_tokens: int, output_tokens: int) -> float:
    """The most a call can cost at `endpoint`'s prices with these token bounds."""
    price = endpoint.pricing
    input_price = max(price.input_per_mtok, price.cached_input_per_mtok or 0.0)
    return (input_tokens * input_price + output_tokens * price.output_per_mtok) / 1_000_000


@dataclass(slots=True)
class EndpointUsage:
    """Spend and tokens on one endpoint, cumulative (the `endpoints` of a usage message)."""

    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    requests: int = 0

    def as_wire(self) -> dict[str, Any]:
        return {
            "usd": round(self.usd, 12),
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "cachedInputTokens": self.cached_input_tokens,
            "requests": self.requests,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> EndpointUsage:
        """Parsed leniently: anything missing, negative or not a number counts as 0."""
        return cls(
            usd=_positive(data.get("usd")),
            input_tokens=int(_positive(data.get("inputTokens"))),
            output_tokens=int(_positive(data.get("outputTokens"))),
            cached_input_tokens=int(_positive(data.get("cachedInputTokens"))),
            requests=int(_positive(data.get("requests"))),
        )

    def minus(self, other: EndpointUsage) -> EndpointUsage:
        return EndpointUsage(
            max(0.0, self.usd - other.usd),
            max(0, self.input_tokens - other.input_tokens),
            max(0, self.output_tokens - other.output_tokens),
            max(0, self.cached_input_tokens - other.cached_input_tokens),
            max(0, self.requests - other.requests),
        )

    def add(self, delta: EndpointUsage) -> None:
        self.usd += delta.usd
        self.input_tokens += delta.input_tokens
        self.output_tokens += delta.output_tokens
        self.cached_input_tokens += delta.cached_input_tokens
        self.requests += delta.requests


def _positive(value: object) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    return float(value) if ok else 0.0  # type: ignore[arg-type]


@dataclass(slots=True)
class Lease:
    """One budget's money on this sidecar for one period (amounts cumulative)."""

    budget: str
    #: The period as the operator names it; None until the operator has said.
    epoch: str | None = None
    #: The operator's nonce for this process's entry in the budget's books; None until told.
    #: Reports name it, so the operator recognises reports of an entry it has since pruned.
    book: str | None = None
    granted: float = 0.0
    settled: float = 0.0
    returned: float = 0.0
    #: Worst cases of the calls in flight.
    reserved: float = 0.0
    endpoints: dict[str, EndpointUsage] = field(default_factory=dict)
    #: The operator's last answer said nothing more could be granted now.
    exhausted: bool = False
    #: Seq of the last usage message that asked for more, and of the last one answered.
    asked: int = 0
    answered: int = 0
    exhausted_at: float = 0.0
    remaining: float | None = None
    #: Sum of what waiting reservations need beyond what is available.
    waiting: float = 0.0
    last_grant: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def available(self) -> float:
        return self.granted - self.settled - self.returned - self.reserved

    def wire(self, want: float | None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "budget": self.budget,
            "epoch": self.epoch,
            **({"book": self.book} if self.book is not None else {}),
            "grantedUSD": round(self.granted, 12),
            "settledUSD": round(self.settled, 12),
            "returnedUSD": round(self.returned, 12),
            "endpoints": {name: t.as_wire() for name, t in sorted(self.endpoints.items())},
        }
        if want is not None:
            data["wantUSD"] = round(max(0.0, want), 12)
        return data


@dataclass(slots=True)
class Hold:
    """A call's reservations: the same worst case in every enforcing budget that covers it."""

    endpoint: str
    amount: float
    leases: list[Lease]
    #: Budgets that count the call without enforcing (reported, never reserved).
    counted: list[Lease]
    done: bool = False


Send = Callable[[dict[str, Any]], None]


class SpendTracker:
    """Leases per budget, reservations and settlement; talks to the operator through `send`."""

    def __init__(
        self,
        node: str = "",
        *,
        wait_seconds: float = 5.0,
        low_water: float = 0.25,
        idle_return_seconds: float = 30.0,
        exhausted_seconds: float = _EXHAUSTED_FRESH_SECONDS,
        on_settle: Callable[[str, str, float, float, Usage | None], None] | None = None,
    ) -> None:
        #: Who this process is on the operator's books: its pod and a per-process id, so a
        #: restarted sidecar never inherits the lease (or the reports) of its previous life.
        self.holder = f"{node or os.uname().nodename}/{os.urandom(4).hex()}"
        self._wait = wait_seconds
        self._low_water = low_water
        self._idle_return = idle_return_seconds
        self._exhausted_for = exhausted_seconds
        self._on_settle = on_settle
        self._leases: dict[str, Lease] = {}
        self._send: Send | None = None
        self._seq = 0
        self._dirty = False
        #: The last recall acted on (its id goes up with every usage message, as `recalled`).
        self._recalled = 0

    # --- the stream ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._send is not None

    def attach(self, send: Send) -> None:
        """A stream to the operator is up: resynchronise with everything we hold."""
        self._send = send
        self._report(resync=True)

    def detach(self) -> None:
        self._send = None
        for lease in self._leases.values():
            lease.changed.set()

    def lease(self, budget: str) -> Lease:
        found = self._leases.get(budget)
        if found is None:
            found = self._leases[budget] = Lease(budget)
        return found

    def leases(self) -> dict[str, Lease]:
        return dict(self._leases)

    def on_lease(self, message: Mapping[str, Any]) -> None:
        """A lease message from the operator: grants, period changes, recalls."""
        ack = message.get("ack")
        report = False
        for item in message.get("budgets") or []:
            if not isinstance(item, dict) or not isinstance(item.get("budget"), str):
                continue
            lease = self.lease(item["budget"])
            epoch = item.get("epoch")
            if isinstance(epoch, str) and epoch != lease.epoch:
                if lease.epoch is not None:
                    # A new period: the old lease is void; calls in flight settle into it and
                    # are not reported (the operator closed that period).
                    lease = self._renew(lease, Lease(lease.budget, epoch=epoch))
                else:
                    lease.epoch = epoch
            book = item.get("book")
            if isinstance(book, str) and book != lease.book:
                if lease.book is not None:
                    # The operator pruned our entry while we were away: what it counted there
                    # stays counted, the rest is void, and the new entry starts from zero (calls
                    # in flight settle into the old lease, unreported), as in a new period.
                    lease = self._renew(lease, Lease(lease.budget, epoch=lease.epoch, book=book))
                else:
                    lease.book = book
                report = True  # at once under the book, so the operator knows we know it
            granted = item.get("grantedUSD")
            if isinstance(granted, int | float) and granted > lease.granted:
                lease.last_grant = float(granted) - lease.granted
                lease.granted = float(granted)
            remaining = item.get("remainingUSD")
            if isinstance(remaining, int | float):
                lease.remaining = float(remaining)
            if isinstance(ack, int) and ack >= lease.answered:
                lease.answered = ack
                lease.exhausted = bool(item.get("exhausted"))
                if lease.exhausted:
                    lease.exhausted_at = asyncio.get_running_loop().time()
            if item.get("recall") and lease.available > EPSILON:
                # Everything not reserved goes back, even with calls waiting here: they wait
                # because what is here is too little for them, and slivers kept by many
                # sidecars would starve a call that the budget as a whole could still pay.
                lease.returned += lease.available
                report = True
            lease.changed.set()
        recall_id = message.get("recallId")
        if isinstance(recall_id, int) and recall_id > self._recalled:
            self._recalled = recall_id
            report = True
        if report:
            self._report()

    def _renew(self, old: Lease, new: Lease) -> Lease:
        """Put a new lease in place of `old`; calls waiting for an answer on it move over."""
        old.answered = max(old.answered, old.asked)
        old.changed.set()
        self._leases[old.budget] = new
        return new

    def flush(self, now: float | None = None) -> None:
        """Periodic: report settled spend, and give back leases nobody used for a while."""
        now = time.monotonic() if now is None else now
        for lease in self._leases.values():
            idle = now - lease.last_used >= self._idle_return
            if idle and lease.reserved <= EPSILON and lease.available > EPSILON:
                lease.returned += lease.available
                self._dirty = True
        if self._dirty:
            self._report()

    def release_all(self) -> None:
        """Shutting down: give back every idle lease (calls in flight keep their share)."""
        for lease in self._leases.values():
            if lease.available > EPSILON:
                lease.returned += lease.available
        self._report()

    def _report(self, resync: bool = False, want: Mapping[str, float] | None = None) -> int:
        if self._send is None:
            return 0
        self._seq += 1
        wants = want or {}
        message = {
            "type": USAGE,
            "seq": self._seq,
            "holder": self.holder,
            "resync": resync,
            "recalled": self._recalled,
            "budgets": [
                lease.wire(wants.get(name)) for name, lease in sorted(self._leases.items())
            ],
        }
        self._dirty = False
        self._send(message)
        return self._seq

    # --- the request path ------------------------------------------------------------------

    def _ask(self, lease: Lease, want: float) -> None:
        lease.asked = self._report(want={lease.budget: want})

    async def reserve(self, budgets: Sequence[SpendBudget], endpoint: str, amount: float) -> Hold:
        """Reserve `amount` in every enforcing budget of `budgets`; BudgetRefusal if one can't.

        Waits (at most `wait_seconds`) for the operator to grant more when a lease is short.
        """
        counted = [self.lease(b.name) for b in budgets if not b.enforce]
        hold = Hold(endpoint, amount, [], counted)
        deadline = asyncio.get_running_loop().time() + self._wait
        for budget in budgets:
            if not budget.enforce:
                continue
            try:
                hold.leases.append(await self._reserve_one(budget.name, amount, deadline))
            except BudgetRefusal:
                self.release(hold)
                raise
        return hold

    async def _reserve_one(self, budget: str, amount: float, deadline: float) -> Lease:
        lease = self.lease(budget)
        lease.last_used = time.monotonic()
        if lease.available + EPSILON >= amount:
            lease.reserved += amount
            self._top_up(lease)
            return lease
        loop = asyncio.get_running_loop()
        if lease.exhausted and loop.time() - lease.exhausted_at < self._exhausted_for:
            raise self._refusal(lease, amount, None)
        lease.waiting += amount
        try:
            while True:
                if not self.connected:
                    raise self._refusal(lease, amount, "the control plane is unreachable")
                if lease.asked <= lease.answered:
                    self._ask(lease, lease.waiting - lease.available)
                while lease.asked > lease.answered and self.connected:
                    lease.changed.clear()
                    left = deadline - loop.time()
                    if left <= 0:
                        raise self._refusal(lease, amount, "the operator did not answer in time")
                    try:
                        async with asyncio.timeout(left):
                            await lease.changed.wait()
                    except TimeoutError:
                        continue
                current = self.lease(budget)
                if current is not lease:  # the period rolled over while we waited
                    lease.waiting -= amount
                    lease = current
                    lease.waiting += amount
                if lease.available + EPSILON >= amount:
                    lease.reserved += amount
                    self._top_up(lease)
                    return lease
                if lease.exhausted:
                    raise self._refusal(lease, amount, None)
                if loop.time() >= deadline:
                    raise self._refusal(lease, amount, "the operator did not answer in time")
                # Answered without enough (the operator does not know the budget yet, or others
                # took what was free): ask again shortly.
                await asyncio.sleep(min(_RETRY_ASK_SECONDS, max(0.0, deadline - loop.time())))
        finally:
            lease.waiting -= amount

    def _top_up(self, lease: Lease) -> None:
        """Ask ahead of need when the lease falls under its low-water mark."""
        if lease.exhausted or lease.asked > lease.answered or not self.connected:
            return
        if lease.available < self._low_water * lease.last_grant:
            self._ask(lease, 0.0)

    def _refusal(self, lease: Lease, amount: float, why: str | None) -> BudgetRefusal:
        left = lease.remaining
        if why is None:
            detail = (
                f"its remaining ${left:.6f} cannot cover this request's worst-case cost "
                f"${amount:.6f}"
                if left is not None
                else f"no lease can cover this request's worst-case cost ${amount:.6f}"
            )
            message = (
                f"Budget {lease.budget!r} is exhausted for this period: {detail}. Requests it "
                f"covers are refused until the period rolls over or the limit is raised."
            )
        else:
            message = (
                f"Budget {lease.budget!r}: this sidecar's spend lease "
                f"(${max(lease.available, 0.0):.6f} left) cannot cover this request's worst-case "
                f"cost ${amount:.6f}, and {why}."
            )
        return BudgetRefusal(lease.budget, message)

    def settle(self, hold: Hold, cost: float | None, usage: Usage | None, model: str = "") -> float:
        """Settle a call: its actual cost, or (cost None: unknown) its whole reservation.

        Returns what was charged.
        """
        if hold.done:
            return 0.0
        hold.done = True
        charged = hold.amount if cost is None else cost
        for lease in hold.leases:
            lease.reserved -= hold.amount
        for lease in [*hold.leases, *hold.counted]:
            lease.settled += charged
            totals = lease.endpoints.get(hold.endpoint)
            if totals is None:
                totals = lease.endpoints[hold.endpoint] = EndpointUsage()
            totals.usd += charged
            totals.requests += 1
            if usage is not None:
                totals.input_tokens += usage.input_tokens
                totals.output_tokens += usage.output_tokens
                totals.cached_input_tokens += usage.cached_input_tokens
            if self._on_settle is not None:
                overrun = max(0.0, charged - hold.amount) if lease in hold.leases else 0.0
                self._on_settle(lease.budget, hold.endpoint, charged, overrun, usage)
        self._dirty = True
        return charged

    def release(self, hold: Hold) -> None:
        """The call cost nothing (the upstream refused it before doing any work)."""
        if hold.done:
            return
        hold.done = True
        for lease in hold.leases:
            lease.reserved -= hold.amount
