"""Names beneath a directory that nothing can lead out of: the one place that touches host files by
names someone else chose (a hypervisor's files in a recovery session, a guest's files being restored).

Every operation walks the relative path one component at a time from a file descriptor of the top
directory, opening each folder with ``O_NOFOLLOW | O_DIRECTORY`` and acting on the last component
with the ``*at`` system calls that do not follow symlinks (``AT_SYMLINK_NOFOLLOW``, ``O_NOFOLLOW``,
``renameat``/``renameat2``, ``linkat``, ``unlinkat``).  So:

- a symlink is never followed, neither as the last component nor as a folder on the way;
- a folder swapped for a symlink between a check and a use cannot redirect the use: the use runs
  from the descriptor of the folder that was opened, and a symlink in its place fails to open
  (``ELOOP``/``ENOTDIR``);
- ``..`` is refused as a component, so no walk climbs out.

Files are opened as ``O_PATH`` first and only reopened (through ``/proc/self/fd``, the same inode)
once they are known to be regular files: a fifo or device node is never opened for I/O, and a
symlink is never truncated, chmod-ed or written through.  This is what Linux's nfsd and NFS-Ganesha
get from handle-based access (``open_by_handle_at``), without needing ``CAP_DAC_READ_SEARCH``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

RENAME_NOREPLACE = 1  # <linux/fs.h>
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
    """renameat2(2) (glibc 2.28+): with RENAME_EXCHANGE both names must exist and swap atomically
    (any types: a file and a folder too); with RENAME_NOREPLACE an existing *dst* is EEXIST.  A
    filesystem that does not support the flag answers EINVAL; a C library without the call ENOSYS."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise _err(errno.ENOSYS, "renameat2 is not in this C library")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), src, None, dst)


def safe_mode(mode: int) -> int:
    """The permission bits worth keeping from a name someone else chose: no setuid or setgid (the
    sticky bit and rwx stay)."""
    return stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID)


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


def split(rel: str) -> list[str]:
    """The components of a relative path; EINVAL for '..', NUL or an absolute path."""
    if rel.startswith("/") or "\0" in rel:
        raise _err(errno.EINVAL, repr(rel))
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _err(errno.EINVAL, f"{rel!r} climbs out with '..'")
    return parts


