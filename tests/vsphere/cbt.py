"""Changed block tracking from the disk files themselves, for the vSphere test proxy.

A changeId names a recorded map of the per-64 KiB block hashes of a disk's flat file at the moment the
id was handed out: ``"<epoch uuid, ESXi's spaced hex form>/<sequence>"``, the sequence moving only when
the content did (so the same id comes back while nothing changed).  Changed areas since an id are the
blocks whose hash differs now.  ``*`` asks for the allocated areas, from SEEK_DATA/SEEK_HOLE.

The current map of a file is cached by its stat (size, mtime, ctime, inode) and recomputed when that
moves, or when the file was modified so shortly before it was hashed that a later write could keep the
same coarse timestamp (the "racily clean" rule git uses for its index).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass

BLOCK = 64 * 1024
_DIGEST = 20  # sha1
_ZERO = hashlib.sha1(bytes(BLOCK)).digest()
RACY_NS = 200_000_000  # a file modified less than this before hashing is hashed again next time
CHANGE_ID = re.compile(r"^(?P<epoch>[0-9a-f]{2}( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7})/(?P<seq>\d+)$")


class UnknownChangeId(Exception):
    """The changeId is well-formed but names no state this disk still has (ESXi: FileFault)."""


class BadChangeId(Exception):
    """The changeId is not one at all (ESXi: InvalidArgument on changeId)."""


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The allocated (offset, length) ranges of an open file, by SEEK_DATA/SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end - start))
        pos = end
    return out


def block_map(path: str) -> tuple[int, bytes]:
    """(size, concatenated sha1 of each 64 KiB block); blocks in holes are never read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        nblocks = (size + BLOCK - 1) // BLOCK
        digests = [_ZERO] * nblocks
        if nblocks and size % BLOCK:  # the short last block hashes as what it is
            digests[-1] = hashlib.sha1(bytes(size % BLOCK)).digest()
        for off, length in data_extents(fd, size):
            for b in range(off // BLOCK, (off + length - 1) // BLOCK + 1):
                digests[b] = hashlib.sha1(os.pread(fd, BLOCK, b * BLOCK)).digest()
        return size, b"".join(digests)
    finally:
        os.close(fd)


@dataclass
class _Track:
    epoch: str
    maps: dict[int, tuple[int, bytes]]  # sequence -> (size, digests)
    seq: int = 0


def _epoch() -> str:
    h = uuid.uuid4().hex
    pairs = [h[i : i + 2] for i in range(0, 32, 2)]
    return " ".join(pairs[:8]) + "-" + " ".join(pairs[8:])


class ChangeTracker:
    """changeIds per disk (keyed by the flat file's real path), shared by the proxy's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tracks: dict[str, _Track] = {}
        self._cache: dict[str, tuple[tuple[int, ...], int, tuple[int, bytes]]] = {}
        self.reject_all = False  # a test's switch: every changeId (not '*') is refused

    def current(self, path: str) -> tuple[int, bytes]:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        with self._lock:
            cached = self._cache.get(path)
        if cached and cached[0] == key and st.st_mtime_ns < cached[1] - RACY_NS:
            return cached[2]
        hashed_at = time.time_ns()
        m = block_map(path)
        with self._lock:
            self._cache[path] = (key, hashed_at, m)
        return m

    def change_id(self, path: str) -> str:
        """The id naming the disk's content now (the last one handed out, if nothing changed)."""
        path = os.path.realpath(path)
        m = self.current(path)
        with self._lock:
            t = self._tracks.get(path)
            if t is None:
                t = self._tracks[path] = _Track(_epoch(), {})
            if not t.maps or t.maps[t.seq] != m:
                t.seq += 1
                t.maps[t.seq] = m
            return f"{t.epoch}/{t.seq}"

    def reset(self, path: str) -> None:
        """Forget every id of this disk (CBT was turned off: ESXi starts a new epoch)."""
        with self._lock:
            self._tracks.pop(os.path.realpath(path), None)

    def forget_all(self) -> None:
        with self._lock:
            self._tracks.clear()

    def changed(self, path: str, change_id: str, start: int, end: int) -> list[tuple[int, int]]:
        """Areas in [start, end) that differ between the state *change_id* names and the file now."""
        mt = CHANGE_ID.match(change_id)
        if not mt:
            raise BadChangeId(change_id)
        path = os.path.realpath(path)
        with self._lock:
            t = self._tracks.get(path)
            old = t.maps.get(int(mt["seq"])) if t and t.epoch == mt["epoch"] and not self.reject_all else None
        if old is None:
            raise UnknownChangeId(change_id)
        size, now = self.current(path)
        if size != old[0]:  # ESXi resets tracking when a disk is resized
            raise UnknownChangeId(change_id)
        areas: list[tuple[int, int]] = []
        first, last = start // BLOCK, (min(end, size) + BLOCK - 1) // BLOCK
        for b in range(first, last):
            if now[b * _DIGEST : (b + 1) * _DIGEST] != old[1][b * _DIGEST : (b + 1) * _DIGEST]:
                lo, hi = max(b * BLOCK, start), min((b + 1) * BLOCK, end, size)
                if areas and areas[-1][0] + areas[-1][1] == lo:
                    areas[-1] = (areas[-1][0], hi - areas[-1][0])
                else:
                    areas.append((lo, hi - lo))
        return areas


def allocated(path: str, start: int, end: int) -> list[tuple[int, int]]:
    """The allocated areas of the file within [start, end) (what ESXi answers for changeId '*')."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        out = []
        for off, length in data_extents(fd, size):
            lo, hi = max(off, start), min(off + length, end)
            if lo < hi:
                out.append((lo, hi - lo))
        return out
    finally:
        os.close(fd)
