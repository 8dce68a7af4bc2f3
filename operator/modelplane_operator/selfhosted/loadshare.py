"""The shared load scrape: the operator reads each replica's metrics once for all sidecars.

Every sidecar scraping every replica costs the model servers N_sidecars x N_replicas scrapes
per interval; here it is N_replicas, whatever the number of sidecars. The operator keeps a
`ReplicaPool` per self-hosted endpoint of each namespace's compiled config (those with
`loadMetrics.source: push`), scrapes them with the sidecar's own bounded, jittered scraper, and
every `interval` sends the namespace's sidecars one small `load` message over the config stream
(skipped when nothing changed and the last one is younger than `max_quiet`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import orjson

from modelplane_sidecar import config as rc
from modelplane_sidecar.pool import LoadScraper, ReplicaPool, load_message

from ..distribution.hub import ConfigHub

log = logging.getLogger("modelplane.operator.loadshare")


class LoadShare:
    def __init__(self, hub: ConfigHub, interval: float = 1.0, max_quiet: float = 5.0) -> None:
        self._hub = hub
        self._interval = interval
        self._max_quiet = max_quiet
        self._pools: dict[str, dict[str, ReplicaPool]] = {}
        self._last: dict[str, tuple[Any, float]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._scraper: LoadScraper | None = None
        self._task: asyncio.Task[None] | None = None
        #: Load messages sent (one per namespace per send), for tests.
        self.sent = 0

    def update(self, namespace: str, config: rc.RouterConfig | None) -> None:
        """Track the push-mode pools of the namespace's newly compiled config."""
        old = self._pools.get(namespace, {})
        pools: dict[str, ReplicaPool] = {}
        for endpoint in config.endpoints if config is not None else ():
            if endpoint.engine is None or endpoint.load_metrics.source is not rc.LoadSource.PUSH:
                continue
            pool = ReplicaPool.build(endpoint, old.get(endpoint.name))
            if pool is not None:
                pools[endpoint.name] = pool
        if pools:
            self._pools[namespace] = pools
            self._ensure_started()
        else:
            self._pools.pop(namespace, None)

    def pools(self, namespace: str) -> dict[str, ReplicaPool]:
        return self._pools.get(namespace, {})

    def _all(self) -> list[ReplicaPool]:
        return [p for pools in self._pools.values() for p in pools.values()]

    def _ensure_started(self) -> None:
        if self._task is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=16), skip_auto_headers=("User-Agent",)
        )
        self._scraper = LoadScraper(self._all, self._session)
        self._scraper.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="load-share")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            now = loop.time()
            for namespace, pools in list(self._pools.items()):
                message = load_message(pools.values())
                if not message["endpoints"]:
                    continue
                content = {
                    name: [(e["url"], e["waiting"], e["running"], e.get("kvCache")) for e in rows]
                    for name, rows in message["endpoints"].items()
                }
                last = self._last.get(namespace)
                if last is not None and last[0] == content and now - last[1] < self._max_quiet:
                    continue
                self._last[namespace] = (content, now)
                if self._hub.broadcast(namespace, orjson.dumps(message)):
                    self.sent += 1

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._scraper is not None:
            await self._scraper.stop()
        if self._session is not None:
            await self._session.close()
