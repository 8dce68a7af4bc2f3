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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .scripted import (
    Behaviour,
    Received,
    ScriptedStandIn,
    cut_here,
    drop_connection,
    json_error,
    open_sse,
    retry_after,
)

__all__ = ["Behaviour", "OpenAIStandIn", "Received"]

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
class OpenAIStandIn(ScriptedStandIn):
    """Behaviour script and request log of one stand-in server."""

    #: Requests whose connection the caller dropped before the stand-in finished answering.
    cancelled: int = 0

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

    def auth_error(self, request: web.Request, raw: bytes) -> web.HTTPException | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if given == f"Bearer {self.api_key}":
            return None
        shown = given.removeprefix("Bearer ")
        masked = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
        return self.error(
            401,
            f"Incorrect API key provided: {masked}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
        )

    def error(
        self, status: int, message: str | None = None, headers: dict[str, str] | None = None
    ) -> web.HTTPException:
        return _error(status, message, None, headers)

    def scripted_error(self, behaviour: Behaviour) -> web.HTTPException:
        return _error(behaviour.status, behaviour.message, behaviour.code, retry_after(behaviour))

    async def _prelude(self, request: web.Request) -> tuple[dict[str, Any], Behaviour]:
        # Unlike `prelude`, the log keeps the path without its query (Azure's api-version), and
        # the body is not checked: the stand-in has always answered a broken one with a bare 500.
        raw = await request.read()
        body = orjson.loads(raw)
        self.received.append(Received(request.path, dict(request.headers), body))
        denied = self.auth_error(request, raw)
        if denied is not None:
            raise denied
        return body, await self.act_out(request)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, behaviour = await self._prelude(request)
        model = str(body.get("model"))
        prompt_tokens = _count_prompt_tokens(body.get("messages"))
        text = self.text
        words = self.words()
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
        text = self.text
        words = self.words()
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
        response = await open_sse(request)
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
            if cut_here(behaviour, index):
                if behaviour.kind == "cut":
                    drop_connection(request)
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
            await self.pace()
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
        if behaviour.hold_end is not None:
            await behaviour.hold_end.wait()
        await response.write_eof()
        return response


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
    error = {"message": message, "type": err_type, "param": None, "code": code or default_code}
    return json_error(status, {"error": error}, headers)


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


def _fake_embedding(text: str, dims: int = 8) -> list[float]:
    seed = sum(text.encode()) or 1
    return [((seed * (i + 7)) % 97) / 97.0 for i in range(dims)]
