"""The sidecar's spend leases: worst-case reservation, settlement, release, top-ups, refusals."""

from __future__ import annotations

import asyncio

import pytest
from budget_helpers import Operator

from modelplane_sidecar.config import Endpoint, Provider, SpendBudget
from modelplane_sidecar.providers.base import Operation, Usage
from modelplane_sidecar.routing.classify.text import read_request
from modelplane_sidecar.spend import (
    BudgetRefusal,
    SpendTracker,
    input_token_bound,
    plan_call,
    with_max_tokens,
    worst_case_usd,
)

PREMIUM = Endpoint(
    name="premium",
    base_url="http://127.0.0.1:9/v1",
    model="big",
    pricing={"inputPerMtok": 10.0, "outputPerMtok": 30.0},
)
TEAM = SpendBudget(name="team", enforce=True, max_output_tokens=1000)


def test_max_tokens_is_forced_with_the_key_each_provider_takes() -> None:
    body = {"model": "chat", "messages": []}
    assert with_max_tokens(body, Operation.CHAT, Provider.OPENAI, 64)["max_completion_tokens"] == 64
    assert with_max_tokens(body, Operation.CHAT, Provider.OPENAI_COMPATIBLE, 64)["max_tokens"] == 64
    assert with_max_tokens(body, Operation.COMPLETIONS, Provider.OPENAI, 64)["max_tokens"] == 64
    assert with_max_tokens(body, Operation.EMBEDDINGS, Provider.OPENAI, 64) is body
    own = {**body, "max_tokens": 10}
    assert with_max_tokens(own, Operation.CHAT, Provider.OPENAI, 64) is own


def test_the_worst_case_bounds_input_by_bytes_and_output_by_max_tokens() -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "x" * 4000}]}
    plan = plan_call([TEAM], PREMIUM, Operation.CHAT, body, None)
    assert plan is not None
    text = read_request(body)
    bound = input_token_bound(text)
    assert bound >= 4000  # one token per byte at most, plus framing
    assert plan.body["max_completion_tokens"] == 1000
    assert plan.worst_case == pytest.approx(worst_case_usd(PREMIUM, bound, 1000))
    assert plan.worst_case == pytest.approx((bound * 10 + 1000 * 30) / 1e6)
    # A budget that does not cover the endpoint plans nothing; one that only counts, no cap.
    assert (
        plan_call(
            [SpendBudget(name="x", endpoints=("other",))], PREMIUM, Operation.CHAT, body, None
        )
        is None
    )
    counted = plan_call([SpendBudget(name="x")], PREMIUM, Operation.CHAT, body, None)
    assert counted is not None and counted.worst_case == 0.0 and counted.body is body


async def test_reserve_settle_and_release_move_money_between_balance_and_spend() -> None:
    tracker = SpendTracker("pod")
    operator = Operator(tracker, grant=1.0)
    tracker.attach(operator)
    hold = await tracker.reserve([TEAM], "premium", 0.4)
    lease = tracker.lease("team")
    assert (lease.granted, lease.reserved) == (pytest.approx(1.0), pytest.approx(0.4))
    assert operator.sent[-1]["budgets"][0]["wantUSD"] == pytest.approx(0.4)

    tracker.settle(hold, 0.1, Usage(input_tokens=100, output_tokens=20))
    assert (lease.reserved, lease.settled) == (pytest.approx(0.0), pytest.approx(0.1))
    assert lease.available == pytest.approx(0.9)
    totals = lease.endpoints["premium"]
    assert (totals.requests, totals.input_tokens, totals.output_tokens) == (1, 100, 20)

    other = await tracker.reserve([TEAM], "premium", 0.5)
    tracker.release(other)
    tracker.release(other)  # twice is once
    assert lease.available == pytest.approx(0.9)

    unknown = await tracker.reserve([TEAM], "premium", 0.3)
    assert tracker.settle(unknown, None, None) == pytest.approx(0.3)  # cost unknown: worst case
    assert lease.settled == pytest.approx(0.4)

    tracker.flush()
    report = operator.sent[-1]["budgets"][0]
    assert report["settledUSD"] == pytest.approx(0.4)
    assert "wantUSD" not in report
    assert report["endpoints"]["premium"]["requests"] == 2


