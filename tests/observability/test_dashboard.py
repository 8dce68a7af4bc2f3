"""The Grafana dashboard shipped with the chart queries only metrics the code exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from modelplane_operator.distribution.hub import ConfigHub
from modelplane_operator.injection.webhook import InjectionMetrics
from modelplane_operator.metrics import OperatorMetrics
from modelplane_sidecar.metrics import SidecarMetrics

CHART = Path(__file__).resolve().parents[2] / "charts" / "modelplane"
DASHBOARD = CHART / "dashboards" / "modelplane.json"
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def _exposed() -> set[str]:
    sidecar = SidecarMetrics()
    sidecar.watch(lambda: None)
    operator = OperatorMetrics()
    InjectionMetrics(operator.registry)
    ConfigHub(metrics=operator)
    return {
        family.name
        for registry in (sidecar.registry, operator.registry)
        for family in registry.collect()
    }


def _family(series: str) -> str:
    for suffix in _SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_every_query_uses_an_exposed_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = _exposed()
    used: set[str] = set()
    for panel in _panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\bmodelplane_[a-z_]+", target["expr"])
            assert names, (panel["title"], target["expr"])
            used.update(_family(name) for name in names)
    unknown = sorted(used - exposed)
    assert not unknown, f"the dashboard queries metrics nobody exposes: {unknown}"
    # The headline series of the issue are all on the dashboard.
    for wanted in (
        "modelplane_requests",
        "modelplane_tokens",
        "modelplane_cost_usd",
        "modelplane_request_duration_seconds",
        "modelplane_time_to_first_token_seconds",
        "modelplane_decision_duration_seconds",
        "modelplane_retries",
        "modelplane_fallbacks",
        "modelplane_circuit_breaker_open",
        "modelplane_cache_hits",
        "modelplane_budget_remaining_usd",
        "modelplane_config_info",
        "modelplane_config_sync_state",
        "modelplane_classifier_hits",
        "modelplane_operator_sidecars",
        "modelplane_operator_config_answers",
    ):
        assert wanted in used, wanted


def test_panels_have_unique_ids_and_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "model"} <= variables
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_chart_ships_it_behind_a_value() -> None:
    template = (CHART / "templates" / "grafana-dashboards.yaml").read_text()
    assert template.startswith("{{- if .Values.grafana.dashboards.enabled -}}")
    assert '.Files.Get "dashboards/modelplane.json"' in template
    values = (CHART / "values.yaml").read_text()
    assert "grafana:\n  dashboards:\n" in values
