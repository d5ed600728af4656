"""Durable file operations: the one place that knows how to make bytes survive a crash.

Rules (see developer-notes/repository.md):
- a file becomes visible under its final name only complete (write to a temp name, fsync, rename);
- files are private (0600) unless the caller says otherwise: the repository holds wrapped keys,
  catalogs and backup data;
- a rename is durable once its directory is fsynced;
- chunk files are written without a per-file fsync (that would cost ~1 ms per MiB) and made durable
  together by one ``syncfs`` before anything that references them is committed.  Their writeback is
  started at once (sync_file_range WRITE, which does not wait), so disk writes overlap with hashing
  and compression and the final syncfs only waits for the tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os
import threading
from pathlib import Path

from .errors import NoSpace

TMP_MARK = ".tmp-"
_counter = itertools.count()
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def tmp_name(path: Path) -> Path:
    """A temporary name beside *path*, unique across processes and threads, recognisable by gc."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}-{next(_counter)}")


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing dirty pages of *fd* to disk without waiting (a no-op where unsupported)."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(
    path: Path, data: bytes | memoryview, *, durable: bool = True, what: str = "file", mode: int = 0o600
) -> None:
    """Write *data* to *path* atomically: readers see the old file or the whole new one."""
    tmp = tmp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if durable:
                os.fsync(fd)
            else:
                start_writeback(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise_if_no_space(exc, path, what)
        raise
    if durable:
        fsync_dir(path.parent)


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the filesystem holding *path* (Linux syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            exc = OSError(err, os.strerror(err), str(path))
            raise_if_no_space(exc, path, "repository data")
            raise exc
    finally:
        os.close(fd)


def raise_if_no_space(exc: OSError, path: Path, what: str) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            st = os.statvfs(path.parent if not path.is_dir() else path)
            free = f"{st.f_bavail * st.f_frsize / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise NoSpace(
            f"no space left on the filesystem of {path} while writing {what} ({free})",
            hint="free space there (vmrecover prune + gc on a repository) and run the command again; "
            "nothing that was already stored has been lost",
            path=str(path),
        ) from exc
