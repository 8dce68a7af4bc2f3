"""Read a few gauges out of a Prometheus text exposition, without building the whole model.

Model servers expose hundreds of series (histograms with dozens of buckets each); the balancer
needs three gauges. This scans lines, skips comments, and keeps only the values of the metric
names asked for (labels are ignored: one value per series). NaN and infinities are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Collection


def parse_samples(text: str, wanted: Collection[str]) -> dict[str, list[float]]:
    """Metric name -> the values of its series, for the names in `wanted` present in `text`."""
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if space < 0:
            continue
        if 0 <= brace < space:
            name = line[:brace]
            end = line.rfind("}")
            if end < 0:
                continue
            rest = line[end + 1 :].split()
        else:
            name = line[:space]
            rest = line[space + 1 :].split()
        if name not in wanted or not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        if math.isfinite(value):
            found.setdefault(name, []).append(value)
    return found
