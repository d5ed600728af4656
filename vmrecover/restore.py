"""Restore a restore point's disk to a raw file (sparse), a block device, or qcow2/vmdk/vhd/vhdx.

Raw files are written with pwrite at each chunk's offset and holes are simply skipped (the file is
sized with ftruncate), so restored images are as sparse as the backup.  Other formats are written
through qemu-nbd into a freshly created image, so they are sparse in their own way too.

The output appears under its final name only when it is complete and correct: it is written to
``<dest>.vmrecover-partial`` and renamed at the end.  A corrupt chunk aborts the restore with an
error naming the affected byte range, and the partial file is removed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import qemu
from .errors import BadInput, CorruptChunk, IntegrityError, NotFound, VmrecoverError
from .fsutil import fsync_dir, raise_if_no_space, start_writeback
from .repo.catalog import Disk, Point
from .repo.index import FixedIndex
from .repo.reader import read_disk
from .repo.repository import Repository

RESTORE_FORMATS = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx"}
PARTIAL_SUFFIX = ".vmrecover-partial"


class _Writer(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class _FileWriter:
    def __init__(self, path: Path, size: int, *, block_device: bool) -> None:
        self.path = path
        self.size = size
        self.block = block_device
        flags = os.O_WRONLY | os.O_CLOEXEC | (0 if block_device else os.O_CREAT | os.O_TRUNC)
        self.fd = os.open(path, flags, 0o600)
        if block_device:
            dev = os.lseek(self.fd, 0, os.SEEK_END)
            if dev < size:
                os.close(self.fd)
                raise BadInput(f"block device {path} holds {dev} bytes, the disk needs {size}")
        else:
            os.ftruncate(self.fd, size)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        start = offset
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        start_writeback(self.fd, start, len(data))  # so that finish()'s fsync waits only for the tail

    def zero(self, offset: int, length: int) -> None:
        if self.block:  # a file's holes read as zeros already; a device's old contents do not
            self.write(offset, bytes(length))

    def finish(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _QemuWriter:
    def __init__(self, path: Path, fmt: str, size: int) -> None:
        qemu.create_image(str(path), fmt, size)
        spec = qemu.image_spec(path, fmt, backing=False)
        self.handle, _ = qemu.nbd_connect(spec, readonly=False, what=f"new image {path}")

    def write(self, offset: int, data: bytes) -> None:
        self.handle.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        pass  # a new image reads as zeros

    def finish(self) -> None:
        self.handle.flush()
        self.handle.shutdown()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.shutdown()


@dataclass
class RestoreResult:
    vm: str
    point: str
    disk: str
    path: str
    format: str
    size: int
    data_bytes: int


def pick_disk(repo: Repository, point: Point, name: str | None) -> Disk:
    disks = repo.catalog.disks(point.id)
    if name is None:
        if len(disks) != 1:
            raise BadInput(
                f"restore point {point.vm}@{point.id} has {len(disks)} disks: {[d.name for d in disks]}",
                hint="choose one with --disk NAME",
            )
        return disks[0]
    for d in disks:
        if d.name == name:
            return d
    raise NotFound(
        f"restore point {point.vm}@{point.id} has no disk {name!r}", hint=f"disks: {[d.name for d in disks]}"
    )


def restore_disk(
    repo: Repository,
    point: Point,
    disk: Disk,
    dest: Path,
    *,
    fmt: str = "raw",
    overwrite: bool = False,
    progress: Callable[[int], None] = lambda n: None,
    workers: int | None = None,
) -> RestoreResult:
    index = repo.read_index(point.id, disk.name)
    what = f"{point.vm}@{point.id} disk {disk.name}"
    with ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2), thread_name_prefix="restore") as pool:
        data_bytes = write_image(
            read_disk(repo.chunks, index, pool), index, dest, fmt=fmt, overwrite=overwrite, what=what,
            progress=progress,
        )  # fmt: skip
    return RestoreResult(point.vm, point.id, disk.name, str(dest), fmt, index.disk_size, data_bytes)


def write_image(
    chunks: Iterator[tuple[int, int, bytes | None]],
    index: FixedIndex,
    dest: Path,
    *,
    fmt: str,
    overwrite: bool,
    what: str,
    progress: Callable[[int], None] = lambda n: None,
) -> int:
    """Write *chunks* ((number, offset, bytes or None for zeros), in order, laid out like *index*)
    as an image at *dest*; return the bytes of data written.  All or nothing (see the module doc)."""
    if fmt not in RESTORE_FORMATS:
        raise BadInput(f"unknown output format {fmt!r}", hint=f"choose one of {', '.join(RESTORE_FORMATS)}")
    is_block = dest.exists() and stat.S_ISBLK(dest.stat().st_mode)
    if is_block and fmt != "raw":
        raise BadInput(f"{dest} is a block device: only --format raw can be written to it")
    if dest.exists() and not is_block and not overwrite:
        raise BadInput(f"{dest} already exists", hint="choose another path or pass --overwrite")
    if not dest.parent.is_dir():
        raise NotFound(f"directory {dest.parent} does not exist")
    target = dest if is_block else dest.with_name(dest.name + PARTIAL_SUFFIX)
    writer: _Writer
    try:
        if fmt == "raw":
            writer = _FileWriter(target, index.disk_size, block_device=is_block)
        else:
            writer = _QemuWriter(target, RESTORE_FORMATS[fmt], index.disk_size)
    except OSError as exc:
        raise_if_no_space(exc, target, f"the restore of {what}")
        raise VmrecoverError(f"cannot write {target}: {exc.strerror}") from None
    data_bytes = 0
    try:
        for i, off, data in chunks:
            try:
                if data is None:
                    writer.zero(off, index.extent(i)[1])
                else:
                    writer.write(off, data)
                    data_bytes += len(data)
            except OSError as exc:
                raise_if_no_space(exc, target, f"the restore of {what}")
                raise
            progress(index.extent(i)[1])
        writer.finish()
    except CorruptChunk as exc:
        writer.abort()
        _discard(target, is_block)
        positions = index.positions(exc.digest)
        ranges = [list(index.extent(i)) for i in positions]
        first = ranges[0] if ranges else [0, 0]
        raise IntegrityError(
            f"restore of {what} failed: bytes {first[0]}..{first[0] + first[1]} "
            f"(chunk {exc.digest.hex()[:16]}…) cannot be read: {exc.reason}; nothing was written to {dest}",
            hint="run 'vmrecover verify' to list every affected restore point, and restore an older point",
            ranges=ranges,
        ) from None
    except BaseException:
        writer.abort()
        _discard(target, is_block)
        raise
    if not is_block:
        os.rename(target, dest)
        fsync_dir(dest.parent)
    return data_bytes


def _discard(target: Path, is_block: bool) -> None:
    if not is_block:
        with contextlib.suppress(OSError):
            os.unlink(target)
