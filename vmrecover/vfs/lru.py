"""A small LRU map with a count limit and an optional weight budget: the bound on every per-object memo
the datastore keeps (points, disk indexes, views, session files), so that browsing a repository with
thousands of restore points keeps the daemon's memory flat.  Thread-safe: each operation holds the
map's own lock for a few dictionary operations only (never during I/O), so an event loop may use it;
``on_evict`` runs after the lock is released.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(
        self,
        limit: int,
        *,
        budget: int | None = None,
        weigh: Callable[[V], int] = lambda v: 0,
        on_evict: Callable[[K, V], None] = lambda k, v: None,
    ) -> None:
        self.limit = limit
        self.budget = budget
        self._weigh = weigh
        self._on_evict = on_evict
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> V:
        """Store *value* (the newest entry is kept even if it alone exceeds the budget); evict the least
        recently used entries beyond the limits.  Returns *value*."""
        evicted = []
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.weight -= self._weigh(old)
            self._items[key] = value
            self.weight += self._weigh(value)
            while len(self._items) > 1 and (
                len(self._items) > self.limit or (self.budget is not None and self.weight > self.budget)
            ):
                k, v = self._items.popitem(last=False)
                self.weight -= self._weigh(v)
                evicted.append((k, v))
        for k, v in evicted:
            self._on_evict(k, v)
        return value

    def pop(self, key: K) -> V | None:
        with self._lock:
            value = self._items.pop(key, None)
            if value is not None:
                self.weight -= self._weigh(value)
            return value

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return list(self._items.items())

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.weight = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        with self._lock:
            return iter(list(self._items))
