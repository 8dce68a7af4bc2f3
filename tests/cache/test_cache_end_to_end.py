"""The response cache through a real sidecar, with the official SDKs as apps.

Upstreams are OpenAI stand-ins; every answer has a fresh `id`, so an answer that carries the id
of an earlier one came from the cache.
"""

from __future__ import annotations

import time
from typing import Any

import anthropic
import openai
import orjson
import pytest
from harness import (
    AuditedRouter,
    HttpReply,
    Router,
    Upstreams,
    chain_config,
    endpoint,
    http,
)

from modelplane_sidecar.config import parse_config
from modelplane_sidecar.standins.openai import Behaviour

QUESTION = [{"role": "user", "content": "What is the boiling point of water at sea level?"}]


def config(url: str, **cache: Any) -> dict[str, Any]:
    raw = chain_config([endpoint("a", url)], retry={"maxAttempts": 1})
    raw["metadata"] = {"name": "team", "namespace": "team-a"}
    raw["models"][0]["cache"] = {"enabled": True, **cache}
    return raw


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0)


def ask(router: Router, **kwargs: Any) -> tuple[str, Any]:
    """(x-modelplane-cache header, parsed completion)."""
    params: dict[str, Any] = {"model": "chat", "messages": QUESTION, "temperature": 0, **kwargs}
    raw = client(router).chat.completions.with_raw_response.create(**params)
    return raw.headers.get("x-modelplane-cache", ""), raw.parse()


