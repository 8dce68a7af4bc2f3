"""Counters and histograms the request path updates with plain number adds.

prometheus_client's metrics take a lock and run checks on every `inc()` and `observe()`; over
the series one request touches that is several microseconds. The sidecar updates its per-request
series from its one event-loop thread, so here a series is a plain float (or a list of bucket
counts), and `TallyCollector` turns them into the same families as prometheus_client's Counter
and Histogram would (name, help, type, labels, `_total`, `_bucket` / `_count` / `_sum` samples)
when Prometheus scrapes. Label values are kept as strings, as prometheus_client keeps them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramSeries:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        #: Observations per bucket (not cumulative); the last one is +Inf's.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        # Buckets hold values <= their bound: the first bound >= amount.
        self.counts[bisect_left(self._bounds, amount)] += 1


_S = TypeVar("_S", CounterSeries, HistogramSeries)


class _Family(Generic[_S]):
    def __init__(self, name: str, documentation: str, labelnames: Iterable[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        #: Exposed series by their label values as strings.
        self._series: dict[tuple[str, ...], _S] = {}
        #: The same series under the label values callers pass (enum members hash differently).
        self._lookup: dict[tuple[object, ...], _S] = {}
        #: The one series of a family without labels.
        self._default: _S | None = None
        if not self.labelnames:
            self._default = self._series[()] = self._new()

    def _new(self) -> _S:
        raise NotImplementedError

    def labels(self, *values: object) -> _S:
        """The series of these label values, created on first use."""
        found = self._lookup.get(values)
        if found is not None:
            return found
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        key = tuple(str(v) for v in values)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = self._new()
        self._lookup[values] = found
        return found


class TallyCounter(_Family[CounterSeries]):
    def _new(self) -> CounterSeries:
        return CounterSeries()

    def inc(self, amount: float = 1.0) -> None:
        """For a family without labels."""
        assert self._default is not None, f"{self.name} has labels"
        self._default.inc(amount)

    def family(self, with_samples: bool = True) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for values, series in self._series.items():
                family.add_metric(values, series.value)
        return family


class TallyHistogram(_Family[HistogramSeries]):
    def __init__(
        self, name: str, documentation: str, labelnames: Iterable[str], buckets: Iterable[float]
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        to_go: Callable[[float], str] = floatToGoString  # untyped in prometheus_client
        self._le = [to_go(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames)

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self.bounds)

    def observe(self, amount: float) -> None:
        """For a family without labels."""
        assert self._default is not None, f"{self.name} has labels"
        self._default.observe(amount)

    def family(self, with_samples: bool = True) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        if with_samples:
            for values, series in self._series.items():
                cumulative = 0
                buckets: list[tuple[str, float]] = []
                for le, count in zip(self._le, series.counts, strict=True):
                    cumulative += count
                    buckets.append((le, cumulative))
                family.add_metric(values, buckets, series.sum)
        return family


class TallyCollector:
    """The tally families of one registry; register it once all of them are made, and the
    registry reads them when it is scraped."""

    def __init__(self) -> None:
        self._families: list[TallyCounter | TallyHistogram] = []

    def counter(
        self, name: str, documentation: str, labelnames: Iterable[str] = ()
    ) -> TallyCounter:
        family = TallyCounter(name, documentation, labelnames)
        self._families.append(family)
        return family

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Iterable[float],
    ) -> TallyHistogram:
        family = TallyHistogram(name, documentation, labelnames, buckets)
        self._families.append(family)
        return family

    def describe(self) -> Iterable[Metric]:
        return [f.family(with_samples=False) for f in self._families]

    def collect(self) -> Iterable[Metric]:
        return [f.family() for f in self._families]
