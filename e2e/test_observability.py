"""Observability against the real apiserver: operator and sidecar metrics after a real reconcile,
push and request, the cluster-mode audit trail, and the chart's dashboard ConfigMap.

The operator is a real `modelplane operator` process, the sidecar a real `modelplane serve
--control-plane` with a TokenRequest token and the Downward API variables an injected sidecar
gets; the app is the official openai SDK; the provider an OpenAI stand-in.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import orjson
from cluster import CertFiles, Cluster
from operator_helpers import (
    MODELPLANE,
    REPO,
    Operator,
    Process,
    StandIns,
    apply,
    endpoint,
    free_port,
    policy,
    secret,
    service_account_token,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from modelplane_sidecar.standins.openai import OpenAIStandIn

EMAIL = "dana.smith@example.net"


def _get(url: str, ca: Path | None = None) -> tuple[int, bytes]:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _value(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_operator_and_sidecar_metrics_and_the_audit_trail_in_cluster_mode(
    cluster: Cluster,
    namespace: str,
    crds: None,
    operator_cert: CertFiles,
    servers: StandIns,
    tmp_path: Path,
) -> None:
    upstream = servers.start(OpenAIStandIn("upstream", api_key="sk-observability"))
    apply(
        cluster,
        namespace,
        secret("openai", "sk-observability"),
        endpoint("gpt", upstream, "openai"),
        policy("routes", "chat", "gpt"),
    )
    operator = Operator(cluster, operator_cert, [namespace], tmp_path)
    token = tmp_path / "token"
    token.write_text(service_account_token(cluster, namespace, "billing"))
    port, health_port = free_port(), free_port()
    audit = tmp_path / "audit.jsonl"
    identity = {
        "MODELPLANE_POD_NAME": "billing-0",
        "MODELPLANE_POD_NAMESPACE": namespace,
        "MODELPLANE_POD_SERVICE_ACCOUNT": "billing",
    }
    sidecar = Process(
        [
            MODELPLANE,
            "serve",
            f"--control-plane={operator.url}",
            f"--token-file={token}",
            f"--ca-file={operator_cert.ca}",
            f"--state-dir={tmp_path / 'state'}",
            f"--port={port}",
            f"--health-port={health_port}",
            f"--audit-log={audit}",
        ],
        tmp_path / "sidecar.log",
        cluster.env(identity),
    )
    try:
        health = f"http://127.0.0.1:{health_port}"
        wait_for(lambda: _get(health + "/readyz")[0] == 200, "the sidecar's first config")
        version = json.loads(_get(health + "/readyz")[1])["configVersion"]
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": f"Summarise the thread with {EMAIL}"}],
            extra_headers={"x-request-id": "e2e-pii"},
        )

        # The operator: one reconcile at least, one sidecar current on the published version.
        def operator_metrics() -> str | None:
            status, body = _get(operator.url + "/metrics", operator_cert.ca)
            text = body.decode()
            current = _value(text, "modelplane_operator_sidecars", namespace=namespace)
            return text if status == 200 and current == 1 else None

        text = wait_for(operator_metrics, "the operator's metrics to show the sidecar")
        assert _value(text, "modelplane_operator_reconciles_total", result="ok") >= 1
        assert _value(text, "modelplane_operator_reconcile_duration_seconds_count") >= 1
        assert _value(text, "modelplane_operator_connected_sidecars", namespace=namespace) == 1
        assert (
            _value(text, "modelplane_operator_sidecars", namespace=namespace, state="current") == 1
        )
        assert _value(text, "modelplane_operator_config_info", namespace=namespace, version=version)
        assert _value(text, "modelplane_operator_config_answers_total", answer="ack") >= 1
        assert _value(text, "modelplane_operator_stream_connections_total", result="accepted") >= 1

        # The sidecar, scraped where Prometheus would: the health port on the Pod IP.
        status, body = _get(health + "/metrics")
        assert status == 200
        side = body.decode()
        assert _value(side, "modelplane_config_sync_state", state="synced") == 1
        assert _value(side, "modelplane_config_info", version=version) == 1
        assert _value(side, "modelplane_requests_total", model="chat", outcome="ok") == 1
        assert _value(side, "modelplane_classifier_hits_total", label="email") == 1
        assert EMAIL not in side
        # The trail is written in batches off the event loop: wait (bounded) until the request's
        # record is on disk, so a slow shutdown on a loaded machine cannot race the assertion.
        for _ in range(600):
            if audit.exists() and b'"type":"request"' in audit.read_bytes():
                break
            time.sleep(0.05)
    finally:
        sidecar.stop(signal.SIGTERM)
        operator.stop()

    records = [orjson.loads(line) for line in audit.read_bytes().splitlines()]
    (record,) = [r for r in records if r["type"] == "request"]
    assert record["requestId"] == "e2e-pii"
    assert (record["namespace"], record["pod"], record["serviceAccount"]) == (
        namespace,
        "billing-0",
        "billing",
    )
    assert (record["policy"], record["configVersion"]) == (namespace, version)
    assert record["classification"]["labels"] == ["email"]
    assert (record["endpoint"], record["outcome"]) == ("gpt", "ok")
    assert EMAIL.encode() not in audit.read_bytes()
    log = tmp_path / "sidecar.log"
    assert EMAIL not in log.read_text()
    verify = subprocess.run(
        [MODELPLANE, "audit", "verify", str(audit), "--strict", "--anchors", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_chart_ships_the_dashboard_as_a_configmap(cluster: Cluster, namespace: str) -> None:
    rendered = cluster.helm(
        "template",
        "obs",
        str(REPO / "charts" / "modelplane"),
        "-n",
        namespace,
        "--set",
        "grafana.dashboards.enabled=true",
        "--show-only",
        "templates/grafana-dashboards.yaml",
    ).stdout
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=rendered)
    stored = cluster.kubectl_json("get", "configmap", "obs-modelplane-dashboards", "-n", namespace)
    assert stored["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(stored["data"]["modelplane.json"])
    shipped = json.loads((REPO / "charts/modelplane/dashboards/modelplane.json").read_text())
    assert dashboard == shipped
    off = cluster.helm("template", "obs", str(REPO / "charts" / "modelplane"), "-n", namespace)
    assert "grafana_dashboard" not in off.stdout
    assert os.path.getsize(REPO / "charts/modelplane/dashboards/modelplane.json") < 1_000_000
