"""The Anthropic front door: `POST /v1/messages` for apps that speak Anthropic's Messages API.

An app using the `anthropic` SDK with `ANTHROPIC_BASE_URL` pointed at the sidecar is routed like
any other: its request is translated into an OpenAI chat request, goes through the same routing
and forwarder (so it may be served by OpenAI, Gemini, Bedrock or a self-hosted model, and fall
back across them), and the OpenAI-format answer is translated back: a `message` body, a stream
of Messages events (`message_start`, `content_block_*`, `message_delta`, `message_stop`, `error`)
or an Anthropic error body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from ..errors import ApiError, bad_request
from ..providers.sse import SSEParser

#: OpenAI `finish_reason` -> Anthropic `stop_reason`.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_EFFORT = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}

FrontDoor = Callable[[dict[str, Any]], tuple[dict[str, Any], "AnthropicDialect"]]


async def serve(
    route: Callable[[FrontDoor], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Run `route` with this door's translation, answering errors in Anthropic's shape."""
    try:
        response = await route(openai_request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    if response.status >= 400 and isinstance(response, web.Response):
        return _rewrite_error(response)
    return response


def error_body(status: int, message: str) -> bytes:
    kind = _ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def error_response(status: int, message: str, headers: Mapping[str, str]) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(status, message),
        content_type="application/json",
        headers=dict(headers),
    )


def _rewrite_error(response: web.Response) -> web.Response:
    message = f"upstream answered HTTP {response.status}"
    try:
        parsed = orjson.loads(response.body) if isinstance(response.body, bytes) else None
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    headers = {k: v for k, v in response.headers.items() if k.lower().startswith("x-")}
    return error_response(response.status, message, headers)


# -- request: Anthropic Messages -> OpenAI chat ------------------------------------------------


def openai_request(body: dict[str, Any]) -> tuple[dict[str, Any], AnthropicDialect]:
    """The OpenAI chat body for an Anthropic Messages request, and the dialect to answer in."""
    limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise bad_request("max_tokens: Field required (a positive integer)", param="max_tokens")
    out = _chat_request(body)
    out["max_tokens"] = limit
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out, AnthropicDialect(out["model"])


