"""The NFS datastore end to end: ``vmrecover nfs serve`` against real NFSv3 clients.

libnfs' tools (nfs-ls, nfs-cat, nfs-cp) and qemu's nfs:// driver are the clients a user has; the raw
client in nfsclient.py reaches what they don't expose (handles, cookies, CREATE modes, COMMIT).
Malformed input and fuzzing are in test_nfs_protocol.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.testkit.guest import MiB, boot, read_boot_log

from . import nfsclient as nc
from .conftest import (
    CHUNK,
    Cli,
    Mounted,
    NfsServer,
    assert_clean_error,
    chunky_image,
    corrupt_chunk,
    needs_fuse,
    random_image,
    sha256_file,
)

pytestmark = pytest.mark.skipif(shutil.which("nfs-cat") is None, reason="needs libnfs-utils (make setup)")
BOOT_TIMEOUT = 180


def _tool(*argv: str, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(list(argv), capture_output=True, timeout=120, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def _cat_sha(url: str) -> str:
    return hashlib.sha256(_tool("nfs-cat", url).stdout).hexdigest()


def _backup(cli: Cli, tmp_path: Path, size: int = 6 * MiB, seed: int = 1) -> tuple[Path, str]:
    img = random_image(tmp_path / "disk.raw", size, seed=seed)
    return img, cli.json("backup", "--vm", "vm1", img)["point"]


Served = tuple[Path, str, NfsServer]  # (image, point id, server)


@pytest.fixture
def served(cli: Cli, nfs_server, tmp_path: Path) -> Served:
    """vm1's 6 MiB random disk backed up, a recovery session s1 of it, and a server of the repository."""
    img, point = _backup(cli, tmp_path)
    cli.run("recover", "start", "vm1", "--name", "s1")
    return img, point, nfs_server()


# --------------------------------------------------------------------------- libnfs tools


def test_tree_and_views_read_with_libnfs(cli: Cli, nfs_server, served: Served, tmp_path: Path) -> None:
    """nfs-ls shows the FUSE tree; nfs-cat of every view gives the backup's exact bytes."""
    img, point, srv = served
    listing = _tool("nfs-ls", "-R", srv.url()).stdout.decode()
    names = {line.split()[-1] for line in listing.splitlines()}
    base = f"vms/vm1/{point}"
    assert {"vms", "recover", "vms/vm1", "vms/vm1/latest", base, "recover/s1"} <= names
    views = {"disk.raw", "disk.vmdk", "disk-flat.vmdk", "disk.vhd", "vm.json"}
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith(base + "/")} == views
    assert {n.rsplit("/", 1)[1] for n in names if n.startswith("recover/s1/")} == views - {"vm.json"}
    assert "dr-x" in next(line for line in listing.splitlines() if line.endswith(f" {base}"))

    want = sha256_file(img)
    for path in (f"{base}/disk.raw", f"{base}/disk-flat.vmdk", "recover/s1/disk.raw"):
        assert _cat_sha(srv.url(path)) == want, path
    vhd = _tool("nfs-cat", srv.url(f"{base}/disk.vhd")).stdout
    assert hashlib.sha256(vhd[:-512]).hexdigest() == want and vhd[-512:].startswith(b"conectix")
    assert b'createType="vmfs"' in _tool("nfs-cat", srv.url(f"{base}/disk.vmdk")).stdout
    meta = json.loads(_tool("nfs-cat", srv.url(f"{base}/vm.json")).stdout)
    assert meta["point"] == point and meta["disks"][0]["size"] == img.stat().st_size


def test_backup_views_are_read_only(cli: Cli, nfs_server, tmp_path: Path) -> None:
    """Every write under vms/ answers NFS3ERR_ROFS; the backup's bytes stay the same."""
    img, point = _backup(cli, tmp_path)
    srv: NfsServer = nfs_server()
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    res = _tool("nfs-cp", str(src), srv.url(f"vms/vm1/{point}/new.bin"), check=False)
    assert res.returncode != 0 and b"ROFS" in res.stderr
    with nc.NfsClient(srv.port) as c:
        root = c.root()
        pdir = c.walk(root, f"vms/vm1/{point}")
        raw = c.walk(pdir, "disk.raw")
        assert c.write(raw, 0, b"\0" * 4096, nc.FILE_SYNC)[0] == nc.ROFS
        assert c.setattr_size(raw, 0) == nc.ROFS
        assert c.create(pdir, "x")[0] == nc.ROFS
        assert c.mkdir(pdir, "d")[0] == nc.ROFS
        assert c.remove(pdir, "disk.raw") == nc.ROFS
        assert c.rename(pdir, "disk.raw", pdir, "other.raw") == nc.ROFS
        # ACCESS grants no MODIFY/EXTEND/DELETE on backup views
        p = nc.Packer()
        p.opaque(raw)
        p.u32(0x3F)
        status, u = c.nfs(nc.ACCESS, p)
        assert status == nc.OK and nc.post_op_attr(u) and u.u32() & 0x1C == 0
    assert _cat_sha(srv.url(f"vms/vm1/{point}/disk.raw")) == sha256_file(img)


