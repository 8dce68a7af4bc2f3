"""Execute a route decision: call candidates in order with timeouts, retries and fallback.

Per attempt: the breaker is asked first (an open breaker skips the endpoint without waiting), the
call runs under the attempt timeout and the request's overall deadline, and its failure is
classified. Retriable failures are retried on the same endpoint with exponential backoff and full
jitter (a Retry-After is honoured when it is short enough, otherwise the router falls back at
once); everything else falls back to the next candidate. A 4xx the client caused ends the request
with the upstream's own answer. Streams may fail over only until their first byte reaches the
app; after that an upstream failure ends the app's stream with an error event.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import orjson
from aiohttp import web

from .auditing import AuditTrail, RequestEnd
from .cache import STATE_HEADER, CachedResponse, CachePlan, CacheState, replay_frames
from .config import RetryOn
from .errors import ApiError
from .metrics import Outcome, SidecarMetrics
from .pool import ReplicaState
from .providers.base import (
    ANOTHER_ENDPOINT_MAY_SERVE,
    FailureKind,
    StreamTranslator,
    Translated,
    UpstreamFailure,
    Usage,
)
from .routing import RouteDecision, RoutedRequest
from .runtime import EndpointRuntime, Snapshot
from .spend import BudgetRefusal, Hold, SpendTracker, plan_call
from .timeouts import Timeouts

_RETRY_CLASS = {
    FailureKind.CONNECT: RetryOn.CONNECT,
    FailureKind.TIMEOUT: RetryOn.TIMEOUT,
    FailureKind.RATE_LIMIT: RetryOn.RATE_LIMIT,
    FailureKind.SERVER_ERROR: RetryOn.SERVER_ERROR,
    FailureKind.PROTOCOL: RetryOn.SERVER_ERROR,
}
#: Failures that say the endpoint itself is unhealthy (they feed its circuit breaker).
_UNHEALTHY = {
    FailureKind.CONNECT,
    FailureKind.TIMEOUT,
    FailureKind.SERVER_ERROR,
    FailureKind.PROTOCOL,
}

#: Failures of calls the upstream never worked on (their reservation is released).
_NOTHING_BILLED = {
    FailureKind.UNSUPPORTED,
    FailureKind.CONTEXT_LENGTH,
    FailureKind.CONTENT_POLICY,
    FailureKind.CLIENT_ERROR,
    FailureKind.RATE_LIMIT,
}

_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}

_SERVED_FROM_CACHE = {
    CacheState.HIT: Outcome.CACHE_HIT,
    CacheState.STALE: Outcome.CACHE_STALE,
    CacheState.COALESCED: Outcome.COALESCED,
}


@dataclass(slots=True)
class AttemptRecord:
    endpoint: str
    attempt: int
    outcome: str
    status: int | None = None
    kind: FailureKind | None = None
    #: For the audit record: ok, the failure kind, circuit_breaker_open, deadline_exceeded
    #: ("" for endpoints the routing pipeline removed; the record lists those apart).
    result: str = ""

    def describe(self) -> str:
        if self.attempt == 0:
            return f"{self.endpoint}: {self.outcome}"
        return f"{self.endpoint} attempt {self.attempt}: {self.outcome}"

    def as_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "status": self.status,
        }

    def as_audit(self) -> dict[str, Any] | None:
        """No message: upstream error texts may echo the request."""
        if not self.result:
            return None
        return {
            "endpoint": self.endpoint,
            "attempt": self.attempt,
            "result": self.result,
            "status": self.status,
        }


@dataclass(slots=True)
class _StreamStart:
    response: aiohttp.ClientResponse
    translator: StreamTranslator
    first: bytes
    replica: ReplicaState | None = None


class StreamRewriter(Protocol):
    def feed(self, frames: bytes) -> bytes:
        """OpenAI SSE frames in (whole events), the app's own stream format out."""
        ...


class ClientDialect(Protocol):
    """Rewrites the OpenAI-format answer for an app that speaks another API (`frontdoors/`)."""

    def response_body(self, body: bytes) -> bytes: ...

    def stream(self) -> StreamRewriter: ...


