"""Audit records of the Batch API pass-through: one per call, in the request records' format and
hash chain, checked by `modelplane audit verify`, with ids and counts but no file contents,
metadata or keys. The app is the `openai` SDK; the provider an OpenAI Files/Batch stand-in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from harness import Router, Upstreams, audit_requests, endpoint

from modelplane_sidecar.audit import AuditLog, generate_key, public_key_text
from modelplane_sidecar.auditing import AuditTrail, Identity
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.server import create_app
from modelplane_sidecar.standins.openai_batch import OpenAIBatchStandIn
from modelplane_sidecar.standins.scripted import drop_connection

MODELPLANE = str(Path(sys.executable).with_name("modelplane"))
UPSTREAM_KEY = "sk-upstream-batch-key-0123456789"
APP_KEY = "app-key-never-in-the-audit"
CONTENT_MARKER = "question-text-that-stays-in-the-file"
METADATA_MARKER = "nightly-run-label"


class _Audited:
    """A sidecar whose audit trail goes to a file, every record signed at once."""

    def __init__(self, upstreams: Upstreams, tmp_path: Path, batch_url: str) -> None:
        key = generate_key()
        self.public_key = public_key_text(key.public_key())
        self.path = tmp_path / "audit.jsonl"
        metrics = SidecarMetrics()
        log = AuditLog.open(str(self.path), key, {"pod": "jobs-1"}, checkpoint_every=1)
        trail = AuditTrail(log, Identity("team-a", "jobs-1", "jobs"), metrics)
        _, chat_url = upstreams.openai("chat")
        raw = {
            "metadata": {"name": "team-a-policy", "namespace": "team-a"},
            "endpoints": [
                endpoint("openai", batch_url, apiKey={"value": UPSTREAM_KEY}, region="us-east-1"),
                endpoint("chat", chat_url),
            ],
            "models": [{"name": "chat", "endpoints": ["chat"]}],
            "lanes": {"batch": {"batchApiEndpoint": "openai"}},
        }
        app = create_app(parse_config(raw), metrics, trail)
        self.router = Router(upstreams.servers, app, upstreams.servers.serve(app))

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.router.url + "/v1", api_key=APP_KEY, max_retries=0)

    def records(self, count: int) -> list[dict[str, Any]]:
        """The file's request records once there are `count`."""
        return audit_requests(self.path, count)


