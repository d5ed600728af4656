"""Disk images as byte ranges: a backup disk (read-only), a session disk (backup + delta), and the
file views (raw, vmdk, flat vmdk, vhd) of either.

All methods are synchronous and thread-safe; front ends call them from worker threads, except the
``read_cached`` hit paths, which do not wait for data and may run on an event loop.

**Session deltas.**  A session disk's writes go to a sparse file of the disk's size,
``sessions/<id>/disks/<disk>.delta``.  The delta's own allocation (``SEEK_DATA``/``SEEK_HOLE``) is the
map of what the session wrote: no second structure can disagree with the data after a crash, and a
killed daemon loses nothing the kernel already has.  For that to hold, every write covers whole
allocation blocks (``max(4 KiB, st_blksize)`` of the delta's filesystem): an unaligned write first
reads the merged head and tail blocks (read-modify-write, serialized per disk).  Filesystems that do
not report holes are refused when the session is opened.  Trimming is not passed to the delta
(punching a hole would make the backup's old bytes reappear).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Iterator
from datetime import datetime
from enum import IntEnum
from pathlib import Path

from ..repo.blob import ZERO_DIGEST
from ..repo.index import FixedIndex
from ..repo.tables import PieceTables
from .cache import Buffer, ChunkCache
from .formats import flat_vmdk_name, vhd_footer, vmdk_descriptor

READAHEAD_CHUNKS = 8
_zeros = bytes(1 << 20)


def zeros(n: int) -> Buffer:
    """*n* zero bytes as a view of one shared read-only buffer: holes are read as often as data, and a
    fresh ``bytes(n)`` per read was a memset and page faults for every MiB of every hole."""
    global _zeros
    if n > len(_zeros):
        _zeros = bytes(n)  # a larger chunk size: grown once (a racing reader keeps its own buffer)
    return memoryview(_zeros)[:n]


class BackupDisk:
    """One disk of one restore point, read through the shared chunk cache with sequential readahead."""

    def __init__(self, index: FixedIndex, cache: ChunkCache, tables: PieceTables | None = None) -> None:
        self.index = index
        self.cache = cache
        self.tables = tables  # the chunks' heads: a cold random read then reads only its piece's bytes
        self.size = index.disk_size
        self.chunk_size = index.chunk_size
        self._last_chunk = -1  # the last chunk a read reached: readahead starts when reads move on

    def _pieces(self, off: int, size: int) -> list[tuple[int, bytes, int, int]]:
        """(chunk number, digest, start, end within the chunk) for each chunk the range touches."""
        end = min(off + size, self.size)
        cs = self.chunk_size
        out = []
        for i in range(off // cs, (end - 1) // cs + 1 if end > off else off // cs):
            base = i * cs
            out.append((i, self.index.digest(i), max(off, base) - base, min(end, base + cs) - base))
        return out

    def read_cached(self, off: int, size: int) -> Buffer | None:
        """The bytes if every chunk they need is cached (or a hole), else None.  Never blocks."""
        parts: list[Buffer] = []
        for _, digest, a, b in self._pieces(off, size):
            if digest == ZERO_DIGEST:
                parts.append(zeros(b - a))
                continue
            data = self.cache.lookup(digest, a, b)
            if data is None:
                return None
            parts.append(data)
        self._readahead(off, size)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, off: int, size: int) -> Buffer:
        """The bytes, fetching chunks as needed (worker threads).  CorruptChunk if one cannot be read.

        Sequential reads take whole chunks, decoded ahead on every core; a random read decodes only
        the pieces it touches (ChunkCache.read)."""
        sequential = self._readahead(off, size)
        parts: list[Buffer] = []
        tables = None if sequential else self.tables
        for i, digest, a, b in self._pieces(off, size):
            if digest == ZERO_DIGEST:
                parts.append(zeros(b - a))
            else:
                head = None if tables is None else tables.head(i)
                parts.append(self.cache.read(digest, a, b, whole=sequential, head=head))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _readahead(self, off: int, size: int) -> bool:
        """Note where reads are; when they move on sequentially, prefetch the next chunks.  Returns
        whether this read continues the previous one."""
        last = (min(off + size, self.size) - 1) // self.chunk_size
        prev, self._last_chunk = self._last_chunk, last
        first = off // self.chunk_size
        sequential = first in (prev, prev + 1)
        if last != prev and sequential:
            stop = min(last + 1 + READAHEAD_CHUNKS, self.index.count)
            digests = (self.index.digest(i) for i in range(last + 1, stop))
            self.cache.prefetch(d for d in digests if d != ZERO_DIGEST)
        return sequential


class SessionDisk:
    """A backup disk made writable: reads merge the delta file over the backup, writes go to the delta.

    **Descriptor lifetime.**  ``close()`` (a stopped session) may come while worker threads still hold
    this disk through a view they looked up earlier.  The delta's descriptor is closed only when the
    last of them is done, and any use after ``close()`` is ESTALE, so a stopped session's descriptor
    number can never be reused under a worker by some other file it would then read or write.

    **Writers in several processes.**  FUSE and NFS may serve one session from two processes.  Every
    write takes an OFD lock (``F_OFD_SETLKW``, bound to this open file description, not the process)
    on the allocation blocks it covers, and the in-process lock for threads sharing this descriptor:
    a read-modify-write of a block never undoes another process's write to the same block.
    """

    def __init__(self, base: BackupDisk, delta: Path) -> None:
        self.base = base
        self.size = base.size
        self.path = delta
        self._fd = os.open(delta, os.O_RDWR | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        if st.st_size != self.size:
            os.close(self._fd)
            raise OSError(
                errno.EIO, f"{delta} holds {st.st_size} bytes, its disk {self.size}: damaged overlay"
            )
        self.block = max(4096, st.st_blksize)
        self._rmw = threading.Lock()
        self._state = threading.Lock()  # guards _users, _writers and _closed
        self._users = 0
        self._writers = 0  # writes to the delta under way in this process
        self._closed = False

    @staticmethod
    def written_in(delta: Path) -> int:
        """Bytes a session wrote to the disk whose delta is *delta*."""
        fd = os.open(delta, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return sum(b - a for a, b in _data_ranges(fd, 0, os.fstat(fd).st_size))
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _use(self) -> Iterator[int]:
        """The delta's descriptor, kept open until the block ends; ESTALE once the disk is closed."""
        with self._state:
            if self._closed:
                raise OSError(errno.ESTALE, f"{os.strerror(errno.ESTALE)}: {self.path} (session stopped)")
            self._users += 1
        try:
            yield self._fd
        finally:
            self._done()

    def _done(self) -> None:
        """A user of the descriptor is done; the last one after ``close()`` closes it."""
        with self._state:
            self._users -= 1
            last = self._closed and self._users == 0
        if last:
            os.close(self._fd)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        with self._state:
            self._writers += 1
        try:
            yield
        finally:
            with self._state:
                self._writers -= 1

    def close(self) -> None:
        with self._state:
            if self._closed:
                return
            self._closed = True
            idle = self._users == 0
        if idle:
            os.close(self._fd)

    def stat(self) -> os.stat_result:
        with self._use() as fd:
            return os.fstat(fd)

    def utime(self, ns: tuple[int, int]) -> None:
        with self._use() as fd:
            os.utime(fd, ns=ns)

    def read(self, off: int, size: int) -> Buffer:
        with self._use() as fd:
            return self._read(fd, off, size)

    def read_cached(self, off: int, size: int) -> Buffer | None:
        """The bytes if the session wrote none of them and the backup's are cached, else None (read them
        in a worker thread).  For an event loop: one ``lseek`` on the delta, and none while this
        process writes to it (a buffered write holds the inode lock that ``lseek`` waits for)."""
        end = min(off + size, self.size)
        if off >= end:
            return b""
        with self._state:
            if self._closed or self._writers:
                return None
            self._users += 1
        try:
            if _data_ranges(self._fd, off, end):
                return None
            return self.base.read_cached(off, end - off)
        except OSError:
            return None  # a worker reads it again and reports what is wrong
        finally:
            self._done()

    def _read(self, fd: int, off: int, size: int) -> Buffer:
        end = min(off + size, self.size)
        if off >= end:
            return b""
        ranges = _data_ranges(fd, off, end)
        if not ranges:
            return self.base.read(off, end - off)
        if ranges == [(off, end)]:
            return os.pread(fd, end - off, off)
        parts, pos = [], off  # the backup only for the gaps: a chunk the session overwrote whole is
        for a, b in ranges:  # never read (nor its damage, if the session replaced a corrupt chunk)
            if a > pos:
                parts.append(self.base.read(pos, a - pos))
            parts.append(os.pread(fd, b - a, a))
            pos = b
        if pos < end:
            parts.append(self.base.read(pos, end - pos))
        return b"".join(parts)

    def write(self, off: int, data: bytes | memoryview) -> int:
        n = len(data)
        if off < 0 or off + n > self.size:
            raise OSError(errno.EFBIG, f"write of {n} bytes at {off} is past the disk's end ({self.size})")
        if n == 0:
            return 0
        g = self.block
        a, b = off // g * g, min(-(-(off + n) // g) * g, self.size)
        # A read-modify-write must not undo a concurrent write to the same block: threads sharing the
        # descriptor are kept apart by _rmw, other processes (and other descriptors) by the OFD lock.
        with self._use() as fd, self._writing(), self._rmw, _ofd_locked(fd, a, b - a):
            if a == off and b == off + n:
                _pwrite_all(fd, data, off)
                return n
            buf = bytearray(b - a)
            if off > a:
                head_end = min(a + g, b)
                buf[: head_end - a] = self._read(fd, a, head_end - a)
            if off + n < b:
                tail = (off + n) // g * g
                buf[tail - a :] = self._read(fd, tail, b - tail)
            buf[off - a : off - a + n] = data
            _pwrite_all(fd, buf, a)
            return n

    def flush(self) -> None:
        with self._use() as fd:
            os.fdatasync(fd)


