"""The harness is a real apiserver: CRDs, schema validation, status subresource, watches."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster import Cluster

WIDGETS = "widgets.e2e.modelplane.io"


@pytest.fixture(scope="module")
def widget_crd(cluster: Cluster, fixtures_dir: Path) -> Iterator[str]:
    cluster.apply(fixtures_dir / "widgets-crd.yaml")
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{WIDGETS}", "--timeout=30s")
    yield WIDGETS
    cluster.kubectl("delete", "crd", WIDGETS, "--wait=false")


def widget(name: str, spec: dict[str, Any]) -> str:
    return json.dumps(
        {
            "apiVersion": "e2e.modelplane.io/v1alpha1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


def test_apiserver_reports_the_built_version(cluster: Cluster) -> None:
    version = json.loads(cluster.kubectl("get", "--raw", "/version").stdout)
    assert version["gitVersion"] == "v1.34.4"


def test_custom_resource_is_stored_and_served(
    cluster: Cluster, widget_crd: str, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget("small", {"size": 2}))

    stored = cluster.kubectl_json("get", WIDGETS, "small", "-n", namespace)
    assert stored["spec"] == {"size": 2}
    assert stored["metadata"]["generation"] == 1
    table = cluster.kubectl("get", WIDGETS, "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "SIZE", "PHASE"]


def test_schema_invalid_resource_is_rejected_with_the_apiserver_message(
    cluster: Cluster, widget_crd: str, namespace: str
) -> None:
    bad = widget("bad", {"size": 0, "color": "purple"})
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)

    assert result.returncode != 0
    assert 'The Widget "bad" is invalid' in result.stderr
    assert (
        "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
        in (result.stderr)
    )
    assert 'spec.color: Unsupported value: "purple"' in result.stderr
    gone = cluster.kubectl("get", WIDGETS, "bad", "-n", namespace, check=False)
    assert "NotFound" in gone.stderr


def test_status_is_a_subresource(cluster: Cluster, widget_crd: str, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget("w", {"size": 1}))
    status = json.dumps({"status": {"phase": "Ready"}})

    # A status written through the main resource is dropped; through /status it sticks and
    # does not bump the generation (what observedGeneration bookkeeping relies on).
    cluster.kubectl("patch", WIDGETS, "w", "-n", namespace, "--type=merge", "-p", status)
    assert "status" not in cluster.kubectl_json("get", WIDGETS, "w", "-n", namespace)
    cluster.kubectl(
        "patch", WIDGETS, "w", "-n", namespace, "--subresource=status", "--type=merge", "-p", status
    )
    stored = cluster.kubectl_json("get", WIDGETS, "w", "-n", namespace)
    assert stored["status"] == {"phase": "Ready"}
    assert stored["metadata"]["generation"] == 1


def test_watch_sees_a_new_resource(cluster: Cluster, widget_crd: str, namespace: str) -> None:
    path = f"/apis/e2e.modelplane.io/v1alpha1/namespaces/{namespace}/widgets?watch=1"
    watch = subprocess.Popen(
        [str(cluster.binaries.kubectl), "get", "--raw", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cluster.env(),
    )
    events: list[dict[str, Any]] = []
    seen = threading.Event()

    def read_events() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:  # one JSON watch event per line
            events.append(json.loads(line))
            if events[-1]["object"]["metadata"]["name"] == "watched":
                seen.set()
                return

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    try:
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=widget("watched", {"size": 3}))
        assert seen.wait(timeout=30), f"no watch event; got {events}"
    finally:
        watch.kill()
        watch.wait()
    assert events[-1]["type"] == "ADDED"
    assert events[-1]["object"]["spec"] == {"size": 3}
