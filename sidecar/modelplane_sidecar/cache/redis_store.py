"""A shared Redis behind the local store, so the replicas of an app share their hits.

Redis is an optimisation, never a dependency: every call runs under a short timeout, and a failed
or slow call opens a breaker for `retrySeconds` during which Redis is not asked at all (lookups
answer from the local store only, writes are skipped). Writes never hold up a response: they run
as background tasks, a bounded number at a time. Keys are `<prefix><tenant>:<digest>`; an entry
read back must name the same tenant, or it is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import RedisCache
from .store import CachedResponse

log = logging.getLogger("modelplane.sidecar.cache")

#: Writes in flight at once; more are dropped (the local store still has the entry).
_MAX_PENDING_WRITES = 64

FailureHook = Callable[[str], None]
StateHook = Callable[[bool], None]


class RedisStore:
    def __init__(
        self,
        settings: RedisCache,
        *,
        on_failure: FailureHook | None = None,
        on_state: StateHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        password = settings.password.resolve() if settings.password is not None else None
        # No client-side retries: the breaker decides when Redis is worth asking again.
        self._client = aioredis.Redis.from_url(
            settings.url,
            password=password,
            socket_timeout=settings.timeout_seconds,
            socket_connect_timeout=settings.timeout_seconds,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._on_failure = on_failure
        self._on_state = on_state
        self._clock = clock
        self._down_until = 0.0
        self._up = True
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    def _key(self, tenant: str, key: str) -> str:
        return f"{self.settings.key_prefix}{tenant}:{key}"

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._down_until = self._clock() + self.settings.retry_seconds
        if self._on_failure is not None:
            self._on_failure(operation)
        if self._up:
            self._up = False
            if self._on_state is not None:
                self._on_state(False)
            reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning(
                "redis cache unavailable (%s %s); serving from the local cache, next try in %gs",
                operation,
                reason,
                self.settings.retry_seconds,
            )

    def _succeeded(self) -> None:
        if not self._up:
            self._up = True
            if self._on_state is not None:
                self._on_state(True)
            log.info("redis cache available again")

    async def get(self, tenant: str, key: str) -> CachedResponse | None:
        if not self.available:
            return None
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                raw = await self._client.get(self._key(tenant, key))
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("get", exc)
            return None
        self._succeeded()
        if not isinstance(raw, bytes):
            return None
        entry = CachedResponse.decode(raw)
        if entry is None or entry.tenant != tenant:
            return None
        return entry

    def put(self, key: str, entry: CachedResponse) -> None:
        """Write in the background (skipped while Redis is down or too many writes wait)."""
        if not self.available or len(self._writes) >= _MAX_PENDING_WRITES:
            return
        task = asyncio.get_running_loop().create_task(self._put(key, entry))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, key: str, entry: CachedResponse) -> None:
        keep_ms = int((entry.keep_until - time.time()) * 1000)
        if keep_ms <= 0:
            return
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                await self._client.set(self._key(entry.tenant, key), entry.encode(), px=keep_ms)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("set", exc)
            return
        self._succeeded()

    async def drain(self) -> None:
        """Wait for the writes in flight (tests, shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        await self._client.aclose()