_FLOCK = struct.Struct("@hhqqi4x")  # struct flock (Linux): l_type, l_whence, l_start, l_len, l_pid


@contextlib.contextmanager
def _ofd_locked(fd: int, start: int, length: int) -> Iterator[None]:
    """An exclusive OFD record lock on [start, start + length) of *fd*, waited for."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, length, 0))
    try:
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, off: int) -> None:
    view = memoryview(data)
    while view:
        k = os.pwrite(fd, view, off)
        view, off = view[k:], off + k


Disk = BackupDisk | SessionDisk


def _data_ranges(fd: int, off: int, end: int) -> list[tuple[int, int]]:
    """The allocated ranges of [off, end) in a sparse file: what a session has written."""
    out = []
    pos = off
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            raise
        if start >= end:
            break
        stop = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((max(start, off), min(stop, end)))
        pos = stop
    return out


def create_delta(path: Path, size: int) -> None:
    """A new, empty (all hole) delta for a disk of *size* bytes; refuses filesystems without holes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        if _data_ranges(fd, 0, size):
            raise OSError(
                errno.EOPNOTSUPP,
                f"the filesystem of {path.parent} does not report holes (SEEK_DATA); recovery sessions "
                "need ext4, xfs, btrfs or tmpfs there",
            )
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink()
        raise
    os.close(fd)


