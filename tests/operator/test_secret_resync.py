"""Referenced Secrets are read by name and re-read periodically, never watched.

The controller, compiler and config hub are the real ones; the apiserver is an in-memory fake
that records which Secrets the operator read, so a test can show that a Secret no resource
references is never read at all (the operator needs only `get`, never list/watch).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import Any

import pytest

from modelplane_operator.controller import Controller
from modelplane_operator.crd_models import MODEL_ENDPOINT, ROUTING_POLICY
from modelplane_operator.distribution.hub import ConfigHub
from modelplane_operator.kube import KubeError

NS = "team-a"
API = "modelplane.io/v1alpha1"
META = {"namespace": NS, "generation": 1, "creationTimestamp": "2026-03-14T00:00:00Z"}
ENDPOINT = {
    "apiVersion": API,
    "kind": "ModelEndpoint",
    "metadata": {**META, "name": "gpt", "uid": "u1"},
    "spec": {
        "provider": "openai",
        "model": "gpt-4o",
        "baseURL": "http://127.0.0.1:1",
        "credentials": {"secretRef": {"name": "openai", "key": "apiKey"}},
    },
}
POLICY = {
    "apiVersion": API,
    "kind": "RoutingPolicy",
    "metadata": {**META, "name": "routes", "uid": "u2"},
    "spec": {"models": [{"name": "chat", "targets": [{"endpoint": "gpt"}]}]},
}


class Apiserver:
    """Secrets by (namespace, name) with resourceVersions; status writes are accepted."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads: list[tuple[str, str]] = []
        self.unreachable = False
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self._version = 100

    def put_secret(self, namespace: str, name: str, value: str) -> None:
        self._version += 1
        self.secrets[(namespace, name)] = {
            "metadata": {
                "namespace": namespace,
                "name": name,
                "resourceVersion": str(self._version),
            },
            "data": {"apiKey": base64.b64encode(value.encode()).decode()},
        }

    async def get_secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        if self.unreachable:
            raise KubeError(503, "apiserver unavailable")
        self.reads.append((namespace, name))
        return self.secrets.get((namespace, name))

    async def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: object,
        resource_version: str | None = None,
    ) -> Any:
        assert isinstance(status, dict)
        self.patches.append((plural, name, status))
        return {}

    async def post_event(
        self, involved: Mapping[str, str], type_: str, reason: str, message: str
    ) -> None:
        return None

    async def request(
        self, method: str, path: str, body: object | None = None, content_type: str = ""
    ) -> Any:
        raise AssertionError(f"unexpected {method} {path}")

    async def apply(self, path: str, body: Mapping[str, Any]) -> Any:
        raise AssertionError("no model servers in these tests")


def _endpoint_reason(kube: Apiserver) -> str:
    """The Ready reason of the latest status written for the endpoint."""
    status = next(s for plural, _, s in reversed(kube.patches) if plural == "modelendpoints")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    reason: str = ready["reason"]
    return reason


async def _until(check: Any, what: str) -> None:
    """Let the scheduled reconcile run: a bounded number of event loop turns."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def controlled() -> Any:
    kube = Apiserver()
    kube.put_secret(NS, "openai", "sk-first")
    kube.put_secret(NS, "unrelated", "sk-not-ours")
    kube.put_secret("team-b", "openai", "sk-other-team")
    hub = ConfigHub()
    controller = Controller(kube, hub, 0.0)  # type: ignore[arg-type]
    controller.observe(MODEL_ENDPOINT, "ADDED", ENDPOINT)
    controller.observe(ROUTING_POLICY, "ADDED", POLICY)
    await controller.reconcile(NS)
    try:
        yield kube, hub, controller
    finally:
        await controller.close()


async def test_only_referenced_secrets_are_read(controlled: Any) -> None:
    kube, hub, controller = controlled
    assert hub.version(NS) is not None

    assert await controller.resync_secrets() == []

    assert set(kube.reads) == {(NS, "openai")}


async def test_a_rotated_secret_is_picked_up_by_the_next_resync(controlled: Any) -> None:
    kube, hub, controller = controlled
    before = hub.version(NS)

    kube.put_secret(NS, "openai", "sk-rotated")
    assert await controller.resync_secrets() == [NS]
    await _until(lambda: hub.version(NS) != before, "the new version")

    # Unchanged since that reconcile read it: nothing more to do.
    assert await controller.resync_secrets() == []


async def test_a_deleted_then_recreated_secret_is_noticed_both_times(controlled: Any) -> None:
    kube, _, controller = controlled

    del kube.secrets[(NS, "openai")]
    assert await controller.resync_secrets() == [NS]
    await _until(lambda: _endpoint_reason(kube) == "SecretNotFound", "SecretNotFound")

    kube.put_secret(NS, "openai", "sk-back")
    assert await controller.resync_secrets() == [NS]
    await _until(lambda: _endpoint_reason(kube) != "SecretNotFound", "the endpoint repaired")


async def test_a_failed_read_is_retried_on_the_next_pass(
    controlled: Any, caplog: pytest.LogCaptureFixture
) -> None:
    kube, _, controller = controlled
    kube.put_secret(NS, "openai", "sk-rotated")
    kube.unreachable = True

    assert await controller.resync_secrets() == []
    assert "re-reading Secret team-a/openai failed" in caplog.text
    assert "sk-" not in caplog.text

    kube.unreachable = False
    assert await controller.resync_secrets() == [NS]


async def test_a_namespace_whose_resources_are_gone_is_no_longer_read(controlled: Any) -> None:
    kube, _, controller = controlled
    controller.observe(MODEL_ENDPOINT, "DELETED", ENDPOINT)
    controller.observe(ROUTING_POLICY, "DELETED", POLICY)
    await controller.reconcile(NS)
    kube.reads.clear()

    kube.put_secret(NS, "openai", "sk-rotated")
    assert await controller.resync_secrets() == []
    assert kube.reads == []


async def test_the_periodic_resync_runs_until_close(controlled: Any) -> None:
    kube, hub, controller = controlled
    before = hub.version(NS)
    kube.put_secret(NS, "openai", "sk-rotated")

    controller.start_secret_resync(0.01)
    await _until(lambda: hub.version(NS) != before, "the periodic resync to recompile")
    await controller.close()

    reads = len(kube.reads)
    await asyncio.sleep(0.05)
    assert len(kube.reads) == reads
