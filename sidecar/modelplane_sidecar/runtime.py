"""The live state of a loaded config: endpoints with their adapters, keys and health.

A Snapshot is built once per config version and swapped in atomically; requests hold on to the
snapshot they started with. Health state (circuit breakers, in-flight counts, observed latency) is
carried over to the next snapshot for every endpoint whose identity (provider, URL, model) did not
change.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from .breaker import CircuitBreaker
from .config import Endpoint, ModelAlias, RouterConfig
from .endpoint_stats import EndpointStats
from .pool import ReplicaPool
from .providers import adapter_for
from .providers.base import Adapter, Credentials, RefreshingCredentials

_T = TypeVar("_T")


@dataclass(slots=True)
class EndpointState:
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    in_flight: int = 0
    #: Observed latency, time to first token and request rate (read by routing steps).
    stats: EndpointStats = field(default_factory=EndpointStats)


@dataclass(slots=True, frozen=True)
class EndpointRuntime:
    config: Endpoint
    adapter: Adapter
    credentials: Credentials = field(repr=False)
    state: EndpointState
    #: The replicas of a self-hosted endpoint (None: one plain base URL); replica state carries
    #: over to the next snapshot by URL.
    pool: ReplicaPool | None = None

    @property
    def name(self) -> str:
        return self.config.name


def _identity(endpoint: Endpoint) -> tuple[str, str, str]:
    return (endpoint.provider.value, endpoint.base_url, endpoint.model)


@dataclass(slots=True, frozen=True)
class Snapshot:
    config: RouterConfig
    version: str
    endpoints: dict[str, EndpointRuntime]
    aliases: dict[str, ModelAlias]
    #: Credential values to scrub from anything the upstream echoes back.
    secrets: tuple[bytes, ...] = field(repr=False)
    #: Credentials that change under the snapshot (temporary AWS keys): their secrets are
    #: scrubbed as of the moment, since the keys in hand are not known when a config loads.
    refreshing: tuple[RefreshingCredentials, ...] = field(default=(), repr=False)
    #: What request-path steps derive from this config alone, built on first use (`derived`).
    _derived: dict[Callable[[Snapshot], Any], Any] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def build(cls, config: RouterConfig, previous: Snapshot | None = None) -> Snapshot:
        old = previous.endpoints if previous is not None else {}
        endpoints: dict[str, EndpointRuntime] = {}
        secrets: list[bytes] = []
        for ep in config.endpoints:
            api_key = ep.api_key.resolve() if ep.api_key is not None else None
            adapter = adapter_for(ep.provider)
            credentials = adapter.credentials(ep, api_key)
            secrets.extend(s.encode() for s in credentials.secrets())
            before = old.get(ep.name)
            if before is not None and before.credentials == credentials:
                # Temporary keys from the same source carry over: no new STS call per config.
                credentials = before.credentials
            keep = before is not None and _identity(before.config) == _identity(ep)
            state = before.state if keep and before is not None else EndpointState()
            pool = ReplicaPool.build(ep, before.pool if before is not None else None)
            endpoints[ep.name] = EndpointRuntime(ep, adapter, credentials, state, pool)
        aliases = {m.name: m for m in config.models}
        refreshing = tuple(
            e.credentials.refreshing
            for e in endpoints.values()
            if e.credentials.refreshing is not None
        )
        return cls(config, config.version(), endpoints, aliases, tuple(secrets), refreshing)

    def with_replicas(self, config: RouterConfig, changed: Collection[str]) -> Snapshot:
        """This snapshot for `config`, which differs from its own only in the replica lists of
        the endpoints named in `changed` (and in its version): a replica update of the config
        stream. Every other endpoint's runtime is kept as it is; a changed one keeps its
        adapter, credentials and health, and its pool keeps each replica's state by URL. What
        routing derives from the snapshot is built afresh on first use."""
        endpoints = dict(self.endpoints)
        for ep in config.endpoints:
            before = endpoints.get(ep.name)
            if ep.name in changed and before is not None:
                pool = ReplicaPool.build(ep, before.pool)
                endpoints[ep.name] = EndpointRuntime(
                    ep, before.adapter, before.credentials, before.state, pool
                )
        return Snapshot(
            config, config.version(), endpoints, self.aliases, self.secrets, self.refreshing
        )

    def derived(self, build: Callable[[Snapshot], _T]) -> _T:
        """`build(self)`, computed once per snapshot: e.g. routing's table of prepared routes,
        so a request does not redo what depends only on the config."""
        found = self._derived.get(build)
        if found is None:
            found = self._derived[build] = build(self)
        return cast(_T, found)

    def pools(self) -> dict[str, ReplicaPool]:
        return {name: e.pool for name, e in self.endpoints.items() if e.pool is not None}

    def redact(self, data: bytes) -> bytes:
        """`data` with every credential value of this config replaced by `[REDACTED]`: static
        keys, and the temporary keys fetched so far (off the hot path: error answers only)."""
        secrets: list[bytes] = list(self.secrets)
        for credentials in self.refreshing:
            secrets.extend(s.encode() for s in credentials.secrets())
        for secret in secrets:
            if secret in data:
                data = data.replace(secret, b"[REDACTED]")
        return data
