"""A local stand-in for Anthropic's Messages API (`POST /v1/messages`), for tests and demos.

Requests are checked the way the real API checks them: the key (`x-api-key` or a bearer token),
the `anthropic-version` header, and the body against the `anthropic` SDK's own request types (an
unknown or misspelt field is a 400 `invalid_request_error`), plus the rule that every
`tool_result` answers a `tool_use` of the previous assistant turn. Responses and stream events
are built from the SDK's response models, so their field names are Anthropic's, not ours.
Behaviours as for the OpenAI stand-in, plus `kind="tool"` (answer with a tool_use of the first
tool) and `kind="refusal"`. `POST /v1/messages/count_tokens` is checked the same way (against
the SDK's `MessageCountTokensParams`: `max_tokens` or `stream` there are 400s) and answers the
SDK's `MessageTokensCount`, `{"input_tokens": N}`; scripted behaviours apply to it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from anthropic.types import (
    ContentBlock,
    ErrorResponse,
    Message,
    MessageDeltaUsage,
    MessageTokensCount,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    ToolUseBlock,
    Usage,
)
from anthropic.types import message_create_params as params
from anthropic.types.input_json_delta import InputJSONDelta
from anthropic.types.message_count_tokens_params import MessageCountTokensParams
from anthropic.types.raw_message_delta_event import Delta
from pydantic import BaseModel

from .conformance import problems
from .scripted import (
    Behaviour,
    ScriptedStandIn,
    cut_here,
    drop_connection,
    json_error,
    open_sse,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_DEFAULT_MESSAGES = {
    429: "Number of request tokens has exceeded your per-minute rate limit.",
    500: "Internal server error",
    529: "Overloaded",
}


@dataclass
class AnthropicStandIn(ScriptedStandIn):
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    #: Input tokens count_tokens answers (None: about four characters of messages per token).
    counted_tokens: int | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        return app

    def auth_error(self, request: web.Request, raw: bytes) -> web.HTTPException | None:
        if self.api_key is not None:
            # The API takes the key in `x-api-key`, or as a bearer token (what SDK 2.x sends).
            bearer = request.headers.get("authorization", "")
            given = request.headers.get("x-api-key") or bearer.removeprefix("Bearer ") or None
            if given is None:
                return self.error(401, "x-api-key header is required")
            if given != self.api_key:
                return self.error(401, "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            return self.error(400, "anthropic-version: header is required")
        return None

    def error(
        self, status: int, message: str | None = None, headers: dict[str, str] | None = None
    ) -> web.HTTPException:
        kind = _ERROR_TYPES.get(status, "api_error")
        text = message or _DEFAULT_MESSAGES.get(status, f"Stand-in error {status}")
        body = ErrorResponse.model_validate(
            {"type": "error", "error": {"type": kind, "message": text}, "request_id": _id("req")}
        )
        return json_error(
            status, _dump(body), {"request-id": str(body.request_id), **(headers or {})}
        )

    async def _count_tokens(self, request: web.Request) -> web.Response:
        body, _ = await self.prelude(request)
        found = problems(body, MessageCountTokensParams)
        found += _tool_results_answer_tool_uses(body.get("messages"))
        if found:
            raise self.error(400, "; ".join(found[:5]))
        counted = self.counted_tokens
        if counted is None:
            counted = max(1, len(orjson.dumps(body.get("messages"))) // 4)
        answer = MessageTokensCount(input_tokens=counted)
        return web.Response(body=orjson.dumps(_dump(answer)), content_type="application/json")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self.prelude(request)
        streaming = body.get("stream") is True
        shape = params.MessageCreateParamsStreaming if streaming else params.MessageCreateParams
        found = problems(body, shape)
        found += _tool_results_answer_tool_uses(body.get("messages"))
        if found:
            raise self.error(400, "; ".join(found[:5]))
        usage = Usage(
            input_tokens=max(1, len(orjson.dumps(body.get("messages"))) // 4),
            output_tokens=0,
            cache_read_input_tokens=self.cache_read_tokens,
            cache_creation_input_tokens=self.cache_write_tokens,
        )
        content: list[ContentBlock]
        if behaviour.kind == "tool" and body.get("tools"):
            tool = body["tools"][0]
            content = [ToolUseBlock(type="tool_use", id=_id("toolu"), name=tool["name"], input={})]
            stop_reason = "tool_use"
        elif behaviour.kind == "refusal":
            content, stop_reason = [], "refusal"
        else:
            content = [TextBlock(type="text", text=self.text)]
            stop_reason = "end_turn"
        usage.output_tokens = len(self.words()) if content else 0
        message = Message(
            id=_id("msg"),
            type="message",
            role="assistant",
            model=str(body.get("model")),
            content=content,
            stop_reason=stop_reason,  # type: ignore[arg-type]
            stop_sequence=None,
            usage=usage,
        )
        if not streaming:
            for block in content:
                if isinstance(block, ToolUseBlock):
                    block.input = self.tool_input
            return web.Response(body=orjson.dumps(_dump(message)), content_type="application/json")
        return await self._stream(request, behaviour, message)

    async def _stream(
        self, request: web.Request, behaviour: Behaviour, message: Message
    ) -> web.StreamResponse:
        response = await open_sse(request)
        start = message.model_copy(
            update={
                "content": [],
                "stop_reason": None,
                "usage": message.usage.model_copy(update={"output_tokens": 1}),
            }
        )
        events: list[BaseModel | dict[str, str]] = [
            RawMessageStartEvent(type="message_start", message=start),
            {"type": "ping"},
        ]
        for index, block in enumerate(message.content):
            if isinstance(block, ToolUseBlock):
                events.append(
                    RawContentBlockStartEvent(
                        type="content_block_start",
                        index=index,
                        content_block=ToolUseBlock(
                            type="tool_use", id=block.id, name=block.name, input={}
                        ),
                    )
                )
                arguments = orjson.dumps(self.tool_input).decode()
                half = len(arguments) // 2
                for piece in (arguments[:half], arguments[half:]):
                    events.append(
                        RawContentBlockDeltaEvent(
                            type="content_block_delta",
                            index=index,
                            delta=InputJSONDelta(type="input_json_delta", partial_json=piece),
                        )
                    )
            else:
                events.append(
                    RawContentBlockStartEvent(
                        type="content_block_start",
                        index=index,
                        content_block=TextBlock(type="text", text=""),
                    )
                )
                for word in self.words():
                    events.append(
                        RawContentBlockDeltaEvent(
                            type="content_block_delta",
                            index=index,
                            delta=TextDelta(type="text_delta", text=word),
                        )
                    )
            events.append(RawContentBlockStopEvent(type="content_block_stop", index=index))
        events.append(
            RawMessageDeltaEvent(
                type="message_delta",
                delta=Delta(stop_reason=message.stop_reason, stop_sequence=None),
                usage=MessageDeltaUsage(output_tokens=message.usage.output_tokens),
            )
        )
        events.append(RawMessageStopEvent(type="message_stop"))
        for index, event in enumerate(events):
            if cut_here(behaviour, index):
                if behaviour.kind == "cut":
                    drop_connection(request)
                    return response
                error = {
                    "type": "error",
                    "error": {
                        "type": "overloaded_error",
                        "message": behaviour.message or "Overloaded",
                    },
                }
                await response.write(_sse("error", error))
                return response
            data = event if isinstance(event, dict) else _dump(event)
            await response.write(_sse(str(data["type"]), data))
            await self.pace()
        await response.write_eof()
        return response


def _tool_results_answer_tool_uses(messages: object) -> list[str]:
    if not isinstance(messages, list):
        return []
    found = []
    previous_ids: set[str] = set()
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        for block in blocks:
            if block.get("type") == "tool_result" and block.get("tool_use_id") not in previous_ids:
                found.append(
                    f"messages.{index}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
            if block.get("type") == "text" and not block.get("text"):
                found.append(f"messages.{index}: text content blocks must be non-empty")
        previous_ids = {str(b.get("id")) for b in blocks if b.get("type") == "tool_use"}
    return found


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_unset=True)


def _sse(event: str, data: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _id(prefix: str) -> str:
    return f"{prefix}_standin{os.urandom(8).hex()}"
