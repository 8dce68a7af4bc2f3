"""`POST /v1/messages/count_tokens`: Anthropic's token counting, by the endpoint routing picks.

The request is routed like a Messages request with the same prompt (so sensitivity and
compliance rules decide where the prompt may go, as they would for the real call), and the
first candidate whose provider can count tokens without running the model (an adapter that is
a `TokenCounter`: Anthropic's own `/v1/messages/count_tokens`, Bedrock's CountTokens) counts
them. A busy or failing endpoint hands over to the next candidate that can count; an upstream
4xx is the answer. The app gets Anthropic's `{"input_tokens": N}`, or an Anthropic error body
(`anthropic.serve` shapes it).

Every call is counted in `modelplane_count_tokens_requests{model,endpoint,outcome}` (a family of
its own: counting is no chat request, and has no tokens, cost or latency of one to account);
each upstream call in `modelplane_upstream_attempts` like any other attempt. Every call leaves an
audit record in the request records' format and chain (`auditing.py`): `api` is the path, with
the routing trace, the attempts, the outcome and `countTokens.inputTokens`; never the prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import Counter

from ..auditing import AuditTrail, RequestEnd
from ..errors import ApiError
from ..forward import connect_timed_out, connection_failure
from ..metrics import Outcome, SidecarMetrics
from ..providers.base import FailureKind, Operation, TokenCounter, UpstreamFailure
from ..routing import DecisionTrace, RoutedRequest, decide
from ..runtime import EndpointRuntime, Snapshot
from .anthropic import count_tokens_request

#: Failures after which the next candidate that can count is tried.
_NEXT_MAY_COUNT = frozenset(
    {
        FailureKind.CONNECT,
        FailureKind.TIMEOUT,
        FailureKind.RATE_LIMIT,
        FailureKind.SERVER_ERROR,
        FailureKind.PROTOCOL,
        FailureKind.UNSUPPORTED,
    }
)
_API = "/v1/messages/count_tokens"

BodyReader = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class CountCall:
    """What is known about one count_tokens call, for its metrics and audit record."""

    request_id: str
    started: float
    snapshot: Snapshot
    trace: DecisionTrace = field(default_factory=lambda: DecisionTrace(""))
    #: The model alias, once the config is known to have it.
    model: str | None = None
    endpoint: EndpointRuntime | None = None
    #: {endpoint, attempt, result, status} per upstream call, in order.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    input_tokens: int | None = None

    def audit(self, status: int, error: str | None, outcome: Outcome) -> RequestEnd:
        route = self.trace.route
        return RequestEnd(
            self.request_id,
            outcome,
            status,
            _API,
            self.snapshot,
            self.model,
            False,
            self.trace,
            route.name if route is not None else None,
            self.endpoint,
            self.attempts,
            error=error,
            duration_s=time.perf_counter() - self.started,
            decision_ms=self.trace.micros / 1000 if self.trace.micros else None,
            extra={"countTokens": {"inputTokens": self.input_tokens}},
        )


class TokenCounting:
    """The count_tokens front door with its metrics and audit records."""

    def __init__(self, metrics: SidecarMetrics, audit: AuditTrail | None = None) -> None:
        self._metrics = metrics
        self._audit = audit
        self.requests = Counter(
            "modelplane_count_tokens_requests",
            "Anthropic count_tokens calls, by model alias, the endpoint that counted (empty: "
            "none) and outcome.",
            ["model", "endpoint", "outcome"],
            registry=metrics.registry,
        )

    async def serve(
        self,
        snapshot: Snapshot,
        session: aiohttp.ClientSession,
        http: web.Request,
        read_body: BodyReader,
        request_id: str,
    ) -> web.Response:
        """Anthropic's answer to a count_tokens request; raises ApiError for the error answers."""
        call = CountCall(request_id, time.perf_counter(), snapshot)
        try:
            response = await self._count(call, session, http, read_body)
        except ApiError as exc:
            if call.endpoint is not None:  # an upstream 4xx, handed to the app
                outcome = Outcome.CLIENT_ERROR
            elif call.attempts:  # every endpoint that can count failed
                outcome = Outcome.EXHAUSTED
            else:  # refused by the router (bad body, routing, nobody can count)
                outcome = Outcome.REFUSED
            self._end(call, exc.status, exc.code or exc.type, outcome)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            self._end(call, 499, None, Outcome.CLIENT_DISCONNECTED)
            raise
        self._end(call, response.status, None, Outcome.OK)
        return response

    def _end(self, call: CountCall, status: int, error: str | None, outcome: Outcome) -> None:
        endpoint = call.endpoint.name if call.endpoint is not None else ""
        self.requests.labels(call.model or "", endpoint, outcome.value).inc()
        if self._audit is not None:
            self._audit.request(call.audit(status, error, outcome))

    async def _count(
        self,
        call: CountCall,
        session: aiohttp.ClientSession,
        http: web.Request,
        read_body: BodyReader,
    ) -> web.Response:
        snapshot = call.snapshot
        chat = count_tokens_request(await read_body())
        routed = RoutedRequest(Operation.CHAT, chat, http.headers, chat["model"], False)
        call.trace.model = routed.model
        if routed.model in snapshot.aliases:
            call.model = routed.model
        decision = decide(snapshot, routed, trace=call.trace)
        counters = [e for e in decision.candidates if isinstance(e.adapter, TokenCounter)]
        headers = {"x-request-id": call.request_id, "x-modelplane-rule": decision.rule}
        if not counters:
            names = (
                ", ".join(f"{e.name} ({e.config.provider.value})" for e in decision.candidates)
                or "none"
            )
            raise ApiError(
                400,
                f"count_tokens: none of the endpoints model {decision.alias.name!r} routes this "
                f"request to can count tokens (candidates: {names}); Anthropic and Bedrock "
                "endpoints count them",
                code="count_tokens_unsupported",
                headers=headers,
            )
        failures: list[str] = []
        last: UpstreamFailure | None = None
        for endpoint in counters:
            provider = endpoint.config.provider.value
            try:
                tokens = await _count(endpoint, session, chat)
            except UpstreamFailure as failure:
                self._metrics.attempts.labels(endpoint.name, provider, failure.kind).inc()
                call.attempts.append(_attempt(endpoint, len(call.attempts) + 1, failure))
                message = snapshot.redact(failure.message.encode()).decode()
                if failure.kind not in _NEXT_MAY_COUNT:
                    call.endpoint = endpoint
                    raise ApiError(failure.status or 400, message, headers=headers) from None
                failures.append(f"{endpoint.name}: {message}")
                last = failure
                continue
            self._metrics.attempts.labels(endpoint.name, provider, "ok").inc()
            call.attempts.append(_attempt(endpoint, len(call.attempts) + 1, None))
            call.endpoint, call.input_tokens = endpoint, tokens
            headers["x-modelplane-endpoint"] = endpoint.name
            return web.Response(
                body=orjson.dumps({"input_tokens": tokens}),
                content_type="application/json",
                headers=headers,
            )
        status = 429 if last is not None and last.kind is FailureKind.RATE_LIMIT else 502
        raise ApiError(
            status,
            "count_tokens failed at every endpoint that can count: " + "; ".join(failures),
            type="server_error",
            headers=headers,
        )


