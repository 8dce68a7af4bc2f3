"""Azure OpenAI: OpenAI's wire format at deployment-based URLs.

`{baseUrl}/openai/deployments/{deployment}/chat/completions?api-version=...`, where `baseUrl` is
the resource (`https://NAME.openai.azure.com`), `deployment` defaults to the endpoint's `model`
and `apiVersion` is an endpoint option. The key goes in the `api-key` header, or with option
`auth: bearer` an Entra ID token in `Authorization`. Bodies, streams and errors are OpenAI's
(handled by the OpenAI adapter); Azure adds a prompt-filter chunk with no choices at the start
of streams (passed through; SDKs ignore it) and answers a filtered prompt with a 400 whose code
is `content_filter` (a content-policy failure: passed through or, with option
`contentPolicy: fallback`, tried on the next endpoint).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from ..config import Endpoint
from .base import Credentials, Operation, UpstreamRequest
from .openai import OpenAIAdapter, openai_body

_PATHS = {
    Operation.CHAT: "chat/completions",
    Operation.COMPLETIONS: "completions",
    Operation.EMBEDDINGS: "embeddings",
}


class AzureOpenAIAdapter(OpenAIAdapter):
    name = "azure-openai"

    def build_request(
        self,
        endpoint: Endpoint,
        credentials: Credentials,
        op: Operation,
        body: dict[str, Any],
        stream: bool,
    ) -> UpstreamRequest:
        options = endpoint.options
        deployment = quote(options["deployment"] or endpoint.model, safe="")
        query = urlencode({"api-version": options["apiVersion"]})
        url = f"{endpoint.base_url}/openai/deployments/{deployment}/{_PATHS[op]}?{query}"
        headers = {"content-type": "application/json", **endpoint.headers}
        if credentials.api_key:
            if options["auth"] == "bearer":
                headers["authorization"] = f"Bearer {credentials.api_key}"
            else:
                headers["api-key"] = credentials.api_key
        return UpstreamRequest("POST", url, headers, openai_body(endpoint, body, stream, op))