def _jsonl(n: int) -> bytes:
    lines = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": f"{CONTENT_MARKER} {i}"}],
            },
        }
        for i in range(n)
    ]
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def test_every_batch_api_call_leaves_a_record_that_audit_verify_accepts(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    standin = OpenAIBatchStandIn(api_key=UPSTREAM_KEY)
    url = f"http://127.0.0.1:{upstreams.servers.serve(standin.app())}/v1"
    audited = _Audited(upstreams, tmp_path, url)
    client = audited.client()
    data = _jsonl(3)

    uploaded = client.files.create(
        file=("requests.jsonl", data),
        purpose="batch",
        extra_headers={"x-request-id": "upload-1"},
    )
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": METADATA_MARKER},
    )
    client.batches.retrieve(batch.id)
    client.batches.list()
    assert batch.output_file_id is not None
    output = client.files.content(batch.output_file_id).read()
    client.files.list(purpose="batch")
    client.files.retrieve(uploaded.id)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    client.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    # A routed request in between: one chain holds both kinds.
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])

    records = audited.records(11)
    assert len(records) == 11
    batch_records = [r for r in records if "batchApi" in r]
    operations = [r["batchApi"]["operation"] for r in batch_records]
    assert operations == [
        "files.create",
        "batches.create",
        "batches.retrieve",
        "batches.list",
        "files.content",
        "files.list",
        "files.retrieve",
        "batches.cancel",
        "files.delete",
        "files.retrieve",
    ]
    for record in batch_records:
        assert record["namespace"] == "team-a" and record["serviceAccount"] == "jobs"
        assert record["policy"] == "team-a-policy" and record["configVersion"]
        assert record["endpoint"] == "openai" and record["provider"] == "openai"
        assert record["region"] == "us-east-1" and record["upstreamModel"] is None
        assert record["model"] is None and record["tokens"] is None and record["costUsd"] == 0
        assert record["stream"] is False and record["durationMs"] >= 0
        (attempt,) = record["attempts"]
        assert attempt["endpoint"] == "openai" and attempt["status"] == record["status"]
    by_op = {r["batchApi"]["operation"]: r for r in batch_records}

    created = by_op["files.create"]
    assert created["requestId"] == "upload-1"
    assert created["api"] == "/v1/files" and created["outcome"] == "ok"
    assert created["batchApi"]["created"] == uploaded.id
    assert created["batchApi"]["bytesUploaded"] > len(data)  # the multipart body
    assert created["attempts"][0]["result"] == "ok"

    made = by_op["batches.create"]["batchApi"]
    assert made["created"] == batch.id and made["inputFileId"] == uploaded.id
    assert made["batchEndpoint"] == "/v1/chat/completions"

    content = by_op["files.content"]
    assert content["api"] == "/v1/files/{file_id}/content"
    assert content["batchApi"]["fileId"] == batch.output_file_id
    assert content["batchApi"]["bytesDownloaded"] == len(output)

    cancel = by_op["batches.cancel"]
    assert cancel["api"] == "/v1/batches/{batch_id}/cancel"
    assert cancel["batchApi"]["batchId"] == batch.id
    assert (cancel["outcome"], cancel["status"], cancel["error"]) == (
        "client_error",
        409,
        "upstream_client_error",
    )
    assert cancel["attempts"][0]["result"] == "client-error"
    gone = batch_records[-1]
    assert (gone["outcome"], gone["status"]) == ("client_error", 404)

    text = audited.path.read_text()
    for secret in (UPSTREAM_KEY, APP_KEY, CONTENT_MARKER, METADATA_MARKER, "requests.jsonl"):
        assert secret not in text

    command = [MODELPLANE, "audit", "verify", str(audited.path), "--strict", "--json"]
    verify = subprocess.run(
        [*command, "--public-key", audited.public_key],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = orjson.loads(verify.stdout)
    assert report["ok"] and report["problems"] == [] and report["records"] >= 11


def test_refused_and_unreachable_batch_calls_are_audited(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        drop_connection(request)
        raise web.HTTPInternalServerError()

    broken = web.Application()
    broken.router.add_route("*", "/{tail:.*}", hang_up)
    url = f"http://127.0.0.1:{upstreams.servers.serve(broken)}/v1"
    audited = _Audited(upstreams, tmp_path, url)
    with pytest.raises(openai.APIStatusError) as caught:
        audited.client().batches.retrieve("batch_abc123")
    assert caught.value.status_code == 502
    (record,) = audited.records(1)
    assert (record["outcome"], record["status"], record["error"]) == (
        "exhausted",
        502,
        "batch_api_unreachable",
    )
    assert record["attempts"] == [
        {"endpoint": "openai", "attempt": 1, "result": "connect", "status": None}
    ]
    assert record["batchApi"] == {"operation": "batches.retrieve", "batchId": "batch_abc123"}

    # Without a batch endpoint the router refuses, and says so in the record.
    unconfigured = parse_config(
        {
            "metadata": {"name": "team-a-policy", "namespace": "team-a"},
            "endpoints": [endpoint("openai", url)],
            "models": [{"name": "chat", "endpoints": ["openai"]}],
        }
    )
    audited.router.holder.apply(unconfigured, "test")
    with pytest.raises(openai.NotFoundError):
        audited.client().files.list()
    refused = audited.records(2)[1]
    assert (refused["outcome"], refused["status"], refused["error"]) == (
        "refused",
        404,
        "batch_api_not_configured",
    )
    assert refused["endpoint"] is None and refused["attempts"] == []
