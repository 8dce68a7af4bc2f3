"""Replica pools alone: metric names per engine, the metrics parser, the pick, saturation and
the load snapshot that travels over the config stream."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from modelplane_sidecar.config import Endpoint, Engine, LoadSource, parse_config
from modelplane_sidecar.pool import (
    ENGINE_METRICS,
    LoadReading,
    ReplicaPool,
    apply_load_message,
    load_message,
    reading_from,
)
from modelplane_sidecar.pool.promtext import parse_samples
from modelplane_sidecar.standins.vllm import VLLMStandIn

VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.7
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="llama"} 12.0
vllm:num_requests_waiting_by_reason{reason="capacity"} NaN
"""


def test_vllm_series_are_summed_per_rank_and_the_cache_averaged() -> None:
    samples = parse_samples(VLLM_V1, ENGINE_METRICS[Engine.VLLM].names())
    assert reading_from(Engine.VLLM, samples) == LoadReading(waiting=5.0, running=5.0, kv_cache=0.6)


def test_older_vllm_cache_name_is_read_too() -> None:
    text = (
        "vllm:num_requests_waiting 2\nvllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.25\n"
    )
    samples = parse_samples(text, ENGINE_METRICS[Engine.VLLM].names())
    assert reading_from(Engine.VLLM, samples) == LoadReading(2.0, 1.0, 0.25)


@pytest.mark.parametrize(
    ("engine", "text", "expected"),
    [
        (
            Engine.SGLANG,
            'sglang:num_queue_reqs{model_name="m"} 7\nsglang:num_running_reqs{model_name="m"} 3\n'
            'sglang:token_usage{model_name="m"} 0.9\n',
            LoadReading(7.0, 3.0, 0.9),
        ),
        (Engine.TGI, "tgi_queue_size 4\ntgi_batch_current_size 8\n", LoadReading(4.0, 8.0, None)),
        (
            Engine.LLAMACPP,
            "llamacpp:requests_deferred 2\nllamacpp:requests_processing 1\n",
            LoadReading(2.0, 1.0, None),
        ),
    ],
)
def test_each_engine_has_its_own_names(engine: Engine, text: str, expected: LoadReading) -> None:
    assert reading_from(engine, parse_samples(text, ENGINE_METRICS[engine].names())) == expected


def test_a_page_without_the_engines_metrics_says_nothing() -> None:
    samples = parse_samples(VLLM_V1, ENGINE_METRICS[Engine.TGI].names())
    assert reading_from(Engine.TGI, samples) is None


def test_the_stand_in_speaks_vllm_names() -> None:
    standin = VLLMStandIn("r", extra_waiting=6, legacy_names=True)
    samples = parse_samples(standin.metrics_text(), ENGINE_METRICS[Engine.VLLM].names())
    assert reading_from(Engine.VLLM, samples) == LoadReading(6.0, 0.0, 0.0)


def _endpoint(urls: list[str], ready: list[bool] | None = None, **extra: object) -> Endpoint:
    ready = ready or [True] * len(urls)
    config = parse_config(
        {
            "endpoints": [
                {
                    "name": "llama",
                    "provider": "openai-compatible",
                    "baseUrl": "http://llama.ns.svc:8000/v1",
                    "model": "llama",
                    "engine": "vllm",
                    "replicas": [{"url": u, "ready": r} for u, r in zip(urls, ready, strict=True)],
                    **extra,
                }
            ],
            "models": [{"name": "chat", "endpoints": ["llama"]}],
        }
    )
    return config.endpoints[0]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pool(urls: list[str], ready: list[bool] | None = None) -> tuple[ReplicaPool, Clock]:
    pool = ReplicaPool.build(_endpoint(urls, ready), None)
    assert pool is not None
    clock = Clock()
    pool._clock = clock
    return pool, clock


def test_the_busy_replica_loses_the_power_of_two_choices() -> None:
    pool, clock = _pool(["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"])
    pool.observe("http://a:8000/v1", LoadReading(waiting=8, running=16, kv_cache=0.9), clock.now)
    pool.observe("http://b:8000/v1", LoadReading(waiting=0, running=4, kv_cache=0.2), clock.now)
    pool.observe("http://c:8000/v1", LoadReading(waiting=0, running=5, kv_cache=0.3), clock.now)
    rng = random.Random(7)
    picks = Counter(pool.pick(rng).url for _ in range(3000))
    # Two of three draws include a; it loses every one of them.
    assert picks["http://a:8000/v1"] == 0
    assert picks["http://b:8000/v1"] > picks["http://c:8000/v1"] > 0


