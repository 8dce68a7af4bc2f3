"""What the injector puts into a Pod: cluster-wide settings, and the per-Pod annotations.

`InjectionSettings` is read once when the operator starts (from its flags, which the Helm chart
renders from values.yaml) and validated then, so a bad value stops the operator with a clear
message instead of producing Pods the apiserver rejects. `SidecarSpec.for_pod` applies a Pod's
own overrides (annotations) on top and raises `InjectionError` with a message naming the
annotation when one of them is malformed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

#: Namespace label that turns injection on for every Pod in the namespace.
NAMESPACE_LABEL = "modelplane.io/inject"
NAMESPACE_LABEL_VALUE = "enabled"

#: Pod annotation: "true" asks for the sidecar anywhere, "false" opts a Pod out.
INJECT_ANNOTATION = "modelplane.io/inject"
#: Per-Pod overrides of the sidecar.
IMAGE_ANNOTATION = "modelplane.io/sidecar-image"
PORT_ANNOTATION = "modelplane.io/sidecar-port"
HEALTH_PORT_ANNOTATION = "modelplane.io/sidecar-health-port"
CPU_REQUEST_ANNOTATION = "modelplane.io/sidecar-cpu-request"
CPU_LIMIT_ANNOTATION = "modelplane.io/sidecar-cpu-limit"
MEMORY_REQUEST_ANNOTATION = "modelplane.io/sidecar-memory-request"
MEMORY_LIMIT_ANNOTATION = "modelplane.io/sidecar-memory-limit"
#: Written by the injector: marks an injected Pod, and carries the operator's CA bundle, which
#: the token volume projects into the sidecar as a file (the Downward API can read annotations).
INJECTED_ANNOTATION = "modelplane.io/injected"
CA_BUNDLE_ANNOTATION = "modelplane.io/ca-bundle"

SIDECAR_NAME = "modelplane-sidecar"
TOKEN_VOLUME = "modelplane-token"
STATE_VOLUME = "modelplane-state"
TOKEN_DIR = "/var/run/modelplane"
#: The sidecar keeps its last-known-good config here, to serve it across restarts.
STATE_DIR = "/var/lib/modelplane"
TOKEN_FILE = "token"
CA_FILE = "ca.crt"
#: The audit signing key (a Secret in the Pod's namespace), mounted into the sidecar only.
AUDIT_KEY_VOLUME = "modelplane-audit-key"
AUDIT_KEY_DIR = "/var/run/modelplane-audit"
AUDIT_KEY_FILE = "signing-key.pem"

DEFAULT_EXCLUDED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})

# Kubernetes resource.Quantity: a signed decimal number, then a binary or decimal SI suffix or an
# exponent. The apiserver would reject a bad one too, but naming the annotation helps more.
_QUANTITY = re.compile(
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
)
_IMAGE = re.compile(r"^[^\s]+$")
# A Secret's name (DNS-1123 subdomain) and a key of its data, as the apiserver checks them.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
# The kubelet refuses shorter-lived projected tokens.
_MIN_TOKEN_SECONDS = 600


class InjectionError(ValueError):
    """The Pod asks for something the injector cannot do; the message names the cause."""


def _check_port(value: int, what: str) -> int:
    if not 1 <= value <= 65535:
        raise InjectionError(f"{what} must be a port number between 1 and 65535, not {value}")
    return value


def _check_quantity(value: str, what: str) -> str:
    if not _QUANTITY.match(value):
        raise InjectionError(
            f"{what} must be a Kubernetes quantity such as 100m, 0.5, 128Mi or 1Gi, not {value!r}"
        )
    return value


@dataclass(frozen=True)
class SidecarResources:
    """Requests and limits of the sidecar container (Kubernetes quantity strings)."""

    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "1"
    memory_limit: str = "256Mi"

    def __post_init__(self) -> None:
        for name in ("cpu_request", "memory_request", "cpu_limit", "memory_limit"):
            _check_quantity(getattr(self, name), f"sidecar {name.replace('_', ' ')}")

    def as_kubernetes(self) -> dict[str, dict[str, str]]:
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


@dataclass(frozen=True)
class AuditSigningKey:
    """A Secret, in each injected Pod's namespace, holding the sidecar's audit signing key.

    The platform team creates it (`modelplane audit keygen`) and publishes its public half;
    verifiers pin that (`modelplane audit verify --public-key`). The kubelet mounts it into the
    sidecar container alone, as a file: never an environment variable, never in the Pod spec.
    """

    secret_name: str
    #: The key of the Secret's data holding the PEM (PKCS#8) Ed25519 private key.
    key: str = AUDIT_KEY_FILE

    def __post_init__(self) -> None:
        if len(self.secret_name) > 253 or not _SECRET_NAME.match(self.secret_name):
            raise InjectionError(
                "the audit signing key Secret must be a Secret name (lower-case letters, "
                f"digits, '-' and '.'), not {self.secret_name!r}"
            )
        if len(self.key) > 253 or not _SECRET_KEY.match(self.key):
            raise InjectionError(
                "the audit signing key's key in the Secret must be letters, digits, '-', '_' "
                f"or '.', not {self.key!r}"
            )


@dataclass(frozen=True)
class InjectionSettings:
    """Cluster-wide injection settings, validated on construction."""

    image: str
    control_plane_url: str
    image_pull_policy: str = "IfNotPresent"
    port: int = 15000
    health_port: int = 15021
    resources: SidecarResources = field(default_factory=SidecarResources)
    token_audience: str = "modelplane"
    token_expiration_seconds: int = 3600
    run_as_user: int = 65532
    log_level: str = "info"
    #: Injected sidecars write their audit trail to stdout (`--audit-log -`), for the cluster's
    #: log pipeline; their JSON logs go to stderr (docs/observability.md).
    audit_log: bool = True
    #: A stable signing key for the audit checkpoints; None: each sidecar run makes its own.
    audit_signing_key: AuditSigningKey | None = None
    excluded_namespaces: frozenset[str] = DEFAULT_EXCLUDED_NAMESPACES

    def __post_init__(self) -> None:
        if not _IMAGE.match(self.image):
            raise InjectionError(f"sidecar image must be an image reference, not {self.image!r}")
        url = urlsplit(self.control_plane_url)
        if url.scheme != "https" or not url.hostname:
            raise InjectionError(
                "the control-plane URL must be an https:// URL of the operator's config stream, "
                f"not {self.control_plane_url!r}"
            )
        if self.image_pull_policy not in _PULL_POLICIES:
            raise InjectionError(
                f"image pull policy must be one of {', '.join(_PULL_POLICIES)}, "
                f"not {self.image_pull_policy!r}"
            )
        _check_port(self.port, "sidecar port")
        _check_port(self.health_port, "sidecar health port")
        if self.port == self.health_port:
            raise InjectionError(f"sidecar port and health port are both {self.port}")
        if not self.token_audience:
            raise InjectionError("the token audience must not be empty")
        if self.token_expiration_seconds < _MIN_TOKEN_SECONDS:
            raise InjectionError(
                f"token expiration must be at least {_MIN_TOKEN_SECONDS} seconds, "
                f"not {self.token_expiration_seconds}"
            )
        if self.run_as_user <= 0:
            raise InjectionError(f"the sidecar must run as a non-root uid, not {self.run_as_user}")
        if self.audit_signing_key is not None and not self.audit_log:
            raise InjectionError(
                "an audit signing key Secret is set but the sidecar audit log is off: "
                "turn the audit log on or drop the key"
            )
        # Even if the chart's selectors are edited, kube-system is never injected.
        object.__setattr__(
            self, "excluded_namespaces", frozenset(self.excluded_namespaces) | {"kube-system"}
        )


@dataclass(frozen=True)
class SidecarSpec:
    """The sidecar for one Pod: the settings with that Pod's annotation overrides applied."""

    image: str
    port: int
    health_port: int
    resources: SidecarResources

    @classmethod
    def for_pod(cls, settings: InjectionSettings, annotations: Mapping[str, Any]) -> SidecarSpec:
        def text(key: str) -> str | None:
            value = annotations.get(key)
            return None if value is None else str(value).strip()

        image = text(IMAGE_ANNOTATION) or settings.image
        if not _IMAGE.match(image):
            raise InjectionError(f"annotation {IMAGE_ANNOTATION}: {image!r} is not an image")
        port = _port_annotation(text(PORT_ANNOTATION), PORT_ANNOTATION, settings.port)
        health_port = _port_annotation(
            text(HEALTH_PORT_ANNOTATION), HEALTH_PORT_ANNOTATION, settings.health_port
        )
        if port == health_port:
            raise InjectionError(
                f"the sidecar port and health port are both {port}; set {PORT_ANNOTATION} or "
                f"{HEALTH_PORT_ANNOTATION} to a different port"
            )
        resources = settings.resources
        for key, attribute in (
            (CPU_REQUEST_ANNOTATION, "cpu_request"),
            (CPU_LIMIT_ANNOTATION, "cpu_limit"),
            (MEMORY_REQUEST_ANNOTATION, "memory_request"),
            (MEMORY_LIMIT_ANNOTATION, "memory_limit"),
        ):
            value = text(key)
            if value is not None:
                resources = replace(resources, **{attribute: _check_quantity(value, key)})
        return cls(image=image, port=port, health_port=health_port, resources=resources)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _port_annotation(value: str | None, key: str, default: int) -> int:
    if value is None:
        return default
    try:
        port = int(value)
    except ValueError:
        raise InjectionError(f"annotation {key}: {value!r} is not a port number") from None
    return _check_port(port, f"annotation {key}")