class Beneath:
    """Operations on paths relative to the directory *top*, never leaving it (see the module doc).

    *top* itself is trusted (it is the caller's own folder); everything below it is not.  Methods are
    thread-safe (they share no state) and raise ``OSError`` with the errno of the failing call."""

    def __init__(self, top: Path) -> None:
        self.top = top

    # ------------------------------------------------------------------ walking
    @contextlib.contextmanager
    def dir(self, rel: str) -> Iterator[int]:
        """A descriptor (O_RDONLY) of the folder *rel*, closed after the block."""
        fd = os.open(self.top, _DIR_FLAGS)
        try:
            for name in split(rel):
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the folder holding *rel*, last component)."""
        parts = split(rel)
        if not parts:
            raise _err(errno.EINVAL, "the top folder has no name in a folder")
        with self.dir("/".join(parts[:-1])) as fd:
            yield fd, parts[-1]

    @contextlib.contextmanager
    def _path_fd(self, rel: str) -> Iterator[tuple[int, os.stat_result]]:
        """An O_PATH descriptor of *rel* itself (a symlink stays a symlink) and its stat."""
        with self.parent(rel) as (d, name):
            fd = os.open(name, _PATH_FLAGS, dir_fd=d)
        try:
            yield fd, os.fstat(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading names
    def lstat(self, rel: str) -> os.stat_result:
        parts = split(rel)
        if not parts:
            return os.lstat(self.top)
        with self.parent(rel) as (d, name):
            return os.stat(name, dir_fd=d, follow_symlinks=False)

    def lexists(self, rel: str) -> bool:
        """Whether the name *rel* exists (a dangling symlink does); a path through a symlink is
        ELOOP/ENOTDIR, not False."""
        try:
            self.lstat(rel)
        except FileNotFoundError:
            return False
        return True

    def listdir(self, rel: str) -> list[tuple[str, os.stat_result]]:
        """(name, lstat) of every entry of folder *rel*, sorted by name."""
        out = []
        with self.dir(rel) as fd, os.scandir(fd) as it:
            for e in it:
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    out.append((e.name, e.stat(follow_symlinks=False)))
        return sorted(out, key=lambda t: t[0])

    def walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """(relative path, lstat) of everything below the top, folders before their contents.

        Not ``os.fwalk``: it tells folders from files by following symlinks and opens a "folder" by
        name before it checks what it opened, so a client swapping a symlink in between could make it
        open a host fifo or device.  Here every entry is classified by its own lstat and every folder
        is opened relative to its parent's descriptor with O_NOFOLLOW|O_DIRECTORY."""
        top = os.open(self.top, _DIR_FLAGS)
        try:
            yield from self._walk(top, "")
        finally:
            os.close(top)

    def _walk(self, fd: int, base: str) -> Iterator[tuple[str, os.stat_result]]:
        with os.scandir(fd) as it:
            entries = []
            for e in it:
                with contextlib.suppress(FileNotFoundError):
                    entries.append((e.name, e.stat(follow_symlinks=False)))
        for name, st in sorted(entries, key=lambda t: t[0]):
            yield base + name, st
            if not stat.S_ISDIR(st.st_mode):
                continue
            try:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:  # gone, or swapped for something else meanwhile
                continue
            try:
                yield from self._walk(sub, base + name + "/")
            finally:
                os.close(sub)

    def readlink(self, rel: str) -> str:
        with self.parent(rel) as (d, name):
            return os.readlink(name, dir_fd=d)

    # ------------------------------------------------------------------ opening files
    def open(self, rel: str, flags: int) -> int:
        """A descriptor of the regular file *rel* opened with *flags* (O_RDONLY, O_WRONLY, O_RDWR and
        O_APPEND are honoured; the file is never created or truncated here).  ELOOP for a symlink,
        EISDIR for a folder, EINVAL for anything else that is not a regular file."""
        access = flags & (os.O_ACCMODE | os.O_APPEND)
        with self._path_fd(rel) as (fd, st):
            if stat.S_ISLNK(st.st_mode):
                raise _err(errno.ELOOP, f"{rel} is a symlink")
            if stat.S_ISDIR(st.st_mode):
                raise _err(errno.EISDIR, rel)
            if not stat.S_ISREG(st.st_mode):
                raise _err(errno.EINVAL, f"{rel} is not a regular file")
            return os.open(f"/proc/self/fd/{fd}", access | os.O_CLOEXEC | os.O_NOCTTY)

    def open_any(self, rel: str) -> int:
        """A read-only descriptor of the regular file or folder *rel* (for ioctls); ELOOP for a
        symlink, EINVAL for a device, fifo or socket."""
        with self._path_fd(rel) as (fd, st):
            if stat.S_ISDIR(st.st_mode):
                return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self.open(rel, os.O_RDONLY)

    # ------------------------------------------------------------------ changing names
    def create(self, rel: str, mode: int) -> None:
        """A new, empty regular file (EEXIST if the name is taken, whatever it is)."""
        with self.parent(rel) as (d, name):
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            os.close(os.open(name, flags, mode, dir_fd=d))

    def create_open(self, rel: str, mode: int) -> int:
        """A new regular file, returned open for writing (EEXIST if the name is taken)."""
        with self.parent(rel) as (d, name):
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, mode, dir_fd=d)

    def mkdir(self, rel: str, mode: int) -> None:
        with self.parent(rel) as (d, name):
            os.mkdir(name, mode, dir_fd=d)

    def symlink(self, target: str, rel: str) -> None:
        """Store *target* as text; nothing here ever follows it."""
        with self.parent(rel) as (d, name):
            os.symlink(target, name, dir_fd=d)

    def unlink(self, rel: str) -> None:
        with self.parent(rel) as (d, name):
            os.unlink(name, dir_fd=d)

    def rmdir(self, rel: str) -> None:
        with self.parent(rel) as (d, name):
            os.rmdir(name, dir_fd=d)

    def rename(self, rel: str, new_rel: str) -> None:
        with self.parent(rel) as (d1, n1), self.parent(new_rel) as (d2, n2):
            os.rename(n1, n2, src_dir_fd=d1, dst_dir_fd=d2)

    def rename_noreplace(self, rel: str, new_rel: str) -> None:
        """Rename, but EEXIST if *new_rel* exists (whatever it is); EINVAL where the filesystem
        cannot promise that."""
        with self.parent(rel) as (d1, n1), self.parent(new_rel) as (d2, n2):
            renameat2(d1, n1, d2, n2, RENAME_NOREPLACE)

    def exchange(self, rel: str, other: str) -> None:
        """Swap the objects *rel* and *other* (both must exist, any types) in one step: nobody ever
        sees either name missing.  EINVAL where the filesystem cannot exchange."""
        with self.parent(rel) as (d1, n1), self.parent(other) as (d2, n2):
            renameat2(d1, n1, d2, n2, RENAME_EXCHANGE)

    def link(self, rel: str, new_rel: str) -> None:
        """A hard link *new_rel* to *rel* itself (a symlink is linked, never followed)."""
        with self.parent(rel) as (d1, n1), self.parent(new_rel) as (d2, n2):
            os.link(n1, n2, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)

    # ------------------------------------------------------------------ attributes
    def truncate(self, rel: str, size: int) -> None:
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def chmod(self, rel: str, mode: int) -> None:
        """Set *mode*'s permission bits on *rel* itself; a symlink has none to set and is left as it
        is (as Linux's nfsd does)."""
        with self._path_fd(rel) as (fd, st):
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))

    def chown(self, rel: str, uid: int, gid: int) -> None:
        """-1 keeps the owner or group; a symlink's own owner is changed, never its target's."""
        with self.parent(rel) as (d, name):
            os.chown(name, uid, gid, dir_fd=d, follow_symlinks=False)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        with self.parent(rel) as (d, name):
            os.utime(name, ns=ns, dir_fd=d, follow_symlinks=False)
