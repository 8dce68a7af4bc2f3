"""What translating to another provider costs per request, beside the OpenAI pass-through.

In process, no network: for each adapter, the time to build the upstream request from a typical
chat request (system prompt, a few turns, a tool), to translate a complete answer back, and to
translate a 200-chunk stream, printed side by side with the OpenAI adapter (a pass-through that
still parses every chunk) as the baseline measured in the same run. Also SigV4 signing, ours
against botocore's `SigV4Auth` on the same request.

Run: .venv/bin/python bench/bench_translation.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from modelplane_sidecar.config import Endpoint
from modelplane_sidecar.providers import adapter_for
from modelplane_sidecar.providers.base import AwsCredentials, Credentials, Operation
from modelplane_sidecar.providers.eventstream import encode_message
from modelplane_sidecar.providers.sigv4 import sign

REQUEST: dict[str, Any] = {
    "model": "chat",
    "messages": [
        {"role": "system", "content": "You are a concise assistant. " * 10},
        {"role": "user", "content": "What is the weather in Oslo? " * 5},
        {"role": "assistant", "content": "Let me check that for you."},
        {"role": "user", "content": "Please also tell me about Bergen. " * 5},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ],
    "max_tokens": 256,
    "temperature": 0.2,
    "stream": True,
    "stream_options": {"include_usage": True},
}
WORDS = [f" word{i}" for i in range(200)]


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _answers() -> dict[str, tuple[bytes, list[bytes]]]:
    """A complete answer and the chunks of a streamed one, in each provider's wire format."""
    text = "".join(WORDS)
    openai_chunks = [
        _sse({"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": w}}]})
        for w in WORDS
    ]
    openai_chunks += [
        _sse({"id": "c", "choices": [{"delta": {}, "finish_reason": "stop"}]}),
        _sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 80, "completion_tokens": 200}}),
        b"data: [DONE]\n\n",
    ]
    openai_body = orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 80, "completion_tokens": 200},
        }
    )
    usage = {"input_tokens": 80, "output_tokens": 200}
    anthropic_chunks = [
        _sse({"type": "message_start", "message": {"id": "m", "usage": usage}}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
            "content_block_start",
        ),
    ]
    anthropic_chunks += [
        _sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": w},
            },
            "content_block_delta",
        )
        for w in WORDS
    ]
    anthropic_chunks += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage},
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    anthropic_body = orjson.dumps(
        {
            "id": "m",
            "type": "message",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": usage,
        }
    )
    gemini_usage = {"promptTokenCount": 80, "candidatesTokenCount": 200}
    gemini_chunks = [
        _sse({"candidates": [{"content": {"role": "model", "parts": [{"text": w}]}}]})
        for w in WORDS
    ]
    gemini_chunks[-1] = _sse(
        {
            "candidates": [
                {"content": {"parts": [{"text": "."}]}, "finishReason": "STOP"},
            ],
            "usageMetadata": gemini_usage,
        }
    )
    gemini_body = orjson.dumps(
        {
            "candidates": [{"content": {"parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": gemini_usage,
        }
    )

    def event(kind: str, payload: object) -> bytes:
        headers = {":event-type": kind, ":content-type": "application/json"}
        return encode_message({**headers, ":message-type": "event"}, orjson.dumps(payload))

    bedrock_chunks = [event("messageStart", {"role": "assistant"})]
    bedrock_chunks += [
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": w}}) for w in WORDS
    ]
    bedrock_usage = {"inputTokens": 80, "outputTokens": 200}
    bedrock_chunks += [
        event("messageStop", {"stopReason": "end_turn"}),
        event("metadata", {"usage": bedrock_usage}),
    ]
    bedrock_body = orjson.dumps(
        {
            "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": "end_turn",
            "usage": bedrock_usage,
        }
    )
    return {
        "openai": (openai_body, openai_chunks),
        "anthropic": (anthropic_body, anthropic_chunks),
        "gemini": (gemini_body, gemini_chunks),
        "bedrock": (bedrock_body, bedrock_chunks),
    }


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Median microseconds per call over `repeat` calls (in 5 batches)."""
    batch = max(1, repeat // 5)
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    answers = _answers()
    keys = AwsCredentials("AKIDEXAMPLE", "secret-key-example")
    print(f"{'provider':<10} {'request us':>11} {'response us':>12} {'stream us/chunk':>16}")
    for provider, extra in (
        ("openai", {}),
        ("anthropic", {}),
        ("gemini", {}),
        ("bedrock", {"region": "us-east-1"}),
    ):
        _bench_adapter(provider, extra, answers[provider], keys, args.repeat)
    _bench_sigv4(keys, args.repeat)


def _bench_adapter(
    provider: str,
    extra: dict[str, str],
    answer: tuple[bytes, list[bytes]],
    keys: AwsCredentials,
    repeat: int,
) -> None:
    endpoint = Endpoint.model_validate(
        {
            "name": provider,
            "provider": provider,
            "baseUrl": "https://example.invalid/v1",
            "model": "m",
            **extra,
        }
    )
    adapter = adapter_for(endpoint.provider)
    credentials = Credentials(None, keys) if provider == "bedrock" else Credentials("key")
    body, chunks = answer

    def request() -> object:
        return adapter.build_request(endpoint, credentials, Operation.CHAT, REQUEST, True)

    def response() -> object:
        return adapter.translate_response(endpoint, Operation.CHAT, body, REQUEST)

    def stream() -> object:
        translator = adapter.stream_translator(endpoint, Operation.CHAT, REQUEST)
        for chunk in chunks:
            translator.feed(chunk)
        return translator.finish()

    per_chunk = _timed(stream, max(10, repeat // 50)) / len(chunks)
    print(
        f"{provider:<10} {_timed(request, repeat):>11.1f} "
        f"{_timed(response, repeat):>12.1f} {per_chunk:>16.2f}"
    )


def _bench_sigv4(keys: AwsCredentials, repeat: int) -> None:
    url = "https://bedrock-runtime.us-east-1.amazonaws.com/model/m/converse"
    payload = orjson.dumps(REQUEST)
    headers = {"content-type": "application/json"}
    now = datetime.now(UTC)
    ours = _timed(
        lambda: sign("POST", url, headers, payload, keys, "us-east-1", "bedrock", now), repeat
    )
    try:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials as BotoCredentials
    except ImportError:
        print(f"sigv4 sign: ours {ours:.1f} us (botocore not installed for the baseline)")
        return
    signer = SigV4Auth(
        BotoCredentials(keys.access_key_id, keys.secret_access_key), "bedrock", "us-east-1"
    )

    def boto() -> None:
        signer.add_auth(AWSRequest(method="POST", url=url, headers=dict(headers), data=payload))

    print(f"sigv4 sign: ours {ours:.1f} us, botocore SigV4Auth {_timed(boto, repeat):.1f} us")


if __name__ == "__main__":
    main()
