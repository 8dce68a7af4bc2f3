"""The in-process store: TTL and stale window, least-recently-used eviction under byte and
entry bounds, and the Redis encoding of an entry."""

from __future__ import annotations

from modelplane_sidecar.cache.store import ENTRY_OVERHEAD, CachedResponse, LocalStore


def entry(body: bytes = b"{}", *, fresh: float = 10.0, keep: float = 20.0) -> CachedResponse:
    return CachedResponse(body, "a", "ns:t", 0.0, fresh, keep)


def test_fresh_then_stale_then_gone() -> None:
    evicted: list[str] = []
    store = LocalStore(1 << 20, 100, lambda reason, size: evicted.append(reason))
    store.put("k", entry(fresh=10, keep=20))
    found = store.get("k", 5)
    assert found is not None and found.fresh(5)
    found = store.get("k", 15)
    assert found is not None and not found.fresh(15)
    assert store.get("k", 20) is None
    assert evicted == ["expired"]
    assert len(store) == 0 and store.bytes == 0


def test_byte_bound_evicts_least_recently_used_first() -> None:
    body = b"x" * 1000
    size = len(body) + ENTRY_OVERHEAD
    evicted: list[tuple[str, int]] = []
    store = LocalStore(3 * size, 100, lambda reason, n: evicted.append((reason, n)))
    for k in ("a", "b", "c"):
        store.put(k, entry(body))
    assert store.bytes == 3 * size
    assert store.get("a", 0) is not None  # now most recently used
    store.put("d", entry(body))
    assert store.get("b", 0) is None
    assert [k for k in ("a", "c", "d") if store.get(k, 0) is not None] == ["a", "c", "d"]
    assert evicted == [("size", size)]
    assert store.bytes == 3 * size


def test_entry_bound() -> None:
    store = LocalStore(1 << 20, 2)
    for k in ("a", "b", "c"):
        store.put(k, entry())
    assert len(store) == 2 and store.get("a", 0) is None


def test_replacing_an_entry_keeps_the_byte_count_exact() -> None:
    store = LocalStore(1 << 20, 10)
    store.put("k", entry(b"x" * 100))
    store.put("k", entry(b"y" * 10))
    assert store.bytes == 10 + ENTRY_OVERHEAD
    found = store.get("k", 0)
    assert found is not None and found.body == b"y" * 10


def test_an_entry_over_the_whole_bound_is_not_stored_and_evicts_nothing() -> None:
    store = LocalStore(2048, 10)
    store.put("small", entry(b"s"))
    assert store.put("big", entry(b"b" * 4096)) is False
    assert store.get("small", 0) is not None and store.get("big", 0) is None


def test_shrinking_the_bound_evicts() -> None:
    store = LocalStore(1 << 20, 10)
    for k in "abcd":
        store.put(k, entry(b"x" * 500))
    store.resize(2 * (500 + ENTRY_OVERHEAD), 10)
    assert len(store) == 2 and store.get("c", 0) is not None and store.get("d", 0) is not None


def test_encoding_round_trip_and_foreign_values() -> None:
    original = CachedResponse(b'{"id": 1}\n{"x": 2}', "ep", "ns:t", 1.5, 2.5, 3.5)
    assert CachedResponse.decode(original.encode()) == original
    assert CachedResponse.decode(b"not an entry") is None
    assert CachedResponse.decode(b'{"endpoint": "e"}\n{}') is None
