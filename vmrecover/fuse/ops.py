"""The FUSE adapter: pyfuse3 requests translated into calls on :class:`vmrecover.vfs.tree.Vfs`.

Nothing else lives here, and pyfuse3 is imported nowhere else.  Rules:
- Every handler raises only ``FUSEError``: ``OSError`` keeps its errno, a corrupt or missing chunk is
  EIO (and logged with the chunk), anything else is logged with its traceback and answered EIO, so
  no exception can take the mount down.
- Blocking calls run in worker threads through the ``CapacityLimiter`` given to the constructor; the
  exceptions are a read whose chunks are all in the cache, and a read of at most 64 KiB while no
  worker is busy (a random reader's piece: the thread hop cost a fifth of it), answered on the
  event loop.
- Restore points never change: their entries and attributes are cached by the kernel for an hour.
  Everything else (VM folders, sessions) is revalidated after a second, so new points and sessions
  appear in a running mount.
- Disks (a point's views and a session's) are opened with ``direct_io``: a read reaches us as the
  reader asked it, with no page cache between.  For a session disk, because another front end (NFS,
  ``recover migrate``) may write or read it too.  For a point's views, because the page cache cost
  more than it saved: a sequential reader reads each byte once, and the kernel's copy of every reply
  into fresh page-cache pages took 5.3 s of system time per 2 GiB here, more than the decoding (cold
  sequential reads went from ~200 to ~400 MB/s without it).  Repeated reads hit the chunk cache
  instead, and a random reader's 4 KiB is no longer widened by readahead into its neighbours.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyfuse3
import trio

from ..errors import CorruptChunk
from ..vfs.tree import KIND_SHIFT, ROOT_INO, Attr, Kind, Vfs

log = logging.getLogger("vmrecover.fuse")
T = TypeVar("T")
LONG_TIMEOUT = 3600.0
SHORT_TIMEOUT = 1.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


INLINE_READ = 64 * 1024  # cold reads up to this size run on the event loop when it is otherwise idle


@contextlib.contextmanager
def _as_fuse_errors(fn: Callable[..., Any]) -> Iterator[None]:
    """What a request's failure tells the kernel: the errno of an OSError, EIO for damage (logged)."""
    try:
        yield
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    except CorruptChunk as exc:
        log.error("read failed: %s", exc.message, extra={"chunk": exc.digest.hex()})
        raise pyfuse3.FUSEError(errno.EIO) from None
    except Exception:
        log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        raise pyfuse3.FUSEError(errno.EIO) from None


class Operations(pyfuse3.Operations):
    def __init__(self, vfs: Vfs, *, limiter: trio.CapacityLimiter) -> None:
        super().__init__()
        self.vfs = vfs
        self.limiter = limiter
        self._dirs: dict[int, list[tuple[str, int]]] = {}
        self._next_dir_fh = 1

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        with _as_fuse_errors(fn):
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        raise AssertionError("unreachable")  # (for type checkers: the block returns or raises)

    async def watch_pruned(self, *, interval: float = 0.5) -> None:
        """Make the kernel forget the folders of pruned restore points (it keeps their entries for an
        hour, since points never change): a path into one then fails at once; files already open
        answer ESTALE for what is not cached."""
        seen = await self._run(self.vfs.changes)
        while True:
            await trio.sleep(interval)
            now = await self._run(self.vfs.changes)
            if now != seen:
                for vm_ino, _, point_id in self.vfs.pruned_since(seen):
                    pyfuse3.invalidate_entry_async(vm_ino, point_id.encode(), ignore_enoent=True)
                seen = now

    @staticmethod
    def _entry(a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = a.generation
        e.entry_timeout = e.attr_timeout = LONG_TIMEOUT if a.immutable else SHORT_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid, e.st_gid = a.uid, a.gid
        e.st_size = a.size
        e.st_blksize = 1 << 20
        e.st_blocks = -(-a.size // 512)
        e.st_mtime_ns, e.st_ctime_ns, e.st_atime_ns = (
            a.mtime_ns,
            a.ctime_ns or a.mtime_ns,
            a.atime_ns or a.mtime_ns,
        )
        return e

    # ---------------------------------------------------------------- names and attributes
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.vfs.lookup, parent_inode, os.fsdecode(name)))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.vfs.getattr, inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        kw: dict[str, int | None] = {
            "size": attr.st_size if fields.update_size else None,
            "mode": attr.st_mode if fields.update_mode else None,
            "atime_ns": attr.st_atime_ns if fields.update_atime else None,
            "mtime_ns": attr.st_mtime_ns if fields.update_mtime else None,
        }
        return self._entry(await self._run(lambda: self.vfs.setattr(inode, **kw)))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(await self._run(self.vfs.readlink, inode))

    async def opendir(self, inode: int, ctx: Any) -> int:
        entries = await self._run(self.vfs.readdir, inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = entries  # a snapshot: offsets stay valid while files come and go
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                attr = await self._run(self.vfs.getattr, ino)
            except pyfuse3.FUSEError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(attr), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = await self._run(self.vfs.statfs)
        out = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, f, getattr(st, f))
        out.f_namemax = 255
        return out

    # ---------------------------------------------------------------- data
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            await self._run(self.vfs.check_writable, inode)
        if flags & os.O_TRUNC:  # libfuse passes O_TRUNC here instead of a setattr (atomic_o_trunc)
            await self._run(lambda: self.vfs.setattr(inode, size=0))
        kind = inode >> KIND_SHIFT
        return pyfuse3.FileInfo(fh=inode, direct_io=kind in (Kind.BVIEW, Kind.SVIEW))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        data = self.vfs.read_cached(fh, off, size)  # the hit path: a slice, on the event loop
        if data is not None:
            return data
        if size <= INLINE_READ and self.limiter.borrowed_tokens == 0:
            # Nothing else in flight: a small cold read (a piece: two preads and 64 KiB decoded) costs
            # less here than the hop to a worker thread and back (0.2 ms of a 1 ms read here).
            with _as_fuse_errors(self.vfs.read):
                return self.vfs.read(fh, off, size)
        return await self._run(self.vfs.read, fh, off, size)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._run(self.vfs.write, fh, off, buf)

    async def flush(self, fh: int) -> None:
        pass  # fsync does the work; flush comes on every close

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._run(self.vfs.flush, fh)

    async def release(self, fh: int) -> None:
        pass

    # ---------------------------------------------------------------- session folders
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = await self._run(self.vfs.create, parent_inode, os.fsdecode(name), mode)
        return pyfuse3.FileInfo(fh=attr.ino), self._entry(attr)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(await self._run(self.vfs.mkdir, parent_inode, os.fsdecode(name), mode))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._entry(
            await self._run(self.vfs.symlink, parent_inode, os.fsdecode(name), os.fsdecode(target))
        )

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._run(self.vfs.unlink, parent_inode, os.fsdecode(name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._run(self.vfs.rmdir, parent_inode, os.fsdecode(name))

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE / NOREPLACE are not offered
        await self._run(
            self.vfs.rename, parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new)
        )


assert ROOT_INO == pyfuse3.ROOT_INODE
