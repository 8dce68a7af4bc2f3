"""OpenAI's Batch API, passed through to one endpoint: `/v1/files` and `/v1/batches`.

Offline jobs get the provider's batch pricing by uploading a JSONL file of requests and creating
a batch over it; results come back as another file. These calls are not routed: they go to the
endpoint named by `lanes.batch.batchApiEndpoint` (an `openai` or `openai-compatible` one), with
that endpoint's credentials in place of whatever the app sent, so apps never hold provider keys.
Bodies are streamed both ways: an upload of hundreds of megabytes and a result file are relayed
chunk by chunk and never held in memory. Error answers (small) are read whole and scrubbed of the
endpoint's credentials before the app sees them.

Every call leaves an audit record in the request records' format and chain (`auditing.py`): the
operation, the endpoint, the outcome and status, and the ids involved (file, batch, the object a
create made, the upstream's request id), never file contents, metadata or credentials.
"""

from __future__ import annotations

import asyncio
import os
import re
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
from ..metrics import Outcome, SidecarMetrics
from ..runtime import EndpointRuntime, Snapshot

_CHUNK = 64 * 1024
#: Answers of create calls (a `file` or `batch` object, about 1 kB) are read whole up to this
#: size, so the audit record can name the object made; larger ones are relayed unread.
_CREATED_MAX_BYTES = 1024 * 1024
#: What an id looks like; anything else (e.g. text an app put in a path) is not recorded.
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_BATCH_TARGET = re.compile(r"/v1/[a-z/]{1,64}")
#: Request headers the upstream gets from the app (credentials come from the endpoint).
_REQUEST_HEADERS = ("content-type", "content-length", "accept", "openai-beta")
#: Response headers the app gets from the upstream (lengths and encodings are the relay's own).
_RESPONSE_HEADERS = ("content-type", "content-disposition", "openai-processing-ms", "x-request-id")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class BatchCall:
    """What is known about one Batch API call, for its audit record."""

    operation: str
    #: The route, ids left as placeholders (`/v1/batches/{batch_id}`).
    api: str
    request_id: str
    started: float
    snapshot: Snapshot | None = None
    endpoint: EndpointRuntime | None = None
    #: The upstream's status, or how reaching it failed (`connect`, `timeout`).
    upstream_status: int | None = None
    failure: str | None = None
    #: fileId / batchId (from the path); created, inputFileId, batchEndpoint (from a create's
    #: answer); upstreamRequestId.
    ids: dict[str, str] = field(default_factory=dict)
    #: Bytes uploaded (the upload's Content-Length) or relayed back to the app.
    uploaded: int | None = None
    downloaded: int = 0

    def audit(self, status: int, error: str | None, outcome: Outcome) -> RequestEnd:
        endpoint = self.endpoint
        attempts = []
        if endpoint is not None and (self.upstream_status is not None or self.failure):
            attempts.append(
                {
                    "endpoint": endpoint.name,
                    "attempt": 1,
                    "result": self.failure or _result(self.upstream_status or 0),
                    "status": self.upstream_status,
                }
            )
        detail: dict[str, Any] = {"operation": self.operation, **self.ids}
        if self.uploaded is not None:
            detail["bytesUploaded"] = self.uploaded
        if self.downloaded:
            detail["bytesDownloaded"] = self.downloaded
        return RequestEnd(
            self.request_id,
            outcome,
            status,
            self.api,
            self.snapshot,
            endpoint=endpoint,
            attempts=attempts,
            error=error,
            duration_s=time.perf_counter() - self.started,
            # The endpoint's own model is not what a batch runs (each line names its model).
            extra={"upstreamModel": None, "batchApi": detail},
        )


