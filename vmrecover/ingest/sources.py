"""Disk sources: something with a size, a list of allocated extents and positional reads.

``open_image`` picks the reader for a local image:
- raw files (and block devices) are read directly; holes are found with SEEK_DATA/SEEK_HOLE and
  never read;
- qcow2, vmdk, vhd (qemu: vpc) and vhdx are read through qemu-nbd (see qemu.py); their allocation
  map comes from ``qemu-img map``, so unallocated and zero clusters are never read.  A data extent
  that lies past the end of the image file means the file was truncated: qemu would silently read
  zeros there, so we refuse the image instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .. import qemu
from ..errors import BadInput, NotFound


class DiskSource(Protocol):
    path: str
    format: str
    size: int

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """Allocated (offset, length) ranges in ascending order; everything else reads as zeros."""
        ...

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Exactly *length* bytes at *offset* (holes read as zeros).  Called from one thread."""
        ...

    def close(self) -> None: ...


def _bad(path: Path, why: str) -> BadInput:
    return BadInput(f"cannot back up image {path}: {why}")


@dataclass
class RawSource:
    path: str
    fd: int
    size: int
    seekable_holes: bool
    format: str = "raw"

    def data_extents(self) -> Iterator[tuple[int, int]]:
        if not self.seekable_holes:
            yield 0, self.size
            return
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    return
                raise
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), self.size)
            yield start, end - start
            pos = end

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise _bad(
                Path(self.path), f"it shrank while being read (got {len(data)} of {length} bytes at {offset})"
            )
        return data

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class QemuSource:
    path: str
    format: str
    size: int
    extents: list[tuple[int, int]]
    handle: object = field(repr=False)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        yield from self.extents

    def read(self, offset: int, length: int) -> bytearray:
        return self.handle.pread(length, offset)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.handle.shutdown()  # type: ignore[attr-defined]


def open_image(path: Path, fmt: str | None = None) -> DiskSource:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"image {path} does not exist") from None
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise _bad(path, "it is a directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _bad(path, exc.strerror or str(exc)) from None
    try:
        os.pread(fd, 512, 0)  # an unreadable device or file fails here, with its own error
    except OSError as exc:
        os.close(fd)
        raise _bad(path, exc.strerror or str(exc)) from None
    if stat.S_ISBLK(st.st_mode):
        return RawSource(str(path), fd, os.lseek(fd, 0, os.SEEK_END), seekable_holes=False)
    if st.st_size == 0:
        os.close(fd)
        raise _bad(path, "it is empty")
    info = None
    if fmt is None:
        info = qemu.image_info(path)
        fmt = info["format"]
    fmt = qemu.FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in qemu.SOURCE_FORMATS:
        os.close(fd)
        raise BadInput(
            f"image {path} has format {fmt!r}, which vmrecover does not back up",
            hint="supported: raw, qcow2, vmdk, vhd, vhdx; convert it with 'qemu-img convert -O qcow2'",
        )
    if fmt == "raw":
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger kernel readahead
        return RawSource(str(path), fd, st.st_size, seekable_holes=True)
    os.close(fd)
    size = int((info or qemu.image_info(path))["virtual-size"])
    extents = []
    for e in qemu.image_map(path, fmt):
        if (
            e.get("data")
            and "offset" in e
            and e.get("depth", 0) == 0
            and e["offset"] + e["length"] > st.st_size
        ):
            raise _bad(
                path,
                f"it is truncated: guest bytes {e['start']}..{e['start'] + e['length']} are stored "
                f"past the end of the file ({st.st_size} bytes)",
            )
        if e.get("data") and not e.get("zero"):
            if extents and extents[-1][0] + extents[-1][1] == e["start"]:
                extents[-1] = (extents[-1][0], extents[-1][1] + e["length"])
            else:
                extents.append((e["start"], e["length"]))
    return QemuSource(str(path), fmt, size, extents, qemu.nbd_connect(path, fmt, readonly=True))