def test_session_writes_land_in_the_delta(cli: Cli, nfs_server, tmp_path: Path) -> None:
    """nfs-cp and raw WRITEs (UNSTABLE + COMMIT, FILE_SYNC) land in the session; the backup is untouched."""
    img, point = _backup(cli, tmp_path)
    session = cli.json("recover", "start", "vm1", "--name", "s1")
    srv: NfsServer = nfs_server()
    vmx = tmp_path / "vm.vmx"
    vmx.write_bytes(os.urandom(3 * MiB + 123))
    _tool("nfs-cp", str(vmx), srv.url("recover/s1/vm.vmx"))
    assert _cat_sha(srv.url("recover/s1/vm.vmx")) == sha256_file(vmx)
    assert sha256_file(Path(session["path"]) / "upper" / "vm.vmx") == sha256_file(vmx)

    with nc.NfsClient(srv.port) as c:
        disk = c.walk(c.root(), "recover/s1/disk.raw")
        status, n, committed, verf = c.write(disk, 4096 + 17, b"\xab" * 10000, nc.UNSTABLE)
        assert (status, n, committed) == (nc.OK, 10000, nc.UNSTABLE)
        assert c.commit(disk) == (nc.OK, verf)  # same verifier: nothing was lost in between
        status, n, committed, verf2 = c.write(disk, 2 * MiB, b"\xcd" * MiB, nc.FILE_SYNC)
        assert (status, n, committed, verf2) == (nc.OK, MiB, nc.FILE_SYNC, verf)
        status, data, eof = c.read(disk, 4096, 10100)
        assert status == nc.OK and not eof
        expect = bytearray(img.read_bytes()[4096 : 4096 + 10100])
        expect[17 : 17 + 10000] = b"\xab" * 10000
        assert data == bytes(expect)
        # the last bytes: eof is set
        status, data, eof = c.read(disk, img.stat().st_size - 10, 100)
        assert status == nc.OK and eof and len(data) == 10
    want = bytearray(img.read_bytes())
    want[4096 + 17 : 4096 + 17 + 10000] = b"\xab" * 10000
    want[2 * MiB : 3 * MiB] = b"\xcd" * MiB
    assert _cat_sha(srv.url("recover/s1/disk.raw")) == hashlib.sha256(want).hexdigest()
    assert _cat_sha(srv.url(f"vms/vm1/{point}/disk.raw")) == sha256_file(img)
    assert cli.json("recover", "list")[0]["written"]["disk"] >= MiB


def test_write_verifier_is_stable_across_a_restart(
    cli: Cli, nfs_server, served: Served, tmp_path: Path
) -> None:
    """Unstable writes are in the page cache once answered: a server restart loses none, so the write
    verifier stays the same and clients need not resend (it changes only with the machine's boot)."""
    _, _, srv = served
    with nc.NfsClient(srv.port) as c:
        disk = c.walk(c.root(), "recover/s1/disk.raw")
        _, _, _, verf = c.write(disk, 0, b"\x11" * 4096)
    srv.stop()
    srv2: NfsServer = nfs_server()
    with nc.NfsClient(srv2.port) as c:
        assert c.commit(disk) == (nc.OK, verf)
        assert c.read(disk, 0, 4096)[1] == b"\x11" * 4096


# --------------------------------------------------------------------------- namespace operations


