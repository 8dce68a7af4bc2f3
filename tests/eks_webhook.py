"""A stand-in of EKS's pod-identity-webhook (aws/amazon-eks-pod-identity-webhook): the mutation it
makes to a Pod whose ServiceAccount has an IAM role, and an HTTPS admission server around it.

The mutation follows the upstream handler: per container, the credential variables (IRSA:
`AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`; EKS Pod Identity:
`AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`),
`AWS_STS_REGIONAL_ENDPOINTS` and both region variables are appended unless the container already
has them, and the token volume is mounted unless the container mounts it already; the projected
token volume goes first in `spec.volumes`; the patch replaces `/spec/containers` (and
`/spec/initContainers`) whole. Upstream mutates init containers too; `init_containers=False`
plays a webhook that touches the app containers only (an older build, a Pod annotated with
`eks.amazonaws.com/skip-containers`, or any other credentials webhook that does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from admission_server import PatchingWebhook

REGION = "eu-central-1"
ROLE_ARN = "arn:aws:iam::111122223333:role/bedrock-caller"
IRSA_DIR = "/var/run/secrets/eks.amazonaws.com/serviceaccount"
POD_IDENTITY_DIR = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount"
POD_IDENTITY_URI = "http://169.254.170.23/v1/credentials"


@dataclass(frozen=True)
class Identity:
    """What the webhook gives a Pod: one credential method, its token volume and variables."""

    volume: str
    mount_path: str
    token_path: str
    audience: str
    credentials: tuple[tuple[str, str], ...]


IRSA = Identity(
    volume="aws-iam-token",
    mount_path=IRSA_DIR,
    token_path="token",
    audience="sts.amazonaws.com",
    credentials=(("AWS_ROLE_ARN", ROLE_ARN), ("AWS_WEB_IDENTITY_TOKEN_FILE", f"{IRSA_DIR}/token")),
)
POD_IDENTITY = Identity(
    volume="eks-pod-identity-token",
    mount_path=POD_IDENTITY_DIR,
    token_path="eks-pod-identity-token",
    audience="pods.eks.amazonaws.com",
    credentials=(
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", POD_IDENTITY_URI),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            f"{POD_IDENTITY_DIR}/eks-pod-identity-token",
        ),
    ),
)


def token_volume(identity: Identity) -> dict[str, Any]:
    token = {"audience": identity.audience, "expirationSeconds": 86400, "path": identity.token_path}
    return {"name": identity.volume, "projected": {"sources": [{"serviceAccountToken": token}]}}


def _add_to_container(container: dict[str, Any], identity: Identity) -> bool:
    env = container.setdefault("env", [])
    names = {variable["name"] for variable in env}
    added: list[tuple[str, str]] = []
    if "AWS_STS_REGIONAL_ENDPOINTS" not in names:
        added.append(("AWS_STS_REGIONAL_ENDPOINTS", "regional"))
    if not names & {"AWS_REGION", "AWS_DEFAULT_REGION"}:
        added += [("AWS_DEFAULT_REGION", REGION), ("AWS_REGION", REGION)]
    if not names & {name for name, _ in identity.credentials}:
        added += identity.credentials
    env += [{"name": name, "value": value} for name, value in added]
    mounts = container.setdefault("volumeMounts", [])
    mounted = any(mount["name"] == identity.volume for mount in mounts)
    if not mounted:
        mounts.append({"name": identity.volume, "readOnly": True, "mountPath": identity.mount_path})
    return bool(added) or not mounted


def eks_patch(
    pod: dict[str, Any], identity: Identity = IRSA, *, init_containers: bool = True
) -> list[dict[str, Any]]:
    """The JSON Patch EKS's webhook answers for `pod` (not modified)."""
    spec = pod.get("spec") or {}
    containers = copy.deepcopy(spec.get("containers") or [])
    for container in containers:
        _add_to_container(container, identity)
    patch: list[dict[str, Any]] = []
    volumes = spec.get("volumes")
    if volumes is None:
        patch.append({"op": "add", "path": "/spec/volumes", "value": [token_volume(identity)]})
    elif not any(volume["name"] == identity.volume for volume in volumes):
        patch.append({"op": "add", "path": "/spec/volumes/0", "value": token_volume(identity)})
    patch.append({"op": "add", "path": "/spec/containers", "value": containers})
    if init_containers and spec.get("initContainers"):
        inits = copy.deepcopy(spec["initContainers"])
        for container in inits:
            _add_to_container(container, identity)
        patch.append({"op": "add", "path": "/spec/initContainers", "value": inits})
    return patch


class EksWebhook(PatchingWebhook):
    """The stand-in served over HTTPS on 127.0.0.1; `reviews` holds the reviews it was sent."""

    def __init__(
        self, cert: Path, key: Path, identity: Identity = IRSA, *, init_containers: bool = True
    ) -> None:
        super().__init__(cert, key, self._patch)
        self.identity = identity
        self.init_containers = init_containers

    def _patch(self, review: dict[str, Any]) -> list[dict[str, Any]]:
        pod = review["request"]["object"]
        return eks_patch(pod, self.identity, init_containers=self.init_containers)
