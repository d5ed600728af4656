"""A shared cache of decoded chunk pieces, with de-duplicated concurrent fetches and decode-ahead.

What it holds: per chunk digest, the chunk's proven layout (blob.Layout) and those of its pieces that
were read (a v2 chunk has 64 KiB pieces, a v1 chunk one piece: the whole).  Every piece in it was
proven against its digest when decoded (ChunkStore.read_pieces): nothing unproven is ever cached or
returned.

Concurrency protocol (every reader, FUSE, NFS or a session's disk, goes through here):
- ``lookup(digest, start, end)`` is the hit path: a dict lookup, the recency touch and the slices, under
  one lock, nothing else.  Async front ends call it on their event loop thread; only on a miss do
  they go to a worker thread.
- ``read(digest, start, end)`` runs in worker threads.  A *random* read fetches only the pieces the
  range touches (two small preads, one piece decoded and hashed), never the rest of the chunk.  A
  *sequential* read (``whole=True``) takes the whole chunk, usually already decoded by the pool.
- Fetches are de-duplicated per (digest, piece) and per (digest, whole): the first caller fetches
  (outside the lock), later ones wait on its event.  A failed fetch is not cached: every waiter gets
  the error; another piece of the same chunk still reads (a bit flip costs only its range).
- ``prefetch(digests)`` hands whole-chunk decodes to a pool of two threads per CPU (repo/reader.py's
  ``read_pool``: a decode waits on its chunk file's read part of the time) and returns at once:
  sequential readers decode ahead on every core, within the window the caller bounds (disk.py's
  READAHEAD_CHUNKS).  Pool tasks never wait for another fetch (it may be queued behind them).
- Capacity is in bytes of plaintext, in two parts (W-TinyLFU's layout, vfs/admission.py says why):
  a *window*, an LRU that every new chunk enters and that holds the decode-ahead of the readers
  (``window_size``), and the *main* part, an LRU that a chunk leaving the window enters if there is
  room or if it was wanted more often lately than the main part's least recently used chunk (which it
  then evicts), else it is dropped.  A scan larger than the cache thus leaves the rest of the cache as
  it was.
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
from ..repo.blob import PIECE_SIZE, Layout
from ..repo.chunkstore import WHOLE_CHUNK, ChunkStore
from ..repo.reader import read_pool
from .admission import Frequency

log = logging.getLogger("vmrecover.cache")
WHOLE = -1  # the pending-fetch key of a whole chunk
LATER_MAX = 2  # chunks waiting to be decoded whole after random reads of their pieces
WINDOW_MIN = 32 << 20  # the window holds what four sequential readers decode ahead (disk.py: 8 MiB each)
WINDOW_SHARE = 32  # else 1/32 of the cache (W-TinyLFU's 1% would not hold the decode-ahead)
Buffer = bytes | bytearray | memoryview  # what reads return: a slice of a cached chunk may be a view
Fetched = tuple[Layout, int, Buffer]  # layout, first piece, the plaintext of the pieces from there


class _Pending:
    __slots__ = ("data", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.data: Fetched | None = None
        self.error: BaseException | None = None


_NO_PENDING = _Pending()


class _Entry:
    """A cached chunk: its layout, and either the whole plaintext (a read-only view of one buffer:
    reads are served from it without a copy) or those of its pieces that were read."""

    __slots__ = ("in_main", "layout", "nbytes", "pieces", "whole")

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.in_main = False  # in the window until it is admitted to the main part
        self.whole: memoryview | None = None
        self.pieces: list[Buffer | None] = [None] * layout.count
        self.nbytes = 0

    def slice(self, start: int, end: int) -> Buffer | None:
        if self.whole is not None:
            return self.whole[start:end]
        return _slices(self.pieces, self.layout.piece_size, start, min(end, self.layout.raw_len))


def _near(pieces: list[Buffer | None], first: int, last: int) -> bool:
    """Does a read of pieces first..last touch or adjoin another piece already cached?"""
    return last > first or any(0 <= j < len(pieces) and pieces[j] is not None for j in (first - 1, last + 1))


def _slices(pieces: list[Buffer | None], ps: int, start: int, end: int) -> Buffer | None:
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
    def __init__(
        self, store: ChunkStore, capacity: int, *, workers: int | None = None, window: int | None = None
    ) -> None:
        self.store = store
        self.capacity = capacity
        if window is None:
            window = min(capacity // 2, max(capacity // WINDOW_SHARE, WINDOW_MIN))
        self.window_size = window
        self._lock = threading.Lock()
        self._window: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU: every new chunk enters here
        self._main: OrderedDict[bytes, _Entry] = OrderedDict()  # LRU of the chunks admitted
        self._window_bytes = self._size = 0
        self._wanted = Frequency(0)  # its sample grows with the number of chunks held (_evict)
        self._pending: dict[tuple[bytes, int], _Pending] = {}
        self._queued: set[bytes] = set()  # digests handed to the pool, not started yet
        self._pool = read_pool("decode", workers)
        self._later_pool = ThreadPoolExecutor(1, thread_name_prefix="decode-later")
        self._later_queued: set[bytes] = set()
        self.hits = self.misses = 0

    def close(self) -> None:
        # Queued tasks still run: a cancelled fetch would leave its waiters waiting forever.
        self._pool.shutdown(wait=True)
        self._later_pool.shutdown(wait=True)

    # --- the hit path ----------------------------------------------------------------------------
    def _get(self, digest: bytes) -> _Entry | None:
        e = self._window.get(digest)
        return self._main.get(digest) if e is None else e

    def _hit(self, digest: bytes, e: _Entry) -> None:
        (self._main if e.in_main else self._window).move_to_end(digest)
        self._wanted.wanted(digest, fetched=False)
        self.hits += 1

    def lookup(self, digest: bytes, start: int, end: int) -> Buffer | None:
        """Bytes [start, end) of the chunk if its pieces are cached, else None.  Never blocks long."""
        with self._lock:
            e = self._get(digest)
            if e is None:
                return None
            data = e.slice(start, end)
            if data is not None:
                self._hit(digest, e)
            return data

    # --- fetching --------------------------------------------------------------------------------
    def _claim(self, key: tuple[bytes, int]) -> tuple[Fetched | None, _Pending, bool]:
        """What is cached for *key* already, else its pending fetch and whether this caller must do
        it (a fetch queued before an identical one completed must not decode the chunk again)."""
        digest, i = key
        with self._lock:
            e = self._get(digest)
            if e is not None:
                cached: Fetched | None = None
                if e.whole is not None:
                    cached = (e.layout, 0, e.whole)
                elif i != WHOLE and i < len(e.pieces) and (p := e.pieces[i]) is not None:
                    cached = (e.layout, i, p)
                if cached is not None:
                    self._hit(digest, e)
                    return cached, _NO_PENDING, False
            pending = self._pending.get(key)
            if pending is not None:
                return None, pending, False
            pending = self._pending[key] = _Pending()
            self._wanted.wanted(digest, fetched=True)
            self.misses += 1
            return None, pending, True

    @staticmethod
    def _wait(pending: _Pending) -> Fetched:
        pending.event.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.data is not None
        return pending.data

    def _settle(self, key: tuple[bytes, int], pending: _Pending, fetch: Callable[[], Fetched]) -> Fetched:
        """Run the fetch, cache its result (never an error) and wake the waiters."""
        try:
            got = fetch()
        except BaseException as exc:
            pending.error = exc
            with self._lock:
                del self._pending[key]
            pending.event.set()
            raise
        with self._lock:
            del self._pending[key]
            got = self._insert(key[0], got)
        pending.data = got
        pending.event.set()
        return got

    def _fetch(self, key: tuple[bytes, int], head: bytes | None = None) -> Fetched:
        """Fetch (or wait for) a piece, or the whole chunk if key[1] is WHOLE."""
        cached, pending, fetcher = self._claim(key)
        if cached is not None:
            return cached
        return self._do(key, pending, head) if fetcher else self._wait(pending)

    def _do(self, key: tuple[bytes, int], pending: _Pending, head: bytes | None = None) -> Fetched:
        digest, i = key
        with self._lock:
            e = self._get(digest)
            layout = None if e is None else e.layout  # known: the piece table is not read again
        first, last = (0, WHOLE_CHUNK) if i == WHOLE else (i, i)

        def fetch() -> Fetched:
            lay, data = self.store.read_pieces(digest, first, last, layout, head=head)
            return lay, (0 if lay.count == 1 else first), data

        return self._settle(key, pending, fetch)

    def read(
        self, digest: bytes, start: int, end: int, *, whole: bool = False, head: bytes | None = None
    ) -> Buffer:
        """Bytes [start, end) of the chunk, fetched as needed (worker threads).  CorruptChunk or
        MissingChunk if they cannot be read.  *whole*: take the whole chunk (sequential readers).
        *head*: the chunk file's head from the point's piece tables, a hint (ChunkStore.read_pieces)."""
        data = self.lookup(digest, start, end)
        if data is not None:
            return data
        with self._lock:
            e = self._get(digest)
            layout = None if e is None else e.layout
            # the whole chunk is on its way (decoded ahead, or queued for it), or most of it is asked
            whole = (
                whole
                or (digest, WHOLE) in self._pending
                or digest in self._queued
                or end - start > 2 * PIECE_SIZE
            )
        if whole:
            try:
                lay, _, got = self._fetch((digest, WHOLE))
            except CorruptChunk:
                pass  # a damaged piece elsewhere in the chunk must not cost this range: piece by piece
            else:
                return got[start : min(end, lay.raw_len)]
        ps = PIECE_SIZE if layout is None else layout.piece_size
        parts: list[Buffer] = []
        first_i, last_i = start // ps, (end - 1) // ps
        for i in range(first_i, last_i + 1):
            lay, first, got = self._fetch((digest, i), head)
            if lay.count == 1 or (first == 0 and len(got) == lay.raw_len):  # the whole chunk
                return got[start : min(end, lay.raw_len)]
            base = i * ps
            parts.append(got[max(start, base) - base : min(end, base + ps) - base])
        with self._lock:
            e = self._get(digest)
            near = e is not None and e.whole is None and _near(e.pieces, first_i, last_i)
        if near:  # the reader stays near: it read a neighbour of these pieces already
            self._later(digest)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _later(self, digest: bytes) -> None:
        """After a random read got a piece next to one read before (a reader that stays near, as a
        booting guest does): decode the rest of the chunk in the background, so its next reads hit.
        On one thread and only while few wait, else not at all.  Not after the first piece, nor after
        a second one elsewhere in the chunk (which a truly random reader gets once in four reads of the
        benchmark): on 2 CPUs each background decode delays the reads that come while it runs (pure
        random p99 2.4 ms with it after any second piece, 1.0 ms without; bench/fuse_bench.py)."""
        with self._lock:
            if len(self._later_queued) >= LATER_MAX or digest in self._later_queued:
                return
            self._later_queued.add(digest)
        self._later_pool.submit(self._later_one, digest)

    def _later_one(self, digest: bytes) -> None:
        self._whole_in_background(digest, self._later_queued)

    def get(self, digest: bytes) -> Buffer:
        """The whole chunk."""
        return self._fetch((digest, WHOLE))[2]

    def _insert(self, digest: bytes, got: Fetched) -> Fetched:
        """Cache a fetch's result (lock held); return it as cached (a whole chunk: its read-only view)."""
        layout, first, data = got
        e = self._get(digest)
        if e is None:
            e = self._window[digest] = _Entry(layout)
        grown = 0
        if e.whole is None:
            if first == 0 and len(data) == layout.raw_len:
                view = memoryview(data).toreadonly()
                grown = len(view) - e.nbytes
                e.whole, e.nbytes, e.pieces = view, len(view), []
                got = (layout, 0, view)
            elif e.pieces[first] is None:
                e.pieces[first] = data
                e.nbytes += len(data)
                grown = len(data)
        self._size += grown
        if e.in_main:
            self._main.move_to_end(digest)
        else:
            self._window_bytes += grown
            self._window.move_to_end(digest)
        self._evict()
        return got

    def _evict(self) -> None:
        """Bring both parts within their sizes (lock held): the window's least recently used chunks go
        to the main part where they are admitted, else they are dropped."""
        self._wanted.holding(len(self._window) + len(self._main))
        while self._window_bytes > self.window_size and len(self._window) > 1:
            digest, e = self._window.popitem(last=False)
            self._window_bytes -= e.nbytes
            if self._admit(digest, e):
                e.in_main = True
                self._main[digest] = e
            else:
                self._size -= e.nbytes
        while self._size > self.capacity and (self._main or self._window):
            _, old = (self._main or self._window).popitem(last=False)
            self._size -= old.nbytes
            if not old.in_main:
                self._window_bytes -= old.nbytes

    def _admit(self, digest: bytes, e: _Entry) -> bool:
        """Make room in the main part for *e*, evicting only chunks wanted less often than it."""
        while self._size - self._window_bytes > self.capacity - self.window_size and self._main:
            victim = next(iter(self._main))
            if not self._wanted.admit(digest, victim):
                return False
            self._size -= self._main.pop(victim).nbytes
        return True

    def prefetch(self, digests: Iterable[bytes]) -> None:
        for d in digests:
            with self._lock:
                e = self._get(d)
                if (
                    (e is not None and e.whole is not None)
                    or (d, WHOLE) in self._pending
                    or d in self._queued
                ):
                    continue
                self._queued.add(d)
            self._pool.submit(self._prefetch_one, d)

    def _prefetch_one(self, digest: bytes) -> None:
        self._whole_in_background(digest, self._queued)

    def _whole_in_background(self, digest: bytes, queued: set[bytes]) -> None:
        """A pool task: decode a whole chunk into the cache.  It never waits for another fetch (that
        fetch's completion may be queued behind it); a damaged chunk is left to the reader that needs
        it to report.  *queued*: the set that kept it from being submitted twice."""
        try:
            _, pending, fetcher = self._claim((digest, WHOLE))
        finally:
            with self._lock:
                queued.discard(digest)
        if fetcher:
            with contextlib.suppress(CorruptChunk):
                self._do((digest, WHOLE), pending)

    @property
    def size(self) -> int:
        return self._size


def tune_malloc() -> None:
    """Tune glibc's malloc for a process that keeps a cache of chunk-sized buffers.

    - Two arenas: glibc gives each thread its own, and chunk-sized buffers freed in other threads then
      fragment them (peak RSS 1 GB with a 512 MB cache).
    - Buffers up to 8 MiB from the heap, and freed heap memory kept (up to 64 MiB at its top): by
      default every decoded chunk and every chunk file read is a fresh mmap, and its first touch
      costs one page fault per 4 KiB (250 per chunk: a third of a cold sequential read's CPU here,
      and what made a format 2 backup 1.2x a format 1 one: its pieces are more, smaller buffers).
      Reused heap memory is already mapped."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
