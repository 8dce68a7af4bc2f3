"""The OpenAI-compatible front door, driven by the official `openai` SDK (sync and async)."""

from __future__ import annotations

import time

import openai
import pytest
from harness import Upstreams, chain_config, endpoint, http
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="app-placeholder", max_retries=0)


def _async_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="app-placeholder", max_retries=0)


def test_chat_sync_routes_alias_to_endpoint_model_with_headers(upstreams: Upstreams) -> None:
    primary, url = upstreams.openai("primary", api_key="sk-upstream-secret-1")
    router = upstreams.router(
        chain_config([endpoint("primary", url, apiKey={"value": "sk-upstream-secret-1"})])
    )
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hello"}]
    )
    completion = raw.parse()
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content is not None
    assert completion.choices[0].message.content.startswith("[primary]")
    assert raw.headers["x-modelplane-endpoint"] == "primary"
    assert raw.headers["x-modelplane-attempts"] == "1"
    assert raw.headers["x-modelplane-fallbacks"] == "0"
    assert float(raw.headers["x-modelplane-decision-ms"]) >= 0
    sent = primary.received[-1]
    assert sent.body["model"] == "primary-model"
    # The app's placeholder key is replaced by the endpoint's own credential.
    assert sent.headers["Authorization"] == "Bearer sk-upstream-secret-1"
    # The router names itself; neither the app's client nor the HTTP library shows upstream.
    assert sent.headers["User-Agent"] == "modelplane-sidecar"


async def test_chat_async_and_usage_metrics(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("primary")
    router = upstreams.router(
        chain_config([endpoint("primary", url, pricing={"inputPerMtok": 1, "outputPerMtok": 2})])
    )
    completion = await _async_client(router.url).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello there, router"}]
    )
    assert completion.usage is not None
    tokens_in = router.metric("modelplane_tokens_total", endpoint="primary", direction="input")
    assert tokens_in == completion.usage.prompt_tokens
    expected_cost = (
        completion.usage.prompt_tokens * 1 + completion.usage.completion_tokens * 2
    ) / 1_000_000
    assert router.metric("modelplane_cost_usd_total", endpoint="primary") == pytest.approx(
        expected_cost
    )


def test_stream_sync_hides_router_usage_chunk_unless_asked(upstreams: Upstreams) -> None:
    primary, url = upstreams.openai("primary")
    router = upstreams.router(chain_config([endpoint("primary", url)]))
    client = _client(router.url)
    chunks = list(
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("[primary]")
    assert all(c.choices for c in chunks), "usage-only chunk leaked to an app that did not ask"
    # The router asked upstream for usage anyway, to account for cost.
    assert primary.received[-1].body["stream_options"] == {"include_usage": True}
    # Accounting runs when the relay finishes, which may be just after the app saw [DONE].
    for _ in range(3000):
        if router.metric("modelplane_tokens_total", endpoint="primary", direction="output"):
            break
        time.sleep(0.01)
    assert router.metric("modelplane_tokens_total", endpoint="primary", direction="output") > 0

    with_usage = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage is not None
    assert with_usage[-1].choices == []


async def test_stream_async(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("primary")
    router = upstreams.router(chain_config([endpoint("primary", url)]))
    stream = await _async_client(router.url).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces).startswith("[primary]")


def test_completions_embeddings_and_models(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("primary")
    config = chain_config([endpoint("primary", url)])
    config["models"].append({"name": "embed", "endpoints": ["primary"]})
    router = upstreams.router(config)
    client = _client(router.url)

    completion = client.completions.create(model="chat", prompt="Say hi")
    assert completion.choices[0].text.startswith("[primary]")

    streamed = list(client.completions.create(model="chat", prompt="Say hi", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith("[primary]")

    # The SDK asks for base64 and decodes it: the bytes pass through the router untouched.
    embeddings = client.embeddings.create(model="embed", input=["a", "bb"])
    assert isinstance(embeddings, CreateEmbeddingResponse)
    assert [len(d.embedding) for d in embeddings.data] == [8, 8]

    assert sorted(m.id for m in client.models.list()) == ["chat", "embed"]


def test_error_shapes(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("primary")
    config = chain_config([endpoint("primary", url)])
    config["server"] = {"maxBodyBytes": 2048}
    router = upstreams.router(config)
    client = _client(router.url)

    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.code == "model_not_found"
    assert "'gpt-9'" in not_found.value.message and "chat" in not_found.value.message

    with pytest.raises(openai.APIStatusError) as too_large:
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x" * 5000}]
        )
    assert too_large.value.status_code == 413
    assert "2048 bytes" in too_large.value.message

    for body, expected in [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "body is empty"),
        (b'{"messages": []}', "'model' field is required"),
        (b'{"model": "chat", "stream": "yes"}', "'stream' field must be a boolean"),
    ]:
        reply = http("POST", router.url + "/v1/chat/completions", body)
        assert reply.status_code == 400, body
        error = reply.json()["error"]
        assert expected in error["message"]
        assert error["type"] == "invalid_request_error"
        assert set(error) >= {"message", "type", "param", "code"}


def test_health_ready_and_metrics_endpoints(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("primary")
    router = upstreams.router(chain_config([endpoint("primary", url)]))
    assert http("GET", router.url + "/healthz").json() == {"status": "ok"}
    ready = http("GET", router.url + "/readyz").json()
    assert ready["status"] == "ready"
    assert ready["configVersion"] == router.holder.snapshot.version  # type: ignore[union-attr]
    _client(router.url).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}]
    )
    scrape = http("GET", router.url + "/metrics").text
    served = [line for line in scrape.splitlines() if line.startswith("modelplane_requests_total{")]
    assert any('endpoint="primary"' in line and 'outcome="ok"' in line for line in served)
    assert "modelplane_decision_duration_seconds_bucket" in scrape
