"""A shared LRU cache of decoded chunks, with de-duplicated concurrent fetches and readahead.

Concurrency protocol (every reader, FUSE or NFS, goes through here):
- ``lookup(digest)`` is the hit path: a dict lookup and an LRU touch under one lock, nothing else.
  Async front ends call it on their event loop thread; only on a miss do they go to a worker thread.
- ``get(digest)`` runs in worker threads.  On a miss the first caller becomes the fetcher (read,
  decrypt, decompress, verify, outside the lock); callers wanting the same chunk meanwhile wait on its
  event instead of reading it again.  A failed fetch is not cached: every waiter gets the error.
- ``read(digest, start, end)`` is ``get`` for a small random read.  In an encrypted repository, on
  a miss, the fetcher decodes the chunk only up to *end* and returns those bytes (AES-GCM has
  authenticated them *and* bound them to the digest, see blob.PartialDecode), handing the rest of the
  decoding and the digest check to the pool; the chunk is cached, and waiters are woken, only once its
  digest matched.  Cold random reads then cost about half a chunk's decompression and no hashing on
  the reader's path.  Unencrypted chunks are bound to their name by the digest alone, so there the
  whole chunk is decoded and checked first (a chunk file holding another chunk's bytes passes a crc).
- ``prefetch(digests)`` hands fetches to a small pool of its own and returns at once.  Pool tasks
  never wait for another fetch (that fetch's completion may be queued behind them).
- Capacity is in bytes of plaintext; eviction drops the least recently used chunks.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptChunk
from ..repo.blob import PartialDecode
from ..repo.chunkstore import ChunkStore

log = logging.getLogger("vmrecover.cache")


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


_NO_PENDING = _Pending()


def _raiser(exc: BaseException) -> Callable[[], bytes]:
    def fetch() -> bytes:
        raise exc

    return fetch


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
        # Queued tasks still run: a cancelled _finish would leave its waiters waiting forever.
        self._pool.shutdown(wait=True)

    def lookup(self, digest: bytes) -> bytes | None:
        with self._lock:
            return self._lookup_locked(digest)

    def _lookup_locked(self, digest: bytes) -> bytes | None:
        data = self._lru.get(digest)
        if data is not None:
            self._lru.move_to_end(digest)
            self.hits += 1
        return data

    def _claim(self, digest: bytes) -> tuple[bytes | None, _Pending, bool]:
        """(cached data, or the pending fetch and whether this caller must do it)."""
        with self._lock:
            data = self._lookup_locked(digest)
            if data is not None:
                return data, _NO_PENDING, False
            pending = self._pending.get(digest)
            if pending is not None:
                return None, pending, False
            pending = self._pending[digest] = _Pending()
            self.misses += 1
            return None, pending, True

    @staticmethod
    def _wait(pending: _Pending) -> bytes:
        pending.event.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.data is not None
        return pending.data

    def _settle(self, digest: bytes, pending: _Pending, fetch: Callable[[], bytes]) -> bytes:
        """Run the fetch, cache its result (never an error) and wake the waiters."""
        try:
            data = fetch()
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

    def get(self, digest: bytes) -> bytes:
        data, pending, fetcher = self._claim(digest)
        if data is not None:
            return data
        if not fetcher:
            return self._wait(pending)
        return self._settle(digest, pending, lambda: self.store.get(digest))

    def read(self, digest: bytes, start: int, end: int) -> bytes:
        data, pending, fetcher = self._claim(digest)
        if data is not None:
            return data[start:end]
        if not fetcher:
            return self._wait(pending)[start:end]
        if not self.store.codec.encrypted:
            # Without encryption only the digest ties a chunk file's bytes to its name (a file holding
            # another chunk passes the crc32), so nothing is returned before the digest is checked.
            return self._settle(digest, pending, lambda: self.store.get(digest))[start:end]
        try:
            partial = self.store.codec.decode_partial(digest, self.store.read_raw(digest))
            head = bytes(partial.upto(end)[start:end])
        except BaseException as exc:
            self._settle(digest, pending, _raiser(exc))  # wakes the waiters with the error, raises it
            raise
        self._pool.submit(self._finish, digest, pending, partial)
        return head

    def _finish(self, digest: bytes, pending: _Pending, partial: PartialDecode) -> None:
        try:
            self._settle(digest, pending, partial.finish)
        except CorruptChunk as exc:
            log.error("chunk %s failed its digest check after a partial read: %s", digest.hex(), exc.reason)

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
            self._pool.submit(self._prefetch_one, d)

    def _prefetch_one(self, digest: bytes) -> None:
        # Never wait in the pool: a fetch pending elsewhere may be a partial read whose _finish is
        # queued behind this very task, so waiting here could deadlock the pool.
        _, pending, fetcher = self._claim(digest)
        if fetcher:
            with contextlib.suppress(CorruptChunk):  # the reader that needs it gets the error itself
                self._settle(digest, pending, lambda: self.store.get(digest))

    @property
    def size(self) -> int:
        return self._size


def limit_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena; chunk-sized buffers freed in other threads then
    fragment them (peak RSS 1 GB with a 512 MB cache).  Two arenas keep RSS near the cache size."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