def count_tokens_request(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat body whose prompt `/v1/messages/count_tokens` counts (no `max_tokens`:
    the count is of the input; `stream` does not apply)."""
    return _chat_request(body)


def _chat_request(body: dict[str, Any]) -> dict[str, Any]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model: Field required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("messages: Field required (an array)", param="messages")
    out_messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out_messages.append({"role": "system", "content": _text(system, "system")})
    for index, message in enumerate(messages):
        out_messages.extend(_message(message, index))
    out: dict[str, Any] = {"model": model, "messages": out_messages}
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    stops = body.get("stop_sequences")
    if stops:
        out["stop"] = stops
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(t) for t in tools]
    _tool_choice(body.get("tool_choice"), out)
    _output_config(body.get("output_config"), out)
    return out


def _text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for block in content:
            if not isinstance(block, dict) or block.get("type") != "text":
                raise bad_request(f"{where}: only text blocks are allowed here")
            texts.append(str(block.get("text", "")))
        return "".join(texts)
    raise bad_request(f"{where}: expected a string or an array of text blocks")


def _message(message: object, index: int) -> list[dict[str, Any]]:
    where = f"messages.{index}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise bad_request(f"{where}: role must be 'user' or 'assistant'")
    role = message["role"]
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: expected a string or an array of blocks")
    tool_results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for number, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(block, dict):
            raise bad_request(f"{where}.content.{number}: expected an object")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image" and role == "user":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, where)}})
        elif kind == "tool_result" and role == "user":
            tool_results.append(
                {
                    "role": "tool",
                    "tool_call_id": str(block.get("tool_use_id")),
                    "content": _text(block.get("content") or "", f"{where}.content.{number}"),
                }
            )
        elif kind == "tool_use" and role == "assistant":
            calls.append(
                {
                    "id": str(block.get("id")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name")),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # reasoning of an earlier turn: other providers cannot take it back
        else:
            raise bad_request(
                f"{where}.content.{number}: blocks of type {kind!r} are not supported by this "
                "router's Anthropic front door"
            )
    out: list[dict[str, Any]] = list(tool_results)
    if role == "assistant":
        text = "".join(p["text"] for p in parts)
        assistant: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            assistant["tool_calls"] = calls
        if text or calls:
            out.append(assistant)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _image_url(block: Mapping[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, dict) and source.get("type") == "url":
        return str(source.get("url"))
    raise bad_request(f"{where}: image source must be base64 or url")


def _tool(tool: object) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise bad_request(f"tools: server tools ({kind!r}) are not supported by this router")
    function: dict[str, Any] = {
        "name": str(tool.get("name")),
        "parameters": tool.get("input_schema") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: object, out: dict[str, Any]) -> None:
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in ("auto", "any", "none"):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[str(kind)]
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


def _output_config(config: object, out: dict[str, Any]) -> None:
    if not isinstance(config, dict):
        return
    output_format = config.get("format")
    if isinstance(output_format, dict) and output_format.get("type") == "json_schema":
        schema = output_format.get("schema") or {"type": "object"}
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema},
        }
    effort = _EFFORT.get(str(config.get("effort")))
    if effort is not None:
        out["reasoning_effort"] = effort


# -- response: OpenAI chat -> Anthropic Messages ------------------------------------------------


def _usage(raw: object) -> dict[str, int]:
    usage = raw if isinstance(raw, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return {
        "input_tokens": max(0, int(usage.get("prompt_tokens") or 0) - cached),
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _tool_input(arguments: object) -> Any:
    try:
        value = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class AnthropicDialect:
    """Answers an Anthropic-speaking app: body and stream in the Messages format."""

    def __init__(self, requested_model: str) -> None:
        self.requested_model = requested_model

    def response_body(self, body: bytes) -> bytes:
        completion = orjson.loads(body)
        choice = (completion.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "input": _tool_input(function.get("arguments")),
                }
            )
        return orjson.dumps(
            {
                "id": _message_id(completion.get("id")),
                "type": "message",
                "role": "assistant",
                "model": completion.get("model") or self.requested_model,
                "content": content,
                "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
                "stop_sequence": None,
                "usage": _usage(completion.get("usage")),
            }
        )

    def stream(self) -> AnthropicStreamRewriter:
        return AnthropicStreamRewriter(self.requested_model)


def _message_id(openai_id: object) -> str:
    return f"msg_{openai_id}" if openai_id else "msg_modelplane"


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


class AnthropicStreamRewriter:
    """OpenAI `chat.completion.chunk` frames in, Anthropic Messages stream events out."""

    __slots__ = (
        "_blocks",
        "_model",
        "_open",
        "_parser",
        "_started",
        "_stop_reason",
        "_tool_blocks",
        "_usage",
    )

    def __init__(self, model: str) -> None:
        self._parser = SSEParser()
        self._model = model
        self._started = False
        self._blocks = 0
        #: The open content block: ("text", index) or ("tool", index), or None.
        self._open: tuple[str, int] | None = None
        #: OpenAI tool-call index -> Anthropic content-block index.
        self._tool_blocks: dict[int, int] = {}
        self._stop_reason = "end_turn"
        self._usage: dict[str, int] = _usage(None)

    def feed(self, frames: bytes) -> bytes:
        out: list[bytes] = []
        for event in self._parser.feed(frames):
            if event.data == b"[DONE]":
                out.append(self._close())
                out.append(
                    _event(
                        "message_delta",
                        {
                            "delta": {"stop_reason": self._stop_reason, "stop_sequence": None},
                            "usage": self._usage,
                        },
                    )
                )
                out.append(_event("message_stop", {}))
                continue
            if not event.data:
                continue
            chunk = orjson.loads(event.data)
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                message = str(error.get("message") or "upstream stream failed")
                out.append(_event("error", {"error": {"type": "api_error", "message": message}}))
                continue
            out.append(self._chunk(chunk))
        return b"".join(out)

    def _chunk(self, chunk: dict[str, Any]) -> bytes:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            message: dict[str, Any] = {
                "id": _message_id(chunk.get("id")),
                "type": "message",
                "role": "assistant",
                "model": chunk.get("model") or self._model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": _usage(None),
            }
            out.append(_event("message_start", {"message": message}))
        if chunk.get("usage"):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._open is None or self._open[0] != "text":
                    out.append(self._close())
                    out.append(self._start({"type": "text", "text": ""}, "text"))
                out.append(self._delta({"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or []:
                out.append(self._tool_call(call))
            if choice.get("finish_reason"):
                self._stop_reason = STOP_REASONS.get(str(choice["finish_reason"]), "end_turn")
                out.append(self._close())
        return b"".join(out)

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        out: list[bytes] = []
        index = int(call.get("index") or 0)
        function = call.get("function") or {}
        if index not in self._tool_blocks:
            out.append(self._close())
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{index}",
                "name": function.get("name") or "",
                "input": {},
            }
            out.append(self._start(block, "tool"))
            self._tool_blocks[index] = self._blocks - 1
        arguments = function.get("arguments")
        if arguments and self._open == ("tool", self._tool_blocks[index]):
            out.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return b"".join(out)

    def _start(self, block: dict[str, Any], kind: str) -> bytes:
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        return _event("content_block_start", {"index": index, "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        assert self._open is not None
        return _event("content_block_delta", {"index": self._open[1], "delta": delta})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index = self._open[1]
        self._open = None
        return _event("content_block_stop", {"index": index})
