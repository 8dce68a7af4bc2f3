"""The cache key of a request: a digest of its canonical form, its tenant and policy version.

Two requests that ask the same thing get the same key whatever the order of their JSON fields,
whether they spell out a parameter's default (`"temperature": 1`, `"n": 1`, `"stop": null`) or
leave it out, write `0` or `0.0`, or send a one-part text `content` list instead of a string.
Fields that do not change the answer (`stream`, `stream_options`, `user`, `metadata`, `store`,
`service_tier`) are left out, so a streamed and a plain request share one entry. The tenant (the
config's namespace) and the policy version (a digest of the parts of the config that decide where
a request goes) are part of the key: one tenant's entries are never another's, and a changed
route never answers from what the old route said.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from ..config import RouterConfig

#: Body fields that do not change what the model answers.
_NOT_IN_KEY = frozenset(
    {"model", "stream", "stream_options", "user", "metadata", "store", "service_tier"}
)
#: OpenAI's defaults: a field given with its default value is the same request as one without.
_DEFAULTS: dict[str, object] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "parallel_tool_calls": True,
    "encoding_format": "float",
    "response_format": {"type": "text"},
}
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_MISSING = object()


def tenant_of(config: RouterConfig) -> str:
    """The namespace the config was compiled for; a standalone config is its own tenant."""
    meta = config.metadata
    return f"ns:{meta.namespace}" if meta.namespace else f"config:{meta.name}"


def policy_version(config: RouterConfig) -> str:
    """A digest of what decides where a request goes and what it is asked as.

    Credentials, prices, limits, budgets, timeouts and the cache settings themselves are left
    out, so a rotated key or a budget moving to `downgrade` keeps the cache warm, while a changed
    alias, rule, data class or upstream model starts a fresh one.
    """
    route_fields = {"name", "endpoints", "strategy", "targets", "options", "match", "overflow"}
    data = {
        "models": [m.model_dump(mode="json", include=route_fields) for m in config.models],
        "rules": [r.model_dump(mode="json", include=route_fields) for r in config.rules],
        "endpoints": [
            e.model_dump(mode="json", include={"name", "provider", "base_url", "model", "options"})
            for e in config.endpoints
        ],
        "sensitivity": config.sensitivity.model_dump(mode="json"),
    }
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def deterministic(op: str, body: Mapping[str, Any]) -> bool:
    """Whether the same request gives the same answer: embeddings, or temperature 0."""
    if op == "embeddings":
        return True
    temperature = body.get("temperature")
    return (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
    )


def _message(message: object) -> object:
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list) and len(content) == 1:
        part = content[0]
        if isinstance(part, dict) and part.get("type") == "text" and len(part) == 2:
            out["content"] = part.get("text")
    return out


def canonical_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's fields that decide the answer, with defaults and spellings made one."""
    out: dict[str, Any] = {}
    for name, value in body.items():
        if value is None or name in _NOT_IN_KEY:
            continue
        if name in _FLOATS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if name == "max_tokens":
            # Chat's deprecated spelling of max_completion_tokens.
            name = "max_completion_tokens" if "messages" in body else name
        elif name == "stop" and isinstance(value, str):
            value = [value]
        elif name == "messages" and isinstance(value, list):
            value = [_message(m) for m in value]
        if _DEFAULTS.get(name, _MISSING) == value or value == []:
            continue
        out[name] = value
    tool_choice = out.get("tool_choice")
    if tool_choice == ("auto" if out.get("tools") else "none"):
        del out["tool_choice"]
    return out


def cache_key(
    tenant: str, version: str, op: str, alias: str, route: str, body: Mapping[str, Any]
) -> str:
    """The hex digest that names one cache entry."""
    digest = hashlib.sha256()
    digest.update(f"{tenant}\x00{version}\x00{op}\x00{alias}\x00{route}\x00".encode())
    digest.update(orjson.dumps(canonical_body(body), option=orjson.OPT_SORT_KEYS))
    return digest.hexdigest()