class ViewKind(IntEnum):
    RAW = 0
    VMDK = 1
    FLAT = 2
    VHD = 3


def view_name(disk: str, kind: ViewKind) -> str:
    return {
        ViewKind.RAW: f"{disk}.raw",
        ViewKind.VMDK: f"{disk}.vmdk",
        ViewKind.FLAT: flat_vmdk_name(disk),
        ViewKind.VHD: f"{disk}.vhd",
    }[kind]


class View:
    """One file showing a disk: its size, and reads/writes translated to the disk's bytes."""

    def __init__(self, kind: ViewKind, disk_name: str, disk: Disk, identity: str, created: datetime) -> None:
        self.kind = kind
        self.disk = disk
        self.trailer = b""  # bytes after the disk's (vhd footer), or the whole file (vmdk descriptor)
        if kind is ViewKind.VMDK:
            self.trailer = vmdk_descriptor(disk_name, disk.size, identity)
        elif kind is ViewKind.VHD:
            self.trailer = vhd_footer(disk.size, identity, created)
        self.data_size = 0 if kind is ViewKind.VMDK else disk.size
        self.size = self.data_size + len(self.trailer)

    def _trailer(self, off: int, size: int) -> bytes:
        a = max(off - self.data_size, 0)
        return self.trailer[a : max(off + size - self.data_size, 0)]

    def read_cached(self, off: int, size: int) -> Buffer | None:
        if off >= self.data_size:
            return self._trailer(off, size)
        if off + size <= self.data_size:
            return self.disk.read_cached(off, size)
        return None

    def read(self, off: int, size: int) -> Buffer:
        if off >= self.size:
            return b""
        head = self.disk.read(off, min(size, self.data_size - off)) if off < self.data_size else b""
        return b"".join((head, self._trailer(off, size))) if off + size > self.data_size else head

    def write(self, off: int, data: bytes | memoryview) -> int:
        if not isinstance(self.disk, SessionDisk):
            raise OSError(errno.EROFS, "backup views are read-only")
        n = len(data)
        if off + n > self.data_size:
            beyond = max(self.data_size - off, 0)
            if bytes(data[beyond:]) != self._trailer(off + beyond, n - beyond):
                raise OSError(errno.EPERM, "the descriptor or footer of a session's disk view cannot change")
            data = data[:beyond]
        if data:
            self.disk.write(off, data)
        return n

    def flush(self) -> None:
        if isinstance(self.disk, SessionDisk):
            self.disk.flush()
