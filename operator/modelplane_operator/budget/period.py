"""Budget periods: where the current daily, weekly or monthly period starts in a time zone.

A period starts at local midnight (daily), on Monday at local midnight (weekly, ISO weeks), or on
the first of the month at local midnight (monthly), in the Budget's IANA time zone. Starts are
computed on the local calendar and then converted, so a period spanning a DST change is 23 or 25
hours long, as people who set daily budgets expect. The epoch that names a period on the wire
and in status is its start in UTC (RFC 3339).
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..crd_models import BudgetPeriod


class PeriodError(ValueError):
    """A time zone that does not exist."""


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PeriodError(f"unknown time zone {name!r} (expected an IANA name)") from None


def _local_start(period: BudgetPeriod, day: dt.date) -> dt.date:
    if period is BudgetPeriod.DAILY:
        return day
    if period is BudgetPeriod.WEEKLY:
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1)


def _next_local_start(period: BudgetPeriod, start: dt.date) -> dt.date:
    if period is BudgetPeriod.DAILY:
        return start + dt.timedelta(days=1)
    if period is BudgetPeriod.WEEKLY:
        return start + dt.timedelta(days=7)
    return (start.replace(day=28) + dt.timedelta(days=4)).replace(day=1)


def _at_midnight(day: dt.date, tz: ZoneInfo) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(dt.UTC)


def period_bounds(
    period: BudgetPeriod, timezone: str, now: dt.datetime
) -> tuple[dt.datetime, dt.datetime]:
    """(start, end) in UTC of the period that contains `now` (an aware datetime)."""
    tz = zone(timezone)
    local = now.astimezone(tz).date()
    start_day = _local_start(period, local)
    start = _at_midnight(start_day, tz)
    if start > now:  # a midnight that DST skipped or repeated: step back one period
        start_day = _local_start(period, start_day - dt.timedelta(days=1))
        start = _at_midnight(start_day, tz)
    end = _at_midnight(_next_local_start(period, start_day), tz)
    return start, end


def epoch(start: dt.datetime) -> str:
    """A period's name on the wire and in status: its UTC start, RFC 3339."""
    return start.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