@dataclass(slots=True)
class Exchange:
    """Everything about one app request the forwarder needs besides the decision."""

    http: web.Request
    snapshot: Snapshot
    request: RoutedRequest
    decision: RouteDecision
    received_at: float
    decision_ms: float
    request_id: str
    #: Set when the app speaks another API than OpenAI's (e.g. Anthropic Messages).
    dialect: ClientDialect | None = None
    #: Every attempt and skipped endpoint so far, in order.
    attempts: list[AttemptRecord] = field(default_factory=list)
    #: Set once the request's metrics and audit record are written.
    finished: bool = False
    #: The response cache's part in this request (None: its route does not cache).
    cache: CachePlan | None = None
    #: Lane admission, awaited before the first attempt; returns what frees the lane slot.
    admit: Callable[[], Awaitable[Callable[[], None] | None]] | None = None
    release: Callable[[], None] | None = None
    #: The current attempt's budget reservation (spend.py), settled when the attempt ends.
    hold: Hold | None = None
    #: Why an endpoint was skipped for lack of budget (the 429 when nothing else could serve).
    budget_refusal: BudgetRefusal | None = None
    #: Replicas of self-hosted endpoints that failed this request (retries go elsewhere).
    failed_replicas: set[str] = field(default_factory=set)


@functools.lru_cache(maxsize=256)
def _connect_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """aiohttp's timeout for one attempt: it bounds connecting only (`Timeouts` bounds the
    whole attempt). One object per configured value instead of one per request."""
    return aiohttp.ClientTimeout(sock_connect=seconds)


