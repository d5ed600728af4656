"""The storage behind the XAPI simulator's "nfs" SRs: what XenServer's SM driver and tapdisk do over the
network, done by a real NFSv3 client (tests/nfsclient.py, written from the RFCs).

xapi-project/sm's ``NFSSR`` (on ``FileSR.SharedFileSR``) attaches an SR (``PBD.plug``) by:
``util._testHost(server, 2049)`` (error 108 if nothing answers), ``check_server`` (``rpcinfo -s``: the
NFS versions the portmapper lists; 72), ``mount.nfs server:serverpath/<SR uuid>`` (73), the writability
check (create and remove a uuid4-named file; 461) and the hardlink check (``sm-hardlink.conf`` in the SR
folder says whether hardlinks work; if it is missing, a LINK of a test file decides and the answer is
written there).  ``SR.scan`` (``FileSR._loadvdis``) takes every ``<uuid>.raw`` as a raw VDI sized by the
file and every ``<uuid>.vhd`` as a VHD VDI.  tapdisk opens a VDI's file when a VM starts; the SM removes
a VDI's file when the VDI is destroyed (as the source of a storage migration is).

:func:`attach` does the same with MOUNT/NFS calls and returns an :class:`NfsMount`: the SR folder's
handle, through which the simulator lists, reads, writes and removes VDI files.  Failures are
:class:`SmError`: the SM's ``XenError`` as XAPI reports it, ``SR_BACKEND_FAILURE_<code>`` with
``["", "<description> [opterr=<detail>]", ""]``, codes and texts from sm's XE_SR_ERRORCODES.xml.

SIMPLIFIED: the reachability test connects to the NFS port the portmapper names (2049 only when the
portmapper does not answer), so test servers on other ports work; NFS over TCP only (no ``useUDP``, no
NFSv4: ``nfsversion`` 4 fails as against a server without v4); ``options``, ``nfs-timeout`` and
``nfs-retrans`` are not used; one TCP connection per operation (the kernel keeps one per mount); VHD
files are sized from their footer only (no parents, no hidden flag, no CBT logs).

Each host of the simulated pool mounts from its own address (``attach(..., source=)``: every connection,
the portmapper's included, is bound to it), so an NFS server that allows only some hosts refuses the
others as it would refuse those hosts.
"""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from nfs_export.xdr import Packer, Unpacker, XdrError
from tests import nfsclient as nc

PORTMAP_PORT = 111
NFS_PORT = 2049  # what NFSSR's util._testHost connects to
IPPROTO_TCP = 6
PMAPPROC_GETPORT = 3
MOUNTPROC3_MNT, MOUNTPROC3_UMNT = 1, 3
TIMEOUT = 10.0  # seconds for a connection and each call (the SM's _testHost waits 5 s)
PIECE = 1 << 20  # READ/WRITE size (the vmrecover server's rtmax/wtmax)
HARDLINK_CONF = "sm-hardlink.conf"
VHD_FOOTER = 512

# sm's XE_SR_ERRORCODES.xml: name -> (code, description)
SM_ERRORS: dict[str, tuple[int, str]] = {
    "Unimplemented": (38, "The requested method is not supported/implemented"),
    "SRScan": (40, "The SR scan failed"),
    "VDIUnavailable": (46, "The VDI is not available"),
    "SRUnavailable": (47, "The SR is not available"),
    "VDILoad": (65, "Failed to load VDI"),
    "NFSVersion": (72, "Required NFS server version unsupported"),
    "NFSMount": (73, "NFS mount error"),
    "VDIDelete": (80, "Failed to mark VDI hidden"),
    "ConfigServerPathMissing": (101, "The request is missing the serverpath parameter"),
    "ConfigServerMissing": (102, "The request is missing the server parameter"),
    "NFSTarget": (108, "Unable to detect an NFS service on this target."),
    "DNSError": (140, "Incorrect DNS name, unable to resolve."),
    "TapdiskFailed": (453, "tapdisk experienced an error"),
    "SharedFileSystemNoWrite": (461, "The file system for SR cannot be written to."),
}


