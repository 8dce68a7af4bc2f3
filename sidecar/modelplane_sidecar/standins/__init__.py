"""Local stand-ins for provider APIs (used by `modelplane demo`, the tests and the benchmarks)."""

from __future__ import annotations

from aiohttp import web


async def start_site(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Serve `app` on a (by default free) loopback port; returns the runner and the port."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None)
    assert sockets
    return runner, int(sockets[0].getsockname()[1])
