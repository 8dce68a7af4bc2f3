"""A local stand-in for Azure OpenAI: the OpenAI stand-in behind Azure's URLs and credentials.

Routes are `/openai/deployments/{deployment}/{chat/completions,completions,embeddings}`; every
call needs an `api-version` query parameter and the resource's key in the `api-key` header (or an
Entra ID bearer token), and is refused with Azure's own 404/401 bodies otherwise. Answers,
streams and scripted behaviours are the OpenAI stand-in's; streams start with Azure's
prompt-filter chunk (no choices).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from .openai import OpenAIStandIn
from .scripted import json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
    "valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)
_PROMPT_FILTER_CHUNK = {
    "choices": [],
    "created": 0,
    "id": "",
    "model": "",
    "object": "",
    "prompt_filter_results": [
        {
            "prompt_index": 0,
            "content_filter_results": {
                "hate": {"filtered": False, "severity": "safe"},
                "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"},
                "violence": {"filtered": False, "severity": "safe"},
            },
        }
    ],
}


@dataclass
class AzureOpenAIStandIn(OpenAIStandIn):
    #: The resource key expected in `api-key` (the OpenAI stand-in's `api_key` stays unset).
    azure_key: str | None = None
    #: An Entra ID token accepted in `Authorization: Bearer` instead of the key.
    bearer_token: str | None = None

    def app(self) -> web.Application:
        app = web.Application()
        prefix = "/openai/deployments/{deployment}/"
        app.router.add_post(prefix + "chat/completions", self._azure(self._chat))
        app.router.add_post(prefix + "completions", self._azure(self._completions))
        app.router.add_post(prefix + "embeddings", self._azure(self._embeddings))
        return app

    def _azure(self, handler: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if not request.query.get("api-version"):
                raise json_error(404, {"error": {"code": "404", "message": "Resource not found"}})
            if self.azure_key is not None or self.bearer_token is not None:
                key = request.headers.get("api-key")
                bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
                if key != self.azure_key and bearer != self.bearer_token:
                    raise json_error(401, {"error": {"code": "401", "message": _DENIED}})
            response = await handler(request)
            return response

        return handle

    async def _stream_prelude(self, response: web.StreamResponse) -> None:
        await response.write(b"data: " + orjson.dumps(_PROMPT_FILTER_CHUNK) + b"\n\n")
