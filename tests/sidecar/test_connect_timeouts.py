"""A connect timeout (aiohttp's `sock_connect`, whose ConnectionTimeoutError is a TimeoutError
too) is reported as what it is: the upstream was not reached within `connectSeconds`, not "no
answer within" the request timeout. Normal requests, streams and count_tokens alike."""

from __future__ import annotations

import anthropic
import openai
import pytest
from harness import Upstreams, chain_config, endpoint
from stuck_connect import stuck_port

from modelplane_sidecar.standins.anthropic import AnthropicStandIn

MESSAGES = [{"role": "user", "content": "hello"}]
CONNECT = {"timeouts": {"connectSeconds": 0.2, "requestSeconds": 60}}
REPORTED = "no connection to the upstream within 0.2s (connect timeout)"


@pytest.mark.parametrize("stream", [False, True])
def test_a_connect_timeout_is_a_connection_failure(upstreams: Upstreams, stream: bool) -> None:
    with stuck_port() as port:
        stuck = endpoint("stuck", f"http://127.0.0.1:{port}/v1", **CONNECT)
        router = upstreams.router(chain_config([stuck], retry={"maxAttempts": 1}))
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            if stream:
                for _ in client.chat.completions.create(
                    model="chat", messages=MESSAGES, stream=True
                ):
                    pass
            else:
                client.chat.completions.create(model="chat", messages=MESSAGES)
    error = caught.value.body
    assert isinstance(error, dict)
    assert f"stuck attempt 1: {REPORTED}" in error["message"]
    assert [r["outcome"] for r in error["attempts"]] == [REPORTED]
    assert router.metric("modelplane_upstream_attempts_total", result="connect") == 1
    assert router.metric("modelplane_upstream_attempts_total", result="timeout") == 0
    assert "within 60" not in error["message"]


def test_count_tokens_reports_a_connect_timeout_and_falls_back(upstreams: Upstreams) -> None:
    claude = AnthropicStandIn("claude", counted_tokens=7)
    port = upstreams.servers.serve(claude.app())
    with stuck_port() as stuck:
        config = chain_config(
            [
                endpoint("stuck", f"http://127.0.0.1:{stuck}", provider="anthropic", **CONNECT),
                endpoint("claude", f"http://127.0.0.1:{port}", provider="anthropic"),
            ]
        )
        router = upstreams.router(config)
        client = anthropic.Anthropic(base_url=router.url, api_key="x", max_retries=0)
        counted = client.messages.with_raw_response.count_tokens(model="chat", messages=MESSAGES)
        assert counted.parse().input_tokens == 7
        assert counted.headers["x-modelplane-endpoint"] == "claude"
        assert (
            router.metric("modelplane_upstream_attempts_total", endpoint="stuck", result="connect")
            == 1
        )
        config["models"][0]["endpoints"] = ["stuck"]
        alone = upstreams.router(config)
        with pytest.raises(anthropic.APIStatusError) as caught:
            anthropic.Anthropic(
                base_url=alone.url, api_key="x", max_retries=0
            ).messages.count_tokens(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert f"stuck: {REPORTED}" in str(caught.value)
