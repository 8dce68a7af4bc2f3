"""Anthropic's Messages API behind the OpenAI chat API.

Request: system/developer messages become `system`, tool results become `tool_result` blocks in
a user turn (consecutive turns of one role are merged, as the API wants them alternating), images
become base64 or URL image blocks, tools and `tool_choice` map one to one, `stop` becomes
`stop_sequences`, `response_format` and `reasoning_effort` become `output_config`, and
`max_tokens` (required here) defaults to the endpoint's `maxTokens` option. The Messages API has
no `temperature` or `top_p` any more (anthropic SDK 2.x): those are dropped.
Response: content blocks become the message text and `tool_calls`, `stop_reason` the
`finish_reason`, and usage counts cache reads and writes. Streams are translated event by event
(`message_start`, `content_block_*`, `message_delta`, `message_stop`, `ping`, `error`) into
`chat.completion.chunk` frames; a stream that ends before `message_stop` is a failure.
Token counting (the Anthropic front door's count_tokens) is `POST /v1/messages/count_tokens`
with the same headers and the prompt fields of the same body, answered `{"input_tokens": N}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from ..config import Endpoint
from .base import (
    ChatAdapter,
    Credentials,
    FailureKind,
    Operation,
    Translated,
    UpstreamFailure,
    UpstreamRequest,
    Usage,
    content_policy_failure,
    estimated_usage,
    json_or_none,
    openai_error_body,
    parse_retry_after,
    raise_if_content_policy_fallback,
    status_kind,
    usage_with_cache,
)
from .openai_chat import (
    ChunkWriter,
    ToolCall,
    arguments_object,
    function_tools,
    json_schema,
    max_tokens,
    merge_turn,
    messages_of,
    parse_json_object,
    parts,
    reject_unsupported,
    sse_json_objects,
    stop_sequences,
    system_text,
    text_of,
    token_count,
    tool_call_id,
    tool_calls_of,
    tool_choice,
    translated_completion,
    unknown_role,
    walk_turns,
)
from .openai_chat import Image as ImagePart
from .sse import SSEParser

NAME = "anthropic"

#: Anthropic `stop_reason` -> OpenAI `finish_reason`.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

#: Anthropic error `type` -> OpenAI error (`type`, `code`).
_ERROR_TYPES = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "overloaded_error": ("server_error", "overloaded"),
}

#: OpenAI `reasoning_effort` -> Anthropic `output_config.effort`.
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh"}

#: The fields of a Messages body that `/v1/messages/count_tokens` takes (no `max_tokens`,
#: `stop_sequences`, `metadata` or `stream`: it refuses them).
_COUNTED = ("model", "messages", "system", "tools", "tool_choice", "output_config")

_CONTEXT_LENGTH = re.compile(r"prompt is too long|exceed context limit|context window", re.I)
_CONTENT_POLICY = re.compile(r"content filtering policy|usage policy", re.I)


class AnthropicAdapter(ChatAdapter):
    name = NAME

    def build_request(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest:
        payload = messages_request(body, endpoint.model, endpoint.options["maxTokens"], stream)
        return UpstreamRequest(
            "POST",
            endpoint.base_url + "/v1/messages",
            _headers(endpoint, credentials),
            orjson.dumps(payload),
        )

    def count_tokens_request(
        self, endpoint: Endpoint, credentials: Credentials, body: dict[str, Any]
    ) -> UpstreamRequest:
        payload = messages_request(body, endpoint.model, endpoint.options["maxTokens"], False)
        counted = {k: payload[k] for k in _COUNTED if k in payload}
        return UpstreamRequest(
            "POST",
            endpoint.base_url + "/v1/messages/count_tokens",
            _headers(endpoint, credentials),
            orjson.dumps(counted),
        )

    def count_tokens_result(self, body: bytes) -> int:
        return token_count(body, "input_tokens", "the Anthropic count_tokens response")

    def translate_response(
        self, endpoint: Endpoint, op: Operation, body: bytes, request_body: dict[str, Any]
    ) -> Translated:
        message = parse_json_object(body, "the Anthropic response")
        if message.get("type") != "message" or not isinstance(message.get("content"), list):
            raise UpstreamFailure(FailureKind.PROTOCOL, "the Anthropic response is not a message")
        if message.get("stop_reason") == "refusal":
            raise_if_content_policy_fallback(
                endpoint, "Anthropic refused the prompt (stop_reason: refusal)"
            )
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in message["content"]:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            elif block.get("type") == "tool_use":
                arguments = orjson.dumps(block.get("input") or {}).decode()
                calls.append(ToolCall(str(block.get("id")), str(block.get("name")), arguments))
        usage = usage_from_anthropic(message.get("usage"))
        finish = FINISH_REASONS.get(str(message.get("stop_reason")), "stop")
        model = str(message.get("model") or endpoint.model)
        ident = str(message.get("id") or "")
        return translated_completion(ident, model, texts, calls, finish, usage, request_body)

    def stream_translator(
        self, endpoint: Endpoint, op: Operation, request_body: dict[str, Any]
    ) -> AnthropicStreamTranslator:
        return AnthropicStreamTranslator(endpoint.model, request_body)

    def classify_error(
        self, endpoint: Endpoint, status: int, headers: Mapping[str, str], body: bytes
    ) -> UpstreamFailure:
        error_type, message = _error_fields(body)
        kind = status_kind(status)
        text = f"upstream answered HTTP {status}: {message}" if message else f"HTTP {status}"
        openai_type, code = _ERROR_TYPES.get(error_type or "", ("invalid_request_error", None))
        client_body = openai_error_body(message or text, openai_type, code)
        if kind is FailureKind.CLIENT_ERROR and message:
            if _CONTEXT_LENGTH.search(message):
                kind = FailureKind.CONTEXT_LENGTH
                client_body = openai_error_body(message, openai_type, "context_length_exceeded")
            elif _CONTENT_POLICY.search(message):
                return content_policy_failure(endpoint, text, status, client_body)
        return UpstreamFailure(kind, text, status, parse_retry_after(headers), client_body)


def _headers(endpoint: Endpoint, credentials: Credentials) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "anthropic-version": endpoint.options["version"],
        **endpoint.headers,
    }
    if credentials.api_key:
        headers["x-api-key"] = credentials.api_key
    return headers


def _error_fields(body: bytes) -> tuple[str | None, str | None]:
    parsed = json_or_none(body)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None, None
    kind, message = error.get("type"), error.get("message")
    return (
        kind if isinstance(kind, str) else None,
        message if isinstance(message, str) else None,
    )


def usage_from_anthropic(raw: object) -> Usage | None:
    """OpenAI-style usage: input counts every prompt token, cached reads and writes included."""
    return usage_with_cache(
        raw,
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    )


# -- request ---------------------------------------------------------------------------------


def messages_request(
    body: Mapping[str, Any], model: str, default_max_tokens: int, stream: bool
) -> dict[str, Any]:
    """The Messages API body for an OpenAI chat request."""
    reject_unsupported(body, NAME)
    messages = messages_of(body)
    out: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens(body) or default_max_tokens,
        "messages": _turns(messages),
    }
    system = system_text(messages)
    if system:
        out["system"] = system
    # The current Messages API has no temperature/top_p: they are dropped, as documented.
    output_config: dict[str, Any] = {}
    schema = json_schema(body)
    if schema is not None:
        output_config["format"] = {"type": "json_schema", "schema": schema}
    effort = _EFFORT.get(str(body.get("reasoning_effort")))
    if effort is not None:
        output_config["effort"] = effort
    if output_config:
        out["output_config"] = output_config
    stops = stop_sequences(body)
    if stops:
        out["stop_sequences"] = stops
    tools = function_tools(body, NAME)
    if tools:
        out["tools"] = [
            {
                "name": t.name,
                **({"description": t.description} if t.description else {}),
                "input_schema": t.parameters,
            }
            for t in tools
        ]
    choice = _tool_choice(body)
    if choice is not None:
        out["tool_choice"] = choice
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    if stream:
        out["stream"] = True
    return out


def _tool_choice(body: Mapping[str, Any]) -> dict[str, Any] | None:
    choice = tool_choice(body)
    parallel = body.get("parallel_tool_calls")
    if choice is None and parallel is not False:
        return None
    mode, name = choice or ("auto", None)
    out: dict[str, Any]
    if mode == "function":
        out = {"type": "tool", "name": name}
    else:
        out = {"type": {"auto": "auto", "none": "none", "required": "any"}[mode]}
    if parallel is False and mode != "none":
        out["disable_parallel_tool_use"] = True
    return out


def _turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    for index, message in walk_turns(messages):
        role = message["role"]
        if role == "user":
            blocks = [_block(p) for p in parts(message.get("content"), NAME)]
            turn_role = "user"
        elif role == "assistant":
            blocks = [_block(p) for p in parts(message.get("content"), NAME)]
            for call in tool_calls_of(message):
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": arguments_object(call),
                    }
                )
            turn_role = "assistant"
        elif role == "tool":
            blocks = [
                {
                    "type": "tool_result",
                    "tool_use_id": tool_call_id(message, index),
                    "content": text_of(message.get("content"), NAME),
                }
            ]
            turn_role = "user"
        else:
            raise unknown_role(message, index)
        merge_turn(turns, turn_role, blocks)
    return turns


def _block(part: str | ImagePart) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if part.url is not None:
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": part.media_type, "data": part.data},
    }


# -- stream ----------------------------------------------------------------------------------


class AnthropicStreamTranslator:
    """Anthropic Messages SSE events in, OpenAI `chat.completion.chunk` frames out."""

    __slots__ = (
        "_finish",
        "_model",
        "_parser",
        "_request_body",
        "_stopped",
        "_tool_index",
        "_usage_raw",
        "_writer",
        "usage",
    )

    def __init__(self, model: str, request_body: dict[str, Any]) -> None:
        self._parser = SSEParser()
        self._model = model
        self._request_body = request_body
        self._writer = ChunkWriter(model, request_body)
        #: Anthropic content-block index -> OpenAI tool-call index, for tool_use blocks.
        self._tool_index: dict[int, int] = {}
        self._usage_raw: dict[str, Any] = {}
        self._finish: str | None = None
        self._stopped = False
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        events = sse_json_objects(self._parser, chunk, "an Anthropic stream event")
        return b"".join([self._event(data) for data in events])

    def _event(self, data: dict[str, Any]) -> bytes:
        kind = data.get("type")
        writer = self._writer
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, dict):
                if isinstance(message.get("usage"), dict):
                    self._usage_raw.update(message["usage"])
                if message.get("id"):
                    self._writer = writer = ChunkWriter(
                        str(message.get("model") or self._model),
                        self._request_body,
                        str(message["id"]),
                    )
            return writer.role()
        if kind == "content_block_start":
            block = data.get("content_block")
            if not isinstance(block, dict):
                return b""
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[int(data.get("index", 0))] = index
                return writer.tool_start(index, str(block.get("id")), str(block.get("name")))
            if block.get("type") == "text":
                return writer.text(str(block.get("text") or ""))
            return b""
        if kind == "content_block_delta":
            delta = data.get("delta")
            if not isinstance(delta, dict):
                return b""
            if delta.get("type") == "text_delta":
                return writer.text(str(delta.get("text") or ""))
            if delta.get("type") == "input_json_delta":
                tool = self._tool_index.get(int(data.get("index", 0)))
                if tool is not None:
                    return writer.tool_arguments(tool, str(delta.get("partial_json") or ""))
            return b""
        if kind == "message_delta":
            if isinstance(data.get("usage"), dict):
                self._usage_raw.update({k: v for k, v in data["usage"].items() if v is not None})
            delta = data.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if reason:
                self._finish = FINISH_REASONS.get(str(reason), "stop")
                return writer.finish(self._finish)
            return b""
        if kind == "message_stop":
            self._stopped = True
            self.usage = usage_from_anthropic(self._usage_raw) or estimated_usage(
                self._request_body, writer.chars
            )
            tail = b"" if self._finish else writer.finish("stop")
            return tail + writer.done(self.usage)
        if kind == "error":
            error = data.get("error")
            error_type = error.get("type") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else str(error)
            failure_kind = (
                FailureKind.RATE_LIMIT
                if error_type == "rate_limit_error"
                else FailureKind.SERVER_ERROR
            )
            raise UpstreamFailure(
                failure_kind, f"upstream reported an error mid-stream: {error_type}: {message}"
            )
        return b""  # ping, content_block_stop and event types added later

    def finish(self) -> bytes:
        if not self._stopped:
            if self.usage is None and self._usage_raw:
                self.usage = usage_from_anthropic(self._usage_raw)
            raise UpstreamFailure(
                FailureKind.PROTOCOL, "upstream closed the stream before message_stop"
            )
        return b""
