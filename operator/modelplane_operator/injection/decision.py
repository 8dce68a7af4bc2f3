"""Should this Pod get the sidecar? A pure function of the Pod and where it is created.

The webhook configuration already narrows what the apiserver sends (two webhooks: one for
namespaces labelled `modelplane.io/inject=enabled`, one for the rest, which only injects Pods that
ask for it). This function decides again from first principles, so a hand-edited webhook
configuration can never make the injector touch kube-system, hostNetwork Pods or a Pod that
already has the sidecar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .settings import (
    INJECT_ANNOTATION,
    INJECTED_ANNOTATION,
    SIDECAR_NAME,
    InjectionError,
    InjectionSettings,
)


@dataclass(frozen=True)
class Decision:
    inject: bool
    reason: str
    #: The Pod has the sidecar already (a re-invocation, or a copied spec): it may still need
    #: what other webhooks added after the injection (`patch.complete_patch`).
    injected_before: bool = False


def already_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if any(container.get("name") == SIDECAR_NAME for container in containers):
        return True
    return INJECTED_ANNOTATION in ((pod.get("metadata") or {}).get("annotations") or {})


def _pod_choice(annotations: Mapping[str, Any]) -> bool | None:
    value = annotations.get(INJECT_ANNOTATION)
    if value is None:
        return None
    choice = str(value).strip().lower()
    if choice not in ("true", "false"):
        raise InjectionError(
            f'annotation {INJECT_ANNOTATION} must be "true" or "false", not {str(value)!r}'
        )
    return choice == "true"


def should_inject(
    pod: Mapping[str, Any],
    namespace: str,
    *,
    namespace_enabled: bool,
    settings: InjectionSettings,
) -> Decision:
    """Decide for a Pod being created in `namespace`.

    `namespace_enabled` says whether the namespace carries `modelplane.io/inject=enabled` (the
    webhook knows it from which of its two webhooks was called). Raises `InjectionError` for a
    malformed `modelplane.io/inject` annotation.
    """
    if namespace in settings.excluded_namespaces:
        return Decision(False, f"namespace {namespace} is never injected")
    if (pod.get("spec") or {}).get("hostNetwork"):
        return Decision(False, "hostNetwork Pods are never injected")
    if already_injected(pod):
        return Decision(False, "the Pod already has the modelplane sidecar", injected_before=True)
    choice = _pod_choice((pod.get("metadata") or {}).get("annotations") or {})
    if choice is False:
        return Decision(False, f'the Pod opts out with {INJECT_ANNOTATION}: "false"')
    if choice is True:
        return Decision(True, f'the Pod asks for the sidecar with {INJECT_ANNOTATION}: "true"')
    if namespace_enabled:
        return Decision(True, f"namespace {namespace} has injection enabled")
    return Decision(False, f"namespace {namespace} does not have injection enabled")
