"""The response cache as the request path sees it: a plan per request, then lookup or store.

`ResponseCache.plan()` runs after the routing decision and returns None when the request's route
does not cache (the common case costs one dict lookup). Otherwise the plan says whether the
request may be answered from the cache and whether its answer may be stored, and carries the key:
a sensitive request, a non-deterministic one (unless the route or the app allows it) and one the
app marks `no-store` are bypassed. The forwarder stores successful answers through the plan, and
when every candidate failed asks it for a stale answer if the route allows that. Identical
requests in flight at once share one upstream call through the plan (`follow`, `coalesce.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from ..config import CachePolicy, CacheStore, ModelAlias, RedisCache, RouterConfig
from ..errors import bad_request
from ..metrics import SidecarMetrics
from ..providers.base import Usage
from ..routing import RoutedRequest
from ..routing.classify import Sensitivity
from ..runtime import Snapshot
from .coalesce import FOLLOW_LIMIT, Flight, Flights
from .key import cache_key, deterministic, policy_version, tenant_of
from .replay import StreamRecorder
from .store import CachedResponse, LocalStore

if TYPE_CHECKING:
    from .redis_store import RedisStore

#: Request header: `allow` (cache although not deterministic), `no-cache` (do not answer from
#: the cache, but store the fresh answer), `no-store` (neither); comma-separated.
CONTROL_HEADER = "x-modelplane-cache-control"
#: Response header: hit, miss, stale, coalesced or bypass.
STATE_HEADER = "x-modelplane-cache"
_CONTROLS = frozenset({"allow", "no-cache", "no-store"})


class CacheState(StrEnum):
    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    #: Answered by an identical request's upstream call that was in flight (single flight).
    COALESCED = "coalesced"
    #: Caching is on for the route, but not for this request (sensitive, not deterministic,
    #: or the app said no-store).
    BYPASS = "bypass"


class CacheMetrics:
    """The cache's series on the sidecar's registry (hits and misses are SidecarMetrics')."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        r = metrics.registry
        self.hits = metrics.cache_hits
        self.misses = metrics.cache_misses
        self.stale = Counter(
            "modelplane_cache_stale_served",
            "Requests answered with a stale cached response because every endpoint failed.",
            ["model"],
            registry=r,
        )
        self.bypassed = Counter(
            "modelplane_cache_bypassed",
            "Requests on a caching route that were not cached, by reason (sensitive, "
            "not-deterministic, no-store).",
            ["model", "reason"],
            registry=r,
        )
        self.stores = Counter(
            "modelplane_cache_stores",
            "Answers written to the response cache.",
            ["model"],
            registry=r,
        )
        self.bytes = Gauge(
            "modelplane_cache_bytes", "Bytes held by the in-process response store.", registry=r
        )
        self.entries = Gauge(
            "modelplane_cache_entries", "Entries in the in-process response store.", registry=r
        )
        self.evictions = Counter(
            "modelplane_cache_evictions",
            "Entries dropped from the in-process store, by reason (size, expired).",
            ["reason"],
            registry=r,
        )
        self.backend_errors = Counter(
            "modelplane_cache_backend_errors",
            "Failed or timed-out calls to the shared cache backend (then served locally).",
            ["backend", "operation"],
            registry=r,
        )
        self.coalesced = Counter(
            "modelplane_cache_coalesced",
            "Requests answered by waiting for an identical request's upstream call in flight.",
            ["model"],
            registry=r,
        )
        self.coalesce_fallbacks = Counter(
            "modelplane_cache_coalesce_fallbacks",
            "Requests that found an identical one in flight but called upstream themselves, by "
            "reason (leader-failed, waiters-full, follow-limit).",
            ["model", "reason"],
            registry=r,
        )
        self.coalesce_waiting = Gauge(
            "modelplane_cache_coalesce_waiting",
            "Requests now waiting for an identical request's upstream call.",
            registry=r,
        )
        self.backend_up = Gauge(
            "modelplane_cache_backend_up",
            "1 while the shared cache backend answers, 0 while its breaker is open.",
            ["backend"],
            registry=r,
        )


@dataclass(slots=True, frozen=True)
class _Setup:
    """What one config version means for the cache (computed once per version)."""

    tenant: str
    version: str
    #: Rules that set their own policy; any other route takes the requested alias's.
    rules: Mapping[str, CachePolicy]
    any_enabled: bool


class ResponseCache:
    def __init__(self, metrics: SidecarMetrics, *, clock: Callable[[], float] = time.time) -> None:
        self.metrics = CacheMetrics(metrics)
        self._clock = clock
        defaults = CacheStore()
        self.local = LocalStore(defaults.max_bytes, defaults.max_entries, self._evicted)
        self.redis: RedisStore | None = None
        self._setups: dict[str, _Setup] = {}
        self._closing: set[asyncio.Task[None]] = set()
        #: Upstream calls that identical requests may wait for (request coalescing).
        self.flights = Flights()

    # -- configuration ---------------------------------------------------------------------------

    def _setup(self, snapshot: Snapshot) -> _Setup:
        setup = self._setups.get(snapshot.version)
        if setup is not None:
            return setup
        config = snapshot.config
        rules = {r.name: r.cache for r in config.rules if r.cache is not None}
        enabled = any(p.enabled for p in rules.values()) or any(
            m.cache.enabled for m in config.models
        )
        setup = _Setup(
            tenant_of(config),
            policy_version(config) if enabled else "",
            rules,
            enabled,
        )
        if len(self._setups) >= 4:
            self._setups.pop(next(iter(self._setups)))
        self._setups[snapshot.version] = setup
        self._configure_store(config)
        return setup

    def _configure_store(self, config: RouterConfig) -> None:
        store = config.cache
        self.local.resize(store.max_bytes, store.max_entries)
        self._gauges()
        current = self.redis.settings if self.redis is not None else None
        if store.redis != current:
            self._replace_redis(store.redis)

    def _replace_redis(self, settings: RedisCache | None) -> None:
        old = self.redis
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self.redis = None
        if settings is None:
            return
        # Imported here: the redis client costs about 7 MB of memory, only worth it when used.
        from .redis_store import RedisStore

        backend = "redis"
        self.metrics.backend_up.labels(backend).set(1)
        self.redis = RedisStore(
            settings,
            on_failure=lambda op: self.metrics.backend_errors.labels(backend, op).inc(),
            on_state=lambda up: self.metrics.backend_up.labels(backend).set(1 if up else 0),
        )

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()
            self.redis = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the request path ------------------------------------------------------------------------

    def plan(
        self,
        snapshot: Snapshot,
        request: RoutedRequest,
        alias: ModelAlias,
        route: str,
        sensitivity: Sensitivity,
    ) -> CachePlan | None:
        """How the cache takes part in this request; None when its route does not cache."""
        setup = self._setup(snapshot)
        if not setup.any_enabled:
            return None
        policy = setup.rules.get(route) or alias.cache
        if not policy.enabled:
            return None
        model = alias.name
        read = write = True
        allow = False
        control = request.headers.get(CONTROL_HEADER)
        if control:
            tokens = {t.strip().lower() for t in control.split(",") if t.strip()}
            unknown = sorted(tokens - _CONTROLS)
            if unknown:
                raise bad_request(
                    f"Header {CONTROL_HEADER} has unknown value(s) {', '.join(unknown)}; "
                    "use allow, no-cache or no-store",
                    param=CONTROL_HEADER,
                )
            allow = "allow" in tokens
            read = "no-cache" not in tokens and "no-store" not in tokens
            write = "no-store" not in tokens
        if _sensitive(sensitivity, snapshot.config.sensitivity.default_class):
            reason = "sensitive"
        elif not write:
            reason = "no-store"
        elif (
            policy.deterministic_only
            and not allow
            and not deterministic(request.op.value, request.body)
        ):
            reason = "not-deterministic"
        else:
            key = cache_key(
                setup.tenant, setup.version, request.op.value, model, route, request.body
            )
            if not read:
                self.metrics.misses.labels(model).inc()
            return CachePlan(self, policy, model, setup.tenant, key, read)
        self.metrics.bypassed.labels(model, reason).inc()
        return CachePlan(self, policy, model, setup.tenant, None, False, CacheState.BYPASS)

    async def _get(self, tenant: str, key: str, now: float) -> CachedResponse | None:
        entry = self.local.get(key, now)
        if entry is None and self.redis is not None:
            shared = await self.redis.get(tenant, key)
            # While this request waited for Redis, the leader of an identical request's flight
            # may have stored its answer here and landed (before its Redis write, if any, was
            # done): without looking again, this request would find no flight and call upstream
            # a second time.
            entry = self.local.get(key, now)
            if entry is None and shared is not None and now < shared.keep_until:
                self.local.put(key, shared)
                self._gauges()
                entry = shared
        if entry is not None and entry.tenant != tenant:
            return None
        return entry

    def _store(self, plan: CachePlan, body: bytes, endpoint: str) -> None:
        assert plan.key is not None
        policy = plan.policy
        if len(body) > policy.max_entry_bytes:
            return
        now = self._clock()
        fresh = now + policy.ttl_seconds
        keep = fresh + (policy.stale_seconds if policy.stale_on_error else 0.0)
        entry = CachedResponse(body, endpoint, plan.tenant, now, fresh, keep)
        if self.local.put(plan.key, entry):
            self.metrics.stores.labels(plan.model).inc()
            self._gauges()
        if self.redis is not None:
            self.redis.put(plan.key, entry)

    def _evicted(self, reason: str, size: int) -> None:
        self.metrics.evictions.labels(reason).inc()

    def _gauges(self) -> None:
        self.metrics.bytes.set(self.local.bytes)
        self.metrics.entries.set(len(self.local))


def _sensitive(sensitivity: Sensitivity, default_class: str) -> bool:
    """Anything a detector found, any restricted class, any class beyond the default one."""
    return (
        bool(sensitivity.labels)
        or bool(sensitivity.restricted)
        or sensitivity.classes != frozenset((default_class,))
    )


class CachePlan:
    """The cache's part in one request (`key` None: bypassed, nothing read or stored)."""

    __slots__ = (
        "_answer",
        "_cache",
        "flight",
        "key",
        "lane",
        "leader",
        "model",
        "policy",
        "read",
        "state",
        "tenant",
    )

    def __init__(
        self,
        cache: ResponseCache,
        policy: CachePolicy,
        model: str,
        tenant: str,
        key: str | None,
        read: bool,
        state: CacheState = CacheState.MISS,
    ) -> None:
        self._cache = cache
        self.policy = policy
        self.model = model
        self.tenant = tenant
        self.key = key
        self.read = read
        #: What the `x-modelplane-cache` response header says.
        self.state = state
        #: The request's lane: requests coalesce only with requests of the same lane.
        self.lane = ""
        #: The flight this request leads (it makes the upstream call others wait for).
        self.flight: Flight | None = None
        #: A coalesced answer: the request id of the request whose call gave it.
        self.leader: str | None = None
        self._answer: CachedResponse | None = None

    @property
    def writes(self) -> bool:
        return self.key is not None

    @property
    def stale_on_error(self) -> bool:
        return self.key is not None and self.policy.stale_on_error

    async def lookup(self) -> CachedResponse | None:
        """A fresh answer for this request, or None (counted as a hit or a miss)."""
        if self.key is None or not self.read:
            return None
        cache = self._cache
        now = cache._clock()
        entry = await cache._get(self.tenant, self.key, now)
        if entry is not None and entry.fresh(now):
            cache.metrics.hits.labels(self.model).inc()
            self.state = CacheState.HIT
            return entry
        cache.metrics.misses.labels(self.model).inc()
        return None

    async def stale(self) -> CachedResponse | None:
        """The last answer stored for this request, fresh or not, if the route allows it."""
        if not self.stale_on_error:
            return None
        assert self.key is not None
        cache = self._cache
        entry = await cache._get(self.tenant, self.key, cache._clock())
        if entry is not None:
            cache.metrics.stale.labels(self.model).inc()
            self.state = CacheState.STALE
        return entry

    def store(self, body: bytes, endpoint: str) -> None:
        if self.key is not None:
            self._cache._store(self, body, endpoint)
            if self.flight is not None:
                now = self._cache._clock()
                self._answer = CachedResponse(body, endpoint, self.tenant, now, now, now)

    @property
    def coalesces(self) -> bool:
        return self.key is not None and self.policy.coalesce

    async def follow(self, request_id: str, within: float) -> CachedResponse | None:
        """Wait for an identical request in flight and return its answer, or None: this request
        calls upstream itself, leading a new flight when none is in the air.

        TimeoutError when `within` seconds (the request's own deadline) pass while waiting.
        """
        assert self.key is not None
        cache = self._cache
        metrics = cache.metrics
        flights = cache.flights
        key = f"{self.key}/{self.lane}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        followed = 0
        while (flight := flights.get(key)) is not None:
            if not self.read:
                # no-cache: wants an answer of its own, and leaves the flight in the air.
                return None
            if followed >= FOLLOW_LIMIT:
                metrics.coalesce_fallbacks.labels(self.model, "follow-limit").inc()
                return None
            if flight.waiters >= self.policy.coalesce_max_waiters:
                metrics.coalesce_fallbacks.labels(self.model, "waiters-full").inc()
                return None
            followed += 1
            metrics.coalesce_waiting.inc()
            try:
                answer = await flight.wait(deadline - loop.time())
            finally:
                metrics.coalesce_waiting.dec()
            if answer is not None:
                metrics.coalesced.labels(self.model).inc()
                self.state = CacheState.COALESCED
                self.leader = flight.leader
                return answer
            metrics.coalesce_fallbacks.labels(self.model, "leader-failed").inc()
        self.flight = flights.take_off(key, request_id)
        return None

    def land(self) -> None:
        """The leading request ended: hand its answer (if it got a complete one) to the flight's
        waiters."""
        flight, self.flight = self.flight, None
        if flight is not None:
            self._cache.flights.land(flight, self._answer)

    def recorder(self) -> StreamRecorder | None:
        """A recorder for a streamed answer (None when nothing will be stored)."""
        if self.key is None:
            return None
        return StreamRecorder(self.policy.max_entry_bytes)

    def store_stream(self, recorder: StreamRecorder, endpoint: str, usage: Usage | None) -> None:
        body = recorder.completion(usage)
        if body is not None:
            self.store(body, endpoint)
