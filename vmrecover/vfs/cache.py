"""A shared LRU cache of decoded chunk pieces, with de-duplicated concurrent fetches and decode-ahead.

What it holds: per chunk digest, the chunk's proven layout (blob.Layout) and those of its pieces that
were read (a v2 chunk has 64 KiB pieces, a v1 chunk one piece: the whole).  Every piece in it was
proven against its digest when decoded (ChunkStore.read_pieces): nothing unproven is ever cached or
returned.

Concurrency protocol (every reader, FUSE, NFS or a session's disk, goes through here):
- ``lookup(digest, start, end)`` is the hit path: a dict lookup, the LRU touch and the slices, under
  one lock, nothing else.  Async front ends call it on their event loop thread; only on a miss do
  they go to a worker thread.
- ``read(digest, start, end)`` runs in worker threads.  A *random* read fetches only the pieces the
  range touches (two small preads, one piece decoded and hashed), never the rest of the chunk.  A
  *sequential* read (``whole=True``) takes the whole chunk, usually already decoded by the pool.
- Fetches are de-duplicated per (digest, piece) and per (digest, whole): the first caller fetches
  (outside the lock), later ones wait on its event.  A failed fetch is not cached: every waiter gets
  the error; another piece of the same chunk still reads (a bit flip costs only its range).
- ``prefetch(digests)`` hands whole-chunk decodes to a pool of one thread per CPU and returns at once:
  sequential readers decode ahead on every core, within the window the caller bounds (disk.py's
  READAHEAD_CHUNKS).  Pool tasks never wait for another fetch (it may be queued behind them).
- Capacity is in bytes of plaintext; eviction drops the least recently used chunks' pieces.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptChunk
from ..repo.blob import PIECE_SIZE, Layout
from ..repo.chunkstore import ChunkStore

log = logging.getLogger("vmrecover.cache")
WHOLE = -1  # the pending-fetch key of a whole chunk
Fetched = tuple[Layout, int, list[bytes]]  # layout, first piece, the pieces from there


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: Fetched | None = None
        self.error: BaseException | None = None


class _Entry:
    """A cached chunk: its layout, and either the whole plaintext (one buffer: a read of the whole
    chunk is served without a copy) or those of its pieces that were read."""

    __slots__ = ("layout", "nbytes", "pieces", "whole")

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.whole: bytes | None = None
        self.pieces: list[bytes | None] = [None] * layout.count
        self.nbytes = 0

    def slice(self, start: int, end: int) -> bytes | None:
        if self.whole is not None:
            return self.whole[start:end]
        return _slices(self.pieces, self.layout.piece_size, start, min(end, self.layout.raw_len))


def _slices(pieces: list[bytes | None], ps: int, start: int, end: int) -> bytes | None:
    """Bytes [start, end) of a chunk from its pieces of size *ps*, or None if one is missing."""
    first, last = start // ps, (end - 1) // ps
    if first == last:
        p = pieces[first]
        return None if p is None else p[start - first * ps : end - first * ps]
    parts = []
    for i in range(first, last + 1):
        p = pieces[i]
        if p is None:
            return None
        base = i * ps
        parts.append(p[max(start, base) - base : min(end, base + ps) - base])
    return b"".join(parts)


class ChunkCache:
    def __init__(self, store: ChunkStore, capacity: int, *, workers: int | None = None) -> None:
        self.store = store
        self.capacity = capacity
        self._lock = threading.Lock()
        self._lru: OrderedDict[bytes, _Entry] = OrderedDict()
        self._size = 0
        self._pending: dict[tuple[bytes, int], _Pending] = {}
        self._pool = ThreadPoolExecutor(workers or os.cpu_count() or 2, thread_name_prefix="decode")
        self.hits = self.misses = 0

    def close(self) -> None:
        # Queued tasks still run: a cancelled fetch would leave its waiters waiting forever.
        self._pool.shutdown(wait=True)

    # --- the hit path ----------------------------------------------------------------------------
    def lookup(self, digest: bytes, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of the chunk if its pieces are cached, else None.  Never blocks long."""
        with self._lock:
            e = self._lru.get(digest)
            if e is None:
                return None
            data = e.slice(start, end)
            if data is not None:
                self._lru.move_to_end(digest)
                self.hits += 1
            return data

    # --- fetching --------------------------------------------------------------------------------
    def _claim(self, key: tuple[bytes, int]) -> tuple[_Pending, bool]:
        """The pending fetch of *key*, and whether this caller must do it."""
        with self._lock:
            pending = self._pending.get(key)
            if pending is not None:
                return pending, False
            pending = self._pending[key] = _Pending()
            self.misses += 1
            return pending, True

    @staticmethod
    def _wait(pending: _Pending) -> Fetched:
        pending.event.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.data is not None
        return pending.data

    def _settle(self, key: tuple[bytes, int], pending: _Pending, fetch: Callable[[], Fetched]) -> Fetched:
        """Run the fetch, cache its pieces (never an error) and wake the waiters."""
        try:
            got = fetch()
        except BaseException as exc:
            pending.error = exc
            with self._lock:
                del self._pending[key]
            pending.event.set()
            raise
        pending.data = got
        with self._lock:
            del self._pending[key]
            self._insert(key[0], got)
        pending.event.set()
        return got

    def _fetch(self, key: tuple[bytes, int]) -> Fetched:
        """Fetch (or wait for) a piece, or the whole chunk if key[1] is WHOLE."""
        pending, fetcher = self._claim(key)
        return self._do(key, pending) if fetcher else self._wait(pending)

    def _do(self, key: tuple[bytes, int], pending: _Pending) -> Fetched:
        digest, i = key
        with self._lock:
            e = self._lru.get(digest)
            layout = None if e is None else e.layout  # known: the piece table is not read again
        first, last = (0, 1 << 30) if i == WHOLE else (i, i)

        def fetch() -> Fetched:
            lay, parts = self.store.read_pieces(digest, first, last, layout)
            return lay, (0 if lay.count == 1 else first), parts

        return self._settle(key, pending, fetch)

    def read(self, digest: bytes, start: int, end: int, *, whole: bool = False) -> bytes:
        """Bytes [start, end) of the chunk, fetched as needed (worker threads).  CorruptChunk or
        MissingChunk if they cannot be read.  *whole*: take the whole chunk (sequential readers)."""
        data = self.lookup(digest, start, end)
        if data is not None:
            return data
        with self._lock:
            e = self._lru.get(digest)
            layout = None if e is None else e.layout
            pending_whole = self._pending.get((digest, WHOLE))
        if whole or pending_whole is not None:
            try:
                lay, first, parts = self._fetch((digest, WHOLE))
            except CorruptChunk:
                pass  # a damaged piece elsewhere in the chunk must not cost this range: piece by piece
            else:
                data = self.lookup(digest, start, end)  # the joined chunk: no copy for a whole read
                if data is None:  # evicted already (a cache smaller than the readers' window)
                    data = _slices(list(parts), lay.piece_size, start, min(end, lay.raw_len))
                assert data is not None
                return data
        ps = PIECE_SIZE if layout is None else layout.piece_size
        got: dict[int, bytes] = {}
        for i in range(start // ps, (end - 1) // ps + 1):
            with self._lock:
                e = self._lru.get(digest)
                have = None if e is None or i >= len(e.pieces) else e.pieces[i]  # (whole: a hit above)
            if have is None:
                lay, first, parts = self._fetch((digest, i))
                if lay.count == 1:  # a v1 chunk: its one piece is the whole
                    ps, got = lay.piece_size, {0: parts[0]}
                    break
                have = parts[i - first]
            got[i] = have
        pieces: list[bytes | None] = [None] * (max(got) + 1)
        for i, p in got.items():
            pieces[i] = p
        out = _slices(pieces, ps, start, min(end, ps * len(pieces)))
        assert out is not None
        return out

    def get(self, digest: bytes) -> bytes:
        """The whole chunk."""
        _, _, parts = self._fetch((digest, WHOLE))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _insert(self, digest: bytes, got: Fetched) -> None:
        layout, first, parts = got
        e = self._lru.get(digest)
        if e is None:
            e = self._lru[digest] = _Entry(layout)
        if e.whole is None:
            if first == 0 and len(parts) == layout.count:
                whole = parts[0] if len(parts) == 1 else b"".join(parts)
                self._size += len(whole) - e.nbytes
                e.whole, e.nbytes, e.pieces = whole, len(whole), []
            else:
                for k, p in enumerate(parts):
                    if e.pieces[first + k] is None:
                        e.pieces[first + k] = p
                        e.nbytes += len(p)
                        self._size += len(p)
        self._lru.move_to_end(digest)
        while self._size > self.capacity and self._lru:
            _, old = self._lru.popitem(last=False)
            self._size -= old.nbytes

    def prefetch(self, digests: Iterable[bytes]) -> None:
        for d in digests:
            with self._lock:
                e = self._lru.get(d)
                if (e is not None and e.whole is not None) or (d, WHOLE) in self._pending:
                    continue
            self._pool.submit(self._prefetch_one, d)

    def _prefetch_one(self, digest: bytes) -> None:
        # Never wait in the pool: a fetch pending elsewhere may be queued behind this very task.
        pending, fetcher = self._claim((digest, WHOLE))
        if fetcher:
            with contextlib.suppress(CorruptChunk):  # the reader that needs it gets the error itself
                self._do((digest, WHOLE), pending)

    @property
    def size(self) -> int:
        return self._size


def limit_malloc_arenas() -> None:
    """glibc gives each thread its own malloc arena; chunk-sized buffers freed in other threads then
    fragment them (peak RSS 1 GB with a 512 MB cache).  Two arenas keep RSS near the cache size."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
