"""`/v1/messages/count_tokens` counted by Anthropic endpoints (their own count_tokens API) and
Bedrock ones (CountTokens) in one chain, with its metrics and audit records.

The app is the official `anthropic` SDK (`client.messages.count_tokens`); the providers are
stand-ins speaking their wire formats (the Anthropic one checks count_tokens bodies against the
SDK's own `MessageCountTokensParams` and answers its `MessageTokensCount`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
from harness import Router, Upstreams, audit_requests
from provider_support import anthropic_client, chain, ep

from modelplane_sidecar.audit import AuditLog, generate_key
from modelplane_sidecar.auditing import AuditTrail, Identity
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.providers.base import AwsCredentials
from modelplane_sidecar.server import create_app
from modelplane_sidecar.standins.anthropic import AnthropicStandIn
from modelplane_sidecar.standins.bedrock import BedrockStandIn
from modelplane_sidecar.standins.openai import Behaviour

KEY = "sk-ant-upstream-key-for-counting"
STATIC = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)
FOUNDATION = "anthropic.claude-sonnet-4-20250514-v1:0"
PROMPT = "prompt-text-that-never-reaches-the-audit"
MESSAGES: list[Any] = [{"role": "user", "content": PROMPT}]


def test_the_standin_answers_the_sdk_in_anthropics_wire_format(serve: Any) -> None:
    claude = AnthropicStandIn("claude", api_key=KEY, counted_tokens=42)
    client = anthropic.Anthropic(base_url=serve(claude), api_key=KEY, max_retries=0)
    counted = client.messages.with_raw_response.count_tokens(
        model="claude-sonnet-4-5", system="Be brief.", messages=MESSAGES
    )
    assert counted.parse().input_tokens == 42
    assert orjson.loads(counted.http_response.content) == {"input_tokens": 42}
    sent = claude.received[-1]
    assert sent.path == "/v1/messages/count_tokens"
    # A Messages-only field is refused, as the API refuses it.
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.count_tokens(
            model="claude-sonnet-4-5", messages=MESSAGES, extra_body={"max_tokens": 10}
        )
    wrong = anthropic.Anthropic(base_url=serve(claude), api_key="sk-ant-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.count_tokens(model="claude-sonnet-4-5", messages=MESSAGES)


class _Audited:
    """A sidecar with an audit trail to a file (every record signed at once)."""

    def __init__(self, upstreams: Upstreams, tmp_path: Path, config: dict[str, Any]) -> None:
        self.path = tmp_path / "audit.jsonl"
        metrics = SidecarMetrics()
        log = AuditLog.open(str(self.path), generate_key(), {"pod": "p"}, checkpoint_every=1)
        trail = AuditTrail(log, Identity("team-a", "p", "sa"), metrics)
        app = create_app(parse_config(config), metrics, trail)
        self.router = Router(upstreams.servers, app, upstreams.servers.serve(app))

    def records(self, count: int) -> list[dict[str, Any]]:
        """The file's request records once there are `count`."""
        return audit_requests(self.path, count)


def test_a_chain_of_anthropic_and_bedrock_counts_with_metrics_and_audit(
    upstreams: Upstreams, serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", STATIC.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", STATIC.secret_access_key)
    claude = AnthropicStandIn("claude", api_key=KEY, counted_tokens=42)
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", credentials=STATIC)
    bedrock.counted_tokens = 7
    config = chain(
        ep(
            "claude",
            "anthropic",
            serve(claude),
            apiKey={"value": KEY},
            options={"version": "2023-06-01"},
        ),
        ep("bedrock", "bedrock", serve(bedrock), model=FOUNDATION, region="eu-central-1"),
    )
    audited = _Audited(upstreams, tmp_path, config)
    router = audited.router
    client = anthropic_client(router.url)
    tools: Any = [{"name": "weather", "input_schema": {"type": "object", "properties": {}}}]

    # The first endpoint, Anthropic, counts with its own API.
    counted = client.messages.with_raw_response.count_tokens(
        model="chat", system="Be brief.", messages=MESSAGES, tools=tools
    )
    assert counted.parse().input_tokens == 42
    assert counted.headers["x-modelplane-endpoint"] == "claude"
    sent = claude.received[-1]
    assert sent.path == "/v1/messages/count_tokens"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body == {
        "model": "claude-model",
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        "system": "Be brief.",
        "tools": tools,
    }

    # Anthropic overloaded: Bedrock counts.
    claude.default = Behaviour("status", status=529)
    counted = client.messages.with_raw_response.count_tokens(model="chat", messages=MESSAGES)
    assert counted.parse().input_tokens == 7
    assert counted.headers["x-modelplane-endpoint"] == "bedrock"
    assert bedrock.received[-1].path == f"/model/{FOUNDATION}/count-tokens"

    # Anthropic's 4xx is the answer; an alias the config does not know is refused.
    claude.default = Behaviour("status", status=400, message="messages: at least one message")
    with pytest.raises(anthropic.BadRequestError, match="at least one message"):
        client.messages.count_tokens(model="chat", messages=MESSAGES)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-alias", messages=MESSAGES)

    def requests(**labels: str) -> float:
        return router.metric("modelplane_count_tokens_requests_total", **labels)

    assert requests(model="chat", endpoint="claude", outcome="ok") == 1
    assert requests(model="chat", endpoint="bedrock", outcome="ok") == 1
    assert requests(model="chat", endpoint="claude", outcome="client_error") == 1
    assert requests(model="", endpoint="", outcome="refused") == 1
    attempts = "modelplane_upstream_attempts_total"
    assert router.metric(attempts, endpoint="claude", result="ok") == 1
    assert router.metric(attempts, endpoint="claude", result="server-error") == 1
    assert router.metric(attempts, endpoint="claude", result="client-error") == 1
    assert router.metric(attempts, endpoint="bedrock", result="ok") == 1
    # Counting is not a chat request: the request family is left alone.
    assert router.metric("modelplane_requests_total") == 0

    records = audited.records(4)
    assert [r["api"] for r in records] == ["/v1/messages/count_tokens"] * 4
    assert [r["outcome"] for r in records] == ["ok", "ok", "client_error", "refused"]
    assert [r["endpoint"] for r in records] == ["claude", "bedrock", "claude", None]
    assert [r["countTokens"] for r in records] == [
        {"inputTokens": 42},
        {"inputTokens": 7},
        {"inputTokens": None},
        {"inputTokens": None},
    ]
    assert [r["status"] for r in records] == [200, 200, 400, 404]
    assert records[1]["attempts"] == [
        {"endpoint": "claude", "attempt": 1, "result": "server-error", "status": 529},
        {"endpoint": "bedrock", "attempt": 2, "result": "ok", "status": 200},
    ]
    assert records[0]["model"] == "chat" and records[0]["rule"] is not None
    assert records[0]["namespace"] == "team-a" and records[0]["tokens"] is None
    written = audited.path.read_text()
    for secret in (PROMPT, KEY, STATIC.secret_access_key, "at least one message"):
        assert secret not in written