async def test_an_exhausted_budget_refuses_with_its_name_and_the_amounts() -> None:
    tracker = SpendTracker("pod")
    operator = Operator(tracker, grant=0.0)
    operator.exhausted = True
    tracker.attach(operator)
    with pytest.raises(BudgetRefusal) as refused:
        await tracker.reserve([TEAM], "premium", 0.25)
    assert refused.value.budget == "team"
    assert refused.value.message.startswith("Budget 'team' is exhausted for this period")
    assert "$0.250000" in refused.value.message
    error = refused.value.error()
    assert (error.status, error.code, error.type) == (429, "budget_exhausted", "insufficient_quota")
    # Refused again at once, without asking the operator (it just said there is nothing).
    asked = len(operator.sent)
    with pytest.raises(BudgetRefusal):
        await tracker.reserve([TEAM], "premium", 0.25)
    assert len(operator.sent) == asked


async def test_without_the_control_plane_only_the_lease_in_hand_can_be_spent() -> None:
    tracker = SpendTracker("pod")
    operator = Operator(tracker, grant=0.5)
    tracker.attach(operator)
    hold = await tracker.reserve([TEAM], "premium", 0.2)
    tracker.settle(hold, 0.2, None)
    tracker.detach()
    # 0.3 left in hand: a 0.3 call still goes, a 0.31 call is refused and says why.
    fits = await tracker.reserve([TEAM], "premium", 0.3)
    tracker.release(fits)
    with pytest.raises(BudgetRefusal, match="the control plane is unreachable"):
        await tracker.reserve([TEAM], "premium", 0.31)


async def test_two_budgets_reserve_together_or_not_at_all() -> None:
    tracker = SpendTracker("pod")
    operator = Operator(tracker, grant=1.0)
    tracker.attach(operator)
    hold = await tracker.reserve([TEAM], "premium", 0.9)  # team now has 0.1 left, no more
    operator.exhausted = True
    small = SpendBudget(name="small", enforce=True)
    with pytest.raises(BudgetRefusal):
        await tracker.reserve([small, TEAM], "premium", 0.5)
    # The part reserved in `small` was given back.
    assert tracker.lease("small").reserved == 0.0
    tracker.release(hold)


async def test_low_water_asks_ahead_and_recall_returns_idle_lease() -> None:
    tracker = SpendTracker("pod", low_water=0.5)
    operator = Operator(tracker, grant=1.0)
    tracker.attach(operator)
    hold = await tracker.reserve([TEAM], "premium", 0.6)  # 1.0 granted, 0.4 left < 0.5
    await asyncio.sleep(0)
    assert operator.sent[-1]["budgets"][0]["wantUSD"] == 0.0
    await asyncio.sleep(0.01)
    lease = tracker.lease("team")
    assert lease.granted == pytest.approx(2.0)
    tracker.on_lease({"type": "lease", "budgets": [{"budget": "team", "recall": True}]})
    assert lease.returned == pytest.approx(1.4)  # everything not reserved
    assert lease.available == pytest.approx(0.0)
    assert operator.sent[-1]["budgets"][0]["returnedUSD"] == pytest.approx(1.4)
    tracker.settle(hold, 0.5, None)


async def test_a_new_period_starts_a_new_lease() -> None:
    tracker = SpendTracker("pod")
    operator = Operator(tracker, grant=1.0)
    tracker.attach(operator)
    hold = await tracker.reserve([TEAM], "premium", 0.5)
    tracker.on_lease(
        {"type": "lease", "budgets": [{"budget": "team", "epoch": "2026-03-15T00:00:00Z"}]}
    )
    fresh = tracker.lease("team")
    assert (fresh.epoch, fresh.granted, fresh.reserved) == ("2026-03-15T00:00:00Z", 0.0, 0.0)
    tracker.settle(hold, 0.5, None)  # settles into the old period's lease
    assert fresh.settled == 0.0
