"""A local stand-in for OpenAI's API, for the demo, tests and benchmarks.

It speaks OpenAI's wire format (bodies, SSE framing, error bodies, Retry-After) and can be told,
request by request, to misbehave the ways real providers do: error statuses, rate limits, hangs,
connection resets, and streams cut in the middle. It is not a model: replies are canned text.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
    504: ("server_error", None),
}


@dataclass
class Behaviour:
    """What the stand-in does with one request.

    kind: "ok", "status" (answer `status` with an OpenAI error body), "hang" (never answer),
    "reset" (drop the connection before answering), "cut" (stream `cut_after` chunks, then drop
    the connection), "stream-error" (stream `cut_after` chunks, then an error event).
    """

    kind: str = "ok"
    status: int = 500
    message: str | None = None
    code: str | None = None
    retry_after: str | None = None
    cut_after: int = 2
    delay: float = 0.0


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class OpenAIStandIn:
    """Behaviour script and request log of one stand-in server."""

    name: str
    reply: str = "Hello! This is a canned answer from a local stand-in model."
    api_key: str | None = None
    default: Behaviour = field(default_factory=Behaviour)
    script: deque[Behaviour] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    chunk_delay: float = 0.0
    #: Requests whose connection the caller dropped before the stand-in finished answering.
    cancelled: int = 0

    def then(self, *behaviours: Behaviour) -> OpenAIStandIn:
        self.script.extend(behaviours)
        return self

    def next_behaviour(self) -> Behaviour:
        return self.script.popleft() if self.script else self.default

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_cancelled])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        return app

    # -- handlers -------------------------------------------------------------------------------

    @web.middleware
    async def _count_cancelled(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise

    async def _prelude(self, request: web.Request) -> tuple[dict[str, Any], Behaviour]:
        body = orjson.loads(await request.read())
        self.received.append(Received(request.path, dict(request.headers), body))
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                shown = given.removeprefix("Bearer ")
                masked = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
                raise _error(
                    401,
                    f"Incorrect API key provided: {masked}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                )
        behaviour = self.next_behaviour()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.kind == "status":
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else None
            raise _error(behaviour.status, behaviour.message, behaviour.code, headers)
        if behaviour.kind == "hang":
            await asyncio.sleep(3600)
        if behaviour.kind == "reset":
            _drop_connection(request)
            raise web.HTTPInternalServerError()
        return body, behaviour

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self._prelude(request)
        model = str(body.get("model"))
        prompt_tokens = _count_prompt_tokens(body.get("messages"))
        text = f"[{self.name}] {self.reply}"
        words = _split_words(text)
        if body.get("stream"):
            return await self._stream(request, body, behaviour, model, prompt_tokens, words, True)
        return _json(
            {
                "id": _new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": _usage(prompt_tokens, len(words)),
                "system_fingerprint": "fp_standin",
            }
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self._prelude(request)
        model = str(body.get("model"))
        prompt = body.get("prompt")
        prompt_tokens = max(1, len(str(prompt)) // 4)
        text = f"[{self.name}] {self.reply}"
        words = _split_words(text)
        if body.get("stream"):
            return await self._stream(request, body, behaviour, model, prompt_tokens, words, False)
        return _json(
            {
                "id": _new_id("cmpl"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": _usage(prompt_tokens, len(words)),
            }
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body, _ = await self._prelude(request)
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = _fake_embedding(str(item))
            encoded: object = vector
            if as_base64:
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(max(1, len(str(i)) // 4) for i in items)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": str(body.get("model")),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _models(self, request: web.Request) -> web.Response:
        return _json(
            {
                "object": "list",
                "data": [{"id": "standin", "object": "model", "created": 0, "owned_by": self.name}],
            }
        )

    async def _stream_prelude(self, response: web.StreamResponse) -> None:
        """Frames a provider sends before the first chunk (none for OpenAI; Azure overrides)."""

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        behaviour: Behaviour,
        model: str,
        prompt_tokens: int,
        words: list[str],
        chat: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
            }
        )
        await response.prepare(request)
        await self._stream_prelude(response)
        ident = _new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if piece is not None:
                    delta["content"] = piece
                choice: dict[str, Any] = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish,
                }
                obj = "chat.completion.chunk"
            else:
                choice = {
                    "text": piece or "",
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": finish,
                }
                obj = "text_completion"
            payload: dict[str, Any] = {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if chat:
                payload["system_fingerprint"] = "fp_standin"
            if include_usage:
                payload["usage"] = None
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        frames = [chunk("", None, first=True)]
        frames += [chunk(w, None) for w in words]
        frames.append(chunk(None, "stop"))
        for index, frame in enumerate(frames):
            if behaviour.kind in ("cut", "stream-error") and index == behaviour.cut_after:
                if behaviour.kind == "cut":
                    _drop_connection(request)
                    return response
                error = {
                    "error": {
                        "message": behaviour.message or "The server had an error mid-stream.",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                await response.write(b"data: " + orjson.dumps(error) + b"\n\n")
                return response
            await response.write(frame)
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        if include_usage:
            usage_chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(prompt_tokens, len(words)),
            }
            await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _error(
    status: int,
    message: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.HTTPException:
    err_type, default_code = _ERROR_TYPES.get(status, ("invalid_request_error", None))
    if message is None:
        message = {
            429: "Rate limit reached for requests. Please try again later.",
            500: "The server had an error while processing your request. Sorry about that!",
            503: "The engine is currently overloaded, please try again later",
        }.get(status, f"Stand-in error {status}")
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": err_type,
                "param": None,
                "code": code or default_code,
            }
        }
    )
    exc = web.HTTPException(headers=headers)
    exc.set_status(status)
    exc.body = body
    exc.content_type = "application/json"
    return exc


def _json(data: object) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


def _new_id(prefix: str) -> str:
    return f"{prefix}-standin{time.monotonic_ns():x}"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _count_prompt_tokens(messages: object) -> int:
    if not isinstance(messages, list):
        return 1
    chars = 0
    for message in messages:
        if isinstance(message, dict):
            content = message.get("content")
            chars += len(content) if isinstance(content, str) else len(orjson.dumps(content))
    return max(1, chars // 4)


def _split_words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _fake_embedding(text: str, dims: int = 8) -> list[float]:
    seed = sum(text.encode()) or 1
    return [((seed * (i + 7)) % 97) / 97.0 for i in range(dims)]
