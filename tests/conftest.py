"""Fixtures shared by all unit and component tests (helpers live in harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import ServerThread, Upstreams
from hypothesis import HealthCheck, settings

# Property tests run on a shared, loaded machine: an example that takes longer than Hypothesis's
# default 200 ms deadline (or slow data generation) is load, not a bug, and must not fail the run.
settings.register_profile("modelplane", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("modelplane")


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    servers = ServerThread()
    try:
        yield Upstreams(servers)
    finally:
        servers.close()
