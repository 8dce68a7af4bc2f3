"""`POST /v1/messages`: apps on the official `anthropic` SDK, routed to any provider."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import anthropic
import orjson
import pytest
from harness import Upstreams, http
from provider_support import anthropic_client, chain, ep

from modelplane_sidecar.standins.anthropic import AnthropicStandIn
from modelplane_sidecar.standins.openai import Behaviour

Serve = Callable[[Any], str]
TOOL: Any = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def test_messages_served_by_an_openai_endpoint(upstreams: Upstreams) -> None:
    gpt, url = upstreams.openai("gpt")
    router = upstreams.router(chain(ep("gpt", "openai", url)))
    client = anthropic_client(router.url)
    image = base64.b64encode(b"png").decode()
    raw = client.messages.with_raw_response.create(
        model="chat",
        max_tokens=200,
        system="Be brief.",
        stop_sequences=["END"],
        metadata={"user_id": "u-1"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": image},
                    },
                ],
            },
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": "Sure?"},
        ],
    )
    assert raw.headers["x-modelplane-endpoint"] == "gpt"
    message = raw.parse()
    assert message.type == "message"
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("[gpt]")
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    sent = gpt.received[-1].body
    assert sent["model"] == "gpt-model"
    assert sent["max_tokens"] == 200
    assert sent["stop"] == ["END"]
    assert sent["user"] == "u-1"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ],
        },
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "Sure?"},
    ]


def test_stream_served_by_an_openai_endpoint(upstreams: Upstreams) -> None:
    gpt, url = upstreams.openai("gpt")
    router = upstreams.router(chain(ep("gpt", "openai", url)))
    with anthropic_client(router.url).messages.stream(
        model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "[gpt] " + gpt.reply
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert gpt.received[-1].body["stream_options"] == {"include_usage": True}


def test_tools_round_trip_through_openai_format(upstreams: Upstreams, serve: Serve) -> None:
    """Anthropic app -> OpenAI chat inside the router -> Anthropic upstream, and back."""
    claude = AnthropicStandIn("claude", tool_input={"city": "Oslo"})
    claude.then(Behaviour("tool"), Behaviour("tool"))
    router = upstreams.router(chain(ep("claude", "anthropic", serve(claude))))
    client = anthropic_client(router.url)
    history: Any = [
        {"role": "user", "content": "Weather in Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"x": 1}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
        {"role": "user", "content": "And in Oslo?"},
    ]
    message = client.messages.create(
        model="chat",
        max_tokens=50,
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=history,
    )
    upstream = claude.received[-1].body
    assert upstream["tools"] == [TOOL]
    assert upstream["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert upstream["messages"][1]["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"x": 1}},
    ]
    assert upstream["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "text", "text": "And in Oslo?"},
    ]
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use"
    assert block.name == "get_weather" and block.input == {"city": "Oslo"}

    with client.messages.stream(
        model="chat", max_tokens=50, tools=[TOOL], messages=history
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == {"city": "Oslo"}


def test_openai_fails_anthropic_serves_streamed(upstreams: Upstreams, serve: Serve) -> None:
    gpt, url = upstreams.openai("gpt")
    gpt.then(*[Behaviour("status", status=503) for _ in range(2)])
    claude = AnthropicStandIn("claude")
    router = upstreams.router(
        chain(ep("gpt", "openai", url), ep("claude", "anthropic", serve(claude)))
    )
    with anthropic_client(router.url).messages.with_streaming_response.create(
        model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}], stream=True
    ) as response:
        assert response.headers["x-modelplane-endpoint"] == "claude"
        assert response.headers["x-modelplane-fallbacks"] == "1"
        events = list(response.parse())
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == "[claude] " + claude.reply
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]


def test_errors_in_anthropic_shape(upstreams: Upstreams) -> None:
    gpt, url = upstreams.openai("gpt", api_key="sk-right")
    router = upstreams.router(chain(ep("gpt", "openai", url, apiKey={"value": "sk-wrong"})))
    client = anthropic_client(router.url)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert unknown.value.body["type"] == "error"  # type: ignore[index]
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "offered models: chat" in unknown.value.message

    with pytest.raises(anthropic.AuthenticationError) as denied:
        client.messages.create(
            model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert "Incorrect API key" in denied.value.message
    assert "sk-wrong" not in str(denied.value.body)

    reply = http(
        "POST",
        router.url + "/v1/messages",
        orjson.dumps({"model": "chat", "messages": []}),
        **{"content-type": "application/json"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required (a positive integer)",
    }
    assert len(gpt.received) == 1, "only the authenticated call reached the upstream"


def test_mid_stream_failure_is_an_error_event(upstreams: Upstreams) -> None:
    gpt, url = upstreams.openai("gpt", chunk_delay=0.02)
    gpt.default = Behaviour("cut", cut_after=4)
    router = upstreams.router(chain(ep("gpt", "openai", url)))
    stream = anthropic_client(router.url).messages.create(
        model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    types = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in stream:
            types.append(event.type)
    assert types[0] == "message_start", "the stream had started before it failed"
    assert "failed after it started" in caught.value.message
