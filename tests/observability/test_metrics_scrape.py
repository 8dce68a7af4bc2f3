"""The sidecar's /metrics after real requests: names, types and labels, scraped and parsed.

Requests go through the real sidecar with the official `openai` SDK against OpenAI stand-ins:
served, streamed, retried and fallen back, refused for compliance, refused for an unknown model.
The scrape is parsed with prometheus_client's own exposition parser, so a malformed line, a wrong
type or a missing `_total` fails here; a label carrying request content fails too.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from harness import Router, Upstreams
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from modelplane_sidecar.standins.openai import Behaviour

PII_PROMPT = "Refund card 4111 1111 1111 1111 and write to jane.roe@example.org"
UNKNOWN_MODEL = "gpt-from-a-user-typo"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"

#: name -> (type, label names) of every family the sidecar exposes.
CATALOGUE: dict[str, tuple[str, set[str]]] = {
    "modelplane_requests": ("counter", {"model", "endpoint", "provider", "rule", "outcome"}),
    "modelplane_upstream_attempts": ("counter", {"endpoint", "provider", "result"}),
    "modelplane_fallbacks": ("counter", {"model", "from_endpoint"}),
    "modelplane_retries": ("counter", {"endpoint"}),
    "modelplane_stream_failures": ("counter", {"endpoint", "reason"}),
    "modelplane_client_disconnects": ("counter", {"model"}),
    "modelplane_tokens": ("counter", {"endpoint", "provider", "direction"}),
    "modelplane_cost_usd": ("counter", {"endpoint", "provider"}),
    "modelplane_request_duration_seconds": ("histogram", {"model", "endpoint", "provider"}),
    "modelplane_time_to_first_token_seconds": ("histogram", {"model", "endpoint", "provider"}),
    "modelplane_decision_duration_seconds": ("histogram", set()),
    "modelplane_route_decisions": ("counter", {"model", "rule", "strategy", "arm"}),
    "modelplane_route_refusals": ("counter", {"rule", "code"}),
    "modelplane_classifier_hits": ("counter", {"classifier", "label"}),
    "modelplane_complexity_score": ("histogram", set()),
    "modelplane_cache_hits": ("counter", {"model"}),
    "modelplane_cache_misses": ("counter", {"model"}),
    "modelplane_cache_stale_served": ("counter", {"model"}),
    "modelplane_cache_bypassed": ("counter", {"model", "reason"}),
    "modelplane_cache_stores": ("counter", {"model"}),
    "modelplane_cache_coalesced": ("counter", {"model"}),
    "modelplane_cache_coalesce_fallbacks": ("counter", {"model", "reason"}),
    "modelplane_cache_coalesce_waiting": ("gauge", set()),
    "modelplane_cache_bytes": ("gauge", set()),
    "modelplane_cache_entries": ("gauge", set()),
    "modelplane_cache_evictions": ("counter", {"reason"}),
    "modelplane_cache_backend_errors": ("counter", {"backend", "operation"}),
    "modelplane_cache_backend_up": ("gauge", {"backend"}),
    "modelplane_lane_admitted": ("counter", {"lane"}),
    "modelplane_lane_rejected": ("counter", {"lane", "reason"}),
    "modelplane_lane_wait_seconds": ("histogram", {"lane"}),
    "modelplane_lane_spilled": ("counter", {"reason"}),
    "modelplane_lane_in_flight_requests": ("gauge", {"lane"}),
    "modelplane_lane_queued_requests": ("gauge", {"lane"}),
    "modelplane_batch_api_requests": ("counter", {"operation", "status"}),
    "modelplane_count_tokens_requests": ("counter", {"model", "endpoint", "outcome"}),
    "modelplane_budget_remaining_usd": ("gauge", {"budget"}),
    "modelplane_budget_spend_usd": ("counter", {"budget", "endpoint"}),
    "modelplane_budget_tokens": ("counter", {"budget", "endpoint", "direction"}),
    "modelplane_budget_refusals": ("counter", {"budget"}),
    "modelplane_budget_overrun_usd": ("counter", {"budget"}),
    "modelplane_budget_lease_available_usd": ("gauge", {"budget"}),
    "modelplane_config_info": ("gauge", {"version", "source"}),
    "modelplane_config_last_applied_timestamp_seconds": ("gauge", set()),
    "modelplane_config_reloads": ("counter", {"result"}),
    "modelplane_config_sync_state": ("gauge", {"state"}),
    "modelplane_audit_records": ("counter", set()),
    "modelplane_audit_write_errors": ("counter", set()),
    "modelplane_circuit_breaker_open": ("gauge", {"endpoint", "provider"}),
    "modelplane_circuit_breaker_state": ("gauge", {"endpoint", "provider", "state"}),
    "modelplane_endpoint_in_flight_requests": ("gauge", {"endpoint", "provider"}),
    "modelplane_endpoint_info": ("gauge", {"endpoint", "provider", "upstream_model", "region"}),
    "modelplane_overflow_decisions": ("counter", {"model", "rule", "outcome"}),
    "modelplane_endpoint_replicas": ("gauge", {"endpoint", "state"}),
    "modelplane_endpoint_queue_depth": ("gauge", {"endpoint"}),
}


def _config(urls: dict[str, str]) -> dict[str, Any]:
    def endpoint(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "provider": "openai",
            "baseUrl": urls[name],
            "model": f"{name}-model",
            "pricing": {"inputPerMtok": 2.5, "outputPerMtok": 10},
            **extra,
        }

    retry = {"maxAttempts": 2, "backoffBaseSeconds": 0.01, "backoffMaxSeconds": 0.02}
    return {
        "apiVersion": "modelplane.io/v1alpha1",
        "kind": "RouterConfig",
        "metadata": {"name": "team-a"},
        "endpoints": [
            endpoint("cloud", region="us-east-1"),
            endpoint("backup", region="eu-west-1"),
            endpoint("onprem", tags=["on-prem"], region="dc-1"),
        ],
        "models": [
            {"name": "chat", "endpoints": ["cloud", "backup"], "retry": retry},
            {"name": "private", "endpoints": ["onprem", "cloud"]},
            {"name": "cloud-only", "endpoints": ["cloud"]},
        ],
        "sensitivity": {
            "classes": [
                {"name": "public"},
                {"name": "pii", "allowedTags": ["on-prem"]},
                {"name": "secret", "allowedTags": ["on-prem"]},
            ]
        },
    }


def _scrape(router: Router) -> str:
    with urllib.request.urlopen(router.url + "/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/plain; version=")
        text: str = reply.read().decode()
        return text


def _families(router: Router) -> dict[str, Any]:
    families = text_string_to_metric_families(_scrape(router))
    # In-process the client library's default `_created` gauges appear; `modelplane serve`
    # turns them off (see test_audit_trail.py, which scrapes the real process).
    return {f.name: f for f in families if not f.name.endswith("_created")}


def _samples(family: Any, suffix: str = "") -> list[Sample]:
    return [s for s in family.samples if s.name == family.name + suffix]


def _value(family: Any, suffix: str = "", **labels: str) -> float:
    return sum(s.value for s in _samples(family, suffix) if labels.items() <= s.labels.items())


@pytest.fixture
def traffic(upstreams: Upstreams) -> tuple[Router, str]:
    """A router after a representative mix of real requests; also returns the raw scrape."""
    urls: dict[str, str] = {}
    cloud, urls["cloud"] = upstreams.openai("cloud")
    _, urls["backup"] = upstreams.openai("backup")
    _, urls["onprem"] = upstreams.openai("onprem")
    router = upstreams.router(_config(urls))
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="placeholder", max_retries=0)
    hello = [{"role": "user", "content": "hello"}]

    client.chat.completions.create(model="chat", messages=hello)
    with client.chat.completions.create(model="chat", messages=hello, stream=True) as stream:
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    # Two 500s: a retry of cloud, then a fallback to backup.
    cloud.then(Behaviour("status", 500), Behaviour("status", 500))
    client.chat.completions.create(model="chat", messages=hello)
    # Personal data: classified, compliance removes cloud, on-prem serves.
    client.chat.completions.create(
        model="private", messages=[{"role": "user", "content": PII_PROMPT}]
    )
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="cloud-only", messages=[{"role": "user", "content": PII_PROMPT}]
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=UNKNOWN_MODEL, messages=hello)
    return router, _scrape(router)


def test_every_family_has_its_documented_type_and_labels(traffic: tuple[Router, str]) -> None:
    router, _ = traffic
    families = _families(router)
    assert set(families) == set(CATALOGUE)
    for name, (kind, labels) in CATALOGUE.items():
        family = families[name]
        assert family.type == kind, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)


def test_every_family_is_in_the_docs() -> None:
    catalogue = DOCS.read_text()
    missing = [name for name in CATALOGUE if f"`{name}" not in catalogue]
    assert not missing, f"not documented in docs/observability.md: {missing}"


def test_requests_tokens_cost_and_latency_by_endpoint_and_provider(
    traffic: tuple[Router, str],
) -> None:
    router, _ = traffic
    f = _families(router)
    requests = f["modelplane_requests"]
    ok = {"outcome": "ok", "provider": "openai"}
    assert _value(requests, "_total", model="chat", endpoint="cloud", rule="model:chat", **ok) == 2
    assert _value(requests, "_total", model="chat", endpoint="backup", **ok) == 1
    assert _value(requests, "_total", model="private", endpoint="onprem", **ok) == 1
    assert _value(requests, "_total", outcome="refused") == 2
    for direction in ("input", "output"):
        assert _value(f["modelplane_tokens"], "_total", endpoint="cloud", direction=direction) > 0
    assert _value(f["modelplane_cost_usd"], "_total", endpoint="cloud", provider="openai") > 0
    latency = f["modelplane_request_duration_seconds"]
    assert _value(latency, "_count", model="chat", endpoint="cloud", provider="openai") == 2
    assert _value(latency, "_bucket", model="chat", endpoint="cloud", le="+Inf") == 2
    ttft = f["modelplane_time_to_first_token_seconds"]
    assert _value(ttft, "_count", model="chat", endpoint="cloud", provider="openai") == 1
    # Four requests were routed; refusals are counted in modelplane_route_refusals.
    assert _value(f["modelplane_decision_duration_seconds"], "_count") == 4


def test_retries_fallbacks_attempts_and_breakers(traffic: tuple[Router, str]) -> None:
    router, _ = traffic
    f = _families(router)
    assert _value(f["modelplane_retries"], "_total", endpoint="cloud") == 1
    assert _value(f["modelplane_fallbacks"], "_total", model="chat", from_endpoint="cloud") == 1
    attempts = f["modelplane_upstream_attempts"]
    assert _value(attempts, "_total", endpoint="cloud", result="server-error") == 2
    assert _value(attempts, "_total", endpoint="backup", result="ok") == 1
    state = f["modelplane_circuit_breaker_state"]
    for endpoint in ("cloud", "backup", "onprem"):
        assert _value(state, endpoint=endpoint, state="closed") == 1
        assert _value(state, endpoint=endpoint, state="open") == 0
        assert _value(f["modelplane_circuit_breaker_open"], endpoint=endpoint) == 0
        assert _value(f["modelplane_endpoint_in_flight_requests"], endpoint=endpoint) == 0
    info = f["modelplane_endpoint_info"]
    assert _value(info, endpoint="onprem", upstream_model="onprem-model", region="dc-1") == 1


def test_classifier_hits_and_refusals_by_label(traffic: tuple[Router, str]) -> None:
    router, _ = traffic
    f = _families(router)
    hits = f["modelplane_classifier_hits"]
    # The same PII prompt twice (served on-prem, then refused for cloud-only).
    assert _value(hits, "_total", classifier="sensitivity", label="email") == 2
    assert _value(hits, "_total", classifier="sensitivity", label="payment-card") == 2
    refusals = f["modelplane_route_refusals"]
    assert _value(refusals, "_total", rule="model:cloud-only", code="no_compliant_endpoint") == 1
    assert _value(refusals, "_total", code="model_not_found") == 1
    requests = f["modelplane_requests"]
    assert _value(requests, "_total", model="cloud-only", rule="model:cloud-only") == 1
    assert _value(requests, "_total", model="", endpoint="", outcome="refused") == 1


def test_config_version_is_exposed(traffic: tuple[Router, str]) -> None:
    router, _ = traffic
    f = _families(router)
    version = router.holder.snapshot.version if router.holder.snapshot else ""
    assert _value(f["modelplane_config_info"], version=version, source="initial") == 1
    assert _value(f["modelplane_config_reloads"], "_total", result="applied") == 1
    assert _value(f["modelplane_config_last_applied_timestamp_seconds"]) > 0


def test_no_label_carries_request_content(traffic: tuple[Router, str]) -> None:
    _, scrape = traffic
    for secret in ("4111", "jane.roe", "example.org", "hello", UNKNOWN_MODEL):
        assert secret not in scrape
