"""The honest baseline: a bare aiohttp pass-through proxy with no routing at all.

It reads the request body, forwards it unchanged to one upstream over a shared keep-alive
`ClientSession`, and returns the upstream's body (an SSE answer is relayed chunk by chunk as it
arrives). No JSON parsing, no retries, no metrics: whatever the sidecar costs above this is the
price of routing.

Run: python bench/bare_proxy.py --port 18002 --upstream http://127.0.0.1:18001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

UPSTREAM_KEY = web.AppKey("upstream", str)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)


async def proxy(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION_KEY]
    url = request.app[UPSTREAM_KEY] + request.path
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as up:
        content_type = up.headers.get("content-type", "application/json")
        if content_type.startswith("text/event-stream"):
            out = web.StreamResponse(status=up.status, headers={"content-type": content_type})
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
        data = await up.read()
        return web.Response(status=up.status, body=data, headers={"content-type": content_type})


async def _session(app: web.Application) -> None:
    app[SESSION_KEY] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=60),
        skip_auto_headers=("User-Agent",),
    )


async def _close(app: web.Application) -> None:
    await app[SESSION_KEY].close()


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM_KEY] = upstream.rstrip("/")
    app.router.add_post("/v1/chat/completions", proxy)
    app.on_startup.append(_session)
    app.on_cleanup.append(_close)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    try:
        await asyncio.Event().wait()  # until the benchmark stops this process by PID
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:18001")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port, args.upstream))


if __name__ == "__main__":
    main()
