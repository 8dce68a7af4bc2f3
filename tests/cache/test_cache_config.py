"""Config of the cache and the lanes: defaults that change nothing, and precise errors."""

from __future__ import annotations

from typing import Any

import pytest
from harness import chain_config, endpoint

from modelplane_sidecar.config import ConfigError, parse_config


def _parse(**top: Any) -> Any:
    raw = chain_config([endpoint("a", "http://127.0.0.1:9/v1")])
    raw.update(top)
    return parse_config(raw)


def test_defaults_cache_nothing_and_limit_only_the_batch_lane() -> None:
    config = _parse()
    assert not config.models[0].cache.enabled and config.cache.redis is None
    assert config.lanes.realtime.max_concurrency is None
    assert config.lanes.batch.max_concurrency == 4 and config.lanes.batch.endpoint_share == 0.5


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"cache": {"redis": {"url": "http://cache:6379"}}}, "redis url must look like"),
        ({"cache": {"redis": {"url": "redis://:hunter2@cache:6379/0"}}}, "not hold a password"),
        ({"cache": {"maxBytes": 10}}, "cache.maxBytes"),
        ({"cache": {"redis": {"url": "redis://c", "password": {"env": "NOPE_X"}}}}, "NOPE_X"),
        ({"lanes": {"batch": {"endpointShare": 0}}}, "lanes.batch.endpointShare"),
        ({"lanes": {"realtime": {"maxQueue": -1}}}, "lanes.realtime.maxQueue"),
    ],
)
def test_invalid_settings_name_the_field(top: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse(**top)


def test_a_redis_password_never_shows_and_changes_the_version() -> None:
    one = _parse(cache={"redis": {"url": "redis://c:6379", "password": {"value": "s3cret-1"}}})
    two = _parse(cache={"redis": {"url": "redis://c:6379", "password": {"value": "s3cret-2"}}})
    assert "s3cret" not in repr(one) and one.version() != two.version()


def test_rule_cache_and_lane_are_validated() -> None:
    raw = chain_config([endpoint("a", "http://127.0.0.1:9/v1")])
    raw["rules"] = [{"name": "r", "targets": ["a"], "lane": "bulk", "cache": {"ttlSeconds": 0}}]
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert "rules.0.cache.ttlSeconds" in str(caught.value)
    assert "rules.0.lane" in str(caught.value)
