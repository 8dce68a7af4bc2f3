"""Self-hosted models in the operator: EndpointSlices -> replicas, compiled endpoints with an
engine, the vLLM template's Deployment and Service, overflow in RoutingPolicy, and the shared
load scrape pushed to sidecars."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from modelplane_operator.compile import NamespaceInputs, Resource, compile_namespace, wire_config
from modelplane_operator.crd_models import ModelEndpointSpec, ServiceRef
from modelplane_operator.distribution.auth import Authenticator
from modelplane_operator.distribution.hub import ConfigHub, Identity, Session
from modelplane_operator.distribution.server import StreamServer
from modelplane_operator.selfhosted import discovery, workload
from modelplane_operator.selfhosted.loadshare import LoadShare
from modelplane_operator.selfhosted.tracker import SelfHosted, referenced_service
from modelplane_sidecar import config as rc
from modelplane_sidecar.config import parse_config
from modelplane_sidecar.controlplane import ControlPlaneClient
from modelplane_sidecar.metrics import SidecarMetrics
from modelplane_sidecar.pool import LoadReading
from modelplane_sidecar.server import ConfigHolder
from modelplane_sidecar.standins import start_site
from modelplane_sidecar.standins.vllm import VLLMStandIn

NS = "models"


def endpoint_slice(
    service: str,
    endpoints: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
    name: str | None = None,
    namespace: str = NS,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-abc",
            "namespace": namespace,
            "labels": {discovery.SERVICE_NAME_LABEL: service},
        },
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


def ref(**extra: Any) -> ServiceRef:
    return ServiceRef.model_validate({"name": "llama", "port": 8000, **extra})


def test_ready_addresses_become_replicas_and_not_ready_ones_are_kept_as_such() -> None:
    slices = [
        endpoint_slice(
            "llama",
            [
                {"addresses": ["10.0.0.2"], "zone": "eu-1a"},  # ready unset: ready
                {"addresses": ["10.0.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": True, "terminating": True}},
            ],
        ),
        endpoint_slice("llama", [{"addresses": ["fd00::5"]}], address_type="IPv6", name="v6"),
        # The same address in a second slice, ready there: ready wins.
        endpoint_slice("llama", [{"addresses": ["10.0.0.3"]}], name="dup"),
    ]
    replicas = discovery.replicas(ref(), slices)
    assert [(r.url, r.ready, r.zone) for r in replicas] == [
        ("http://10.0.0.1:8000/v1", True, None),
        ("http://10.0.0.2:8000/v1", True, "eu-1a"),
        ("http://10.0.0.3:8000/v1", True, None),
        ("http://10.0.0.4:8000/v1", False, None),
        ("http://[fd00::5]:8000/v1", True, None),
    ]


def test_the_replica_port_comes_from_the_slice() -> None:
    ports = [{"name": "metrics", "port": 9090}, {"name": "api", "port": 8080}]
    one = [{"addresses": ["10.0.0.1"]}]
    by_name = discovery.replicas(ref(portName="api"), [endpoint_slice("llama", one, ports)])
    assert [r.url for r in by_name] == ["http://10.0.0.1:8080/v1"]
    # Several ports and no name: the one numbered like the Service port, else none.
    assert discovery.replicas(ref(), [endpoint_slice("llama", one, ports)]) == ()
    single = [endpoint_slice("llama", one, [{"name": "x", "port": 31000}])]
    assert [r.url for r in discovery.replicas(ref(scheme="https", path="/api/v1/"), single)] == [
        "https://10.0.0.1:31000/api/v1"
    ]


def served(name: str = "llama", **spec: Any) -> Resource:
    body: dict[str, Any] = {
        "provider": "openai-compatible",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "serviceRef": {"name": "llama", "port": 8000, "engine": "vllm"},
        "compliance": ["on-prem"],
    }
    body.update(spec)
    return Resource(name, {k: v for k, v in body.items() if v is not None})


def cloud() -> Resource:
    return Resource(
        "cloud",
        {"provider": "openai", "model": "gpt-4o-mini", "baseURL": "https://api.openai.com/v1"},
    )


def policy(**model: Any) -> Resource:
    return Resource(
        "p", {"models": [{"name": "chat", "targets": [{"endpoint": "llama"}], **model}]}
    )


def test_a_service_backed_endpoint_ships_its_replicas_engine_and_pushed_metrics() -> None:
    slices = {
        (NS, "llama"): [
            endpoint_slice(
                "llama",
                [
                    {"addresses": ["10.0.0.1"]},
                    {"addresses": ["10.0.0.2"], "conditions": {"ready": False}},
                ],
            )
        ]
    }
    result = compile_namespace(
        NamespaceInputs(
            NS,
            [served(loadMetrics={"scrapeIntervalSeconds": 1})],
            [policy()],
            slices=slices,
        )
    )
    assert result.config is not None
    llama = result.config.endpoint("llama")
    assert llama.base_url == "http://llama.models.svc:8000/v1"
    assert llama.engine is rc.Engine.VLLM
    assert [(r.url, r.ready) for r in llama.replicas or ()] == [
        ("http://10.0.0.1:8000/v1", True),
        ("http://10.0.0.2:8000/v1", False),
    ]
    assert llama.load_metrics.source is rc.LoadSource.PUSH
    assert llama.load_metrics.scrape_interval_seconds == 1
    verdict = result.verdict("ModelEndpoint", "llama")
    assert verdict.ready
    assert verdict.status == {"replicas": {"ready": 1, "total": 2}}
    assert verdict.message == "Service models/llama: 1 of 2 replicas ready"
    assert parse_config(wire_config(result.config)).endpoint("llama").replicas == llama.replicas


def test_no_slices_means_no_replica_and_no_engine_means_no_scrape() -> None:
    result = compile_namespace(
        NamespaceInputs(
            NS, [served(serviceRef={"name": "llama", "port": 8000, "namespace": "gpu"})], [policy()]
        )
    )
    assert result.config is not None
    llama = result.config.endpoint("llama")
    assert llama.base_url == "http://llama.gpu.svc:8000/v1"
    assert llama.replicas == ()
    assert llama.load_metrics.source is rc.LoadSource.OFF
    assert (
        result.verdict("ModelEndpoint", "llama").message
        == "Service gpu/llama: 0 of 0 replicas ready"
    )


def test_a_template_routes_to_the_service_it_creates() -> None:
    result = compile_namespace(
        NamespaceInputs(
            NS,
            [served("llama.8b", serviceRef=None, template={"gpus": 2, "replicas": 3})],
            [Resource("p", {"models": [{"name": "chat", "targets": [{"endpoint": "llama.8b"}]}]})],
            slices={(NS, "llama-8b"): [endpoint_slice("llama-8b", [{"addresses": ["10.1.0.1"]}])]},
        )
    )
    assert result.config is not None
    llama = result.config.endpoint("llama.8b")
    assert llama.base_url == "http://llama-8b.models.svc:8000/v1"
    assert [r.url for r in llama.replicas or ()] == ["http://10.1.0.1:8000/v1"]
    assert llama.engine is rc.Engine.VLLM


def test_endpoint_needs_exactly_one_of_base_url_service_ref_template() -> None:
    result = compile_namespace(NamespaceInputs(NS, [served(template={"gpus": 1})], [policy()]))
    verdict = result.verdict("ModelEndpoint", "llama")
    assert not verdict.ready
    assert (
        verdict.message
        == "exactly one of spec.baseURL, spec.serviceRef or spec.template must be set"
    )


def test_overflow_compiles_and_ships_its_targets() -> None:
    overflow = {"targets": [{"endpoint": "cloud"}], "maxQueueDepth": 8, "neverSpill": ["pii"]}
    rules = [
        {
            "name": "bulk",
            "match": {"headers": {"x-task": ["batch"]}},
            "targets": [{"endpoint": "llama"}],
            "overflow": {"targets": [{"endpoint": "cloud"}], "maxPredictedWaitSeconds": 3},
        }
    ]
    result = compile_namespace(
        NamespaceInputs(
            NS,
            [served(), cloud()],
            [
                Resource(
                    "p",
                    {
                        "models": [
                            {
                                "name": "chat",
                                "targets": [{"endpoint": "llama"}],
                                "overflow": overflow,
                            }
                        ],
                        "rules": rules,
                    },
                )
            ],
        )
    )
    assert result.config is not None
    assert {e.name for e in result.config.endpoints} == {"llama", "cloud"}
    alias = result.config.models[0].overflow
    assert alias is not None
    assert ([t.endpoint for t in alias.targets], alias.max_queue_depth, alias.never_spill) == (
        ["cloud"],
        8,
        ("pii",),
    )
    rule = result.config.rules[0].overflow
    assert rule is not None and rule.max_predicted_wait_seconds == 3
    assert result.verdict("RoutingPolicy", "p").ready


@pytest.mark.parametrize(
    ("overflow", "message"),
    [
        (
            {"targets": [{"endpoint": "llama"}], "maxQueueDepth": 1},
            "model 'chat' overflow: 'llama' is already a target of the route; "
            "model 'chat' overflow: no usable target; overflow dropped",
        ),
        (
            {"targets": [{"endpoint": "cloud"}], "maxQueueDepth": 1, "neverSpill": ["medical"]},
            "model 'chat' overflow: neverSpill names medical, not a data class of the namespace "
            "(classes: pii, public, secret); overflow dropped",
        ),
        (
            {"targets": [{"endpoint": "ghost"}], "maxQueueDepth": 1},
            "model 'chat' overflow: ModelEndpoint 'ghost' not found; "
            "model 'chat' overflow: no usable target; overflow dropped",
        ),
    ],
)
def test_broken_overflow_is_dropped_with_a_precise_message(
    overflow: dict[str, Any], message: str
) -> None:
    result = compile_namespace(
        NamespaceInputs(NS, [served(), cloud()], [policy(overflow=overflow)])
    )
    assert result.config is not None
    assert result.config.models[0].overflow is None
    verdict = result.verdict("RoutingPolicy", "p")
    assert (verdict.ready, verdict.message) == (False, message)


def test_the_vllm_deployment_and_service() -> None:
    spec = ModelEndpointSpec.model_validate(
        {
            "provider": "openai-compatible",
            "model": "llama-3.1-70b",
            "template": {
                "model": "meta-llama/Llama-3.1-70B-Instruct",
                "gpus": 4,
                "replicas": 2,
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
                "args": ["--max-model-len=8192"],
                "envFromSecret": "hf-token",
            },
        }
    )
    deployment = workload.deployment("llama.70b", "uid-1", spec)
    assert deployment["metadata"]["name"] == "llama-70b"
    assert deployment["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "modelplane.io/v1alpha1",
            "kind": "ModelEndpoint",
            "name": "llama.70b",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": "4"}}
    assert container["args"] == [
        "--model", "meta-llama/Llama-3.1-70B-Instruct", "--served-model-name", "llama-3.1-70b",
        "--port", "8000", "--tensor-parallel-size", "4", "--max-model-len=8192",
    ]  # fmt: skip
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert deployment["spec"]["replicas"] == 2
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service = workload.service("llama.70b", "uid-1", spec)
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["port"] == 8000
    assert workload.workload_status("llama.70b", None)["message"] == "Deployment not created yet"
    status = workload.workload_status("llama.70b", {**deployment, "status": {"replicas": 2}})
    assert (status["replicas"], status["readyReplicas"], status["message"]) == (2, 0, "0/2 ready")


def test_the_tracker_knows_which_slices_matter() -> None:
    tracker = SelfHosted.__new__(SelfHosted)
    tracker._slices, tracker._deployments, tracker._applied = {}, {}, {}
    body = {"metadata": {"namespace": NS, "name": "llama"}, "spec": served().spec}
    assert referenced_service(body) == (NS, "llama")
    tracker.observe_slice("ADDED", endpoint_slice("llama", [{"addresses": ["10.0.0.1"]}]))
    tracker.observe_slice("ADDED", endpoint_slice("other", [{"addresses": ["10.0.0.9"]}]))
    assert list(tracker.slices_for([body])) == [(NS, "llama")]
    tracker.observe_slice("DELETED", endpoint_slice("llama", []))
    assert tracker.slices_for([body]) == {(NS, "llama"): []}


async def test_the_operator_scrapes_once_and_pushes_load_to_every_sidecar() -> None:
    standin = VLLMStandIn("r1", extra_waiting=7)
    runner, port = await start_site(standin.app())
    hub = ConfigHub()
    received: list[dict[str, Any]] = []

    async def send(message: bytes) -> None:
        received.append(orjson.loads(message))

    sessions = [
        Session(Identity(NS, "app", f"system:serviceaccount:{NS}:app"), f"pod-{i}", send, None)
        for i in range(3)
    ]
    for session in sessions:
        hub.connect(session)
    share = LoadShare(hub, interval=0.2)
    result = compile_namespace(
        NamespaceInputs(
            NS,
            [served(loadMetrics={"scrapeIntervalSeconds": 0.2})],
            [policy()],
            slices={
                (NS, "llama"): [
                    endpoint_slice(
                        "llama", [{"addresses": ["127.0.0.1"]}], [{"name": "http", "port": port}]
                    )
                ]
            },
        )
    )
    try:
        share.update(NS, result.config)
        for _ in range(600):
            if len(received) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await share.stop()
        await runner.cleanup()
    assert len(received) >= 3
    message = received[0]
    assert message["type"] == "load"
    [entry] = message["endpoints"]["llama"]
    assert entry["url"] == f"http://127.0.0.1:{port}/v1"
    assert (entry["waiting"], entry["running"]) == (7, 0)
    # One scrape per interval for all three sidecars, not one each.
    assert standin.scrapes <= len(received) // 3 + 2


async def test_load_reaches_a_sidecar_over_the_real_config_stream(tmp_path: Path) -> None:
    """Operator hub + stream server + the sidecar's stream client on loopback sockets: the
    compiled config arrives, then the operator's scrape of the replica arrives as load."""
    standin = VLLMStandIn("r1", extra_waiting=7)
    runner, port = await start_site(standin.app())

    async def review(token: str, audiences: list[str]) -> Mapping[str, Any]:
        return {
            "authenticated": token == "tok",
            "audiences": ["modelplane"],
            "user": {"username": f"system:serviceaccount:{NS}:app"},
        }

    hub = ConfigHub()
    server = StreamServer(hub, Authenticator(review, "modelplane"))
    server_port = await server.start("127.0.0.1", 0, None)
    token = tmp_path / "token"
    token.write_text("tok")
    holder = ConfigHolder(SidecarMetrics())
    client = ControlPlaneClient(f"http://127.0.0.1:{server_port}", token, holder, node="app")
    share = LoadShare(hub, interval=0.2)
    address = [{"name": "http", "port": port}]
    result = compile_namespace(
        NamespaceInputs(
            NS,
            [served(loadMetrics={"scrapeIntervalSeconds": 0.2})],
            [policy()],
            slices={
                (NS, "llama"): [endpoint_slice("llama", [{"addresses": ["127.0.0.1"]}], address)]
            },
        )
    )
    assert result.config is not None and result.version is not None
    try:
        hub.publish(NS, result.version, wire_config(result.config))
        share.update(NS, result.config)
        client.start()

        def reading() -> LoadReading | None:
            snapshot = holder.snapshot
            if snapshot is None:
                return None
            return snapshot.pools()["llama"].replicas[0].reading

        for _ in range(600):
            if reading() is not None:
                break
            await asyncio.sleep(0.05)
        assert reading() == LoadReading(waiting=7.0, running=0.0, kv_cache=0.0)
        assert hub.counts(NS).current == 1
    finally:
        await client.stop()
        await share.stop()
        await server.stop()
        await runner.cleanup()
