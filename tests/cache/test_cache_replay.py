"""Cached answers replayed as SSE streams, and streams recorded back into complete answers.

Replayed frames are parsed with the `openai` SDK's own chunk model, so a wrong field fails here.
"""

from __future__ import annotations

from typing import Any

import orjson
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion import Completion

from modelplane_sidecar.cache.replay import StreamRecorder, replay_frames
from modelplane_sidecar.providers.base import Usage
from modelplane_sidecar.providers.sse import SSEParser

CHAT: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-x",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Water boils at 100 °C.", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"q": "water"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}


def _chunks(frames: bytes) -> list[dict[str, Any]]:
    events = SSEParser().feed(frames)
    assert events[-1].data == b"[DONE]"
    return [orjson.loads(e.data) for e in events[:-1]]


def test_chat_answer_replays_as_sdk_valid_chunks() -> None:
    frames = replay_frames(orjson.dumps(CHAT), include_usage=True)
    assert frames is not None
    chunks = [ChatCompletionChunk.model_validate(c) for c in _chunks(frames)]
    assert all(c.id == "chatcmpl-1" and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Water boils at 100 °C."
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert [(tc.index, tc.id, tc.function and tc.function.arguments) for tc in calls] == [
        (0, "call_1", '{"q": "water"}')
    ]
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices}
    assert finishes == {0: "stop", 1: "tool_calls"}
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].total_tokens == 21 and not chunks[-1].choices


def test_usage_chunk_only_when_asked() -> None:
    frames = replay_frames(orjson.dumps(CHAT), include_usage=False)
    assert frames is not None
    assert all("usage" not in c for c in _chunks(frames))


def test_record_of_a_replay_is_the_original_answer() -> None:
    frames = replay_frames(orjson.dumps(CHAT), include_usage=False)
    assert frames is not None
    recorder = StreamRecorder(1 << 20)
    # As a relay would see it: arbitrary pieces.
    for i in range(0, len(frames), 7):
        recorder.feed(frames[i : i + 7])
    body = recorder.completion(Usage(12, 9))
    assert body is not None
    assert ChatCompletion.model_validate_json(body) == ChatCompletion.model_validate(CHAT)


def test_text_completion_round_trip() -> None:
    answer = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": "forty-two", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    frames = replay_frames(orjson.dumps(answer), include_usage=True)
    assert frames is not None
    recorder = StreamRecorder(1 << 20)
    recorder.feed(frames)
    body = recorder.completion(None)
    assert body is not None
    assert Completion.model_validate_json(body) == Completion.model_validate(answer)


def test_streamed_tool_call_pieces_are_joined() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        payload = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        return b"data: " + orjson.dumps({**payload, "choices": [choice]}) + b"\n\n"

    recorder = StreamRecorder(1 << 20)
    call = {"index": 0, "id": "call_9", "type": "function"}
    recorder.feed(chunk({"role": "assistant", "tool_calls": [{**call, "function": {"name": "f"}}]}))
    recorder.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}))
    recorder.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}))
    recorder.feed(chunk({}, "tool_calls") + b"data: [DONE]\n\n")
    body = recorder.completion(Usage(1, 1))
    assert body is not None
    message = ChatCompletion.model_validate_json(body).choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.arguments == '{"a": 1}'  # type: ignore[union-attr]


def test_cut_or_oversized_streams_are_not_cached() -> None:
    frames = replay_frames(orjson.dumps(CHAT), include_usage=False)
    assert frames is not None
    cut = StreamRecorder(1 << 20)
    cut.feed(frames[: frames.index(b"tool_calls") - 40])
    assert cut.completion(None) is None
    small = StreamRecorder(64)
    small.feed(frames)
    assert small.overflowed and small.completion(None) is None
