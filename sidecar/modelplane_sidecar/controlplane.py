"""The sidecar's side of the config stream: receive RouterConfig snapshots from the operator.

Modelled on Envoy's xDS: the sidecar opens one long-lived WebSocket to the operator (TLS, with its
projected ServiceAccount token as a bearer token), says which version it already runs, and then
gets a full snapshot `{version, config}` whenever its namespace's config changes. Each snapshot is
validated with the same `parse_config` a file goes through, swapped in atomically, written to the
state dir as last-known-good, and answered with an ACK; one that cannot be applied is answered
with a NACK carrying the error, and the old config keeps serving. Like Envoy's EDS beside CDS, a
change of self-hosted replicas alone comes as a light `replicas` update instead: the new replica
lists of the endpoints that changed, the config version it applies to (`base`) and the version
it makes (`version`, ACKed or NACKed like a snapshot's), applied without rebuilding the rest.
When the operator is away the client reconnects with exponential backoff and full jitter, and
the sidecar keeps serving from memory, or, after a restart of its own, from the last-known-good
file.

The message shapes below are the protocol; the operator imports them from here (the sidecar never
imports the operator).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pydantic import ValidationError

from .auditing import AuditSettings, open_trail
from .config import (
    ConfigError,
    Endpoint,
    RouterConfig,
    _format_validation_error,
    parse_config,
)
from .metrics import SidecarMetrics, SyncState
from .pool import LOAD, apply_load_message
from .server import HOLDER_KEY, ConfigHolder, create_app, serve_app
from .spend import LEASE, SPEND_FEATURE, SpendTracker

log = logging.getLogger("modelplane.sidecar.controlplane")

#: The stream's path on the operator.
STREAM_PATH = "/v1/config/stream"
#: Message types. Sidecar -> operator: hello (first), ack, nack. Operator -> sidecar: config,
#: replicas (to sidecars whose hello lists REPLICAS_FEATURE).
HELLO, CONFIG, ACK, NACK, REPLICAS = "hello", "config", "ack", "nack", "replicas"
#: The hello feature of a sidecar that applies `replicas` updates.
REPLICAS_FEATURE = "replicas/v1"
#: The longest error text a NACK carries.
MAX_NACK_ERROR = 2000

_STATE_FILE = "config.json"
#: How often settled spend is reported when nothing else is sent (spend.py, docs/budgets.md).
SPEND_FLUSH_SECONDS = 1.0


def hello(node: str, version: str | None) -> dict[str, Any]:
    return {"type": HELLO, "node": node, "version": version}


def ack(version: str) -> dict[str, Any]:
    return {"type": ACK, "version": version}


def nack(version: str | None, error: str) -> dict[str, Any]:
    return {"type": NACK, "version": version, "error": error[:MAX_NACK_ERROR]}


def config_message(version: str, config: dict[str, Any]) -> dict[str, Any]:
    return {"type": CONFIG, "version": version, "config": config}


def replicas_message(
    version: str, base: str, endpoints: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Config `base` with these endpoints' replica lists (in wire form) is config `version`."""
    return {"type": REPLICAS, "version": version, "base": base, "endpoints": endpoints}


class LastKnownGood:
    """The last config this sidecar applied, kept in a file that survives its restart.

    The file holds credentials, so it is written with mode 0600, atomically (temp file in the
    same directory, fsync, rename), and never logged.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / _STATE_FILE
        self._dir = state_dir

    def load(self) -> tuple[RouterConfig, dict[str, Any]] | None:
        """The stored config, or None when there is none or it no longer validates."""
        try:
            raw = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("ignoring unreadable last-known-good config %s: %s", self.path, exc)
            return None
        try:
            data = raw["config"]
            return parse_config(data, f"last-known-good {self.path}"), data
        except (KeyError, TypeError, ConfigError) as exc:
            log.warning("ignoring invalid last-known-good config: %s", exc)
            return None

    def save(self, version: str, config: dict[str, Any]) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = orjson.dumps({"version": version, "config": config})
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=self._dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self._dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: sleep uniform(0, min(cap, base * 2**attempt))."""

    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    #: A stream that stayed up this long was healthy (e.g. closed by an operator leader change):
    #: the next reconnect starts the backoff afresh even if no new config arrived on it.
    healthy_after_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_seconds, self.base_seconds * 2 ** min(attempt, 30)))


