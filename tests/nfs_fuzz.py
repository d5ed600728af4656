#!/usr/bin/env python3
"""Long fuzz run of the NFS export's decoder: ``vmrecover nfs serve`` against generated bad input over TCP.

A test tool, not a test module (pytest does not collect it): the short runs live in
tests/test_nfs_protocol.py, and both talk to the server through tests/nfsclient.py, the tests' one RPC
client, from reserved source ports as the server requires (so run it as root).  This one sends
``--cases`` (default 100 000) generated inputs to a real server subprocess, on a small repository built
in a temporary directory (a 4 MiB disk backed up as vm1, recovery session s1 with a file and a folder a
"hypervisor" created in it).  A case is one of:

- **args**: a valid call header for a procedure the server offers (NFS v3 0-21, MOUNT v3 0-5,
  portmapper v2 0-5, now and then an unknown one) followed by arguments that are a well-formed template
  (real, forged or malformed file handles; names, offsets, counts and attributes from lists of edge
  cases), a mutated template (words replaced with boundary values, bytes flipped, cut short, extended),
  a real handle followed by random bytes, or random bytes alone;
- **header**: a CALL with random RPC version, program, version, procedure, credential and verifier;
- **record**: a record of random bytes (usually not a CALL: the server must close the connection);
- **stream** abuse, each on its own connection: raw bytes that are not record-marked, a record length
  over the limit (up to 2 GiB), half a record followed by FIN or RST, a connection reset at once, a
  flood of empty fragments, a few calls from an unprivileged source port (refused after any
  portmapper calls among them).

Args and header cases are pipelined, ``--batch`` records to a write (10% of them split into random
fragments, empty ones included), by ``--workers`` client threads at once; each must get exactly one
well-formed RPC reply with its xid.  Every reply is decoded strictly (RFC 5531); after a record or
stream case the server must close the connection or answer with well-formed replies, within
``--timeout`` seconds.  The server's VmRSS is sampled every 0.2 s.  At the end a new connection must
still read the disk correctly, then the server is stopped and its stderr searched for tracebacks.

Printed: cases sent by kind, replies by accept/reject status (and NFS3ERR_IO answers), connections
closed by the server, protocol failures (malformed replies, wrong or missing xids, hangs), server RSS
before/after/peak and VmHWM, crashes, tracebacks (with the distinct exceptions), cases/s.  Exit 1 if the
server died, logged a traceback, or broke the protocol; 0 otherwise::

    .venv/bin/python -m tests.nfs_fuzz                       # 100 000 cases
    .venv/bin/python -m tests.nfs_fuzz --cases 5000 --seed 7 --keep
    .venv/bin/python tests/nfs_fuzz.py --cases 5000         # the same, as a script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root holds the tests package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import nfsclient as nc

MiB = 1 << 20
DISK_SIZE = 4 * MiB
NFS, MOUNT, PMAP = 100003, 100005, 100000
SERVED = {NFS: (3, 22), MOUNT: (3, 6), PMAP: (2, 6)}  # program: (version, procedures)
AUTH_NONE, AUTH_SYS = 0, 1
ACCEPT = ["SUCCESS", "PROG_UNAVAIL", "PROG_MISMATCH", "PROC_UNAVAIL", "GARBAGE_ARGS", "SYSTEM_ERR"]
AUTH_STAT = {1: "BADCRED", 2: "REJECTEDCRED", 3: "BADVERF", 4: "REJECTEDVERF", 5: "TOOWEAK",
             6: "INVALIDRESP", 7: "FAILED"}  # fmt: skip
NFS3ERR_IO = 5
U32_EDGES = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400, 0x401, 0xFFFF, 0x10000, 0x100000,
             0x100001, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]  # fmt: skip
U64_EDGES = [0, 1, 4095, 4096, MiB, DISK_SIZE - 1, DISK_SIZE, DISK_SIZE + 1, 2**31, 2**32, 2**40, 2**62,
             2**63 - 1, 2**63, 2**64 - 4096, 2**64 - 1]  # fmt: skip
NAMES: list[bytes] = [b"disk.raw", b"disk.vmdk", b"vm.json", b"latest", b"vm1", b"s1", b"f0", b"d0", b".",
                      b"..", b"", b"a/b", b"/", b"nul\0", b"\xff\xfe", "é".encode(), b"n" * 255, b"n" * 256,
                      b"x" * 1024, *(f"fz{i}".encode() for i in range(24))]  # fmt: skip
TARGETS: list[bytes] = [b"disk.raw", b"../../etc/passwd", b"/", b"", b"a\0b", b"\xff", b"t" * 4096]


# --------------------------------------------------------------------------- XDR helpers
def xdr(*words: int) -> bytes:
    return struct.pack(f">{len(words)}I", *(w & 0xFFFFFFFF for w in words))


def u64(v: int) -> bytes:
    return struct.pack(">Q", v & 0xFFFFFFFFFFFFFFFF)


def opaque(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def mark(n: int, last: bool = True) -> bytes:
    return struct.pack(">I", (0x80000000 if last else 0) | n)


def label(r: nc.Reply) -> str:
    """A reply's status as the report counts it: SUCCESS, GARBAGE_ARGS, AUTH_ERROR TOOWEAK, ..."""
    if r.accepted:
        return ACCEPT[r.stat]
    return "RPC_MISMATCH" if r.stat == nc.RPC_MISMATCH else f"AUTH_ERROR {AUTH_STAT[r.detail[0]]}"


