"""The JSON Patch (RFC 6902) that injects the sidecar into a Pod: a pure function of the Pod.

What the patch adds:
- the sidecar as a native sidecar (the first init container, `restartPolicy: Always`), so it
  starts before the app, keeps running next to it and does not keep a Job's Pod alive;
- one projected volume with a ServiceAccount token for the `modelplane` audience and the operator's
  CA bundle (projected from an annotation through the Downward API, so no per-namespace ConfigMap
  has to exist), and a small emptyDir where the sidecar keeps its last-known-good config;
- with an audit signing key configured, that Secret (of the Pod's namespace) as a volume mounted
  read-only into the sidecar container alone, and `--audit-key` pointing at the file;
- to every app container, unless the container sets them itself: the OpenAI and Anthropic base
  URLs pointing at the sidecar on 127.0.0.1, and placeholder API keys, so stock SDKs route through
  the sidecar unchanged;
- the `modelplane.io/injected` and `modelplane.io/ca-bundle` annotations;
- to the sidecar, the AWS credentials (IRSA or EKS Pod Identity variables and token mount) that
  EKS's webhook gave the app containers, when it ran first (see `aws_credentials`).

Every operation appends or creates; nothing the Pod already has is replaced or reordered, except
that the sidecar goes in front of existing init containers. Callers check `should_inject` first:
the patch for an already injected Pod is never built. For such a Pod (the apiserver re-invokes
the webhook after another webhook changed the Pod), `complete_patch` adds only the AWS
credentials the sidecar still lacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .aws_credentials import credentials_to_copy
from .settings import (
    AUDIT_KEY_DIR,
    AUDIT_KEY_FILE,
    AUDIT_KEY_VOLUME,
    CA_BUNDLE_ANNOTATION,
    CA_FILE,
    INJECTED_ANNOTATION,
    SIDECAR_NAME,
    STATE_DIR,
    STATE_VOLUME,
    TOKEN_DIR,
    TOKEN_FILE,
    TOKEN_VOLUME,
    InjectionError,
    InjectionSettings,
    SidecarSpec,
)

JsonPatch = list[dict[str, Any]]

#: The sidecar's health port, which also serves /metrics (charts: metrics.podMonitor).
METRICS_PORT_NAME = "mp-metrics"
#: The key apps send is never used: the sidecar holds the real provider credentials.
PLACEHOLDER_API_KEY = "modelplane-sidecar"
_BASE_URL_VARIABLES = ("OPENAI_BASE_URL", "OPENAI_API_BASE", "ANTHROPIC_BASE_URL")


@dataclass(frozen=True)
class Injection:
    """The patch for one Pod, warnings the apiserver shows the client (kubectl prints them), and
    what it adds besides the sidecar, for the log (names only, never values)."""

    patch: JsonPatch
    warnings: list[str] = field(default_factory=list)
    reason: str = ""


def _escape(part: str | int) -> str:
    text = str(part)
    if "~" in text or "/" in text:
        return text.replace("~", "~0").replace("/", "~1")
    return text


def _pointer(*parts: str | int) -> str:
    """A JSON Pointer (RFC 6901): `~` and `/` inside a part are escaped."""
    return "/" + "/".join(map(_escape, parts))


def app_environment(spec: SidecarSpec) -> list[dict[str, str]]:
    """What stock SDKs read: the OpenAI SDK (v1 and the legacy v0 name), the Anthropic SDK."""
    return [
        {"name": "OPENAI_BASE_URL", "value": f"{spec.base_url}/v1"},
        {"name": "OPENAI_API_BASE", "value": f"{spec.base_url}/v1"},
        {"name": "ANTHROPIC_BASE_URL", "value": spec.base_url},
        {"name": "OPENAI_API_KEY", "value": PLACEHOLDER_API_KEY},
        {"name": "ANTHROPIC_API_KEY", "value": PLACEHOLDER_API_KEY},
    ]


def sidecar_container(spec: SidecarSpec, settings: InjectionSettings) -> dict[str, Any]:
    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": spec.health_port},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        }

    return {
        "name": SIDECAR_NAME,
        "image": spec.image,
        "imagePullPolicy": settings.image_pull_policy,
        # A restartable init container is a native sidecar (Kubernetes >= 1.29).
        "restartPolicy": "Always",
        "command": [
            "modelplane",
            "serve",
            "--control-plane",
            settings.control_plane_url,
            "--token-file",
            f"{TOKEN_DIR}/{TOKEN_FILE}",
            "--ca-file",
            f"{TOKEN_DIR}/{CA_FILE}",
            "--state-dir",
            STATE_DIR,
            # Apps reach the router on loopback only: nothing else in the cluster can use the
            # credentials it holds. The kubelet's probes reach the pod IP, hence a health port.
            "--host",
            "127.0.0.1",
            "--port",
            str(spec.port),
            "--health-port",
            str(spec.health_port),
            "--log-level",
            settings.log_level,
            *(("--audit-log", "-") if settings.audit_log else ()),
            *(
                ("--audit-key", f"{AUDIT_KEY_DIR}/{AUDIT_KEY_FILE}")
                if settings.audit_signing_key is not None
                else ()
            ),
        ],
        "env": [
            {
                "name": "MODELPLANE_POD_NAME",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
            },
            {
                "name": "MODELPLANE_POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            # Who the audit records name as the caller (read once at start).
            {
                "name": "MODELPLANE_POD_SERVICE_ACCOUNT",
                "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
            },
        ],
        # Named so a PodMonitor can find every sidecar's /metrics (served on the health port).
        "ports": [
            {"name": METRICS_PORT_NAME, "containerPort": spec.health_port, "protocol": "TCP"}
        ],
        "resources": spec.resources.as_kubernetes(),
        # The app containers start once the sidecar listens; readiness follows the config.
        "startupProbe": probe("/healthz", 1, 60),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": STATE_DIR},
            *(
                [{"name": AUDIT_KEY_VOLUME, "mountPath": AUDIT_KEY_DIR, "readOnly": True}]
                if settings.audit_signing_key is not None
                else []
            ),
        ],
    }


def token_volume(settings: InjectionSettings) -> dict[str, Any]:
    annotation = f"metadata.annotations['{CA_BUNDLE_ANNOTATION}']"
    return {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": settings.token_audience,
                        "expirationSeconds": settings.token_expiration_seconds,
                        "path": TOKEN_FILE,
                    }
                },
                {
                    "downwardAPI": {
                        "items": [{"path": CA_FILE, "fieldRef": {"fieldPath": annotation}}]
                    }
                },
            ]
        },
    }


def state_volume() -> dict[str, Any]:
    return {"name": STATE_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}}


def audit_key_volume(settings: InjectionSettings) -> list[dict[str, Any]]:
    """The signing key Secret as a volume (none without a configured key).

    Not optional: without the Secret the kubelet does not start the Pod and its Events name the
    Secret, rather than the sidecar silently signing with a key nobody pinned. Only the sidecar
    container mounts the volume, so app containers never see the file; it is world-readable
    (0444) inside that mount because the kubelet makes Secret files root-owned and the sidecar
    runs as a non-root uid without the Pod having to set an fsGroup.
    """
    key = settings.audit_signing_key
    if key is None:
        return []
    return [
        {
            "name": AUDIT_KEY_VOLUME,
            "secret": {
                "secretName": key.secret_name,
                "items": [{"key": key.key, "path": AUDIT_KEY_FILE, "mode": 0o444}],
            },
        }
    ]


def _check_conflicts(
    spec: Mapping[str, Any], sidecar: SidecarSpec, settings: InjectionSettings
) -> None:
    reserved = {TOKEN_VOLUME, STATE_VOLUME}
    if settings.audit_signing_key is not None:
        reserved.add(AUDIT_KEY_VOLUME)
    for volume in spec.get("volumes") or []:
        if volume.get("name") in reserved:
            raise InjectionError(
                f"the Pod already has a volume named {volume['name']}, which the modelplane "
                "sidecar needs; rename it"
            )
    taken = {sidecar.port: "port", sidecar.health_port: "health port"}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for declared in container.get("ports") or []:
            what = taken.get(declared.get("containerPort"))
            if what is not None:
                raise InjectionError(
                    f"container {container.get('name')!r} declares containerPort "
                    f"{declared['containerPort']}, the modelplane sidecar's {what}; choose "
                    "another with the modelplane.io/sidecar-port or "
                    "modelplane.io/sidecar-health-port annotation"
                )


def _add_list_items(path: Sequence[str | int], existing: Any, items: list[Any]) -> JsonPatch:
    if not items:
        return []
    if existing is None:
        return [{"op": "add", "path": _pointer(*path), "value": items}]
    return [{"op": "add", "path": _pointer(*path, "-"), "value": item} for item in items]


def _environment_patch(spec: Mapping[str, Any], sidecar: SidecarSpec) -> Injection:
    patch: JsonPatch = []
    warnings: list[str] = []
    wanted = app_environment(sidecar)
    for index, container in enumerate(spec.get("containers") or []):
        env = container.get("env")
        present = {variable.get("name") for variable in env or []}
        patch += _add_list_items(
            ("spec", "containers", index, "env"),
            env,
            [variable for variable in wanted if variable["name"] not in present],
        )
        for name in _BASE_URL_VARIABLES:
            if name in present:
                warnings.append(
                    f"container {container.get('name')!r} sets {name} itself; its calls go "
                    "where that says, not necessarily through the modelplane sidecar"
                )
    return Injection(patch, warnings)


def build_patch(
    pod: Mapping[str, Any], sidecar: SidecarSpec, settings: InjectionSettings, ca_bundle: str
) -> Injection:
    """The patch injecting `sidecar` into `pod`; raises `InjectionError` on a conflict."""
    spec = pod.get("spec") or {}
    _check_conflicts(spec, sidecar, settings)
    patch: JsonPatch = []
    init_containers = spec.get("initContainers")
    container = sidecar_container(sidecar, settings)
    aws = credentials_to_copy(spec, container, SIDECAR_NAME)
    if aws is not None:
        container["env"] += aws.env
        container["volumeMounts"] += aws.mounts
    if init_containers:
        patch.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
    else:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    patch += _add_list_items(
        ("spec", "volumes"),
        spec.get("volumes"),
        [token_volume(settings), state_volume(), *audit_key_volume(settings)],
    )
    if not spec.get("serviceAccountName") and not spec.get("serviceAccount"):
        # The apiserver refuses a projected token without a ServiceAccount. Clusters normally
        # set `default` before webhooks run (the ServiceAccount admission plugin); do the same
        # where that plugin is off, rather than produce a Pod that fails validation.
        patch.append({"op": "add", "path": "/spec/serviceAccountName", "value": "default"})
    environment = _environment_patch(spec, sidecar)
    patch += environment.patch
    marks = {INJECTED_ANNOTATION: "true", CA_BUNDLE_ANNOTATION: ca_bundle}
    annotations = (pod.get("metadata") or {}).get("annotations")
    if annotations is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": marks})
    else:
        patch += [
            {"op": "add", "path": _pointer("metadata", "annotations", key), "value": value}
            for key, value in marks.items()
        ]
    if aws is None:
        return Injection(patch, environment.warnings)
    return Injection(patch, environment.warnings + aws.warnings, aws.describe() if aws else "")


def _find_sidecar(spec: Mapping[str, Any]) -> tuple[str, int, Mapping[str, Any]] | None:
    for list_name in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(list_name) or []):
            if container.get("name") == SIDECAR_NAME:
                return list_name, index, container
    return None


def complete_patch(pod: Mapping[str, Any]) -> Injection | None:
    """For a Pod that already has the sidecar: the patch adding the AWS credentials of its app
    containers that the sidecar lacks; None when it lacks nothing or the Pod has no sidecar.

    The apiserver re-invokes the webhook (`reinvocationPolicy: IfNeeded`) when a webhook that ran
    after it changed the Pod, e.g. EKS's adding credentials to the app containers only.
    """
    spec = pod.get("spec") or {}
    found = _find_sidecar(spec)
    if found is None:
        return None
    list_name, index, sidecar = found
    aws = credentials_to_copy(spec, sidecar, SIDECAR_NAME)
    if aws is None or not (aws or aws.warnings):
        return None
    at = ("spec", list_name, index)
    patch = _add_list_items((*at, "env"), sidecar.get("env"), aws.env)
    patch += _add_list_items((*at, "volumeMounts"), sidecar.get("volumeMounts"), aws.mounts)
    return Injection(patch, aws.warnings, aws.describe() if aws else "")
