"""OpenAI's Batch API, passed through to one endpoint: `/v1/files` and `/v1/batches`.

Offline jobs get the provider's batch pricing by uploading a JSONL file of requests and creating
a batch over it; results come back as another file. These calls are not routed: they go to the
endpoint named by `lanes.batch.batchApiEndpoint` (an `openai` or `openai-compatible` one), with
that endpoint's credentials in place of whatever the app sent, so apps never hold provider keys.
Bodies are streamed both ways: an upload of hundreds of megabytes and a result file are relayed
chunk by chunk and never held in memory. Error answers (small) are read whole and scrubbed of the
endpoint's credentials before the app sees them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from ..errors import ApiError
from ..metrics import SidecarMetrics
from ..runtime import EndpointRuntime, Snapshot

_CHUNK = 64 * 1024
#: Request headers the upstream gets from the app (credentials come from the endpoint).
_REQUEST_HEADERS = ("content-type", "content-length", "accept", "openai-beta")
#: Response headers the app gets from the upstream (lengths and encodings are the relay's own).
_RESPONSE_HEADERS = ("content-type", "content-disposition", "openai-processing-ms", "x-request-id")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BatchApi:
    """The pass-through routes; `current` and `session` are the sidecar's own."""

    def __init__(
        self,
        current: Callable[[], Snapshot],
        session: Callable[[], aiohttp.ClientSession],
        metrics: SidecarMetrics,
    ) -> None:
        self._current = current
        self._session = session
        self.requests = Counter(
            "modelplane_batch_api_requests",
            "Batch API calls passed through (files.create, batches.retrieve, ...), by status.",
            ["operation", "status"],
            registry=metrics.registry,
        )

    def add_routes(self, router: web.UrlDispatcher) -> None:
        routes = (
            ("POST", "/v1/files", "files.create"),
            ("GET", "/v1/files", "files.list"),
            ("GET", "/v1/files/{file_id}", "files.retrieve"),
            ("DELETE", "/v1/files/{file_id}", "files.delete"),
            ("GET", "/v1/files/{file_id}/content", "files.content"),
            ("POST", "/v1/batches", "batches.create"),
            ("GET", "/v1/batches", "batches.list"),
            ("GET", "/v1/batches/{batch_id}", "batches.retrieve"),
            ("POST", "/v1/batches/{batch_id}/cancel", "batches.cancel"),
        )
        for method, path, operation in routes:
            router.add_route(method, path, self._handler(operation))

    def _handler(self, operation: str) -> Handler:
        async def handle(http: web.Request) -> web.StreamResponse:
            try:
                response = await self._relay(http)
            except ApiError as exc:
                self.requests.labels(operation, str(exc.status)).inc()
                raise
            self.requests.labels(operation, str(response.status)).inc()
            return response

        return handle

    def _endpoint(self, snapshot: Snapshot) -> EndpointRuntime:
        name = snapshot.config.lanes.batch.batch_api_endpoint
        if name is None:
            raise ApiError(
                404,
                "This router passes no Batch API through; set lanes.batch.batchApiEndpoint to an "
                "openai endpoint to enable /v1/files and /v1/batches",
                code="batch_api_not_configured",
            )
        return snapshot.endpoints[name]

    async def _relay(self, http: web.Request) -> web.StreamResponse:
        snapshot = self._current()
        endpoint = self._endpoint(snapshot)
        cfg = endpoint.config
        path = http.rel_url.raw_path.removeprefix("/v1")
        query = http.rel_url.raw_query_string
        url = f"{cfg.base_url}{path}" + (f"?{query}" if query else "")
        headers = {k: v for k in _REQUEST_HEADERS if (v := http.headers.get(k)) is not None}
        headers.update(cfg.headers)
        if endpoint.credentials.api_key:
            headers["authorization"] = f"Bearer {endpoint.credentials.api_key}"
        timeout = aiohttp.ClientTimeout(
            sock_connect=cfg.timeouts.connect_seconds, sock_read=cfg.timeouts.request_seconds
        )
        data = http.content if http.can_read_body else None
        try:
            async with self._session().request(
                http.method, url, headers=headers, data=data, timeout=timeout
            ) as upstream:
                return await self._answer(http, snapshot, endpoint, upstream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise ApiError(
                502,
                f"Batch API endpoint {cfg.name!r} could not be reached ({detail})",
                type="upstream_error",
                code="batch_api_unreachable",
                headers={"x-modelplane-endpoint": cfg.name},
            ) from None

    async def _answer(
        self,
        http: web.Request,
        snapshot: Snapshot,
        endpoint: EndpointRuntime,
        upstream: aiohttp.ClientResponse,
    ) -> web.StreamResponse:
        headers = {k: v for k in _RESPONSE_HEADERS if (v := upstream.headers.get(k)) is not None}
        headers["x-modelplane-endpoint"] = endpoint.name
        if upstream.status >= 300:
            body = snapshot.redact(await upstream.read())
            return web.Response(status=upstream.status, body=body, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if upstream.content_length is not None and "content-encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        await response.prepare(http)
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response
