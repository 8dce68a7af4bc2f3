"""The OpenAI chat-completions format, as the translating adapters read and write it.

Reading: the app's request split into system text and turns, content parts normalised (text,
images as base64 or URL), tool calls with parsed arguments, and a clear `UNSUPPORTED` failure for
what a provider cannot express. Writing: `chat.completion` bodies and the `chat.completion.chunk`
SSE frames of a stream, built the same way for every provider, so the app cannot tell which
provider served it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .base import FailureKind, Translated, UpstreamFailure, Usage, estimated_usage, unsupported
from .sse import DONE_FRAME, SSEParser, sse_data


@dataclass(slots=True)
class Image:
    """An image part: inline base64 `data` with its media type, or a `url` to fetch."""

    media_type: str | None = None
    data: str | None = None
    url: str | None = None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    #: The arguments as the JSON text OpenAI carries them in.
    arguments: str


Part = str | Image


def invalid(message: str, param: str | None = None) -> UpstreamFailure:
    """A request no provider could accept: ends the request with 400, like the upstream would."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return UpstreamFailure(
        FailureKind.CLIENT_ERROR, message, 400, None, orjson.dumps({"error": error})
    )


def messages_of(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{index}] must be an object with a 'role'", "messages")
    return messages


def is_system(message: Mapping[str, Any]) -> bool:
    return message.get("role") in ("system", "developer")


def system_text(messages: list[dict[str, Any]]) -> str | None:
    """All system/developer messages joined, or None when there are none."""
    texts: list[str] = []
    for message in messages:
        if is_system(message):
            texts.extend(p for p in parts(message.get("content"), "system") if isinstance(p, str))
    return "\n\n".join(texts) if texts else None


def parts(content: object, provider: str) -> list[Part]:
    """A message's content as text and image parts (empty text dropped)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        raise invalid("message content must be a string or an array of parts", "messages")
    out: list[Part] = []
    for part in content:
        if not isinstance(part, dict):
            raise invalid("content parts must be objects", "messages")
        kind = part.get("type")
        if kind in ("text", "refusal"):
            text = part.get(kind)
            if isinstance(text, str) and text:
                out.append(text)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise invalid("image_url parts need image_url.url", "messages")
            out.append(parse_image(url))
        else:
            raise unsupported(provider, f"content parts of type {kind!r}")
    return out


def text_of(content: object, provider: str) -> str:
    """The text of a content that may only hold text (tool results, system prompts)."""
    return "".join(p for p in parts(content, provider) if isinstance(p, str))


def parse_image(url: str) -> Image:
    if url.startswith("data:"):
        header, sep, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not sep or encoding != "base64":
            raise invalid("image data URLs must be base64: data:<type>;base64,<data>", "messages")
        return Image(media_type=media_type or "image/png", data=data)
    return Image(url=url)


def tool_calls_of(message: Mapping[str, Any]) -> list[ToolCall]:
    calls = message.get("tool_calls")
    if not calls:
        return []
    if not isinstance(calls, list):
        raise invalid("tool_calls must be an array", "messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid("each tool call needs function.name", "messages")
        arguments = function.get("arguments")
        out.append(
            ToolCall(
                str(call.get("id") or ""),
                function["name"],
                arguments if isinstance(arguments, str) else "{}",
            )
        )
    return out


def arguments_object(call: ToolCall) -> dict[str, Any]:
    """Tool-call arguments as the JSON object the non-OpenAI providers carry."""
    try:
        value = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        raise invalid(
            f"tool call {call.id!r} has arguments that are not valid JSON", "messages"
        ) from None
    if not isinstance(value, dict):
        raise invalid(f"tool call {call.id!r} arguments must be a JSON object", "messages")
    return value


@dataclass(slots=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any]


def function_tools(body: Mapping[str, Any], provider: str) -> list[FunctionTool]:
    tools = body.get("tools")
    if not tools:
        return []
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array", "tools")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise unsupported(provider, f"tools of type {kind!r}")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise invalid("each tool needs function.name", "tools")
        parameters = function.get("parameters")
        if not isinstance(parameters, dict):
            parameters = {"type": "object", "properties": {}}
        description = function.get("description")
        out.append(
            FunctionTool(
                function["name"],
                description if isinstance(description, str) else None,
                parameters,
            )
        )
    return out


def tool_choice(body: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """("auto" | "none" | "required" | "function", function name) or None when unset."""
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if choice in ("auto", "none", "required"):
        return str(choice), None
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "function", function["name"]
    raise invalid(f"unknown tool_choice {choice!r}", "tool_choice")


def stop_sequences(body: Mapping[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise invalid("'stop' must be a string or an array of strings", "stop")


def max_tokens(body: Mapping[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(f"'{key}' must be a positive integer", key)
            return value
    return None


def reject_unsupported(body: Mapping[str, Any], provider: str) -> None:
    """Refuse OpenAI features that only OpenAI-format servers offer."""
    n = body.get("n")
    if n not in (None, 1):
        raise unsupported(provider, "more than one choice (n > 1)")
    if body.get("logprobs"):
        raise unsupported(provider, "logprobs")


def json_schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The JSON schema the app's `response_format` asks the output to follow, if any.

    `json_object` asks for any JSON object; `text` (or nothing) for no constraint.
    """
    response_format = body.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {"type": "object"}
    raise invalid(f"unknown response_format type {kind!r}", "response_format")


