"""What every non-OpenAI stand-in shares: a behaviour script, a request log and misbehaviour.

Each provider's stand-in subclasses `ScriptedStandIn` and supplies its own routes, its own way of
checking credentials and its own error body; the script (`then(...)`) decides per request whether
it answers normally, with an error status, hangs, drops the connection or cuts its stream, using
the same `Behaviour` as the OpenAI stand-in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .openai import Behaviour, Received


@dataclass
class ScriptedStandIn:
    name: str
    reply: str = "Hello! This is a canned answer from a local stand-in model."
    api_key: str | None = None
    default: Behaviour = field(default_factory=Behaviour)
    script: deque[Behaviour] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    chunk_delay: float = 0.0
    #: Arguments of the tool call answered by `Behaviour(kind="tool")`.
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Paris"})

    def then(self, *behaviours: Behaviour) -> ScriptedStandIn:
        self.script.extend(behaviours)
        return self

    def next_behaviour(self) -> Behaviour:
        return self.script.popleft() if self.script else self.default

    @property
    def text(self) -> str:
        return f"[{self.name}] {self.reply}"

    def words(self) -> list[str]:
        words = self.text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    # -- provider specifics -----------------------------------------------------------------

    def auth_error(self, request: web.Request, raw: bytes) -> web.HTTPException | None:
        """The provider's answer to a request with missing or wrong credentials."""
        raise NotImplementedError

    def error(
        self, status: int, message: str | None = None, headers: dict[str, str] | None = None
    ) -> web.HTTPException:
        """The provider's error response for `status`."""
        raise NotImplementedError

    # -- shared request handling ------------------------------------------------------------

    async def prelude(self, request: web.Request) -> tuple[dict[str, Any], Behaviour]:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self.error(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise self.error(400, "The request body must be a JSON object.")
        # The path as sent (still percent-encoded), query included.
        self.received.append(Received(request.raw_path, dict(request.headers), body))
        denied = self.auth_error(request, raw)
        if denied is not None:
            raise denied
        behaviour = self.next_behaviour()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.kind == "status":
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else None
            raise self.error(behaviour.status, behaviour.message, headers)
        if behaviour.kind == "hang":
            await asyncio.sleep(3600)
        if behaviour.kind == "reset":
            drop_connection(request)
            raise web.HTTPInternalServerError()
        return body, behaviour

    async def pace(self) -> None:
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay)


def drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def json_error(
    status: int, body: object, headers: dict[str, str] | None = None
) -> web.HTTPException:
    exc = web.HTTPException(headers=headers)
    exc.set_status(status)
    exc.body = orjson.dumps(body)
    exc.content_type = "application/json"
    return exc


def cut_here(behaviour: Behaviour, index: int) -> bool:
    """Whether a cut or stream-error behaviour strikes before frame `index`."""
    return behaviour.kind in ("cut", "stream-error") and index == behaviour.cut_after
