"""Fixed index files (``indexes/<point>/<disk>.fidx``): disk offset -> chunk digest, O(1).

Format v1, little endian, never edited once written::

    offset size  field
    0      8     magic b"VMRFIDX\\n"
    8      4     version = 1
    12     4     chunk_size (bytes)
    16     8     disk_size (bytes; the last chunk may be shorter than chunk_size)
    24     8     count = ceil(disk_size / chunk_size)
    32     32    sha256 of the digest table (catches a damaged index)
    64     32*count  digest table; the all-zero digest means "hole: the chunk reads as zeros"

Chunk i covers disk bytes [i*chunk_size, min((i+1)*chunk_size, disk_size)).
A 2 TiB disk with 1 MiB chunks has a 64 MiB table, held in one bytearray.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import IntegrityError
from ..fsutil import write_file
from .blob import DIGEST_SIZE, ZERO_DIGEST

MAGIC = b"VMRFIDX\n"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ32s")
HEADER_SIZE = 64


def chunk_count(disk_size: int, chunk_size: int) -> int:
    return -(-disk_size // chunk_size)


@dataclass
class FixedIndex:
    disk_size: int
    chunk_size: int
    table: bytearray  # count * 32 bytes

    @classmethod
    def empty(cls, disk_size: int, chunk_size: int) -> FixedIndex:
        return cls(disk_size, chunk_size, bytearray(chunk_count(disk_size, chunk_size) * DIGEST_SIZE))

    @property
    def count(self) -> int:
        return len(self.table) // DIGEST_SIZE

    def digest(self, i: int) -> bytes:
        return bytes(self.table[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    def set(self, i: int, digest: bytes) -> None:
        self.table[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = digest

    def extent(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk i on the disk."""
        off = i * self.chunk_size
        return off, min(self.chunk_size, self.disk_size - off)

    def digests(self) -> set[bytes]:
        """Distinct stored digests (holes excluded)."""
        t = bytes(self.table)
        out = {t[i : i + DIGEST_SIZE] for i in range(0, len(t), DIGEST_SIZE)}
        out.discard(ZERO_DIGEST)
        return out

    def positions(self, digest: bytes) -> list[int]:
        t = bytes(self.table)
        return [i // DIGEST_SIZE for i in range(0, len(t), DIGEST_SIZE) if t[i : i + DIGEST_SIZE] == digest]

    def resized(self, disk_size: int) -> FixedIndex:
        """A copy for a disk of another size; chunks beyond the old end are holes."""
        new = FixedIndex.empty(disk_size, self.chunk_size)
        n = min(len(new.table), len(self.table))
        new.table[:n] = self.table[:n]
        return new

    def encode(self) -> bytes:
        head = HEADER.pack(
            MAGIC, VERSION, self.chunk_size, self.disk_size, self.count, hashlib.sha256(self.table).digest()
        )
        return head.ljust(HEADER_SIZE, b"\0") + bytes(self.table)

    def write(self, path: Path) -> str:
        """Write durably; return the sha256 of the whole file (recorded in the catalog)."""
        data = self.encode()
        write_file(path, data, what=f"index {path.name}")
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def read(cls, path: Path) -> FixedIndex:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"index file {path} is missing", hint="run vmrecover verify to see which points are affected"
            ) from None
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"index file {path} is truncated ({len(data)} bytes)")
        magic, version, chunk_size, disk_size, count, csum = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise IntegrityError(f"index file {path} has a bad magic")
        if version != VERSION:
            raise IntegrityError(f"index file {path} has unknown version {version}")
        table = bytearray(data[HEADER_SIZE:])
        if (
            chunk_size <= 0
            or count != chunk_count(disk_size, chunk_size)
            or len(table) != count * DIGEST_SIZE
            or hashlib.sha256(table).digest() != csum
        ):
            raise IntegrityError(f"index file {path} is damaged (size or checksum mismatch)")
        return cls(disk_size, chunk_size, table)
