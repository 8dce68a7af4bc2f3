"""The OpenAI stand-in must speak OpenAI's exact wire format: its payloads are checked against the
official SDK's own pydantic types, so a wrong or missing field fails here and not in production."""

from __future__ import annotations

import orjson
from harness import Upstreams, http
from openai.types import Completion, CreateEmbeddingResponse, ErrorObject, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from modelplane_sidecar.standins.openai import Behaviour


def _post(url: str, body: dict[str, object]) -> bytes:
    reply = http("POST", url, orjson.dumps(body), **{"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    return reply.content


def _frames(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    return [e.removeprefix(b"data: ") for e in events if e and e != b"data: [DONE]"]


def test_chat_completion_and_chunks_validate_against_sdk_types(upstreams: Upstreams) -> None:
    _, base = upstreams.openai("s")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    completion = ChatCompletion.model_validate_json(_post(base + "/chat/completions", body))
    assert completion.object == "chat.completion"
    assert completion.usage is not None and completion.usage.total_tokens > 0

    raw = _post(
        base + "/chat/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    chunks = [ChatCompletionChunk.model_validate_json(f) for f in _frames(raw)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_completions_embeddings_models_validate(upstreams: Upstreams) -> None:
    _, base = upstreams.openai("s")
    Completion.model_validate_json(_post(base + "/completions", {"model": "m", "prompt": "x"}))
    frames = _frames(_post(base + "/completions", {"model": "m", "prompt": "x", "stream": True}))
    for frame in frames[:-1]:
        # The real API streams `finish_reason: null` until the last chunk, while the SDK's type
        # only allows the final values; check everything else about the intermediate chunks.
        chunk = orjson.loads(frame)
        assert chunk["choices"][0].pop("finish_reason") is None
        chunk["choices"][0]["finish_reason"] = "stop"
        Completion.model_validate(chunk)
    assert Completion.model_validate_json(frames[-1]).choices[0].finish_reason == "stop"
    floats = _post(base + "/embeddings", {"model": "m", "input": ["a", "b"]})
    assert len(CreateEmbeddingResponse.model_validate_json(floats).data) == 2
    models = orjson.loads(http("GET", base + "/models").content)
    assert [Model.model_validate(m).id for m in models["data"]] == ["standin"]


def test_error_bodies_and_retry_after(upstreams: Upstreams) -> None:
    standin, base = upstreams.openai("s")
    standin.then(Behaviour("status", 429, retry_after="7"), Behaviour("status", 500))
    body = orjson.dumps({"model": "m", "messages": []})
    limited = http("POST", base + "/chat/completions", body)
    assert limited.status_code == 429
    assert {k.lower(): v for k, v in limited.headers.items()}["retry-after"] == "7"
    assert ErrorObject.model_validate(limited.json()["error"]).code == "rate_limit_exceeded"
    failed = http("POST", base + "/chat/completions", body)
    assert failed.status_code == 500
    assert ErrorObject.model_validate(failed.json()["error"]).type == "server_error"
