"""A minimal synchronous ONC RPC / NFSv3 client for tests: reaches what libnfs' tools don't expose
(forged handles, cookie verifiers, CREATE modes, COMMIT verifiers, raw malformed records).

It shares only the XDR packer with the server; every message layout here is written from RFC 1813 /
RFC 5531 independently of nfs_export's procedure code."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from nfs_export.xdr import Packer, Unpacker

NFS, MOUNT, PMAP = 100003, 100005, 100000
AUTH_NONE, AUTH_SYS = 0, 1

# NFS procedures
GETATTR, SETATTR, LOOKUP, ACCESS, READLINK, READ, WRITE, CREATE, MKDIR, SYMLINK = range(1, 11)
REMOVE, RMDIR, RENAME, LINK, READDIR, READDIRPLUS, FSSTAT, FSINFO, PATHCONF, COMMIT = range(12, 22)
UNSTABLE, DATA_SYNC, FILE_SYNC = 0, 1, 2
UNCHECKED, GUARDED, EXCLUSIVE = 0, 1, 2
# nfsstat3 values the tests look for
OK, PERM, NOENT, ACCES, EXIST, NOTDIR, ISDIR, INVAL, ROFS = 0, 1, 2, 13, 17, 20, 21, 22, 30
NOTEMPTY, STALE, BADHANDLE, NOT_SYNC, BAD_COOKIE, NOTSUPP, TOOSMALL = (
    66,
    70,
    10001,
    10002,
    10003,
    10004,
    10005,
)


@dataclass
class Reply:
    xid: int
    accepted: bool
    stat: int  # accept_stat if accepted, else reject_stat
    detail: tuple[int, ...]  # PROG_MISMATCH low/high, RPC_MISMATCH low/high or the auth_stat
    body: Unpacker


def auth_sys(uid: int = 0, gid: int = 0, machine: str = "test") -> tuple[int, bytes]:
    p = Packer()
    p.u32(0)
    p.string(machine)
    p.u32(uid)
    p.u32(gid)
    p.u32(0)
    return AUTH_SYS, p.getvalue()


def call_message(xid: int, prog: int, vers: int, proc: int, args: bytes,
                 cred: tuple[int, bytes] | None = None, rpcvers: int = 2) -> bytes:  # fmt: skip
    flavor, body = cred if cred is not None else auth_sys()
    p = Packer()
    for v in (xid, 0, rpcvers, prog, vers, proc, flavor):
        p.u32(v)
    p.opaque(body)
    p.u32(AUTH_NONE)
    p.opaque(b"")
    return p.getvalue() + args


def record(message: bytes) -> bytes:
    return struct.pack(">I", 0x80000000 | len(message)) + message


class RpcClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 20) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.xid = 1000

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError("server closed the connection")
            buf += got
        return bytes(buf)

    def recv_record(self) -> bytes:
        out = b""
        while True:
            (word,) = struct.unpack(">I", self._exactly(4))
            out += self._exactly(word & 0x7FFFFFFF)
            if word & 0x80000000:
                return out

    def recv_reply(self) -> Reply:
        u = Unpacker(self.recv_record())
        xid, mtype, reply_stat = u.u32(), u.u32(), u.u32()
        assert mtype == 1, mtype
        if reply_stat == 0:  # accepted: verifier, accept_stat
            u.u32()
            u.opaque(400)
            stat = u.u32()
            detail = (u.u32(), u.u32()) if stat == 2 else ()
            return Reply(xid, True, stat, detail, u)
        stat = u.u32()
        detail = (u.u32(), u.u32()) if stat == 0 else (u.u32(),)
        return Reply(xid, False, stat, detail, u)

    def call(self, prog: int, vers: int, proc: int, args: bytes = b"", **kw: object) -> Reply:
        self.xid += 1
        self.send_raw(record(call_message(self.xid, prog, vers, proc, args, **kw)))  # type: ignore[arg-type]
        reply = self.recv_reply()
        assert reply.xid == self.xid
        return reply


def fattr(u: Unpacker) -> dict[str, int]:
    names = ["type", "mode", "nlink", "uid", "gid"]
    out = {n: u.u32() for n in names}
    out.update(size=u.u64(), used=u.u64(), rdev=u.u64(), fsid=u.u64(), fileid=u.u64())
    for t in ("atime", "mtime", "ctime"):
        out[t] = u.u32() * 1_000_000_000 + u.u32()
    return out


def post_op_attr(u: Unpacker) -> dict[str, int] | None:
    return fattr(u) if u.bool() else None


def wcc(u: Unpacker) -> None:
    if u.bool():
        u.u64()
        u.u64()
        u.u64()
    post_op_attr(u)


class NfsClient(RpcClient):
    """NFSv3 calls returning (status, decoded result) with the RFC 1813 layouts."""

    def nfs(self, proc: int, p: Packer) -> tuple[int, Unpacker]:
        r = self.call(NFS, 3, proc, p.getvalue())
        assert r.accepted and r.stat == 0, r
        return r.body.u32(), r.body

    def mnt(self, path: str) -> tuple[int, bytes]:
        p = Packer()
        p.string(path)
        r = self.call(MOUNT, 3, 1, p.getvalue())
        assert r.accepted and r.stat == 0, r
        status = r.body.u32()
        return status, (r.body.opaque(64) if status == 0 else b"")

    def root(self, export: str = "/vmrecover") -> bytes:
        status, fh = self.mnt(export)
        assert status == 0, status
        return fh

    def getattr(self, fh: bytes) -> tuple[int, dict[str, int] | None]:
        p = Packer()
        p.opaque(fh)
        status, u = self.nfs(GETATTR, p)
        return status, fattr(u) if status == 0 else None

    def lookup(self, dirfh: bytes, name: str) -> tuple[int, bytes]:
        p = Packer()
        p.opaque(dirfh)
        p.string(name)
        status, u = self.nfs(LOOKUP, p)
        return status, u.opaque(64) if status == 0 else b""

    def walk(self, root: bytes, path: str) -> bytes:
        fh = root
        for name in [c for c in path.split("/") if c]:
            status, fh = self.lookup(fh, name)
            assert status == 0, (path, name, status)
        return fh

    def read(self, fh: bytes, off: int, count: int) -> tuple[int, bytes, bool]:
        p = Packer()
        p.opaque(fh)
        p.u64(off)
        p.u32(count)
        status, u = self.nfs(READ, p)
        if status:
            return status, b"", False
        post_op_attr(u)
        u.u32()
        eof = u.bool()
        return status, u.opaque(1 << 24), eof

    def write(self, fh: bytes, off: int, data: bytes, stable: int = UNSTABLE) -> tuple[int, int, int, bytes]:
        """(status, count, committed, write verifier)."""
        p = Packer()
        p.opaque(fh)
        p.u64(off)
        p.u32(len(data))
        p.u32(stable)
        p.opaque(data)
        status, u = self.nfs(WRITE, p)
        if status:
            return status, 0, 0, b""
        wcc(u)
        return status, u.u32(), u.u32(), u.fixed(8)

    def commit(self, fh: bytes) -> tuple[int, bytes]:
        p = Packer()
        p.opaque(fh)
        p.u64(0)
        p.u32(0)
        status, u = self.nfs(COMMIT, p)
        if status:
            return status, b""
        wcc(u)
        return status, u.fixed(8)

    @staticmethod
    def _sattr(p: Packer, mode: int | None = None, size: int | None = None) -> None:
        p.bool(mode is not None)
        if mode is not None:
            p.u32(mode)
        p.bool(False)  # uid
        p.bool(False)  # gid
        p.bool(size is not None)
        if size is not None:
            p.u64(size)
        p.u32(0)  # atime: don't change
        p.u32(0)  # mtime: don't change

    def create(self, dirfh: bytes, name: str, how: int = UNCHECKED, *, mode: int = 0o644,
               size: int | None = None, verf: bytes = b"") -> tuple[int, bytes]:  # fmt: skip
        p = Packer()
        p.opaque(dirfh)
        p.string(name)
        p.u32(how)
        if how == EXCLUSIVE:
            p.fixed(verf)
        else:
            self._sattr(p, mode, size)
        status, u = self.nfs(CREATE, p)
        if status:
            return status, b""
        assert u.bool()
        return status, u.opaque(64)

    def mkdir(self, dirfh: bytes, name: str) -> tuple[int, bytes]:
        p = Packer()
        p.opaque(dirfh)
        p.string(name)
        self._sattr(p, 0o755)
        status, u = self.nfs(MKDIR, p)
        return status, (u.opaque(64) if status == 0 and u.bool() else b"")

    def symlink(self, dirfh: bytes, name: str, target: str) -> tuple[int, bytes]:
        p = Packer()
        p.opaque(dirfh)
        p.string(name)
        self._sattr(p)
        p.string(target)
        status, u = self.nfs(SYMLINK, p)
        return status, (u.opaque(64) if status == 0 and u.bool() else b"")

    def readlink(self, fh: bytes) -> tuple[int, str]:
        p = Packer()
        p.opaque(fh)
        status, u = self.nfs(READLINK, p)
        if status:
            return status, ""
        post_op_attr(u)
        return status, u.string(4096)

    def remove(self, dirfh: bytes, name: str, proc: int = REMOVE) -> int:
        p = Packer()
        p.opaque(dirfh)
        p.string(name)
        return self.nfs(proc, p)[0]

    def rename(self, d1: bytes, n1: str, d2: bytes, n2: str) -> int:
        p = Packer()
        p.opaque(d1)
        p.string(n1)
        p.opaque(d2)
        p.string(n2)
        return self.nfs(RENAME, p)[0]

    def setattr_size(self, fh: bytes, size: int) -> int:
        p = Packer()
        p.opaque(fh)
        self._sattr(p, size=size)
        p.bool(False)  # no guard
        return self.nfs(SETATTR, p)[0]

    def readdir(self, dirfh: bytes, cookie: int = 0, verf: bytes = bytes(8), count: int = 8192,
                plus: bool = False) -> tuple[int, list[tuple[str, int, int]], bytes, bool]:  # fmt: skip
        """(status, [(name, fileid, cookie)], cookie verifier, eof)."""
        p = Packer()
        p.opaque(dirfh)
        p.u64(cookie)
        p.fixed(verf)
        p.u32(count)
        if plus:
            p.u32(count * 4)
        status, u = self.nfs(READDIRPLUS if plus else READDIR, p)
        if status:
            return status, [], b"", False
        post_op_attr(u)
        newverf = u.fixed(8)
        entries = []
        while u.bool():
            fileid, name, ck = u.u64(), u.string(1024), u.u64()
            if plus:
                post_op_attr(u)
                if u.bool():
                    u.opaque(64)
            entries.append((name, fileid, ck))
        return status, entries, newverf, u.bool()
