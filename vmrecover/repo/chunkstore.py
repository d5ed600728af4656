"""Content-addressed chunk store: ``chunks/<first 2 hex digits>/<64 hex digits>``.

Knows digests and files only: nothing about disks, offsets or restore points (PBS ``chunk_store``).
``put`` writes a temp file and renames it (no fsync: the caller makes a whole backup's chunks durable
with one syncfs before committing anything that references them).  Two writers storing the same
digest at once are harmless: both renames install identical bytes.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import CorruptChunk, MissingChunk
from ..fsutil import TMP_MARK, write_file
from .blob import HEADER, V2, ChunkCodec, Identity, Layout

WHOLE_CHUNK = 1 << 30  # read_pieces(d, 0, WHOLE_CHUNK): every piece
log = logging.getLogger("vmrecover.repo")
HEAD_READ = 4096  # the first read of a chunk file: header and piece table (v2: 604 bytes for 1 MiB)


class ChunkStore:
    def __init__(self, root: Path, codec: ChunkCodec) -> None:
        self.root = root
        self._root = os.fspath(root)
        self.codec = codec

    @staticmethod
    def create_layout(root: Path) -> None:
        for i in range(256):
            (root / f"{i:02x}").mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, digest: bytes) -> Path:
        return Path(self.fspath(digest))

    def fspath(self, digest: bytes) -> str:
        """The chunk file's path as a string: what the read paths open (a Path costs 2.5 us more)."""
        h = digest.hex()
        return f"{self._root}/{h[:2]}/{h}"

    def has(self, digest: bytes) -> bool:
        """Is the chunk stored?  A file shorter than an envelope header (left empty by a power loss
        after a killed, never-synced backup) does not count, so the next backup writes it again."""
        try:
            return os.stat(self.path(digest)).st_size >= HEADER.size
        except FileNotFoundError:
            return False

    def put(self, ident: Identity | bytes, data: bytes) -> tuple[int, bytes]:
        """Store *data* under its identity (ChunkCodec.identify); return the stored (envelope) size
        and the file's head (v2: envelope header and piece table; v1: b"")."""
        blob = self.codec.encode(ident, data)
        digest = ident if isinstance(ident, bytes) else ident.digest
        write_file(self.path(digest), blob, durable=False, what=f"chunk {digest.hex()}")
        return len(blob), self._v2_head(digest, blob)

    def _v2_head(self, digest: bytes, head: bytes) -> bytes:
        if HEADER.unpack_from(head)[1] != V2:
            return b""
        return head[: self.codec.head_size(digest, head)]

    def read_head(self, digest: bytes) -> bytes:
        """The stored chunk's head as :meth:`put` returns it, unproven; b"" if it cannot be read
        (a hint for repo/tables.py: whoever uses it proves it)."""
        try:
            fd = os.open(self.fspath(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return b""
        try:
            return self._v2_head(digest, self._head(fd, digest))
        except (OSError, CorruptChunk):
            return b""
        finally:
            os.close(fd)

    def _head(self, fd: int, digest: bytes) -> bytes:
        """The first bytes of a chunk file, as many as its layout needs (one read for 1 MiB chunks)."""
        head = os.pread(fd, HEAD_READ, 0)
        need = self.codec.head_size(digest, head)
        if need > len(head) and len(head) == HEAD_READ:
            head += os.pread(fd, need - len(head), len(head))
        return head

    def read_raw(self, digest: bytes) -> bytes:
        try:
            with open(self.fspath(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise MissingChunk(digest) from None

    def get(self, digest: bytes, *, check_crc: bool = False) -> bytes | bytearray:
        """The chunk's plaintext, verified against its digest (CorruptChunk/MissingChunk otherwise)."""
        return self.codec.decode(digest, self.read_raw(digest), check_crc=check_crc)

    def read_pieces(
        self, digest: bytes, first: int, last: int, layout: Layout | None = None, *, head: bytes | None = None
    ) -> tuple[Layout, bytes | bytearray]:
        """The plaintext of pieces first..last of a chunk (clamped to its pieces; a v1 chunk has one,
        the whole), each proven against the digest, and the chunk's layout (pass a cached one to skip
        reading the piece table again).  Two reads at most: the head, then the pieces' bytes.

        *head*: the chunk file's head from elsewhere (repo/tables.py), a hint: used only once proven
        like the file's own, and if it fails or the pieces it places do not decode, the read is done
        again from the file alone (a stale hint costs time, never an error)."""
        if head is not None and layout is None:
            try:
                return self._read_pieces(digest, first, last, None, head)
            except MissingChunk:
                raise
            except CorruptChunk as exc:
                log.debug("chunk %s: its piece table from the point's tables failed (%s)", digest.hex(), exc)
        return self._read_pieces(digest, first, last, layout, None)

    def _read_pieces(
        self, digest: bytes, first: int, last: int, layout: Layout | None, hint: bytes | None
    ) -> tuple[Layout, bytes | bytearray]:
        try:
            fd = os.open(self.fspath(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MissingChunk(digest) from None
        try:
            if layout is None and first == 0 and last >= WHOLE_CHUNK:  # the whole file: one read
                size = os.fstat(fd).st_size
                buf = os.pread(fd, size, 0)
                layout = self.codec.layout(digest, buf, len(buf))
                last = layout.count - 1
                return layout, self.codec.decode_pieces(digest, layout, 0, last, buf, 0)
            # No kernel readahead: the head and one piece are all a random reader wants of the file
            # (cold, head + piece took 0.35 ms with readahead and 0.29 without, p50 here).
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            if layout is None:
                size = os.fstat(fd).st_size
                layout = self.codec.layout(digest, self._head(fd, digest) if hint is None else hint, size)
            if layout.count == 1:
                first = 0
            last = min(last, layout.count - 1)
            off, n = layout.span(first, last)
            buf = os.pread(fd, n, off)
        finally:
            os.close(fd)
        if len(buf) != n:
            raise CorruptChunk(digest, f"file ends within pieces {first}-{last} (truncated)")
        return layout, self.codec.decode_pieces(digest, layout, first, last, buf, off)

    def walk(self) -> Iterator[tuple[str, Path, os.stat_result]]:
        """Every file under chunks/: (name, path, stat); temp files included (name contains TMP_MARK)."""
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir():
                continue
            with os.scandir(sub) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno == errno.ENOENT:
                            continue
                        raise
                    yield entry.name, Path(entry.path), st

    @staticmethod
    def is_temp(name: str) -> bool:
        return TMP_MARK in name
