"""The replicas of one self-hosted endpoint and the choice of one per attempt.

Endpoint choice (routing/) decides *which model* serves a request; this module decides *which
copy of it*. Each replica carries what this sidecar knows about its load: requests this sidecar
has outstanding on it (always fresh), the engine's own queue depth, batch size and KV-cache use
from its Prometheus metrics (as fresh as the last scrape or pushed snapshot), and a short
cool-down after a connection failure. The pick is "power of two choices": two ready replicas
drawn at random, the one with the lower cost wins. Unlike always taking the global minimum, it
keeps many sidecars that share the same (slightly stale) metrics from stampeding onto the same
replica, and with two or three replicas it is nearly the minimum anyway.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import Endpoint, LoadSource, Replica
from .engines import LoadReading

#: A full KV cache costs as much as this many queued requests (vLLM preempts near 100 %).
KV_CACHE_WEIGHT = 2.0
#: After a connection failure a replica is avoided for this long (unless nothing else is left).
COOL_DOWN_SECONDS = 2.0
_COOL_DOWN_COST = 1e6


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(slots=True)
class ReplicaState:
    """One replica and what this sidecar knows about its load."""

    url: str
    ready: bool = True
    zone: str | None = None
    #: Requests this sidecar has sent to it and not yet finished.
    outstanding: int = 0
    reading: LoadReading | None = None
    #: Monotonic time of `reading`.
    read_at: float = 0.0
    cool_down_until: float = 0.0
    #: Attempts this sidecar sent to it (for tests and the bench).
    sent: int = 0

    @property
    def origin(self) -> str:
        return origin(self.url)

    def fresh_reading(self, now: float, max_age: float) -> LoadReading | None:
        if self.reading is None or now - self.read_at > max_age:
            return None
        return self.reading

    def queue_depth(self, now: float, max_age: float) -> float:
        """Requests waiting for a slot: the engine's own count when fresh, else ours in flight."""
        reading = self.fresh_reading(now, max_age)
        if reading is None:
            return float(self.outstanding)
        return reading.waiting

    def cost(self, now: float, max_age: float) -> float:
        cost = float(self.outstanding)
        reading = self.fresh_reading(now, max_age)
        if reading is not None:
            cost += reading.waiting
            if reading.kv_cache is not None:
                cost += KV_CACHE_WEIGHT * reading.kv_cache
        if now < self.cool_down_until:
            cost += _COOL_DOWN_COST
        return cost

    def predicted_wait(self, now: float, max_age: float, latency: float | None) -> float | None:
        """Seconds a new request would wait for a slot: queued requests drain at the rate the
        running ones finish (running / latency per second). None without metrics or latency."""
        reading = self.fresh_reading(now, max_age)
        if reading is None or latency is None:
            return None
        return reading.waiting * latency / max(1.0, reading.running)

    def observe(self, reading: LoadReading, at: float) -> None:
        self.reading, self.read_at = reading, at

    def connection_failed(self, now: float) -> None:
        self.cool_down_until = now + COOL_DOWN_SECONDS


@dataclass(frozen=True, slots=True)
class Saturation:
    """How loaded the least-loaded ready replica of a pool is."""

    endpoint: str
    queue_depth: float
    predicted_wait: float | None
    ready: int
    total: int

    def describe(self) -> str:
        wait = f", predicted wait {self.predicted_wait:.1f}s" if self.predicted_wait else ""
        return (
            f"{self.endpoint}: least-loaded of {self.ready} ready replica(s) has "
            f"{self.queue_depth:g} queued{wait}"
        )


class ReplicaPool:
    """The replicas of one endpoint. Built per config; replica state carries over by URL."""

    def __init__(
        self,
        endpoint: Endpoint,
        replicas: list[ReplicaState],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint.name
        self.replicas = replicas
        self.by_url = {r.url: r for r in replicas}
        metrics = endpoint.load_metrics
        self.max_age = metrics.max_age_seconds
        self.source = metrics.source if endpoint.engine is not None else LoadSource.OFF
        self.engine = endpoint.engine
        self.metrics_path = metrics.path
        self.scrape_interval = metrics.scrape_interval_seconds
        self._clock = clock

    @classmethod
    def build(cls, endpoint: Endpoint, previous: ReplicaPool | None) -> ReplicaPool | None:
        """The pool for `endpoint` (None when it is a plain endpoint with no replicas and no
        engine), keeping the state of every replica whose URL was there before."""
        listed: tuple[Replica, ...]
        if endpoint.replicas is not None:
            listed = endpoint.replicas
        elif endpoint.engine is not None:
            listed = (Replica(url=endpoint.base_url),)
        else:
            return None
        old = previous.by_url if previous is not None else {}
        replicas = []
        for replica in listed:
            state = old.get(replica.url) or ReplicaState(replica.url)
            state.ready, state.zone = replica.ready, replica.zone
            replicas.append(state)
        return cls(endpoint, replicas)

    def scraped_by(self, source: LoadSource) -> bool:
        return self.engine is not None and self.source is source

    def ready(self) -> list[ReplicaState]:
        return [r for r in self.replicas if r.ready]

    def pick(self, rng: random.Random, avoid: Collection[str] = ()) -> ReplicaState | None:
        """A ready replica for the next attempt (None when none is ready). Replicas in `avoid`
        (failed earlier in this request) are chosen only when no other is ready."""
        ready = self.ready()
        if not ready:
            return None
        fresh = [r for r in ready if r.url not in avoid] or ready
        if len(fresh) == 1:
            return fresh[0]
        a, b = rng.sample(fresh, 2)
        now = self._clock()
        cost_a, cost_b = a.cost(now, self.max_age), b.cost(now, self.max_age)
        if cost_a == cost_b:
            return a if rng.random() < 0.5 else b
        return a if cost_a < cost_b else b

    def saturation(self, latency: float | None) -> Saturation | None:
        """The least-loaded ready replica's queue depth and predicted wait (None: none ready)."""
        now = self._clock()
        best: tuple[float, float | None] | None = None
        for r in self.ready():
            depth = r.queue_depth(now, self.max_age)
            wait = r.predicted_wait(now, self.max_age, latency)
            if best is None or (depth, wait or 0.0) < (best[0], best[1] or 0.0):
                best = (depth, wait)
        if best is None:
            return None
        return Saturation(self.endpoint, best[0], best[1], len(self.ready()), len(self.replicas))

    def describe(self) -> list[dict[str, object]]:
        """Each replica's state, for explain."""
        now = self._clock()
        rows: list[dict[str, object]] = []
        for r in self.replicas:
            reading = r.fresh_reading(now, self.max_age)
            rows.append(
                {
                    "url": r.url,
                    "ready": r.ready,
                    "outstanding": r.outstanding,
                    "waiting": reading.waiting if reading else None,
                    "running": reading.running if reading else None,
                    "kvCache": reading.kv_cache if reading else None,
                    "cost": round(r.cost(now, self.max_age), 3) if r.ready else None,
                }
            )
        return rows

    def observe(self, url: str, reading: LoadReading, at: float | None = None) -> bool:
        replica = self.by_url.get(url)
        if replica is None:
            return False
        replica.observe(reading, self._clock() if at is None else at)
        return True
