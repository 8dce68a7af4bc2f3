"""Scrape model servers' Prometheus metrics at a bounded rate, with jitter.

One scraper per process. Each tick it looks at the pools it is given, and scrapes every ready
replica whose turn has come: at most once per `scrapeIntervalSeconds` (jittered by ±20 % so
replicas and processes do not fall into step), at most `concurrency` scrapes in flight, each
bounded by a timeout and a response-size cap. A failed scrape leaves the last reading to age
out (`maxAgeSeconds`), after which the replica is balanced by outstanding requests only.

The sidecar runs one for pools with `loadMetrics.source: scrape` (standalone); the operator runs
one for `push` pools and shares the readings with every sidecar (docs/self-hosted.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable

import aiohttp

from ..config import Engine
from .engines import ENGINE_METRICS, LoadReading, reading_from
from .promtext import parse_samples
from .replicas import ReplicaPool

log = logging.getLogger("modelplane.sidecar.pool")

#: Model servers' /metrics pages are tens of kB; stop reading well past that.
MAX_METRICS_BYTES = 2 * 1024 * 1024
_TICK_SECONDS = 0.1


async def scrape(session: aiohttp.ClientSession, url: str, engine: Engine) -> LoadReading | None:
    """One replica's load from its metrics page at `url` (None when it says nothing usable).
    Callers bound it with a timeout."""
    async with session.get(url) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(
                resp.request_info, resp.history, status=resp.status, message="metrics page"
            )
        raw = await resp.content.read(MAX_METRICS_BYTES)
    text = raw.decode("utf-8", errors="replace")
    return reading_from(engine, parse_samples(text, ENGINE_METRICS[engine].names()))


class LoadScraper:
    def __init__(
        self,
        pools: Callable[[], Iterable[ReplicaPool]],
        session: aiohttp.ClientSession,
        *,
        timeout: float = 1.0,
        concurrency: int = 8,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pools = pools
        self._session = session
        self._timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._rng = rng or random.Random()
        self._clock = clock
        self._due: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        #: Scrapes done and failed, for tests and the docs' numbers.
        self.scrapes = 0
        self.failures = 0

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="load-scraper")

    async def stop(self) -> None:
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(_TICK_SECONDS)

    def tick(self) -> None:
        """Start the scrapes that are due now."""
        now = self._clock()
        seen: set[str] = set()
        for pool in self._pools():
            engine = pool.engine
            if engine is None:
                continue
            for replica in pool.ready():
                url = replica.origin + pool.metrics_path
                seen.add(url)
                if url in self._inflight or self._due.get(url, 0.0) > now:
                    continue
                jitter = 0.8 + 0.4 * self._rng.random()
                self._due[url] = now + pool.scrape_interval * jitter
                self._inflight.add(url)
                task = asyncio.get_running_loop().create_task(
                    self._scrape_into(pool, replica.url, url, engine)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        for url in [u for u in self._due if u not in seen]:
            del self._due[url]

    async def _scrape_into(self, pool: ReplicaPool, replica: str, url: str, engine: Engine) -> None:
        try:
            async with self._slots, asyncio.timeout(self._timeout):
                reading = await scrape(self._session, url, engine)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.failures += 1
            log.debug("scraping %s failed: %s", url, exc or type(exc).__name__)
            return
        finally:
            self._inflight.discard(url)
        self.scrapes += 1
        if reading is None:
            log.debug("%s has no %s load metrics", url, engine.value)
            return
        pool.observe(replica, reading, self._clock())
