"""One in-process LRU cache with an optional time-to-live, for the leaderboard tables
(``services.leaderboard.queries.BOARD_CACHE``) and the rendered figures and score matrices
(``services.web.figures``). Thread-safe; values are shared, callers must not mutate them."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any


class LruCache:
    """At most ``max_entries`` values, least recently used dropped first; with ``ttl_s`` a value
    is a miss once that many seconds have passed since it was put (``None``: never)."""

    def __init__(self, max_entries: int = 256, ttl_s: float | None = None) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._entries: OrderedDict[tuple, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or hit[0] < time.monotonic():
                return None
            self._entries.move_to_end(key)
            return hit[1]

    def put(self, key: tuple, value: Any) -> None:
        expires = time.monotonic() + self.ttl_s if self.ttl_s is not None else float("inf")
        with self._lock:
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
