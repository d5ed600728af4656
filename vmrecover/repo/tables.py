"""Piece tables beside a fixed index (``indexes/<point>/<disk>.ptab``): the head of each chunk's file
(envelope header and piece table, as stored: encrypted in an encrypted repository), by chunk number.

Why: a cold random read of a v2 chunk otherwise reads the chunk file twice, its head to learn where
the piece lies, then the piece.  With the head known, it reads the piece only (one disk access of the
three a cold read costs: the inode, the head, the piece).  The file is a *hint*: a record is used only
after the same proof as a head read from the chunk file (``ChunkCodec.layout``: the table's hashes
against the digest the index names, its lengths against the chunk file's size, AES-GCM in an
encrypted repository), and each piece is still proven against its hash.  A record that fails, a
missing or damaged file, or a point written before this file existed all read the head from the chunk
file, as before: this file can cost a read, never a wrong byte or an error.

Format v1, little endian, never edited once the point is committed::

    offset size  field
    0      8     magic b"VMRPTAB\\n"
    8      4     version = 1
    12     4     record size R: the largest head of a chunk of this disk's chunk size
    16     8     count: the index's chunk count
    24     8     reserved, 0
    32     R*count  record i: the first bytes of chunk i's file, zero-padded; all zeros (a hole in the
                 file where the disk has holes) when unknown: a hole in the disk, a v1 chunk (its head
                 tells nothing a whole-chunk read does not), a chunk whose head could not be read

Points written before this file existed get one from ``vmrecover upgrade``
(``Repository.add_piece_tables``: one head read per chunk, written aside and renamed into place).

Cost: R is 620 bytes for 1 MiB chunks (16 pieces; 592 unencrypted), so 0.06% of the disk's size per
point, the disk's holes excluded (the file is sparse there).  An incremental copies its parent's
records (sparse) and rewrites those of the chunks it read; a dedup hit reads the stored chunk's head.
Readers hold files up to :data:`RESIDENT_MAX` in memory (a 100 GiB disk's), larger ones are mapped.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from ..fsutil import raise_if_no_space
from .blob import ENTRY, HEADER, MAGIC, NONCE, PIECE_SIZE, TAG, ZERO_DIGEST
from .index import FixedIndex
from .reader import ordered_map

log = logging.getLogger("vmrecover.repo")

FILE_MAGIC = b"VMRPTAB\n"
VERSION = 1
FILE_HEADER = struct.Struct("<8sIIQ8x")
RESIDENT_MAX = 64 << 20
_COPY_BLOCK = 1 << 20
_FILL_WINDOW = 64  # chunk heads TableWriter.fill has queued at a time (small reads, mostly cold)


def tables_name(disk: str) -> str:
    return f"{disk}.ptab"


def record_size(chunk_size: int, encrypted: bool) -> int:
    """The largest head of a v2 chunk of *chunk_size* bytes (blob.ChunkCodec.head_size's bound)."""
    return HEADER.size + -(-chunk_size // PIECE_SIZE) * ENTRY.size + (NONCE + TAG if encrypted else 0)


class TableWriter:
    """The piece tables of a disk being backed up, written in place as its chunks are stored (a
    sparse file in the point's temp folder: made durable by the commit's syncfs with the chunks)."""

    def __init__(self, path: Path, count: int, rec: int, parent: Path | None = None) -> None:
        self.path, self.count, self.rec = path, count, rec
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(self._fd, FILE_HEADER.size + count * rec)
            self._write(FILE_HEADER.pack(FILE_MAGIC, VERSION, rec, count), 0)
            if parent is not None:
                self._inherit(parent)
        except BaseException:
            os.close(self._fd)
            raise

    def _write(self, data: bytes, pos: int) -> None:
        try:
            os.pwrite(self._fd, data, pos)
        except OSError as exc:
            raise_if_no_space(exc, self.path, f"piece tables {self.path.name}")
            raise

    def _inherit(self, parent: Path) -> None:
        """Copy the parent point's records for the chunks both have (an incremental's index starts as
        its parent's); the chunks the backup reads are written over them.  A parent without a usable
        file leaves them unknown."""
        try:
            src = os.open(parent, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            found = _shape(src)
            if isinstance(found, str) or found[0] != self.rec:
                return
            rec, count = found
            end = FILE_HEADER.size + min(count, self.count) * rec
            pos = FILE_HEADER.size
            while pos < end:
                block = os.pread(src, min(_COPY_BLOCK, end - pos), pos)
                if not block:
                    break
                if block.count(0) != len(block):  # holes stay holes
                    self._write(block, pos)
                pos += len(block)
        finally:
            os.close(src)

    def set(self, i: int, head: bytes) -> None:
        """Chunk *i*'s head (b"": unknown, as for a hole or a v1 chunk)."""
        if len(head) > self.rec:
            head = b""  # not a head of this chunk size: leave it unknown
        self._write(head.ljust(self.rec, b"\0"), FILE_HEADER.size + i * self.rec)

    def fill(
        self,
        index: FixedIndex,
        read_head: Callable[[bytes], bytes],
        pool: Executor,
        progress: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Write every chunk's head read from its file (*read_head*, on *pool*): the tables of a point
        written before this file existed.  Returns how many heads are known."""

        digests = (index.digest(i) for i in range(index.count))
        heads = ordered_map(pool, read_head, digests, window=_FILL_WINDOW, skip=ZERO_DIGEST.__eq__)
        known = 0
        for i, head in enumerate(heads):  # a hole's head: None, nothing to read
            if head:
                self.set(i, head)
                known += 1
            progress(1)
        return known

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PieceTables:
    """A committed point's piece tables, read-only: :meth:`head` gives chunk *i*'s record, unproven."""

    def __init__(self, data: bytes | mmap.mmap, rec: int, count: int) -> None:
        self._data, self.rec, self.count = data, rec, count

    @classmethod
    def open(cls, path: Path, count: int) -> PieceTables | None:
        """The file at *path* for an index of *count* chunks, or None (logged) if it is missing or
        not one: reads then take each chunk's head from its file."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None  # a point written before piece tables existed
        except OSError as exc:
            return _unused(path, str(exc))
        try:
            found = _shape(fd)
            if isinstance(found, str):
                return _unused(path, found)
            rec, n = found
            if n != count:
                return _unused(path, f"tables of {n} chunks, the index has {count}")
            size = FILE_HEADER.size + count * rec
            if size > RESIDENT_MAX:
                return cls(mmap.mmap(fd, size, prot=mmap.PROT_READ), rec, count)
            data = os.pread(fd, size, 0)
            return cls(data, rec, count) if len(data) == size else _unused(path, "truncated while read")
        except (OSError, ValueError) as exc:
            return _unused(path, str(exc))
        finally:
            os.close(fd)

    def head(self, i: int) -> bytes | None:
        """Chunk *i*'s record if one is known (to be proven by ChunkCodec.layout before any use)."""
        if not 0 <= i < self.count:
            return None
        pos = FILE_HEADER.size + i * self.rec
        if self._data[pos : pos + 4] != MAGIC:
            return None
        return self._data[pos : pos + self.rec]


def _shape(fd: int) -> tuple[int, int] | str:
    """(record size, count) of a piece tables file whose size agrees with its header, else why not."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, FILE_HEADER.size, 0)
    if len(head) != FILE_HEADER.size:
        return "truncated"
    magic, version, rec, count = FILE_HEADER.unpack(head)
    if (magic, version) != (FILE_MAGIC, VERSION) or not 0 < rec < PIECE_SIZE:
        return "not a piece tables file of this version"
    if size != FILE_HEADER.size + count * rec:
        return f"{size} bytes, its header says {FILE_HEADER.size + count * rec}"
    return rec, count


def _unused(path: Path, why: str) -> None:
    log.info("piece tables %s not used (%s): chunk heads are read from the chunk files", path, why)
