"""Fixtures for the provider adapter tests: stand-ins of every provider on loopback ports."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pytest
from harness import Upstreams


class HasApp(Protocol):
    def app(self) -> Any: ...


@pytest.fixture
def serve(upstreams: Upstreams) -> Callable[[HasApp], str]:
    """Serve a stand-in; returns its base URL (no path)."""

    def start(standin: HasApp) -> str:
        port = upstreams.servers.serve(standin.app())
        return f"http://127.0.0.1:{port}"

    return start
