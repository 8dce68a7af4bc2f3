"""Sidecar injection: a mutating admission webhook that adds the routing sidecar to app Pods.

Pure parts (tested without a cluster): `settings` (what to inject, per-Pod overrides),
`decision` (should this Pod get the sidecar?), `patch` (the JSON Patch), `aws_credentials`
(what of EKS's AWS credentials the sidecar gets from the app containers), `admission`
(AdmissionReview in and out), `certs` (the CA and serving certificate). I/O parts: `webhook` (the
aiohttp HTTPS server) and `keeper` (stores the certificates in a Secret, patches the webhook
configuration's caBundle, rotates them before they expire).
"""

from .admission import BadReview, Outcome, review_pod
from .decision import Decision, already_injected, should_inject
from .patch import Injection, build_patch, complete_patch
from .settings import InjectionError, InjectionSettings, SidecarResources, SidecarSpec

__all__ = [
    "BadReview",
    "Decision",
    "Injection",
    "InjectionError",
    "InjectionSettings",
    "Outcome",
    "SidecarResources",
    "SidecarSpec",
    "already_injected",
    "build_patch",
    "complete_patch",
    "review_pod",
    "should_inject",
]
