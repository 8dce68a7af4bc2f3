"""OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, TGI, Ollama, DeepSeek).

The app already speaks this format, so the adapter mostly passes bytes through: it swaps the model
name, sets credentials, asks streams for a final usage chunk, and classifies errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..config import Endpoint
from .base import (
    FailureKind,
    Operation,
    Translated,
    UpstreamFailure,
    UpstreamRequest,
    Usage,
    estimate_tokens,
    parse_retry_after,
    status_kind,
)
from .sse import SSEParser

_PATHS = {
    Operation.CHAT: "/chat/completions",
    Operation.COMPLETIONS: "/completions",
    Operation.EMBEDDINGS: "/embeddings",
}

_CONTEXT_LENGTH_CODES = {"context_length_exceeded", "string_above_max_length"}


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

    def build_request(
        self,
        endpoint: Endpoint,
        api_key: str | None,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest:
        out = dict(body)
        out["model"] = endpoint.model
        if stream and op is not Operation.EMBEDDINGS:
            options = dict(out.get("stream_options") or {})
            options.setdefault("include_usage", True)
            out["stream_options"] = options
        headers = {"content-type": "application/json", **endpoint.headers}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return UpstreamRequest("POST", endpoint.base_url + _PATHS[op], headers, orjson.dumps(out))

    def translate_response(self, endpoint: Endpoint, op: Operation, body: bytes) -> Translated:
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
            usage = Usage(output_tokens=estimate_tokens(len(body)), estimated=True)
        return Translated(body, usage)

    def stream_translator(
        self, endpoint: Endpoint, op: Operation, request_body: dict[str, Any]
    ) -> OpenAIStreamPassThrough:
        options = request_body.get("stream_options")
        wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return OpenAIStreamPassThrough(forward_usage_chunk=wants_usage)

    def classify_error(
        self, status: int, headers: Mapping[str, str], body: bytes
    ) -> UpstreamFailure:
        return classify_openai_error(status, headers, body)


def classify_openai_error(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
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
        if kind is FailureKind.CLIENT_ERROR and error.get("code") in _CONTEXT_LENGTH_CODES:
            kind = FailureKind.CONTEXT_LENGTH
    client_body = body if isinstance(error, dict) else None
    return UpstreamFailure(kind, message, status, parse_retry_after(headers), client_body)


class OpenAIStreamPassThrough:
    """Forwards OpenAI SSE frames unchanged while watching for usage, errors and `[DONE]`.

    The router always asks upstream for `include_usage` so it can account for cost; the extra
    usage-only chunk is dropped again unless the app asked for it itself.
    """

    __slots__ = ("_chars", "_done", "_forward_usage_chunk", "_parser", "usage")

    def __init__(self, forward_usage_chunk: bool) -> None:
        self._parser = SSEParser()
        self._forward_usage_chunk = forward_usage_chunk
        self._done = False
        self._chars = 0
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for event in self._parser.feed(chunk):
            data = event.data
            if data == b"[DONE]":
                self._done = True
                out.append(b"data: [DONE]\n\n")
                continue
            if not data:
                continue
            self._chars += len(data)
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamFailure(
                    FailureKind.PROTOCOL, "upstream stream sent an event that is not JSON"
                ) from None
            if not isinstance(parsed, dict):
                continue
            error = parsed.get("error")
            if error is not None:
                message = error.get("message") if isinstance(error, dict) else str(error)
                raise UpstreamFailure(
                    FailureKind.SERVER_ERROR, f"upstream reported an error mid-stream: {message}"
                )
            usage = usage_from_openai(parsed.get("usage"))
            if usage is not None:
                self.usage = usage
                if not self._forward_usage_chunk and not parsed.get("choices"):
                    continue
            out.append(event.raw if event.raw.startswith(b"data:") else b"data: " + data + b"\n\n")
        return b"".join(out)

    def finish(self) -> bytes:
        if not self._done:
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream closed the stream before sending [DONE]"
            )
        if self.usage is None:
            self.usage = Usage(output_tokens=estimate_tokens(self._chars // 3), estimated=True)
        return b""
