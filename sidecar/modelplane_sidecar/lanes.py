"""Strategy lanes: real-time and batch requests, each admitted under its own concurrency share.

A request is in the batch lane when its rule or model alias says `lane: batch`, else when the app
sends `x-modelplane-priority: batch`; everything else is real-time. Each lane has a number of
requests it may forward at once and a bounded FIFO queue for the ones that wait; a full queue is
a 429 `lane_queue_full`, a request that waited `maxWaitSeconds` a 503 `lane_wait_timeout`.

Batch requests try their allowed candidates cheapest first (e.g. a self-hosted model before a
cloud one), and one starts only while fewer batch requests than `endpointShare` of its cheapest
endpoint's `limits.maxConcurrency` run there (and the endpoint is not full). Batch traffic can
therefore never hold more than its share of an endpoint: the rest stays free for real-time
requests, however many batch requests are waiting. Real-time requests are not limited unless the
real-time lane is given a `maxConcurrency`; an unlimited lane costs the request path nothing.

A busy cheapest endpoint is waited for (routing keeps a full endpoint among a batch request's
candidates); the request spills to the next candidate with room only once that endpoint is not
healthy (breaker open, no ready replica) or it has waited `maxWaitSeconds`, and gets the 503
when none has room.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from .config import LaneName, LaneSettings, ModelAlias
from .errors import ApiError
from .metrics import SidecarMetrics
from .routing import RouteDecision, RoutedRequest
from .routing.filters import Removal
from .runtime import EndpointRuntime, Snapshot

#: How often the head of a batch queue re-checks its endpoint's load (which real-time requests
#: change without telling the lane).
_POLL_SECONDS = 0.02
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Lane:
    """Admission of one lane: a slot count and a FIFO queue of bounded length and wait."""

    def __init__(self, name: LaneName) -> None:
        self.name = name
        self.in_flight = 0
        self.queued = 0
        self._turn = asyncio.Lock()
        self._released = asyncio.Event()

    async def acquire(
        self,
        settings: LaneSettings,
        room: Callable[[], bool] | None,
        last_chance: Callable[[], bool] | None = None,
    ) -> float:
        """Take a slot, waiting in line if needed; returns the seconds waited.

        `room`: whether the request may start besides a free slot (re-checked while it heads the
        queue). `last_chance`: asked once when the wait bound passes, with a slot free: True
        takes the slot after all (a batch request spilling to another endpoint), False is the
        503."""
        limit = settings.max_concurrency

        def free() -> bool:
            return (limit is None or self.in_flight < limit) and (room is None or room())

        if not self.queued and free():
            self.in_flight += 1
            return 0.0
        if self.queued >= settings.max_queue:
            raise ApiError(
                429,
                f"The {self.name.value} lane is full: {self.in_flight} requests in flight and "
                f"{self.queued} waiting (queue limit {settings.max_queue})",
                type="requests",
                code="lane_queue_full",
                headers={"retry-after": "1"},
            )
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.queued += 1
        try:
            async with asyncio.timeout(settings.max_wait_seconds), self._turn:
                while not free():
                    self._released.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_POLL_SECONDS if room is not None else None):
                            await self._released.wait()
                self.in_flight += 1
        except TimeoutError:
            if (
                last_chance is not None
                and (limit is None or self.in_flight < limit)
                and last_chance()
            ):
                self.in_flight += 1
                return loop.time() - started
            raise ApiError(
                503,
                f"Waited {settings.max_wait_seconds:g}s in the {self.name.value} lane without "
                "capacity becoming free",
                type="server_error",
                code="lane_wait_timeout",
            ) from None
        finally:
            self.queued -= 1
        return loop.time() - started

    def release(self) -> None:
        self.in_flight -= 1
        self._released.set()


@dataclass(slots=True)
class LaneTicket:
    """A taken slot; released once when the request is done."""

    lane: Lane
    #: Batch requests per endpoint; this request counts at `endpoint` until released.
    counts: dict[str, int] | None = None
    endpoint: str = ""
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.counts is not None:
            self.counts[self.endpoint] -= 1
        self.lane.release()


def endpoint_room(endpoint: EndpointRuntime, share: float, batch_here: int) -> bool:
    """Whether one more batch request may start on `endpoint`: fewer batch requests there than
    its share of the endpoint's `maxConcurrency`, and the endpoint not full."""
    limit = endpoint.config.limits.max_concurrency
    if limit is None:
        return True
    return batch_here < max(1, int(limit * share)) and endpoint.state.in_flight < limit


