"""Relays a follower's sidecars' budget traffic to the leader, which alone keeps the books.

Spend leases must come from one set of books, or two replicas could hand out the same money. So
when leader election is on, a sidecar connected to a follower gets its configs from the follower,
and its spend protocol (`usage` up, `lease` down, unchanged) is carried to the leader over **one
WebSocket per follower** (`RELAY_PATH`), multiplexed: each sidecar connection is a *stream* of
it, opened with that sidecar's own bearer token and hello, so the leader's TokenReview decides
its namespace and holder exactly as for a direct connection, per stream. The leader thus holds
O(operator replicas) spend connections, not one per sidecar of every follower.

    follower -> leader  {"type": "hello", "relay": REPLICA}                          (first)
    follower -> leader  {"type": "open", "stream": N, "token": T, "hello": {node, holder, features}}
    both                {"type": "data", "stream": N, "message": {usage | lease}}
    both                {"type": "close", "stream": N, "reason": "..."}

Frames of one stream keep their order (one WebSocket), and the leader serves each stream in its
own task, so a slow review or a parked grant of one sidecar holds up no other. A relay never
hides a change of leader or a broken path: when the multiplexed connection ends (the leader died
or stepped down, or refused to keep the books), or the leader closes one stream, the follower
closes the sidecar's own stream, and the sidecar reconnects and resynchronises its leases with
whoever leads then (docs/budgets.md: a new connection resyncs). Until a leader is known the
sidecars' messages wait, a bounded number per sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from modelplane_sidecar.controlplane import HELLO

log = logging.getLogger("modelplane.operator.relay")

#: The leader's endpoint for followers' multiplexed spend connections.
RELAY_PATH = "/v1/spend/relay"
#: The hello field that marks a relay; its value names the relaying replica.
RELAY = "relay"
#: Frame types of the multiplexed connection.
OPEN, DATA, CLOSE = "open", "data", "close"
#: Messages of one sidecar that may wait (for a leader, or for the sidecar to read them); more
#: and its stream is closed.
MAX_WAITING = 256
#: How long a relay waits for a leader to appear before it gives the sidecars up.
LEADER_WAIT_SECONDS = 300.0
_POLL_SECONDS = 0.25
_RETRY_SECONDS = 0.5

Deliver = Callable[[bytes], Awaitable[None]]
Lost = Callable[[str], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Peer:
    """Where the leader's config stream is, and how to check its certificate."""

    url: str
    ssl: ssl.SSLContext | None = None
    #: The name to check the certificate against when `url` names a pod address.
    server_hostname: str | None = None


def frame(kind: str, stream: int, message: bytes | None = None, reason: str = "") -> bytes:
    """One frame of the multiplexed connection; `message` is a JSON object, carried as is."""
    if kind == DATA and message is not None:
        return b'{"type":"data","stream":%d,"message":%s}' % (stream, message)
    return orjson.dumps({"type": kind, "stream": stream, "reason": reason})


class SpendRelay:
    """One sidecar connection's stream on the follower's multiplexed connection to the leader."""

    def __init__(self, mux: SpendMux, stream: int, deliver: Deliver, lost: Lost) -> None:
        self._mux = mux
        self.stream = stream
        self._deliver = deliver
        self._lost = lost
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(MAX_WAITING)
        self._writer = asyncio.get_running_loop().create_task(self._write())
        self.waiting = 0
        self.ended = False

    def send(self, message: bytes) -> bool:
        """Queue a sidecar message for the leader; False when too many wait (relay lost)."""
        if self.ended:
            return False
        if self.waiting >= MAX_WAITING:
            self.end("too many budget messages waiting for the leader")
            return False
        self.waiting += 1
        self._mux.put(self, frame(DATA, self.stream, message))
        return True

    def deliver(self, message: bytes) -> None:
        """A leader's message for the sidecar (never blocks the multiplexed connection)."""
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            self.end("the sidecar reads its budget messages too slowly")

    async def _write(self) -> None:
        while True:
            message = await self._inbox.get()
            await self._deliver(message)

    def end(self, reason: str) -> None:
        """The stream is over on the leader's side or the connection's: close the sidecar's."""
        if self.ended:
            return
        self.ended = True
        self._writer.cancel()
        self._mux.forget(self, reason)
        self._mux.spawn(self._lost(reason))

    async def close(self) -> None:
        """The sidecar's stream closed: close this stream at the leader too."""
        if not self.ended:
            self.ended = True
            self._mux.forget(self, "the sidecar disconnected")
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