def connect(port: int, timeout: float) -> nc.RpcClient:
    c = nc.RpcClient(port, timeout=timeout)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


# --------------------------------------------------------------------------- the server and its repository
def vmrecover(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "vmrecover", *args], env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip
    if res.returncode:
        raise SystemExit(f"vmrecover {' '.join(args)} failed ({res.returncode}): {res.stderr}{res.stdout}")
    return res.stdout


def make_image(path: Path, rng: random.Random) -> bytes:
    """A sparse 4 MiB disk: 64 KiB regions of random bytes, text or holes."""
    data = bytearray(DISK_SIZE)
    for off in range(0, DISK_SIZE, 65536):
        r = rng.random()
        if r < 0.35:
            data[off : off + 65536] = rng.randbytes(65536)
        elif r < 0.7:
            data[off : off + 65536] = (f"line {off} of the fuzz disk\n" * 4096).encode()[:65536]
    path.write_bytes(data)
    return bytes(data)


class Server:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            # Every worker connects from 127.0.0.1, and connections the server is still closing count
            # against the per-address cap: this one address may use all 64.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vmrecover", "nfs", "serve", "--port", "0", "--json", "--cache-size",
                 "64M", "--max-client-connections", "64"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"nfs serve did not start: {log.read_text()}")
        self.port = int(json.loads(line)["nfs_port"])

    def status(self) -> dict[str, int]:
        """VmRSS and VmHWM in bytes; empty once the process is gone."""
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in ("VmRSS", "VmHWM"):
                        out[key] = int(line.split()[1]) * 1024
        except OSError:
            pass
        return out

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text(errors="replace")


@dataclass
class Handles:
    dirs: list[bytes]
    files: list[bytes]
    links: list[bytes]
    disk: bytes
    fsid: bytes

    @property
    def all(self) -> list[bytes]:
        return self.dirs + self.files + self.links


def find_handles(port: int) -> Handles:
    with nc.NfsClient(port, timeout=30) as c:
        try:
            root = c.root()
            vms, recover = c.walk(root, "vms"), c.walk(root, "recover")
            vm = c.walk(vms, "vm1")
            point = c.walk(vm, next(n for n, _, _ in c.readdir(vm)[1] if n not in (".", "..", "latest")))
            session = c.walk(recover, "s1")
            # what a hypervisor creates in a session: a file and a folder
            assert c.create(session, "f0")[0] == nc.OK and c.mkdir(session, "d0")[0] == nc.OK
            disk = c.walk(point, "disk.raw")
            files = [disk, c.walk(point, "vm.json"), c.walk(point, "disk.vmdk"), c.walk(session, "disk.raw"),
                     c.walk(session, "f0")]  # fmt: skip
            dirs = [root, vms, vm, point, recover, session, c.walk(session, "d0")]
            links = [c.walk(vm, "latest")]
        except AssertionError as exc:
            raise SystemExit(f"set-up failed: {exc!r}") from None
    return Handles(dirs, files, links, disk, root[4:12])


def read_disk(c: nc.NfsClient, fh: bytes, off: int, count: int) -> bytes:
    status, data, _ = c.read(fh, off, count)
    if status != nc.OK:
        raise SystemExit(f"READ at {off} failed: nfsstat3 {status}")
    return data


