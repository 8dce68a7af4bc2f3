"""`POST /v1/messages/count_tokens`: Anthropic's token counting, by the endpoint routing picks.

The request is routed like a Messages request with the same prompt (so sensitivity and
compliance rules decide where the prompt may go, as they would for the real call), and the
first candidate whose provider can count tokens without running the model (an adapter that is
a `TokenCounter`: Bedrock's CountTokens) counts them. A busy or failing endpoint hands over to
the next candidate that can count; an upstream 4xx is the answer. The app gets Anthropic's
`{"input_tokens": N}`, or an Anthropic error body (`anthropic.serve` shapes it).
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from ..errors import ApiError
from ..providers.base import FailureKind, Operation, TokenCounter, UpstreamFailure
from ..routing import RoutedRequest, decide
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


async def count_tokens(
    snapshot: Snapshot,
    session: aiohttp.ClientSession,
    http: web.Request,
    body: dict[str, object],
    request_id: str,
) -> web.Response:
    """Anthropic's answer to a count_tokens request; raises ApiError for the error answers."""
    chat = count_tokens_request(dict(body))
    routed = RoutedRequest(Operation.CHAT, chat, http.headers, chat["model"], False)
    decision = decide(snapshot, routed)
    counters = [e for e in decision.candidates if isinstance(e.adapter, TokenCounter)]
    headers = {"x-request-id": request_id, "x-modelplane-rule": decision.rule}
    if not counters:
        names = (
            ", ".join(f"{e.name} ({e.config.provider.value})" for e in decision.candidates)
            or "none"
        )
        raise ApiError(
            400,
            f"count_tokens: none of the endpoints model {decision.alias.name!r} routes this "
            f"request to can count tokens (candidates: {names}); Bedrock endpoints count "
            "them with CountTokens",
            code="count_tokens_unsupported",
            headers=headers,
        )
    failures: list[str] = []
    last: UpstreamFailure | None = None
    for endpoint in counters:
        try:
            tokens = await _count(endpoint, session, chat)
        except UpstreamFailure as failure:
            message = snapshot.redact(failure.message.encode()).decode()
            if failure.kind not in _NEXT_MAY_COUNT:
                raise ApiError(failure.status or 400, message, headers=headers) from None
            failures.append(f"{endpoint.name}: {message}")
            last = failure
            continue
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


async def _count(
    endpoint: EndpointRuntime, session: aiohttp.ClientSession, chat: dict[str, object]
) -> int:
    adapter = endpoint.adapter
    assert isinstance(adapter, TokenCounter)
    cfg = endpoint.config
    timeout = cfg.timeouts.request_seconds
    credentials = endpoint.credentials
    if credentials.refreshing is not None:
        credentials = await credentials.refreshing.current(timeout)
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
    except TimeoutError:
        raise UpstreamFailure(
            FailureKind.TIMEOUT, f"no answer to CountTokens within {timeout:g}s"
        ) from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure(FailureKind.CONNECT, f"cannot reach the endpoint: {exc}") from None
    if status >= 300:
        raise endpoint.adapter.classify_error(cfg, status, response_headers, data)
    return adapter.count_tokens_result(data)