class SpendMux:
    """This follower's one WebSocket to one leader, carrying every sidecar's spend stream."""

    def __init__(
        self, http: aiohttp.ClientSession, leader: Callable[[], Peer | None], identity: str
    ) -> None:
        self._http = http
        self._leader = leader
        self._identity = identity
        self._streams: dict[int, SpendRelay] = {}
        self._outbox: asyncio.Queue[tuple[SpendRelay | None, bytes]] = asyncio.Queue()
        self._ids = itertools.count(1)
        #: The leader this connection went to (None until connected).
        self.peer: Peer | None = None
        self.ended = False
        self._background: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, keeping a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def open(
        self, token: str, hello: Mapping[str, Any], deliver: Deliver, lost: Lost
    ) -> SpendRelay:
        relay = SpendRelay(self, next(self._ids), deliver, lost)
        self._streams[relay.stream] = relay
        opening = {
            "type": OPEN,
            "stream": relay.stream,
            "token": token,
            "hello": {
                "type": HELLO,
                "node": hello.get("node"),
                "version": None,
                "features": hello.get("features"),
                "holder": hello.get("holder"),
            },
        }
        self._outbox.put_nowait((None, orjson.dumps(opening)))
        return relay

    def put(self, relay: SpendRelay, message: bytes) -> None:
        self._outbox.put_nowait((relay, message))

    def forget(self, relay: SpendRelay, reason: str) -> None:
        if self._streams.pop(relay.stream, None) is not None and not self.ended:
            self._outbox.put_nowait((None, frame(CLOSE, relay.stream, reason=reason)))

    @property
    def streams(self) -> int:
        return len(self._streams)

    async def close(self, reason: str) -> None:
        """End the connection and every stream on it (their sidecars reconnect)."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.ended = True
        for relay in list(self._streams.values()):
            relay.end(reason)
        self._streams.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEADER_WAIT_SECONDS
        reason = "no operator leader to keep the budget books"
        while loop.time() < deadline:
            peer = self._leader()
            if peer is None:
                await asyncio.sleep(_POLL_SECONDS)
                continue
            try:
                ws = await self._connect(peer)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Nothing has gone up yet, so trying again is safe: the leader may be about to
                # listen, or about to be replaced. The sidecars' messages keep waiting.
                reason = f"the operator leader is unreachable: {_describe(exc)}"
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            self.peer = peer
            try:
                reason = await self._carry(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"the stream to the operator leader broke: {_describe(exc)}"
            break
        log.info("budget relay to the leader ends (%d sidecars): %s", self.streams, reason)
        self._end(reason)

    async def _connect(self, peer: Peer) -> aiohttp.ClientWebSocketResponse:
        return await self._http.ws_connect(
            peer.url.rstrip("/") + RELAY_PATH,
            ssl=peer.ssl if peer.ssl is not None else True,
            server_hostname=peer.server_hostname,
            heartbeat=20,
            max_msg_size=0,
        )

    async def _carry(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        async with ws:
            await ws.send_bytes(orjson.dumps({"type": HELLO, RELAY: self._identity}))
            writer = asyncio.get_running_loop().create_task(self._write(ws))
            try:
                async for msg in ws:
                    if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        break
                    self._dispatch(msg.data)
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        return f"the leader's stream ended (close code {ws.close_code})"

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(data, dict) or not isinstance(data.get("stream"), int):
            return
        relay = self._streams.get(data["stream"])
        if relay is None:
            return  # a stream closed here meanwhile
        if data.get("type") == DATA and isinstance(data.get("message"), dict):
            relay.deliver(orjson.dumps(data["message"]))
        elif data.get("type") == CLOSE:
            self._streams.pop(relay.stream, None)
            relay.end(str(data.get("reason") or "the leader closed the budget stream")[:200])

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            relay, message = await self._outbox.get()
            if relay is not None:
                relay.waiting -= 1
                if relay.ended:
                    continue
            await ws.send_str(message.decode())


class SpendRelays:
    """This follower's relay: one multiplexed connection to the current leader at a time."""

    def __init__(self, leader: Callable[[], Peer | None], identity: str) -> None:
        self.leader = leader
        self.identity = identity
        self._http: aiohttp.ClientSession | None = None
        self._mux: SpendMux | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http

    def open(
        self, token: str, hello: Mapping[str, Any], deliver: Deliver, lost: Lost
    ) -> SpendRelay:
        mux = self._mux
        if mux is not None and not mux.ended and mux.peer is not None:
            leader = self.leader()
            if leader is None or leader.url != mux.peer.url:
                # Never open a stream to a replica that no longer leads.
                mux.spawn(mux.close("the operator leader changed"))
                mux = None
        if mux is None or mux.ended:
            mux = self._mux = SpendMux(self._client(), self.leader, self.identity)
        return mux.open(token, hello, deliver, lost)

    @property
    def connections(self) -> int:
        """Multiplexed connections to a leader (0 or 1)."""
        return 1 if self._mux is not None and not self._mux.ended else 0

    async def reset(self, reason: str) -> None:
        """Close the connection to the leader and every sidecar stream on it."""
        mux, self._mux = self._mux, None
        if mux is not None:
            await mux.close(reason)

    async def close(self) -> None:
        await self.reset("operator shutting down")
        if self._http is not None:
            await self._http.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"HTTP {exc.status} {exc.message}"
    return str(exc) or type(exc).__name__