def _attempt(
    endpoint: EndpointRuntime, number: int, failure: UpstreamFailure | None
) -> dict[str, Any]:
    """An attempt of the audit record: names and codes only (never the upstream's message)."""
    return {
        "endpoint": endpoint.name,
        "attempt": number,
        "result": "ok" if failure is None else failure.kind.value,
        "status": 200 if failure is None else failure.status,
    }


async def _count(
    endpoint: EndpointRuntime, session: aiohttp.ClientSession, chat: dict[str, object]
) -> int:
    adapter = endpoint.adapter
    assert isinstance(adapter, TokenCounter)
    cfg = endpoint.config
    timeout = cfg.timeouts.request_seconds
    credentials = await endpoint.credentials.current(timeout)
    request = adapter.count_tokens_request(cfg, credentials, dict(chat))
    try:
        async with (
            asyncio.timeout(timeout),
            session.request(
                request.method,
                request.url,
                headers=request.headers,
                data=request.body,
                timeout=aiohttp.ClientTimeout(sock_connect=cfg.timeouts.connect_seconds),
            ) as response,
        ):
            data = await response.read()
            status, response_headers = response.status, response.headers
    except aiohttp.ConnectionTimeoutError:
        # A TimeoutError too, but of the connection (`sock_connect`), not of the answer.
        raise connect_timed_out(cfg.timeouts.connect_seconds) from None
    except TimeoutError:
        raise UpstreamFailure(
            FailureKind.TIMEOUT, f"no answer to the token count within {timeout:g}s"
        ) from None
    except aiohttp.ClientError as exc:
        raise connection_failure(exc) from None
    if status >= 300:
        raise endpoint.adapter.classify_error(cfg, status, response_headers, data)
    return adapter.count_tokens_result(data)