def test_outstanding_requests_spread_a_burst_before_the_next_scrape() -> None:
    pool, _ = _pool(["http://a:8000/v1", "http://b:8000/v1"])
    rng = random.Random(1)
    for _ in range(10):
        replica = pool.pick(rng)
        assert replica is not None
        replica.outstanding += 1
    assert sorted(r.outstanding for r in pool.replicas) == [5, 5]


def test_stale_readings_are_ignored_and_not_ready_replicas_never_picked() -> None:
    pool, clock = _pool(["http://a:8000/v1", "http://b:8000/v1"], ready=[True, False])
    pool.observe("http://a:8000/v1", LoadReading(waiting=50, running=1), clock.now)
    clock.now += 11  # past maxAgeSeconds (10)
    assert pool.replicas[0].queue_depth(clock.now, pool.max_age) == 0
    assert {pool.pick(random.Random(i)).url for i in range(50)} == {"http://a:8000/v1"}


def test_failed_replicas_are_avoided_on_retry_and_cool_down_after_refusing() -> None:
    pool, clock = _pool(["http://a:8000/v1", "http://b:8000/v1"])
    rng = random.Random(3)
    assert {pool.pick(rng, {"http://a:8000/v1"}).url for _ in range(20)} == {"http://b:8000/v1"}
    pool.replicas[1].connection_failed(clock.now)
    assert {pool.pick(rng).url for _ in range(20)} == {"http://a:8000/v1"}
    clock.now += 3
    assert len({pool.pick(rng).url for _ in range(50)}) == 2


def test_saturation_is_the_least_loaded_ready_replica() -> None:
    pool, clock = _pool(
        ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"], [True, True, False]
    )
    pool.observe("http://a:8000/v1", LoadReading(waiting=9, running=3), clock.now)
    pool.observe("http://b:8000/v1", LoadReading(waiting=6, running=2), clock.now)
    sat = pool.saturation(latency=2.0)
    assert sat is not None
    assert (sat.queue_depth, sat.predicted_wait, sat.ready, sat.total) == (6, 6.0, 2, 3)
    assert "least-loaded of 2 ready replica(s) has 6 queued, predicted wait 6.0s" in sat.describe()


def test_state_carries_over_to_the_next_config_by_url() -> None:
    pool, _ = _pool(["http://a:8000/v1", "http://b:8000/v1"])
    pool.replicas[0].outstanding = 3
    again = ReplicaPool.build(
        _endpoint(["http://a:8000/v1", "http://c:8000/v1"], [False, True]), pool
    )
    assert again is not None
    assert [(r.url, r.ready, r.outstanding) for r in again.replicas] == [
        ("http://a:8000/v1", False, 3),
        ("http://c:8000/v1", True, 0),
    ]


def test_a_plain_endpoint_has_no_pool_and_an_engine_alone_makes_one_of_its_url() -> None:
    plain = _endpoint(["http://a:8000/v1"]).model_copy(update={"replicas": None, "engine": None})
    assert ReplicaPool.build(plain, None) is None
    single = ReplicaPool.build(plain.model_copy(update={"engine": Engine.LLAMACPP}), None)
    assert single is not None
    assert [r.url for r in single.replicas] == ["http://llama.ns.svc:8000/v1"]
    assert single.scraped_by(LoadSource.SCRAPE)


def test_load_snapshots_round_trip_with_their_age() -> None:
    pool, clock = _pool(["http://a:8000/v1", "http://b:8000/v1"])
    pool.observe("http://a:8000/v1", LoadReading(3, 4, 0.5), clock.now - 1.5)
    message = load_message([pool], now=clock.now)
    assert message == {
        "type": "load",
        "endpoints": {
            "llama": [
                {
                    "url": "http://a:8000/v1",
                    "waiting": 3,
                    "running": 4,
                    "kvCache": 0.5,
                    "ageSeconds": 1.5,
                }
            ]
        },
    }
    other, _ = _pool(["http://a:8000/v1"])
    garbage = {
        "endpoints": {
            "llama": [{"url": 5}, {"url": "http://a:8000/v1", "waiting": "x"}],
            "nope": [],
        }
    }
    assert apply_load_message({"llama": other}, garbage, now=50.0) == 0
    assert apply_load_message({"llama": other}, message, now=50.0) == 1
    replica = other.replicas[0]
    assert (replica.reading, replica.read_at) == (LoadReading(3, 4, 0.5), 48.5)
