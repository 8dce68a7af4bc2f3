"""examples/selfhosted/ is valid for the CRD models and compiles into a config the sidecar
accepts (with stand-in EndpointSlices for the Service it names)."""

from __future__ import annotations

from pathlib import Path

import yaml

from modelplane_operator.compile import NamespaceInputs, Resource, compile_namespace, wire_config
from modelplane_sidecar.config import parse_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "selfhosted"


def test_the_self_hosted_examples_compile() -> None:
    objects = [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    by_kind: dict[str, list[Resource]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(Resource.from_body(obj))
    slice_ = {
        "metadata": {"name": "s", "namespace": "demo"},
        "ports": [{"name": "http", "port": 8000}],
        "endpoints": [{"addresses": ["10.0.0.7"]}],
    }
    result = compile_namespace(
        NamespaceInputs(
            "demo",
            by_kind["ModelEndpoint"],
            by_kind["RoutingPolicy"],
            secrets={"openai": {"api-key": "sk-example"}},
            slices={("demo", "vllm-llama-8b"): [slice_]},
        )
    )
    assert all(v.ready for v in result.verdicts.values()), result.verdicts
    assert result.config is not None
    shipped = parse_config(wire_config(result.config))
    assert [r.url for r in shipped.endpoint("llama-8b").replicas or ()] == [
        "http://10.0.0.7:8000/v1"
    ]
    assert shipped.endpoint("llama-70b").base_url == "http://llama-70b.demo.svc:8000/v1"
    assert {m.name: m.overflow is not None for m in shipped.models} == {"chat": True, "big": True}
