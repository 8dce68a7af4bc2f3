"""The in-process response store: least recently used entries go first, bounded in bytes.

An entry is one complete OpenAI-format answer (a `chat.completion`, a `text_completion` or an
embeddings list) with the endpoint that gave it and three times: when it was stored, until when
it is fresh (its TTL), and until when it may still be served stale after every endpoint failed.
Past that last time it is dropped on sight. Times are wall-clock seconds, so entries read from a
shared Redis by another replica mean the same thing there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

#: Per-entry bookkeeping (dict slot, the entry object, its key) counted against the size bound.
ENTRY_OVERHEAD = 256


@dataclass(frozen=True, slots=True)
class CachedResponse:
    body: bytes
    #: The endpoint that answered (sent back as `x-modelplane-endpoint`).
    endpoint: str
    #: The tenant the entry belongs to; a lookup from another tenant never gets it.
    tenant: str
    stored_at: float
    fresh_until: float
    keep_until: float

    @property
    def size(self) -> int:
        return len(self.body) + ENTRY_OVERHEAD

    def fresh(self, now: float) -> bool:
        return now < self.fresh_until

    def encode(self) -> bytes:
        """One header line of JSON, then the body as it is (for Redis)."""
        head = {
            "endpoint": self.endpoint,
            "tenant": self.tenant,
            "storedAt": self.stored_at,
            "freshUntil": self.fresh_until,
            "keepUntil": self.keep_until,
        }
        return orjson.dumps(head) + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CachedResponse | None:
        """The entry, or None when `raw` is not one (a foreign or damaged value)."""
        head, sep, body = raw.partition(b"\n")
        if not sep:
            return None
        try:
            meta = orjson.loads(head)
            return cls(
                body,
                str(meta["endpoint"]),
                str(meta["tenant"]),
                float(meta["storedAt"]),
                float(meta["freshUntil"]),
                float(meta["keepUntil"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


EvictionHook = Callable[[str, int], None]


class LocalStore:
    """An LRU map of key -> entry under a byte bound and an entry-count bound."""

    def __init__(
        self, max_bytes: int, max_entries: int, on_evict: EvictionHook | None = None
    ) -> None:
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self._on_evict = on_evict

    def __len__(self) -> int:
        return len(self._entries)

    def resize(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._shrink()

    def get(self, key: str, now: float) -> CachedResponse | None:
        """The entry if it may still be served (fresh or stale); the caller checks freshness."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.keep_until:
            self._drop(key, entry, "expired")
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: CachedResponse) -> bool:
        """Store `entry` (replacing an older one); False when it alone is over the bound."""
        if entry.size > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[key] = entry
        self.bytes += entry.size
        self._shrink()
        return True

    def _shrink(self) -> None:
        entries = self._entries
        while entries and (self.bytes > self.max_bytes or len(entries) > self.max_entries):
            _, entry = entries.popitem(last=False)
            self.bytes -= entry.size
            if self._on_evict is not None:
                self._on_evict("size", entry.size)

    def _drop(self, key: str, entry: CachedResponse, reason: str) -> None:
        del self._entries[key]
        self.bytes -= entry.size
        if self._on_evict is not None:
            self._on_evict(reason, entry.size)