class BatchApi:
    """The pass-through routes; `current` and `session` are the sidecar's own."""

    def __init__(
        self,
        current: Callable[[], Snapshot],
        session: Callable[[], aiohttp.ClientSession],
        metrics: SidecarMetrics,
        audit: AuditTrail | None = None,
    ) -> None:
        self._current = current
        self._session = session
        self._audit = audit
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
            router.add_route(method, path, self._handler(operation, path))

    def _handler(self, operation: str, api: str) -> Handler:
        async def handle(http: web.Request) -> web.StreamResponse:
            call = BatchCall(operation, api, _request_id(http), time.perf_counter())
            for name, value in http.match_info.items():
                if _ID.fullmatch(value):
                    call.ids["fileId" if name == "file_id" else "batchId"] = value
            try:
                response = await self._relay(http, call)
            except ApiError as exc:
                self.requests.labels(operation, str(exc.status)).inc()
                outcome = Outcome.EXHAUSTED if call.failure else Outcome.REFUSED
                self._record(call, exc.status, exc.code, outcome)
                raise
            except (asyncio.CancelledError, ConnectionResetError):
                # The app went away mid-upload or mid-download.
                self._record(call, 499, None, Outcome.CLIENT_DISCONNECTED)
                raise
            self.requests.labels(operation, str(response.status)).inc()
            status = response.status
            if status < 300:
                self._record(call, status, None, Outcome.OK)
            elif status < 500:
                self._record(call, status, "upstream_client_error", Outcome.CLIENT_ERROR)
            else:
                self._record(call, status, "upstream_error", Outcome.EXHAUSTED)
            return response

        return handle

    def _record(self, call: BatchCall, status: int, error: str | None, outcome: Outcome) -> None:
        if self._audit is not None:
            self._audit.request(call.audit(status, error, outcome))

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

    async def _relay(self, http: web.Request, call: BatchCall) -> web.StreamResponse:
        snapshot = call.snapshot = self._current()
        endpoint = call.endpoint = self._endpoint(snapshot)
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
        if data is not None:
            call.uploaded = http.content_length
        try:
            async with self._session().request(
                http.method, url, headers=headers, data=data, timeout=timeout
            ) as upstream:
                call.upstream_status = upstream.status
                return await self._answer(http, snapshot, endpoint, upstream, call)
        except (aiohttp.ClientError, TimeoutError) as exc:
            call.failure = "timeout" if isinstance(exc, TimeoutError) else "connect"
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
        call: BatchCall,
    ) -> web.StreamResponse:
        headers = {k: v for k in _RESPONSE_HEADERS if (v := upstream.headers.get(k)) is not None}
        headers["x-modelplane-endpoint"] = endpoint.name
        upstream_id = upstream.headers.get("x-request-id")
        if upstream_id is not None and _ID.fullmatch(upstream_id):
            call.ids["upstreamRequestId"] = upstream_id
        if upstream.status >= 300:
            body = snapshot.redact(await upstream.read())
            return web.Response(status=upstream.status, body=body, headers=headers)
        length = upstream.content_length
        if (
            call.operation.endswith(".create")
            and length is not None
            and length <= _CREATED_MAX_BYTES
            and upstream.content_type == "application/json"
        ):
            body = await upstream.read()
            call.ids.update(_created(body))
            call.downloaded = len(body)
            return web.Response(status=upstream.status, body=body, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        if length is not None and "content-encoding" not in upstream.headers:
            response.content_length = length
        await response.prepare(http)
        async for chunk in upstream.content.iter_chunked(_CHUNK):
            call.downloaded += len(chunk)
            await response.write(chunk)
        await response.write_eof()
        return response


def _created(body: bytes) -> dict[str, str]:
    """The ids a create call's answer names: the new object, and a batch's input file and
    target endpoint (never metadata or anything else an app wrote)."""
    try:
        made = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(made, dict):
        return {}
    found: dict[str, str] = {}
    for field_name, name, shape in (
        ("id", "created", _ID),
        ("input_file_id", "inputFileId", _ID),
        ("endpoint", "batchEndpoint", _BATCH_TARGET),
    ):
        value = made.get(field_name)
        if isinstance(value, str) and shape.fullmatch(value):
            found[name] = value
    return found


def _result(status: int) -> str:
    """The attempt's result in the words of the request records (`FailureKind` values)."""
    if status < 300:
        return "ok"
    if status == 429:
        return "rate-limit"
    return "client-error" if status < 500 else "server-error"


def _request_id(http: web.Request) -> str:
    given = http.headers.get("x-request-id")
    if given and len(given) <= 128:
        return given
    return os.urandom(8).hex()