# --------------------------------------------------------------------------- generating cases
@dataclass
class Gen:
    rng: random.Random
    h: Handles

    def u32(self) -> int:
        r = self.rng.random()
        return self.rng.choice(U32_EDGES) if r < 0.6 else self.rng.getrandbits(32 if r < 0.8 else 12)

    def u64(self) -> bytes:
        r = self.rng.random()
        v = self.rng.choice(U64_EDGES) if r < 0.6 else self.rng.getrandbits(64 if r < 0.8 else 22)
        return u64(v)

    def fh(self, kind: str = "any") -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.08:  # forged: our magic and filesystem, any inode number (kind in the top 4 bits)
            ino = rng.getrandbits(4) << 60 | rng.getrandbits(rng.choice([4, 12, 48, 60]))
            fsid = self.h.fsid if rng.random() < 0.7 else rng.randbytes(8)
            return opaque(b"NXv1" + fsid + u64(ino) + u64(rng.choice([0, 1, 2, rng.getrandbits(64)])))
        if r < 0.12:  # not one of ours: wrong length or magic
            return opaque(rng.randbytes(rng.choice([0, 4, 27, 28, 29, 32, 64])))
        if r < 0.13:
            return opaque(rng.randbytes(65)) if rng.random() < 0.5 else xdr(rng.getrandbits(32))
        pool = {"dir": self.h.dirs, "file": self.h.files}.get(kind, self.h.all)
        return opaque(rng.choice(pool))

    def name(self) -> bytes:
        rng = self.rng
        return opaque(rng.choice(NAMES) if rng.random() < 0.9 else rng.randbytes(rng.randrange(1, 40)))

    def sattr(self) -> bytes:
        rng = self.rng
        out = b""
        for size in (False, False, False, True):  # mode, uid, gid, size
            if rng.random() < 0.3:
                out += xdr(1) + (self.u64() if size else xdr(self.u32()))
            else:
                out += xdr(0)
        for _ in range(2):  # atime, mtime
            how = rng.choice([0, 0, 1, 2])
            out += xdr(how) + (xdr(self.u32(), self.u32()) if how == 2 else b"")
        return out

    def nfs_args(self, proc: int) -> bytes:
        rng = self.rng
        if proc in (1, 5, 18, 19, 20):  # GETATTR READLINK FSSTAT FSINFO PATHCONF
            return self.fh()
        if proc == 2:  # SETATTR
            guard = xdr(1, self.u32(), self.u32()) if rng.random() < 0.2 else xdr(0)
            return self.fh("file") + self.sattr() + guard
        if proc in (3, 12, 13):  # LOOKUP REMOVE RMDIR
            return self.fh("dir") + self.name()
        if proc == 4:  # ACCESS
            return self.fh() + xdr(self.u32())
        if proc == 6:  # READ
            return (
                self.fh("file") + self.u64() + xdr(rng.choice([0, 1, 4096, 65536, MiB, MiB + 1, self.u32()]))
            )
        if proc == 7:  # WRITE
            data = rng.randbytes(rng.choice([0, 1, 100, 4096, 65536]))
            count = len(data) if rng.random() < 0.8 else self.u32()
            return self.fh("file") + self.u64() + xdr(count, rng.choice([0, 0, 0, 1, 2, 3])) + opaque(data)
        if proc == 8:  # CREATE
            how = rng.choice([0, 1, 2, 3])
            return self.fh("dir") + self.name() + xdr(how) + (rng.randbytes(8) if how == 2 else self.sattr())
        if proc == 9:  # MKDIR
            return self.fh("dir") + self.name() + self.sattr()
        if proc == 10:  # SYMLINK
            target = rng.choice(TARGETS) if rng.random() < 0.9 else rng.randbytes(rng.randrange(50))
            return self.fh("dir") + self.name() + self.sattr() + opaque(target)
        if proc == 11:  # MKNOD
            return (
                self.fh("dir")
                + self.name()
                + xdr(rng.randrange(9))
                + self.sattr()
                + xdr(self.u32(), self.u32())
            )
        if proc == 14:  # RENAME
            return self.fh("dir") + self.name() + self.fh("dir") + self.name()
        if proc == 15:  # LINK
            return self.fh("file") + self.fh("dir") + self.name()
        if proc in (16, 17):  # READDIR READDIRPLUS
            verf = bytes(8) if rng.random() < 0.5 else rng.randbytes(8)
            counts = xdr(self.u32()) + (xdr(self.u32()) if proc == 17 else b"")
            return self.fh("dir") + u64(rng.choice([0, 0, 1, 2, 3, 5, 100, 2**63])) + verf + counts
        if proc == 21:  # COMMIT
            return self.fh("file") + self.u64() + xdr(self.u32())
        return b""  # NULL

    def args(self, prog: int, proc: int) -> bytes:
        rng = self.rng
        if prog == NFS:
            return self.nfs_args(proc)
        if prog == MOUNT:
            if proc in (1, 3):
                path = rng.choice([b"/vmrecover", b"/vmrecover/recover/s1", b"/vmrecover/vms/vm1/latest",
                                   b"/vmrecover/../etc", b"/", b"", b"/vmrecover/recover/s1/d0", b"/x" * 600,
                                   b"/vmrecover/vms/\0"])  # fmt: skip
                return opaque(path)
            return b""
        if proc in (1, 2, 3):  # SET UNSET GETPORT
            return xdr(rng.choice([NFS, MOUNT, PMAP, self.u32()]), rng.choice([2, 3, self.u32()]),
                       rng.choice([6, 17, self.u32()]), self.u32())  # fmt: skip
        if proc == 5:  # CALLIT
            return xdr(NFS, 3, 0) + opaque(rng.randbytes(rng.randrange(20)))
        return b""

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.choice([1, 1, 1, 2, 3, 6])):
            op = rng.random()
            if op < 0.4 and len(b) >= 4:
                pos = rng.randrange(0, len(b) - 3) & ~3
                b[pos : pos + 4] = xdr(rng.choice(U32_EDGES) if rng.random() < 0.7 else rng.getrandbits(32))
            elif op < 0.6 and b:
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op < 0.75:
                del b[rng.randrange(len(b) + 1) :]
            elif op < 0.9:
                pos = rng.randrange(len(b) + 1)
                b[pos:pos] = rng.randbytes(rng.choice([1, 4, 8, 16]))
            elif b:
                a = rng.randrange(len(b))
                del b[a : a + rng.randrange(1, 17)]
        return bytes(b)

    def cred(self) -> tuple[int, bytes]:
        r = self.rng.random()
        if r < 0.6:
            return nc.auth_sys(machine="fuzz")
        if r < 0.8:
            return AUTH_NONE, b""
        gids = tuple(self.rng.getrandbits(32) for _ in range(self.rng.randrange(17)))
        return nc.auth_sys(self.u32(), self.u32(), self.rng.randbytes(self.rng.randrange(64)), gids)

    def call_case(self, xid: int) -> tuple[str, bytes]:
        """("args" or "header", a whole message) that must be answered."""
        rng = self.rng
        if rng.random() < 0.15:  # random header fields
            rv = rng.choice([2, 2, 2, 0, 1, 3, rng.getrandbits(32)])
            prog = rng.choice([NFS, MOUNT, PMAP, 100021, 100227, rng.getrandbits(32)])
            vers = rng.choice([1, 2, 3, 4, rng.getrandbits(32)])
            proc = rng.choice([0, 1, 6, 22, rng.getrandbits(32)])
            flavor = rng.choice([0, 1, 2, 3, 6, rng.getrandbits(32)])
            cred = opaque(rng.randbytes(rng.choice([0, 8, 20, 64, 400])))
            if rng.random() < 0.1:
                cred = cred[:4] if rng.random() < 0.5 else xdr(rng.choice([401, 2**31, 2**32 - 1]))
            verf = xdr(rng.choice([0, 1, 6]), 0) if rng.random() < 0.8 else xdr(0, rng.choice([401, 2**31]))
            tail = rng.randbytes(rng.randrange(40))
            return "header", xdr(xid, 0, rv, prog, vers, proc, flavor) + cred + verf + tail
        prog = rng.choice([NFS, NFS, NFS, MOUNT, PMAP])
        vers, nprocs = SERVED[prog]
        proc = rng.randrange(nprocs) if rng.random() < 0.97 else rng.choice([nprocs, rng.getrandbits(32)])
        r = rng.random()
        if r < 0.3:
            args = self.args(prog, proc)
        elif r < 0.7:
            args = self.mutate(self.args(prog, proc))
        elif r < 0.85:
            args = self.fh() + rng.randbytes(rng.randrange(64))
        else:
            args = rng.randbytes(rng.randrange(200))
        return "args", nc.call_message(xid, prog, vers, proc, args, self.cred())

    def fragmented(self, message: bytes) -> bytes:
        """*message* as a record of random fragments, empty ones included."""
        rng = self.rng
        out, pos = bytearray(), 0
        while True:
            n = rng.choice([0, 1, 2, 3, 5, 8, 64, 1000])
            piece = message[pos : pos + n]
            pos += len(piece)
            last = pos >= len(message) and (n > 0 or not message)
            out += mark(len(piece), last) + piece
            if last:
                return bytes(out)


