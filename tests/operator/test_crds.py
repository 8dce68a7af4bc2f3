"""crds/ is generated from the pydantic models; these tests keep the two in step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from modelplane_operator import crdgen
from modelplane_operator.crd_models import KINDS

CRDS = Path(__file__).resolve().parents[2] / "crds"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in node.items():
            out.extend(_walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(_walk(value, f"{path}[{i}]"))
    return out


def test_crds_directory_is_up_to_date() -> None:
    stale = crdgen.stale(CRDS)

    assert not stale, f"crds/ is stale ({', '.join(stale)}): run `modelplane crds` and commit"


def test_every_kind_has_status_subresource_columns_and_short_names() -> None:
    for kind in KINDS:
        crd = yaml.safe_load((CRDS / crdgen.file_name(kind)).read_text())
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Ready", "Age"}
        assert crd["spec"]["names"]["shortNames"]
        assert crd["spec"]["scope"] == "Namespaced"


def test_schemas_are_structural() -> None:
    """No JSON-Schema-only keywords a Kubernetes structural schema rejects."""
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"}
    for kind in KINDS:
        schema = crdgen.crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            if path.endswith(".properties"):
                continue  # property names, not keywords
            assert not forbidden & node.keys(), f"{kind.kind}{path}: {forbidden & node.keys()}"
            assert node.get("additionalProperties") is not False, f"{kind.kind}{path}"
            if "properties" in node or "items" in node:
                assert "type" in node, f"{kind.kind}{path} has no type"


def test_schema_carries_enums_minimums_required_and_cel() -> None:
    spec = crdgen.crd_for(KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    endpoint = spec["properties"]["spec"]
    assert endpoint["required"] == ["provider", "model"]
    assert "anthropic" in endpoint["properties"]["provider"]["enum"]
    assert endpoint["properties"]["pricing"]["properties"]["inputPerMTok"]["minimum"] == 0
    timeouts = endpoint["properties"]["timeouts"]["properties"]["connectSeconds"]
    assert timeouts["exclusiveMinimum"] is True
    assert timeouts["default"] == 5.0
    rules = [v["rule"] for v in endpoint["x-kubernetes-validations"]]
    assert any("has(self.template)" in r and "has(self.serviceRef)" in r for r in rules)
    assert endpoint["properties"]["options"]["x-kubernetes-preserve-unknown-fields"] is True
