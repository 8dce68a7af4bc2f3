"""OpenAI chat in front, Gemini behind (AI Studio and Vertex-style URLs), streams included."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest
from google import genai
from google.genai import types
from harness import Upstreams
from provider_support import (
    anthropic_client,
    chain,
    ep,
    openai_client,
    read_until_failure,
    settled,
    weather_call,
)

from modelplane_sidecar.standins.gemini import GeminiStandIn
from modelplane_sidecar.standins.openai import Behaviour

Serve = Callable[[Any], str]
TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "additionalProperties": False,
        },
    },
}


def _gemini(upstreams: Upstreams, url: str, **extra: Any) -> str:
    extra.setdefault("apiKey", {"value": "AIza-secret"})
    return upstreams.router(chain(ep("gemini", "gemini", url + "/v1beta", **extra))).url


def test_request_translation_and_response(upstreams: Upstreams, serve: Serve) -> None:
    gemini = GeminiStandIn("gemini", api_key="AIza-secret")
    client = openai_client(_gemini(upstreams, serve(gemini)))
    png = "data:image/png;base64," + base64.b64encode(b"png").decode()
    completion = client.chat.completions.create(
        model="chat",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image_url", "image_url": {"url": png}},
                ],
            },
            weather_call("call_1__thought__c2ln"),
            {"role": "tool", "tool_call_id": "call_1__thought__c2ln", "content": '{"t": 21}'},
            {"role": "user", "content": "Thanks"},
        ],
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0.5,
        max_tokens=64,
        stop="END",
        response_format={"type": "json_object"},
    )
    sent = gemini.received[-1]
    assert sent.path == "/v1beta/models/gemini-model:generateContent"
    assert "key=" not in sent.path
    assert sent.headers["x-goog-api-key"] == "AIza-secret"
    body = sent.body
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Weather here?"},
                {"inlineData": {"mimeType": "image/png", "data": png.split(",")[1]}},
            ],
        },
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
                    "thoughtSignature": "c2ln",
                }
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"t": 21}}},
                {"text": "Thanks"},
            ],
        },
    ]
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parametersJsonSchema": TOOL["function"]["parameters"],
                }
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    assert body["generationConfig"] == {
        "temperature": 0.5,
        "maxOutputTokens": 64,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object"},
    }
    assert completion.choices[0].message.content == gemini.text
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(gemini.words())


def test_vertex_base_url_and_bearer_token(upstreams: Upstreams, serve: Serve) -> None:
    gemini = GeminiStandIn("vertex", api_key="ya29.token")
    base = serve(gemini) + "/v1/projects/p1/locations/europe-west4/publishers/google"
    router = upstreams.router(
        chain(
            ep(
                "vertex",
                "gemini",
                base,
                model="gemini-2.5-pro",
                apiKey={"value": "ya29.token"},
                options={"auth": "bearer"},
            )
        )
    )
    stream = openai_client(router.url).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == gemini.text
    sent = gemini.received[-1]
    assert sent.path == (
        "/v1/projects/p1/locations/europe-west4/publishers/google/models/"
        "gemini-2.5-pro:streamGenerateContent?alt=sse"
    )
    assert sent.headers["Authorization"] == "Bearer ya29.token"
    assert "x-goog-api-key" not in sent.headers


def test_stream_usage_and_tool_calls(upstreams: Upstreams, serve: Serve) -> None:
    gemini = GeminiStandIn("gemini", tool_input={"city": "Rome"})
    router = upstreams.router(chain(ep("gemini", "gemini", serve(gemini) + "/v1beta")))
    client = openai_client(router.url)
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == len(gemini.words())
    output = settled(
        lambda: router.metric("modelplane_tokens_total", endpoint="gemini", direction="output"),
        lambda v: v > 0,
    )
    assert output == usage.completion_tokens

    gemini.then(Behaviour("tool"), Behaviour("tool"))
    completion = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "weather"}], tools=[TOOL]
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert orjson.loads(calls[0].function.arguments) == {"city": "Rome"}  # type: ignore[union-attr]
    # The thought signature comes back inside the id, ready for the next turn.
    assert calls[0].id.endswith("__thought__" + base64.b64encode(b"sig-standin").decode())

    streamed = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "weather"}],
            tools=[TOOL],
            stream=True,
        )
    )
    deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas if d.function] == ["get_weather"]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_safety_blocks(upstreams: Upstreams, serve: Serve) -> None:
    gemini = GeminiStandIn("gemini").then(Behaviour("safety"), Behaviour("blocked"))
    client = openai_client(_gemini(upstreams, serve(gemini)))
    for _ in range(2):
        completion = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "bad"}]
        )
        assert completion.choices[0].finish_reason == "content_filter"
        assert not completion.choices[0].message.content

    blocking = GeminiStandIn("blocking").then(Behaviour("blocked"))
    other = GeminiStandIn("other")
    router = upstreams.router(
        chain(
            ep(
                "blocking",
                "gemini",
                serve(blocking) + "/v1beta",
                options={"contentPolicy": "fallback"},
            ),
            ep("other", "gemini", serve(other) + "/v1beta"),
        )
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "bad"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "other"


def test_errors(upstreams: Upstreams, serve: Serve) -> None:
    gemini = GeminiStandIn("gemini", api_key="AIza-right")
    client = openai_client(_gemini(upstreams, serve(gemini), apiKey={"value": "AIza-wrong"}))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert "API key not valid" in caught.value.message
    assert "AIza-wrong" not in str(caught.value.body)

    small = GeminiStandIn("small").then(
        Behaviour(
            "status",
            status=400,
            message="The input token count (1200000) exceeds the maximum number of tokens "
            "allowed (1048576).",
        )
    )
    large = GeminiStandIn("large")
    busy = GeminiStandIn("busy").then(*[Behaviour("status", status=429) for _ in range(2)])
    router = upstreams.router(
        chain(
            ep("busy", "gemini", serve(busy) + "/v1beta"),
            ep("small", "gemini", serve(small) + "/v1beta"),
            ep("large", "gemini", serve(large) + "/v1beta"),
        )
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "long"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "large"
    assert raw.headers["x-modelplane-fallbacks"] == "2"


def test_truncated_stream_is_a_failure(upstreams: Upstreams, serve: Serve) -> None:
    gemini = GeminiStandIn("gemini", chunk_delay=0.02, default=Behaviour("cut", cut_after=3))
    text, error = read_until_failure(openai_client(_gemini(upstreams, serve(gemini), apiKey=None)))
    assert text
    assert "failed after it started" in error.message


def test_anthropic_app_falls_back_to_gemini(upstreams: Upstreams, serve: Serve) -> None:
    gpt, url = upstreams.openai("gpt")
    gpt.then(*[Behaviour("status", status=500) for _ in range(2)])
    gemini = GeminiStandIn("gemini")
    router = upstreams.router(
        chain(ep("gpt", "openai", url), ep("gemini", "gemini", serve(gemini) + "/v1beta"))
    )
    with anthropic_client(router.url).messages.stream(
        model="chat", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == gemini.text


def test_standin_speaks_what_the_google_genai_sdk_expects(serve: Serve) -> None:
    gemini = GeminiStandIn("gemini", api_key="AIza-k")
    client = genai.Client(api_key="AIza-k", http_options=types.HttpOptions(base_url=serve(gemini)))
    response = client.models.generate_content(
        model="gemini-x",
        contents="hi",
        config=types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.1),
    )
    assert response.text == gemini.text
    assert response.usage_metadata is not None
    assert response.usage_metadata.candidates_token_count == len(gemini.words())
    pieces = [
        r.text
        for r in client.models.generate_content_stream(model="gemini-x", contents="hi")
        if r.text
    ]
    assert "".join(pieces) == gemini.text
    sent = gemini.received[0].body
    assert sent["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    with pytest.raises(genai.errors.ClientError) as caught:
        client.models.generate_content(
            model="gemini-x", contents="hi", config={"http_options": {"extra_body": {"x": 1}}}
        )
    assert caught.value.code == 400
    assert 'Unknown name "x"' in str(caught.value.message)
