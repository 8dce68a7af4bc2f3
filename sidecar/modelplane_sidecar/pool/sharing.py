"""Load snapshots shared over the config stream: the operator scrapes, sidecars read.

A `load` message is small and has no version and no ACK (unlike a config snapshot): the newest
one simply replaces what a sidecar knew. Each reading carries its age, so a sidecar ages it out
by its own clock exactly as if it had scraped the replica itself.

    {"type": "load", "endpoints": {"llama": [
        {"url": "http://10.0.3.7:8000/v1", "waiting": 3, "running": 12, "kvCache": 0.41,
         "ageSeconds": 0.8}, ...]}}
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from .engines import LoadReading
from .replicas import ReplicaPool

LOAD = "load"


def load_message(pools: Iterable[ReplicaPool], now: float | None = None) -> dict[str, Any]:
    """The readings of `pools` that are not older than their max age."""
    now = time.monotonic() if now is None else now
    endpoints: dict[str, list[dict[str, Any]]] = {}
    for pool in pools:
        entries = []
        for replica in pool.replicas:
            reading = replica.fresh_reading(now, pool.max_age)
            if reading is None:
                continue
            entry: dict[str, Any] = {
                "url": replica.url,
                "waiting": reading.waiting,
                "running": reading.running,
                "ageSeconds": round(max(0.0, now - replica.read_at), 3),
            }
            if reading.kv_cache is not None:
                entry["kvCache"] = reading.kv_cache
            entries.append(entry)
        if entries:
            endpoints[pool.endpoint] = entries
    return {"type": LOAD, "endpoints": endpoints}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def apply_load_message(
    pools: Mapping[str, ReplicaPool], message: Mapping[str, Any], now: float | None = None
) -> int:
    """Store the message's readings in `pools` (by endpoint name and replica URL); returns how
    many were applied. Entries for unknown endpoints or replicas, or malformed ones, are skipped."""
    now = time.monotonic() if now is None else now
    endpoints = message.get("endpoints")
    if not isinstance(endpoints, dict):
        return 0
    applied = 0
    for name, entries in endpoints.items():
        pool = pools.get(name)
        if pool is None or not isinstance(entries, list):
            continue
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
                continue
            waiting, running = _number(entry.get("waiting")), _number(entry.get("running"))
            age = _number(entry.get("ageSeconds")) or 0.0
            if waiting is None or running is None:
                continue
            kv = _number(entry.get("kvCache"))
            reading = LoadReading(waiting, running, kv)
            if pool.observe(entry["url"], reading, now - max(0.0, age)):
                applied += 1
    return applied