# --------------------------------------------------------------------------- running
@dataclass
class Stats:
    cases: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    nfs_io: int = 0
    closed_by_server: int = 0
    malformed: list[str] = field(default_factory=list)
    wrong_xid: int = 0
    missing: int = 0
    hangs: int = 0
    connect_errors: int = 0

    def merge(self, o: Stats) -> None:
        self.cases += o.cases
        self.replies += o.replies
        self.nfs_io += o.nfs_io
        self.closed_by_server += o.closed_by_server
        self.malformed += o.malformed
        self.wrong_xid += o.wrong_xid
        self.missing += o.missing
        self.hangs += o.hangs
        self.connect_errors += o.connect_errors

    @property
    def sent(self) -> int:
        return sum(self.cases.values())


class Worker:
    def __init__(self, port: int, seed: int, handles: Handles, quota: int, batch: int, timeout: float,
                 stop: threading.Event) -> None:  # fmt: skip
        self.port, self.quota, self.batch, self.timeout, self.stop = port, quota, batch, timeout, stop
        self.rng = random.Random(seed)
        self.gen = Gen(self.rng, handles)
        self.stats = Stats()
        self.xid = seed << 24
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while self.stats.sent < self.quota and not self.stop.is_set():
                self.connection()
        except BaseException as exc:  # reported by the main thread
            self.error = exc
            self.stop.set()

    def _reply(self, conn: nc.RpcClient, expected: dict[int, str] | None, nfs: dict[int, bool]) -> None:
        """Read one reply and count it; ConnectionError once the server closed the connection (or
        sent something that is not a reply, which is also counted as malformed)."""
        try:
            r = conn.recv_reply()
        except nc.MalformedReply as exc:
            self.stats.malformed.append(str(exc))
            raise ConnectionError("malformed reply") from None
        status = label(r)
        self.stats.replies[status] += 1
        if expected is not None:
            if r.xid not in expected:
                self.stats.wrong_xid += 1
            else:
                del expected[r.xid]
        if status == "SUCCESS" and nfs.get(r.xid) and bytes(r.body.data[:4]) == xdr(NFS3ERR_IO):
            self.stats.nfs_io += 1

    def unprivileged(self) -> None:
        """A few calls from an unprivileged source port: the server answers the portmapper ones,
        refuses the first other one (AUTH_TOOWEAK) and closes the connection.  Whatever comes must be
        well-formed replies to xids that were sent."""
        rng, st = self.rng, self.stats
        st.cases["stream: unprivileged port"] += 1
        try:
            conn = nc.RpcClient(self.port, timeout=self.timeout, reserved=False)
        except OSError:
            st.connect_errors += 1
            return
        try:
            sent: dict[int, str] = {}
            out = bytearray()
            for _ in range(rng.randrange(1, 6)):
                self.xid += 1
                kind, msg = self.gen.call_case(self.xid & 0xFFFFFFFF)
                sent[self.xid & 0xFFFFFFFF] = kind
                out += nc.record(msg)
            conn.send_raw(bytes(out))
            conn.sock.shutdown(socket.SHUT_WR)
            self.drain(conn, sent)
        except TimeoutError:
            st.hangs += 1
        except OSError:
            st.closed_by_server += 1
        finally:
            conn.close()

    def connection(self) -> None:
        rng, st = self.rng, self.stats
        if rng.random() < 0.02:
            self.unprivileged()
            return
        try:
            conn = connect(self.port, self.timeout)
        except OSError:
            st.connect_errors += 1
            time.sleep(0.05)
            return
        if rng.random() < 0.03:  # reset before the server even looked at the connection
            st.cases["stream: reset at once"] += 1
            conn.reset()
            return
        try:
            for _ in range(rng.randrange(1, 5)):  # batches of calls that must all be answered
                expected: dict[int, str] = {}
                nfs: dict[int, bool] = {}
                out = bytearray()
                for _ in range(rng.randrange(1, self.batch + 1)):
                    self.xid += 1
                    kind, msg = self.gen.call_case(self.xid & 0xFFFFFFFF)
                    st.cases[kind] += 1
                    expected[self.xid & 0xFFFFFFFF] = kind
                    nfs[self.xid & 0xFFFFFFFF] = struct.unpack_from(">I", msg, 12)[0] == NFS
                    out += self.gen.fragmented(msg) if rng.random() < 0.1 else nc.record(msg)
                conn.send_raw(bytes(out))
                want = len(expected)
                try:
                    for _ in range(want):
                        self._reply(conn, expected, nfs)
                except ConnectionError:
                    st.closed_by_server += 1
                    st.missing += len(expected)
                    return
                if st.sent >= self.quota:
                    conn.close()
                    return
            self.tail(conn)
        except TimeoutError:
            st.hangs += 1
        except OSError:  # ConnectionError: closed by the server
            st.closed_by_server += 1
        finally:
            conn.close()

    def drain(self, conn: nc.RpcClient, sent: dict[int, str] | None = None) -> None:
        """Read until the server closes the connection: whatever comes must be well-formed replies (to
        the xids *sent*, if given)."""
        try:
            while True:
                self._reply(conn, sent, {})
        except ConnectionError:
            self.stats.closed_by_server += 1

    def tail(self, conn: nc.RpcClient) -> None:
        """End the connection with one abuse of the stream (a case of its own)."""
        rng, st = self.rng, self.stats
        r = rng.random()
        if r < 0.35:
            conn.close()  # not a case: the normal end
        elif r < 0.6:  # a record of random bytes: not a CALL, mostly
            st.cases["record"] += 1
            n = rng.choice([0, 1, 3, 4, 7, 8, 12, 40, 200])
            body = rng.randbytes(n)
            if n >= 8 and rng.random() < 0.3:
                body = body[:4] + xdr(rng.choice([1, 2, 0xFFFFFFFF])) + body[8:]
            conn.send_raw(nc.record(body))
            conn.sock.shutdown(socket.SHUT_WR)
            self.drain(conn)
        elif r < 0.72:  # raw bytes, not record-marked
            st.cases["stream: raw bytes"] += 1
            conn.send_raw(rng.randbytes(rng.randrange(1, 300)))
            conn.sock.shutdown(socket.SHUT_WR)
            self.drain(conn)
        elif r < 0.82:  # a length over the limit
            st.cases["stream: huge length"] += 1
            n = rng.choice([0x7FFFFFFF, 0x40000000, (1 << 20) + 4096 + rng.randrange(1, 1 << 20)])
            if rng.random() < 0.3:
                conn.send_raw(mark(5000, last=False) + rng.randbytes(5000))
            conn.send_raw(mark(n, last=rng.random() < 0.5) + rng.randbytes(rng.randrange(64)))
            self.drain(conn)
        elif r < 0.92:  # half a record, then FIN or RST
            st.cases["stream: half record"] += 1
            n = rng.randrange(8, 70000)
            conn.send_raw(mark(n) + rng.randbytes(rng.randrange(n)))
            conn.close() if rng.random() < 0.5 else conn.reset()
        elif r < 0.995:
            st.cases["stream: reset"] += 1
            conn.reset()
        else:  # empty fragments past the record limit
            st.cases["stream: empty fragments"] += 1
            with contextlib.suppress(ConnectionError):
                conn.send_raw(b"\0\0\0\0" * (300 * 1024))
            self.drain(conn)


def fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--cases", type=int, default=100_000, help="inputs to send (default 100000)")
    ap.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    ap.add_argument("--workers", type=int, default=4, help="client threads, one connection each (default 4)")
    ap.add_argument("--batch", type=int, default=32, help="most calls pipelined in one write (default 32)")
    ap.add_argument(
        "--timeout", type=float, default=30, help="seconds a reply or close may take (default 30)"
    )
    ap.add_argument(
        "--workdir", type=Path, help="where the repository goes (default: a new temporary folder)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder (repository, server log)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nfs-fuzz-", dir=args.workdir or "/var/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "VMRECOVER_PASSPHRASE"}
    env["VMRECOVER_REPO"] = str(work / "repo")
    rng = random.Random(args.seed)
    server: Server | None = None
    try:
        print(f"building a repository in {work}", file=sys.stderr)
        vmrecover(env, "init", "--chunk-size", "64K")
        image = make_image(work / "disk.raw", rng)
        vmrecover(env, "backup", "--vm", "vm1", str(work / "disk.raw"))
        vmrecover(env, "recover", "start", "vm1", "--name", "s1")
        server = Server(env, work / "server.log")
        handles = find_handles(server.port)
        with nc.NfsClient(server.port, timeout=30) as c:
            for off in range(0, DISK_SIZE, MiB):  # warm up: the memory baseline includes the disk's chunks
                read_disk(c, handles.disk, off, MiB)
        before = server.status().get("VmRSS", 0)

        stop = threading.Event()
        quota = -(-args.cases // args.workers)
        workers = [
            Worker(server.port, args.seed * 1000 + i + 1, handles, quota, args.batch, args.timeout, stop)
            for i in range(args.workers)
        ]
        threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
        peak = hwm = before
        print(f"sending {quota * args.workers} cases with {args.workers} workers", file=sys.stderr)
        t0 = time.monotonic()
        last_report = t0
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(0.2)
            now = server.status()
            peak, hwm = max(peak, now.get("VmRSS", 0)), max(hwm, now.get("VmHWM", 0))
            if server.proc.poll() is not None:
                stop.set()
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                sent = sum(w.stats.sent for w in workers)
                print(
                    f"  {sent} cases, {sent / (last_report - t0):.0f}/s, RSS {fmt_mb(peak)} peak",
                    file=sys.stderr,
                )
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join()
        stats = Stats()
        for w in workers:
            stats.merge(w.stats)
        errors = [w.error for w in workers if w.error is not None]
        alive = server.proc.poll() is None
        after_status = server.status()
        time.sleep(1)  # let the last closed connections go
        after = server.status().get("VmRSS", 0)
        served = False
        if alive:
            try:
                with nc.NfsClient(server.port, timeout=30) as c:
                    served = all(read_disk(c, handles.disk, off, 65536) == image[off : off + 65536]
                                 for off in (0, 1234567, DISK_SIZE - 65536))  # fmt: skip
            except (OSError, ValueError, AssertionError, SystemExit):
                served = False
        hwm = max(hwm, after_status.get("VmHWM", 0))
        exit_code = server.proc.returncode if not alive else None
        log = server.stop()
        server = None
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    tracebacks = log.count("Traceback (most recent call last)")
    exceptions = Counter(
        m.group(0)
        for m in re.finditer(r"^(?!Traceback)\w+(?:\.\w+)*(?:Error|Exception|Exit)\b.*$", log, re.M)
    )
    rows: list[tuple[str, str]] = [("cases sent", f"{stats.sent}")]
    rows += [(f"  {k}", str(v)) for k, v in sorted(stats.cases.items())]
    rows.append(("replies", str(sum(stats.replies.values()))))
    rows += [(f"  {k}", str(v)) for k, v in sorted(stats.replies.items(), key=lambda kv: -kv[1])]
    rows += [
        ("  of them NFS3ERR_IO", str(stats.nfs_io)),
        ("connections closed by the server", str(stats.closed_by_server)),
        ("malformed replies (must be 0)", str(len(stats.malformed))),
        ("replies with a wrong xid (must be 0)", str(stats.wrong_xid)),
        ("calls never answered (must be 0)", str(stats.missing)),
        ("hangs over the timeout (must be 0)", str(stats.hangs)),
        ("connections refused", str(stats.connect_errors)),
        ("server RSS before", fmt_mb(before)),
        ("server RSS after", fmt_mb(after)),
        ("server RSS peak (sampled)", fmt_mb(peak)),
        ("server VmHWM", fmt_mb(hwm)),
        ("crashes (must be 0)", "0" if alive else f"1 (exit {exit_code})"),
        ("serves the disk afterwards", "yes" if served else "NO"),
        ("tracebacks in stderr (must be 0)", str(tracebacks)),
        ("elapsed", f"{elapsed:.1f} s"),
        ("cases/s", f"{stats.sent / elapsed:.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"nfs_fuzz: seed {args.seed}, {args.workers} workers, batches of up to {args.batch}")
    for k, v in rows:
        print(f"{k:<{width}}  {v:>12}")
    for text, n in exceptions.most_common(10):
        print(f"  {n:>6} x {text[:150]}")
    for m in stats.malformed[:10]:
        print(f"  malformed: {m}")
    for e in errors:
        print(f"  client error: {e!r}")
    failed = (not alive or not served or tracebacks or stats.malformed or stats.wrong_xid or stats.missing
              or stats.hangs or errors)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
