"""Restore a restore point's disk to a raw file (sparse), a block device, or qcow2/vmdk/vhd/vhdx.

Raw files are written with pwrite at each chunk's offset and holes are simply skipped (the file is
sized with ftruncate), so restored images are as sparse as the backup.  Other formats are written
through qemu-nbd into a freshly created image, so they are sparse in their own way too.

The output appears under its final name only when it is complete and correct: it is written in a
private folder ``<dest>.vmrecover-partial/`` (under its final name, which a vmdk records) and renamed
to *dest* at the end.  A corrupt chunk aborts the restore with an error naming the affected byte
range, and the partial folder is removed.

Nothing at or beside *dest* is ever followed or written through (a restore runs as root and *dest*
may be in a folder others can write): a stale partial folder is emptied and removed without
following anything in it, the new one is made with ``mkdir`` (which fails on anything in the way,
a symlink too) and opened with ``O_NOFOLLOW``; the raw file in it is created with
``O_EXCL | O_NOFOLLOW``, and qemu-img and qemu-nbd reach it through ``/proc/<pid>/fd/<folder>/``,
so a folder swapped in meanwhile cannot redirect them.  The rename replaces a symlink at *dest*
itself, never its target.  A block device is written in place, also through a /dev/disk/by-id
symlink, but only through symlinks owned by root or by the user running vmrecover, and only if
nothing holds it exclusively (a mounted filesystem, LVM, RAID).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
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
from .repo.reader import read_disk, read_pool
from .repo.repository import Repository
from .vfs.disk import zeros

# our name -> qemu's format[:subformat]; vmdk-stream is what OVF imports upload (compressed, no holes)
RESTORE_FORMATS = {
    "raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vmdk-stream": "vmdk:streamOptimized", "vhd": "vpc",
    "vhdx": "vhdx",
}  # fmt: skip
PARTIAL_SUFFIX = ".vmrecover-partial"
# O_DIRECT writes of a raw image: their alignment (offsets, lengths, buffers: a 4Kn disk's logical
# block), the writes in flight, and each buffer's size (grown for larger chunks)
ALIGN, DIRECT_DEPTH, DIRECT_BUFFER = 4096, 3, 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _Writer(Protocol):
    def write(self, offset: int, data: bytes) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"a write at byte {offset} wrote nothing")
        view, offset = view[n:], offset + n


def _open_direct(fd: int) -> int | None:
    """A second descriptor of *fd*'s file with ``O_DIRECT``, or None where the filesystem refuses it.
    Opened through ``/proc/self/fd`` (the same file, never a name that could be swapped), and without
    ``O_EXCL``: a block device stays claimed by *fd*."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT):
            return None
        raise


