"""Every way a request can end leaves exactly one audit record, with the right outcome.

A real sidecar with an audit trail (in-process, over sockets) behind OpenAI stand-ins scripted to
fail; the apps are the official `openai` and `anthropic` SDKs. Covered here: upstream client
error, every endpoint failed, app gone while waiting (non-stream), app gone mid-stream, a stream
broken after its first byte, the Anthropic front door, a malformed body. (Served, refused for
compliance and unknown model: test_audit_trail.py, through `modelplane serve`.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import openai
import pytest
from harness import AuditedRouter, Upstreams, chain_config, endpoint

from modelplane_sidecar.audit import verify_lines
from modelplane_sidecar.standins.openai import Behaviour

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def world(upstreams: Upstreams) -> tuple[Upstreams, Any, Any, AuditedRouter]:
    # Chunks spaced out, so a stream's first bytes reach the app before a scripted failure.
    a, url_a = upstreams.openai("a", chunk_delay=0.02)
    b, url_b = upstreams.openai("b")
    config = chain_config([endpoint("a", url_a), endpoint("b", url_b)])
    config["models"][0]["retry"] = {"maxAttempts": 1}
    return upstreams, a, b, AuditedRouter(upstreams.servers, config)


def test_each_outcome_is_recorded_once(world: tuple[Upstreams, Any, Any, AuditedRouter]) -> None:
    _, a, b, router = world
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)

    a.then(Behaviour("status", 400, message="bad parameter 'temperature'"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=HELLO)
    a.then(Behaviour("status", 500))
    b.then(Behaviour("status", 503))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="chat", messages=HELLO)
    a.then(Behaviour("stream-error", cut_after=2))
    stream = client.chat.completions.create(model="chat", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass
    client_error, exhausted, broken = router.wait_for(3)

    assert (client_error["outcome"], client_error["status"]) == ("client_error", 400)
    assert client_error["error"] == "upstream_client_error"
    assert client_error["endpoint"] == "a"
    assert client_error["attempts"] == [
        {"endpoint": "a", "attempt": 1, "result": "client-error", "status": 400}
    ]
    # The upstream's message may echo the request: never in the record.
    assert b"temperature" not in router.sink.getvalue()

    assert (exhausted["outcome"], exhausted["status"]) == ("exhausted", 502)
    assert exhausted["error"] == "all_endpoints_failed" and exhausted["endpoint"] is None
    assert [x["result"] for x in exhausted["attempts"]] == ["server-error", "server-error"]

    assert (broken["outcome"], broken["status"], broken["endpoint"]) == ("stream_error", 200, "a")
    assert broken["stream"] is True and broken["ttftMs"] > 0

    report = verify_lines(router.sink.getvalue().splitlines())
    assert report.ok and report.records == 3


async def test_an_app_gone_while_waiting_is_recorded_as_499(
    world: tuple[Upstreams, Any, Any, AuditedRouter],
) -> None:
    _, a, _, router = world
    a.default = Behaviour("hang")
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    # The app gives up once the upstream has the request (a fixed client timeout could pass on
    # a loaded machine before the request even reached the router).
    call = asyncio.create_task(client.chat.completions.create(model="chat", messages=HELLO))
    for _ in range(1500):
        if a.received or call.done():
            break
        await asyncio.sleep(0.02)
    assert len(a.received) == 1 and not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(1500):
        if router.records():
            break
        await asyncio.sleep(0.02)
    (record,) = router.records()
    assert (record["outcome"], record["status"], record["endpoint"]) == (
        "client_disconnected",
        499,
        None,
    )
    requests = router.metrics.registry.get_sample_value(
        "modelplane_requests_total",
        {
            "model": "chat",
            "endpoint": "",
            "provider": "",
            "rule": "model:chat",
            "outcome": "client_disconnected",
        },
    )
    assert requests == 1


async def test_an_app_gone_mid_stream_is_recorded_with_its_endpoint(
    upstreams: Upstreams,
) -> None:
    _, url = upstreams.openai("a", chunk_delay=0.2)
    router = AuditedRouter(upstreams.servers, chain_config([endpoint("a", url)]))
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model="chat", messages=HELLO, stream=True)
    async for _ in stream:
        break
    await stream.close()
    for _ in range(1500):
        if router.records():
            break
        await asyncio.sleep(0.02)
    (record,) = router.records()
    assert (record["outcome"], record["endpoint"]) == ("client_disconnected", "a")
    assert record["tokens"] is not None


def test_anthropic_front_door_and_malformed_bodies(
    world: tuple[Upstreams, Any, Any, AuditedRouter],
) -> None:
    _, _, _, router = world
    claude = anthropic.Anthropic(base_url=router.url, api_key="x", max_retries=0)
    claude.messages.create(
        model="chat", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
    )
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(
            model="nope", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=HELLO, extra_body={"stream": "yes"})
    served, unknown, malformed = router.wait_for(3)
    assert (served["api"], served["outcome"], served["endpoint"]) == ("/v1/messages", "ok", "a")
    assert (unknown["api"], unknown["status"], unknown["error"]) == (
        "/v1/messages",
        404,
        "model_not_found",
    )
    assert (malformed["outcome"], malformed["status"]) == ("refused", 400)
    assert malformed["error"] == "invalid_request_error"
    assert malformed["model"] is None and malformed["classification"] is None
    assert all(r["namespace"] == "team-a" and r["serviceAccount"] == "sa" for r in router.records())