class StreamRefused(Exception):
    """The operator answered the upgrade with an error (bad token, wrong audience...)."""


class ControlPlaneClient:
    """Keeps one stream to the operator open and applies what arrives on it."""

    def __init__(
        self,
        url: str,
        token_file: Path,
        holder: ConfigHolder,
        *,
        ca_file: Path | None = None,
        state: LastKnownGood | None = None,
        node: str = "",
        backoff: Backoff | None = None,
        spend: SpendTracker | None = None,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self._url = url.rstrip("/") + STREAM_PATH if not url.endswith(STREAM_PATH) else url
        self._token_file = token_file
        self._holder = holder
        self._ca_file = ca_file
        self._state = state
        self._node = node or os.uname().nodename
        self._backoff = backoff or Backoff()
        #: Budget leases: usage goes up this stream, grants come down it.
        self._spend = spend
        self._outbox: asyncio.Queue[dict[str, Any]] | None = None
        self._link: asyncio.Task[None] | None = None
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        #: Version of the config this client applied (or restored) last, and its wire data
        #: (what a replica update patches and the last-known-good file keeps).
        self._serving_version: str | None = None
        self._serving_data: dict[str, Any] | None = None

    def restore(self) -> bool:
        """Serve the last-known-good config, if there is one; call before start()."""
        if self._state is None:
            return False
        stored = self._state.load()
        if stored is None:
            return False
        config, data = stored
        self._holder.apply(config, "last-known-good")
        self._serving_version = config.version()
        self._serving_data = data
        return True

    def _ssl(self) -> ssl.SSLContext:
        # Verified against --ca-file (else the system CAs); plain ws:// URLs ignore it.
        return ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)

    def _token(self) -> str:
        # Projected tokens are rotated by the kubelet: read the file again on every connect.
        return self._token_file.read_text().strip()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="control-plane")

    async def stop(self) -> None:
        if self._spend is not None and self._spend.connected and self._outbox is not None:
            # Give back idle leases so the operator need not count them as spent.
            self._spend.release_all()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._outbox.join()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._unlink_spend()

    async def run(self) -> None:
        """Connect, stream, reconnect with backoff; until cancelled."""
        attempt = 0
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            loop = asyncio.get_running_loop()
            while True:
                started = loop.time()
                try:
                    got_config = await self._stream(http)
                except asyncio.CancelledError:
                    raise
                except StreamRefused as exc:
                    log.error("control plane refused the stream: %s", exc)
                    got_config = False
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    log.warning("control plane unreachable: %s", exc or type(exc).__name__)
                    got_config = False
                await self._unlink_spend()
                self.connected.clear()
                self._sync(SyncState.CONNECTING)
                lasted = loop.time() - started
                healthy = got_config or lasted >= self._backoff.healthy_after_seconds
                attempt = 0 if healthy else attempt + 1
                delay = self._backoff.delay(attempt)
                log.info("reconnecting to the control plane in %.2fs", delay)
                await asyncio.sleep(delay)

    async def _stream(self, http: aiohttp.ClientSession) -> bool:
        """One connection; returns whether it delivered a config (resets the backoff)."""
        headers = {"authorization": f"Bearer {self._token()}"}
        delivered = False
        try:
            ws = await http.ws_connect(
                self._url, headers=headers, ssl=self._ssl(), heartbeat=20, timeout=_WS_TIMEOUT
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise StreamRefused(f"HTTP {exc.status}: {exc.message}") from None
        async with ws:
            greeting = hello(self._node, self._serving_version)
            greeting["features"] = [REPLICAS_FEATURE]
            if self._spend is not None:
                greeting["features"].append(SPEND_FEATURE)
                greeting["holder"] = self._spend.holder
            await ws.send_str(orjson.dumps(greeting).decode())
            self._link = self._link_spend(ws)
            self.connected.set()
            # The operator pushes only when this sidecar runs another version than its own.
            self._sync(SyncState.SYNCED)
            log.info("connected to the control plane at %s", self._url)
            async for msg in ws:
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    break
                try:
                    data = orjson.loads(msg.data)
                except orjson.JSONDecodeError:
                    log.warning("ignoring a control-plane message that is not JSON")
                    continue
                if isinstance(data, dict) and data.get("type") == LOAD:
                    # Self-hosted replicas' load, scraped once by the operator: no ACK.
                    snapshot = self._holder.snapshot
                    if snapshot is not None:
                        apply_load_message(snapshot.pools(), data)
                    continue
                if isinstance(data, dict) and data.get("type") == LEASE:
                    if self._spend is not None:
                        self._spend.on_lease(data)
                        self._spend_gauges()
                    continue
                if isinstance(data, dict) and data.get("type") in (CONFIG, REPLICAS):
                    if data["type"] == CONFIG:
                        reply = await self._apply(data)
                    else:
                        reply = await self._apply_replicas(data)
                    delivered = delivered or reply["type"] == ACK
                    self._sync(SyncState.SYNCED if reply["type"] == ACK else SyncState.REJECTED)
                    await ws.send_str(orjson.dumps(reply).decode())
        return delivered

    def _sync(self, state: SyncState) -> None:
        if self._metrics is not None:
            self._metrics.set_sync_state(state)

    def _link_spend(self, ws: aiohttp.ClientWebSocketResponse) -> asyncio.Task[None] | None:
        """Attach the spend tracker to this connection (it resynchronises at once)."""
        if self._spend is None:
            return None
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._outbox = outbox
        self._spend.attach(outbox.put_nowait)
        return asyncio.get_running_loop().create_task(self._send_spend(ws, outbox))

    async def _send_spend(
        self, ws: aiohttp.ClientWebSocketResponse, outbox: asyncio.Queue[dict[str, Any]]
    ) -> None:
        """Send the tracker's messages in order; report settled spend every second."""
        assert self._spend is not None
        loop = asyncio.get_running_loop()
        flush_at = loop.time() + SPEND_FLUSH_SECONDS
        while True:
            try:
                async with asyncio.timeout(max(0.0, flush_at - loop.time())):
                    message = await outbox.get()
            except TimeoutError:
                self._spend.flush()
                self._spend_gauges()
                flush_at = loop.time() + SPEND_FLUSH_SECONDS
                continue
            try:
                await ws.send_str(orjson.dumps(message).decode())
            finally:
                outbox.task_done()

    async def _unlink_spend(self) -> None:
        """The connection ended: stop sending, and reserve nothing more until it is back."""
        link, self._link = self._link, None
        if link is not None:
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
        if self._spend is not None:
            self._spend.detach()

    def _spend_gauges(self) -> None:
        if self._metrics is None or self._spend is None:
            return
        for name, lease in self._spend.leases().items():
            self._metrics.budget_lease.labels(name).set(max(0.0, lease.available))
            if lease.remaining is not None:
                self._metrics.budget_remaining.labels(name).set(lease.remaining)

    async def _apply(self, message: dict[str, Any]) -> dict[str, Any]:
        version = message.get("version")
        data = message.get("config")
        if not isinstance(version, str) or not isinstance(data, dict):
            return nack(version if isinstance(version, str) else None, "malformed config message")
        try:
            config = parse_config(data, f"control-plane config {version}")
            if config.version() != version:
                raise ConfigError(
                    f"config version {config.version()!r} does not match message version "
                    f"{version!r}"
                )
            self._holder.apply(config, f"control-plane:{version}")
        except Exception as exc:  # anything that stops the swap is reported, never swallowed
            self._holder.reject(exc, f"control-plane:{version}")
            return nack(version, str(exc) or type(exc).__name__)
        return await self._applied(version, data)

    async def _applied(self, version: str, data: dict[str, Any]) -> dict[str, Any]:
        """`data` (version `version`) serves now: keep it as last-known-good, then ACK."""
        self._serving_version, self._serving_data = version, data
        if self._state is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(
                    None, self._state.save, version, data
                )
            except OSError as exc:
                # Serving the new config matters more than persisting it: ACK, but say so.
                log.error("could not write last-known-good config: %s", exc.strerror)
        return ack(version)

    async def _apply_replicas(self, message: dict[str, Any]) -> dict[str, Any]:
        """Apply a `replicas` update: only the named endpoints' replica lists change.

        It applies to config `base` exactly; anything else (another base, an endpoint that is
        unknown or has no replica list, a replica the schema refuses) is NACKed and the serving
        config stays. Each changed endpoint is validated with the same model as in a snapshot.
        """
        version, base, endpoints = (
            message.get("version"),
            message.get("base"),
            message.get("endpoints"),
        )
        if not isinstance(version, str):
            return nack(None, "malformed replica update: no version")
        if not isinstance(base, str) or not isinstance(endpoints, dict) or not endpoints:
            return nack(version, "malformed replica update: needs a base version and endpoints")
        snapshot, data = self._holder.snapshot, self._serving_data
        if snapshot is None or data is None or base != snapshot.version:
            return nack(
                version,
                f"replica update applies to config {base}, but this sidecar runs "
                f"{snapshot.version if snapshot is not None else 'none'}",
            )
        source = f"control-plane-replicas:{version}"
        try:
            config, patched = _patch_replicas(snapshot.config, data, version, endpoints)
            self._holder.apply_replicas(config, endpoints.keys(), source)
        except Exception as exc:  # anything that stops the swap is reported, never swallowed
            self._holder.reject(exc, source)
            return nack(version, str(exc) or type(exc).__name__)
        return await self._applied(version, patched)


_WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0)


