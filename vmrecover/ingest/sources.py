"""Disk sources: something with a size, a list of allocated extents and positional reads.

``open_image`` picks the reader for a local image:
- raw files (and block devices) are read directly; holes are found with SEEK_DATA/SEEK_HOLE and
  never read.  No qemu tool runs for them;
- qcow2, vmdk, vhd (qemu: vpc) and vhdx are read through qemu-nbd (see qemu.py); their allocation
  map comes from ``qemu-img map``, so unallocated and zero clusters are never read.  A data extent
  that lies past the end of the image file means the file was truncated: qemu would silently read
  zeros there, so we refuse the image instead.

An image can name other files: a qcow2 its backing file (and that one its own, or a ``json:`` or
protocol name), a qcow2 its external data file, a vmdk descriptor its extents.  Whether they are
opened is decided in one place, ``open_image``'s *trusted* argument:

- trusted (a local backup: the administrator named a file on this host): they are opened as qemu
  would, and ``files_read`` lists every file the image made vmrecover read;
- untrusted (an image that came from elsewhere): nothing but the image itself is ever opened.  Backing
  files are switched off (their ranges read as zeros, and ``backing_not_read`` names the file), a vmdk
  descriptor or a qcow2 with a data file is refused before qemu sees it, and if qemu-nbd has any other
  file open anyway, the image is refused before a byte is read.

The format is probed from the image's first bytes (qemu.probe_format), never by ``qemu-img info``,
which opens what an image names while it probes.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .. import qemu
from ..errors import BadInput, NotFound

log = logging.getLogger("vmrecover.backup")


class DiskSource(Protocol):
    path: str
    format: str
    size: int
    files_read: list[str]  # every host file the disk is read from: the image first, then what it names
    backing_not_read: str | None  # untrusted: the backing file the image names, which was not opened

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """Allocated (offset, length) ranges in ascending order; everything else reads as zeros."""
        ...

    def read(self, offset: int, length: int) -> bytes | bytearray:
        """Exactly *length* bytes at *offset* (holes read as zeros).  Called from one thread."""
        ...

    def close(self) -> None: ...


def _bad(path: Path, why: str, hint: str | None = None) -> BadInput:
    return BadInput(f"cannot back up image {path}: {why}", hint=hint)


@dataclass
class RawSource:
    path: str
    fd: int
    size: int
    seekable_holes: bool
    format: str = "raw"
    files_read: list[str] = field(default_factory=list)
    backing_not_read: str | None = None

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
    files_read: list[str] = field(default_factory=list)
    backing_not_read: str | None = None

    def data_extents(self) -> Iterator[tuple[int, int]]:
        yield from self.extents

    def read(self, offset: int, length: int) -> bytearray:
        return self.handle.pread(length, offset)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.handle.shutdown()  # type: ignore[attr-defined]


UNTRUSTED_HINT = (
    "an untrusted image is read only from itself: make it self-contained where it came from "
    "('qemu-img convert -O qcow2 IMAGE OUT'), or back it up without --untrusted if you trust it and "
    "the files it names"
)


def open_image(path: Path, fmt: str | None = None, *, trusted: bool) -> DiskSource:
    """Open the image at *path* (format *fmt*, or probed) to back it up; see the module doc for
    *trusted*."""
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
    keep_fd = False
    try:
        try:  # an unreadable device or file fails here, with its own error
            head = os.pread(fd, qemu.PROBE_BYTES, 0)
        except OSError as exc:
            raise _bad(path, exc.strerror or str(exc)) from None
        device = stat.S_ISBLK(st.st_mode)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size == 0:
            raise _bad(path, "it is empty")
        name = os.readlink(f"/proc/self/fd/{fd}")  # the file itself, as qemu-nbd's files are named
        if fmt is None:  # a block device is a guest's disk: raw unless --format says otherwise
            fmt = "raw" if device else qemu.probe_format(head, path.name)
        fmt = qemu.FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in qemu.SOURCE_FORMATS:
            raise BadInput(
                f"image {path} has format {fmt!r}, which vmrecover does not back up",
                hint="supported: raw, qcow2, vmdk, vhd, vhdx; convert it with 'qemu-img convert -O qcow2'",
            )
        if fmt == "raw":
            if not device:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger kernel readahead
            keep_fd = True
            return RawSource(str(path), fd, size, seekable_holes=not device, files_read=[name])
        return _open_qemu(path, fmt, head, size, (st.st_dev, st.st_ino), name, device, trusted=trusted)
    finally:
        if not keep_fd:
            os.close(fd)


def _other_files(fmt: str, head: bytes) -> str | None:
    """Why qemu would read the guest data of an image of *fmt* starting with *head* from other files
    than the image (its backing file aside), or None."""
    if fmt == "qcow2" and int.from_bytes(head[4:8], "big") >= 3 and int.from_bytes(head[72:80], "big") & 4:
        return "it is a qcow2 image with an external data file (its guest data is in another file)"
    if fmt == "vmdk":
        if head[:4] == b"COWD" or (head[:4] == b"KDMV" and int.from_bytes(head[12:20], "little") != 0):
            return None  # a sparse extent: the image is its own (only) extent
        return "it is a VMDK descriptor: its extents (the guest data) are other files"
    return None


def _open_qemu(
    path: Path,
    fmt: str,
    head: bytes,
    file_size: int,
    ident: tuple[int, int],
    name: str,
    device: bool,
    *,
    trusted: bool,
) -> QemuSource:
    elsewhere = _other_files(fmt, head)
    if elsewhere and not trusted:
        raise _bad(path, f"{elsewhere}; it is untrusted, so vmrecover opens no file it names", UNTRUSTED_HINT)
    spec = qemu.image_spec(path, fmt, backing=trusted, device=device)
    what = f"image {path}"
    handle, opened = qemu.nbd_connect(spec, readonly=True, what=what)
    try:
        others = [f.name for f in opened if (f.dev, f.ino) != ident]
        if others and not trusted:  # what the checks above should have made impossible
            raise _bad(path, f"qemu opened other files for it ({', '.join(others)}); it is untrusted")
        backing_not_read = None
        if not trusted:
            backing_not_read = qemu.image_info(spec, what=what).get("backing-filename")
            if backing_not_read:
                log.warning(
                    "image %s names the backing file %r, which is not read (untrusted image): the disk "
                    "reads zeros wherever the image relies on it",
                    path,
                    backing_not_read,
                )
        # where the image stores its own data, a data extent past its end means it was truncated
        extents = _data_extents(path, qemu.image_map(spec, what=what), None if elsewhere else file_size)
        return QemuSource(
            str(path), fmt, handle.get_size(), extents, handle, [name, *others], backing_not_read
        )
    except BaseException:
        handle.shutdown()
        raise


def _data_extents(path: Path, entries: list[dict], file_size: int | None) -> list[tuple[int, int]]:
    """The guest ranges holding data, merged, from ``qemu-img map`` *entries*."""
    extents: list[tuple[int, int]] = []
    for e in entries:
        if (
            file_size is not None
            and e.get("data")
            and "offset" in e
            and e.get("depth", 0) == 0
            and e["offset"] + e["length"] > file_size
        ):
            raise _bad(
                path,
                f"it is truncated: guest bytes {e['start']}..{e['start'] + e['length']} are stored "
                f"past the end of the file ({file_size} bytes)",
            )
        if e.get("data") and not e.get("zero"):
            if extents and extents[-1][0] + extents[-1][1] == e["start"]:
                extents[-1] = (extents[-1][0], extents[-1][1] + e["length"])
            else:
                extents.append((e["start"], e["length"]))
    return extents