def test_session_folder_operations(cli: Cli, nfs_server, served: Served, tmp_path: Path) -> None:
    """CREATE's three modes, MKDIR, SYMLINK, READLINK, RENAME, REMOVE, RMDIR as RFC 1813 says."""
    _, _, srv = served
    with nc.NfsClient(srv.port) as c:
        sdir = c.walk(c.root(), "recover/s1")
        status, a = c.create(sdir, "a.vmx", nc.UNCHECKED)
        assert status == nc.OK
        assert c.write(a, 0, b"hello", nc.FILE_SYNC)[0] == nc.OK
        status, again = c.create(sdir, "a.vmx", nc.UNCHECKED)  # UNCHECKED: the existing file
        assert (status, again) == (nc.OK, a) and c.read(a, 0, 10)[1] == b"hello"
        assert c.create(sdir, "a.vmx", nc.UNCHECKED, size=0) == (nc.OK, a)  # with a size: truncated
        assert c.read(a, 0, 10)[1] == b""
        assert c.create(sdir, "a.vmx", nc.GUARDED)[0] == nc.EXIST
        assert c.create(sdir, "disk.raw", nc.GUARDED)[0] == nc.EXIST  # a disk of the session
        v1, v2 = b"verifier", b"another!"
        status, x = c.create(sdir, "x.lck", nc.EXCLUSIVE, verf=v1)
        assert status == nc.OK
        assert c.create(sdir, "x.lck", nc.EXCLUSIVE, verf=v1) == (nc.OK, x)  # a retransmission
        assert c.create(sdir, "x.lck", nc.EXCLUSIVE, verf=v2)[0] == nc.EXIST

        status, d = c.mkdir(sdir, "logs")
        assert status == nc.OK and c.mkdir(sdir, "logs")[0] == nc.EXIST
        assert c.create(d, "vmware.log")[0] == nc.OK
        status, link = c.symlink(sdir, "escape", "/etc")
        assert status == nc.OK and c.readlink(link) == (nc.OK, "/etc")
        assert c.lookup(link, "passwd")[0] == nc.NOTDIR  # the server never follows a symlink
        assert c.lookup(sdir, "../../..")[0] == nc.ACCES  # one component only
        assert c.lookup(sdir, "..") == (nc.OK, c.walk(c.root(), "recover"))

        assert c.remove(sdir, "logs", nc.RMDIR) == nc.NOTEMPTY
        assert c.rename(sdir, "logs", sdir, "old-logs") == nc.OK
        assert c.getattr(d)[0] == nc.OK  # a directory's handle survives its rename
        assert c.remove(c.walk(sdir, "old-logs"), "vmware.log") == nc.OK
        assert c.remove(sdir, "old-logs", nc.RMDIR) == nc.OK
        assert c.remove(sdir, "disk.raw") == nc.PERM  # disks go with 'recover stop' only
        assert c.remove(sdir, "escape") == nc.OK
        status, entries, _, eof = c.readdir(sdir)
        assert status == nc.OK and eof
        assert sorted(e[0] for e in entries) == sorted(
            [".", "..", "a.vmx", "x.lck", "disk.raw", "disk.vmdk", "disk-flat.vmdk", "disk.vhd"]
        )
        # '..' of the export's root is the root: no lookup leaves the export
        root = c.root()
        assert c.lookup(root, "..") == (nc.OK, root)
        # MOUNT gives folders below the export too, never outside it or through a file
        assert c.mnt("/vmrecover/recover/s1") == (0, sdir)
        assert c.mnt("/")[0] == 13 and c.mnt("/vmrecover/../etc")[0] == 13
        assert c.mnt("/vmrecover/recover/s1/disk.raw")[0] == 20
        assert c.mnt("/vmrecover/nothing")[0] == 2


def test_readdir_pages_and_cookie_verifier(cli: Cli, nfs_server, served: Served, tmp_path: Path) -> None:
    """Large folders come in pages; a cookie from before a change is NFS3ERR_BAD_COOKIE, not a wrong page."""
    _, _, srv = served
    with nc.NfsClient(srv.port) as c:
        sdir = c.walk(c.root(), "recover/s1")
        for i in range(300):
            assert c.create(sdir, f"file-{i:04d}.log")[0] == nc.OK
        for plus in (False, True):
            names: list[str] = []
            cookie, verf, eof, pages = 0, bytes(8), False, 0
            while not eof:
                status, entries, verf, eof = c.readdir(sdir, cookie, verf, count=2048, plus=plus)
                assert status == nc.OK and entries
                names += [e[0] for e in entries]
                cookie = entries[-1][2]
                pages += 1
            assert pages > 3 and len(names) == len(set(names)) == 300 + 2 + 4
        status, entries, verf, eof = c.readdir(sdir, 0, bytes(8), count=2048)
        assert c.create(sdir, "new-file")[0] == nc.OK
        assert c.readdir(sdir, entries[-1][2], verf, count=2048)[0] == nc.BAD_COOKIE
        assert c.readdir(sdir, 0, bytes(8), count=40)[0] == nc.TOOSMALL
    # libnfs pages through the same folder correctly
    listing = _tool("nfs-ls", srv.url("recover/s1")).stdout.decode().splitlines()
    assert sum("file-" in line for line in listing) == 300


