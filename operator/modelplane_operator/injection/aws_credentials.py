"""AWS credentials that EKS gives the app containers, copied into the injected sidecar.

On EKS a Pod gets temporary AWS credentials from EKS's own mutating webhook
(amazon-eks-pod-identity-webhook): for IRSA it adds `AWS_ROLE_ARN`, `AWS_WEB_IDENTITY_TOKEN_FILE`
and the projected token volume `aws-iam-token`; for EKS Pod Identity
`AWS_CONTAINER_CREDENTIALS_FULL_URI`, `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` and the volume
`eks-pod-identity-token`; with either, `AWS_REGION` / `AWS_DEFAULT_REGION` and
`AWS_STS_REGIONAL_ENDPOINTS`. Mutating webhooks run in no guaranteed order, so when that webhook
runs before the injector, the sidecar (the one container that calls Bedrock) would go without.

This module works out what to copy: exactly those variables, from the first app container that
has credentials, and the mount that holds the token file when its volume is a ServiceAccount
token volume and nothing else. Nothing else of the app's environment is ever copied, and a
variable or mount the sidecar already has is kept as it is, so EKS's webhook, re-invoked after
the injector, finds everything in place and adds nothing twice.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Variables that name AWS credentials (IRSA, then EKS Pod Identity): a container with one of
#: them is a source.
CREDENTIAL_VARIABLES = (
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)
#: Everything EKS's webhook sets, and so everything the sidecar may get from an app container.
COPIED_VARIABLES = frozenset(
    (*CREDENTIAL_VARIABLES, "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_STS_REGIONAL_ENDPOINTS")
)
#: Variables holding the path of a token file that must be mounted into the sidecar too.
TOKEN_FILE_VARIABLES = ("AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")


@dataclass(frozen=True)
class CredentialCopy:
    """What the sidecar lacks of `source`'s AWS credentials: env entries and volume mounts."""

    source: str
    env: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.env or self.mounts)

    def describe(self) -> str:
        """Names only, never values: this goes into logs and the review's reason."""
        copied = [entry["name"] for entry in self.env]
        copied += [f"volume {mount['name']}" for mount in self.mounts]
        return f"AWS credentials of container {self.source!r} copied into the sidecar: " + (
            ", ".join(copied)
        )


def _names(entries: Iterable[Mapping[str, Any]] | None) -> set[str]:
    return {str(entry.get("name")) for entry in entries or []}


def _token_only(volume: Mapping[str, Any] | None) -> bool:
    """A projected volume of ServiceAccount tokens alone: mounting it shows the sidecar no data
    of the app's, only a token the Pod's ServiceAccount could request anyway."""
    sources = ((volume or {}).get("projected") or {}).get("sources") or []
    return bool(sources) and all(set(source) == {"serviceAccountToken"} for source in sources)


def _covering_mount(container: Mapping[str, Any], path: str) -> Mapping[str, Any] | None:
    """The container's mount that holds the file `path` (the deepest one, as the kernel sees)."""
    covering = [
        mount
        for mount in container.get("volumeMounts") or []
        if (directory := str(mount.get("mountPath") or "").rstrip("/"))
        and (path == directory or path.startswith(directory + "/"))
    ]
    return max(covering, key=lambda mount: len(str(mount["mountPath"]).rstrip("/")), default=None)


def _source(containers: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for container in containers:
        if _names(container.get("env")) & set(CREDENTIAL_VARIABLES):
            return container
    return None


def credentials_to_copy(
    spec: Mapping[str, Any], sidecar: Mapping[str, Any], sidecar_name: str
) -> CredentialCopy | None:
    """What `sidecar` (a container of the Pod `spec`, or about to be one) lacks of the AWS
    credentials of the Pod's first app container that has some; None when no app container
    has any."""
    apps = [c for c in spec.get("containers") or [] if c.get("name") != sidecar_name]
    source = _source(apps)
    if source is None:
        return None
    name = str(source.get("name"))
    present = _names(sidecar.get("env"))
    env: list[dict[str, Any]] = []
    for entry in source.get("env") or []:
        variable = entry.get("name")
        if variable in COPIED_VARIABLES and variable not in present:
            env.append(copy.deepcopy(dict(entry)))
            present.add(variable)
    # The token files the sidecar will read: its own value of the variable where it has one.
    effective = {entry.get("name"): entry.get("value") for entry in source.get("env") or []}
    effective.update({entry.get("name"): entry.get("value") for entry in sidecar.get("env") or []})
    volumes = {volume.get("name"): volume for volume in spec.get("volumes") or []}
    mounted_volumes = _names(sidecar.get("volumeMounts"))
    mounted_paths = {
        str(mount.get("mountPath") or "").rstrip("/") for mount in sidecar.get("volumeMounts") or []
    }
    mounts: list[dict[str, Any]] = []
    warnings: list[str] = []
    for variable in TOKEN_FILE_VARIABLES:
        path = effective.get(variable)
        if not isinstance(path, str) or not path:
            continue
        mount = _covering_mount(source, path)
        if mount is None or mount.get("name") in mounted_volumes:
            continue
        volume = str(mount.get("name"))
        directory = str(mount.get("mountPath") or "").rstrip("/")
        if not _token_only(volumes.get(volume)):
            warnings.append(
                f"container {name!r} reads {variable} from volume {volume!r}, which is not a "
                "ServiceAccount token volume: the modelplane sidecar does not mount it"
            )
            continue
        if directory in mounted_paths:
            warnings.append(
                f"the modelplane sidecar already mounts something at {directory}; volume "
                f"{volume!r} ({variable} of container {name!r}) is not mounted into it"
            )
            continue
        copied = {"name": volume, "mountPath": mount["mountPath"], "readOnly": True}
        if mount.get("subPath"):
            copied["subPath"] = mount["subPath"]
        mounts.append(copied)
        mounted_volumes.add(volume)
        mounted_paths.add(directory)
    return CredentialCopy(name, env, mounts, warnings)
