"""The config stream endpoint: an aiohttp WebSocket server over TLS.

GET /v1/config/stream with `Authorization: Bearer <token>` is authenticated before the upgrade
(401 with the reason otherwise). The first message must be the sidecar's hello; after that the
hub pushes snapshots and the sidecar answers each with an ACK or a NACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelplane_sidecar.controlplane import (
    ACK,
    HELLO,
    MAX_NACK_ERROR,
    NACK,
    REPLICAS_FEATURE,
    STREAM_PATH,
)
from modelplane_sidecar.spend import SPEND_FEATURE, USAGE

from ..budget.service import BudgetService, Send, SpendSession
from ..kube import KubeError
from ..metrics import OperatorMetrics
from .auth import Authenticator, AuthError
from .hub import ConfigHub, Identity, Session
from .relay import CLOSE, DATA, OPEN, RELAY, RELAY_PATH, SpendRelay, SpendRelays, frame

log = logging.getLogger("modelplane.operator.stream")

HELLO_TIMEOUT_SECONDS = 10.0
#: A config with a few hundred endpoints is well below this; it bounds what a sidecar can send.
MAX_MESSAGE_BYTES = 64 * 1024
#: Messages of one relayed sidecar the leader keeps before it is served; more and its stream closes.
MAX_RELAYED = 1024
#: Close codes: spend moved to another replica (reconnect now); a relay reached a replica that
#: does not keep the budget books (try again later).
SPEND_MOVED = 1012
NOT_THE_LEADER = 1013


def _error(status: int, message: str) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "code": status}})
    return web.Response(status=status, body=body, content_type="application/json")


def _text(value: object, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else None


class StreamServer:
    def __init__(
        self,
        hub: ConfigHub,
        authenticator: Authenticator,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.hub = hub
        self.authenticator = authenticator
        #: The budget books; sidecars that speak the spend protocol report usage to them.
        self.budgets: BudgetService | None = None
        self.metrics = metrics or OperatorMetrics()
        #: Whether this replica keeps the budget books (with leader election: the leader, once
        #: it has read them). If not, `relays` carries its sidecars' spend to the leader.
        self.keeps_budgets: Callable[[], bool] = lambda: True
        self.relays: SpendRelays | None = None
        self._runner: web.AppRunner | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        #: Streams that carry spend (kept here or relayed), closed when the leader changes.
        self._spend_streams: set[web.WebSocketResponse] = set()

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(STREAM_PATH, self.stream)
        app.router.add_get(RELAY_PATH, self.relay_stream)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.on_shutdown.append(self._close_sockets)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

    async def _close_sockets(self, app: web.Application) -> None:
        await asyncio.gather(
            *(ws.close(code=1001, message=b"operator shutting down") for ws in set(self._sockets)),
            return_exceptions=True,
        )

    async def stream(self, request: web.Request) -> web.StreamResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.metrics.connections.labels("unauthenticated").inc()
            return _error(
                401, "missing bearer token (the sidecar's projected ServiceAccount token)"
            )
        try:
            identity = await self.authenticator.authenticate(token.strip())
        except AuthError as exc:
            log.info("refused a sidecar from %s: %s", request.remote, exc)
            self.metrics.connections.labels("unauthenticated").inc()
            return _error(401, str(exc))
        except (KubeError, OSError, TimeoutError) as exc:
            log.error("TokenReview failed: %s", exc)
            self.metrics.connections.labels("auth_unavailable").inc()
            return _error(503, "cannot verify the token right now; retry later")
        self.metrics.connections.labels("accepted").inc()
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._serve(ws, identity, request.remote or "", token.strip())
        finally:
            self._sockets.discard(ws)
        return ws

    async def _serve(
        self, ws: web.WebSocketResponse, identity: Identity, remote: str, token: str
    ) -> None:
        hello = await _receive_hello(ws)
        if hello is None:
            return
        node = identity.pod or _text(hello.get("node"), 253) or remote

        async def send(message: bytes) -> None:
            await ws.send_frame(message, WSMsgType.TEXT)

        if hello.get(RELAY) is not None:
            await self._serve_relayed(ws, identity, node, hello, send)
            return
        session = Session(
            identity, node, send, _text(hello.get("version"), 64), _speaks(hello, REPLICAS_FEATURE)
        )
        log.info(
            "sidecar %s connected (namespace %s, serviceaccount %s, running %s)",
            node,
            identity.namespace,
            identity.service_account,
            session.acked,
        )
        self.hub.connect(session)
        spend = self._spend_session(identity, node, hello, send) if self.keeps_budgets() else None
        relay: SpendRelay | None = None
        if spend is None and self.relays is not None and _speaks_spend(hello):
            relay = self.relays.open(token, hello, send, self._closer(ws))
        if spend is not None or relay is not None:
            self._spend_streams.add(ws)
        try:
            if spend is not None and self.budgets is not None:
                await self.budgets.connect(spend)
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                data = _decode(msg.data)
                if data is None:
                    continue
                if data.get("type") == USAGE:
                    if spend is not None and self.budgets is not None:
                        await self.budgets.usage(spend, data)
                    elif relay is not None:
                        relay.send(msg.data.encode() if isinstance(msg.data, str) else msg.data)
                    continue
                version = _text(data.get("version"), 64)
                if version is None:
                    continue
                if data.get("type") == ACK:
                    self.hub.answer(session, version, None)
                elif data.get("type") == NACK:
                    error = _text(data.get("error"), MAX_NACK_ERROR) or "no reason given"
                    self.hub.answer(session, version, error)
        finally:
            self._spend_streams.discard(ws)
            self.hub.disconnect(session)
            if spend is not None and self.budgets is not None:
                self.budgets.disconnect(spend)
            if relay is not None:
                await relay.close()
            log.info("sidecar %s in %s disconnected", node, identity.namespace)

    async def relay_stream(self, request: web.Request) -> web.StreamResponse:
        """A follower's multiplexed spend connection (relay.py). It grants nothing by itself:
        each stream on it is authenticated with its sidecar's own token, as a direct one."""
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        self._sockets.add(ws)
        try:
            await self._serve_mux(ws, request.remote or "")
        finally:
            self._sockets.discard(ws)
        return ws

    async def _serve_mux(self, ws: web.WebSocketResponse, remote: str) -> None:
        hello = await _receive_hello(ws)
        if hello is None:
            return
        if hello.get(RELAY) is None:
            await ws.close(code=4000, message=b"expected a relay hello message")
            return
        if self.budgets is None or not self.keeps_budgets():
            await ws.close(
                code=NOT_THE_LEADER, message=b"this operator replica does not keep the budget books"
            )
            return
        replica = _text(hello.get(RELAY), 253) or remote
        self.metrics.connections.labels("relay").inc()
        log.info("budget relay from operator replica %s opened", replica)
        streams: dict[int, tuple[asyncio.Queue[dict[str, Any] | None], asyncio.Task[None]]] = {}
        self._spend_streams.add(ws)
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                data = _decode(msg.data)
                stream = data.get("stream") if data is not None else None
                if data is None or not isinstance(stream, int) or isinstance(stream, bool):
                    continue
                kind = data.get("type")
                if kind == OPEN and stream not in streams and isinstance(data.get("hello"), dict):
                    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(MAX_RELAYED)
                    work = self._serve_stream(ws, stream, data.get("token"), data["hello"], inbox)
                    streams[stream] = (inbox, asyncio.get_running_loop().create_task(work))
                elif kind == DATA and stream in streams and isinstance(data.get("message"), dict):
                    try:
                        streams[stream][0].put_nowait(data["message"])
                    except asyncio.QueueFull:
                        streams.pop(stream)[1].cancel()
                        await _send_close(ws, stream, "too many budget messages waiting")
                elif kind == CLOSE and stream in streams:
                    streams.pop(stream)[0].put_nowait(None)
        finally:
            self._spend_streams.discard(ws)
            for _, task in streams.values():
                task.cancel()
            await asyncio.gather(*(task for _, task in streams.values()), return_exceptions=True)
            log.info("budget relay from operator replica %s closed", replica)

    async def _serve_stream(
        self,
        ws: web.WebSocketResponse,
        stream: int,
        token: object,
        hello: dict[str, Any],
        inbox: asyncio.Queue[dict[str, Any] | None],
    ) -> None:
        """One relayed sidecar connection: reviewed and booked exactly as a direct one."""
        if not isinstance(token, str) or not token.strip():
            await _send_close(ws, stream, "401: missing bearer token")
            return
        try:
            identity = await self.authenticator.authenticate(token.strip())
        except AuthError as exc:
            self.metrics.connections.labels("unauthenticated").inc()
            await _send_close(ws, stream, f"401: {exc}")
            return
        except (KubeError, OSError, TimeoutError) as exc:
            log.error("TokenReview failed: %s", exc)
            self.metrics.connections.labels("auth_unavailable").inc()
            await _send_close(ws, stream, "503: cannot verify the token right now; retry later")
            return
        node = identity.pod or _text(hello.get("node"), 253) or "relayed"

        async def send(message: bytes) -> None:
            await ws.send_frame(frame(DATA, stream, message), WSMsgType.TEXT)

        spend = self._spend_session(identity, node, hello, send)
        if spend is None or self.budgets is None or not self.keeps_budgets():
            await _send_close(ws, stream, "this operator replica does not keep the budget books")
            return
        try:
            await self.budgets.connect(spend)
            while (message := await inbox.get()) is not None:
                if message.get("type") == USAGE:
                    await self.budgets.usage(spend, message)
        finally:
            self.budgets.disconnect(spend)

    async def _serve_relayed(
        self,
        ws: web.WebSocketResponse,
        identity: Identity,
        node: str,
        hello: dict[str, Any],
        send: Send,
    ) -> None:
        """Another replica (of a version before the multiplexed relay) relays one of its
        sidecars' spend messages on a connection of its own: books only, no configs."""
        spend = self._spend_session(identity, node, hello, send)
        if spend is None or self.budgets is None or not self.keeps_budgets():
            await ws.close(
                code=NOT_THE_LEADER, message=b"this operator replica does not keep the budget books"
            )
            return
        log.info("budget relay for sidecar %s in %s opened", node, identity.namespace)
        self._spend_streams.add(ws)
        try:
            await self.budgets.connect(spend)
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                data = _decode(msg.data)
                if data is not None and data.get("type") == USAGE:
                    await self.budgets.usage(spend, data)
        finally:
            self._spend_streams.discard(ws)
            self.budgets.disconnect(spend)

    def _closer(self, ws: web.WebSocketResponse) -> Callable[[str], Coroutine[Any, Any, None]]:
        async def close(reason: str) -> None:
            await ws.close(code=SPEND_MOVED, message=reason.encode()[:120])

        return close

    async def drop_spend_streams(self, reason: str) -> int:
        """Close every stream that carries spend, kept here or relayed: its sidecar reconnects
        and resynchronises its leases with the replica that keeps the books now."""
        sockets = list(self._spend_streams)
        await asyncio.gather(
            *(ws.close(code=SPEND_MOVED, message=reason.encode()[:120]) for ws in sockets),
            return_exceptions=True,
        )
        if self.relays is not None:
            await self.relays.reset(reason)  # a relay to the leader must not outlive its term
        if sockets:
            log.info("closed %d streams that carry spend: %s", len(sockets), reason)
        return len(sockets)

    def _spend_session(
        self, identity: Identity, node: str, hello: dict[str, Any], send: Send
    ) -> SpendSession | None:
        """The sidecar's holder id on the budget books: its pod, then its own per-process id.

        The pod part comes from the token review (when it names one), so a sidecar cannot book
        spend under another pod's name.
        """
        if self.budgets is None or not _speaks_spend(hello):
            return None
        claimed = _text(hello.get("holder"), 128) or ""
        process = claimed.rpartition("/")[2]
        if not process or not all(c in "0123456789abcdef" for c in process):
            process = "0"
        return SpendSession(identity.namespace, f"{node[:90]}/{process[:32]}", send)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self._runner = web.AppRunner(self.build_app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, backlog=2048)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        scheme = "https" if ssl_context else "http"
        log.info("config stream listening on %s://%s:%d%s", scheme, host, bound, STREAM_PATH)
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.relays is not None:
            await self.relays.close()


async def _receive_hello(ws: web.WebSocketResponse) -> dict[str, Any] | None:
    """The first message, which must be a hello; None (and the socket closed) otherwise."""
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT_SECONDS)
    except TimeoutError:
        first = None
    hello = (
        _decode(first.data)
        if first is not None and first.type in (WSMsgType.TEXT, WSMsgType.BINARY)
        else None
    )
    if hello is None or hello.get("type") != HELLO:
        await ws.close(code=4000, message=b"expected a hello message")
        return None
    return hello


async def _send_close(ws: web.WebSocketResponse, stream: int, reason: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_frame(frame(CLOSE, stream, reason=reason), WSMsgType.TEXT)


def _speaks_spend(hello: dict[str, Any]) -> bool:
    return _speaks(hello, SPEND_FEATURE)


def _speaks(hello: dict[str, Any], feature: str) -> bool:
    features = hello.get("features")
    return isinstance(features, list) and feature in features


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
