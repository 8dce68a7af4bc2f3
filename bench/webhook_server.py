"""The server side of bench_webhook.py, run as its own process.

`--mode real` serves the operator's injection webhook (InjectionWebhook) over TLS; `--mode bare`
serves an aiohttp TLS handler that parses the review and answers "allowed" with no decision and no
patch: the floor any Python webhook pays for TLS, HTTP and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import orjson
from aiohttp import web

from modelplane_operator.injection import InjectionSettings
from modelplane_operator.injection.webhook import InjectionWebhook


async def bare(request: web.Request) -> web.Response:
    review = orjson.loads(await request.read())
    answer = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": True},
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def main(ca_pem: str, args: argparse.Namespace) -> None:
    if args.mode == "real":
        settings = InjectionSettings(
            image="ghcr.io/modelplane/sidecar:0.1.0",
            control_plane_url="https://modelplane.modelplane.svc:8443",
        )
        app = InjectionWebhook(settings, ca_pem).build_app()
    else:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/inject/namespace", bare)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=context).start()
    await asyncio.Event().wait()


def cli() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["real", "bare"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    args = parser.parse_args()
    with open(args.ca) as ca:
        ca_pem = ca.read()
    try:
        import uvloop

        uvloop.run(main(ca_pem, args))
    except ImportError:
        asyncio.run(main(ca_pem, args))


if __name__ == "__main__":
    cli()
