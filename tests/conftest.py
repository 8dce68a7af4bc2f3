"""Fixtures shared by all unit and component tests (helpers live in harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import ServerThread, Upstreams


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    servers = ServerThread()
    try:
        yield Upstreams(servers)
    finally:
        servers.close()
