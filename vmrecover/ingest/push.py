"""Push ingest: a disk sent to the appliance as a stream (an external agent or proxy), as a DiskSource.

Two body formats, both read strictly in order and never seeked:

- ``application/octet-stream``: the raw disk, exactly ``size`` bytes;
- ``application/vnd.vmrecover.sparse``: a sparse stream, one header line of JSON then the bytes of each
  listed extent, in the header's order::

      {"format": "vmrecover-sparse", "version": 1, "size": 10737418240,
       "extents": [[0, 1048576], [5242880, 65536]], "changed": false}\\n
      <1048576 bytes><65536 bytes>

  ``extents`` are the data (ascending, not overlapping, within ``size``); for a full disk the rest reads
  as zeros.  ``"changed": true`` makes it an incremental: the extents are what changed since the VM's
  latest point, and every other byte comes from that point's disk (read and verified from the
  repository), as with ``backup --changed-extents``.

The stream must hold exactly what it declares: fewer bytes (a cut upload) or more (a push bigger than
declared) is an error, and the :class:`~vmrecover.ingest.pipeline.PointWriter` it feeds is then closed
without a commit: nothing of it stays.  Images in other formats (qcow2, vmdk...) are not streamed:
the API spools them to a private file and opens it with ``open_image(trusted=False)`` (never a backing
file).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput
from ..repo.blob import ZERO_DIGEST
from ..repo.repository import Repository
from .extents import Extents

SPARSE = "application/vnd.vmrecover.sparse"
RAW = "application/octet-stream"
HEADER_MAX = 16 << 20  # bytes of the sparse header line (about 500,000 extents)
Read = Callable[[int], bytes]  # read(n): up to n bytes of the body, b"" at its end


class StreamError(BadInput):
    """The stream does not hold what it declared (cut, too long, malformed)."""


@dataclass
class Declared:
    size: int
    extents: Extents  # data (full) or changes (incremental)
    changed: bool


def read_header(read: Read) -> Declared:
    """The sparse stream's header line, checked (sizes, order, bounds)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        piece = read(1)
        if not piece:
            raise StreamError("the sparse stream ended inside its header line")
        buf += piece
        if len(buf) > HEADER_MAX:
            raise StreamError(f"the sparse stream's header line is longer than {HEADER_MAX} bytes")
    try:
        doc = json.loads(buf)
    except ValueError as exc:
        raise StreamError(f"the sparse stream's header is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "vmrecover-sparse" or doc.get("version") != 1:
        raise StreamError(
            'the sparse stream\'s header is not {"format": "vmrecover-sparse", "version": 1, ...}'
        )
    return declared(doc)


def declared(doc: dict[str, Any]) -> Declared:
    size, extents, changed = doc.get("size"), doc.get("extents"), doc.get("changed", False)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size > 1 << 50:
        raise StreamError(f"disk size {size!r} is not a positive number of bytes")
    if not isinstance(extents, list) or not isinstance(changed, bool):
        raise StreamError("extents must be a list of [offset, length] and changed true or false")
    out: Extents = []
    end = 0
    for e in extents:
        ok = (
            isinstance(e, list)
            and len(e) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in e)
        )
        if not ok or e[0] < end or e[1] <= 0 or e[0] + e[1] > size:
            raise StreamError(
                f"extent {e!r} is not an ascending, non-overlapping [offset, length] within {size} bytes"
            )
        out.append((e[0], e[1]))
        end = e[0] + e[1]
    return Declared(size, out, changed)