class _FileWriter:
    """Writes a raw image into *fd* (a new file, or a block device whose old bytes must be zeroed).

    Aligned writes (every chunk but a disk's odd-sized last one) go to the disk with ``O_DIRECT``:
    each is copied into one of :data:`DIRECT_DEPTH` + 1 page-aligned buffers (anonymous maps, reused)
    and written by one of :data:`DIRECT_DEPTH` writer threads, so decoding goes on while the disk
    writes.  Through the page cache, the kernel's copy of every byte into freshly allocated cache
    pages was a quarter of a restore's CPU here, and a large restore pushed the running sessions'
    chunk files out of the cache.  A filesystem that refuses ``O_DIRECT`` and the unaligned rest are
    written through the page cache, with writeback started at once so that ``finish``'s fsync waits
    only for the tail.  A writer thread's error (ENOSPC, EIO) is raised by the next ``write`` or by
    ``finish``; nothing after it is written."""

    def __init__(self, fd: int, size: int, *, block_device: bool) -> None:
        self.fd = fd
        self.block = block_device
        if not block_device:
            os.ftruncate(fd, size)
        self.direct = _open_direct(fd)
        self.buffered = self.direct is None
        self._error: BaseException | None = None
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._writers: ThreadPoolExecutor | None = None
        if self.direct is not None:
            self._writers = ThreadPoolExecutor(DIRECT_DEPTH, thread_name_prefix="restore-write")
            for _ in range(DIRECT_DEPTH + 1):
                self._free.put(mmap.mmap(-1, DIRECT_BUFFER))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        n = len(data)
        if self._writers is None or self.buffered or offset % ALIGN or n % ALIGN:
            _pwrite_all(self.fd, memoryview(data), offset)
            start_writeback(self.fd, offset, n)
            return
        buf = self._free.get()  # waits while DIRECT_DEPTH writes are under way and one is copied
        if len(buf) < n:
            buf.close()
            buf = mmap.mmap(-1, n)
        buf[:n] = data
        self._writers.submit(self._write_direct, buf, n, offset)

    def _write_direct(self, buf: mmap.mmap, n: int, offset: int) -> None:
        try:
            if self._error is None:
                assert self.direct is not None
                with memoryview(buf) as view:
                    try:
                        _pwrite_all(self.direct, view[:n], offset)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        self.buffered = True  # a filesystem that opened O_DIRECT but refuses its writes
                        _pwrite_all(self.fd, view[:n], offset)
                        start_writeback(self.fd, offset, n)
        except BaseException as exc:
            if self._error is None:
                self._error = exc
        finally:
            self._free.put(buf)

    def zero(self, offset: int, length: int) -> None:
        if self.block:  # a file's holes read as zeros already; a device's old contents do not
            self.write(offset, zeros(length))

    def _drain(self) -> None:
        if self._writers is not None:
            self._writers.shutdown(wait=True)
            self._writers = None
        while not self._free.empty():
            with contextlib.suppress(BufferError):
                self._free.get().close()
        if self.direct is not None:
            os.close(self.direct)
            self.direct = None

    def finish(self) -> None:
        try:
            self._drain()
            if self._error is not None:
                raise self._error
            os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def abort(self) -> None:
        self._error = self._error or VmrecoverError("the restore was aborted")
        with contextlib.suppress(OSError):
            self._drain()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _QemuWriter:
    """Writes a new qcow2/vmdk/vhd/vhdx image at *path* through qemu-nbd; *fd* (the file, already
    created) stays open until the end, so that a ``/proc/<pid>/fd/`` path to it stays valid."""

    def __init__(self, path: str, fd: int, fmt: str, size: int) -> None:
        self.fd = fd
        qemu.create_image(path, fmt, size)
        spec = qemu.image_spec(path, fmt.partition(":")[0], backing=False)
        self.handle, _ = qemu.nbd_connect(spec, readonly=False, what=f"new image {path}")

    def write(self, offset: int, data: bytes) -> None:
        self.handle.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        pass  # a new image reads as zeros

    def finish(self) -> None:
        self.handle.flush()
        self.handle.shutdown()
        os.close(self.fd)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.handle.shutdown()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Staged:
    """A new image written as ``<dest>.vmrecover-partial/<dest name>``, renamed to *dest* when complete."""

    writer: _Writer

    def __init__(self, dest: Path, fmt: str, size: int) -> None:
        self.dest = dest
        self.folder = dest.with_name(dest.name + PARTIAL_SUFFIX)
        _remove_stale(self.folder)
        try:
            os.mkdir(self.folder, 0o700)  # EEXIST for anything there, a symlink too: never followed
            self.dir_fd = os.open(self.folder, _DIR_FLAGS)  # ELOOP if it was swapped for a symlink
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ELOOP, errno.ENOTDIR):
                raise
            raise BadInput(
                f"cannot make {self.folder} for the restore of {dest}: {exc.strerror} (something else "
                "put a file there meanwhile); nothing was written",
                hint="find out what writes there, remove it and restore again",
            ) from None
        try:
            self.writer = self._new_image(fmt, size)
        except BaseException:
            self.discard()
            raise

    def _new_image(self, fmt: str, size: int) -> _Writer:
        name = self.dest.name
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=self.dir_fd)
        try:
            if fmt == "raw":
                return _FileWriter(fd, size, block_device=False)
            # qemu opens by name: through our folder's descriptor (so a vmdk records its final name)
            # if nobody else can put a name in the folder, else through the file's own descriptor
            st = os.fstat(self.dir_fd)
            private = st.st_uid == os.geteuid() and not st.st_mode & 0o022
            at = f"{self.dir_fd}/{name}" if private else f"{fd}"
            return _QemuWriter(f"/proc/{os.getpid()}/fd/{at}", fd, fmt, size)
        except BaseException:
            os.close(fd)
            raise

    def commit(self) -> None:
        os.rename(self.dest.name, self.dest, src_dir_fd=self.dir_fd)  # replaces a symlink, never follows it
        fsync_dir(self.dest.parent)
        self._close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.dest.name, dir_fd=self.dir_fd)
        self._close()

    def _close(self) -> None:
        os.close(self.dir_fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)