def cost_usd(endpoint: EndpointRuntime, usage: Usage) -> float:
    price = endpoint.config.pricing
    cached_price = price.cached_input_per_mtok
    if cached_price is None:
        cached_price = price.input_per_mtok
    uncached = max(0, usage.input_tokens - usage.cached_input_tokens)
    return (
        uncached * price.input_per_mtok
        + usage.cached_input_tokens * cached_price
        + usage.output_tokens * price.output_per_mtok
    ) / 1_000_000


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        metrics: SidecarMetrics,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        audit: AuditTrail | None = None,
        spend: SpendTracker | None = None,
    ) -> None:
        self._session = session
        self._spend = spend
        self._metrics = metrics
        self._sleep = sleep
        self._jitter = jitter
        self._audit = audit
        self._replica_rng = random.Random()
        self._timeout = Timeouts()

    async def forward(self, ex: Exchange) -> web.StreamResponse:
        try:
            return await self._forward(ex)
        except asyncio.CancelledError:
            # The app went away while the router waited for an upstream answer.
            if not ex.finished:
                self._metrics.client_disconnects.labels(ex.decision.alias.name).inc()
                self._finish(ex, Outcome.CLIENT_DISCONNECTED, 499, None, None)
            raise
        finally:
            if ex.release is not None:
                ex.release()
            if ex.cache is not None and ex.cache.flight is not None:
                ex.cache.land()

    async def _forward(self, ex: Exchange) -> web.StreamResponse:
        waited = 0.0
        if ex.cache is not None and ex.cache.key is not None:
            cached = await ex.cache.lookup()
            if cached is not None:
                return await self.serve_cached(ex, cached, 0)
            if ex.cache.coalesces:
                shared, waited = await self._coalesce(ex)
                if shared is not None:
                    return shared
        if ex.admit is not None:
            await self._admit(ex)
        if ex.decision.overflow:
            self._metrics.overflow.labels(
                ex.decision.alias.name, ex.decision.rule, ex.decision.overflow
            ).inc()
        if ex.decision.hold is not None:
            await self._wait_for_capacity(ex)
        loop = asyncio.get_running_loop()
        alias = ex.decision.alias
        retry = alias.retry
        breaker_policy = alias.circuit_breaker
        deadline = loop.time() + alias.timeout.total_seconds - waited
        records = ex.attempts
        if ex.decision.removed:
            records.extend(
                AttemptRecord(name, 0, f"removed: {why}") for name, why in ex.decision.removed
            )
        attempts = 0
        tried_endpoints = 0
        last_client_failure: tuple[EndpointRuntime, UpstreamFailure] | None = None
        deadline_hit = False

        for endpoint in ex.decision.candidates:
            if deadline_hit:
                break
            if tried_endpoints:
                self._metrics.fallbacks.labels(alias.name, records[-1].endpoint).inc()
            tried_endpoints += 1
            for attempt in range(1, retry.max_attempts + 1):
                breaker = endpoint.state.breaker
                if not breaker.allow(breaker_policy):
                    wait = breaker.retry_in(breaker_policy)
                    records.append(
                        AttemptRecord(
                            endpoint.name,
                            0,
                            f"skipped: circuit breaker open (probe in {wait:.1f}s)",
                            result="circuit_breaker_open",
                        )
                    )
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    deadline_hit = True
                    break
                # Without a spend tracker there is nothing to reserve (and no coroutine to run).
                if self._spend is not None and not await self._reserve(ex, endpoint):
                    break
                attempts += 1
                try:
                    if ex.request.stream:
                        start = await self._start_stream(ex, endpoint, remaining)
                    else:
                        translated = await self._call(ex, endpoint, remaining)
                except UpstreamFailure as failure:
                    self._unhold(ex, failure)
                    failure.message = ex.snapshot.redact(failure.message.encode()).decode()
                    provider = endpoint.config.provider.value
                    self._metrics.attempts.labels(endpoint.name, provider, failure.kind).inc()
                    records.append(
                        AttemptRecord(
                            endpoint.name,
                            attempt,
                            failure.message,
                            failure.status,
                            failure.kind,
                            failure.kind.value,
                        )
                    )
                    self._record_health(endpoint, failure.kind, breaker_policy)
                    if failure.kind is FailureKind.CLIENT_ERROR:
                        return self._client_error(ex, endpoint, failure, attempts, tried_endpoints)
                    if failure.kind in ANOTHER_ENDPOINT_MAY_SERVE:
                        last_client_failure = (endpoint, failure)
                        break
                    delay = self._retry_delay(failure, attempt, retry.retry_on, ex)
                    if delay is None or loop.time() + delay >= deadline:
                        break
                    self._metrics.retries.labels(endpoint.name).inc()
                    await self._sleep(delay)
                    continue
                except BaseException:
                    breaker.release_probe()
                    raise
                breaker.record_success(breaker_policy)
                self._metrics.endpoint(endpoint.name, endpoint.config.provider).attempt_ok.inc()
                records.append(AttemptRecord(endpoint.name, attempt, "ok", 200, result="ok"))
                headers = self._headers(ex, endpoint, attempts, tried_endpoints - 1)
                if ex.request.stream:
                    return await self._relay_stream(ex, endpoint, start, headers)
                self._finish(ex, Outcome.OK, 200, endpoint, translated.usage)
                body = translated.body
                if ex.cache is not None:
                    ex.cache.store(body, endpoint.name)
                if ex.dialect is not None:
                    body = ex.dialect.response_body(body)
                return web.Response(body=body, content_type="application/json", headers=headers)

        if deadline_hit:
            records.append(
                AttemptRecord(
                    "(router)",
                    0,
                    f"deadline of {alias.timeout.total_seconds:g}s passed",
                    result="deadline_exceeded",
                )
            )
        if last_client_failure is not None and records[-1].kind in ANOTHER_ENDPOINT_MAY_SERVE:
            # No other endpoint could take over: the app gets the upstream's own answer.
            too_small, answer = last_client_failure
            return self._client_error(ex, too_small, answer, attempts, tried_endpoints)
        if ex.cache is not None and ex.cache.stale_on_error:
            stale = await ex.cache.stale()
            if stale is not None:
                return await self.serve_cached(ex, stale, attempts)
        raise self._exhausted(ex, records, attempts)

    async def _admit(self, ex: Exchange) -> None:
        """Wait for the request's lane (lanes.py); a lane refusal is this request's answer."""
        assert ex.admit is not None
        try:
            ex.release = await ex.admit()
        except ApiError as exc:
            exc.headers.setdefault("x-request-id", ex.request_id)
            exc.headers.setdefault("x-modelplane-rule", ex.decision.rule)
            self._finish(ex, Outcome.REFUSED, exc.status, None, None, error=exc.code)
            raise

    async def _coalesce(self, ex: Exchange) -> tuple[web.StreamResponse | None, float]:
        """Wait for an identical request's upstream call in flight (cache/coalesce.py): its
        answer, or None and the seconds waited when this request must call upstream itself."""
        plan = ex.cache
        assert plan is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = ex.decision.alias.timeout.total_seconds
        try:
            entry = await plan.follow(ex.request_id, total)
        except TimeoutError:
            ex.attempts.append(
                AttemptRecord(
                    "(router)",
                    0,
                    f"deadline of {total:g}s passed waiting for an identical request in flight",
                    result="deadline_exceeded",
                )
            )
            raise self._exhausted(ex, ex.attempts, 0) from None
        if entry is not None:
            return await self.serve_cached(ex, entry, 0), 0.0
        return None, loop.time() - started

    async def serve_cached(
        self, ex: Exchange, entry: CachedResponse, attempts: int
    ) -> web.StreamResponse:
        """Answer from the cache (a hit, a stale answer after `attempts` failed ones, or the
        answer of an identical request in flight).

        Accounted like any answer, with outcome cache_hit / cache_stale / coalesced and no cost.
        """
        plan = ex.cache
        assert plan is not None
        headers = {
            STATE_HEADER: plan.state.value,
            "x-modelplane-cache-age": str(max(0, int(time.time() - entry.stored_at))),
            "x-modelplane-endpoint": entry.endpoint,
            "x-modelplane-rule": ex.decision.rule,
            "x-modelplane-attempts": str(attempts),
            "x-modelplane-decision-ms": f"{ex.decision_ms:.3f}",
            "x-modelplane-config-version": ex.snapshot.version,
            "x-request-id": ex.request_id,
        }
        outcome = _SERVED_FROM_CACHE[plan.state]
        if plan.leader is not None:
            headers["x-modelplane-coalesced-with"] = plan.leader
        frames = None
        if ex.request.stream:
            options = ex.request.body.get("stream_options")
            usage = isinstance(options, dict) and bool(options.get("include_usage"))
            frames = replay_frames(entry.body, usage)
        if frames is None:
            self._finish(ex, outcome, 200, None, None)
            body = entry.body
            if ex.dialect is not None:
                body = ex.dialect.response_body(body)
            return web.Response(body=body, content_type="application/json", headers=headers)
        response = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        delivered = False
        try:
            await response.prepare(ex.http)
            await response.write(ex.dialect.stream().feed(frames) if ex.dialect else frames)
            delivered = True
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as gone:
            outcome = self._gone(ex, outcome, delivered)
            if not delivered or isinstance(gone, asyncio.CancelledError):
                raise
        finally:
            self._finish(ex, outcome, 200, None, None)
        return response

    def _gone(self, ex: Exchange, outcome: Outcome, delivered: bool) -> Outcome:
        """The outcome of a stream whose app went away. Once every event is written (`delivered`)
        the app had the whole answer and the outcome stands: the openai SDK closes the connection
        when the end of the body does not follow `[DONE]` within 0.1 s, as it may not on a
        loaded machine. Before that, the app left without it: `client_disconnected`."""
        if delivered:
            return outcome
        self._metrics.client_disconnects.labels(ex.decision.alias.name).inc()
        return Outcome.CLIENT_DISCONNECTED

    async def _wait_for_capacity(self, ex: Exchange) -> None:
        """A request that must not spill waits (bounded) for its self-hosted pool's capacity."""
        hold = ex.decision.hold
        assert hold is not None
        try:
            await hold.wait()
        except ApiError as exc:
            exc.headers.setdefault("x-request-id", ex.request_id)
            self._metrics.overflow.labels(ex.decision.alias.name, ex.decision.rule, "refused").inc()
            self._finish(ex, Outcome.REFUSED, exc.status, None, None, error=exc.code)
            raise

    def _retry_delay(
        self,
        failure: UpstreamFailure,
        attempt: int,
        retry_on: tuple[RetryOn, ...],
        ex: Exchange,
    ) -> float | None:
        """Seconds to wait before retrying the same endpoint, or None to fall back instead."""
        retry = ex.decision.alias.retry
        if attempt >= retry.max_attempts:
            return None
        cls = _RETRY_CLASS.get(failure.kind)
        if cls is None or cls not in retry_on:
            return None
        ceiling = min(retry.backoff_max_seconds, retry.backoff_base_seconds * 2.0 ** (attempt - 1))
        delay = ceiling * self._jitter()
        if failure.retry_after is not None:
            if failure.retry_after > retry.max_retry_after_seconds:
                return None
            delay = max(delay, failure.retry_after)
        return delay

    def _record_health(self, endpoint: EndpointRuntime, kind: FailureKind, policy: Any) -> None:
        breaker = endpoint.state.breaker
        if kind in _UNHEALTHY:
            breaker.record_failure(policy)
        elif kind in (FailureKind.RATE_LIMIT, FailureKind.UNSUPPORTED):
            # Alive but busy, or never called: no verdict for the breaker.
            breaker.release_probe()
        else:
            breaker.record_success(policy)

    def _timeout_for(self, endpoint: EndpointRuntime, ex: Exchange, remaining: float) -> float:
        per_attempt = ex.decision.alias.timeout.attempt_seconds
        if per_attempt is None:
            per_attempt = endpoint.config.timeouts.request_seconds
        return min(per_attempt, remaining)

    async def _call(self, ex: Exchange, endpoint: EndpointRuntime, remaining: float) -> Translated:
        cfg = endpoint.config
        timeout = self._timeout_for(endpoint, ex, remaining)
        credentials = await endpoint.credentials.current(timeout)
        req = endpoint.adapter.build_request(
            cfg, credentials, ex.request.op, ex.request.body, False
        )
        url, replica = self._take_replica(ex, endpoint, req.url)
        endpoint.state.in_flight += 1
        endpoint.state.stats.note_request(ex.decision.input_tokens)
        sent = time.perf_counter()
        try:
            with self._timeout(timeout):
                async with self._session.request(
                    req.method,
                    url,
                    headers=req.headers,
                    data=req.body,
                    timeout=_connect_timeout(cfg.timeouts.connect_seconds),
                ) as resp:
                    data = await resp.read()
                    status = resp.status
                    resp_headers = resp.headers
        except aiohttp.ConnectionTimeoutError:
            # Also a TimeoutError: the connection, not the answer, was too slow.
            _replica_failed(ex, replica, connect=True)
            raise connect_timed_out(cfg.timeouts.connect_seconds) from None
        except TimeoutError:
            # A timeout is at least that slow: lowest-latency routing should see it.
            endpoint.state.stats.observe_latency(timeout)
            _replica_failed(ex, replica, connect=False)
            raise UpstreamFailure(
                FailureKind.TIMEOUT, f"no complete response within {timeout:.2f}s"
            ) from None
        except aiohttp.ClientError as exc:
            _replica_failed(ex, replica, connect=True)
            raise connection_failure(exc) from None
        finally:
            endpoint.state.in_flight -= 1
            if replica is not None:
                replica.outstanding -= 1
        if status >= 300:
            if status >= 500:
                _replica_failed(ex, replica, connect=False)
            raise endpoint.adapter.classify_error(cfg, status, resp_headers, data)
        endpoint.state.stats.observe_latency(time.perf_counter() - sent)
        return endpoint.adapter.translate_response(cfg, ex.request.op, data, ex.request.body)

    async def _start_stream(
        self, ex: Exchange, endpoint: EndpointRuntime, remaining: float
    ) -> _StreamStart:
        """Open the upstream stream and read until the first bytes for the app exist."""
        cfg = endpoint.config
        timeout = self._timeout_for(endpoint, ex, remaining)
        credentials = await endpoint.credentials.current(timeout)
        req = endpoint.adapter.build_request(cfg, credentials, ex.request.op, ex.request.body, True)
        resp: aiohttp.ClientResponse | None = None
        url, replica = self._take_replica(ex, endpoint, req.url)
        endpoint.state.in_flight += 1
        endpoint.state.stats.note_request(ex.decision.input_tokens)
        sent = time.perf_counter()
        try:
            with self._timeout(timeout):
                resp = await self._session.request(
                    req.method,
                    url,
                    headers=req.headers,
                    data=req.body,
                    timeout=_connect_timeout(cfg.timeouts.connect_seconds),
                )
                if resp.status >= 300:
                    data = await resp.read()
                    if resp.status >= 500:
                        _replica_failed(ex, replica, connect=False)
                    raise endpoint.adapter.classify_error(cfg, resp.status, resp.headers, data)
                translator = endpoint.adapter.stream_translator(cfg, ex.request.op, ex.request.body)
                first = b""
                while not first:
                    chunk = await resp.content.readany()
                    if not chunk:
                        first = translator.finish()
                        if not first:
                            raise UpstreamFailure(
                                FailureKind.PROTOCOL, "upstream ended the stream without any data"
                            )
                        break
                    first = translator.feed(chunk)
            endpoint.state.stats.observe_ttft(time.perf_counter() - sent)
            return _StreamStart(resp, translator, first, replica)
        except BaseException as exc:
            endpoint.state.in_flight -= 1
            if replica is not None:
                replica.outstanding -= 1
            if resp is not None:
                resp.close()
            if isinstance(exc, aiohttp.ConnectionTimeoutError):
                _replica_failed(ex, replica, connect=True)
                raise connect_timed_out(cfg.timeouts.connect_seconds) from None
            if isinstance(exc, TimeoutError):
                _replica_failed(ex, replica, connect=False)
                raise UpstreamFailure(
                    FailureKind.TIMEOUT, f"no first stream event within {timeout:.2f}s"
                ) from None
            if isinstance(exc, aiohttp.ClientError):
                _replica_failed(ex, replica, connect=True)
                raise connection_failure(exc) from None
            raise

    def _take_replica(
        self, ex: Exchange, endpoint: EndpointRuntime, url: str
    ) -> tuple[str, ReplicaState | None]:
        """The URL for this attempt: on a load-picked replica for a self-hosted pool (its
        outstanding count taken until the attempt ends), else the adapter's own URL."""
        pool = endpoint.pool
        if pool is None:
            return url, None
        replica = pool.pick(self._replica_rng, ex.failed_replicas)
        if replica is None:
            raise UpstreamFailure(
                FailureKind.CONNECT,
                f"no ready replica (0 of {len(pool.replicas)} ready)",
            )
        base = endpoint.config.base_url
        if url.startswith(base):
            url = replica.url + url[len(base) :]
        replica.outstanding += 1
        replica.sent += 1
        return url, replica

    async def _relay_stream(
        self,
        ex: Exchange,
        endpoint: EndpointRuntime,
        start: _StreamStart,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        upstream = start.response
        translator = start.translator
        idle = endpoint.config.timeouts.stream_idle_seconds
        outcome = Outcome.OK
        ttft: float | None = None
        recorder = ex.cache.recorder() if ex.cache is not None else None
        delivered = False
        try:
            await response.prepare(ex.http)
            rewrite: Callable[[bytes], bytes] = (
                ex.dialect.stream().feed if ex.dialect is not None else _unchanged
            )
            if recorder is not None:
                rewrite = _recording(recorder.feed, rewrite)
            await response.write(rewrite(start.first))
            ttft = time.perf_counter() - ex.received_at
            series = self._metrics.endpoint(endpoint.name, endpoint.config.provider)
            series.ttft(ex.decision.alias.name).observe(ttft)
            broken: UpstreamFailure | None = None
            try:
                with self._timeout(idle) as idle_timer:
                    while True:
                        chunk = await upstream.content.readany()
                        if not chunk:
                            tail = translator.finish()
                            if tail:
                                await response.write(rewrite(tail))
                            break
                        out = translator.feed(chunk)
                        if out:
                            await response.write(rewrite(out))
                        idle_timer.touch()
            except TimeoutError:
                broken = UpstreamFailure(
                    FailureKind.TIMEOUT, f"upstream stream went silent for more than {idle:g}s"
                )
            except UpstreamFailure as exc:
                broken = exc
            except aiohttp.ClientPayloadError as exc:
                broken = connection_failure(exc)
            if broken is not None:
                outcome = Outcome.STREAM_ERROR
                message = ex.snapshot.redact(broken.message.encode()).decode()
                endpoint.state.breaker.record_failure(ex.decision.alias.circuit_breaker)
                self._metrics.stream_failures.labels(endpoint.name, broken.kind.value).inc()
                await response.write(rewrite(_stream_error_event(endpoint.name, message)))
            delivered = True
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as gone:
            outcome = self._gone(ex, outcome, delivered)
            if isinstance(gone, asyncio.CancelledError):
                raise
            # The app closed its end mid-stream (an ordinary event for streams, e.g. a stop
            # button): accounted above. Returning lets aiohttp drop the connection quietly,
            # where raising would log an error with a traceback for every such stream.
        finally:
            upstream.close()
            endpoint.state.in_flight -= 1
            if start.replica is not None:
                start.replica.outstanding -= 1
            usage = translator.usage or Usage(estimated=True)
            self._finish(ex, outcome, 200, endpoint, usage, ttft=ttft)
            if (
                recorder is not None
                and outcome is not Outcome.STREAM_ERROR
                and ex.cache is not None
            ):
                # Also when the app left after the upstream's last event (the SDK does not wait
                # long for the end of the body): the recorder keeps only a complete answer, which
                # the cache stores and a flight hands to its followers.
                ex.cache.store_stream(recorder, endpoint.name, translator.usage)
        return response

    def _finish(
        self,
        ex: Exchange,
        outcome: Outcome,
        status: int,
        endpoint: EndpointRuntime | None,
        usage: Usage | None,
        *,
        ttft: float | None = None,
        error: str | None = None,
    ) -> None:
        """The one place a forwarded request is accounted: metrics, then its audit record."""
        ex.finished = True
        if ex.hold is not None:
            self._settle(ex, endpoint, usage)
        elapsed = time.perf_counter() - ex.received_at
        model = ex.decision.alias.name
        rule = ex.decision.rule
        cost = 0.0
        if endpoint is None:
            self._metrics.requests.labels(model, "", "", rule, outcome).inc()
        else:
            series = self._metrics.endpoint(endpoint.name, endpoint.config.provider)
            series.requests(model, rule, outcome).inc()
            if usage is not None:
                series.latency(model).observe(elapsed)
                if usage.input_tokens:
                    series.input_tokens.inc(usage.input_tokens)
                if usage.output_tokens:
                    series.output_tokens.inc(usage.output_tokens)
                cost = cost_usd(endpoint, usage)
                if cost:
                    series.cost.inc(cost)
        if self._audit is None:
            return
        attempts = [a for a in (r.as_audit() for r in ex.attempts) if a is not None]
        self._audit.request(
            RequestEnd(
                ex.request_id,
                outcome,
                status,
                ex.http.path,
                ex.snapshot,
                model,
                ex.request.stream,
                ex.decision.trace,
                rule,
                endpoint,
                attempts,
                usage,
                cost,
                error,
                elapsed,
                ex.decision_ms,
                ttft,
                _coalesced_with(ex),
            )
        )

    def _headers(
        self, ex: Exchange, endpoint: EndpointRuntime, attempts: int, fallbacks: int
    ) -> dict[str, str]:
        return {
            "x-modelplane-endpoint": endpoint.name,
            "x-modelplane-rule": ex.decision.rule,
            "x-modelplane-attempts": str(attempts),
            "x-modelplane-fallbacks": str(fallbacks),
            "x-modelplane-decision-ms": f"{ex.decision_ms:.3f}",
            "x-modelplane-config-version": ex.snapshot.version,
            "x-request-id": ex.request_id,
            **({STATE_HEADER: ex.cache.state.value} if ex.cache is not None else {}),
        }

    def _client_error(
        self,
        ex: Exchange,
        endpoint: EndpointRuntime,
        failure: UpstreamFailure,
        attempts: int,
        tried: int,
    ) -> web.Response:
        headers = self._headers(ex, endpoint, attempts, tried - 1)
        status = failure.status or 400
        self._finish(
            ex, Outcome.CLIENT_ERROR, status, endpoint, None, error="upstream_client_error"
        )
        if failure.client_body is not None:
            body = ex.snapshot.redact(failure.client_body)
            return web.Response(
                status=status, body=body, content_type="application/json", headers=headers
            )
        return ApiError(status, failure.message, code="upstream_client_error").response(headers)

    async def _reserve(self, ex: Exchange, endpoint: EndpointRuntime) -> bool:
        """Reserve the call's worst case in the budgets covering the endpoint; False: skip it.

        Enforcing budgets force max_tokens into the request first, so the worst case is known.
        """
        if self._spend is None or not ex.snapshot.config.budgets:
            return True
        found = ex.decision.trace.found if ex.decision.trace is not None else None
        plan = plan_call(
            ex.snapshot.config.budgets,
            endpoint.config,
            ex.request.op,
            ex.request.body,
            found.text if found is not None else None,
        )
        if plan is None:
            return True
        ex.request.body = plan.body
        try:
            ex.hold = await self._spend.reserve(plan.budgets, endpoint.name, plan.worst_case)
        except BudgetRefusal as refusal:
            ex.budget_refusal = refusal
            self._metrics.budget_refusals.labels(refusal.budget).inc()
            ex.attempts.append(
                AttemptRecord(
                    endpoint.name, 0, f"skipped: {refusal.message}", result="budget_exhausted"
                )
            )
            return False
        return True

    def _unhold(self, ex: Exchange, failure: UpstreamFailure) -> None:
        """An attempt failed: free its reservation, unless the upstream may have billed it."""
        hold, ex.hold = ex.hold, None
        if hold is None or self._spend is None:
            return
        not_sent = failure.kind is FailureKind.CONNECT and failure.message.startswith(
            "cannot connect"
        )
        if failure.status is not None or failure.kind in _NOTHING_BILLED or not_sent:
            self._spend.release(hold)
        else:
            # A timeout or a broken connection: the provider may have done (and billed) the work.
            self._spend.settle(hold, None, None)

    def _settle(self, ex: Exchange, endpoint: EndpointRuntime | None, usage: Usage | None) -> None:
        """The call ended: settle at the reported cost, or keep the whole worst case."""
        hold, ex.hold = ex.hold, None
        if hold is None or self._spend is None:
            return
        if endpoint is not None and usage is not None and not usage.estimated:
            self._spend.settle(hold, cost_usd(endpoint, usage), usage)
        else:
            self._spend.settle(hold, None, usage)

    def _exhausted(self, ex: Exchange, records: list[AttemptRecord], attempts: int) -> ApiError:
        refusal = ex.budget_refusal
        if attempts == 0 and refusal is not None:
            self._finish(ex, Outcome.REFUSED, 429, None, None, error="budget_exhausted")
            return refusal.error(
                {
                    "x-modelplane-rule": ex.decision.rule,
                    "x-modelplane-budget": refusal.budget,
                    "x-request-id": ex.request_id,
                }
            )
        alias = ex.decision.alias
        failed = [r for r in records if r.kind is not None]
        capacity_only = all(r.kind is FailureKind.RATE_LIMIT for r in failed)
        causes = "; ".join(r.describe() for r in records) or "no candidate endpoints"
        if attempts == 0:
            status, code = 503, "no_endpoint_available"
            message = f"No endpoint of model {alias.name!r} could be tried: {causes}"
        else:
            status = 503 if capacity_only else 502
            code = "all_endpoints_failed"
            message = (
                f"All endpoints of model {alias.name!r} failed after {attempts} attempt(s): "
                f"{causes}"
            )
        self._finish(ex, Outcome.EXHAUSTED, status, None, None, error=code)
        return ApiError(
            status,
            message,
            type="upstream_error",
            code=code,
            extra={"attempts": [r.as_json() for r in records]},
            headers={
                "x-modelplane-attempts": str(attempts),
                "x-modelplane-rule": ex.decision.rule,
                "x-modelplane-decision-ms": f"{ex.decision_ms:.3f}",
                "x-request-id": ex.request_id,
            },
        )


def connect_timed_out(seconds: float) -> UpstreamFailure:
    """aiohttp's `sock_connect` timeout (`ConnectionTimeoutError`, a TimeoutError too): the
    upstream was never reached, so it is a connection failure, not a slow answer."""
    return UpstreamFailure(
        FailureKind.CONNECT, f"no connection to the upstream within {seconds:g}s (connect timeout)"
    )


def connection_failure(exc: aiohttp.ClientError) -> UpstreamFailure:
    """What an aiohttp client error means for routing: the upstream could not be reached."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return UpstreamFailure(
            FailureKind.CONNECT, f"cannot connect to {exc.host}:{exc.port}: {reason}"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamFailure(FailureKind.CONNECT, "upstream closed the connection without answer")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure(FailureKind.CONNECT, "upstream connection broke mid-response")
    detail = str(exc) or type(exc).__name__
    return UpstreamFailure(FailureKind.CONNECT, f"connection to upstream failed: {detail}")


def _replica_failed(ex: Exchange, replica: ReplicaState | None, *, connect: bool) -> None:
    """Retries of this request go to another replica; a refused connection also cools the
    replica down for every request for a moment."""
    if replica is None:
        return
    ex.failed_replicas.add(replica.url)
    if connect:
        replica.connection_failed(time.monotonic())


def _coalesced_with(ex: Exchange) -> dict[str, Any] | None:
    """The audit record of a coalesced answer names the request whose upstream call gave it."""
    leader = ex.cache.leader if ex.cache is not None else None
    return None if leader is None else {"coalescedWith": leader}


def _unchanged(frames: bytes) -> bytes:
    return frames


def _recording(
    record: Callable[[bytes], None], rewrite: Callable[[bytes], bytes]
) -> Callable[[bytes], bytes]:
    """`rewrite`, also handing the OpenAI frames (before any dialect) to the cache."""

    def feed(frames: bytes) -> bytes:
        record(frames)
        return rewrite(frames)

    return feed


def _stream_error_event(endpoint: str, message: str) -> bytes:
    error = {
        "message": f"The upstream stream from endpoint {endpoint!r} failed after it started: "
        f"{message}. The response above is incomplete.",
        "type": "upstream_error",
        "param": None,
        "code": "stream_interrupted",
    }
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"
