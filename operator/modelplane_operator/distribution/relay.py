"""Relays a follower's sidecars' budget traffic to the leader, which alone keeps the books.

Spend leases must come from one set of books, or two replicas could hand out the same money. So
when leader election is on, a sidecar connected to a follower gets its configs from the follower,
but the follower opens a second stream to the leader *as that sidecar* (with the sidecar's own
bearer token, so the leader's TokenReview decides its namespace and holder exactly as for a
direct connection) and carries the spend protocol across: `usage` up, `lease` down, unchanged.
Its hello says `relay`, so the leader serves only spend on it (no configs; not counted as a
sidecar of its own).

A relay never hides a change of leader: when its stream to the leader ends (the leader died or
stepped down) the follower closes the sidecar's own stream, and the sidecar reconnects and
resynchronises its leases with whoever leads then (docs/budgets.md: a new connection resyncs).
Until a leader is known, the sidecar's messages wait in a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from modelplane_sidecar.controlplane import HELLO, STREAM_PATH

log = logging.getLogger("modelplane.operator.relay")

#: The hello field that marks a relayed stream; its value names the relaying replica.
RELAY = "relay"
#: Messages of one sidecar that may wait for a leader; more and its stream is closed.
MAX_WAITING = 256
#: How long a relay waits for a leader to appear before it gives the sidecar up.
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


class SpendRelay:
    """One sidecar's spend stream, from this follower to the leader."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        leader: Callable[[], Peer | None],
        token: str,
        hello: Mapping[str, Any],
        deliver: Deliver,
        lost: Lost,
    ) -> None:
        self._http = http
        self._leader = leader
        self._token = token
        self._hello = dict(hello)
        self._deliver = deliver
        self._lost = lost
        self._outbox: asyncio.Queue[bytes] = asyncio.Queue(MAX_WAITING)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def send(self, message: bytes) -> bool:
        """Queue a sidecar message for the leader; False when the queue is full (relay lost)."""
        try:
            self._outbox.put_nowait(message)
        except asyncio.QueueFull:
            self._give_up("too many budget messages waiting for the leader")
            return False
        return True

    def _give_up(self, reason: str) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        asyncio.get_running_loop().create_task(self._lost(reason))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

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
                # listen, or about to be replaced. The sidecar's messages keep waiting.
                reason = f"the operator leader is unreachable: {_describe(exc)}"
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            try:
                reason = await self._carry(ws)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                reason = f"the stream to the operator leader broke: {_describe(exc)}"
            break
        log.info("budget relay for %s ends: %s", self._hello.get("node"), reason)
        self._task = None
        await self._lost(reason)

    async def _connect(self, peer: Peer) -> aiohttp.ClientWebSocketResponse:
        return await self._http.ws_connect(
            peer.url.rstrip("/") + STREAM_PATH,
            headers={"authorization": f"Bearer {self._token}"},
            ssl=peer.ssl if peer.ssl is not None else True,
            server_hostname=peer.server_hostname,
            heartbeat=20,
        )

    async def _carry(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        async with ws:
            hello = {
                "type": HELLO,
                "node": self._hello.get("node"),
                "version": None,
                "features": self._hello.get("features"),
                "holder": self._hello.get("holder"),
                RELAY: self._hello.get(RELAY),
            }
            await ws.send_str(orjson.dumps(hello).decode())
            writer = asyncio.get_running_loop().create_task(self._write(ws))
            try:
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT:
                        await self._deliver(msg.data.encode())
                    elif msg.type is aiohttp.WSMsgType.BINARY:
                        await self._deliver(msg.data)
                    else:
                        break
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
        return f"the leader's stream ended (close code {ws.close_code})"

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            message = await self._outbox.get()
            await ws.send_str(message.decode())


class SpendRelays:
    """Opens relays for this follower's sidecars; one HTTP client for all of them."""

    def __init__(self, leader: Callable[[], Peer | None], identity: str) -> None:
        self.leader = leader
        self.identity = identity
        self._http: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http

    def open(
        self, token: str, hello: Mapping[str, Any], deliver: Deliver, lost: Lost
    ) -> SpendRelay:
        relay = SpendRelay(
            self._client(), self.leader, token, {**hello, RELAY: self.identity}, deliver, lost
        )
        relay.start()
        return relay

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"HTTP {exc.status} {exc.message}"
    return str(exc) or type(exc).__name__