@dataclass
class StreamSource:
    """A DiskSource over a body stream: *read* gives the extents' bytes in order.  *base* gives what is
    not in the stream (zeros for a full disk; the parent point's bytes for an incremental)."""

    name: str
    size: int
    extents: Extents
    read_body: Read
    base: Callable[[int, int], bytes] | None = None
    path: str = "push"
    format: str = "raw"
    files_read: list[str] = field(default_factory=list)
    backing_not_read: str | None = None
    received: int = 0
    _next: int = 0  # the extent the stream is in
    _pos: int = 0  # where the stream is (a disk offset)

    def __post_init__(self) -> None:
        self.files_read = [self.path]
        self._pos = self.extents[0][0] if self.extents else self.size

    def data_extents(self) -> Iterator[tuple[int, int]]:
        yield from self.extents

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            piece = self.read_body(n - len(out))
            if not piece:
                raise StreamError(
                    f"the stream of disk {self.name} ended at disk offset {self._pos + len(out)}, before the "
                    f"{sum(n for _, n in self.extents)} bytes it declared (a cut upload: nothing is kept)"
                )
            out += piece
        self.received += n
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length): what the stream holds there, *base* elsewhere.  Called in
        ascending order (the pipeline reads chunks in disk order)."""
        end = offset + length
        if offset < self._pos and any(a < end and offset < a + n for a, n in self.extents[: self._next]):
            raise StreamError(f"disk {self.name}: offset {offset} was asked for after the stream passed it")
        buf = bytearray(self.base(offset, length) if self.base else bytes(length))
        while self._next < len(self.extents):
            a, n = self.extents[self._next]
            if a >= end:
                break
            lo, hi = max(a, self._pos), min(a + n, end)
            if lo > self._pos:  # the stream skips nothing: every declared byte is read in order
                raise StreamError(f"disk {self.name}: offset {self._pos} was skipped by the reader")
            buf[lo - offset : hi - offset] = self._take(hi - lo)
            self._pos = hi
            if hi == a + n:
                self._next += 1
                self._pos = self.extents[self._next][0] if self._next < len(self.extents) else self.size
            else:
                break
        return bytes(buf)

    def finish(self) -> None:
        """After the disk is stored: every declared byte was read, and nothing follows."""
        if self._next < len(self.extents):
            raise StreamError(f"disk {self.name}: the stream was not read to its end (offset {self._pos})")
        if self.read_body(1):
            raise StreamError(
                f"the stream of disk {self.name} holds more than the {self.received} bytes it declared"
            )

    def close(self) -> None:
        pass


def parent_reader(repo: Repository, point_id: str, disk: str) -> Callable[[int, int], bytes]:
    """Bytes of *disk* in point *point_id*, read (and verified) from the repository's chunks."""
    index = repo.read_index(point_id, disk)
    cs = index.chunk_size

    def read(offset: int, length: int) -> bytes:
        out = bytearray()
        pos = offset
        while pos < offset + length:
            i = pos // cs
            start, n = index.extent(i) if i < index.count else (pos, 0)
            take = min(offset + length, start + n) - pos
            if take <= 0:  # beyond the parent's end (a disk that grew): zeros
                out += bytes(offset + length - pos)
                break
            digest = index.digest(i)
            data = bytes(n) if digest == ZERO_DIGEST else repo.chunks.get(digest)
            out += data[pos - start : pos - start + take]
            pos += take
        return bytes(out)

    return read


def encode(path: str, *, changed: Extents | None = None, piece: int = 1 << 20) -> Iterator[bytes]:
    """The sparse stream of the raw disk image at *path*: its data extents (SEEK_DATA/SEEK_HOLE), or
    *changed* for an incremental.  What an agent sends; the tests and the benchmark use it."""
    from .sources import open_image

    src = open_image(Path(path), "raw", trusted=True)
    try:
        extents = list(changed) if changed is not None else list(src.data_extents())
        head = {"format": "vmrecover-sparse", "version": 1, "size": src.size,
                "extents": [list(e) for e in extents], "changed": changed is not None}  # fmt: skip
        yield (json.dumps(head) + "\n").encode()
        for off, n in extents:
            for pos in range(off, off + n, piece):
                yield bytes(src.read(pos, min(piece, off + n - pos)))
    finally:
        src.close()
