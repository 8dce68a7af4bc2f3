"""Bedrock Converse behind the sidecar: SigV4, event-stream framing, translation and errors.

The stand-in verifies every signature with botocore's signer and every body against botocore's
service model; botocore's own client and event-stream parser check the stand-in in turn.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.auth
import botocore.session
import openai
import orjson
import pytest
import yaml
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.eventstream import EventStreamBuffer
from harness import Upstreams, http
from provider_support import (
    anthropic_client,
    chain,
    ep,
    openai_client,
    read_until_failure,
    settled,
    weather_call,
)

from modelplane_sidecar.config import ConfigError, parse_config
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.providers.base import AwsCredentials, FailureKind, UpstreamFailure
from modelplane_sidecar.providers.eventstream import EventStreamDecoder, encode_message
from modelplane_sidecar.providers.sigv4 import resolve_credentials, sign
from modelplane_sidecar.runtime import Snapshot
from modelplane_sidecar.server import ConfigHolder, FileConfigWatcher
from modelplane_sidecar.standins.bedrock import BedrockStandIn
from modelplane_sidecar.standins.openai import Behaviour

Serve = Callable[[Any], str]
KEYS = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)
MODEL = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-v2:1"
TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The AWS keys in the environment, and no shared files from the real home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEYS.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS.secret_access_key)
    yield


def _bedrock(name: str, url: str, **extra: Any) -> dict[str, Any]:
    extra.setdefault("model", MODEL)
    extra.setdefault("region", "us-east-1")
    return ep(name, "bedrock", url, **extra)


# -- SigV4 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "headers", "token"),
    [
        (
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/"
            "anthropic.claude-3-haiku-20240307-v1%3A0/converse",
            {"content-type": "application/json"},
            None,
        ),
        (
            "http://127.0.0.1:8443/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile"
            "%2Fus.meta.llama3/converse-stream",
            {"content-type": "application/json", "accept": "application/vnd.amazon.eventstream"},
            "session-token-value",
        ),
        (
            "https://bedrock-runtime.eu-west-1.amazonaws.com/model/m/converse?b=2&a=1",
            {"Content-Type": "application/json", "X-Custom": "  spaced   value "},
            None,
        ),
    ],
)
def test_sigv4_matches_botocore(
    monkeypatch: pytest.MonkeyPatch, url: str, headers: dict[str, str], token: str | None
) -> None:
    when = datetime(2026, 11, 28, 7, 30, 5, tzinfo=UTC)
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    region = "eu-west-1" if "eu-west-1" in url else "us-east-1"
    keys = AwsCredentials(KEYS.access_key_id, KEYS.secret_access_key, token)

    ours = sign("POST", url, headers, body, keys, region, "bedrock", when)

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when.replace(tzinfo=None))
    request = AWSRequest(method="POST", url=url, headers=dict(headers), data=body)
    signer = botocore.auth.SigV4Auth(
        BotoCredentials(keys.access_key_id, keys.secret_access_key, token), "bedrock", region
    )
    signer.add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]
    assert ours["x-amz-date"] == request.headers["X-Amz-Date"]
    assert ours.get("x-amz-security-token") == request.headers.get("X-Amz-Security-Token")


def test_credentials_from_env_and_shared_files(tmp_path: Path) -> None:
    env = {
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "AKIAENV",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_SESSION_TOKEN": "env-token",
    }
    assert resolve_credentials(None, env) == AwsCredentials("AKIAENV", "env-secret", "env-token")
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws/credentials").write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d-secret\n"
        "[team]\naws_access_key_id = AKIATEAM\naws_secret_access_key = t-secret\n"
    )
    (tmp_path / ".aws/config").write_text(
        "[profile ops]\naws_access_key_id = AKIAOPS\naws_secret_access_key = o-secret\n"
        "aws_session_token = o-token\n"
    )
    # A named profile wins over the environment, as in the AWS SDKs.
    assert resolve_credentials("team", env).access_key_id == "AKIATEAM"
    assert resolve_credentials("ops", env) == AwsCredentials("AKIAOPS", "o-secret", "o-token")
    files_only = {"HOME": str(tmp_path), "AWS_PROFILE": "team"}
    assert resolve_credentials(None, files_only).access_key_id == "AKIATEAM"
    assert resolve_credentials(None, {"HOME": str(tmp_path)}).access_key_id == "AKIADEFAULT"
    with pytest.raises(ConfigError, match="no AWS credentials for profile 'nobody'"):
        resolve_credentials("nobody", env)


def test_endpoint_without_credentials_or_region_is_rejected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config = parse_config(chain(_bedrock("br", "http://127.0.0.1:1")))
    with pytest.raises(ConfigError, match="endpoint 'br': no AWS credentials"):
        Snapshot.build(config)
    no_region = parse_config(chain(_bedrock("br", "http://127.0.0.1:1", region=None)))
    with pytest.raises(ConfigError, match="endpoint 'br': no AWS region"):
        Snapshot.build(no_region)
    # A Bedrock API key needs no AWS keys; the region may come from the URL.
    with_key = parse_config(
        chain(
            _bedrock(
                "br",
                "https://bedrock-runtime.ap-south-1.amazonaws.com",
                region=None,
                apiKey={"value": "ABSK-key"},
            )
        )
    )
    assert Snapshot.build(with_key).endpoints["br"].credentials.api_key == "ABSK-key"


# -- event stream ----------------------------------------------------------------------------


def test_eventstream_frames_agree_with_botocore() -> None:
    frames = [
        encode_message(
            {":event-type": "contentBlockDelta", ":message-type": "event"},
            orjson.dumps({"delta": {"text": f"word {i} é"}, "contentBlockIndex": 0}),
        )
        for i in range(3)
    ]
    stream = b"".join(frames)
    buffer = EventStreamBuffer()
    buffer.add_data(stream)
    parsed = [(m.headers, m.payload) for m in buffer]
    decoded: list[tuple[dict[str, Any], bytes]] = []
    decoder = EventStreamDecoder()
    for cut in range(len(stream)):  # one byte at a time: every split point
        decoded += [(m.headers, m.payload) for m in decoder.feed(stream[cut : cut + 1])]
    assert decoded == parsed
    assert len(decoded) == 3 and decoder.pending == 0

    corrupt = bytearray(frames[0])
    corrupt[-6] ^= 0xFF
    with pytest.raises(UpstreamFailure) as caught:
        EventStreamDecoder().feed(bytes(corrupt))
    assert caught.value.kind is FailureKind.PROTOCOL


# -- through the sidecar -----------------------------------------------------------------------


def test_converse_request_and_response(upstreams: Upstreams, serve: Serve, aws_env: None) -> None:
    bedrock = BedrockStandIn("bedrock", credentials=KEYS)
    router = upstreams.router(
        chain(_bedrock("bedrock", serve(bedrock), pricing={"inputPerMtok": 1, "outputPerMtok": 5}))
    )
    png = base64.b64encode(b"png").decode()
    completion = openai_client(router.url).chat.completions.create(
        model="chat",
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            },
            weather_call("tooluse_1", "Calling."),
            {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"},
        ],
        tools=[TOOL],
        tool_choice="required",
        max_tokens=100,
        temperature=0.3,
        stop=["END"],
        user="u-7",
    )
    sent = bedrock.received[-1]
    assert sent.path == "/model/" + MODEL.replace("/", "%2F") + "/converse"
    assert sent.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    body = sent.body
    assert body["system"] == [{"text": "Be brief."}]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"text": "Look"},
                {"image": {"format": "png", "source": {"bytes": png}}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"text": "Calling."},
                {
                    "toolUse": {
                        "toolUseId": "tooluse_1",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    }
                },
            ],
        },
        {
            "role": "user",
            "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "sunny"}]}}],
        },
    ]
    assert body["inferenceConfig"] == {
        "maxTokens": 100,
        "temperature": 0.3,
        "stopSequences": ["END"],
    }
    assert body["toolConfig"]["toolChoice"] == {"any": {}}
    assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {
        "json": TOOL["function"]["parameters"]
    }
    assert body["requestMetadata"] == {"user": "u-7"}
    assert completion.choices[0].message.content == bedrock.text
    assert completion.usage is not None
    cost = settled(lambda: router.metric("modelplane_cost_usd_total", endpoint="bedrock"), bool)
    assert cost == pytest.approx(
        (completion.usage.prompt_tokens + completion.usage.completion_tokens * 5) / 1e6
    )


def test_converse_stream_text_tools_and_usage(
    upstreams: Upstreams, serve: Serve, aws_env: None
) -> None:
    bedrock = BedrockStandIn("bedrock", credentials=KEYS, tool_input={"city": "Lima"})
    client = openai_client(upstreams.router(chain(_bedrock("bedrock", serve(bedrock)))).url)
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert bedrock.received[-1].path.endswith("/converse-stream")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == bedrock.text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(bedrock.words())

    bedrock.then(Behaviour("tool"))
    streamed = list(
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "w"}], tools=[TOOL], stream=True
        )
    )
    calls = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in calls if d.function)
    assert orjson.loads(arguments) == {"city": "Lima"}
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_bedrock_api_key_as_bearer(upstreams: Upstreams, serve: Serve) -> None:
    bedrock = BedrockStandIn("bedrock", api_key="ABSK-secret")
    router = upstreams.router(
        chain(_bedrock("bedrock", serve(bedrock), apiKey={"value": "ABSK-secret"}))
    )
    with anthropic_client(router.url).messages.stream(
        model="chat", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == bedrock.text
    assert bedrock.received[-1].headers["Authorization"] == "Bearer ABSK-secret"


def test_errors_and_fallbacks(upstreams: Upstreams, serve: Serve, aws_env: None) -> None:
    wrong = BedrockStandIn(
        "wrong", credentials=AwsCredentials(KEYS.access_key_id, "another-secret")
    )
    client = openai_client(upstreams.router(chain(_bedrock("wrong", serve(wrong)))).url)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}])
    assert "signature we calculated does not match" in denied.value.message
    assert KEYS.secret_access_key not in str(denied.value.body)

    throttled = BedrockStandIn("throttled").then(
        *[Behaviour("status", status=429) for _ in range(2)]
    )
    small = BedrockStandIn("small").then(
        Behaviour("status", status=400, message="Input is too long for requested model.")
    )
    large = BedrockStandIn("large")
    router = upstreams.router(
        chain(
            _bedrock("throttled", serve(throttled)),
            _bedrock("small", serve(small)),
            _bedrock("large", serve(large)),
        )
    )
    raw = openai_client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "long"}]
    )
    assert raw.headers["x-modelplane-endpoint"] == "large"
    attempts = raw.headers["x-modelplane-attempts"]
    assert attempts == "4", "two throttled attempts, one too-long, one served"

    guarded = BedrockStandIn("guarded").then(Behaviour("guardrail"))
    client = openai_client(upstreams.router(chain(_bedrock("guarded", serve(guarded)))).url)
    completion = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize("kind", ["stream-error", "cut"])
def test_mid_stream_failures(upstreams: Upstreams, serve: Serve, aws_env: None, kind: str) -> None:
    bedrock = BedrockStandIn("bedrock", chunk_delay=0.02, default=Behaviour(kind, cut_after=4))
    client = openai_client(upstreams.router(chain(_bedrock("bedrock", serve(bedrock)))).url)
    text, error = read_until_failure(client)
    assert text
    expected = "throttlingException" if kind == "stream-error" else "connection broke"
    assert expected in error.message


def test_standin_speaks_what_botocore_expects(serve: Serve) -> None:
    """botocore's own client signs, sends and parses (JSON, event stream) against the stand-in."""
    bedrock = BedrockStandIn("bedrock", credentials=KEYS, region="us-west-2")
    client = botocore.session.get_session().create_client(
        "bedrock-runtime",
        region_name="us-west-2",
        endpoint_url=serve(bedrock),
        aws_access_key_id=KEYS.access_key_id,
        aws_secret_access_key=KEYS.secret_access_key,
    )
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    answer = client.converse(modelId=MODEL, messages=messages)
    assert answer["output"]["message"]["content"] == [{"text": bedrock.text}]
    assert answer["stopReason"] == "end_turn"
    assert answer["usage"]["outputTokens"] == len(bedrock.words())
    events = list(client.converse_stream(modelId=MODEL, messages=messages)["stream"])
    assert list(events[0]) == ["messageStart"]
    text = "".join(
        e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e
    )
    assert text == bedrock.text
    assert events[-1]["metadata"]["usage"]["outputTokens"] == len(bedrock.words())


def test_standin_rejects_fields_converse_does_not_have(serve: Serve) -> None:
    url = serve(BedrockStandIn("bedrock")) + "/model/m/converse"
    body = {"messages": [{"role": "user", "content": [{"txt": "hi"}]}], "maxTokens": 5}
    reply = http("POST", url, orjson.dumps(body), **{"content-type": "application/json"})
    assert reply.status_code == 400
    assert reply.headers["x-amzn-ErrorType"].startswith("ValidationException:")
    message = reply.json()["message"]
    assert 'Unknown parameter in input: "maxTokens"' in message
    assert 'Unknown parameter in messages[0].content[0]: "txt"' in message


async def test_reload_without_aws_credentials_keeps_serving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    holder = ConfigHolder(SidecarMetrics())
    holder.apply(parse_config(chain(ep("gpt", "openai", "http://127.0.0.1:1/v1"))), "initial")
    serving = holder.snapshot
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(chain(_bedrock("br", "http://127.0.0.1:1"))))
    watcher = FileConfigWatcher(path, holder, interval=60)
    assert await watcher.reload("test") is False
    assert holder.snapshot is serving
