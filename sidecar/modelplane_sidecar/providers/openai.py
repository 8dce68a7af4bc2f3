"""OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, TGI, Ollama, DeepSeek).

The app already speaks this format, so the adapter mostly passes bytes through: it swaps the model
name, sets credentials, asks streams for a final usage chunk, and classifies errors. Server quirks
handled here: some never send usage in streams (or reject `stream_options`: set the endpoint
option `streamUsage: false`), some send `usage: null` on every chunk, some close the stream
without `[DONE]` after a final `finish_reason` (llama.cpp, older TGI); usage missing from a
response is estimated and marked so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..config import Endpoint
from .base import (
    Credentials,
    FailureKind,
    Operation,
    Translated,
    UpstreamFailure,
    UpstreamRequest,
    Usage,
    content_policy_failure,
    estimated_usage,
    parse_retry_after,
    status_kind,
)
from .sse import DONE_FRAME, SSEParser, sse_data

_PATHS = {
    Operation.CHAT: "/chat/completions",
    Operation.COMPLETIONS: "/completions",
    Operation.EMBEDDINGS: "/embeddings",
}

_CONTEXT_LENGTH_CODES = {"context_length_exceeded", "string_above_max_length"}
#: OpenAI's `content_policy_violation`, Azure's `content_filter` (prompt blocked).
_CONTENT_POLICY_CODES = {"content_policy_violation", "content_filter"}


def usage_from_openai(raw: object) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    prompt = raw.get("prompt_tokens", 0)
    completion = raw.get("completion_tokens", 0)
    return Usage(
        input_tokens=int(prompt or 0),
        output_tokens=int(completion or 0),
        cached_input_tokens=int(cached or 0),
    )


class OpenAIAdapter:
    name = "openai"

    def supports(self, op: Operation) -> bool:
        return True

    def credentials(self, endpoint: Endpoint, api_key: str | None) -> Credentials:
        return Credentials(api_key)

    def build_request(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest:
        headers = {"content-type": "application/json", **endpoint.headers}
        if credentials.api_key:
            headers["authorization"] = f"Bearer {credentials.api_key}"
        url = endpoint.base_url + _PATHS[op]
        return UpstreamRequest("POST", url, headers, openai_body(endpoint, body, stream, op))

    def translate_response(
        self, endpoint: Endpoint, op: Operation, body: bytes, request_body: dict[str, Any]
    ) -> Translated:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream answered 200 with a body that is not JSON"
            ) from None
        if not isinstance(parsed, dict):
            raise UpstreamFailure(FailureKind.PROTOCOL, "upstream answered 200 with a non-object")
        usage = usage_from_openai(parsed.get("usage"))
        if usage is None:
            usage = estimated_usage(request_body, len(body) // 2)
        return Translated(body, usage)

    def stream_translator(
        self, endpoint: Endpoint, op: Operation, request_body: dict[str, Any]
    ) -> OpenAIStreamPassThrough:
        options = request_body.get("stream_options")
        wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return OpenAIStreamPassThrough(wants_usage, request_body)

    def classify_error(
        self, endpoint: Endpoint, status: int, headers: Mapping[str, str], body: bytes
    ) -> UpstreamFailure:
        return classify_openai_error(endpoint, status, headers, body)


def openai_body(endpoint: Endpoint, body: dict[str, Any], stream: bool, op: Operation) -> bytes:
    """The app's body for an OpenAI-format upstream: its model, and usage asked for in streams."""
    out = dict(body)
    out["model"] = endpoint.model
    if stream and op is not Operation.EMBEDDINGS and endpoint.options.get("streamUsage", True):
        options = dict(out.get("stream_options") or {})
        options.setdefault("include_usage", True)
        out["stream_options"] = options
    return orjson.dumps(out)


def classify_openai_error(
    endpoint: Endpoint, status: int, headers: Mapping[str, str], body: bytes
) -> UpstreamFailure:
    kind = status_kind(status)
    message = f"upstream answered HTTP {status}"
    error: object = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
    if isinstance(error, dict):
        if isinstance(error.get("message"), str):
            message = f"upstream answered HTTP {status}: {error['message']}"
        code = error.get("code")
        if kind is FailureKind.CLIENT_ERROR and code in _CONTEXT_LENGTH_CODES:
            kind = FailureKind.CONTEXT_LENGTH
        if kind is FailureKind.CLIENT_ERROR and code in _CONTENT_POLICY_CODES:
            return content_policy_failure(endpoint, message, status, body)
    client_body = body if isinstance(error, dict) else None
    return UpstreamFailure(kind, message, status, parse_retry_after(headers), client_body)


class OpenAIStreamPassThrough:
    """Forwards OpenAI SSE frames unchanged while watching for usage, errors and `[DONE]`.

    The router always asks upstream for `include_usage` so it can account for cost; the extra
    usage-only chunk is dropped again unless the app asked for it itself.
    """

    __slots__ = (
        "_chars",
        "_done",
        "_finished",
        "_forward_usage_chunk",
        "_parser",
        "_request_body",
        "usage",
    )

    def __init__(self, forward_usage_chunk: bool, request_body: dict[str, Any]) -> None:
        self._parser = SSEParser()
        self._forward_usage_chunk = forward_usage_chunk
        self._request_body = request_body
        self._done = False
        #: A choice reported its finish_reason (servers that omit [DONE] stop here).
        self._finished = False
        self._chars = 0
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        framed = self._parser.feed_data_lines(chunk)
        if framed is None:
            out = []
            for event in self._parser.feed(chunk):
                if self._keep(event.data):
                    raw = event.raw
                    if event.data == b"[DONE]":
                        raw = DONE_FRAME
                    elif not raw.startswith(b"data:"):
                        raw = sse_data(event.data)
                    out.append(raw)
            return b"".join(out)
        # One-line `data:` events only (what servers send): each goes out exactly as it came,
        # so unless one is dropped the bytes out are the bytes in.
        payloads, whole = framed
        kept = list(map(self._keep, payloads))
        if False not in kept:
            return whole
        return b"".join([sse_data(data) for data, keep in zip(payloads, kept, strict=True) if keep])

    def _keep(self, data: bytes) -> bool:
        """Watch one event; False drops it (empty, not an object, or a usage chunk the app did
        not ask for)."""
        if data == b"[DONE]":
            self._done = True
            return True
        if not data:
            return False
        self._chars += len(data)
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream stream sent an event that is not JSON"
            ) from None
        if not isinstance(parsed, dict):
            return False
        error = parsed.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR, f"upstream reported an error mid-stream: {message}"
            )
        choices = parsed.get("choices")
        if not self._finished and isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self._finished = True
                    break
        reported = parsed.get("usage")  # null in every chunk but the last: skip the call
        usage = usage_from_openai(reported) if reported is not None else None
        if usage is not None:
            self.usage = usage
            if not self._forward_usage_chunk and not choices:
                return False
        return True

    def finish(self) -> bytes:
        if not self._done and not self._finished:
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream closed the stream before sending [DONE]"
            )
        if self.usage is None:
            self.usage = estimated_usage(self._request_body, self._chars // 3)
        return b"" if self._done else DONE_FRAME
