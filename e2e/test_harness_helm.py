"""helm install of a fixture chart against the real apiserver."""

from __future__ import annotations

import json
from pathlib import Path

from cluster import Cluster


def test_helm_installs_a_chart(cluster: Cluster, namespace: str, fixtures_dir: Path) -> None:
    chart = fixtures_dir / "charts" / "tiny"

    cluster.helm(
        "install",
        "tiny",
        str(chart),
        "-n",
        namespace,
        "--set",
        "greeting=hi",
        "--wait",
        "--timeout=60s",
    )

    data = cluster.kubectl_json("get", "configmap", "tiny-greeting", "-n", namespace)["data"]
    assert data == {"greeting": "hi", "kubeVersion": "v1.34.4"}
    releases = json.loads(cluster.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("tiny", "deployed")]
    cluster.helm("uninstall", "tiny", "-n", namespace, "--wait")
    missing = cluster.kubectl("get", "configmap", "tiny-greeting", "-n", namespace, check=False)
    assert "NotFound" in missing.stderr
