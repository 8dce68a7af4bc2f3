"""OpenAI chat in front, Anthropic Messages behind: requests, responses, streams and errors.

The app is the official `openai` SDK talking to the sidecar; the upstream is the Anthropic
stand-in, which checks every body against the `anthropic` SDK's request types.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import orjson
import pytest
from harness import Upstreams
from provider_support import (
    chain,
    ep,
    openai_client,
    read_until_failure,
    settled,
    weather_call,
)

from modelplane_sidecar.standins.anthropic import AnthropicStandIn
from modelplane_sidecar.standins.openai import Behaviour

Serve = Callable[[Any], str]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _router(upstreams: Upstreams, url: str, **extra: Any) -> str:
    extra.setdefault("apiKey", {"value": "sk-ant-secret"})
    config = chain(ep("claude", "anthropic", url, **extra))
    return upstreams.router(config).url


def test_request_translation_and_response(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude", api_key="sk-ant-secret", cache_read_tokens=7)
    router = upstreams.router(
        chain(
            ep(
                "claude",
                "anthropic",
                serve(claude),
                apiKey={"value": "sk-ant-secret"},
                pricing={"inputPerMtok": 3, "outputPerMtok": 15, "cachedInputPerMtok": 0.3},
            )
        )
    )
    completion = openai_client(router.url).chat.completions.create(
        model="chat",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": PNG}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                ],
            },
            weather_call("call_1"),
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "user", "content": "And now?"},
        ],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        stop=["END"],
        temperature=0.2,
        user="user-42",
        reasoning_effort="minimal",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}},
        },
    )
    sent = claude.received[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-secret"
    assert sent.headers["anthropic-version"] == "2026-10-21"
    assert "Authorization" not in sent.headers
    body = sent.body
    assert body["model"] == "claude-model"
    assert body["system"] == "Be brief.\n\nAnswer in English."
    assert body["max_tokens"] == 4096
    assert body["stop_sequences"] == ["END"]
    assert "temperature" not in body  # not part of the Messages API any more
    assert body["output_config"] == {
        "format": {"type": "json_schema", "schema": {"type": "object"}},
        "effort": "low",
    }
    assert body["metadata"] == {"user_id": "user-42"}
    assert body["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather in a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    user, assistant, results = body["messages"]
    assert user["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG.split(",")[1]},
    }
    assert user["content"][2]["source"] == {"type": "url", "url": "https://example.com/cat.jpg"}
    assert assistant["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}
    ]
    # The tool result and the next user turn are merged into one user message, result first.
    assert results["role"] == "user"
    assert results["content"] == [
        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
        {"type": "text", "text": "And now?"},
    ]

    choice = completion.choices[0]
    assert choice.message.content == "[claude] " + claude.reply
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 7
    input_tokens = completion.usage.prompt_tokens
    assert router.metric("modelplane_tokens_total", endpoint="claude", direction="input") == (
        input_tokens
    )
    expected = ((input_tokens - 7) * 3 + 7 * 0.3 + completion.usage.completion_tokens * 15) / 1e6
    assert router.metric("modelplane_cost_usd_total", endpoint="claude") == pytest.approx(expected)


def test_max_tokens_from_app_and_option(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude")
    url = _router(upstreams, serve(claude), options={"maxTokens": 1000, "version": "2024-01-01"})
    client = openai_client(url)
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert claude.received[-1].body["max_tokens"] == 1000
    assert claude.received[-1].headers["anthropic-version"] == "2024-01-01"
    client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=33
    )
    assert claude.received[-1].body["max_tokens"] == 33


def test_tool_call_answer(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude", tool_input={"city": "Paris", "days": 2})
    claude.then(Behaviour("tool"), Behaviour("tool"))
    client = openai_client(_router(upstreams, serve(claude)))
    messages: Any = [{"role": "user", "content": "weather?"}]
    completion = client.chat.completions.create(
        model="chat", messages=messages, tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert claude.received[-1].body["tool_choice"] == {"type": "any"}
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert orjson.loads(call.function.arguments) == {"city": "Paris", "days": 2}  # type: ignore[union-attr]

    stream = client.chat.completions.create(
        model="chat", messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    arguments = ""
    names = []
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            assert delta_call.index == 0
            if delta_call.function and delta_call.function.name:
                names.append(delta_call.function.name)
            if delta_call.function and delta_call.function.arguments:
                arguments += delta_call.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"]
    assert orjson.loads(arguments) == {"city": "Paris", "days": 2}
    assert finish == "tool_calls"


def test_stream_text_and_usage(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude", cache_write_tokens=5)
    router = upstreams.router(chain(ep("claude", "anthropic", serve(claude))))
    chunks = list(
        openai_client(router.url).chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert claude.received[-1].body["stream"] is True
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[claude] " + claude.reply
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens == len(claude.words())
    output = settled(
        lambda: router.metric("modelplane_tokens_total", endpoint="claude", direction="output"),
        lambda v: v > 0,
    )
    assert output == usage.completion_tokens


def test_overloaded_529_is_retried_then_falls_back(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude").then(
        Behaviour("status", status=529), Behaviour("status", status=529)
    )
    backup = AnthropicStandIn("backup")
    router = upstreams.router(
        chain(ep("claude", "anthropic", serve(claude)), ep("backup", "anthropic", serve(backup)))
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "backup"
    assert raw.headers["x-modelplane-attempts"] == "3"
    assert len(claude.received) == 2


def test_rate_limit_and_auth_errors(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude", api_key="right-key")
    client = openai_client(_router(upstreams, serve(claude), apiKey={"value": "wrong-key"}))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert "invalid x-api-key" in caught.value.message
    assert "wrong-key" not in str(caught.value.body)

    limited = AnthropicStandIn("limited").then(
        *[Behaviour("status", status=429, retry_after="30") for _ in range(2)]
    )
    client = openai_client(_router(upstreams, serve(limited)))
    with pytest.raises(openai.APIStatusError) as exhausted:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
    # A Retry-After beyond the alias's limit: no waiting, and capacity-only failures are a 503.
    assert exhausted.value.status_code == 503
    assert "rate limit" in exhausted.value.message


def test_prompt_too_long_falls_back_to_larger_context(upstreams: Upstreams, serve: Serve) -> None:
    small = AnthropicStandIn("small").then(
        Behaviour(
            "status", status=400, message="prompt is too long: 250000 tokens > 200000 maximum"
        )
    )
    large = AnthropicStandIn("large")
    router = upstreams.router(
        chain(ep("small", "anthropic", serve(small)), ep("large", "anthropic", serve(large)))
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "long"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "large"

    alone = AnthropicStandIn("alone").then(
        Behaviour("status", status=400, message="prompt is too long: 9 tokens > 8 maximum")
    )
    client = openai_client(_router(upstreams, serve(alone)))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "context_length_exceeded"
    assert "prompt is too long" in caught.value.message


def test_refusal_passes_through_or_falls_back(upstreams: Upstreams, serve: Serve) -> None:
    strict = AnthropicStandIn("strict").then(Behaviour("refusal"))
    client = openai_client(_router(upstreams, serve(strict)))
    completion = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].finish_reason == "content_filter"

    refusing = AnthropicStandIn("refusing").then(Behaviour("refusal"))
    other = AnthropicStandIn("other")
    router = upstreams.router(
        chain(
            ep("refusing", "anthropic", serve(refusing), options={"contentPolicy": "fallback"}),
            ep("other", "anthropic", serve(other)),
        )
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "other"


def test_unsupported_request_falls_back_without_calling(upstreams: Upstreams, serve: Serve) -> None:
    claude = AnthropicStandIn("claude")
    _, gpt_url = upstreams.openai("gpt")
    router = upstreams.router(
        chain(ep("claude", "anthropic", serve(claude)), ep("gpt", "openai", gpt_url))
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], n=2
    )
    assert raw.headers["x-modelplane-endpoint"] == "gpt"
    assert claude.received == []


def test_stream_errors_become_error_events(upstreams: Upstreams, serve: Serve) -> None:
    for behaviour in (Behaviour("stream-error", cut_after=5), Behaviour("cut", cut_after=5)):
        # Paced so that the first frames reach the app before the failure does.
        claude = AnthropicStandIn("claude", chunk_delay=0.02, default=behaviour)
        text, error = read_until_failure(openai_client(_router(upstreams, serve(claude))))
        assert text, "the stream had started before it failed"
        assert "failed after it started" in error.message


def test_openai_fails_anthropic_serves_streamed(upstreams: Upstreams, serve: Serve) -> None:
    gpt, gpt_url = upstreams.openai("gpt")
    gpt.then(*[Behaviour("status", status=500) for _ in range(2)])
    claude = AnthropicStandIn("claude")
    router = upstreams.router(
        chain(ep("gpt", "openai", gpt_url), ep("claude", "anthropic", serve(claude)))
    )
    response = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert response.headers["x-modelplane-endpoint"] == "claude"
    assert response.headers["x-modelplane-fallbacks"] == "1"
    text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "[claude] " + claude.reply


def test_standin_speaks_what_the_anthropic_sdk_expects(serve: Serve) -> None:
    """The stand-in itself, driven by the official SDK: its wire format is Anthropic's."""
    claude = AnthropicStandIn("claude", api_key="k")
    client = anthropic.Anthropic(base_url=serve(claude), api_key="k", max_retries=0)
    message = client.messages.create(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    with client.messages.stream(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == claude.text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"stop": ["x"]},
        )
    assert "body.stop: unknown field" in caught.value.message
    claude.then(Behaviour("status", status=529))
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        client.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
