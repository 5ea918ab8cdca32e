"""services/lru.py: least recently used dropped first; a time-to-live makes old values misses."""

from __future__ import annotations

from services import lru
from services.lru import LruCache


def test_least_recently_used_is_dropped_first():
    cache = LruCache(max_entries=2)
    cache.put(("a",), 1)
    cache.put(("b",), 2)
    assert cache.get(("a",)) == 1  # a is now the most recent
    cache.put(("c",), 3)
    assert cache.get(("b",)) is None and cache.get(("a",)) == 1 and cache.get(("c",)) == 3
    cache.clear()
    assert cache.get(("a",)) is None


def test_time_to_live(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(lru.time, "monotonic", lambda: now[0])
    cache, forever = LruCache(ttl_s=60.0), LruCache()
    cache.put(("k",), "v")
    forever.put(("k",), "v")
    now[0] += 59.0
    assert cache.get(("k",)) == "v"
    now[0] += 2.0
    assert cache.get(("k",)) is None and forever.get(("k",)) == "v"
