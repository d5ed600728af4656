"""NFS version 3 (RFC 1813) over a :class:`~nfs_export.fs.Filesystem`.

File handles are 28 bytes: a magic, the filesystem's ``fsid``, the inode number and its generation.
Nothing else is kept per handle, so handles stay valid across server restarts for as long as the
object exists; a handle of the wrong shape is NFS3ERR_BADHANDLE, one whose object is gone (or whose
generation no longer matches, or which names another filesystem) is NFS3ERR_STALE.

Permissions: the allow list decides who may talk to the export at all; within it, AUTH_SYS clients
act as the owner of every object (like ``no_root_squash`` on a datastore export), so what a client
may do is what the owner's mode bits say, and read-only objects answer NFS3ERR_ROFS to writes.

Failure replies carry no attributes (post_op_attr and wcc_data "not present", which RFC 1813 allows):
the client then simply re-fetches them.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from .fs import FileAttributes, Filesystem
from .rpc import Call, Program, Result
from .xdr import Packer, Unpacker

log = logging.getLogger("nfs_export.nfs3")
T = TypeVar("T")

PROGRAM, VERSION = 100003, 3
FH_MAGIC = b"NXv1"
FH = struct.Struct(">4sQQQ")  # magic, fsid, inode, generation
FHSIZE3 = 64
NAME_MAX = 255
PATH_MAX = 4096
COOKIEVERF = 8
WRITEVERF = 8

# nfsstat3
OK = 0
PERM, NOENT, IO, NXIO, ACCES, EXIST, XDEV, NODEV = 1, 2, 5, 6, 13, 17, 18, 19
NOTDIR, ISDIR, INVAL, FBIG = 20, 21, 22, 27
NOSPC, ROFS, MLINK, NAMETOOLONG, NOTEMPTY, DQUOT, STALE = 28, 30, 31, 63, 66, 69, 70
BADHANDLE, NOT_SYNC, BAD_COOKIE, NOTSUPP, TOOSMALL, SERVERFAULT = 10001, 10002, 10003, 10004, 10005, 10006

_ERRNO = {
    errno.EPERM: PERM, errno.ENOENT: NOENT, errno.EIO: IO, errno.ENXIO: NXIO, errno.EACCES: ACCES,
    errno.EEXIST: EXIST, errno.EXDEV: XDEV, errno.ENODEV: NODEV, errno.ENOTDIR: NOTDIR,
    errno.EISDIR: ISDIR, errno.EINVAL: INVAL, errno.EFBIG: FBIG, errno.ENOSPC: NOSPC,
    errno.EROFS: ROFS, errno.EMLINK: MLINK, errno.ENAMETOOLONG: NAMETOOLONG,
    errno.ENOTEMPTY: NOTEMPTY, errno.EDQUOT: DQUOT, errno.ESTALE: STALE, errno.EOPNOTSUPP: NOTSUPP,
    errno.ELOOP: INVAL,
}  # fmt: skip

# ftype3
_FTYPE = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFBLK: 3, stat.S_IFCHR: 4, stat.S_IFLNK: 5,
          stat.S_IFSOCK: 6, stat.S_IFIFO: 7}  # fmt: skip
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2
ACCESS_READ, ACCESS_LOOKUP, ACCESS_MODIFY, ACCESS_EXTEND, ACCESS_DELETE, ACCESS_EXECUTE = 1, 2, 4, 8, 16, 32
FSF3_SYMLINK, FSF3_HOMOGENEOUS, FSF3_CANSETTIME = 0x2, 0x8, 0x10
FATTR3_SIZE = 84
TIME_DONT_CHANGE, SET_TO_SERVER_TIME, SET_TO_CLIENT_TIME = 0, 1, 2


class NfsError(Exception):
    def __init__(self, status: int, what: str = "") -> None:
        super().__init__(status, what)
        self.status = status


@dataclass(slots=True)
class SetAttrs:
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    def changes(self) -> dict[str, int]:
        return {k: v for k in ("size", "mode", "uid", "gid", "atime_ns", "mtime_ns")
                if (v := getattr(self, k)) is not None}  # fmt: skip


def _time_arg(u: Unpacker) -> int | None:
    how = u.enum(range(3))
    if how == SET_TO_CLIENT_TIME:
        return u.u32() * 1_000_000_000 + u.u32()
    return time.time_ns() if how == SET_TO_SERVER_TIME else None


def sattr3(u: Unpacker) -> SetAttrs:
    s = SetAttrs()
    s.mode = u.u32() if u.bool() else None
    s.uid = u.u32() if u.bool() else None
    s.gid = u.u32() if u.bool() else None
    s.size = u.u64() if u.bool() else None
    s.atime_ns = _time_arg(u)
    s.mtime_ns = _time_arg(u)
    return s


_READ_COUNTS = struct.Struct(">III")  # READ3resok after the attributes: count, eof, data length


def _nfstime(p: Packer, ns: int) -> None:
    ns = max(ns, 0)
    p.u32(min(ns // 1_000_000_000, 0xFFFFFFFF))
    p.u32(ns % 1_000_000_000)


def valid_name(name: str, *, dots: bool = False) -> None:
    """NFS3ERR_ACCES for names that are not one path component; '.' and '..' only where *dots*."""
    if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise NfsError(NAMETOOLONG, name)
    if not name or "/" in name or "\0" in name:
        raise NfsError(ACCES, repr(name))
    if name in (".", "..") and not dots:
        raise NfsError(EXIST if name == "." else ACCES, name)


class Nfs3:
    """The NFS program: decodes arguments on the event loop, runs the filesystem in worker threads."""

    def __init__(
        self,
        fs: Filesystem,
        *,
        limiter: trio.CapacityLimiter,
        write_verifier: bytes,
        rtmax: int = 1 << 20,
        wtmax: int = 1 << 20,
    ) -> None:
        assert len(write_verifier) == WRITEVERF
        self.fs = fs
        self.limiter = limiter
        self.verifier = write_verifier
        self.rtmax, self.wtmax = rtmax, wtmax
        self._immutable: dict[tuple[int, int], FileAttributes] = {}  # (ino, generation) -> attributes
        self._read_heads: dict[tuple[int, int], bytes] = {}  # the same -> READ's status + attributes, packed

    async def watch_changes(self, *, interval: float = 0.5) -> None:
        """Forget the kept attributes of immutable objects whenever the filesystem says some may have
        vanished (restore points pruned), so that their handles answer STALE within a second rather
        than whenever the cache happens to be cleared."""
        seen = await trio.to_thread.run_sync(self.fs.changes, limiter=self.limiter)
        while True:
            await trio.sleep(interval)
            now = await trio.to_thread.run_sync(self.fs.changes, limiter=self.limiter)
            if now != seen:
                self._forget_immutable()
                seen = now

    # ----------------------------------------------------------------- handles and attributes
    def handle(self, attr: FileAttributes) -> bytes:
        return FH.pack(FH_MAGIC, self.fs.fsid, attr.ino, attr.generation)

    @staticmethod
    def decode_handle(raw: bytes) -> tuple[int, int, int] | None:
        """(fsid, inode, generation), or None for something that is not one of our handles."""
        if len(raw) != FH.size:
            return None
        magic, fsid, ino, gen = FH.unpack(raw)
        return (fsid, ino, gen) if magic == FH_MAGIC else None

    def resolve(self, raw: bytes) -> FileAttributes:
        """The object a handle names (worker thread); NfsError BADHANDLE or STALE otherwise."""
        h = self.decode_handle(raw)
        if h is None:
            raise NfsError(BADHANDLE, "not a handle of this server")
        fsid, ino, gen = h
        if fsid != self.fs.fsid:
            raise NfsError(STALE, "handle of another filesystem")
        cached = self._immutable.get((ino, gen))
        if cached is not None:
            return cached
        try:
            attr = self.fs.getattr(ino)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESTALE, errno.ENOTDIR):
                raise NfsError(STALE, f"inode {ino}") from None
            raise
        if attr.generation != gen:
            raise NfsError(STALE, f"inode {ino} generation {gen} (now {attr.generation})")
        if attr.immutable:
            if len(self._immutable) > 65536:
                self._forget_immutable()
            self._immutable[(ino, gen)] = attr
        return attr

    def _forget_immutable(self) -> None:
        self._immutable.clear()
        self._read_heads.clear()

    def fattr3(self, p: Packer, a: FileAttributes) -> None:
        p.u32(_FTYPE.get(stat.S_IFMT(a.mode), 1))
        p.u32(stat.S_IMODE(a.mode))
        p.u32(a.nlink)
        p.u32(a.uid)
        p.u32(a.gid)
        p.u64(a.size)
        p.u64(a.size)  # used
        p.u64(0)  # rdev
        p.u64(self.fs.fsid)
        p.u64(a.ino)
        _nfstime(p, a.atime_ns or a.mtime_ns)
        _nfstime(p, a.mtime_ns)
        _nfstime(p, a.ctime_ns or a.mtime_ns)

    def post_op_attr(self, p: Packer, a: FileAttributes | None) -> None:
        p.bool(a is not None)
        if a is not None:
            self.fattr3(p, a)

    def wcc(self, p: Packer, before: FileAttributes | None, after: FileAttributes | None) -> None:
        p.bool(before is not None)
        if before is not None:
            p.u64(before.size)
            _nfstime(p, before.mtime_ns)
            _nfstime(p, before.ctime_ns or before.mtime_ns)
        self.post_op_attr(p, after)

    def _new_object(
        self, p: Packer, attr: FileAttributes, before: FileAttributes, after: FileAttributes
    ) -> None:
        """The OK body of CREATE, MKDIR and SYMLINK: handle, attributes, directory wcc."""
        p.bool(True)
        p.opaque(self.handle(attr))
        self.post_op_attr(p, attr)
        self.wcc(p, before, after)

    # ----------------------------------------------------------------- running a procedure
    async def _run(self, fail_words: int, work: Callable[[Packer], None]) -> Packer:
        """Run *work* in a thread, with the OK status written; on failure the status and
        *fail_words* zero words (the failure body's attributes, "not present")."""

        def body() -> Packer:
            p = Packer()
            p.u32(OK)
            work(p)
            return p

        try:
            return await trio.to_thread.run_sync(body, limiter=self.limiter)
        except NfsError as exc:
            status = exc.status
        except OverflowError:  # an offset or size past what the host takes (2**63)
            status = FBIG
        except OSError as exc:
            status = _ERRNO.get(exc.errno or errno.EIO, IO)
            if status == IO:
                log.error("I/O error: %s", exc)
        except Exception as exc:
            known = hasattr(exc, "exit_code")  # an error the filesystem describes itself (a corrupt chunk)
            log.error("filesystem error, answered NFS3ERR_IO: %s", exc, exc_info=not known)
            status = IO
        return self._status(status, fail_words)

    def _dir(self, raw: bytes) -> FileAttributes:
        a = self.resolve(raw)
        if not stat.S_ISDIR(a.mode):
            raise NfsError(NOTDIR)
        return a

    def program(self) -> Program:
        procs = {
            0: self.null, 1: self.getattr, 2: self.setattr, 3: self.lookup, 4: self.access, 5: self.readlink,
            6: self.read, 7: self.write, 8: self.create, 9: self.mkdir, 10: self.symlink, 11: self.mknod,
            12: self.remove, 13: self.rmdir, 14: self.rename, 15: self.link, 16: self.readdir,
            17: self.readdirplus, 18: self.fsstat, 19: self.fsinfo, 20: self.pathconf, 21: self.commit,
        }  # fmt: skip
        return Program(PROGRAM, VERSION, "nfs3", procs)

    # ----------------------------------------------------------------- procedures
    async def null(self, call: Call) -> Result:
        return Packer()

    async def getattr(self, call: Call) -> Result:
        fh = call.args.opaque(FHSIZE3)
        return await self._run(0, lambda p: self.fattr3(p, self.resolve(fh)))

    async def setattr(self, call: Call) -> Result:
        u = call.args
        fh, new = u.opaque(FHSIZE3), sattr3(u)
        guard = u.u32() * 1_000_000_000 + u.u32() if u.bool() else None

        def work(p: Packer) -> None:
            before = self.resolve(fh)
            if guard is not None and guard != (before.ctime_ns or before.mtime_ns):
                raise NfsError(NOT_SYNC)
            after = self.fs.setattr(before.ino, **new.changes()) if new.changes() else before
            self.wcc(p, before, after)

        return await self._run(2, work)

    async def lookup(self, call: Call) -> Result:
        fh, name = call.args.opaque(FHSIZE3), call.args.string(PATH_MAX)

        def work(p: Packer) -> None:
            d = self._dir(fh)
            valid_name(name, dots=True)
            if name == ".":
                a = d
            elif name == "..":  # the export's root is its own parent: no lookup leaves the export
                a = d if d.ino == self.fs.root_ino else self.fs.getattr(self.fs.parent(d.ino))
            else:
                a = self.fs.lookup(d.ino, name)
            p.opaque(self.handle(a))
            self.post_op_attr(p, a)
            self.post_op_attr(p, d)

        return await self._run(1, work)

    async def access(self, call: Call) -> Result:
        fh, wanted = call.args.opaque(FHSIZE3), call.args.u32()

        def work(p: Packer) -> None:
            a = self.resolve(fh)
            perm = (a.mode >> 6) & 7
            granted = 0
            if perm & 4:
                granted |= ACCESS_READ
            if perm & 2:
                granted |= ACCESS_MODIFY | ACCESS_EXTEND | ACCESS_DELETE
            if perm & 1:
                granted |= ACCESS_LOOKUP if stat.S_ISDIR(a.mode) else ACCESS_EXECUTE
            self.post_op_attr(p, a)
            p.u32(wanted & granted)

        return await self._run(1, work)

    async def readlink(self, call: Call) -> Result:
        fh = call.args.opaque(FHSIZE3)

        def work(p: Packer) -> None:
            a = self.resolve(fh)
            if not stat.S_ISLNK(a.mode):
                raise NfsError(INVAL)
            target = self.fs.readlink(a.ino)
            self.post_op_attr(p, a)
            p.string(target)

        return await self._run(1, work)

    def _read_reply(self, a: FileAttributes, off: int, data: bytes) -> Result:
        """READ's OK reply: the status and attributes (packed once per immutable file: a backup's
        views never change), count, eof, the data's length; the data itself is sent as it is."""
        key = (a.ino, a.generation)
        head = self._read_heads.get(key) if a.immutable else None
        if head is None:
            p = Packer()
            p.u32(OK)
            self.post_op_attr(p, a)
            head = bytes(p.buf)
            if a.immutable and key in self._immutable:
                self._read_heads[key] = head
        n = len(data)
        p = Packer()
        p.buf += head
        p.buf += _READ_COUNTS.pack(n, off + n >= a.size, n)
        return p, ([data] if n % 4 == 0 else [data, b"\0" * (-n % 4)])

    async def read(self, call: Call) -> Result:
        u = call.args
        fh, off, count = u.opaque(FHSIZE3), u.u64(), min(u.u32(), self.rtmax)
        h = self.decode_handle(fh)
        if h is not None and h[0] == self.fs.fsid:  # the hit path, on the event loop: no thread
            a = self._immutable.get((h[1], h[2])) or self.fs.getattr_cached(h[1])  # (a session's disk)
            if a is not None and a.generation == h[2] and stat.S_ISREG(a.mode):
                data = self.fs.read_cached(a.ino, off, count)
                if data is not None:
                    return self._read_reply(a, off, data)
        got: list[Result] = []

        def work(p: Packer) -> None:
            a = self.resolve(fh)
            if not stat.S_ISREG(a.mode):
                raise NfsError(ISDIR if stat.S_ISDIR(a.mode) else INVAL)
            data = self.fs.read(a.ino, off, count) if off < a.size else b""  # (offsets up to 2**64)
            if not a.immutable:
                a = self.fs.getattr(a.ino)
            got.append(self._read_reply(a, off, data))

        fail = await self._run(1, work)
        return got[0] if got else fail

    async def write(self, call: Call) -> Result:
        u = call.args
        fh, off, count, how = u.opaque(FHSIZE3), u.u64(), u.u32(), u.enum(range(3))
        data = u.opaque_view(self.wtmax)
        if count > len(data):
            return self._status(INVAL, 2)
        data = data[:count]

        def work(p: Packer) -> None:
            before = self.resolve(fh)
            if not stat.S_ISREG(before.mode):
                raise NfsError(ISDIR if stat.S_ISDIR(before.mode) else INVAL)
            n = self.fs.write(before.ino, off, data)
            if how != UNSTABLE:
                self.fs.flush(before.ino)
            self.wcc(p, before, self.fs.getattr(before.ino))
            p.u32(n)
            p.u32(how)
            p.fixed(self.verifier)

        return await self._run(2, work)

    async def commit(self, call: Call) -> Result:
        u = call.args
        fh, _off, _count = u.opaque(FHSIZE3), u.u64(), u.u32()

        def work(p: Packer) -> None:
            before = self.resolve(fh)
            self.fs.flush(before.ino)
            self.wcc(p, before, self.fs.getattr(before.ino))
            p.fixed(self.verifier)

        return await self._run(2, work)

    @staticmethod
    def _status(status: int, fail_words: int) -> Packer:
        p = Packer()
        p.u32(status)
        for _ in range(fail_words):
            p.u32(0)
        return p

    async def create(self, call: Call) -> Result:
        u = call.args
        fh, name, how = u.opaque(FHSIZE3), u.string(PATH_MAX), u.enum(range(3))
        new = sattr3(u) if how != EXCLUSIVE else SetAttrs()
        # EXCLUSIVE's verifier is kept as the new file's mtime and atime seconds (as Linux's nfsd does;
        # 31 bits each, so that they stay valid times); the client sets the real ones afterwards.
        verf = u.fixed(8) if how == EXCLUSIVE else bytes(8)
        vtimes = tuple(v & 0x7FFFFFFF for v in struct.unpack(">II", verf))

        def work(p: Packer) -> None:
            d = self._dir(fh)
            valid_name(name)
            try:
                a = self.fs.create(d.ino, name, new.mode if new.mode is not None else 0o644)
                created = True
            except FileExistsError:
                if how == GUARDED:
                    raise
                a, created = self.fs.lookup(d.ino, name), False
                if how == EXCLUSIVE:  # a retransmission finds its own verifier in the times
                    if (a.mtime_ns // 1_000_000_000, a.atime_ns // 1_000_000_000, a.size) != (*vtimes, 0):
                        raise
                elif not stat.S_ISREG(a.mode):
                    raise NfsError(ISDIR if stat.S_ISDIR(a.mode) else EXIST) from None
            if how == EXCLUSIVE:
                if created:  # keep the verifier where a retransmission finds it (RFC 1813 3.3.8)
                    a = self.fs.setattr(a.ino, mtime_ns=vtimes[0] * 10**9, atime_ns=vtimes[1] * 10**9)
            elif changes := {k: v for k, v in new.changes().items() if k != "mode"}:  # mode: at creation
                a = self.fs.setattr(a.ino, **changes)
            self._new_object(p, a, d, self.fs.getattr(d.ino))

        return await self._run(2, work)

    async def mkdir(self, call: Call) -> Result:
        u = call.args
        fh, name, new = u.opaque(FHSIZE3), u.string(PATH_MAX), sattr3(u)

        def work(p: Packer) -> None:
            d = self._dir(fh)
            valid_name(name)
            a = self.fs.mkdir(d.ino, name, new.mode if new.mode is not None else 0o755)
            self._new_object(p, a, d, self.fs.getattr(d.ino))

        return await self._run(2, work)

    async def symlink(self, call: Call) -> Result:
        u = call.args
        fh, name, _new, target = u.opaque(FHSIZE3), u.string(PATH_MAX), sattr3(u), u.string(PATH_MAX)

        def work(p: Packer) -> None:
            d = self._dir(fh)
            valid_name(name)
            if not target or "\0" in target:
                raise NfsError(INVAL, "symlink target")
            a = self.fs.symlink(d.ino, name, target)
            self._new_object(p, a, d, self.fs.getattr(d.ino))

        return await self._run(2, work)

    async def mknod(self, call: Call) -> Result:
        return self._status(NOTSUPP, 2)  # devices, sockets and fifos have no place in a datastore

    async def link(self, call: Call) -> Result:
        return self._status(NOTSUPP, 3)  # hard links are not offered (FSINFO says so)

    def _remove(self, call: Call, op: Callable[[int, str], None]) -> Callable[[Packer], None]:
        fh, name = call.args.opaque(FHSIZE3), call.args.string(PATH_MAX)

        def work(p: Packer) -> None:
            d = self._dir(fh)
            valid_name(name)
            op(d.ino, name)
            self.wcc(p, d, self.fs.getattr(d.ino))

        return work

    async def remove(self, call: Call) -> Result:
        return await self._run(2, self._remove(call, self.fs.unlink))

    async def rmdir(self, call: Call) -> Result:
        return await self._run(2, self._remove(call, self.fs.rmdir))

    async def rename(self, call: Call) -> Result:
        u = call.args
        src, name = u.opaque(FHSIZE3), u.string(PATH_MAX)
        dst, new_name = u.opaque(FHSIZE3), u.string(PATH_MAX)

        def work(p: Packer) -> None:
            d1, d2 = self._dir(src), self._dir(dst)
            valid_name(name)
            valid_name(new_name)
            self.fs.rename(d1.ino, name, d2.ino, new_name)
            self.wcc(p, d1, self.fs.getattr(d1.ino))
            self.wcc(p, d2, self.fs.getattr(d2.ino))

        return await self._run(4, work)

    # ----------------------------------------------------------------- directories
    def _listing(self, d: FileAttributes) -> tuple[list[tuple[str, int]], bytes]:
        """'.', '..' and the entries, and the cookie verifier: a digest of the names, so a cookie
        (an index into this list) is refused with BAD_COOKIE once the directory changed."""
        parent = d.ino if d.ino == self.fs.root_ino else self.fs.parent(d.ino)
        entries = [(".", d.ino), ("..", parent), *self.fs.readdir(d.ino)]
        h = hashlib.blake2b(digest_size=COOKIEVERF)
        for name, ino in entries:
            h.update(name.encode("utf-8", "surrogateescape") + b"\0" + ino.to_bytes(8, "big"))
        return entries, h.digest()

    def _readdir(self, call: Call, plus: bool) -> Callable[[Packer], None]:
        u = call.args
        fh, cookie, verf = u.opaque(FHSIZE3), u.u64(), u.fixed(COOKIEVERF)
        dircount = u.u32()
        maxcount = u.u32() if plus else dircount

        def work(p: Packer) -> None:
            d = self._dir(fh)
            entries, current = self._listing(d)
            if cookie and (verf != current or cookie > len(entries)):
                raise NfsError(BAD_COOKIE)
            self.post_op_attr(p, d)
            p.fixed(current)
            size = len(p.buf) + 4 + 8  # + the "no more entries" word and eof
            names = 0
            added = 0
            for i in range(cookie, len(entries)):
                name, ino = entries[i]
                encoded = name.encode("utf-8", "surrogateescape")
                dir_part = 8 + 4 + len(encoded) + (-len(encoded) % 4) + 8
                entry = Packer()
                entry.bool(True)
                entry.u64(ino)
                entry.opaque(encoded)
                entry.u64(i + 1)
                if plus:
                    try:
                        a = self.fs.getattr(ino)
                    except OSError:
                        continue  # removed since the listing
                    self.post_op_attr(entry, a)
                    entry.bool(True)
                    entry.opaque(self.handle(a))
                if size + len(entry.buf) > maxcount or (plus and names + dir_part > dircount):
                    if not added:
                        raise NfsError(TOOSMALL)
                    p.bool(False)
                    p.bool(False)  # not eof
                    return
                p.buf += entry.buf
                size += len(entry.buf)
                names += dir_part
                added += 1
            p.bool(False)
            p.bool(True)

        return work

    async def readdir(self, call: Call) -> Result:
        return await self._run(1, self._readdir(call, plus=False))

    async def readdirplus(self, call: Call) -> Result:
        return await self._run(1, self._readdir(call, plus=True))

    # ----------------------------------------------------------------- filesystem information
    async def fsstat(self, call: Call) -> Result:
        fh = call.args.opaque(FHSIZE3)

        def work(p: Packer) -> None:
            a = self.resolve(fh)
            st = self.fs.statfs()
            self.post_op_attr(p, a)
            for v in (st.f_blocks, st.f_bfree, st.f_bavail):
                p.u64(v * st.f_frsize)
            for v in (st.f_files, st.f_ffree, st.f_favail):
                p.u64(v)
            p.u32(0)  # invarsec

        return await self._run(1, work)

    async def fsinfo(self, call: Call) -> Result:
        fh = call.args.opaque(FHSIZE3)

        def work(p: Packer) -> None:
            self.post_op_attr(p, self.resolve(fh))
            for v in (self.rtmax, self.rtmax, 4096, self.wtmax, self.wtmax, 4096, 65536):
                p.u32(v)
            p.u64(2**63 - 1)  # maxfilesize
            _nfstime(p, 1)  # time_delta: nanoseconds
            p.u32(FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME)

        return await self._run(1, work)

    async def pathconf(self, call: Call) -> Result:
        fh = call.args.opaque(FHSIZE3)

        def work(p: Packer) -> None:
            self.post_op_attr(p, self.resolve(fh))
            p.u32(1)  # linkmax: no hard links
            p.u32(NAME_MAX)
            p.bool(True)  # no_trunc
            p.bool(True)  # chown_restricted
            p.bool(False)  # case_insensitive
            p.bool(True)  # case_preserving

        return await self._run(1, work)
