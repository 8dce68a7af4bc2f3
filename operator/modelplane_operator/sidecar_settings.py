"""Namespace-wide sidecar settings (`RoutingPolicy.spec.sidecar`), merged over the policies.

Every sidecar of a namespace runs one RouterConfig, so its `server`, `cache` (the store) and
`lanes` sections are the namespace's, not a policy's. Any policy may set any field of them; the
fields are merged, older policies first. A *unit* is what one policy claims: a leaf field, or the
`cache.redis` object as a whole (a URL from one policy and a password from another would be
nonsense). Two policies that set a unit to the same value agree; different values are a conflict:
the older policy's value applies, and both policies are told, with the field and both values.
Pure functions, no I/O: the compiler resolves Secrets and endpoint references before merging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from modelplane_sidecar import config as rc

from .crd_models import SidecarSettings

#: A unit's path below spec.sidecar, e.g. ("lanes", "batch", "maxConcurrency").
Path = tuple[str, ...]

REDIS: Path = ("cache", "redis")
BATCH_API_ENDPOINT: Path = ("lanes", "batch", "batchApiEndpoint")
_ATOMIC = {REDIS}


def units(settings: SidecarSettings) -> dict[Path, Any]:
    """The units a policy sets (JSON values, camelCase paths); unset fields are not units."""
    data = settings.model_dump(mode="json", by_alias=True, exclude_none=True)
    out: dict[Path, Any] = {}

    def walk(node: Mapping[str, Any], prefix: Path) -> None:
        for key, value in node.items():
            path = (*prefix, key)
            if isinstance(value, dict) and path not in _ATOMIC:
                walk(value, path)
            else:
                out[path] = value

    walk(data, ())
    return out


def field_name(path: Path) -> str:
    return "spec.sidecar." + ".".join(path)


_PRECEDENCE = "the older policy wins, the first by name when created together"


def _shown(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class Merged:
    """The namespace's settings: each unit's value and the policy it comes from."""

    values: dict[Path, Any] = field(default_factory=dict)
    owners: dict[Path, str] = field(default_factory=dict)
    #: Policy -> conflict messages, for the winner and the loser of every conflict.
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    #: Policy -> the messages of the conflicts it lost (settings of its that do not apply).
    overruled: dict[str, list[str]] = field(default_factory=dict)


def merge(claims: Sequence[tuple[str, Mapping[Path, Any]]]) -> Merged:
    """Merge the policies' units, oldest policy first (the compiler's conflict order)."""
    merged = Merged()
    for policy, claimed in claims:
        for path, value in claimed.items():
            owner = merged.owners.get(path)
            if owner is None:
                merged.values[path] = value
                merged.owners[path] = policy
                continue
            theirs = merged.values[path]
            if theirs == value:
                continue
            name = field_name(path)
            lost = (
                f"{name} is {_shown(value)} here but {_shown(theirs)} in RoutingPolicy "
                f"{owner!r}, whose value applies ({_PRECEDENCE})"
            )
            merged.conflicts.setdefault(policy, []).append(lost)
            merged.overruled.setdefault(policy, []).append(lost)
            merged.conflicts.setdefault(owner, []).append(
                f"{name} is {_shown(theirs)} here but {_shown(value)} in RoutingPolicy "
                f"{policy!r}; this policy's value applies ({_PRECEDENCE})"
            )
    return merged


def _nested(values: Mapping[Path, Any]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, value in values.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return root


def _lane(data: Mapping[str, Any]) -> dict[str, Any]:
    lane = dict(data)
    if lane.get("maxConcurrency") == 0:
        lane["maxConcurrency"] = None  # 0 in the CRD: no limit
    return lane


def server(values: Mapping[Path, Any]) -> rc.ServerSettings:
    return rc.ServerSettings.model_validate(_nested(values).get("server", {}))


def cache_store(
    values: Mapping[Path, Any],
    redis_password: rc.ApiKeySource | None,
    policy_entries: int,
) -> rc.CacheStore:
    """The store: set fields, else the largest caching policy's `maxEntries`, else defaults."""
    data = dict(_nested(values).get("cache", {}))
    if "maxEntries" not in data and policy_entries:
        data["maxEntries"] = policy_entries
    redis = data.pop("redis", None)
    store = rc.CacheStore.model_validate(data)
    if redis is None:
        return store
    options = {k: v for k, v in redis.items() if k != "passwordSecretRef"}
    found = rc.RedisCache.model_validate(options)
    return store.model_copy(update={"redis": found.model_copy(update={"password": redis_password})})


def lanes(values: Mapping[Path, Any]) -> rc.Lanes:
    data = dict(_nested(values).get("lanes", {}))
    for lane in ("realtime", "batch"):
        if lane in data:
            data[lane] = _lane(data[lane])
    return rc.Lanes.model_validate(data)
