"""Tally families scrape exactly like prometheus_client's Counter and Histogram fed the same
numbers (names, help, types, label values, buckets, count and sum), `_created` aside."""

from __future__ import annotations

from enum import StrEnum

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from modelplane_sidecar.tally import TallyCollector

BUCKETS = (0.00005, 0.001, 0.5, 1, 2.5, 60)


class Outcome(StrEnum):
    OK = "ok"


def _scrape(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_tallies_scrape_like_the_client_library() -> None:
    reference, tallied = CollectorRegistry(), CollectorRegistry()
    tally = TallyCollector()
    counters = (
        Counter(
            "demo_requests",
            "Requests, by model and outcome.",
            ["model", "outcome"],
            registry=reference,
        ),
        tally.counter("demo_requests", "Requests, by model and outcome.", ["model", "outcome"]),
    )
    plain = (
        Counter("demo_records", "Records.", registry=reference),
        tally.counter("demo_records", "Records.", ()),
    )
    latencies = (
        Histogram("demo_seconds", "Latency.", ["model"], buckets=BUCKETS, registry=reference),
        tally.histogram("demo_seconds", "Latency.", ["model"], buckets=BUCKETS),
    )
    decisions = (
        Histogram("demo_decision_seconds", "Decision.", buckets=BUCKETS, registry=reference),
        tally.histogram("demo_decision_seconds", "Decision.", buckets=BUCKETS),
    )
    tallied.register(tally)
    for counter in counters:
        counter.labels("chat", Outcome.OK).inc()
        counter.labels("chat", "ok").inc(2.5)  # the same series as the enum member's
        counter.labels("", "refused").inc()
    for record in plain:
        record.inc(3)
    values = [0.00005, 0.0002, 1, 1.0000001, 2.5, 61, 0]
    for latency in latencies:
        for v in values:
            latency.labels("chat").observe(v)
        latency.labels("embed")  # a series without observations is exposed with zeros
    for decision in decisions:
        decision.observe(0.0003)
    assert _scrape(tallied) == _scrape(reference)


def test_counters_refuse_negative_amounts_and_wrong_label_counts() -> None:
    tally = TallyCollector()
    counter = tally.counter("demo_total_things", "Things.", ["a"])
    with pytest.raises(ValueError):
        counter.labels("x").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("x", "y")
