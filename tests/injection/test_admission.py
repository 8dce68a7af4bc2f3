"""AdmissionReview v1 handling: response shape, patch encoding, denials, pass-through."""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch
import pytest

from modelplane_operator.injection import BadReview, InjectionSettings, review_pod

SETTINGS = InjectionSettings(image="sidecar:1", control_plane_url="https://operator:8443")
CA = "ca-pem"


def review(pod: dict[str, Any], operation: str = "CREATE", **request: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "apps",
            "operation": operation,
            "object": pod,
            **request,
        },
    }


POD = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "app", "image": "a:1"}]}}


def test_injection_answers_with_a_base64_json_patch() -> None:
    outcome = review_pod(review(POD), namespace_enabled=True, settings=SETTINGS, ca_bundle=CA)

    assert outcome.result == "injected"
    body = outcome.review
    assert (body["apiVersion"], body["kind"]) == ("admission.k8s.io/v1", "AdmissionReview")
    response = body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    patched = jsonpatch.apply_patch(POD, patch)
    assert patched["spec"]["initContainers"][0]["name"] == "modelplane-sidecar"
    assert "warnings" not in response


def test_skipped_pod_is_allowed_without_a_patch() -> None:
    outcome = review_pod(review(POD), namespace_enabled=False, settings=SETTINGS, ca_bundle=CA)

    assert (outcome.result, outcome.reason) == (
        "skipped",
        "namespace apps does not have injection enabled",
    )
    assert outcome.review["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }


@pytest.mark.parametrize(
    "request_fields",
    [
        {"operation": "UPDATE"},
        {"subResource": "ephemeralcontainers"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    ],
)
def test_anything_but_pod_create_passes_through(request_fields: dict[str, Any]) -> None:
    body = review(POD)
    body["request"].update(request_fields)
    outcome = review_pod(body, namespace_enabled=True, settings=SETTINGS, ca_bundle=CA)
    assert outcome.result == "skipped"
    assert outcome.review["response"]["allowed"] is True
    assert "patch" not in outcome.review["response"]


def test_bad_annotation_denies_the_pod_with_the_reason() -> None:
    pod = {**POD, "metadata": {"name": "p", "annotations": {"modelplane.io/sidecar-port": "x"}}}

    outcome = review_pod(review(pod), namespace_enabled=True, settings=SETTINGS, ca_bundle=CA)

    assert outcome.result == "denied"
    assert outcome.review["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": False,
        "status": {
            "code": 400,
            "reason": "BadRequest",
            "message": "modelplane sidecar injection: annotation modelplane.io/sidecar-port: "
            "'x' is not a port number",
        },
    }


def test_namespace_falls_back_to_the_pod_metadata() -> None:
    body = review({**POD, "metadata": {"name": "p", "namespace": "kube-system"}})
    del body["request"]["namespace"]
    outcome = review_pod(body, namespace_enabled=True, settings=SETTINGS, ca_bundle=CA)
    assert (outcome.result, outcome.reason) == (
        "skipped",
        "namespace kube-system is never injected",
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected an AdmissionReview object"),
        (
            {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"},
            "expected kind AdmissionReview in admission.k8s.io/v1, got kind 'AdmissionReview' "
            "in 'admission.k8s.io/v1beta1'",
        ),
        (
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}},
            "the AdmissionReview has no request with a uid",
        ),
        (review(POD, object=None), "carries no Pod object"),
    ],
)
def test_malformed_reviews_are_rejected(body: Any, message: str) -> None:
    with pytest.raises(BadReview, match=message):
        review_pod(body, namespace_enabled=True, settings=SETTINGS, ca_bundle=CA)
