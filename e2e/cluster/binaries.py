"""Where the control-plane binaries live: the per-version cache that build-binaries.sh fills.

The versions here and in build-binaries.sh must agree; both honour MODELPLANE_K8S_CACHE so a
developer can point the harness at binaries built elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

K8S_VERSION = "v1.34.4"
BUILD_SCRIPT = Path(__file__).with_name("build-binaries.sh")


class MissingBinaries(RuntimeError):
    """The cache lacks a binary; the message says how to build it."""


@dataclass(frozen=True)
class Binaries:
    bin_dir: Path

    @property
    def etcd(self) -> Path:
        return self.bin_dir / "etcd"

    @property
    def kube_apiserver(self) -> Path:
        return self.bin_dir / "kube-apiserver"

    @property
    def kube_controller_manager(self) -> Path:
        return self.bin_dir / "kube-controller-manager"

    @property
    def kubectl(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm(self) -> Path:
        return self.bin_dir / "helm"


def default_cache_dir() -> Path:
    configured = os.environ.get("MODELPLANE_K8S_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "modelplane" / f"k8s-{K8S_VERSION}"


def find_binaries(cache_dir: Path | None = None) -> Binaries:
    binaries = Binaries((cache_dir or default_cache_dir()) / "bin")
    required = (binaries.etcd, binaries.kube_apiserver, binaries.kubectl, binaries.helm)
    missing = [p.name for p in required if not os.access(p, os.X_OK)]
    if missing:
        raise MissingBinaries(
            f"{', '.join(missing)} not found in {binaries.bin_dir}; "
            f"build them with: bash {BUILD_SCRIPT}"
        )
    return binaries
