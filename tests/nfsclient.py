"""A minimal synchronous ONC RPC / NFSv3 client for tests: reaches what libnfs' tools don't expose
(forged handles, cookie verifiers, CREATE modes, COMMIT verifiers, raw malformed records).  The one
RPC client of the tests: test_nfs*.py and the long fuzz run (tests/nfs_fuzz.py) use it.

It shares only the XDR code with the server; every message layout here is written from RFC 1813 /
RFC 5531 independently of nfs_export's procedure code.

The server serves only privileged source ports (< 1024) by default, as NFS servers do: connections
bind one (this needs root, or CAP_NET_BIND_SERVICE) unless ``reserved=False``."""

from __future__ import annotations

import errno
import random
import socket
import struct
from dataclasses import dataclass

from nfs_export.xdr import Packer, Unpacker, XdrError

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


# RFC 5531
REPLY, MSG_ACCEPTED, MSG_DENIED = 1, 0, 1
SUCCESS, PROG_UNAVAIL, PROG_MISMATCH, PROC_UNAVAIL, GARBAGE_ARGS, SYSTEM_ERR = range(6)
RPC_MISMATCH, AUTH_ERROR = 0, 1
AUTH_BADCRED, AUTH_BADVERF, AUTH_TOOWEAK = 1, 3, 5
# Source ports a connection binds: reserved ones, above the well-known services (bindresvport and
# libnfs take 512-1023; Linux's own NFS client 665-1023).
RESERVED_PORTS = range(600, 1024)


class MalformedReply(ValueError):
    """A record that is not a well-formed RPC reply (a server bug)."""


@dataclass
class Reply:
    xid: int
    accepted: bool
    stat: int  # accept_stat if accepted, else reject_stat
    detail: tuple[int, ...]  # PROG_MISMATCH low/high, RPC_MISMATCH low/high or the auth_stat
    body: Unpacker  # the procedure's results (accepted SUCCESS only)


def parse_reply(rec: bytes) -> Reply:
    """A reply record decoded strictly (RFC 5531): anything but a well-formed reply, with nothing left
    over after an error, raises MalformedReply."""
    u = Unpacker(rec)
    try:
        xid, mtype, reply_stat = u.u32(), u.u32(), u.u32()
        if mtype != REPLY:
            raise MalformedReply(f"message type {mtype}: {rec[:64].hex()}")
        if reply_stat == MSG_ACCEPTED:
            u.u32()  # verifier flavor
            u.opaque(400)
            stat = u.u32()
            if stat > SYSTEM_ERR:
                raise MalformedReply(f"accept_stat {stat}")
            detail: tuple[int, ...] = (u.u32(), u.u32()) if stat == PROG_MISMATCH else ()
            if detail and detail[0] > detail[1]:
                raise MalformedReply(f"mismatch {detail[0]}..{detail[1]}")
            if stat != SUCCESS and u.pos != len(rec):
                raise MalformedReply(f"{len(rec) - u.pos} bytes after accept_stat {stat}")
            return Reply(xid, True, stat, detail, Unpacker(rec[u.pos :]))
        if reply_stat != MSG_DENIED:
            raise MalformedReply(f"reply_stat {reply_stat}")
        stat = u.u32()
        if stat == RPC_MISMATCH:
            detail = (u.u32(), u.u32())
        elif stat == AUTH_ERROR:
            detail = (u.u32(),)
            if not 1 <= detail[0] <= 7:
                raise MalformedReply(f"auth_stat {detail[0]}")
        else:
            raise MalformedReply(f"reject_stat {stat}")
        if u.pos != len(rec):
            raise MalformedReply(f"{len(rec) - u.pos} bytes after a denied reply")
        return Reply(xid, False, stat, detail, Unpacker(b""))
    except XdrError as exc:
        raise MalformedReply(f"short reply: {exc}") from None


def auth_sys(uid: int = 0, gid: int = 0, machine: str | bytes = "test", gids: tuple[int, ...] = ()
             ) -> tuple[int, bytes]:  # fmt: skip
    p = Packer()
    p.u32(0)
    p.opaque(machine.encode() if isinstance(machine, str) else machine)
    p.u32(uid)
    p.u32(gid)
    p.u32(len(gids))
    for g in gids:
        p.u32(g)
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


def connect(port: int, host: str = "127.0.0.1", *, source: str | None = None, reserved: bool = True,
            timeout: float | None = 20) -> socket.socket:  # fmt: skip
    """A TCP connection to *host*:*port* from *source* (an address of this machine; default: the
    kernel's choice) and, if *reserved*, from a privileged port.

    Reserved ports are few (424 here) and tests open connections by the hundred, so a port is bound
    with SO_REUSEADDR: Linux then lets connect() take over an old connection's TIME_WAIT with the
    same addresses (TCP timestamps tell the two apart), and a port another socket holds for the same
    server (EADDRNOTAVAIL) or a listener holds (EADDRINUSE) is skipped."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not reserved:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            if source is not None:
                s.bind((source, 0))
            s.connect((host, port))
        except BaseException:
            s.close()
            raise
        return s
    ports = list(RESERVED_PORTS)
    start = random.randrange(len(ports))
    any_address = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for i in range(len(ports)):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(timeout)
            s.bind((source or any_address, ports[(start + i) % len(ports)]))
            s.connect((host, port))
            return s
        except OSError as exc:
            s.close()
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
        except BaseException:
            s.close()
            raise
    raise OSError(errno.EADDRINUSE, f"no reserved port {ports[0]}-{ports[-1]} is free to connect from")


class RpcClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float | None = 20, *,
                 source: str | None = None, reserved: bool = True) -> None:  # fmt: skip
        self.sock = connect(port, host, source=source, reserved=reserved, timeout=timeout)
        self.xid = 1000

    @property
    def source_port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
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
        return parse_reply(self.recv_record())

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
