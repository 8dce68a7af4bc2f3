"""The shared Redis backend against a real `redis-server`: replicas share hits, tenants do not,
and an outage (the server killed, or frozen) degrades to the local cache without failing a
request."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import openai
from harness import Router, Upstreams, chain_config, endpoint
from redis_support import RedisServer

from modelplane_sidecar.cache.redis_store import RedisStore
from modelplane_sidecar.cache.store import CachedResponse
from modelplane_sidecar.config import RedisCache

QUESTION = [{"role": "user", "content": "Name the largest planet of the solar system."}]


def config(
    url: str, redis_url: str, namespace: str = "team-a", timeout: float = 5.0
) -> dict[str, Any]:
    """A cached alias on a Redis backend. The timeout is generous unless a test wants it to
    fire: a loaded machine can take more than the production default for a Redis round trip,
    and a timed-out read or write turns an expected hit into a miss."""
    raw = chain_config([endpoint("a", url)], retry={"maxAttempts": 1})
    raw["metadata"] = {"name": "team", "namespace": namespace}
    raw["models"][0]["cache"] = {"enabled": True}
    raw["cache"] = {
        "redis": {"url": redis_url, "timeoutSeconds": timeout, "retrySeconds": 0.3},
    }
    return raw


def ask(router: Router, question: list[dict[str, str]] = QUESTION) -> tuple[str, str]:
    """(x-modelplane-cache, answer id)."""
    app = openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0, timeout=10)
    raw = app.chat.completions.with_raw_response.create(
        model="chat", messages=question, temperature=0
    )
    return raw.headers.get("x-modelplane-cache", ""), raw.parse().id


def drain(router: Router) -> None:
    """Wait until the router's background Redis writes are done."""
    redis = router.sidecar.cache.redis
    assert redis is not None
    router.servers.run(redis.drain())


def test_replicas_share_hits_and_tenants_do_not(
    upstreams: Upstreams, redis_server: RedisServer
) -> None:
    standin, url = upstreams.openai("a")
    replica_1 = upstreams.router(config(url, redis_server.url))
    replica_2 = upstreams.router(config(url, redis_server.url))
    other_tenant = upstreams.router(config(url, redis_server.url, namespace="team-b"))

    state, first = ask(replica_1)
    assert state == "miss"
    drain(replica_1)
    assert ask(replica_2) == ("hit", first)
    assert len(standin.received) == 1
    keys = redis_server.command("KEYS", "modelplane:cache:*")
    assert b"modelplane:cache:ns:team-a:" in keys

    state, theirs = ask(other_tenant)
    assert state == "miss" and theirs != first
    assert len(standin.received) == 2


def test_redis_killed_degrades_to_the_local_cache_and_recovers(
    upstreams: Upstreams, redis_server: RedisServer
) -> None:
    _, url = upstreams.openai("a")
    router = upstreams.router(config(url, redis_server.url))
    _, first = ask(router)
    drain(router)

    redis_server.kill()
    # Hits keep coming from the local store; new questions go upstream; nothing fails.
    assert ask(router) == ("hit", first)
    other = [{"role": "user", "content": "And the smallest?"}]
    assert ask(router, other)[0] == "miss"
    assert ask(router, other)[0] == "hit"
    assert router.metric("modelplane_cache_backend_errors_total", backend="redis") >= 1
    assert router.metric("modelplane_cache_backend_up", backend="redis") == 0

    redis_server.start()
    time.sleep(0.4)  # past retrySeconds: the breaker lets Redis be asked again
    third = [{"role": "user", "content": "And the hottest?"}]
    assert ask(router, third)[0] == "miss"
    drain(router)
    assert router.metric("modelplane_cache_backend_up", backend="redis") == 1
    fresh = upstreams.router(config(url, redis_server.url))
    assert ask(fresh, third)[0] == "hit"


def test_a_frozen_redis_times_out_instead_of_holding_requests(
    upstreams: Upstreams, redis_server: RedisServer
) -> None:
    standin, url = upstreams.openai("a")
    router = upstreams.router(config(url, redis_server.url, timeout=0.2))
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        assert ask(router)[0] == "miss"
        assert ask(router)[0] == "hit"
        assert router.metric("modelplane_cache_backend_errors_total", backend="redis") >= 1
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    assert len(standin.received) == 1


async def test_a_value_of_another_tenant_under_a_key_is_ignored(
    redis_server: RedisServer,
) -> None:
    # A generous timeout: the default 0.1 s can pass on a loaded machine, and a read that timed
    # out also comes back None.
    store = RedisStore(RedisCache.model_validate({"url": redis_server.url, "timeoutSeconds": 5}))
    try:
        now = time.time()
        foreign = CachedResponse(b"{}", "a", "ns:team-b", now, now + 60, now + 60)
        redis_server.command("SET", "modelplane:cache:ns:team-a:k", foreign.encode().decode())
        assert await store.get("ns:team-a", "k") is None
        own = CachedResponse(b'{"ok": 1}', "a", "ns:team-a", now, now + 60, now + 60)
        store.put("k", own)
        await store.drain()
        assert await store.get("ns:team-a", "k") == own
    finally:
        await store.close()