class SmError(Exception):
    """An SM driver error (``xs_errors.XenError(name, opterr)``) as XAPI reports it."""

    def __init__(self, name: str, opterr: str | None = None) -> None:
        code, text = SM_ERRORS[name]
        self.name = name
        self.code = code
        self.message = text if opterr is None else f"{text} [opterr={opterr}]"
        super().__init__(self.message)

    @property
    def description(self) -> list[str]:
        return [f"SR_BACKEND_FAILURE_{self.code}", "", self.message, ""]


class NfsError(Exception):
    """An NFS call that failed: an nfsstat3 (``status``) or no answer at all (``status`` None)."""

    def __init__(self, what: str, status: int | None = None) -> None:
        super().__init__(what if status is None else f"{what}: NFS3ERR {status}")
        self.status = status


class _Client(nc.NfsClient):
    """nfsclient's NfsClient with failures as exceptions (it asserts: fine in a test, not in a sim)."""

    def nfs(self, proc: int, p: Packer) -> tuple[int, Unpacker]:
        r = self.call(nc.NFS, 3, proc, p.getvalue())
        if not (r.accepted and r.stat == nc.SUCCESS):
            raise NfsError(f"NFS procedure {proc} refused (accepted={r.accepted}, stat={r.stat})")
        return r.body.u32(), r.body


@contextmanager
def _rpc(
    server: str, port: int, cls: type[nc.RpcClient] = nc.RpcClient, *, source: str | None = None
) -> Iterator[Any]:
    """A connection from a privileged port (NFS servers want one; we are root) of *source* (an address
    of this machine: the mounting host's; None, the kernel's choice), failures as NfsError."""
    try:
        c = cls(port, host=server, timeout=TIMEOUT, source=source)
    except OSError as e:
        raise NfsError(f"cannot connect to {server}:{port}: {e.strerror or e}") from None
    try:
        yield c
    except (OSError, XdrError, nc.MalformedReply, AssertionError) as e:
        raise NfsError(f"{server}:{port}: {e!r}") from None
    finally:
        c.close()


def getport(server: str, prog: int, vers: int, *, source: str | None = None) -> int:
    """PMAPPROC_GETPORT over TCP: the port of *prog* version *vers*, 0 if the portmapper has none."""
    p = Packer()
    for v in (prog, vers, IPPROTO_TCP, 0):
        p.u32(v)
    with _rpc(server, PORTMAP_PORT, source=source) as c:
        r = c.call(nc.PMAP, 2, PMAPPROC_GETPORT, p.getvalue())
        if not (r.accepted and r.stat == nc.SUCCESS):
            raise NfsError(f"portmapper of {server} refused GETPORT")
        return int(r.body.u32())


def _reachable(server: str, port: int, source: str | None = None) -> bool:
    try:
        with socket.create_connection(
            (server, port), timeout=TIMEOUT, source_address=(source, 0) if source else None
        ):
            return True
    except OSError:
        return False


@dataclass
class Entry:
    """A directory entry of the SR folder (READDIRPLUS)."""

    name: str
    fh: bytes | None
    attrs: dict[str, int] | None


