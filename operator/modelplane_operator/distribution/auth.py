"""Sidecar authentication: projected ServiceAccount tokens checked with the TokenReview API.

A sidecar presents a token for the `modelplane` audience; the apiserver says whether it is valid
and whose it is. The namespace a sidecar gets config for comes only from here, never from
anything the sidecar says about itself. Positive answers are cached for a short time (keyed by a
digest of the token, never the token) so a reconnect storm costs one review per sidecar at most.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .hub import Identity

_SA_PREFIX = "system:serviceaccount:"
_POD_NAME = "authentication.kubernetes.io/pod-name"

Review = Callable[[str, list[str]], Awaitable[Mapping[str, Any]]]


class AuthError(Exception):
    """The token does not authenticate a ServiceAccount for our audience; says why."""


def identity_from_review(status: Mapping[str, Any], audience: str) -> Identity:
    """The sidecar's identity from a TokenReview status, or AuthError naming the reason."""
    if not status.get("authenticated"):
        error = str(status.get("error") or "token not authenticated")
        raise AuthError(f"token rejected by the TokenReview API: {error}")
    audiences = status.get("audiences") or []
    if audience not in audiences:
        raise AuthError(f"token is not for audience {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username", ""))
    if not username.startswith(_SA_PREFIX):
        raise AuthError(f"only ServiceAccount tokens are accepted, not user {username!r}")
    namespace, _, account = username[len(_SA_PREFIX) :].partition(":")
    if not namespace or not account:
        raise AuthError(f"malformed ServiceAccount username {username!r}")
    pods = (user.get("extra") or {}).get(_POD_NAME) or []
    return Identity(namespace, account, username, pods[0] if pods else None)


class Authenticator:
    def __init__(
        self,
        review: Review,
        audience: str = "modelplane",
        cache_seconds: float = 60.0,
        max_cached: int = 20_000,
    ) -> None:
        self._review = review
        self.audience = audience
        self._ttl = cache_seconds
        self._max = max_cached
        self._cache: dict[str, tuple[float, Identity]] = {}

    async def authenticate(self, token: str) -> Identity:
        if not token:
            raise AuthError("no bearer token")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        status = await self._review(token, [self.audience])
        identity = identity_from_review(status, self.audience)
        if len(self._cache) >= self._max:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= self._max:
                self._cache.clear()
        self._cache[key] = (now + self._ttl, identity)
        return identity
