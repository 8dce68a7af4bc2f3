"""A real Kubernetes control plane (etcd + kube-apiserver) for end-to-end tests.

Start one with `start_cluster(workdir)`; the returned `Cluster` gives the kubeconfig, the CA, a
kubectl/helm runner and webhook serving certs, and `stop()` ends every process it started. The
binaries come from the cache that build-binaries.sh fills (see e2e/README.md).
"""

from .binaries import K8S_VERSION, Binaries, MissingBinaries, default_cache_dir, find_binaries
from .certs import CertFiles, CertificateAuthority
from .control_plane import (
    Cluster,
    ClusterStartError,
    ClusterState,
    CommandFailed,
    load_cluster,
    start_cluster,
)

__all__ = [
    "K8S_VERSION",
    "Binaries",
    "CertFiles",
    "CertificateAuthority",
    "Cluster",
    "ClusterStartError",
    "ClusterState",
    "CommandFailed",
    "MissingBinaries",
    "default_cache_dir",
    "find_binaries",
    "load_cluster",
    "start_cluster",
]