@dataclass
class NfsMount:
    """An attached NFS SR: the folder ``serverpath/<SR uuid>`` of ``server``, mounted over MOUNT v3."""

    server: str
    remotepath: str
    nfs_port: int
    mount_port: int
    root: bytes  # the SR folder's file handle
    hardlinks: bool
    source: str | None = None  # the mounting host's address: every connection comes from it

    @contextmanager
    def client(self) -> Iterator[_Client]:
        with _rpc(self.server, self.nfs_port, _Client, source=self.source) as c:
            yield c

    # ------------------------------------------------------------------ namespace
    def listdir(self) -> list[Entry]:
        """Every entry of the SR folder but ``.`` and ``..``, with attributes and handles."""
        out: list[Entry] = []
        cookie, verf = 0, bytes(8)
        with self.client() as c:
            while True:
                p = Packer()
                p.opaque(self.root)
                p.u64(cookie)
                p.fixed(verf)
                p.u32(16384)  # dircount
                p.u32(65536)  # maxcount
                status, u = c.nfs(nc.READDIRPLUS, p)
                if status:
                    raise NfsError("READDIRPLUS of the SR folder", status)
                nc.post_op_attr(u)
                verf = u.fixed(8)
                while u.bool():
                    u.u64()  # fileid
                    name = u.string(4096)
                    cookie = u.u64()
                    attrs = nc.post_op_attr(u)
                    fh = u.opaque(64) if u.bool() else None
                    if name not in (".", ".."):
                        out.append(Entry(name, fh, attrs))
                if u.bool():  # eof
                    return out

    def lookup(self, c: _Client, name: str) -> tuple[bytes, dict[str, int]]:
        """(handle, attributes) of *name* in the SR folder; NfsError (status NOENT) if it is not there."""
        status, fh = c.lookup(self.root, name)
        if status:
            raise NfsError(f"LOOKUP {name}", status)
        status, attrs = c.getattr(fh)
        if status or attrs is None:
            raise NfsError(f"GETATTR {name}", status)
        return fh, attrs

    def size(self, name: str) -> int:
        with self.client() as c:
            return self.lookup(c, name)[1]["size"]

    def remove(self, name: str) -> None:
        with self.client() as c:
            status = c.remove(self.root, name)
        if status:
            raise NfsError(f"REMOVE {name}", status)

    def fsstat(self) -> tuple[int, int]:
        """(total bytes, free bytes) of the file system holding the SR folder."""
        p = Packer()
        p.opaque(self.root)
        with self.client() as c:
            status, u = c.nfs(nc.FSSTAT, p)
            if status:
                raise NfsError("FSSTAT", status)
            nc.post_op_attr(u)
            tbytes, fbytes = u.u64(), u.u64()
        return tbytes, fbytes

    # ------------------------------------------------------------------ data
    def read(self, name: str, offset: int, length: int) -> bytes:
        """*length* bytes at *offset* (fewer at the end of the file), as tapdisk reads them."""
        out = bytearray()
        with self.client() as c:
            fh, _ = self.lookup(c, name)
            while len(out) < length:
                status, data, eof = c.read(fh, offset + len(out), min(PIECE, length - len(out)))
                if status:
                    raise NfsError(f"READ {name}", status)
                out += data
                if eof or not data:
                    break
        return bytes(out)

    def pieces(self, name: str, size: int, progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
        """The first *size* bytes of the file, PIECE by PIECE (zeros past its end), over one connection."""
        with self.client() as c:
            fh, _ = self.lookup(c, name)
            pos = 0
            while pos < size:
                want = min(PIECE, size - pos)
                status, data, eof = c.read(fh, pos, want)
                if status:
                    raise NfsError(f"READ {name} at {pos}", status)
                if len(data) < want and eof:
                    data += bytes(want - len(data))
                if not data:
                    raise NfsError(f"READ {name} at {pos}: no data and no end of file")
                pos += len(data)
                if progress is not None:
                    progress(pos)
                yield data

    def write(self, name: str, offset: int, data: bytes) -> None:
        """UNSTABLE WRITEs then COMMIT, as a client's page cache does; resent FILE_SYNC if the server's
        write verifier changed in between (it lost them)."""
        with self.client() as c:
            fh, _ = self.lookup(c, name)
            verfs = set()
            for pos in range(0, len(data), PIECE):
                piece = data[pos : pos + PIECE]
                status, count, _, verf = c.write(fh, offset + pos, piece, nc.UNSTABLE)
                if status or count != len(piece):
                    raise NfsError(f"WRITE {name} at {offset + pos} ({count} of {len(piece)})", status)
                verfs.add(verf)
            status, verf = c.commit(fh)
            if status:
                raise NfsError(f"COMMIT {name}", status)
            if verfs - {verf}:
                for pos in range(0, len(data), PIECE):
                    status, *_ = c.write(fh, offset + pos, data[pos : pos + PIECE], nc.FILE_SYNC)
                    if status:
                        raise NfsError(f"WRITE {name} at {offset + pos}", status)

    def umount(self) -> None:
        """MOUNTPROC3_UMNT (what umount does for an NFSv3 mount); best effort."""
        p = Packer()
        p.string(self.remotepath)
        with suppress(NfsError), _rpc(self.server, self.mount_port, source=self.source) as c:
            c.call(nc.MOUNT, 3, MOUNTPROC3_UMNT, p.getvalue())


# ---------------------------------------------------------------------------------------------- attach
def attach(
    device_config: dict[str, str],
    sr_uuid: str,
    message: Callable[[str, str], None] | None = None,
    *,
    source: str | None = None,
) -> NfsMount:
    """NFSSR.attach on the host whose address is *source*: mount ``serverpath/<sr_uuid>`` of ``server``
    and check it as the SM does; the mount, or SmError.  *message* gets XAPI messages the SM would
    create (``sr_does_not_support_hardlinks``)."""
    server = device_config.get("server")
    if not server:
        raise SmError("ConfigServerMissing")
    if "serverpath" not in device_config:
        raise SmError("ConfigServerPathMissing")
    remotepath = os.path.join(device_config["serverpath"], sr_uuid)
    nfsversion = device_config.get("nfsversion") or "3"
    if not (nfsversion == "3" or nfsversion.startswith("4")):
        raise SmError("NFSVersion", "Invalid nfsversion.")
    try:
        socket.getaddrinfo(server, PORTMAP_PORT)
    except OSError:
        raise SmError("DNSError") from None

    # util._testHost(server, 2049), SIMPLIFIED: the port the portmapper gives for NFS v3 (see the doc)
    try:
        nfs_port = getport(server, nc.NFS, 3, source=source)
        versions = ["3"] if nfs_port else []
        if getport(server, nc.NFS, 4, source=source):
            versions.append("4")
        pmap = True
    except NfsError:
        nfs_port, versions, pmap = 0, [], False
    if not _reachable(server, nfs_port or NFS_PORT, source):
        raise SmError("NFSTarget")
    # check_server: rpcinfo -s lists the NFS versions (a v4-only server is probed by a v4 mount)
    if not pmap or not versions:
        raise SmError("NFSVersion", f"Failed to read supported NFS version from server {server}")
    if nfsversion[0] not in versions or nfsversion != "3":
        raise SmError("NFSVersion", f"Unsupported NFS version: {nfsversion}")

    # mount.nfs server:remotepath (exit status 32: mount failure)
    failed = SmError("NFSMount", f"mount failed on server `{server}` with return code 32")
    try:
        mount_port = getport(server, nc.MOUNT, 3, source=source)
        if not mount_port:
            raise failed
        p = Packer()
        p.string(remotepath)
        with _rpc(server, mount_port, source=source) as c:
            r = c.call(nc.MOUNT, 3, MOUNTPROC3_MNT, p.getvalue())
            if not (r.accepted and r.stat == nc.SUCCESS) or r.body.u32() != 0:
                raise failed
            root = r.body.opaque(64)
        with _rpc(server, nfs_port, _Client, source=source) as c:
            status, attrs = c.getattr(root)
            if status or attrs is None or attrs["type"] != 2:  # NF3DIR
                raise failed
    except NfsError:
        raise failed from None
    mount = NfsMount(server, remotepath, nfs_port, mount_port, root, hardlinks=False, source=source)
    try:
        _check_writable(mount)
        mount.hardlinks = _check_hardlinks(mount, sr_uuid, message)
    except BaseException:
        mount.umount()
        raise
    return mount


def _check_writable(mount: NfsMount) -> None:
    """SharedFileSR._check_writable: create a uuid4-named file in the SR folder, then remove it."""
    name = str(uuid.uuid4())
    try:
        with mount.client() as c:
            status, _ = c.create(mount.root, name, nc.UNCHECKED, mode=0o644)
            if status:
                raise SmError("SharedFileSystemNoWrite")
    except NfsError:
        raise SmError("SharedFileSystemNoWrite") from None
    finally:
        with suppress(NfsError), mount.client() as c:  # util.force_unlink
            c.remove(mount.root, name)


def _check_hardlinks(mount: NfsMount, sr_uuid: str, message: Callable[[str, str], None] | None) -> bool:
    """SharedFileSR._check_hardlinks: sm-hardlink.conf decides; without it, a LINK of a test file does
    and its answer is written there ("1" or "0")."""
    with suppress(NfsError, ValueError):
        return bool(int(mount.read(HARDLINK_CONF, 0, 64).decode()))
    test = str(uuid.uuid4())
    supported = False
    try:
        with mount.client() as c:
            status, fh = c.create(mount.root, test, nc.UNCHECKED, mode=0o644)
            if status:
                raise NfsError(f"CREATE {test}", status)
            p = Packer()
            p.opaque(fh)
            p.opaque(mount.root)
            p.string(f"{test}.new")
            supported = c.nfs(nc.LINK, p)[0] == nc.OK
    except NfsError:
        supported = False
    finally:
        with suppress(NfsError), mount.client() as c:
            c.remove(mount.root, f"{test}.new")
            c.remove(mount.root, test)
    with suppress(NfsError), mount.client() as c:  # _write_hardlink_conf: failures only logged
        status, fh = c.create(mount.root, HARDLINK_CONF, nc.UNCHECKED, mode=0o644, size=0)
        if status == nc.OK:
            c.write(fh, 0, b"1" if supported else b"0", nc.FILE_SYNC)
    if not supported and message is not None:
        message(
            "sr_does_not_support_hardlinks",
            f"File system for SR {sr_uuid} does not support hardlinks, crash consistency of snapshots "
            "cannot be assured",
        )
    return supported


# ---------------------------------------------------------------------------------------------- scan
@dataclass
class ScannedVdi:
    uuid: str  # the file name's stem: the VDI's uuid and location
    ext: str  # ".raw" or ".vhd"
    virtual_size: int
    physical_utilisation: int


def scan(mount: NfsMount) -> list[ScannedVdi]:
    """FileSR._loadvdis: ``*.vhd`` (sized by their footer) and ``*.raw`` (sized by the file) of the SR
    folder.  SmError 47 if the folder cannot be listed, 40 for a VHD whose footer is not one."""
    try:
        entries = mount.listdir()
    except NfsError as e:
        raise SmError("SRUnavailable", f"not mounted {mount.remotepath}: {e}") from None
    out = []
    for e in entries:
        stem, ext = os.path.splitext(e.name)
        if ext not in (".raw", ".vhd") or not stem:
            continue
        try:
            size = e.attrs["size"] if e.attrs is not None else mount.size(e.name)
            virtual = size if ext == ".raw" else _vhd_size(mount, e.name, size)
        except NfsError as err:
            raise SmError("SRScan", f"error VHD-scanning path {mount.remotepath} ({err})") from None
        if virtual is None:
            raise SmError("SRScan", f"uuid={stem}")
        out.append(ScannedVdi(stem, ext, virtual, size))
    return out


def vhd_current_size(footer: bytes) -> int | None:
    """The virtual size a VHD footer gives (big-endian u64 at offset 48), None if it is not a footer."""
    if len(footer) < VHD_FOOTER or footer[:8] != b"conectix":
        return None
    return int(struct.unpack_from(">Q", footer, 48)[0])


def _vhd_size(mount: NfsMount, name: str, size: int) -> int | None:
    if size < VHD_FOOTER:
        return None
    # the footer at the end; a VHD being written may have only its copy at offset 0 valid
    for off in (size - VHD_FOOTER, 0):
        got = vhd_current_size(mount.read(name, off, VHD_FOOTER))
        if got is not None:
            return got
    return None
