"""A shared LRU cache of decoded chunks, with de-duplicated concurrent fetches and readahead.

Concurrency protocol (every reader, FUSE or NFS, goes through here):
- ``lookup(digest)`` is the hit path: a dict lookup and an LRU touch under one lock, nothing else.
  Async front ends call it on their event loop thread; only on a miss do they go to a worker thread.
- ``get(digest)`` runs in worker threads.  On a miss the first caller becomes the fetcher (read,
  decrypt, decompress, verify, outside the lock); callers wanting the same chunk meanwhile wait on its
  event instead of reading it again.  A failed fetch is not cached: every waiter gets the error.
- ``prefetch(digests)`` hands fetches to a small pool of its own and returns at once.
- Capacity is in bytes of plaintext; eviction drops the least recently used chunks.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptChunk
from ..repo.chunkstore import ChunkStore


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    def __init__(self, store: ChunkStore, capacity: int, *, readahead_workers: int = 2) -> None:
        self.store = store
        self.capacity = capacity
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._size = 0
        self._pending: dict[bytes, _Pending] = {}
        self._pool = ThreadPoolExecutor(readahead_workers, thread_name_prefix="readahead")
        self.hits = self.misses = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def lookup(self, digest: bytes) -> bytes | None:
        with self._lock:
            return self._lookup_locked(digest)

    def _lookup_locked(self, digest: bytes) -> bytes | None:
        data = self._lru.get(digest)
        if data is not None:
            self._lru.move_to_end(digest)
            self.hits += 1
        return data

    def get(self, digest: bytes) -> bytes:
        with self._lock:
            data = self._lookup_locked(digest)
            if data is not None:
                return data
            pending = self._pending.get(digest)
            fetcher = pending is None
            if fetcher:
                pending = self._pending[digest] = _Pending()
                self.misses += 1
        assert pending is not None
        if not fetcher:
            pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            return pending.data
        try:
            data = self.store.get(digest)
        except BaseException as exc:
            pending.error = exc
            with self._lock:
                del self._pending[digest]
            pending.event.set()
            raise
        pending.data = data
        with self._lock:
            del self._pending[digest]
            self._insert(digest, data)
        pending.event.set()
        return data

    def _insert(self, digest: bytes, data: bytes) -> None:
        if digest in self._lru or len(data) > self.capacity:
            return
        self._lru[digest] = data
        self._size += len(data)
        while self._size > self.capacity:
            _, old = self._lru.popitem(last=False)
            self._size -= len(old)

    def prefetch(self, digests: Iterable[bytes]) -> None:
        for d in digests:
            with self._lock:
                if d in self._lru or d in self._pending:
                    continue
            self._pool.submit(self._quiet_get, d)

    def _quiet_get(self, digest: bytes) -> None:
        with contextlib.suppress(CorruptChunk):  # the reader that needs it gets the error itself
            self.get(digest)

    @property
    def size(self) -> int:
        return self._size