def _remove_stale(folder: Path) -> None:
    """Remove what a killed restore left at *folder* (a partial folder, or an older version's partial
    file) without following anything: a symlink there is removed, not its target."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(folder)
            return
        fd = os.open(folder, _DIR_FLAGS)
        try:
            for name in os.listdir(fd):
                os.unlink(name, dir_fd=fd)  # a folder in it (not ours) fails: EISDIR
        finally:
            os.close(fd)
        os.rmdir(folder)
    except OSError as exc:
        raise BadInput(
            f"cannot remove {folder}, left by an earlier restore: {exc.strerror}",
            hint="remove it yourself and restore again",
        ) from None


class _Device:
    """A block device written in place (no staging: its name is a device, not a file to replace)."""

    writer: _Writer

    def __init__(self, dest: Path, size: int) -> None:
        node = _resolve_trusted(dest)
        try:
            if not stat.S_ISBLK(os.fstat(node).st_mode):  # checked on what was found, then opened
                raise BadInput(f"{dest} is not a block device (any more)")  # through it, not by name
            # O_EXCL on a device: EBUSY while something holds it (a mounted filesystem, LVM, RAID)
            fd = os.open(f"/proc/self/fd/{node}", os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise BadInput(
                    f"block device {dest} is in use (a mounted filesystem, LVM or RAID holds it); "
                    "restoring onto it would corrupt what uses it",
                    hint="unmount or deactivate it first",
                ) from None
            raise
        finally:
            os.close(node)
        dev = os.lseek(fd, 0, os.SEEK_END)
        if dev < size:
            os.close(fd)
            raise BadInput(f"block device {dest} holds {dev} bytes, the disk needs {size}")
        self.writer = _FileWriter(fd, size, block_device=True)

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


def _resolve_trusted(path: Path) -> int:
    """An O_PATH descriptor of what *path* leads to, following only symlinks owned by root or by this
    user (a symlink someone else planted in a shared folder is no way onto a device).  The walk goes
    from descriptor to descriptor, so a folder swapped for a symlink after it was checked cannot
    redirect it; '..' is taken lexically, as the walk goes."""
    todo = list(reversed((Path.cwd() / path).parts[1:]))
    stack = [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]  # the folders walked through
    hops = 0
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            st = os.fstat(fd)
            if not stat.S_ISLNK(st.st_mode):
                stack.append(fd)
                continue
            try:
                if st.st_uid not in (0, os.geteuid()):
                    raise BadInput(
                        f"{path} leads to a block device through {name}, a symlink owned by uid "
                        f"{st.st_uid}; vmrecover follows only symlinks owned by root or by you onto a device",
                        hint="name the device itself, or a link in /dev/disk/by-id",
                    )
                target = os.readlink("", dir_fd=fd)  # the link itself (readlinkat on its O_PATH fd)
            finally:
                os.close(fd)
            hops += 1
            if hops > 40:
                raise BadInput(f"{path}: too many levels of symlinks")
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop())
            todo.extend(reversed(Path(target).parts[1:] if target.startswith("/") else Path(target).parts))
        return stack.pop()
    finally:
        for fd in stack:
            os.close(fd)


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
    what = f"{point.vm}@{point.id} disk {disk.name}"
    with (
        repo.reading(point, outcome=f"; nothing was written to {dest}"),
        read_pool("restore", workers) as pool,
    ):
        index = repo.read_index(point.id, disk.name)
        data_bytes = write_image(
            read_disk(repo.chunks, index, pool), index, dest, fmt=fmt, overwrite=overwrite, what=what,
            progress=progress,
        )  # fmt: skip
    return RestoreResult(point.vm, point.id, disk.name, str(dest), fmt, index.disk_size, data_bytes)


@contextlib.contextmanager
def _no_space_named(target: Path, what: str) -> Iterator[None]:
    """ENOSPC or EDQUOT while writing *target* (a write, or the writer threads' errors that ``finish``
    raises) as NoSpace naming it; other errors as they are."""
    try:
        yield
    except OSError as exc:
        raise_if_no_space(exc, target, f"the restore of {what}")
        raise


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
    try:
        is_block = stat.S_ISBLK(os.stat(dest).st_mode)
    except OSError:
        is_block = False
    if is_block and fmt != "raw":
        raise BadInput(f"{dest} is a block device: only --format raw can be written to it")
    if not is_block and os.path.lexists(dest):
        if os.path.isdir(dest) and not os.path.islink(dest):
            raise BadInput(f"{dest} is a directory", hint="name the file to create in it")
        if not overwrite:
            raise BadInput(f"{dest} already exists", hint="choose another path or pass --overwrite")
    if not dest.parent.is_dir():
        raise NotFound(f"directory {dest.parent} does not exist")
    target = dest if is_block else dest.with_name(dest.name + PARTIAL_SUFFIX)
    out: _Device | _Staged
    try:
        out = (
            _Device(dest, index.disk_size)
            if is_block
            else _Staged(dest, RESTORE_FORMATS[fmt], index.disk_size)
        )
    except OSError as exc:
        raise_if_no_space(exc, target, f"the restore of {what}")
        raise VmrecoverError(f"cannot write {target}: {exc.strerror}") from None
    writer = out.writer
    data_bytes = 0
    try:
        with _no_space_named(target, what):
            for i, off, data in chunks:
                if data is None:
                    writer.zero(off, index.extent(i)[1])
                else:
                    writer.write(off, data)
                    data_bytes += len(data)
                progress(index.extent(i)[1])
            writer.finish()
    except CorruptChunk as exc:
        writer.abort()
        out.discard()
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
        out.discard()
        raise
    try:
        out.commit()
    except OSError as exc:
        out.discard()
        raise VmrecoverError(f"cannot put the restored image in place at {dest}: {exc.strerror}") from None
    return data_bytes
