"""Bedrock with the temporary AWS keys pods on EKS get: IRSA (STS AssumeRoleWithWebIdentity) and
EKS Pod Identity (container credentials), fetched by botocore off the event loop and refreshed
before they expire; plus the Anthropic front door's count_tokens served by Bedrock CountTokens.

STS and the credentials endpoint are local stand-ins speaking their exact wire formats; the
Bedrock stand-in accepts only the keys they issued, with their session token.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from harness import Upstreams
from provider_support import anthropic_client, chain, ep, openai_client

from modelplane_sidecar.config import ConfigError, parse_config
from modelplane_sidecar.logs import JsonFormatter
from modelplane_sidecar.providers.aws_credentials import TemporaryAwsCredentials
from modelplane_sidecar.providers.base import AwsCredentials, UpstreamFailure
from modelplane_sidecar.providers.bedrock import count_tokens_model
from modelplane_sidecar.runtime import Snapshot
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.aws_credentials import ContainerCredentialsStandIn, StsStandIn
from modelplane_sidecar.standins.bedrock import BedrockStandIn
from modelplane_sidecar.standins.openai import Behaviour

Serve = Callable[[Any], str]
STATIC = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)
#: A cross-region inference profile: chat goes to it, CountTokens to its foundation model.
PROFILE = "eu.anthropic.claude-sonnet-4-20250514-v1:0"
FOUNDATION = "anthropic.claude-sonnet-4-20250514-v1:0"
_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


@pytest.fixture
def clean_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No AWS settings from the machine: no keys, no shared files, no instance metadata."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield tmp_path


def _irsa(monkeypatch: pytest.MonkeyPatch, home: Path, sts: StsStandIn, sts_url: str) -> None:
    """The environment EKS gives a pod whose ServiceAccount names an IAM role (IRSA)."""
    token = home / "eks.amazonaws.com-serviceaccount-token"
    token.write_text(sts.token)
    monkeypatch.setenv("AWS_ROLE_ARN", sts.role_arn)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts_url)


def _pod_identity(
    monkeypatch: pytest.MonkeyPatch, home: Path, agent: ContainerCredentialsStandIn, url: str
) -> None:
    """The environment EKS Pod Identity gives a pod (the agent's URI, a token file)."""
    token = home / "eks-pod-identity-token"
    token.write_text(agent.authorization)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", url + agent.path)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))


def _bedrock(name: str, url: str, **extra: Any) -> dict[str, Any]:
    extra.setdefault("model", PROFILE)
    extra.setdefault("region", "eu-central-1")
    return ep(name, "bedrock", url, **extra)


def _signed_with(received: dict[str, str], keys: AwsCredentials) -> bool:
    headers = {name.lower(): value for name, value in received.items()}
    credential = headers["authorization"].split("Credential=", 1)[1].split("/", 1)[0]
    return (
        credential == keys.access_key_id
        and headers.get("x-amz-security-token") == keys.session_token
    )


def _ask(client: openai.OpenAI) -> str | None:
    answer = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    return answer.choices[0].message.content


# -- IRSA --------------------------------------------------------------------------------------


def test_irsa_keys_sign_calls_and_are_refreshed_near_expiry(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first keys expire in 5 minutes (inside botocore's mandatory refresh window), the
    # next ones in an hour.
    sts = StsStandIn(lifetimes=[300.0, 3600.0])
    _irsa(monkeypatch, clean_aws, sts, serve(sts))
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", issuer=sts.lookup)
    router = upstreams.router(chain(_bedrock("bedrock", serve(bedrock))))
    assert sts.calls == []  # loading the config called nobody
    client = openai_client(router.url)

    assert _ask(client) == bedrock.text
    assert len(sts.calls) == 1
    call = sts.calls[0]
    assert call["Action"] == "AssumeRoleWithWebIdentity"
    assert call["RoleArn"] == sts.role_arn
    assert call["WebIdentityToken"] == sts.token
    assert call["RoleSessionName"]
    first = sts.issued[0].credentials
    assert _signed_with(bedrock.received[-1].headers, first)

    # Five minutes left: the next request waits for fresh keys and is signed with them.
    assert _ask(client) == bedrock.text
    assert len(sts.calls) == 2
    second = sts.issued[1].credentials
    assert _signed_with(bedrock.received[-1].headers, second)

    # An hour left: no refresh; streams are signed with the same keys.
    with anthropic_client(router.url).messages.stream(
        model="chat", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert "".join(stream.text_stream) == bedrock.text
    assert len(sts.calls) == 2
    assert bedrock.received[-1].path.endswith("/converse-stream")
    assert _signed_with(bedrock.received[-1].headers, second)


def test_failed_sts_call_is_a_clear_error_without_secrets(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sts = StsStandIn(lifetimes=[300.0])
    _irsa(monkeypatch, clean_aws, sts, serve(sts))
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", issuer=sts.lookup)
    router = upstreams.router(chain(_bedrock("bedrock", serve(bedrock))))
    client = openai_client(router.url)
    refreshing = router.holder.snapshot.endpoints["bedrock"].credentials.refreshing
    assert isinstance(refreshing, TemporaryAwsCredentials)
    refreshing.retry_seconds = 0.0  # let each request try STS again

    assert _ask(client) == bedrock.text
    keys = sts.issued[0].credentials
    sts.failure = (400, "InvalidIdentityToken", "Token audience is not allowed")
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client)
    text = caught.value.response.text
    assert "could not be refreshed" in text
    assert f"web identity (IRSA: role {sts.role_arn}" in text
    assert "InvalidIdentityToken" in text
    for secret in (sts.token, keys.secret_access_key, keys.session_token or "unset"):
        assert secret not in text
    sent_before = len(bedrock.received)
    assert sent_before == 1  # nothing went to Bedrock without keys

    sts.failure = None
    assert _ask(client) == bedrock.text
    assert _signed_with(bedrock.received[-1].headers, sts.issued[-1].credentials)


def test_an_upstream_echoing_the_temporary_keys_is_scrubbed(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sts = StsStandIn()
    _irsa(monkeypatch, clean_aws, sts, serve(sts))
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", issuer=sts.lookup)
    client = openai_client(upstreams.router(chain(_bedrock("bedrock", serve(bedrock)))).url)
    assert _ask(client) == bedrock.text
    keys = sts.issued[0].credentials
    values = (keys.access_key_id, keys.secret_access_key, keys.session_token or "unset")
    echoed = "echo: key {} secret {} token {}".format(*values)
    # A client error (handed to the app as Bedrock worded it) and a server error (every
    # attempt fails; the app gets the router's summary quoting the upstream).
    for status in (400, 500):
        bedrock.default = Behaviour(kind="status", status=status, message=echoed)
        with pytest.raises(openai.APIStatusError) as caught:
            _ask(client)
        text = caught.value.response.text
        assert "echo: key [REDACTED] secret [REDACTED] token [REDACTED]" in text, text
        for value in values:
            assert value not in text


async def test_botocore_logs_of_a_failed_refresh_are_json_lines_without_secrets(
    clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sts = StsStandIn(lifetimes=[720.0])  # inside the advisory window: botocore logs, keeps keys
    runner, port = await start_site(sts.app())
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # botocore's DEBUG records carry whole STS answers
    try:
        _irsa(monkeypatch, clean_aws, sts, f"http://127.0.0.1:{port}")
        keys = TemporaryAwsCredentials("webIdentity", "eu-central-1", None, retry_seconds=3600)
        first = (await keys.current(10)).aws
        assert first is not None
        # An STS that quotes the token and the keys in hand in its error message.
        secrets = (sts.token, first.access_key_id, first.secret_access_key, first.session_token)
        sts.failure = (400, "InvalidIdentityToken", "echo: {} {} {} {}".format(*secrets))
        assert (await keys.refreshed(10)).aws == first
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        await runner.cleanup()
    assert len(sts.calls) == 2
    records = [orjson.loads(line) for line in lines.getvalue().splitlines()]
    warnings = [r for r in records if r["logger"] == "botocore.credentials"]
    assert [r["level"] for r in warnings] == ["warning"]
    assert "failed during advisory refresh period" in warnings[0]["msg"]
    assert "InvalidIdentityToken" in warnings[0]["exc"]
    assert "echo: [REDACTED] [REDACTED] [REDACTED] [REDACTED]" in warnings[0]["exc"]
    assert not [r for r in records if r["logger"].startswith("botocore") and r["level"] == "debug"]
    for secret in secrets:
        assert secret and secret not in lines.getvalue()


def test_unconfigured_sources_are_config_errors(clean_aws: Path) -> None:
    def build(**options: Any) -> Snapshot:
        endpoint = _bedrock("br", "http://127.0.0.1:1", options=options)
        return Snapshot.build(parse_config(chain(endpoint)))

    with pytest.raises(ConfigError, match="endpoint 'br': credentialSource webIdentity: AWS_ROL"):
        build(credentialSource="webIdentity")
    with pytest.raises(ConfigError, match="credentialSource container: neither AWS_CONTAINER"):
        build(credentialSource="container")
    with pytest.raises(ConfigError, match="credentialSource environment: AWS_ACCESS_KEY_ID"):
        build(credentialSource="environment")
    with pytest.raises(ConfigError, match="nor are web identity"):
        build()
    with pytest.raises(ConfigError, match="exclude each other"):
        endpoint = _bedrock(
            "br",
            "http://127.0.0.1:1",
            apiKey={"value": "ABSK-key"},
            options={"credentialSource": "webIdentity"},
        )
        Snapshot.build(parse_config(chain(endpoint)))
    with pytest.raises(ValueError, match="credentialSource"):
        build(credentialSource="instanceMetadata")


def test_auto_prefers_static_keys_then_web_identity_then_container(
    clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def credentials() -> Any:
        config = parse_config(chain(_bedrock("br", "http://127.0.0.1:1")))
        return Snapshot.build(config).endpoints["br"].credentials

    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/v1/credentials")
    container = credentials().refreshing
    assert isinstance(container, TemporaryAwsCredentials) and container.source == "container"
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/r")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(clean_aws / "token"))
    web = credentials().refreshing
    assert isinstance(web, TemporaryAwsCredentials) and web.source == "webIdentity"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", STATIC.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", STATIC.secret_access_key)
    static = credentials()
    assert static.refreshing is None and static.aws == STATIC


async def test_refresh_starts_in_the_background_before_the_mandatory_window(
    clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 12 minutes: inside the advisory window (15), outside the mandatory one (10).
    sts = StsStandIn(lifetimes=[720.0, 3600.0])
    runner, port = await start_site(sts.app())
    try:
        _irsa(monkeypatch, clean_aws, sts, f"http://127.0.0.1:{port}")
        keys = TemporaryAwsCredentials("webIdentity", "eu-central-1", None)
        first = await keys.current(10)
        assert first.aws == sts.issued[0].credentials
        # Still good for 12 minutes: answered at once with the keys in hand...
        assert await keys.current(10) is first
        # ...while a refresh runs; once it is done, the new keys are the current ones.
        refreshed = await keys.refreshed(10)
        assert refreshed.aws == sts.issued[1].credentials
        assert await keys.current(10) is refreshed
        assert len(sts.calls) == 2
    finally:
        await runner.cleanup()


async def test_a_quietly_failed_background_refresh_is_not_retried_by_every_request(
    clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sts = StsStandIn(lifetimes=[720.0])
    runner, port = await start_site(sts.app())
    try:
        _irsa(monkeypatch, clean_aws, sts, f"http://127.0.0.1:{port}")
        keys = TemporaryAwsCredentials("webIdentity", "eu-central-1", None, retry_seconds=3600)
        first = await keys.current(10)
        sts.failure = (400, "InvalidIdentityToken", "Token is expired")
        assert await keys.current(10) is first  # starts the background refresh
        # In the advisory window botocore keeps the old keys when STS fails...
        assert (await keys.refreshed(10)).aws == first.aws
        for _ in range(3):  # ...and the next requests do not each call STS again.
            assert (await keys.current(10)).aws == first.aws
        assert len(sts.calls) == 2
    finally:
        await runner.cleanup()


# -- EKS Pod Identity ----------------------------------------------------------------------------


def test_pod_identity_keys_sign_calls(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = ContainerCredentialsStandIn(lifetimes=[300.0, 6 * 3600.0])
    _pod_identity(monkeypatch, clean_aws, agent, serve(agent))
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", issuer=agent.lookup)
    endpoint = _bedrock("bedrock", serve(bedrock), options={"credentialSource": "container"})
    client = openai_client(upstreams.router(chain(endpoint)).url)

    assert _ask(client) == bedrock.text
    # Keys with 5 minutes left are replaced at once (botocore refreshes them as it loads them).
    assert agent.calls == [agent.authorization, agent.authorization]
    assert _signed_with(bedrock.received[-1].headers, agent.issued[1].credentials)
    for _ in range(2):  # good for six hours: no more calls
        assert _ask(client) == bedrock.text
    assert len(agent.calls) == 2
    assert _signed_with(bedrock.received[-1].headers, agent.issued[1].credentials)


def test_pod_identity_agent_refusing_the_token_is_a_clear_error(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = ContainerCredentialsStandIn()
    _pod_identity(monkeypatch, clean_aws, agent, serve(agent))
    (clean_aws / "eks-pod-identity-token").write_text("a-stale-token")
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", issuer=agent.lookup)
    client = openai_client(upstreams.router(chain(_bedrock("bedrock", serve(bedrock)))).url)
    with pytest.raises(openai.APIStatusError) as caught:
        _ask(client)
    text = caught.value.response.text
    assert "container credentials (EKS Pod Identity / ECS, http://127.0.0.1:" in text
    assert "could not be loaded" in text
    assert "a-stale-token" not in text
    assert bedrock.received == []


async def test_credentials_wait_is_bounded(
    clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = ContainerCredentialsStandIn()
    runner, port = await start_site(agent.app())
    try:
        _pod_identity(monkeypatch, clean_aws, agent, f"http://127.0.0.1:{port}")
        release = asyncio.Event()

        def load(*_: Any) -> Any:
            # A credential provider that does not answer until released (a hung endpoint).
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=30)
            return None

        loop = asyncio.get_running_loop()
        keys = TemporaryAwsCredentials("container", "eu-central-1", None, load=load)
        with pytest.raises(UpstreamFailure, match=r"no answer within 0\.05s"):
            await keys.current(0.05)
        release.set()
        with pytest.raises(UpstreamFailure, match="is not configured"):
            await keys.refreshed(10)
    finally:
        await runner.cleanup()


# -- count_tokens ------------------------------------------------------------------------------


def test_count_tokens_through_bedrock_countokens(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sts = StsStandIn()
    _irsa(monkeypatch, clean_aws, sts, serve(sts))
    bedrock = BedrockStandIn("bedrock", region="eu-central-1", issuer=sts.lookup)
    bedrock.counted_tokens = 321
    other, other_url = upstreams.openai("gpt")
    router = upstreams.router(
        chain(ep("gpt", "openai", other_url), _bedrock("bedrock", serve(bedrock)))
    )
    counted = anthropic_client(router.url).messages.with_raw_response.count_tokens(
        model="chat",
        system="Be brief.",
        messages=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"c": "O"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sun"}],
            },
        ],
        tools=[{"name": "weather", "input_schema": {"type": "object", "properties": {}}}],
        tool_choice={"type": "auto"},
    )
    assert counted.parse().input_tokens == 321
    assert counted.headers["x-modelplane-endpoint"] == "bedrock"
    assert other.received == []  # OpenAI cannot count: it was not asked
    sent = bedrock.received[-1]
    assert sent.path == f"/model/{FOUNDATION}/count-tokens"  # `:` is not re-quoted
    assert _signed_with(sent.headers, sts.issued[0].credentials)
    converse = sent.body["input"]["converse"]
    assert set(converse) == {"messages", "system", "toolConfig"}
    assert converse["system"] == [{"text": "Be brief."}]
    assert converse["messages"][1]["content"] == [
        {"toolUse": {"toolUseId": "toolu_1", "name": "weather", "input": {"c": "O"}}}
    ]
    assert converse["toolConfig"]["toolChoice"] == {"auto": {}}


def test_count_tokens_falls_back_and_reports_what_cannot_count(
    upstreams: Upstreams, serve: Serve, clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", STATIC.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", STATIC.secret_access_key)
    busy = BedrockStandIn("busy", region="eu-central-1", credentials=STATIC)
    busy.default = Behaviour("status", status=429)
    spare = BedrockStandIn("spare", region="eu-central-1", credentials=STATIC, counted_tokens=7)
    model = "arn:aws:bedrock:eu-central-1:123456789012:inference-profile/" + PROFILE
    router = upstreams.router(
        chain(
            _bedrock("busy", serve(busy)),
            _bedrock("spare", serve(spare), model=model, options={"countTokensModel": "m.x-v1"}),
        )
    )
    client = anthropic_client(router.url)
    counted = client.messages.with_raw_response.count_tokens(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert counted.parse().input_tokens == 7
    assert counted.headers["x-modelplane-endpoint"] == "spare"
    assert spare.received[-1].path == "/model/m.x-v1/count-tokens"

    spare.default = Behaviour("status", status=429)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.count_tokens(model="chat", messages=[{"role": "user", "content": "hi"}])
    assert "count_tokens failed at every endpoint that can count" in str(limited.value)
    spare.default = Behaviour("status", status=400, message="The provided model is unknown.")
    with pytest.raises(anthropic.BadRequestError, match="The provided model is unknown"):
        client.messages.count_tokens(model="chat", messages=[{"role": "user", "content": "hi"}])

    _, url = upstreams.openai("gpt")
    only_openai = upstreams.router(chain(ep("gpt", "openai", url)))
    with pytest.raises(anthropic.BadRequestError) as refused:
        anthropic_client(only_openai.url).messages.count_tokens(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "count_tokens: none of the endpoints model 'chat' routes this request "
            "to can count tokens (candidates: gpt (openai)); Anthropic and Bedrock endpoints "
            "count them",
        },
    }
    with pytest.raises(anthropic.NotFoundError):
        anthropic_client(only_openai.url).messages.count_tokens(
            model="no-such-alias", messages=[{"role": "user", "content": "hi"}]
        )


@pytest.mark.parametrize(
    ("model", "counted"),
    [
        (PROFILE, FOUNDATION),
        (
            "global.anthropic.claude-haiku-4-5-20251001-v1:0",
            "anthropic.claude-haiku-4-5-20251001-v1:0",
        ),
        (f"arn:aws:bedrock:eu-central-1:1:inference-profile/{PROFILE}", FOUNDATION),
        (FOUNDATION, FOUNDATION),
        ("meta.llama3-70b-instruct-v1:0", "meta.llama3-70b-instruct-v1:0"),
    ],
)
def test_count_tokens_model_of_inference_profiles(model: str, counted: str) -> None:
    assert count_tokens_model(model) == counted


def test_a_new_config_keeps_the_temporary_keys_of_an_unchanged_source(
    clean_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/v1/credentials")
    first = Snapshot.build(parse_config(chain(_bedrock("br", "http://127.0.0.1:1"))))
    same = Snapshot.build(
        parse_config(chain(_bedrock("br", "http://127.0.0.1:1", pricing={"inputPerMtok": 2}))),
        first,
    )
    kept = first.endpoints["br"].credentials.refreshing
    assert kept is not None and same.endpoints["br"].credentials.refreshing is kept
    moved = Snapshot.build(
        parse_config(chain(_bedrock("br", "http://127.0.0.1:1", region="eu-west-1"))), first
    )
    assert moved.endpoints["br"].credentials.refreshing is not kept