def test_handles_survive_a_restart_and_go_stale(cli: Cli, nfs_server, served: Served, tmp_path: Path) -> None:
    """Handles are inode + generation: valid after a restart, STALE once their object is gone, even
    when the host filesystem reuses the inode number; forged ones are BADHANDLE or STALE."""
    img, point, srv = served
    with nc.NfsClient(srv.port) as c:
        root = c.root()
        bview = c.walk(root, f"vms/vm1/{point}/disk.raw")
        sview = c.walk(root, "recover/s1/disk.raw")
        sdir = c.walk(root, "recover/s1")
        status, upper = c.create(sdir, "a.nvram")
        assert status == nc.OK and c.write(upper, 0, b"nvram", nc.FILE_SYNC)[0] == nc.OK
    srv.stop()
    srv2: NfsServer = nfs_server()
    with nc.NfsClient(srv2.port) as c:
        assert c.read(bview, 0, 4096)[1] == img.read_bytes()[:4096]
        assert c.read(sview, 0, 4096)[1] == img.read_bytes()[:4096]
        assert c.read(upper, 0, 100)[1] == b"nvram"
        # delete and recreate files until the host filesystem hands the old inode number out again
        old_ino = c.getattr(upper)[1]["fileid"]  # type: ignore[index]
        assert c.remove(sdir, "a.nvram") == nc.OK
        assert c.getattr(upper)[0] == nc.STALE
        reused = False
        for i in range(50):
            status, fh = c.create(sdir, f"n{i}")
            if c.getattr(fh)[1]["fileid"] == old_ino:  # type: ignore[index]
                reused = True
                assert fh != upper
                break
        assert c.getattr(upper)[0] == nc.STALE and c.read(upper, 0, 10)[0] == nc.STALE
        if not reused:
            print("the host filesystem did not reuse the inode number; generation check not exercised")
        assert c.getattr(b"not a handle")[0] == nc.BADHANDLE
        assert c.getattr(bytes(28))[0] == nc.BADHANDLE
        forged = bview[:12] + (int.from_bytes(bview[12:20], "big") ^ 1 << 30).to_bytes(8, "big") + bview[20:]
        assert c.getattr(forged)[0] == nc.STALE
        other_fs = bview[:4] + bytes(8) + bview[12:]
        assert c.getattr(other_fs)[0] == nc.STALE
    cli.run("recover", "stop", "s1")
    with nc.NfsClient(srv2.port) as c:
        deadline = time.monotonic() + 3  # the server re-reads the session list at most every 0.5 s
        while c.getattr(sview)[0] == nc.OK and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.getattr(sview)[0] == nc.STALE
        assert c.read(sview, 0, 10)[0] == nc.STALE
        assert c.getattr(bview)[0] == nc.OK


def test_corrupt_chunk_is_an_io_error_never_wrong_bytes(cli: Cli, nfs_server, tmp_path: Path) -> None:
    """A damaged chunk reads NFS3ERR_IO in the backup and session views (twice: the error is not
    cached as data), nfs-cat fails instead of copying wrong bytes, every other range reads exactly,
    the server keeps serving and its log names the chunk."""
    data = chunky_image(tmp_path / "disk.raw", 64)
    point = cli.json("backup", "--vm", "vm1", tmp_path / "disk.raw", "--format", "raw")["point"]
    cli.run("recover", "start", "vm1", "--name", "s1")
    digest, _ = corrupt_chunk(cli.repo, data[40 * CHUNK : 41 * CHUNK])
    srv: NfsServer = nfs_server()
    with nc.NfsClient(srv.port) as c:
        for path in (f"vms/vm1/{point}/disk.raw", "recover/s1/disk.raw"):
            fh = c.walk(c.root(), path)
            for _ in range(2):
                assert c.read(fh, 40 * CHUNK + 100, 1000)[0] == 5  # NFS3ERR_IO
            for i in (0, 2, 39, 41, 63):
                assert c.read(fh, i * CHUNK, CHUNK)[1] == data[i * CHUNK : (i + 1) * CHUNK], (path, i)
    res = _tool("nfs-cat", srv.url(f"vms/vm1/{point}/disk.raw"), check=False)
    assert res.returncode != 0 and len(res.stdout) <= 40 * CHUNK
    assert res.stdout == data[: len(res.stdout)]
    assert _tool("nfs-ls", srv.url()).returncode == 0  # still serving
    log = srv.stop()
    assert digest in log and "Traceback" not in log


