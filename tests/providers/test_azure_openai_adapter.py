"""Azure OpenAI behind the sidecar: deployment URLs, api-version, api-key or bearer token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from harness import Upstreams
from provider_support import anthropic_client, chain, ep, openai_client

from modelplane_sidecar.standins.azure_openai import AzureOpenAIStandIn
from modelplane_sidecar.standins.openai import Behaviour

Serve = Callable[[Any], str]


def _azure(name: str, url: str, **extra: Any) -> dict[str, Any]:
    extra.setdefault("apiKey", {"value": "azure-key-1"})
    return ep(name, "azure-openai", url, **extra)


def test_chat_embeddings_and_stream(upstreams: Upstreams, serve: Serve) -> None:
    azure = AzureOpenAIStandIn("azure", azure_key="azure-key-1")
    url = serve(azure)
    router = upstreams.router(
        chain(
            _azure("azure", url, options={"deployment": "gpt4o-prod", "apiVersion": "2024-06-01"})
        )
    )
    client = openai_client(router.url)
    completion = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == f"[azure] {azure.reply}"
    sent = azure.received[-1]
    assert sent.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert sent.headers["api-key"] == "azure-key-1"
    assert "Authorization" not in sent.headers

    chunks = list(
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert chunks[0].choices == []  # Azure's prompt-filter chunk, passed through
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"[azure] {azure.reply}"

    with anthropic_client(router.url).messages.stream(
        model="chat", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == f"[azure] {azure.reply}"


def test_deployment_defaults_to_model_and_bearer_token(upstreams: Upstreams, serve: Serve) -> None:
    azure = AzureOpenAIStandIn("azure", bearer_token="entra-token")
    router = upstreams.router(
        chain(
            _azure(
                "azure",
                serve(azure),
                model="text-embedding-3-small",
                apiKey={"value": "entra-token"},
                options={"auth": "bearer"},
            )
        )
    )
    result = openai_client(router.url).embeddings.create(model="chat", input=["a", "b"])
    assert len(result.data) == 2
    sent = azure.received[-1]
    assert sent.path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert sent.headers["Authorization"] == "Bearer entra-token"
    assert "api-key" not in sent.headers


def test_auth_failure_and_content_filter(upstreams: Upstreams, serve: Serve) -> None:
    azure = AzureOpenAIStandIn("azure", azure_key="right")
    client = openai_client(
        upstreams.router(chain(_azure("azure", serve(azure), apiKey={"value": "wrong"}))).url
    )
    with pytest.raises(openai.AuthenticationError) as denied:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert "Access denied" in denied.value.message

    filtered = Behaviour(
        "status",
        status=400,
        code="content_filter",
        message="The response was filtered due to the prompt triggering Azure OpenAI's content "
        "management policy.",
    )
    strict = AzureOpenAIStandIn("strict").then(filtered)
    client = openai_client(upstreams.router(chain(_azure("strict", serve(strict)))).url)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "content_filter"

    filtering = AzureOpenAIStandIn("filtering").then(filtered)
    other = AzureOpenAIStandIn("other")
    router = upstreams.router(
        chain(
            _azure("filtering", serve(filtering), options={"contentPolicy": "fallback"}),
            _azure("other", serve(other)),
        )
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "x"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "other"


def test_standin_speaks_what_the_azure_openai_sdk_expects(serve: Serve) -> None:
    azure = AzureOpenAIStandIn("azure", azure_key="k")
    client = openai.AzureOpenAI(
        azure_endpoint=serve(azure), api_key="k", api_version="2024-10-21", max_retries=0
    )
    completion = client.chat.completions.create(
        model="my-deployment", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == f"[azure] {azure.reply}"
    assert azure.received[-1].path == "/openai/deployments/my-deployment/chat/completions"
