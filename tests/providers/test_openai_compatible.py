"""OpenAI-compatible servers' quirks: no stream usage, no `[DONE]`, `stream_options` refused."""

from __future__ import annotations

import orjson
import pytest
from harness import Upstreams
from provider_support import chain, ep, openai_client, settled

from modelplane_sidecar.config import Endpoint
from modelplane_sidecar.providers.base import FailureKind, Operation, UpstreamFailure
from modelplane_sidecar.providers.openai import OpenAIAdapter

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "four score and seven"}]}


def _frame(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def test_stream_without_done_or_usage_is_complete_and_estimated() -> None:
    """llama.cpp / older TGI: `usage: null` on every chunk, no `[DONE]` after the last one."""
    translator = OpenAIAdapter().stream_translator(_endpoint(), Operation.CHAT, REQUEST)
    out = translator.feed(_frame({"role": "assistant", "content": "Hello"}))
    out += translator.feed(_frame({"content": " world"}) + _frame({}, "stop"))
    out += translator.finish()
    assert out.endswith(b"data: [DONE]\n\n")
    assert out.count(b"data: ") == 4
    usage = translator.usage
    assert usage is not None and usage.estimated
    assert usage.input_tokens > 0 and usage.output_tokens > 0


def test_stream_cut_before_any_finish_is_truncated() -> None:
    translator = OpenAIAdapter().stream_translator(_endpoint(), Operation.CHAT, REQUEST)
    translator.feed(_frame({"role": "assistant", "content": "Hel"}))
    with pytest.raises(UpstreamFailure) as caught:
        translator.finish()
    assert caught.value.kind is FailureKind.PROTOCOL


def test_response_without_usage_is_estimated() -> None:
    body = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"}}],
        }
    )
    translated = OpenAIAdapter().translate_response(_endpoint(), Operation.CHAT, body, REQUEST)
    assert translated.usage.estimated
    assert translated.usage.input_tokens > 0


def test_stream_usage_option_off(upstreams: Upstreams) -> None:
    """For servers that reject `stream_options`: not sent; usage is estimated instead."""
    server, url = upstreams.openai("tgi")
    router = upstreams.router(
        chain(ep("tgi", "openai-compatible", url, options={"streamUsage": False}))
    )
    chunks = list(
        openai_client(router.url).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert "stream_options" not in server.received[-1].body
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    output = settled(
        lambda: router.metric("modelplane_tokens_total", endpoint="tgi", direction="output"),
        lambda v: v > 0,
    )
    assert output > 0


def test_unknown_option_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="options for provider openai-compatible: streamUsge"):
        _endpoint(options={"streamUsge": False})


def _endpoint(**extra: object) -> Endpoint:
    return Endpoint.model_validate(
        {
            "name": "e",
            "provider": "openai-compatible",
            "baseUrl": "http://127.0.0.1:1/v1",
            "model": "m",
            **extra,
        }
    )
