"""OpenAI's Batch API through the sidecar to an OpenAI stand-in, driven by the `openai` SDK:
uploads and downloads streamed intact, the endpoint's key used instead of the app's, errors
passed on with credentials scrubbed."""

from __future__ import annotations

import hashlib
from typing import Any

import openai
import orjson
import pytest
from harness import Router, Upstreams, endpoint, http

from modelplane_sidecar.config import ConfigError, parse_config
from modelplane_sidecar.standins.openai_batch import OpenAIBatchStandIn

UPSTREAM_KEY = "sk-upstream-batch-key-0123456789"


def _world(upstreams: Upstreams, key: str = UPSTREAM_KEY) -> tuple[Router, OpenAIBatchStandIn]:
    standin = OpenAIBatchStandIn(api_key=UPSTREAM_KEY)
    url = f"http://127.0.0.1:{upstreams.servers.serve(standin.app())}/v1"
    router = upstreams.router(
        {
            "endpoints": [endpoint("openai", url, apiKey={"value": key})],
            "models": [{"name": "chat", "endpoints": ["openai"]}],
            "lanes": {"batch": {"batchApiEndpoint": "openai"}},
        }
    )
    return router, standin


def _client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="app-key", max_retries=0)


def _jsonl(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Q{i}"}]},
        }
        for i in range(n)
    ]
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def test_a_batch_job_end_to_end(upstreams: Upstreams) -> None:
    router, standin = _world(upstreams)
    client = _client(router)
    data = _jsonl(3)
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and uploaded.purpose == "batch"
    upload = standin.uploads[0]
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert upload.authorization == f"Bearer {UPSTREAM_KEY}"  # never the app's key
    assert all(auth != "Bearer app-key" for *_, auth in standin.calls)

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 3
    assert client.batches.retrieve(batch.id).output_file_id == batch.output_file_id
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert batch.output_file_id is not None
    output = client.files.content(batch.output_file_id).text.splitlines()
    assert [orjson.loads(line)["custom_id"] for line in output] == [
        "request-0",
        "request-1",
        "request-2",
    ]
    assert [f.id for f in client.files.list(purpose="batch")] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    assert router.metric(
        "modelplane_batch_api_requests_total", operation="files.create", status="200"
    )
    assert router.metric(
        "modelplane_batch_api_requests_total", operation="batches.cancel", status="409"
    )


def test_large_files_pass_through_intact(upstreams: Upstreams) -> None:
    router, standin = _world(upstreams)
    client = _client(router)
    data = _jsonl(40_000)  # about 6 MB
    assert len(data) > 5_000_000
    uploaded = client.files.create(file=("big.jsonl", data), purpose="batch")
    upload = standin.uploads[0]
    assert upload.size == len(data)
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    assert upload.content_length is not None and upload.content_length > len(data)
    downloaded = client.files.content(uploaded.id).read()
    assert hashlib.sha256(downloaded).hexdigest() == upload.sha256


def test_upstream_errors_pass_through_without_the_endpoint_key(upstreams: Upstreams) -> None:
    wrong = "sk-wrong-key-but-still-secret-987654"
    router, _ = _world(upstreams, key=wrong)
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(router).batches.list()
    body = caught.value.body
    assert isinstance(body, dict)
    assert wrong not in str(body) and "[REDACTED]" in body["message"]
    assert caught.value.response.headers["x-modelplane-endpoint"] == "openai"


def test_without_a_batch_endpoint_the_routes_say_how_to_enable_them(upstreams: Upstreams) -> None:
    _, url = upstreams.openai("a")
    router = upstreams.router(
        {"endpoints": [endpoint("a", url)], "models": [{"name": "chat", "endpoints": ["a"]}]}
    )
    reply = http("GET", router.url + "/v1/batches")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "batch_api_not_configured"
    assert "lanes.batch.batchApiEndpoint" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        (
            [endpoint("a", "http://127.0.0.1:9/v1")],
            "lanes.batch.batchApiEndpoint refers to unknown endpoint 'nope'",
        ),
        (
            [
                endpoint("a", "http://127.0.0.1:9/v1"),
                {**endpoint("nope", "http://127.0.0.1:9"), "provider": "anthropic"},
            ],
            "has provider anthropic; the Batch API pass-through needs an openai",
        ),
    ],
)
def test_batch_api_endpoint_is_validated(endpoints: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(
            {
                "endpoints": endpoints,
                "models": [{"name": "chat", "endpoints": ["a"]}],
                "lanes": {"batch": {"batchApiEndpoint": "nope"}},
            }
        )
