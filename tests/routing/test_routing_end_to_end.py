"""The routing pipeline through the real sidecar, with the official openai SDK as the app and
stand-in upstreams: compliance on fallback, fail closed, explain, A/B arms, latency learning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml
from harness import Upstreams, endpoint, http

from modelplane_cli.main import main as cli_main
from modelplane_sidecar.standins.openai import Behaviour

SENSITIVITY = {
    "classes": [
        {"name": "public"},
        {"name": "pii", "allowedTags": ["on-prem"]},
        {"name": "secret", "allowedTags": ["on-prem"]},
    ]
}
RETRY = {"maxAttempts": 2, "backoffBaseSeconds": 0.001, "backoffMaxSeconds": 0.002}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


def _config(
    endpoints: list[dict[str, Any]], rules: list[dict[str, Any]], chain: list[str] | None = None
) -> dict[str, Any]:
    return {
        "endpoints": endpoints,
        "models": [
            {"name": "chat", "endpoints": chain or [e["name"] for e in endpoints], "retry": RETRY}
        ],
        "rules": rules,
        "sensitivity": SENSITIVITY,
    }


def _ask(url: str, text: str, **kwargs: Any) -> Any:
    return _client(url).chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": text}], **kwargs
    )


def test_pii_falls_back_only_among_compliant_endpoints(upstreams: Upstreams) -> None:
    onprem_a, url_a = upstreams.openai("onprem-a")
    cloud, url_c = upstreams.openai("cloud")
    onprem_b, url_b = upstreams.openai("onprem-b")
    onprem_a.default = Behaviour("status", 503)
    router = upstreams.router(
        _config(
            [
                endpoint("onprem-a", url_a, tags=["on-prem"]),
                endpoint("cloud", url_c, tags=["cloud"]),
                endpoint("onprem-b", url_b, tags=["on-prem"]),
            ],
            [],
        )
    )
    raw = _ask(router.url, "Please email the contract to jane.doe@example.com")
    assert raw.headers["x-modelplane-endpoint"] == "onprem-b"
    assert raw.headers["x-modelplane-rule"] == "model:chat"
    assert (len(onprem_a.received), len(cloud.received), len(onprem_b.received)) == (2, 0, 1)
    # The same chain serves a plain prompt from the cloud endpoint once on-prem-a fails.
    raw = _ask(router.url, "What is a Pod?")
    assert raw.headers["x-modelplane-endpoint"] == "cloud"


def test_no_compliant_endpoint_fails_closed_and_sends_nothing(upstreams: Upstreams) -> None:
    cloud, url = upstreams.openai("cloud")
    router = upstreams.router(
        _config(
            [endpoint("cloud", url, tags=["cloud"])],
            [{"name": "everything-to-cloud", "targets": ["cloud"]}],
        )
    )
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _ask(router.url, "My SSN is 123-45-6789, fill in the form")
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "no_compliant_endpoint"
    assert "Rule 'everything-to-cloud'" in body["message"] and "123-45-6789" not in body["message"]
    assert caught.value.response.headers["x-modelplane-rule"] == "everything-to-cloud"
    assert cloud.received == []
    assert (
        router.metric(
            "modelplane_route_refusals_total",
            rule="everything-to-cloud",
            code="no_compliant_endpoint",
        )
        == 1
    )


def test_explain_endpoint_shows_the_trace_and_calls_nothing(upstreams: Upstreams) -> None:
    cloud, url_c = upstreams.openai("cloud")
    onprem, url_o = upstreams.openai("onprem")
    router = upstreams.router(
        _config(
            [endpoint("cloud", url_c, tags=["cloud"]), endpoint("onprem", url_o, tags=["on-prem"])],
            [
                {"name": "tools", "match": {"tools": True}, "targets": ["cloud"]},
                {"name": "sensitive", "match": {"dataClasses": ["pii"]}, "targets": ["onprem"]},
            ],
        )
    )
    body = {"model": "chat", "messages": [{"role": "user", "content": "call me: +1 415 555 2671"}]}
    reply = http("POST", router.url + "/v1/modelplane/explain", orjson.dumps(body))
    assert reply.status_code == 200
    trace = reply.json()
    assert trace["rule"] == "sensitive" and trace["candidates"] == ["onprem"]
    assert trace["classifiers"]["sensitivity"]["labels"] == ["phone"]
    assert 0 <= trace["classifiers"]["complexity"]["score"] <= 1
    assert trace["rules"][0] == {
        "rule": "tools",
        "matched": False,
        "failed": "tools",
        "observed": False,
    }
    # The trace carries labels, never the data (match text only: timings are numbers too).
    assert "555 2671" not in reply.text and "+1 415" not in reply.text
    # A refusal is part of the trace, not an error of the explain call.
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
    }
    reply = http(
        "POST",
        router.url + "/v1/modelplane/explain?operation=chat",
        orjson.dumps(body),
        **{"x-modelplane-data-class": "secret"},
    )
    trace = reply.json()
    assert trace["rule"] == "tools" and trace["candidates"] == []
    assert trace["error"]["code"] == "no_compliant_endpoint"
    assert trace["removed"][0]["step"] == "compliance"
    assert cloud.received == [] and onprem.received == []
    bad = http("POST", router.url + "/v1/modelplane/explain?operation=images", orjson.dumps(body))
    assert bad.status_code == 400 and "operation must be one of" in bad.json()["error"]["message"]


def test_weighted_arms_are_sticky_and_counted(upstreams: Upstreams) -> None:
    _a, url_a = upstreams.openai("a")
    _b, url_b = upstreams.openai("b")
    rule = {
        "name": "ab",
        "strategy": "weighted",
        "targets": [
            {"endpoint": "a", "weight": 1, "arm": "control"},
            {"endpoint": "b", "weight": 1, "arm": "variant"},
        ],
    }
    router = upstreams.router(_config([endpoint("a", url_a), endpoint("b", url_b)], [rule]))
    client = _client(router.url)
    served: dict[str, set[str]] = {}
    for user in [f"user-{i}" for i in range(12)] * 2:
        raw = client.chat.completions.with_raw_response.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-user-id": user},
        )
        served.setdefault(user, set()).add(raw.headers["x-modelplane-endpoint"])
    assert all(len(endpoints) == 1 for endpoints in served.values())
    arms = {
        arm: router.metric(
            "modelplane_route_decisions_total",
            model="chat",
            rule="ab",
            strategy="weighted",
            arm=arm,
        )
        for arm in ("control", "variant")
    }
    assert sum(arms.values()) == 24 and min(arms.values()) > 0


def test_lowest_latency_learns_from_the_forwarder(upstreams: Upstreams) -> None:
    slow, url_s = upstreams.openai("slow")
    _fast, url_f = upstreams.openai("fast")
    # A second slower than `fast`: a stall on a loaded machine must not make `fast` look slower.
    slow.default = Behaviour("ok", delay=1.0)
    rule = {
        "name": "fastest",
        "strategy": "lowest-latency",
        "targets": ["slow", "fast"],
        "options": {"exploration": 0},
    }
    router = upstreams.router(_config([endpoint("slow", url_s), endpoint("fast", url_f)], [rule]))
    served = [_ask(router.url, "hi").headers["x-modelplane-endpoint"] for _ in range(4)]
    # Nothing observed: target order; then the unobserved one; then the faster one.
    assert served == ["slow", "fast", "fast", "fast"]
    stats = router.holder.snapshot.endpoints["slow"].state.stats  # type: ignore[union-attr]
    assert stats.latency_samples == 1 and stats.latency_seconds is not None
    assert stats.latency_seconds >= 1.0


def test_requests_per_minute_limit_moves_traffic_on(upstreams: Upstreams) -> None:
    one, url_1 = upstreams.openai("one")
    two, url_2 = upstreams.openai("two")
    router = upstreams.router(
        _config(
            [endpoint("one", url_1, limits={"requestsPerMinute": 2}), endpoint("two", url_2)], []
        )
    )
    served = [_ask(router.url, "hi").headers["x-modelplane-endpoint"] for _ in range(4)]
    assert served == ["one", "one", "two", "two"]
    assert (len(one.received), len(two.received)) == (2, 2)


def test_explain_cli_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(
        [
            endpoint("cloud", "https://api.example.com/v1", tags=["cloud"], apiKey={"env": "NOPE"}),
            endpoint("onprem", "http://10.0.0.1/v1", tags=["on-prem"]),
        ],
        [{"name": "sensitive", "match": {"dataClasses": ["secret"]}, "targets": ["onprem"]}],
    )
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump(config))
    request_file = tmp_path / "request.json"
    request_file.write_text(json.dumps({"model": "chat", "prompt": "hello"}))
    code = cli_main(
        [
            "explain",
            "--config",
            str(config_file),
            "--request",
            str(request_file),
            "--header",
            "X-Modelplane-Data-Class: secret",
        ]
    )
    assert code == 0
    trace = json.loads(capsys.readouterr().out)
    assert trace["rule"] == "sensitive" and trace["candidates"] == ["onprem"]
    request_file.write_text("{not json")
    assert cli_main(["explain", "--config", str(config_file), "--request", str(request_file)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