def test_serve_errors(cli: Cli, nfs_server) -> None:
    """A taken port exits 4 naming the fix; a bad --allow, a --listen that is not an IP address (a
    name could resolve to several) or not one of this machine's exits 6; none leaves a server behind."""
    srv: NfsServer = nfs_server()
    res = cli.run("nfs", "serve", "--port", str(srv.port), check=False, timeout=60)
    assert_clean_error(res, 4, "port .* taken", "--port")
    res = cli.run("nfs", "serve", "--port", "0", "--allow", "10.0.0.0/33", check=False, timeout=60)
    assert_clean_error(res, 6, "--allow", "10.0.0.0/33")
    res = cli.run("nfs", "serve", "--port", "0", "--listen", "localhost", check=False, timeout=60)
    assert_clean_error(res, 6, "--listen", "not an IP address")
    res = cli.run("nfs", "serve", "--port", "0", "--listen", "192.0.2.1", check=False, timeout=60)
    assert_clean_error(res, 6, "cannot listen on 192.0.2.1")


# --------------------------------------------------------------------------- who may connect


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _refused_at(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_listens_on_the_address_given(cli: Cli, nfs_server, tmp_path: Path) -> None:
    """Without --allow only this machine may connect, so the export listens on 127.0.0.1 only; with
    --listen ADDR the NFS, MOUNT and portmapper listeners all bind exactly ADDR (127.0.0.2 here:
    nothing answers on 127.0.0.1), and libnfs finds the export there through the portmapper."""
    _backup(cli, tmp_path)
    default: NfsServer = nfs_server()
    assert default.info["address"] == "127.0.0.1"
    assert _refused_at("127.0.0.2", default.port)
    default.stop()

    mount_port = _free_port("127.0.0.2")
    srv: NfsServer = nfs_server("--listen", "127.0.0.2", "--allow", "127.0.0.0/8", "--mount-port",
                                str(mount_port), portmapper=True)  # fmt: skip
    assert (srv.info["address"], srv.mount_port, srv.info["portmap_port"]) == ("127.0.0.2", mount_port, 111)
    for prog, vers, port in ((nc.NFS, 3, srv.port), (nc.MOUNT, 3, mount_port), (nc.PMAP, 2, 111)):
        assert _refused_at("127.0.0.1", port), port
        with nc.RpcClient(port, host="127.0.0.2", timeout=10) as c:
            r = c.call(prog, vers, 0)
            assert (r.accepted, r.stat) == (True, 0), (port, r)
    listing = _tool("nfs-ls", "nfs://127.0.0.2/vmrecover").stdout.decode()
    assert "vms" in listing and "recover" in listing


def test_libnfs_of_a_normal_user_is_refused(cli: Cli, nfs_server, served: Served) -> None:
    """libnfs binds a reserved source port when it runs as root (every other test here relies on it)
    and an ordinary one otherwise: a normal user's nfs-ls is refused by default, and the server's log
    says why; with --insecure-ports the same user lists and reads the export."""
    img, point, srv = served
    as_nobody = ["runuser", "-u", "nobody", "--"]
    res = _tool(*as_nobody, "nfs-ls", srv.url(), check=False)
    assert res.returncode != 0 and b"recover" not in res.stdout, res
    log = srv.stop()
    assert "not a privileged port" in log and "--insecure-ports" in log, log

    insecure: NfsServer = nfs_server("--insecure-ports")
    listing = _tool(*as_nobody, "nfs-ls", insecure.url()).stdout.decode()
    assert "vms" in listing and "recover" in listing
    data = _tool(*as_nobody, "nfs-cat", insecure.url(f"vms/vm1/{point}/disk.raw")).stdout
    assert hashlib.sha256(data).hexdigest() == sha256_file(img)


def test_qemu_reads_on_after_the_idle_timeout(cli: Cli, nfs_server, tmp_path: Path) -> None:
    """An idle connection is closed (--idle-timeout 1 here); qemu's nfs:// driver (libnfs) reconnects,
    from a reserved port again, and reads on with the right bytes."""
    img = tmp_path / "pattern.raw"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\xab" * 65536)
        f.seek(2 * MiB)
        f.write(b"\xcd" * 65536)
    point = cli.json("backup", "--vm", "vm1", img, "--format", "raw")["point"]
    srv: NfsServer = nfs_server("--idle-timeout", "1", "--log-level", "info", portmapper=True)
    url = f"nfs://127.0.0.1/vmrecover/vms/vm1/{point}/pattern.raw"
    res = _tool("qemu-io", "-r", "-f", "raw", "-c", "read -P 0xab 0 64k", "-c", "sleep 2500",
                "-c", "read -P 0xcd 2M 64k", url)  # fmt: skip
    out = res.stdout.decode()
    assert out.count("read 65536/65536 bytes") == 2 and "fail" not in out.lower(), out
    log = srv.stop()
    assert "idle for 1 s" in log, log


# --------------------------------------------------------------------------- qemu over nfs://


def test_qemu_img_reads_views_over_nfs(cli: Cli, nfs_server, tmp_path: Path) -> None:
    """qemu's nfs:// driver (found through our portmapper on port 111) reads the raw, flat vmdk and
    vhd views as the original disk.  (A vmdk descriptor over nfs:// is not among them: qemu 7.2's nfs
    driver resolves the extent's relative name against the descriptor's own path, not its folder.)"""
    img, point = _backup(cli, tmp_path, size=5 * MiB + 4096)
    nfs_server(portmapper=True)
    for view, fmt in (("disk.raw", "raw"), ("disk-flat.vmdk", "raw"), ("disk.vhd", "vpc")):
        out = tmp_path / f"{view}.out"
        url = f"nfs://127.0.0.1/vmrecover/vms/vm1/{point}/{view}"
        _tool("qemu-img", "convert", "-f", fmt, "-O", "raw", url, str(out))
        assert sha256_file(out) == sha256_file(img), view


@needs_fuse
def test_guest_boots_over_nfs_from_a_session(
    cli: Cli, nfs_server, mounted: Mounted, guest_image: Path, tmp_path: Path
) -> None:
    """qemu boots the test guest over nfs:// from a session (instant recovery on a hypervisor's NFS
    datastore); its writes land in the session's delta, which FUSE serves at the same time with the
    same bytes; the backup never changes."""
    backup_sha = sha256_file(guest_image)
    point = cli.json("backup", "--vm", "guest", guest_image, "--format", "raw")["point"]
    cli.run("recover", "start", "guest", "--name", "rescue")
    srv: NfsServer = nfs_server(portmapper=True)
    url = "nfs://127.0.0.1/vmrecover/recover/rescue/guest.raw"
    result = boot(None, serial_log=tmp_path / "serial.log", timeout=BOOT_TIMEOUT,
                  drive_args=f"file={url},format=raw,if=virtio,cache=none")  # fmt: skip
    assert result.boots_seen == [1] and result.powered_off
    assert cli.json("recover", "list")[0]["written"]["guest"] > 0
    # FUSE and NFS serve the same session at once and see the same bytes
    fuse_disk = mounted.session_dir("rescue") / "guest.raw"
    assert _cat_sha(srv.url("recover/rescue/guest.raw")) == sha256_file(fuse_disk)
    assert len(read_boot_log(fuse_disk)) == 1  # the guest's boot log line, read through FUSE
    with open(fuse_disk, "r+b") as f:  # a write through FUSE is seen over NFS, and back
        f.seek(100 * MiB)
        f.write(b"via-fuse")
    with nc.NfsClient(srv.port) as c:
        fh = c.walk(c.root(), "recover/rescue/guest.raw")
        assert c.read(fh, 100 * MiB, 8)[1] == b"via-fuse"
        assert c.write(fh, 101 * MiB, b"via-nfs!", nc.FILE_SYNC)[0] == nc.OK
    with open(fuse_disk, "rb") as f:
        f.seek(101 * MiB)
        assert f.read(8) == b"via-nfs!"
    assert _cat_sha(srv.url(f"vms/guest/{point}/guest.raw")) == backup_sha
    assert sha256_file(mounted.point_dir("guest", point) / "guest.raw") == backup_sha
