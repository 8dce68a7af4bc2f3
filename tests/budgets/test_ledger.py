"""The budget books without any I/O: periods, lease arithmetic, settlement, rollover, thresholds."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelplane_operator.budget.ledger import BudgetLedger, Report, Terms, Threshold
from modelplane_operator.budget.period import PeriodError, epoch, period_bounds
from modelplane_operator.crd_models import BudgetAction, BudgetPeriod, BudgetSpec
from modelplane_sidecar.config import BudgetMode, Tier
from modelplane_sidecar.spend import EndpointUsage

NOW = dt.datetime(2026, 3, 14, 15, 9, 26, tzinfo=dt.UTC)


def terms(limit: float = 100.0, *thresholds: tuple[int, str, str | None], **extra: object) -> Terms:
    spec = BudgetSpec.model_validate(
        {
            "period": "daily",
            "limitUSD": limit,
            "thresholds": [
                {"percent": p, "action": a, **({"tier": t} if t else {})} for p, a, t in thresholds
            ],
            **extra,
        }
    )
    return Terms.from_spec(spec)


BLOCKING = terms(
    100.0,
    (50, "alert", None),
    (70, "downgrade", "standard"),
    (90, "downgrade", "cheap"),
    (100, "block", None),
)


def report(ledger: BudgetLedger, settled: float, returned: float = 0.0, **kw: object) -> Report:
    return Report(
        epoch=str(kw.pop("epoch", ledger.epoch)),
        settled=settled,
        returned=returned,
        granted=float(kw.pop("granted", 0.0)),  # type: ignore[arg-type]
        endpoints=kw.pop("endpoints", {}),  # type: ignore[arg-type]
        resync=bool(kw.pop("resync", False)),
    )


# --- periods -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "zone", "start", "end"),
    [
        ("daily", "UTC", "2026-03-14T00:00:00Z", "2026-03-15T00:00:00Z"),
        ("weekly", "UTC", "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
        ("monthly", "UTC", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
        # Berlin is UTC+1 in early March; local midnight is 23:00 UTC the day before.
        ("daily", "Europe/Berlin", "2026-03-13T23:00:00Z", "2026-03-14T23:00:00Z"),
        ("monthly", "Europe/Berlin", "2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z"),
        # Tokyo (UTC+9): 15:09 UTC is already the 15th there.
        ("daily", "Asia/Tokyo", "2026-03-14T15:00:00Z", "2026-03-15T15:00:00Z"),
    ],
)
def test_periods_start_at_local_midnight(period: str, zone: str, start: str, end: str) -> None:
    begins, ends = period_bounds(BudgetPeriod(period), zone, NOW)
    assert (epoch(begins), epoch(ends)) == (start, end)


def test_a_daily_period_across_a_dst_change_is_23_hours_long() -> None:
    # New York springs forward on 2026-03-08.
    start, end = period_bounds(
        BudgetPeriod.DAILY, "America/New_York", dt.datetime(2026, 3, 8, 12, tzinfo=dt.UTC)
    )
    assert end - start == dt.timedelta(hours=23)


def test_december_rolls_into_january() -> None:
    start, end = period_bounds(
        BudgetPeriod.MONTHLY, "UTC", dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.UTC)
    )
    assert (epoch(start), epoch(end)) == ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")


def test_an_unknown_time_zone_is_named() -> None:
    with pytest.raises(PeriodError, match="Mars/Base"):
        period_bounds(BudgetPeriod.DAILY, "Mars/Base", NOW)


# --- leases ----------------------------------------------------------------------------------


def test_grants_are_fair_slices_capped_and_never_below_a_fitting_want() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    for holder in ("a", "b", "c", "d"):
        ledger.connect(holder)
    # 100 free, 4 holders: half of it shared = 12.5, but the lease cap is 2% of 100 = 2.
    assert ledger.grant("a", 0.0) == pytest.approx(2.0)
    # A request bigger than a slice gets what it needs when that much is free.
    assert ledger.grant("b", 7.5) == pytest.approx(7.5)
    assert ledger.leased == pytest.approx(9.5)
    assert ledger.free == pytest.approx(90.5)


def test_grants_stop_at_the_cap_and_the_invariant_holds() -> None:
    ledger = BudgetLedger("b", terms(10.0, (80, "block", None)), NOW)
    ledger.connect("a")
    ledger.connect("b")
    total = 0.0
    for _ in range(100):
        total += ledger.grant("a", 0.5) + ledger.grant("b", 0.25)
    # The cap is the lowest blocking threshold: 80% of 10.
    assert total == pytest.approx(8.0)
    assert ledger.free == 0.0
    assert ledger.grant("a", 0.01) == 0.0


def test_a_budget_without_a_block_threshold_grants_nothing_and_only_counts() -> None:
    ledger = BudgetLedger("b", terms(10.0, (50, "alert", None)), NOW)
    assert not ledger.terms.enforced
    assert ledger.grant("a", 1.0) == 0.0
    ledger.report("a", report(ledger, 12.0))
    assert ledger.spent == 12.0
    assert ledger.remaining == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.sampled_from(["grant", "settle", "return", "drop"]),
            st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
        ),
        max_size=60,
    )
)
def test_spent_plus_outstanding_never_passes_the_cap(
    steps: list[tuple[str, str, float]],
) -> None:
    """Whatever order grants, settlements, returns and disconnects come in."""
    ledger = BudgetLedger("b", terms(20.0, (100, "block", None)), NOW)
    books = {h: [0.0, 0.0, 0.0] for h in "abc"}  # what each holder received, settled, returned
    for holder, action, amount in steps:
        got, settled, returned = books[holder]
        if action == "grant":
            books[holder][0] += ledger.grant(holder, amount)
        elif action == "settle":
            # A holder settles at most what it holds (reservations are worst cases).
            books[holder][1] = settled + min(amount, max(0.0, got - settled - returned))
        elif action == "return":
            books[holder][2] = returned + max(0.0, got - settled - returned)
        else:
            ledger.disconnect(holder, NOW)
        got, settled, returned = books[holder]
        ledger.report(holder, report(ledger, settled, returned))
        assert ledger.spent + ledger.leased <= 20.0 + 1e-9
    assert ledger.spent == pytest.approx(sum(b[1] for b in books.values()))


def test_reports_are_cumulative_so_repeats_and_losses_change_nothing() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    gpt = {"gpt": EndpointUsage(1.5, 100, 50, 10, 3)}
    ledger.report("a", report(ledger, 1.5, endpoints=gpt))
    ledger.report("a", report(ledger, 1.5, endpoints=gpt))  # repeated
    ledger.report("a", report(ledger, 1.0))  # an older one arriving late
    assert ledger.spent == pytest.approx(1.5)
    assert ledger.endpoints["gpt"] == EndpointUsage(1.5, 100, 50, 10, 3)
    later = {"gpt": EndpointUsage(4.0, 300, 90, 10, 5)}
    ledger.report("a", report(ledger, 4.0, endpoints=later))  # one in between was lost
    assert ledger.spent == pytest.approx(4.0)
    assert ledger.endpoints["gpt"] == EndpointUsage(4.0, 300, 90, 10, 5)


def test_a_resync_reclaims_grants_lost_on_a_broken_connection() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    ledger.connect("a")
    ledger.grant("a", 3.0)
    ledger.grant("a", 2.0)  # sent as the connection broke: never arrived
    assert ledger.holders["a"].outstanding == pytest.approx(5.0)
    ledger.report("a", report(ledger, 1.0, granted=3.0, resync=True))
    assert ledger.holders["a"].outstanding == pytest.approx(2.0)


def test_a_disconnected_holder_keeps_its_lease_counted_until_it_reports() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    ledger.connect("a")
    ledger.grant("a", 4.0)
    ledger.disconnect("a", NOW)
    assert ledger.leased == pytest.approx(4.0)
    assert ledger.remaining == pytest.approx(96.0)
    # It comes back: settled 1, gives back the rest.
    ledger.report("a", report(ledger, 1.0, 3.0, granted=4.0, resync=True))
    assert (ledger.spent, ledger.leased) == (pytest.approx(1.0), pytest.approx(0.0))


def test_settlement_above_the_reservation_shows_as_overspend_not_as_negative_lease() -> None:
    ledger = BudgetLedger("b", terms(1.0, (100, "block", None)), NOW)
    ledger.connect("a")
    assert ledger.grant("a", 1.0) == pytest.approx(1.0)
    ledger.report("a", report(ledger, 1.25))  # the provider ignored max_tokens
    assert ledger.spent == pytest.approx(1.25)
    assert ledger.leased == 0.0
    assert ledger.free == 0.0


# --- thresholds and rollover -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spent", "mode", "tier", "reached"),
    [
        (10.0, BudgetMode.NORMAL, None, []),
        (50.0, BudgetMode.NORMAL, None, [50]),
        (70.0, BudgetMode.DOWNGRADE, Tier.STANDARD, [50, 70]),
        (95.0, BudgetMode.DOWNGRADE, Tier.CHEAP, [50, 70, 90]),
        (100.0, BudgetMode.STOP, None, [50, 70, 90, 100]),
    ],
)
def test_thresholds_set_the_mode(
    spent: float, mode: BudgetMode, tier: Tier | None, reached: list[int]
) -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    ledger.report("a", report(ledger, spent))
    assert ledger.mode() == (mode, tier)
    assert [t.percent for t in ledger.reached()] == reached


def test_report_returns_the_thresholds_it_passed_once() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    assert ledger.report("a", report(ledger, 49.0)) == []
    passed = ledger.report("a", report(ledger, 75.0))
    assert [(t.percent, t.action) for t in passed] == [
        (50, BudgetAction.ALERT),
        (70, BudgetAction.DOWNGRADE),
    ]
    assert ledger.report("a", report(ledger, 76.0)) == []


def test_hard_stop_is_still_a_block() -> None:
    old = terms(10.0, (100, "hard-stop", None))
    assert old.enforced and old.cap == 10.0
    assert Threshold(100, BudgetAction.HARD_STOP, None).blocks


def test_rollover_resets_spend_and_voids_leases() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    ledger.connect("a")
    ledger.grant("a", 5.0)
    ledger.report("a", report(ledger, 80.0))
    old_epoch = ledger.epoch
    assert not ledger.rollover(NOW + dt.timedelta(hours=1))
    assert ledger.rollover(NOW + dt.timedelta(days=1))
    assert ledger.epoch == "2026-03-15T00:00:00Z"
    assert (ledger.spent, ledger.leased, ledger.endpoints) == (0.0, 0.0, {})
    assert ledger.holders["a"].connected
    assert ledger.mode() == (BudgetMode.NORMAL, None)
    # A late settlement of the old period does not count in the new one.
    ledger.report("a", report(ledger, 90.0, epoch=old_epoch))
    assert ledger.spent == 0.0


def test_status_round_trips_through_a_restart() -> None:
    ledger = BudgetLedger("b", BLOCKING, NOW)
    ledger.connect("pod-a/1f")
    ledger.grant("pod-a/1f", 6.0)
    ledger.report(
        "pod-a/1f",
        report(ledger, 2.5, endpoints={"gpt": EndpointUsage(2.5, 1000, 200, 0, 4)}),
    )
    status = ledger.status()
    assert status["spentUSD"] == 2.5
    assert status["leasedUSD"] == pytest.approx(3.5)
    assert status["remainingUSD"] == pytest.approx(94.0)
    assert status["mode"] == "normal"

    restarted = BudgetLedger("b", BLOCKING, NOW + dt.timedelta(minutes=5))
    assert restarted.restore(status)
    assert restarted.spent == 2.5
    assert restarted.leased == pytest.approx(3.5)  # counted until the holder reports
    assert not restarted.holders["pod-a/1f"].connected
    # The holder reconnects and repeats its cumulative report: nothing is counted twice.
    restarted.report(
        "pod-a/1f",
        report(
            restarted,
            3.0,
            granted=6.0,
            resync=True,
            endpoints={"gpt": EndpointUsage(3.0, 1200, 240, 0, 5)},
        ),
    )
    assert restarted.spent == pytest.approx(3.0)
    assert restarted.endpoints["gpt"] == EndpointUsage(3.0, 1200, 240, 0, 5)
    # A status from an earlier period is not taken over.
    assert not BudgetLedger("b", BLOCKING, NOW + dt.timedelta(days=1)).restore(status)
