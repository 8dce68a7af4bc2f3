"""The sidecar's HTTP front door: OpenAI-compatible routes, health, readiness and metrics.

Handlers are thin: read and lightly parse the body, ask the routing pipeline for a decision, hand
it to the forwarder. The current config lives in a `ConfigHolder` whose snapshot is swapped
atomically on reload; every request keeps the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auditing import AuditSettings, AuditTrail, RequestEnd, open_trail
from .cache import CachePlan, ResponseCache
from .config import ConfigError, LaneName, LoadSource, RouterConfig, load_config_file
from .errors import ApiError, bad_request
from .forward import ClientDialect, Exchange, Forwarder
from .frontdoors import anthropic as anthropic_door
from .frontdoors.anthropic import FrontDoor
from .frontdoors.batch_api import BatchApi
from .frontdoors.count_tokens import TokenCounting
from .lanes import LaneGate
from .metrics import Outcome, SidecarMetrics, SyncState
from .pool import LoadScraper, ReplicaPool
from .providers.base import Operation
from .routing import (
    DecisionTrace,
    RouteDecision,
    RoutedRequest,
    decide,
    explain,
    operation_for,
    prepare_routing,
)
from .runtime import Snapshot
from .spend import SpendTracker

log = logging.getLogger("modelplane.sidecar")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConfigHolder:
    """Holds the serving snapshot and swaps it atomically when a valid new config arrives."""

    def __init__(self, metrics: SidecarMetrics) -> None:
        self._metrics = metrics
        self.snapshot: Snapshot | None = None
        self.source = "none"
        metrics.watch(lambda: self.snapshot)

    def apply(self, config: RouterConfig, source: str) -> bool:
        """Install `config`; returns False when it is identical to the one serving."""
        previous = self.snapshot
        if previous is not None and previous.version == config.version():
            self._metrics.config_reloads.labels("unchanged").inc()
            return False
        snapshot = Snapshot.build(config, previous)
        prepare_routing(config)
        self.snapshot = snapshot
        self.source = source
        self._metrics.config_applied_now(snapshot.version, source)
        self._metrics.config_reloads.labels("applied").inc()
        log.info(
            "config applied",
            extra={"version": snapshot.version, "source": source},
        )
        return True

    def apply_replicas(self, config: RouterConfig, changed: Collection[str], source: str) -> None:
        """Install `config`, which differs from the serving one only in the replica lists of the
        `changed` endpoints (a replica update from the control plane), without a full rebuild."""
        previous = self.snapshot
        if previous is None:
            raise ConfigError("a replica update needs a serving config to apply to")
        self.snapshot = previous.with_replicas(config, changed)
        self.source = source
        self._metrics.config_applied_now(self.snapshot.version, source)
        self._metrics.config_reloads.labels("applied").inc()
        log.info(
            "replica update applied",
            extra={"version": self.snapshot.version, "source": source},
        )

    def reject(self, error: Exception, source: str) -> None:
        self._metrics.config_reloads.labels("rejected").inc()
        serving = self.snapshot.version if self.snapshot else "none"
        log.error(
            "config rejected, keeping version %s: %s", serving, error, extra={"source": source}
        )


class FileConfigWatcher:
    """Reloads a config file when its content changes on disk, and on SIGHUP."""

    def __init__(self, path: Path, holder: ConfigHolder, interval: float) -> None:
        self._path = path
        self._holder = holder
        self._interval = interval
        self._stamp: tuple[float, int] | None = self._stat()
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    async def reload(self, reason: str) -> bool:
        loop = asyncio.get_running_loop()
        try:
            config = await loop.run_in_executor(None, load_config_file, self._path)
            # Building the snapshot resolves credentials (e.g. Bedrock's AWS keys): may fail too.
            return self._holder.apply(config, f"file:{self._path}")
        except ConfigError as exc:
            self._holder.reject(exc, f"file ({reason})")
            return False

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                await self.reload("file changed")

    def start(self, watch: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):
            log.warning("SIGHUP reload unavailable in this thread")
        if watch:
            self._task = loop.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given and len(given) <= 128:
        return given
    return os.urandom(8).hex()


class Sidecar:
    """The aiohttp application and its collaborators, wired once at start."""

    def __init__(
        self,
        holder: ConfigHolder,
        metrics: SidecarMetrics,
        audit: AuditTrail | None = None,
        spend: SpendTracker | None = None,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.audit = audit
        #: Budget leases from the operator (None when standalone: budgets are not enforced).
        self.spend = spend
        self._session: aiohttp.ClientSession | None = None
        self._forwarder: Forwarder | None = None
        #: Strategy lanes (docs/cache-and-lanes.md): the response cache and lane admission.
        self.cache = ResponseCache(metrics)
        self.lanes = LaneGate(metrics)
        self._batch_api = BatchApi(self._current, self._client_session, metrics, audit)
        self._token_counting = TokenCounting(metrics, audit)
        self._scraper: LoadScraper | None = None

    @property
    def forwarder(self) -> Forwarder:
        assert self._forwarder is not None, "sidecar not started"
        return self._forwarder

    def _current(self) -> Snapshot:
        snapshot = self.holder.snapshot
        if snapshot is None:
            raise ApiError(
                503, "The router has no configuration yet", type="server_error", code="not_ready"
            )
        return snapshot

    def _client_session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "sidecar not started"
        return self._session

    def build_app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._errors_middleware])
        app.router.add_post("/v1/chat/completions", self._op_handler(Operation.CHAT))
        app.router.add_post("/v1/completions", self._op_handler(Operation.COMPLETIONS))
        app.router.add_post("/v1/embeddings", self._op_handler(Operation.EMBEDDINGS))
        app.router.add_post("/v1/messages", self.anthropic_messages)
        app.router.add_post("/v1/messages/count_tokens", self.anthropic_count_tokens)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/modelplane/explain", self.explain)
        self._batch_api.add_routes(app.router)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            # Our own User-Agent rather than aiohttp's, and not `skip_auto_headers`, which
            # rebuilds the request's header set on every call (~2 us).
            headers={"user-agent": _USER_AGENT},
        )
        self._forwarder = Forwarder(self._session, self.metrics, audit=self.audit, spend=self.spend)
        # Self-hosted pools whose load this sidecar reads itself (standalone mode).
        self._scraper = LoadScraper(self._scraped_pools, self._session)
        self._scraper.start()
        if self.audit is not None:
            self.audit.start()

    def _scraped_pools(self) -> list[ReplicaPool]:
        snapshot = self.holder.snapshot
        if snapshot is None:
            return []
        return [p for p in snapshot.pools().values() if p.scraped_by(LoadSource.SCRAPE)]

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.cache.close()
        if self._scraper is not None:
            await self._scraper.stop()
        if self.audit is not None:
            await self.audit.close()
        if self._session is not None:
            await self._session.close()

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError(
                413,
                "Request body is larger than this router's hard limit of 512 MiB",
                code="request_too_large",
            ).response()
        except web.HTTPException as exc:
            if exc.status >= 400 and request.path.startswith("/v1/"):
                code = exc.reason.lower().replace(" ", "_")
                return ApiError(exc.status, exc.reason, code=code).response()
            raise

    def _op_handler(self, op: Operation) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.route(request, op)

        return handle

    async def anthropic_messages(self, http: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API, routed through the same engine (frontdoors/anthropic.py)."""
        return await anthropic_door.serve(lambda door: self.route(http, Operation.CHAT, door))

    async def anthropic_count_tokens(self, http: web.Request) -> web.StreamResponse:
        """Anthropic's token counting, by an endpoint routing picks (frontdoors/count_tokens.py)."""

        async def count(_: FrontDoor) -> web.StreamResponse:
            snapshot = self._current()

            async def read_body() -> dict[str, Any]:
                limit = snapshot.config.server.max_body_bytes
                return _parse_body(await _read_limited(http, limit))

            session = self._client_session()
            counting = self._token_counting
            return await counting.serve(snapshot, session, http, read_body, _request_id(http))

        return await anthropic_door.serve(count)

    async def route(
        self, http: web.Request, op: Operation, front_door: FrontDoor | None = None
    ) -> web.StreamResponse:
        received = time.perf_counter()
        request_id = _request_id(http)
        snapshot: Snapshot | None = None
        routed: RoutedRequest | None = None
        trace = DecisionTrace("")
        dialect: ClientDialect | None = None
        try:
            snapshot = self._current()
            limit = snapshot.config.server.max_body_bytes
            if http.content_length is not None and http.content_length > limit:
                raise ApiError(
                    413,
                    f"Request body of {http.content_length} bytes is larger than this router's "
                    f"limit of {limit} bytes",
                    code="request_too_large",
                )
            body = _parse_body(await _read_limited(http, limit))
            if front_door is not None:
                body, dialect = front_door(body)
            routed = _routed_request(op, body, http)
            trace.model = routed.model
            try:
                decision = decide(snapshot, routed, trace=trace)
            except ApiError as exc:
                waited = await self._batch_wait(snapshot, routed, trace, exc)
                if waited is None:
                    self.metrics.refusals.labels(
                        exc.headers.get("x-modelplane-rule", ""), exc.code or ""
                    ).inc()
                    raise
                decision = waited
            finally:
                self._count_findings(trace)
            cache, admit = self._strategy(snapshot, routed, decision)
        except ApiError as exc:
            cached = await self._cached_instead(
                http, received, request_id, snapshot, routed, trace, dialect, exc
            )
            if cached is not None:
                return cached
            self._refused(http, request_id, received, snapshot, routed, trace, exc)
            raise
        decision_s = time.perf_counter() - received
        self.metrics.decision.observe(decision_s)
        self.metrics.decided(
            decision.alias.name, decision.rule, decision.strategy.value, decision.arm
        ).inc()
        exchange = Exchange(
            http,
            snapshot,
            routed,
            decision,
            received,
            decision_s * 1000,
            request_id,
            dialect,
            cache=cache,
            admit=admit,
        )
        return await self.forwarder.forward(exchange)

    async def _batch_wait(
        self, snapshot: Snapshot, routed: RoutedRequest, trace: DecisionTrace, error: ApiError
    ) -> RouteDecision | None:
        """A batch request that routing refused because every candidate is at its limit waits
        in the batch queue for room (lanes.py); None: `error` stands."""
        if error.code != "rate_limit_exceeded" or trace.lane is not LaneName.BATCH:
            return None
        return await self.lanes.wait_for_route(snapshot, lambda: decide(snapshot, routed))

    def _strategy(
        self, snapshot: Snapshot, routed: RoutedRequest, decision: RouteDecision
    ) -> tuple[CachePlan | None, Callable[[], Awaitable[Callable[[], None] | None]] | None]:
        """The cache's plan for the request, and its lane admission when its lane is limited."""
        alias, route = decision.alias, decision.rule
        found = decision.trace.found if decision.trace is not None else None
        cache = None
        if found is not None:
            cache = self.cache.plan(snapshot, routed, alias, route, found.sensitivity)
        lane = decision.lane
        if cache is not None:
            cache.lane = lane.value
        if not self.lanes.limited(snapshot, lane):
            return cache, None
        return cache, functools.partial(self.lanes.admit, snapshot, routed, decision, lane)

    async def _cached_instead(
        self,
        http: web.Request,
        received: float,
        request_id: str,
        snapshot: Snapshot | None,
        routed: RoutedRequest | None,
        trace: DecisionTrace,
        dialect: ClientDialect | None,
        error: ApiError,
    ) -> web.StreamResponse | None:
        """With no endpoint left to try (all breakers open), a route that caches may still
        answer: fresh from the cache, or stale where its policy allows it."""
        if error.code != "no_endpoint_available" or snapshot is None or routed is None:
            return None
        alias = snapshot.aliases.get(routed.model)
        route, found = trace.route, trace.found
        if alias is None or route is None or found is None:
            return None
        try:
            plan = self.cache.plan(snapshot, routed, alias, route.name, found.sensitivity)
        except ApiError:
            return None
        if plan is None or not plan.stale_on_error:
            return None
        entry = await plan.lookup() or await plan.stale()
        if entry is None:
            return None
        removed = [(r.endpoint, r.reason) for r in trace.removed]
        decision = RouteDecision(
            alias, [], route.name, removed, route.strategy, "", found.size.input_tokens, trace
        )
        decision_ms = (time.perf_counter() - received) * 1000
        exchange = Exchange(
            http, snapshot, routed, decision, received, decision_ms, request_id, dialect, cache=plan
        )
        return await self.forwarder.serve_cached(exchange, entry, 0)

    def _count_findings(self, trace: DecisionTrace) -> None:
        found = trace.found
        if found is None:
            return
        hits = self.metrics.classifier_hits
        sensitivity = found.sensitivity
        for label in sensitivity.labels:
            hits.labels("sensitivity", label.value).inc()
        if sensitivity.declared:
            # Declared names were checked against the config's classes: a bounded set.
            for name in sensitivity.declared.split(","):
                hits.labels("declared-class", name.strip()).inc()
        if found.complexity_known:
            self.metrics.complexity.observe(found.complexity().score)

    def _refused(
        self,
        http: web.Request,
        request_id: str,
        received: float,
        snapshot: Snapshot | None,
        routed: RoutedRequest | None,
        trace: DecisionTrace,
        error: ApiError,
    ) -> None:
        """Account a request the router answered itself, before any upstream call."""
        error.headers.setdefault("x-request-id", request_id)
        known = snapshot is not None and routed is not None and routed.model in snapshot.aliases
        model = routed.model if known and routed is not None else None
        rule = trace.route.name if trace.route is not None else ""
        self.metrics.requests.labels(model or "", "", "", rule, Outcome.REFUSED).inc()
        if self.audit is None:
            return
        self.audit.request(
            RequestEnd(
                request_id,
                Outcome.REFUSED,
                error.status,
                http.path,
                snapshot,
                model,
                routed.stream if routed is not None else False,
                trace,
                rule or None,
                error=error.code or error.type,
                duration_s=time.perf_counter() - received,
                decision_ms=trace.micros / 1000 if trace.micros else None,
            )
        )

    async def explain(self, http: web.Request) -> web.Response:
        """The routing decision for a request body, with its full trace; calls no model.

        The operation is `?operation=chat|completions|embeddings`, else inferred from the body.
        Headers are the explain request's own (so `x-modelplane-data-class` etc. apply).
        """
        snapshot = self._current()
        body = _parse_body(await _read_limited(http, snapshot.config.server.max_body_bytes))
        try:
            op = operation_for(body, http.query.get("operation"))
        except ValueError as exc:
            raise bad_request(str(exc), param="operation") from None
        trace = explain(snapshot, _routed_request(op, body, http))
        return _json({"configVersion": snapshot.version, **trace.as_json()})

    async def list_models(self, request: web.Request) -> web.Response:
        snapshot = self._current()
        data = [
            {"id": alias.name, "object": "model", "created": 0, "owned_by": "modelplane"}
            for alias in snapshot.config.models
        ]
        return _json({"object": "list", "data": data})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        snapshot = self.holder.snapshot
        if snapshot is None:
            return _json({"status": "not ready", "reason": "no configuration yet"}, status=503)
        return _json({"status": "ready", "configVersion": snapshot.version})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


