"""The routing part of RouterConfig: defaults keep old configs working, mistakes are named."""

from __future__ import annotations

from typing import Any

import pytest
from routing_helpers import config, ep

from modelplane_sidecar.config import ConfigError, Detector, Strategy, parse_config


def test_a_config_with_only_models_still_loads_with_routing_defaults() -> None:
    loaded = parse_config(
        {"endpoints": [ep("a")], "models": [{"name": "chat", "endpoints": ["a"]}]}, "old"
    )
    assert loaded.rules == ()
    assert loaded.models[0].strategy is Strategy.PRIORITY
    assert loaded.sensitivity.default_class == "public"
    assert loaded.sensitivity.detectors[Detector.SECRET] == "secret"
    assert all(not c.allowed_tags for c in loaded.sensitivity.classes)
    assert loaded.budget.mode.value == "normal"


def test_camel_case_round_trip() -> None:
    data = config(
        [ep("a"), ep("b")],
        rules=[
            {
                "name": "r",
                "match": {"dataClasses": ["pii"], "complexity": {"min": 0.5}, "tokens": {"max": 9}},
                "strategy": "complexity-tiers",
                "targets": [
                    {"endpoint": "a", "tier": "cheap"},
                    {"endpoint": "b", "tier": "premium"},
                ],
                "options": {"tiers": {"standard": 0.3, "premium": 0.6}, "stickyHeaders": ["X-U"]},
            }
        ],
    )
    loaded = parse_config(data, "t")
    assert loaded.rules[0].options.sticky_headers == ("x-u",)
    dumped = loaded.model_dump(mode="json", by_alias=True)
    assert dumped["rules"][0]["match"]["dataClasses"] == ["pii"]
    assert parse_config(dumped, "again") == loaded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rules": [{"name": "r", "targets": ["nope"]}]}, "rule 'r' refers to unknown endpoint"),
        (
            {"rules": [{"name": "r", "match": {"models": ["gpt"]}, "targets": ["a"]}]},
            "matches unknown model alias(es): gpt",
        ),
        (
            {"rules": [{"name": "r", "match": {"dataClasses": ["hipaa"]}, "targets": ["a"]}]},
            "unknown data class(es): hipaa",
        ),
        (
            {"rules": [{"name": "r", "targets": ["a"]}, {"name": "r", "targets": ["a"]}]},
            "duplicate rule names: r",
        ),
        (
            {"rules": [{"name": "r", "strategy": "complexity-tiers", "targets": ["a"]}]},
            "needs a tier on every target (missing on a)",
        ),
        (
            {
                "rules": [
                    {
                        "name": "r",
                        "strategy": "weighted",
                        "targets": [{"endpoint": "a", "weight": 0}],
                    }
                ]
            },
            "needs a target with a weight above 0",
        ),
        ({"rules": [{"name": "r", "targets": ["a", "a"]}]}, "lists endpoint(s) more than once: a"),
        (
            {"rules": [{"name": "r", "strategy": "fastest", "targets": ["a"]}]},
            "rules.0.strategy",
        ),
        ({"sensitivity": {"defaultClass": "internal"}}, "defaultClass 'internal' is not one of"),
        (
            {"sensitivity": {"detectors": {"email": "gdpr"}}},
            "detector 'email' refers to unknown data class 'gdpr'",
        ),
        (
            {"models": [{"name": "chat", "endpoints": ["a"], "targets": ["a"]}]},
            "needs exactly one of endpoints or targets (got both)",
        ),
        ({"models": [{"name": "chat"}]}, "needs exactly one of endpoints or targets (got neither)"),
        (
            {"rules": [{"name": "r", "targets": ["a"], "options": {"tiers": {"standard": 0.9}}}]},
            "must not be above tiers.premium",
        ),
    ],
)
def test_mistakes_are_named(change: dict[str, Any], message: str) -> None:
    data = {**config([ep("a")]), **change}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "bad.yaml")
    assert message in str(caught.value)
