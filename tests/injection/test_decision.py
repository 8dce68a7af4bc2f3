"""Who gets the sidecar: namespace label, Pod annotation, opt-out, and the never-inject cases."""

from __future__ import annotations

from typing import Any

import pytest

from modelplane_operator.injection import InjectionError, InjectionSettings, should_inject

SETTINGS = InjectionSettings(image="sidecar:1", control_plane_url="https://operator:8443")


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p"}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": {"containers": [{"name": "app"}], **spec}}


@pytest.mark.parametrize(
    ("the_pod", "namespace", "enabled", "inject", "reason"),
    [
        (pod(), "apps", True, True, "namespace apps has injection enabled"),
        (pod(), "apps", False, False, "namespace apps does not have injection enabled"),
        (
            pod({"modelplane.io/inject": "true"}),
            "apps",
            False,
            True,
            'the Pod asks for the sidecar with modelplane.io/inject: "true"',
        ),
        (
            pod({"modelplane.io/inject": "false"}),
            "apps",
            True,
            False,
            'the Pod opts out with modelplane.io/inject: "false"',
        ),
        (pod({"modelplane.io/inject": " True "}), "apps", False, True, None),
        (pod({"modelplane.io/inject": "true"}), "kube-system", True, False, None),
        (pod(), "kube-public", True, False, "namespace kube-public is never injected"),
        (
            pod({"modelplane.io/inject": "true"}, hostNetwork=True),
            "apps",
            True,
            False,
            "hostNetwork Pods are never injected",
        ),
        (pod(hostNetwork=False), "apps", True, True, None),
    ],
)
def test_decision(
    the_pod: dict[str, Any], namespace: str, enabled: bool, inject: bool, reason: str | None
) -> None:
    decision = should_inject(the_pod, namespace, namespace_enabled=enabled, settings=SETTINGS)
    assert decision.inject is inject
    if reason is not None:
        assert decision.reason == reason


def test_kube_system_is_excluded_even_when_the_settings_forget_it() -> None:
    settings = InjectionSettings(
        image="sidecar:1",
        control_plane_url="https://operator:8443",
        excluded_namespaces=frozenset(),
    )
    decision = should_inject(pod(), "kube-system", namespace_enabled=True, settings=settings)
    assert (decision.inject, decision.reason) == (False, "namespace kube-system is never injected")


def test_malformed_inject_annotation_is_an_error() -> None:
    with pytest.raises(InjectionError, match='must be "true" or "false", not \'yes\''):
        should_inject(
            pod({"modelplane.io/inject": "yes"}), "apps", namespace_enabled=True, settings=SETTINGS
        )