async def _read_limited(http: web.Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it passes `limit` (chunked bodies have no length)."""
    if http.content_length is not None:
        return await http.read()
    parts: list[bytes] = []
    size = 0
    while chunk := await http.content.readany():
        size += len(chunk)
        if size > limit:
            raise ApiError(
                413,
                f"Request body is larger than this router's limit of {limit} bytes",
                code="request_too_large",
            )
        parts.append(chunk)
    return b"".join(parts)


def _routed_request(op: Operation, body: dict[str, Any], http: web.Request) -> RoutedRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("The 'model' field is required and must be a string", param="model")
    stream_flag = body.get("stream", False)
    if not isinstance(stream_flag, bool):
        raise bad_request("The 'stream' field must be a boolean", param="stream")
    if op is Operation.EMBEDDINGS:
        stream_flag = False
    return RoutedRequest(op, body, http.headers, model, stream_flag)


def _parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, not {type(body).__name__}")
    return body


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def create_app(
    config: RouterConfig | None,
    metrics: SidecarMetrics | None = None,
    audit: AuditTrail | None = None,
    spend: SpendTracker | None = None,
) -> web.Application:
    """An app serving `config` (None: 503 until one is applied); the holder is reachable as
    app[HOLDER_KEY] for reloads. With `audit`, every routed request leaves a record there."""
    metrics = metrics or SidecarMetrics()
    holder = ConfigHolder(metrics)
    if config is not None:
        holder.apply(config, "initial")
    sidecar = Sidecar(holder, metrics, audit, spend)
    app = sidecar.build_app(_HARD_BODY_LIMIT)
    app[HOLDER_KEY] = holder
    app[SIDECAR_KEY] = sidecar
    return app


#: aiohttp's own cap; the configured (reloadable) limit is enforced per request below it.
_HARD_BODY_LIMIT = 512 * 1024 * 1024 + 1

HOLDER_KEY = web.AppKey("holder", ConfigHolder)
_USER_AGENT = "modelplane-sidecar"
SIDECAR_KEY = web.AppKey("sidecar", Sidecar)


async def serve_file(
    path: Path,
    host: str,
    port: int,
    health_port: int | None = None,
    audit: AuditSettings | None = None,
) -> None:
    """Run the sidecar from a config file until SIGINT/SIGTERM."""
    config = load_config_file(path)
    metrics = SidecarMetrics()
    metrics.set_sync_state(SyncState.STANDALONE)
    app = create_app(config, metrics, open_trail(audit, metrics) if audit else None)
    holder = app[HOLDER_KEY]
    watcher = FileConfigWatcher(path, holder, config.server.watch_interval_seconds)
    await serve_app(
        app,
        host,
        port,
        f"config {path}",
        start=lambda: watcher.start(config.server.watch_config),
        stop=watcher.stop,
        health_port=health_port,
    )


#: Tracked objects allocated (net) before the collector looks at the young generation. Requests
#: free their objects by reference counting; at the default 700 the collector ran every ~20
#: requests only to walk the objects of the requests in flight.
_GC_YOUNG_THRESHOLD = 10_000


def _settle_heap() -> None:
    """What start-up made (modules, the config schema, the app) lives as long as the process:
    collect once and freeze it, so the collector never walks it again (a full collection took
    20-40 ms), and let the young generation grow to a size the requests in flight fit in. Then
    hand the heap pages start-up freed back to the OS (building the config schema leaves ~1.3 MB;
    glibc's malloc_trim, skipped where the C library has none)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, older, oldest)
    import ctypes  # only here: a sidecar needs it once

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    source: str,
    start: Callable[[], None],
    stop: Callable[[], Awaitable[None]],
    health_port: int | None = None,
) -> None:
    """Listen on host:port, call `start` once listening, and run until SIGINT/SIGTERM.

    With `health_port`, /healthz and /readyz are also served on every interface at that port:
    the kubelet probes the Pod IP, while the router itself may listen on loopback only.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    health_runner: web.AppRunner | None = None
    if health_port is not None:
        health = web.Application()
        health.router.add_get("/healthz", app[SIDECAR_KEY].healthz)
        health.router.add_get("/readyz", app[SIDECAR_KEY].readyz)
        # Prometheus scrapes the Pod IP too; the metrics hold no request content or secrets.
        health.router.add_get("/metrics", app[SIDECAR_KEY].metrics_endpoint)
        health_runner = web.AppRunner(health, access_log=None)
        await health_runner.setup()
        await web.TCPSite(health_runner, None, health_port).start()
    start()
    _settle_heap()
    log.info("modelplane sidecar listening on http://%s:%d (%s)", host, port, source)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
    finally:
        await stop()
        if health_runner is not None:
            await health_runner.cleanup()
        await runner.cleanup()
