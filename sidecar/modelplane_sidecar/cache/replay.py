"""Between complete answers and streams: replay a cached answer as SSE, record a stream as one.

The cache holds complete OpenAI answers (`chat.completion`, `text_completion`). A streaming
request served from the cache gets the answer replayed as `chat.completion.chunk` (or
`text_completion`) frames: per choice one delta with the role, content, refusal and tool calls,
one with the finish reason, then the usage chunk when the app asked for it, then `[DONE]`. A
streaming request that went upstream is recorded (the OpenAI frames the app was sent, up to the
entry size bound) and assembled back into the complete answer, so streaming apps fill the cache
too.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..providers.base import Usage
from ..providers.sse import DONE_FRAME, SSEParser


def _frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def replay_frames(body: bytes, include_usage: bool) -> bytes | None:
    """The SSE stream for a cached answer, or None when `body` is no answer to replay."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
        return None
    chat = doc.get("object") == "chat.completion"
    base: dict[str, Any] = {
        "id": doc.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": doc.get("created"),
        "model": doc.get("model"),
    }
    if chat and "system_fingerprint" in doc:
        base["system_fingerprint"] = doc["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    frames: list[bytes] = []
    for choice in doc["choices"]:
        if not isinstance(choice, dict):
            return None
        index = choice.get("index", 0)
        if chat:
            message = choice.get("message")
            if not isinstance(message, dict):
                return None
            delta: dict[str, Any] = {
                "role": message.get("role") or "assistant",
                "content": message.get("content"),
            }
            if message.get("refusal"):
                delta["refusal"] = message["refusal"]
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, list) and tool_calls:
                calls = [c for c in tool_calls if isinstance(c, dict)]
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            first = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None}
        else:
            first = {"index": index, "text": choice.get("text") or "", "logprobs": None}
            first["finish_reason"] = None
            last = {"index": index, "text": "", "logprobs": None}
        last["finish_reason"] = choice.get("finish_reason")
        frames.append(_frame({**base, "choices": [first]}))
        frames.append(_frame({**base, "choices": [last]}))
    if include_usage:
        frames.append(_frame({**base, "choices": [], "usage": doc.get("usage")}))
    frames.append(DONE_FRAME)
    return b"".join(frames)


def _openai_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


class _Choice:
    __slots__ = ("content", "finish_reason", "refusal", "role", "tools")

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None


class StreamRecorder:
    """Keeps the OpenAI SSE frames of one stream (up to `limit` bytes) to cache the answer."""

    __slots__ = ("_parts", "_size", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.overflowed = False

    def feed(self, frames: bytes) -> None:
        if self.overflowed:
            return
        self._size += len(frames)
        if self._size > self.limit:
            self.overflowed = True
            self._parts.clear()
            return
        self._parts.append(frames)

    def completion(self, usage: Usage | None) -> bytes | None:
        """The complete answer the stream carried, or None if it cannot be cached whole."""
        if self.overflowed:
            return None
        head: dict[str, Any] | None = None
        choices: dict[int, _Choice] = {}
        texts: dict[int, list[str]] = {}
        reported: object = None
        done = False
        for event in SSEParser().feed(b"".join(self._parts)):
            if event.data == b"[DONE]":
                done = True
                continue
            if not event.data:
                continue
            try:
                chunk = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(chunk, dict) or "error" in chunk:
                return None
            if head is None:
                head = chunk
            if chunk.get("usage"):
                reported = chunk["usage"]
            for raw in chunk.get("choices") or ():
                if not isinstance(raw, dict) or raw.get("logprobs") is not None:
                    return None
                index = int(raw.get("index") or 0)
                choice = choices.setdefault(index, _Choice())
                if raw.get("finish_reason"):
                    choice.finish_reason = raw["finish_reason"]
                if "text" in raw:
                    texts.setdefault(index, []).append(str(raw.get("text") or ""))
                    continue
                if not _merge_delta(choice, raw.get("delta")):
                    return None
        if head is None or not choices or not done:
            return None  # cut short: never cache a partial answer
        if any(c.finish_reason is None for c in choices.values()):
            return None
        if reported is None and usage is not None and not usage.estimated:
            reported = _openai_usage(usage)
        chat = head.get("object") == "chat.completion.chunk"
        out: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion" if chat else "text_completion",
            "created": head.get("created"),
            "model": head.get("model"),
            "choices": [
                _chat_choice(i, choices[i]) if chat else _text_choice(i, choices[i], texts)
                for i in sorted(choices)
            ],
        }
        if reported is not None:
            out["usage"] = reported
        if chat and "system_fingerprint" in head:
            out["system_fingerprint"] = head["system_fingerprint"]
        return orjson.dumps(out)


def _merge_delta(choice: _Choice, delta: object) -> bool:
    if delta is None:
        return True
    if not isinstance(delta, dict):
        return False
    if delta.get("role"):
        choice.role = str(delta["role"])
    if isinstance(delta.get("content"), str):
        choice.content.append(delta["content"])
    if isinstance(delta.get("refusal"), str):
        choice.refusal.append(delta["refusal"])
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            return False
        slot = choice.tools.setdefault(
            int(call.get("index") or 0),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function")
        if isinstance(function, dict):
            if function.get("name"):
                slot["function"]["name"] += function["name"]
            if function.get("arguments"):
                slot["function"]["arguments"] += function["arguments"]
    return True


def _chat_choice(index: int, choice: _Choice) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": choice.role,
        "content": "".join(choice.content) if choice.content or not choice.tools else None,
        "refusal": "".join(choice.refusal) if choice.refusal else None,
    }
    if choice.tools:
        message["tool_calls"] = [choice.tools[i] for i in sorted(choice.tools)]
    return {
        "index": index,
        "message": message,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }


def _text_choice(index: int, choice: _Choice, texts: dict[int, list[str]]) -> dict[str, Any]:
    return {
        "text": "".join(texts.get(index, ())),
        "index": index,
        "logprobs": None,
        "finish_reason": choice.finish_reason,
    }
