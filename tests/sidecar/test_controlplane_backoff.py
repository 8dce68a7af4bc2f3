"""The sidecar's reconnect backoff: growing while the operator is unreachable or refuses, and
starting afresh after a stream that was healthy, even one that delivered no new config (an
operator leader change closes healthy streams; they must not push reconnects towards the cap)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from modelplane_sidecar.controlplane import STREAM_PATH, Backoff, ControlPlaneClient
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import ConfigHolder
from modelplane_sidecar.standins import start_site


class RecordingBackoff(Backoff):
    """Records the attempt numbers the client asks delays for, and waits almost nothing."""

    def __init__(self, healthy_after_seconds: float) -> None:
        super().__init__(healthy_after_seconds=healthy_after_seconds)
        object.__setattr__(self, "attempts", [])

    def delay(self, attempt: int) -> float:
        self.attempts.append(attempt)  # type: ignore[attr-defined]
        return 0.01


async def _operator_that_closes_after(hold: float) -> tuple[web.AppRunner, str]:
    """A stream endpoint that accepts, reads the hello, holds the stream, then closes it."""

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await asyncio.sleep(hold)
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get(STREAM_PATH, stream)
    runner, port = await start_site(app)
    return runner, f"http://127.0.0.1:{port}"


async def _attempts(hold: float, healthy_after: float, tmp_path: Path) -> list[int]:
    runner, url = await _operator_that_closes_after(hold)
    token = tmp_path / "token"
    token.write_text("t")
    backoff = RecordingBackoff(healthy_after)
    client = ControlPlaneClient(
        url, token, ConfigHolder(SidecarMetrics()), backoff=backoff, node="test"
    )
    client.start()
    try:
        for _ in range(3000):
            if len(backoff.attempts) >= 4:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
    finally:
        await client.stop()
        await runner.cleanup()
    return list(backoff.attempts)[:4]  # type: ignore[attr-defined]


async def test_short_lived_streams_back_off_more_and_more(tmp_path: Path) -> None:
    assert await _attempts(hold=0.0, healthy_after=60, tmp_path=tmp_path) == [1, 2, 3, 4]


async def test_a_stream_that_stayed_up_resets_the_backoff(tmp_path: Path) -> None:
    assert await _attempts(hold=0.2, healthy_after=0.1, tmp_path=tmp_path) == [0, 0, 0, 0]
