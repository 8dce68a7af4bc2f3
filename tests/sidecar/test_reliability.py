"""Retries, fallback, circuit breaking, stream failover and cancellation, end to end over sockets.

Upstreams are OpenAI stand-ins scripted to fail the ways real providers do; the app side is the
official `openai` SDK.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import openai
import pytest
from harness import Upstreams, chain_config, endpoint, http

from modelplane_sidecar.standins.openai import Behaviour

MESSAGES = [{"role": "user", "content": "hello"}]


def _client(url: str, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def test_fallback_follows_chain_order(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    b, url_b = upstreams.openai("b")
    c, url_c = upstreams.openai("c")
    a.then(Behaviour("status", 500), Behaviour("status", 500))
    b.then(Behaviour("status", 503), Behaviour("status", 503))
    router = upstreams.router(
        chain_config([endpoint("a", url_a), endpoint("b", url_b), endpoint("c", url_c)])
    )
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    assert raw.headers["x-modelplane-endpoint"] == "c"
    assert raw.headers["x-modelplane-attempts"] == "5"
    assert raw.headers["x-modelplane-fallbacks"] == "2"
    assert (len(a.received), len(b.received), len(c.received)) == (2, 2, 1)
    assert router.metric("modelplane_fallbacks_total", model="chat", from_endpoint="a") == 1
    assert router.metric("modelplane_retries_total", endpoint="a") == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_pass_through_unchanged_without_retry(
    upstreams: Upstreams, status: int
) -> None:
    a, url_a = upstreams.openai("a")
    b, url_b = upstreams.openai("b")
    a.then(Behaviour("status", status, message=f"upstream says {status}", code="some_code"))
    router = upstreams.router(chain_config([endpoint("a", url_a), endpoint("b", url_b)]))
    with pytest.raises(openai.APIStatusError) as caught:
        _client(router.url).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == status
    assert caught.value.body == {
        "message": f"upstream says {status}",
        "type": "invalid_request_error",
        "param": None,
        "code": "some_code",
    }
    assert caught.value.response.headers["x-modelplane-endpoint"] == "a"
    assert (len(a.received), len(b.received)) == (1, 0)


def test_rate_limit_honours_short_retry_after(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    b, url_b = upstreams.openai("b")
    a.then(Behaviour("status", 429, retry_after="0.3"))
    router = upstreams.router(chain_config([endpoint("a", url_a), endpoint("b", url_b)]))
    started = time.monotonic()
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    waited = time.monotonic() - started
    assert raw.headers["x-modelplane-endpoint"] == "a"
    assert raw.headers["x-modelplane-attempts"] == "2"
    assert len(b.received) == 0
    # Not a speed check: the retry must not come before the upstream allowed it.
    assert waited >= 0.3


def test_rate_limit_with_long_retry_after_falls_back_at_once(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    _b, url_b = upstreams.openai("b")
    a.then(Behaviour("status", 429, retry_after="120"))
    router = upstreams.router(chain_config([endpoint("a", url_a), endpoint("b", url_b)]))
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    assert raw.headers["x-modelplane-endpoint"] == "b"
    assert len(a.received) == 1
    assert len(_b.received) == 1


def test_retry_only_on_configured_classes(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    _b, url_b = upstreams.openai("b")
    a.then(Behaviour("status", 500))
    config = chain_config([endpoint("a", url_a), endpoint("b", url_b)])
    config["models"][0]["retry"] = {"maxAttempts": 3, "retryOn": ["connect", "timeout"]}
    router = upstreams.router(config)
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    assert raw.headers["x-modelplane-endpoint"] == "b"
    assert len(a.received) == 1, "a 500 must not be retried when server-error is not retriable"


def test_hang_past_attempt_timeout_then_fallback(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    _b, url_b = upstreams.openai("b")
    a.default = Behaviour("hang")
    # The attempt timeout also bounds b's answer: a second, so a loaded machine does not time
    # out the healthy endpoint too.
    router = upstreams.router(
        chain_config(
            [endpoint("a", url_a), endpoint("b", url_b)],
            retry={"maxAttempts": 1},
            timeout={"attemptSeconds": 1.0, "totalSeconds": 10},
        )
    )
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    assert raw.headers["x-modelplane-endpoint"] == "b"
    assert router.metric("modelplane_upstream_attempts_total", endpoint="a", result="timeout") == 1


def test_connection_reset_is_retried(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    a.then(Behaviour("reset"))
    router = upstreams.router(chain_config([endpoint("a", url_a)]))
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )
    assert raw.headers["x-modelplane-attempts"] == "2"
    assert router.metric("modelplane_upstream_attempts_total", endpoint="a", result="connect") == 1


def test_all_failed_lists_every_attempt(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    a.default = Behaviour("status", 502)
    dead = "http://127.0.0.1:9/v1"  # discard port: nothing listens, connect is refused
    router = upstreams.router(chain_config([endpoint("a", url_a), endpoint("dead", dead)]))
    with pytest.raises(openai.APIStatusError) as caught:
        _client(router.url).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "all_endpoints_failed"
    assert "after 4 attempt(s)" in error["message"]
    assert "a attempt 1: upstream answered HTTP 502" in error["message"]
    assert "dead attempt 2: cannot connect to 127.0.0.1:9" in error["message"]
    assert [(r["endpoint"], r["attempt"]) for r in error["attempts"]] == [
        ("a", 1),
        ("a", 2),
        ("dead", 1),
        ("dead", 2),
    ]


def test_only_rate_limits_give_503(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    a.default = Behaviour("status", 429, retry_after="60")
    router = upstreams.router(chain_config([endpoint("a", url_a)]))
    with pytest.raises(openai.APIStatusError) as caught:
        _client(router.url).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503


def test_breaker_opens_skips_and_recovers_through_a_probe(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    _b, url_b = upstreams.openai("b")
    a.default = Behaviour("status", 500)
    router = upstreams.router(
        chain_config(
            [endpoint("a", url_a), endpoint("b", url_b)],
            retry={"maxAttempts": 1},
            # Long enough that the request below surely finds the breaker still open.
            circuitBreaker={"failureThreshold": 2, "openSeconds": 2},
        )
    )
    client = _client(router.url)
    for _ in range(2):
        client.chat.completions.create(model="chat", messages=MESSAGES)
    assert len(a.received) == 2
    assert router.metric("modelplane_circuit_breaker_open", endpoint="a") == 1

    # Open: `a` is skipped without being contacted at all.
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert raw.headers["x-modelplane-endpoint"] == "b"
    assert raw.headers["x-modelplane-attempts"] == "1"
    assert len(a.received) == 2

    # After openSeconds one probe goes through; it succeeds and the breaker closes.
    a.default = Behaviour()
    time.sleep(2.1)
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert raw.headers["x-modelplane-endpoint"] == "a"
    assert router.metric("modelplane_circuit_breaker_open", endpoint="a") == 0
    raw = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    assert raw.headers["x-modelplane-endpoint"] == "a"


def test_all_breakers_open_is_503_without_any_attempt(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    a.default = Behaviour("status", 500)
    router = upstreams.router(
        chain_config(
            [endpoint("a", url_a)],
            retry={"maxAttempts": 1},
            circuitBreaker={"failureThreshold": 1, "openSeconds": 60},
        )
    )
    client = _client(router.url)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="chat", messages=MESSAGES)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "no_endpoint_available"
    assert "circuit breaker open" in caught.value.body["message"]
    assert len(a.received) == 1


@pytest.mark.parametrize("failure", ["reset", "status", "hang"])
def test_stream_fails_over_before_first_byte(upstreams: Upstreams, failure: str) -> None:
    a, url_a = upstreams.openai("a")
    _b, url_b = upstreams.openai("b")
    a.default = Behaviour(failure, 503)
    router = upstreams.router(
        chain_config(
            [endpoint("a", url_a), endpoint("b", url_b)],
            retry={"maxAttempts": 1},
            # Also b's time to first byte: a second, for a loaded machine.
            timeout={"attemptSeconds": 1.0},
        )
    )
    raw = _client(router.url).chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES, stream=True
    )
    assert raw.headers["x-modelplane-endpoint"] == "b"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text.startswith("[b]")


@pytest.mark.parametrize("kind", ["cut", "stream-error"])
def test_mid_stream_failure_ends_with_error_event_and_no_failover(
    upstreams: Upstreams, kind: str
) -> None:
    # Chunks spaced out so the first ones really reach the app before the failure.
    a, url_a = upstreams.openai("a", chunk_delay=0.05)
    b, url_b = upstreams.openai("b")
    a.then(Behaviour(kind, cut_after=3))
    router = upstreams.router(chain_config([endpoint("a", url_a), endpoint("b", url_b)]))
    stream = _client(router.url).chat.completions.create(
        model="chat", messages=MESSAGES, stream=True
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert len(received) == 3, "the chunks before the failure reach the app"
    assert "failed after it started" in caught.value.message
    assert "incomplete" in caught.value.message
    assert len(b.received) == 0, "no failover once bytes reached the app"
    result = "connect" if kind == "cut" else "server-error"
    assert router.metric("modelplane_stream_failures_total", endpoint="a", reason=result) == 1


async def _eventually(check: Callable[[], object], seconds: float = 30) -> None:
    """Wait (bounded) until `check` holds; the caller asserts it afterwards."""
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)


async def test_client_disconnect_cancels_upstream(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a")
    a.default = Behaviour("hang")
    router = upstreams.router(chain_config([endpoint("a", url_a)]))
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    # The app gives up once the upstream has the request (not after a fixed time, which a slow
    # machine could spend before the request even got there).
    call = asyncio.create_task(client.chat.completions.create(model="chat", messages=MESSAGES))
    await _eventually(lambda: a.received or call.done())
    assert len(a.received) == 1 and not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _eventually(lambda: a.cancelled)
    assert a.cancelled == 1, "the upstream call must be cancelled when the app goes away"


async def test_client_disconnect_mid_stream_cancels_upstream(upstreams: Upstreams) -> None:
    a, url_a = upstreams.openai("a", chunk_delay=0.2)
    router = upstreams.router(chain_config([endpoint("a", url_a)]))
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.close()
    disconnects = "modelplane_client_disconnects_total"
    await _eventually(lambda: a.cancelled and router.metric(disconnects, model="chat"))
    assert a.cancelled == 1
    assert router.metric(disconnects, model="chat") == 1


def test_api_keys_never_leak_into_error_bodies_or_logs(
    upstreams: Upstreams, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-live-very-secret-key-1234567890"
    a, url_a = upstreams.openai("a")
    a.then(Behaviour("status", 401, message=f"Incorrect API key provided: {secret}."))
    router = upstreams.router(chain_config([endpoint("a", url_a, apiKey={"value": secret})]))
    reply = http(
        "POST",
        router.url + "/v1/chat/completions",
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}]}',
    )
    assert reply.status_code == 401
    assert secret not in reply.text
    assert "[REDACTED]" in reply.text
    assert secret not in caplog.text
    assert secret not in repr(router.holder.snapshot)
