"""Fixtures for e2e tests: one real control plane per session, one namespace per test.

`cluster` fails (never skips) when the binaries are missing: run
`bash e2e/cluster/build-binaries.sh` first, or `make e2e`, which does. See e2e/README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import (
    CertFiles,
    Cluster,
    ClusterStartError,
    MissingBinaries,
    find_binaries,
    start_cluster,
)
from operator_helpers import StandIns, install_crds, standins

FIXTURES = Path(__file__).parent / "fixtures"
_CLUSTER_DIR = pytest.StashKey[Path]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    e2e_dir = Path(__file__).parent
    for item in items:
        if e2e_dir in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A running etcd + kube-apiserver, shared by the whole session."""
    try:
        binaries = find_binaries()
    except MissingBinaries as error:
        pytest.fail(f"no control plane: {error}", pytrace=False)
    workdir = tmp_path_factory.mktemp("cluster")
    request.config.stash[_CLUSTER_DIR] = workdir
    try:
        running = start_cluster(workdir, binaries, exit_with_parent=True)
    except ClusterStartError as error:
        pytest.fail(f"control plane did not start: {error}", pytrace=False)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test (deleted afterwards without waiting)."""
    name = cluster.create_namespace()
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    """Modelplane's CRDs installed and Established (once per test module)."""
    install_crds(cluster)


@pytest.fixture(scope="module")
def operator_cert(cluster: Cluster) -> CertFiles:
    """A serving cert for a `modelplane operator` process on 127.0.0.1."""
    return cluster.issue_serving_cert("modelplane-operator")


@pytest.fixture
def servers() -> Iterator[StandIns]:
    """OpenAI stand-ins on loopback, stopped after the test."""
    with standins() as s:
        yield s


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    workdir = terminalreporter.config.stash.get(_CLUSTER_DIR, None)
    if workdir is not None and (
        terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    ):
        terminalreporter.write_line(f"control-plane logs and certs: {workdir}")
