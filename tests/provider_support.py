"""Helpers for the provider adapter tests: clients of the sidecar and small config builders."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest
from harness import chain_config
from openai.types.chat import ChatCompletionAssistantMessageParam


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="app-placeholder", max_retries=0)


def anthropic_client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="app-placeholder", max_retries=0)


def chain(*endpoints: dict[str, Any], **alias_settings: Any) -> dict[str, Any]:
    """A config whose alias `chat` falls back through `endpoints` in order."""
    return chain_config(list(endpoints), **alias_settings)


def ep(name: str, provider: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "provider": provider, "baseUrl": url, "model": f"{name}-model", **extra}


def weather_call(call_id: str, content: str | None = None) -> ChatCompletionAssistantMessageParam:
    """An assistant turn calling get_weather(city="Oslo") as tool call `call_id`."""
    return {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }


def read_until_failure(client: openai.OpenAI) -> tuple[str, openai.APIError]:
    """Stream a chat answer that is expected to fail part-way: the text the app read before
    the failure, and the error the SDK raised."""
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = ""
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    return text, caught.value


def settled(read: Callable[[], float], until: Callable[[float], bool]) -> float:
    """A metric's value once the router has finished accounting a request.

    Streams are accounted after the last byte is written, so a fast client can read the metric a
    moment before that; this waits (bounded: 30 s) for the accounting rather than racing it.
    """
    value = read()
    for _ in range(3000):
        if until(value):
            return value
        time.sleep(0.01)
        value = read()
    return value