def healthy(endpoint: EndpointRuntime, alias: ModelAlias) -> bool:
    """Whether routing would still try `endpoint` (routing/filters.py): its circuit breaker is
    not open and, self-hosted, a replica is ready."""
    if endpoint.state.breaker.retry_in(alias.circuit_breaker) > 0:
        return False
    pool = endpoint.pool
    return pool is None or bool(pool.ready())


def cheapest_first(decision: RouteDecision, request: RoutedRequest) -> None:
    """Reorder the decision's candidates by estimated price of this request (stable)."""
    body = request.body
    wanted = body.get("max_completion_tokens") or body.get("max_tokens")
    output = wanted if isinstance(wanted, int) and wanted > 0 else 256
    tokens = decision.input_tokens

    def price(endpoint: EndpointRuntime) -> float:
        p = endpoint.config.pricing
        return tokens * p.input_per_mtok + output * p.output_per_mtok

    ordered = sorted(decision.candidates, key=price)
    if ordered == decision.candidates:
        return
    decision.candidates = ordered
    trace = decision.trace
    if trace is not None:
        trace.pick += f"; batch lane: {ordered[0].name} first (cheapest)"
        trace.order = [e.name for e in ordered]


class LaneMetrics:
    def __init__(self, metrics: SidecarMetrics) -> None:
        r = metrics.registry
        self.admitted = Counter(
            "modelplane_lane_admitted",
            "Requests admitted to a lane (realtime, batch).",
            ["lane"],
            registry=r,
        )
        self.rejected = Counter(
            "modelplane_lane_rejected",
            "Requests a lane refused, by reason (lane_queue_full, lane_wait_timeout).",
            ["lane", "reason"],
            registry=r,
        )
        self.wait = Histogram(
            "modelplane_lane_wait_seconds",
            "Time requests waited in a lane's queue before they were forwarded.",
            ["lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.spilled = Counter(
            "modelplane_lane_spilled",
            "Batch requests admitted for a pricier endpoint than their cheapest one, by reason "
            "(wait_bound: it stayed full for maxWaitSeconds; unhealthy: breaker open or no "
            "ready replica while waiting).",
            ["reason"],
            registry=r,
        )


class _LaneState:
    """In-flight and queued counts per lane, read when Prometheus scrapes."""

    def __init__(self, lanes: Mapping[LaneName, Lane]) -> None:
        self._lanes = lanes

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "modelplane_lane_in_flight_requests",
                "Requests of a lane being forwarded now (realtime counts only when limited).",
                labels=["lane"],
            ),
            GaugeMetricFamily(
                "modelplane_lane_queued_requests",
                "Requests waiting in a lane's queue.",
                labels=["lane"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        in_flight, queued = families = self._families()
        for name, lane in self._lanes.items():
            in_flight.add_metric([name.value], lane.in_flight)
            queued.add_metric([name.value], lane.queued)
        return families


class LaneGate:
    """The sidecar's lanes, kept across config reloads (their settings come per request)."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._lanes = {name: Lane(name) for name in LaneName}
        self.metrics = LaneMetrics(metrics)
        metrics.registry.register(_LaneState(self._lanes))
        #: Batch requests in flight per endpoint (the one each was admitted for).
        self._batch_at: dict[str, int] = {}

    def lane(self, name: LaneName) -> Lane:
        return self._lanes[name]

    def limited(self, snapshot: Snapshot, lane: LaneName) -> bool:
        """Whether requests of `lane` need admission (an unlimited real-time lane does not)."""
        return lane is LaneName.BATCH or snapshot.config.lanes.realtime.max_concurrency is not None

    async def wait_for_route(
        self, snapshot: Snapshot, route_again: Callable[[], RouteDecision]
    ) -> RouteDecision:
        """A batch request whose every candidate was at its limit (a 429 from routing) waits in
        the batch queue until routing finds one with room, instead of being refused.

        Raises ApiError 429 `lane_queue_full` or 503 `lane_wait_timeout` like `admit`, or the
        routing error if the route now refuses for another reason.
        """
        found: list[RouteDecision] = []

        def routed() -> bool:
            try:
                found[:] = [route_again()]
            except ApiError as exc:
                if exc.code == "rate_limit_exceeded":
                    return False
                raise
            return True

        gate = self._lanes[LaneName.BATCH]
        try:
            await gate.acquire(snapshot.config.lanes.batch, routed)
        except ApiError as exc:
            if exc.code in ("lane_queue_full", "lane_wait_timeout"):
                self.metrics.rejected.labels(LaneName.BATCH.value, exc.code).inc()
            raise
        # The slot is only the turn in the queue; admission proper follows with the decision.
        gate.release()
        return found[0]

    async def admit(
        self,
        snapshot: Snapshot,
        request: RoutedRequest,
        decision: RouteDecision,
        lane: LaneName,
    ) -> Callable[[], None] | None:
        """Wait for the request's turn in its lane; returns what frees its slot (None: an
        unlimited lane, nothing to hold).

        Raises ApiError 429 `lane_queue_full` or 503 `lane_wait_timeout`.
        """
        lanes = snapshot.config.lanes
        room: Callable[[], bool] | None = None
        settings: LaneSettings
        counts: dict[str, int] | None = None
        first = ""
        last_chance: Callable[[], bool] | None = None
        #: The candidate the batch request is admitted for (0: its first, the cheapest).
        chosen = [0]
        if lane is LaneName.BATCH:
            batch = lanes.batch
            settings = batch
            if batch.cheapest_first:
                cheapest_first(decision, request)
            candidates = decision.candidates
            counts = self._batch_at
            alias = decision.alias

            def fits(endpoint: EndpointRuntime) -> bool:
                return endpoint_room(endpoint, batch.endpoint_share, counts.get(endpoint.name, 0))

            def spill() -> bool:
                for i, other in enumerate(candidates[1:], 1):
                    if healthy(other, alias) and fits(other):
                        chosen[0] = i
                        return True
                return False

            def room() -> bool:
                # Wait for the first candidate while it is only busy; spill once it is not
                # healthy any more (breaker opened, no replica ready) to one that has room.
                if fits(candidates[0]):
                    chosen[0] = 0
                    return True
                return not healthy(candidates[0], alias) and spill()

            last_chance = spill

        else:
            settings = lanes.realtime
            if settings.max_concurrency is None:
                return None
        gate = self._lanes[lane]
        try:
            waited = await gate.acquire(settings, room, last_chance)
        except ApiError as exc:
            self.metrics.rejected.labels(lane.value, exc.code or "").inc()
            raise
        self.metrics.admitted.labels(lane.value).inc()
        if waited:
            self.metrics.wait.labels(lane.value).observe(waited)
        if counts is not None:
            first = self._admitted_for(decision, chosen[0], waited)
            counts[first] = counts.get(first, 0) + 1
        return LaneTicket(gate, counts, first).release

    def _admitted_for(self, decision: RouteDecision, chosen: int, waited: float) -> str:
        """Put the endpoint a batch request was admitted for first, and drop the others that
        are full now (as routing does for any other request), so a fallback never takes an
        endpoint's last slots from real-time traffic. Returns the endpoint's name."""
        candidates = decision.candidates
        target = candidates[chosen]
        trace = decision.trace
        if chosen:
            wanted = candidates[0]
            if healthy(wanted, decision.alias):
                reason, why = "wait_bound", f"still full after {waited:.1f}s"
            else:
                reason, why = "unhealthy", "not healthy (breaker open or no ready replica)"
            self.metrics.spilled.labels(reason).inc()
            if trace is not None:
                trace.pick += f"; batch lane: {wanted.name} {why}, spilled to {target.name}"
        kept = [target]
        for other in candidates:
            if other is target:
                continue
            limit = other.config.limits.max_concurrency
            if limit is not None and other.state.in_flight >= limit:
                reason = f"{other.state.in_flight} requests in flight, limit {limit} (batch lane)"
                decision.removed.append((other.name, reason))
                if trace is not None:
                    trace.removed.append(Removal(other.name, "batch-lane", reason))
            else:
                kept.append(other)
        decision.candidates = kept
        if trace is not None:
            trace.order = [e.name for e in kept]
        return target.name