def walk_turns(
    messages: list[dict[str, Any]],
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The non-system messages with their index, in order."""
    for index, message in enumerate(messages):
        if not is_system(message):
            yield index, message


def tool_call_id(message: Mapping[str, Any], index: int) -> str:
    """The id of the call a `tool` message (messages[index]) answers."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise invalid(f"messages[{index}]: tool messages need tool_call_id", "messages")
    return call_id


def unknown_role(message: Mapping[str, Any], index: int) -> UpstreamFailure:
    return invalid(f"messages[{index}]: unknown role {message['role']!r}", "messages")


def merge_turn(
    turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]], key: str = "content"
) -> None:
    """Append a turn, or extend the last one of the same role: these APIs want roles to
    alternate, and tool results (a user turn) may follow each other or a user message."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(blocks)
    else:
        turns.append({"role": role, key: blocks})


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
    }


def completion_body(
    ident: str,
    model: str,
    text: str | None,
    tool_calls: list[ToolCall],
    finish_reason: str,
    usage: Usage,
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in tool_calls
        ]
    return orjson.dumps(
        {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            ],
            "usage": usage_json(usage),
        }
    )


def translated_completion(
    ident: str,
    model: str,
    texts: list[str],
    calls: list[ToolCall],
    finish_reason: str,
    usage: Usage | None,
    request_body: Mapping[str, Any],
) -> Translated:
    """A provider's complete answer as the `chat.completion` the app receives; usage the
    provider did not report is estimated from the request and the text."""
    if usage is None:
        usage = estimated_usage(request_body, sum(map(len, texts)))
    text = "".join(texts) if texts or not calls else None
    return Translated(completion_body(ident, model, text, calls, finish_reason, usage), usage)


class ChunkWriter:
    """Builds the `chat.completion.chunk` SSE frames of one translated stream."""

    __slots__ = ("_created", "_id", "_include_usage", "_model", "chars")

    def __init__(self, model: str, request_body: Mapping[str, Any], ident: str = "") -> None:
        self._id = ident or new_id("chatcmpl")
        self._model = model
        self._created = int(time.time())
        options = request_body.get("stream_options")
        self._include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        #: Characters of content and arguments written, for a usage estimate.
        self.chars = 0

    def _frame(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if self._include_usage:
            payload["usage"] = None
        return sse_data(orjson.dumps(payload))

    def role(self) -> bytes:
        return self._frame({"role": "assistant", "content": ""})

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        self.chars += len(text)
        return self._frame({"content": text})

    def tool_start(self, index: int, ident: str, name: str, arguments: str = "") -> bytes:
        self.chars += len(name) + len(arguments)
        call = {
            "index": index,
            "id": ident,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        return self._frame({"tool_calls": [call]})

    def tool_arguments(self, index: int, fragment: str) -> bytes:
        if not fragment:
            return b""
        self.chars += len(fragment)
        return self._frame({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def finish(self, reason: str) -> bytes:
        return self._frame({}, reason)

    def done(self, usage: Usage) -> bytes:
        """The usage chunk (when the app asked for one) and `[DONE]`."""
        if not self._include_usage:
            return DONE_FRAME
        payload = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": usage_json(usage),
        }
        return sse_data(orjson.dumps(payload)) + DONE_FRAME


def sse_json_objects(parser: SSEParser, chunk: bytes, what: str) -> Iterator[dict[str, Any]]:
    """The JSON objects of the SSE events completed by `chunk` (events without data skipped)."""
    for event in parser.feed(chunk):
        if event.data:
            yield parse_json_object(event.data, what)


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    """A provider's JSON object, or a PROTOCOL failure saying what was wrong."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamFailure(FailureKind.PROTOCOL, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise UpstreamFailure(FailureKind.PROTOCOL, f"{what} is not a JSON object")
    return value


def token_count(data: bytes, field: str, what: str) -> int:
    """The token count in `field` of a provider's token counting answer (PROTOCOL if none)."""
    tokens = parse_json_object(data, what).get(field)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise UpstreamFailure(FailureKind.PROTOCOL, f"{what} has no {field}")
    return tokens
