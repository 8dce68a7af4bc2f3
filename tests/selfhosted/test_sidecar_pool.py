"""Self-hosted pools end to end through a real sidecar, with the official openai SDK as the app
and vLLM stand-ins (OpenAI API, bounded batch, queue, vLLM-format /metrics) as the replicas:
load-aware replica choice, not-ready replicas, retries that move to another replica, and the
overflow rule (cloud only for non-sensitive requests while the pool is saturated)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import openai
import pytest
from harness import Router, Upstreams

from modelplane_sidecar.pool import replicas
from modelplane_sidecar.standins.vllm import VLLMStandIn

EMAIL_PROMPT = "Summarise the complaint from jane.doe@example.com about her invoice."


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def vllm(upstreams: Upstreams, name: str, **kwargs: Any) -> tuple[VLLMStandIn, str]:
    standin = VLLMStandIn(name, **kwargs)
    port = upstreams.servers.serve(standin.app())
    return standin, f"http://127.0.0.1:{port}/v1"


def pool_config(replicas: list[dict[str, Any]], cloud_url: str, **overflow: Any) -> dict[str, Any]:
    alias: dict[str, Any] = {
        "name": "chat",
        "targets": ["llama"],
        "retry": {"maxAttempts": 2, "backoffBaseSeconds": 0.01, "backoffMaxSeconds": 0.02},
        "circuitBreaker": {"failureThreshold": 100},
    }
    if overflow:
        alias["overflow"] = {"targets": ["cloud"], **overflow}
    return {
        "endpoints": [
            {
                "name": "llama",
                "provider": "openai-compatible",
                "baseUrl": "http://llama.models.svc:8000/v1",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "engine": "vllm",
                "replicas": replicas,
                "loadMetrics": {"scrapeIntervalSeconds": 0.2},
                "tags": ["on-prem"],
            },
            {
                "name": "cloud",
                "provider": "openai",
                "baseUrl": cloud_url,
                "model": "gpt-4o-mini",
                "tags": ["cloud"],
            },
        ],
        "models": [alias],
        "sensitivity": {
            "classes": [
                {"name": "public"},
                {"name": "pii", "allowedTags": ["on-prem", "gdpr"]},
                {"name": "secret", "allowedTags": ["on-prem"]},
            ]
        },
    }


def client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


def ask(router: Router, text: str = "What is a Pod?") -> tuple[str, str]:
    """(endpoint header, reply text) for one chat request."""
    raw = client(router).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": text}]
    )
    reply = raw.parse()
    return raw.headers["x-modelplane-endpoint"], reply.choices[0].message.content or ""


def scraped(router: Router, url: str, waiting: float) -> bool:
    snapshot = router.holder.snapshot
    assert snapshot is not None
    reading = snapshot.pools()["llama"].by_url[url].reading
    return reading is not None and reading.waiting == waiting


def test_the_replica_with_a_queue_gets_less_and_not_ready_replicas_get_nothing(
    upstreams: Upstreams,
) -> None:
    busy, busy_url = vllm(upstreams, "busy", extra_waiting=20)
    idle, idle_url = vllm(upstreams, "idle")
    unready, unready_url = vllm(upstreams, "unready")
    _, cloud_url = upstreams.openai("cloud")
    router = upstreams.router(
        pool_config(
            [{"url": busy_url}, {"url": idle_url}, {"url": unready_url, "ready": False}], cloud_url
        )
    )
    wait_until(lambda: scraped(router, busy_url, 20) and scraped(router, idle_url, 0), "scrapes")
    assert unready.scrapes == 0  # not-ready replicas are not even scraped

    for _ in range(30):
        endpoint, text = ask(router)
        assert endpoint == "llama"
        assert "[idle]" in text
    assert (busy.served, idle.served, unready.served) == (0, 30, 0)

    # The queue moves to the other replica: so does the traffic, after the next scrape.
    busy.extra_waiting, idle.extra_waiting = 0, 20
    wait_until(lambda: scraped(router, busy_url, 0) and scraped(router, idle_url, 20), "rescrape")
    for _ in range(10):
        assert "[busy]" in ask(router)[1]
    assert idle.served == 30


def test_a_replica_that_refuses_connections_is_retried_elsewhere(
    upstreams: Upstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cool-down that outlasts the test: on a loaded machine twelve requests can take longer
    # than the real 2 s, and the dead replica would be tried (and cost an attempt) again.
    monkeypatch.setattr(replicas, "COOL_DOWN_SECONDS", 600.0)
    good, good_url = vllm(upstreams, "good")
    _, cloud_url = upstreams.openai("cloud")
    dead_url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    router = upstreams.router(pool_config([{"url": dead_url}, {"url": good_url}], cloud_url))
    attempts = Counter()
    for _ in range(12):
        raw = client(router).chat.completions.with_raw_response.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-modelplane-endpoint"] == "llama"
        attempts[raw.headers["x-modelplane-attempts"]] += 1
    assert good.served == 12
    # The dead replica cost at most one extra attempt, and only until its cool-down started.
    assert attempts["1"] >= 11
    assert set(attempts) <= {"1", "2"}


@pytest.fixture
def saturated(upstreams: Upstreams) -> tuple[Router, VLLMStandIn, VLLMStandIn, Any]:
    a, a_url = vllm(upstreams, "a", extra_waiting=10)
    b, b_url = vllm(upstreams, "b", extra_waiting=12)
    cloud, cloud_url = upstreams.openai("cloud")
    router = upstreams.router(
        pool_config(
            [{"url": a_url}, {"url": b_url}],
            cloud_url,
            maxQueueDepth=4,
            sensitiveWaitSeconds=0.5,
        )
    )
    wait_until(lambda: scraped(router, a_url, 10) and scraped(router, b_url, 12), "scrapes")
    return router, a, b, cloud


def test_overflow_sends_only_non_sensitive_requests_to_cloud_while_saturated(
    saturated: tuple[Router, VLLMStandIn, VLLMStandIn, Any],
) -> None:
    router, a, b, cloud = saturated

    endpoint, text = ask(router)
    assert (endpoint, "[cloud]" in text) == ("cloud", True)

    with pytest.raises(openai.InternalServerError) as refused:
        ask(router, EMAIL_PROMPT)
    error = refused.value
    assert error.status_code == 503
    assert error.response.headers["x-modelplane-rule"] == "model:chat"
    body = error.response.json()["error"]
    assert body["code"] == "self_hosted_saturated"
    assert body["message"].startswith(
        "Rule 'model:chat' keeps requests of data class 'pii' on its self-hosted endpoints "
        "(overflow never spills them), and they stayed saturated for 0.5s: llama: "
        "least-loaded of 2 ready replica(s) has 10 queued"
    )
    assert all("jane.doe" not in str(r.body) for r in cloud.received)
    assert a.served == b.served == 0
    overflow = "modelplane_overflow_decisions_total"
    assert router.metric(overflow, rule="model:chat", outcome="spilled") == 1
    assert router.metric(overflow, rule="model:chat", outcome="held") == 1
    assert router.metric(overflow, rule="model:chat", outcome="refused") == 1
    assert router.metric("modelplane_endpoint_replicas", endpoint="llama", state="ready") == 2
    assert router.metric("modelplane_endpoint_queue_depth", endpoint="llama") == 10

    # Capacity back: everything stays on the pool, the cloud sees nothing more.
    a.extra_waiting = b.extra_waiting = 0
    wait_until(lambda: a.scrapes > 3 and b.scrapes > 3 and ask(router)[0] == "llama", "capacity")
    before = len(cloud.received)
    for _ in range(5):
        assert ask(router)[0] == "llama"
    assert ask(router, EMAIL_PROMPT)[0] == "llama"
    assert len(cloud.received) == before


def test_a_held_sensitive_request_is_served_by_the_pool_once_it_has_capacity(
    upstreams: Upstreams,
) -> None:
    a, a_url = vllm(upstreams, "a", extra_waiting=10)
    cloud, cloud_url = upstreams.openai("cloud")
    router = upstreams.router(
        pool_config([{"url": a_url}], cloud_url, maxQueueDepth=4, sensitiveWaitSeconds=20)
    )
    wait_until(lambda: scraped(router, a_url, 10), "scrape")
    result: dict[str, Any] = {}

    def sensitive() -> None:
        result["answer"] = ask(router, EMAIL_PROMPT)

    worker = threading.Thread(target=sensitive)
    worker.start()
    held = "modelplane_overflow_decisions_total"
    wait_until(lambda: router.metric(held, rule="model:chat", outcome="held") == 1, "the hold")
    assert "answer" not in result  # held: the pool is still saturated
    a.extra_waiting = 0
    worker.join(20)
    assert result["answer"][0] == "llama"
    assert cloud.received == []


def test_explain_shows_the_overflow_step(
    saturated: tuple[Router, VLLMStandIn, VLLMStandIn, Any],
) -> None:
    router = saturated[0]
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(
        router.url + "/v1/modelplane/explain", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        trace = json.loads(resp.read())
    assert trace["candidates"] == ["cloud", "llama"]
    assert trace["overflow"].startswith("saturated (llama: least-loaded of 2 ready replica(s)")
    assert trace["overflow"].endswith("spilled to cloud")
