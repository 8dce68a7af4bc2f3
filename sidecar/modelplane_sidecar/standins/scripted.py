"""What every stand-in shares: a behaviour script, a request log and misbehaviour.

Each provider's stand-in subclasses `ScriptedStandIn` and supplies its own routes, its own way of
checking credentials and its own error body; the script (`then(...)`) decides per request whether
it answers normally, with an error status, hangs, drops the connection or cuts its stream.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiohttp import web


@dataclass
class Behaviour:
    """What the stand-in does with one request.

    kind: "ok", "status" (answer `status` with the provider's error body), "hang" (never answer),
    "reset" (drop the connection before answering), "cut" (stream `cut_after` chunks, then drop
    the connection), "stream-error" (stream `cut_after` chunks, then an error event); stand-ins
    of providers with tools also know "tool" (answer with a tool call).
    """

    kind: str = "ok"
    status: int = 500
    message: str | None = None
    code: str | None = None
    retry_after: str | None = None
    cut_after: int = 2
    delay: float = 0.0
    #: Hold the answer until this event is set (on the stand-in's loop): lets a test answer
    #: only once other requests have reached a known state, without sleeping.
    hold: asyncio.Event | None = None
    #: OpenAI streams: hold the end of the body after the last event (`[DONE]`) until this event is
    #: set: an upstream slow to close its stream, so the app has the answer before the router
    #: has seen its end.
    hold_end: asyncio.Event | None = None


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


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

    def then(self, *behaviours: Behaviour) -> Self:
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

    def scripted_error(self, behaviour: Behaviour) -> web.HTTPException:
        """The error response a `Behaviour(kind="status")` asks for."""
        return self.error(behaviour.status, behaviour.message, retry_after(behaviour))

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
        return body, await self.act_out(request)

    async def act_out(self, request: web.Request) -> Behaviour:
        """The script's next behaviour, after doing what it says happens before an answer: a
        delay, an error status, a hang or a dropped connection."""
        behaviour = self.next_behaviour()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        if behaviour.hold is not None:
            await behaviour.hold.wait()
        if behaviour.kind == "status":
            raise self.scripted_error(behaviour)
        if behaviour.kind == "hang":
            await asyncio.sleep(3600)
        if behaviour.kind == "reset":
            drop_connection(request)
            raise web.HTTPInternalServerError()
        return behaviour

    async def pace(self) -> None:
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay)


async def open_sse(request: web.Request) -> web.StreamResponse:
    """A prepared `text/event-stream` response, the way OpenAI and Anthropic start streams."""
    response = web.StreamResponse(
        headers={"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
    )
    await response.prepare(request)
    return response


def retry_after(behaviour: Behaviour) -> dict[str, str] | None:
    """The Retry-After header a scripted error carries, if any."""
    return {"retry-after": behaviour.retry_after} if behaviour.retry_after else None


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