def _patch_replicas(
    config: RouterConfig, data: dict[str, Any], version: str, endpoints: dict[str, Any]
) -> tuple[RouterConfig, dict[str, Any]]:
    """`config` (wire form `data`) with new replica lists for `endpoints`, as version `version`:
    the config and its wire data. Raises ConfigError naming the first thing it cannot apply."""
    raw_endpoints = list(data.get("endpoints") or [])
    index = {raw.get("name"): i for i, raw in enumerate(raw_endpoints) if isinstance(raw, dict)}
    changed: dict[str, Endpoint] = {}
    for name, replicas in endpoints.items():
        position = index.get(name)
        if position is None:
            raise ConfigError(f"replica update names endpoint {name!r}, which the config lacks")
        raw = raw_endpoints[position]
        if not isinstance(raw.get("replicas"), list):
            raise ConfigError(f"replica update for endpoint {name!r}, which has no replica list")
        if not isinstance(replicas, list):
            raise ConfigError(f"replica update for endpoint {name!r}: replicas must be a list")
        raw = raw_endpoints[position] = {**raw, "replicas": replicas}
        try:
            changed[name] = Endpoint.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(
                f"replica update for endpoint {name!r}: {_format_validation_error(exc)}"
            ) from None
    metadata = {**(data.get("metadata") or {}), "version": version}
    patched = {**data, "metadata": metadata, "endpoints": raw_endpoints}
    config = config.model_copy(
        update={
            "metadata": config.metadata.model_copy(update={"version": version}),
            "endpoints": tuple(changed.get(ep.name, ep) for ep in config.endpoints),
        }
    )
    return config, patched


async def serve_control_plane(
    url: str,
    token_file: Path,
    host: str,
    port: int,
    *,
    ca_file: Path | None = None,
    state_dir: Path | None = None,
    node: str = "",
    health_port: int | None = None,
    audit: AuditSettings | None = None,
) -> None:
    """Run the sidecar with its config from the operator's stream until SIGINT/SIGTERM."""
    metrics = SidecarMetrics()
    metrics.set_sync_state(SyncState.CONNECTING)
    spend = SpendTracker(node, on_settle=metrics.budget_settled)
    app = create_app(None, metrics, open_trail(audit, metrics) if audit else None, spend)
    state = LastKnownGood(state_dir) if state_dir is not None else None
    if state is None:
        log.warning("no --state-dir: configs are not kept across a restart of the sidecar")
    client = ControlPlaneClient(
        url,
        token_file,
        app[HOLDER_KEY],
        ca_file=ca_file,
        state=state,
        node=node,
        metrics=metrics,
        spend=spend,
    )
    if client.restore():
        log.info("serving the last-known-good config until the control plane answers")
    await serve_app(
        app,
        host,
        port,
        f"control plane {url}",
        start=client.start,
        stop=client.stop,
        health_port=health_port,
    )
