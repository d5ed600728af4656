"""MOUNT version 3 (RFC 1813 appendix I): hands out the root handle of the export, or of any folder
below it (libnfs-based clients such as qemu mount the folder that holds the file they open)."""

from __future__ import annotations

import errno
import stat

import trio

from .nfs3 import Nfs3, NfsError
from .rpc import AUTH_SYS, AllowList, Call, Program, Result
from .xdr import Packer

PROGRAM, VERSION = 100005, 3
MNTPATHLEN = 1024
MNT3_OK, MNT3ERR_NOENT, MNT3ERR_IO, MNT3ERR_ACCES, MNT3ERR_NOTDIR = 0, 2, 5, 13, 20
MNT3ERR_NAMETOOLONG, MNT3ERR_SERVERFAULT = 63, 10006


class Mount3:
    def __init__(self, nfs: Nfs3, export_path: str, allow: AllowList) -> None:
        self.nfs = nfs
        self.export_path = "/" + export_path.strip("/")
        self.allow = allow  # shown by EXPORT: who may mount
        self.mounts: set[tuple[str, str]] = set()  # (client address, path) for DUMP

    def program(self) -> Program:
        procs = {0: self.null, 1: self.mnt, 2: self.dump, 3: self.umnt, 4: self.umntall, 5: self.export}
        return Program(PROGRAM, VERSION, "mount3", procs)

    def components(self, path: str) -> list[str] | None:
        """The names below the export's root, or None if *path* is not inside the export."""
        parts = [c for c in path.split("/") if c]
        root = [c for c in self.export_path.split("/") if c]
        if parts[: len(root)] != root or any(c in (".", "..") or "\0" in c for c in parts):
            return None
        return parts[len(root) :]

    def _resolve(self, names: list[str]) -> bytes:
        fs = self.nfs.fs
        a = fs.getattr(fs.root_ino)
        for name in names:  # one component at a time, never following a symlink
            if not stat.S_ISDIR(a.mode):
                raise NfsError(MNT3ERR_NOTDIR)
            a = fs.lookup(a.ino, name)
        if not stat.S_ISDIR(a.mode):
            raise NfsError(MNT3ERR_NOTDIR)
        return self.nfs.handle(a)

    async def null(self, call: Call) -> Result:
        return Packer()

    async def mnt(self, call: Call) -> Result:
        path = call.args.string(MNTPATHLEN)
        p = Packer()
        names = self.components(path)
        if names is None:
            p.u32(MNT3ERR_ACCES)
            return p
        try:
            fh = await trio.to_thread.run_sync(self._resolve, names, limiter=self.nfs.limiter)
        except NfsError as exc:
            p.u32(exc.status)
            return p
        except OSError as exc:
            p.u32({errno.ENOENT: MNT3ERR_NOENT, errno.ENOTDIR: MNT3ERR_NOTDIR,
                   errno.ENAMETOOLONG: MNT3ERR_NAMETOOLONG}.get(exc.errno or 0, MNT3ERR_IO))  # fmt: skip
            return p
        self.mounts.add((call.peer, path))
        p.u32(MNT3_OK)
        p.opaque(fh)
        p.u32(1)
        p.u32(AUTH_SYS)
        return p

    async def dump(self, call: Call) -> Result:
        p = Packer()
        for host, path in sorted(self.mounts):
            p.bool(True)
            p.string(host)
            p.string(path)
        p.bool(False)
        return p

    async def umnt(self, call: Call) -> Result:
        path = call.args.string(MNTPATHLEN)
        self.mounts.discard((call.peer, path))
        return Packer()

    async def umntall(self, call: Call) -> Result:
        self.mounts = {m for m in self.mounts if m[0] != call.peer}
        return Packer()

    async def export(self, call: Call) -> Result:
        p = Packer()
        p.bool(True)
        p.string(self.export_path)
        for g in self.allow.strings():
            p.bool(True)
            p.string(g)
        p.bool(False)
        p.bool(False)
        return p