class Clock:
    """The cache's clock, moved by the test (TTLs then hold however slow the machine is)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def clocked(router: Router) -> Clock:
    clock = Clock()
    router.sidecar.cache._clock = clock
    return clock


def post(router: Router, body: dict[str, Any], **headers: str) -> HttpReply:
    return http(
        "POST",
        router.url + "/v1/chat/completions",
        orjson.dumps(body),
        **{"content-type": "application/json", **headers},
    )


def test_identical_request_is_answered_from_the_cache(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url))
    state, first = ask(router)
    assert state == "miss"
    state, second = ask(router)
    assert state == "hit"
    assert second.id == first.id and second.choices[0].message.content == "[a] " + standin.reply
    assert len(standin.received) == 1
    # The same question with its fields in another order and defaults spelt out.
    reply = post(router, {"top_p": 1, "temperature": 0.0, "messages": QUESTION, "model": "chat"})
    assert reply.headers["x-modelplane-cache"] == "hit" and reply.json()["id"] == first.id
    assert reply.headers["x-modelplane-endpoint"] == "a"
    assert int(reply.headers["x-modelplane-cache-age"]) >= 0
    assert len(standin.received) == 1
    assert router.metric("modelplane_cache_hits_total", model="chat") == 2
    assert router.metric("modelplane_cache_misses_total", model="chat") == 1
    assert router.metric("modelplane_cache_stores_total", model="chat") == 1
    assert router.metric("modelplane_requests_total", outcome="cache_hit") == 2
    assert router.metric("modelplane_cache_entries") == 1
    assert router.metric("modelplane_cache_bytes") > 0


def test_streaming_request_is_served_as_a_replayed_stream(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url))
    _, first = ask(router)
    raw = client(router).chat.completions.with_raw_response.create(
        model="chat",
        messages=QUESTION,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-modelplane-cache"] == "hit"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert {c.id for c in chunks} == {first.id}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None and usage.total_tokens == first.usage.total_tokens
    assert len(standin.received) == 1


def test_a_streamed_answer_fills_the_cache(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url))
    with client(router).chat.completions.create(
        model="chat", messages=QUESTION, temperature=0, stream=True
    ) as stream:
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # The SDK stops reading at [DONE]; the sidecar stores the answer once the stream has ended
    # there, which on a loaded machine can be after the app's next request arrived (that one
    # would then wait for the stream as `coalesced`): wait (bounded) for the store.
    for _ in range(6000):
        if router.metric("modelplane_cache_stores_total") == 1:
            break
        time.sleep(0.01)
    state, answer = ask(router)
    assert state == "hit"
    assert answer.choices[0].message.content == text
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert len(standin.received) == 1


def test_only_deterministic_requests_are_cached_unless_allowed(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url))
    assert ask(router, temperature=0.7)[0] == "bypass"
    assert ask(router, temperature=0.7)[0] == "bypass"
    assert len(standin.received) == 2
    allow = {"extra_headers": {"x-modelplane-cache-control": "allow"}}
    assert ask(router, temperature=0.7, **allow)[0] == "miss"
    assert ask(router, temperature=0.7, **allow)[0] == "hit"
    assert len(standin.received) == 3
    assert (
        router.metric("modelplane_cache_bypassed_total", model="chat", reason="not-deterministic")
        == 2
    )

    loose, loose_url = upstreams.openai("b")
    open_router = upstreams.router(config(loose_url, deterministicOnly=False))
    assert ask(open_router, temperature=1.2)[0] == "miss"
    assert ask(open_router, temperature=1.2)[0] == "hit"
    assert len(loose.received) == 1


def test_sensitive_requests_are_never_cached(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url, deterministicOnly=False))
    personal = [{"role": "user", "content": "Write to jane.doe@example.com about the invoice."}]
    for _ in range(2):
        assert ask(router, messages=personal)[0] == "bypass"
    declared = {"extra_headers": {"x-modelplane-data-class": "pii"}}
    for _ in range(2):
        assert ask(router, **declared)[0] == "bypass"
    assert len(standin.received) == 4
    assert router.metric("modelplane_cache_stores_total") == 0
    assert router.metric("modelplane_cache_entries") == 0
    assert router.metric("modelplane_cache_bypassed_total", reason="sensitive") == 4


def test_entries_expire_after_their_ttl(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url, ttlSeconds=30))
    clock = clocked(router)
    assert ask(router)[0] == "miss"
    clock.now += 29
    assert ask(router)[0] == "hit"
    clock.now += 2
    assert ask(router)[0] == "miss"
    assert len(standin.received) == 2


def test_cache_control_header(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url))
    _, first = ask(router)
    state, refreshed = ask(router, extra_headers={"x-modelplane-cache-control": "no-cache"})
    assert state == "miss" and refreshed.id != first.id
    state, again = ask(router)
    assert state == "hit" and again.id == refreshed.id
    assert ask(router, extra_headers={"x-modelplane-cache-control": "no-store"})[0] == "bypass"
    assert len(standin.received) == 3
    reply = post(
        router,
        {"model": "chat", "messages": QUESTION, "temperature": 0},
        **{"x-modelplane-cache-control": "forever"},
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "x-modelplane-cache-control"
    assert "forever" in reply.json()["error"]["message"]


def test_another_tenant_or_policy_never_gets_the_entry(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    raw = config(url)
    router = upstreams.router(raw)
    _, first = ask(router)
    other_tenant = {**raw, "metadata": {"name": "team", "namespace": "team-b"}}
    router.holder.apply(parse_config(other_tenant), "test")
    state, answer = ask(router)
    assert state == "miss" and answer.id != first.id
    # Back to the first tenant, same policy: its entry is still there.
    router.holder.apply(parse_config(raw), "test")
    assert ask(router)[1].id == first.id
    # A changed route is a new policy version.
    changed = config(url)
    changed["endpoints"][0]["model"] = "another-upstream-model"
    router.holder.apply(parse_config(changed), "test")
    assert ask(router)[0] == "miss"
    assert len(standin.received) == 3


def test_rule_policy_overrides_the_alias_and_routes_without_cache_say_nothing(
    upstreams: Upstreams,
) -> None:
    standin, url = upstreams.openai("a")
    raw = config(url)
    raw["rules"] = [
        {
            "name": "fresh-news",
            "match": {"headers": {"x-task": ["news"]}},
            "targets": ["a"],
            "cache": {"enabled": False},
        }
    ]
    router = upstreams.router(raw)
    news = {"extra_headers": {"x-task": "news"}}
    assert ask(router, **news)[0] == ""
    assert ask(router, **news)[0] == ""
    assert len(standin.received) == 2

    _, plain_url = upstreams.openai("b")
    no_cache = upstreams.router(chain_config([endpoint("b", plain_url)]))
    assert ask(no_cache)[0] == ""
    assert no_cache.metric("modelplane_cache_misses_total") == 0


def test_stale_answer_when_every_endpoint_fails_only_where_allowed(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url, ttlSeconds=0.2, staleOnError=True))
    _, first = ask(router)
    time.sleep(0.3)
    standin.default = Behaviour("status", 500)
    raw = client(router).chat.completions.with_raw_response.create(
        model="chat", messages=QUESTION, temperature=0
    )
    assert raw.headers["x-modelplane-cache"] == "stale"
    assert raw.headers["x-modelplane-attempts"] == "1"
    assert raw.parse().id == first.id
    assert router.metric("modelplane_cache_stale_served_total", model="chat") == 1
    assert router.metric("modelplane_requests_total", outcome="cache_stale") == 1

    strict, strict_url = upstreams.openai("b")
    no_stale = upstreams.router(config(strict_url, ttlSeconds=0.2))
    ask(no_stale)
    time.sleep(0.3)
    strict.default = Behaviour("status", 500)
    with pytest.raises(openai.InternalServerError) as caught:
        ask(no_stale)
    assert caught.value.status_code == 502


def test_stale_answer_while_every_breaker_is_open(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    raw = config(url, ttlSeconds=0.2, staleOnError=True)
    raw["models"][0]["circuitBreaker"] = {"failureThreshold": 1, "openSeconds": 60}
    router = upstreams.router(raw)
    _, first = ask(router)
    time.sleep(0.3)
    standin.default = Behaviour("status", 500)
    assert ask(router)[0] == "stale"  # the failure opens the breaker
    calls = len(standin.received)
    state, answer = ask(router, stream=False)
    assert state == "stale" and answer.id == first.id
    assert len(standin.received) == calls  # nothing could be tried
    # A request nothing was cached for still gets the router's own refusal.
    with pytest.raises(openai.APIStatusError) as caught:
        ask(router, messages=[{"role": "user", "content": "Something never asked before?"}])
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "no_endpoint_available"  # type: ignore[index]


def test_anthropic_front_door_is_served_from_the_same_cache(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url))
    # This SDK has no temperature: the app opts in by header.
    app = anthropic.Anthropic(
        base_url=router.url,
        api_key="x",
        max_retries=0,
        default_headers={"x-modelplane-cache-control": "allow"},
    )
    answers = []
    for _ in range(2):
        raw = app.messages.with_raw_response.create(model="chat", max_tokens=100, messages=QUESTION)
        answers.append((raw.headers["x-modelplane-cache"], raw.parse()))
    assert [state for state, _ in answers] == ["miss", "hit"]
    assert answers[1][1].content[0].text == answers[0][1].content[0].text  # type: ignore[union-attr]
    with app.messages.stream(model="chat", max_tokens=100, messages=QUESTION) as stream:
        assert stream.get_final_text() == "[a] " + standin.reply
    assert len(standin.received) == 1


def test_a_hit_leaves_an_audit_record_with_no_cost(upstreams: Upstreams) -> None:
    standin, url = upstreams.openai("a")
    raw = config(url)
    raw["endpoints"][0]["pricing"] = {"inputPerMtok": 5, "outputPerMtok": 15}
    router = AuditedRouter(upstreams.servers, raw)
    ask(router)
    ask(router)
    records = router.wait_for(2)
    assert [r["outcome"] for r in records] == ["ok", "cache_hit"]
    served, hit = records
    assert served["costUsd"] > 0
    assert hit["costUsd"] == 0 and hit["endpoint"] is None and hit["tokens"] is None
    assert hit["rule"] == "model:chat" and hit["status"] == 200
    assert len(standin.received) == 1
