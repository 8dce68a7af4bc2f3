"""AdmissionReview v1 in, AdmissionReview v1 out: the webhook's logic without any I/O.

A malformed review (not something the apiserver would send) raises `BadReview`, which the HTTP
layer answers with 400. A Pod whose annotations ask for something impossible is *denied* with a
message naming the annotation: the user sees it in `kubectl` and in the ReplicaSet's events.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .decision import should_inject
from .patch import Injection, build_patch, complete_patch
from .settings import InjectionError, InjectionSettings, SidecarSpec

API_VERSION = "admission.k8s.io/v1"


class BadReview(ValueError):
    """The request body is not an AdmissionReview v1 for a Pod."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one Pod (`subject`, namespace/name): `injected`, `updated` (a Pod that
    had the sidecar got what it lacked), `skipped` or `denied`, and why."""

    result: str
    reason: str
    review: dict[str, Any]
    subject: str = ""


def _request(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadReview("expected an AdmissionReview object")
    if body.get("apiVersion") != API_VERSION or body.get("kind") != "AdmissionReview":
        raise BadReview(
            f"expected kind AdmissionReview in {API_VERSION}, got kind {body.get('kind')!r} in "
            f"{body.get('apiVersion')!r}"
        )
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("the AdmissionReview has no request with a uid")
    return request


def _response(uid: str, **fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AdmissionReview",
        "response": {"uid": uid, **fields},
    }


def review_pod(
    body: Any, *, namespace_enabled: bool, settings: InjectionSettings, ca_bundle: str
) -> Outcome:
    """Answer one AdmissionReview for a Pod CREATE (anything else is allowed unchanged)."""
    request = _request(body)
    uid: str = request["uid"]
    kind = request.get("kind") or {}
    pod = request.get("object")
    subject = f"{request.get('namespace') or ''}/{request.get('name') or ''}"
    if (
        request.get("operation") != "CREATE"
        or kind.get("kind") != "Pod"
        or kind.get("group", "") != ""
        or request.get("subResource")
    ):
        return Outcome("skipped", "not a Pod creation", _response(uid, allowed=True), subject)
    if not isinstance(pod, dict):
        raise BadReview("the AdmissionReview for a Pod CREATE carries no Pod object")
    metadata = pod.get("metadata") or {}
    namespace = request.get("namespace") or metadata.get("namespace") or ""
    subject = f"{namespace}/{metadata.get('name') or metadata.get('generateName', '') + '*'}"
    try:
        decision = should_inject(
            pod, namespace, namespace_enabled=namespace_enabled, settings=settings
        )
        if not decision.inject:
            completion = complete_patch(pod) if decision.injected_before else None
            if completion is None or not completion.patch:
                warnings = {"warnings": completion.warnings} if completion else {}
                response = _response(uid, allowed=True, **warnings)
                return Outcome("skipped", decision.reason, response, subject)
            return Outcome("updated", completion.reason, _patched(uid, completion), subject)
        annotations = metadata.get("annotations") or {}
        injection = build_patch(
            pod, SidecarSpec.for_pod(settings, annotations), settings, ca_bundle
        )
    except InjectionError as error:
        message = f"modelplane sidecar injection: {error}"
        status = {"code": 400, "reason": "BadRequest", "message": message}
        return Outcome("denied", str(error), _response(uid, allowed=False, status=status), subject)
    reason = "; ".join(filter(None, (decision.reason, injection.reason)))
    return Outcome("injected", reason, _patched(uid, injection), subject)


def _patched(uid: str, injection: Injection) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "allowed": True,
        "patchType": "JSONPatch",
        "patch": base64.b64encode(orjson.dumps(injection.patch)).decode("ascii"),
    }
    if injection.warnings:
        fields["warnings"] = injection.warnings
    return _response(uid, **fields)
