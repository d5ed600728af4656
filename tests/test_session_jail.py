"""A recovery session's folder is a jail: nothing a client does there reaches a host file outside it.

Clients (a hypervisor over NFS, anything on the FUSE mount) may create symlinks pointing anywhere and
rename folders while the server works; the server must never follow them (vmrecover.beneath), must not
create setuid/setgid files or device nodes, and the FUSE mount is nosuid,nodev.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from nfs_export.xdr import Packer
from tests import nfsclient as nc
from tests.conftest import Cli, Mounted, random_image
from vmrecover.repo.repository import Repository
from vmrecover.vfs.cache import ChunkCache
from vmrecover.vfs.tree import RECOVER_INO, Vfs

MiB = 1 << 20
VICTIM = b"host file that no client may touch\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    d = tmp_path / "host"
    d.mkdir()
    v = d / "victim"
    v.write_bytes(VICTIM)
    os.chmod(v, 0o640)
    return v


def assert_intact(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM
    st = victim.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == os.getuid()


@pytest.fixture
def session(cli: Cli, tmp_path: Path) -> str:
    cli.run("backup", "--vm", "vm1", random_image(tmp_path / "disk.raw", 2 * MiB, seed=3))
    cli.run("recover", "start", "vm1", "--name", "s1")
    return "s1"


def _setattr(c: nc.NfsClient, fh: bytes, *, mode: int | None = None, size: int | None = None) -> int:
    p = Packer()
    p.opaque(fh)
    c._sattr(p, mode=mode, size=size)
    p.bool(False)  # no guard
    return c.nfs(nc.SETATTR, p)[0]


def _mode(c: nc.NfsClient, fh: bytes) -> int:
    status, attr = c.getattr(fh)
    assert status == nc.OK and attr is not None
    return attr["mode"]


def test_nfs_symlink_to_a_host_file_is_never_followed(
    cli: Cli, session: str, nfs_server, victim: Path
) -> None:
    """The reported attack: SYMLINK in recover/<session>/ to a host file, then SETATTR size=0 on it."""
    srv = nfs_server()
    with nc.NfsClient(srv.port) as c:
        sdir = c.walk(c.root(), f"recover/{session}")
        status, link = c.symlink(sdir, "evil", str(victim))
        assert status == nc.OK
        assert _setattr(c, link, size=0) == nc.INVAL  # a symlink has no size to set: not its target's
        assert _setattr(c, link, mode=0o777) == nc.OK  # mode of a symlink: ignored, as nfsd does
        assert c.write(link, 0, b"owned")[0] == nc.INVAL
        # a symlink to the host folder cannot be used as a folder
        status, dlink = c.symlink(sdir, "evil-dir", str(victim.parent))
        assert status == nc.OK
        assert c.create(dlink, "new")[0] == nc.NOTDIR
        assert c.remove(dlink, "victim") == nc.NOTDIR
        assert c.readlink(link) == (nc.OK, str(victim))
    assert_intact(victim)
    assert sorted(os.listdir(victim.parent)) == ["victim"]


def test_nfs_session_files_keep_no_setuid_bits_and_no_devices(cli: Cli, session: str, nfs_server) -> None:
    srv = nfs_server()
    with nc.NfsClient(srv.port) as c:
        sdir = c.walk(c.root(), f"recover/{session}")
        status, fh = c.create(sdir, "suid", mode=0o4755)
        assert status == nc.OK
        assert _mode(c, fh) & 0o7777 == 0o755
        assert _setattr(c, fh, mode=0o6777) == nc.OK
        assert _mode(c, fh) & 0o7777 == 0o777
        p = Packer()
        p.opaque(sdir)
        p.string("sgid-dir")
        c._sattr(p, 0o2775)
        status, u = c.nfs(nc.MKDIR, p)
        assert status == nc.OK and u.bool()
        assert _mode(c, u.opaque(64)) & 0o7777 == 0o775
        for ftype in (3, 4, 6, 7):  # NF3BLK, NF3CHR, NF3SOCK, NF3FIFO
            p = Packer()
            p.opaque(sdir)
            p.string(f"node{ftype}")
            p.u32(ftype)
            assert c.nfs(11, p)[0] == nc.NOTSUPP  # MKNOD
    upper = next((cli.repo / "sessions").iterdir()) / "upper"
    assert sorted(os.listdir(upper)) == ["sgid-dir", "suid"]
    assert stat.S_IMODE((upper / "suid").stat().st_mode) == 0o777


def test_fuse_session_files_keep_no_setuid_bits_no_devices_and_mount_is_nosuid_nodev(
    cli: Cli, mounted: Mounted, session: str
) -> None:
    folder = mounted.session_dir(session)
    fd = os.open(folder / "tool", os.O_CREAT | os.O_WRONLY, 0o6755)
    os.close(fd)
    assert stat.S_IMODE((folder / "tool").stat().st_mode) == 0o755
    os.chmod(folder / "tool", 0o4777)
    assert stat.S_IMODE((folder / "tool").stat().st_mode) == 0o777
    (folder / "d").mkdir(mode=0o2755)
    assert stat.S_IMODE((folder / "d").stat().st_mode) == 0o755
    with pytest.raises(OSError):
        os.mkfifo(folder / "fifo")
    with pytest.raises(OSError):
        os.mknod(folder / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert not (folder / "fifo").exists() and not (folder / "null").exists()
    with open("/proc/self/mounts") as f:
        line = next(ln for ln in f if ln.split()[1] == str(mounted.path.resolve()))
    options = line.split()[3].split(",")
    assert "nosuid" in options and "nodev" in options, line


# --------------------------------------------------------------------------- races, at the model
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(-100, bytes(a), -100, bytes(b), RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_folder_swapped_for_a_symlink_during_operations_never_redirects(
    cli: Cli, session: str, victim: Path
) -> None:
    """A client's folder is swapped, over and over, with a symlink to a host folder holding a file of
    the same name, while the server truncates, chmods, writes and lists the client's file: every
    operation acts on the client's file or fails; the host file never changes."""
    (victim.parent / "f").write_bytes(VICTIM)
    os.chmod(victim.parent / "f", 0o640)
    repo = Repository.open(cli.repo)
    cache = ChunkCache(repo.chunks, 8 * MiB)
    vfs = Vfs(repo, cache)
    try:
        sess = vfs.lookup(RECOVER_INO, session)
        d = vfs.mkdir(sess.ino, "d", 0o755)
        f = vfs.create(d.ino, "f", 0o644)
        vfs.write(f.ino, 0, b"client data")
        upper = cli.repo / "sessions" / vfs.sessions()[session].id / "upper"
        (upper / "swap").symlink_to(victim.parent)
        stop = threading.Event()

        def swapper() -> None:
            while not stop.is_set():
                _exchange(upper / "d", upper / "swap")

        t = threading.Thread(target=swapper, daemon=True)
        t.start()
        deadline = time.monotonic() + 3
        done = 0
        try:
            while time.monotonic() < deadline:
                for op in (
                    lambda: vfs.setattr(f.ino, size=0),
                    lambda: vfs.setattr(f.ino, mode=0o777),
                    lambda: vfs.write(f.ino, 0, b"XXXXXXXX"),
                    lambda: vfs.readdir(d.ino),
                    lambda: vfs.setattr(f.ino, mtime_ns=0),
                    lambda n=done: vfs.create(d.ino, f"n{n}", 0o644),
                ):
                    try:
                        op()
                    except OSError as exc:
                        assert exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EEXIST), exc
                    done += 1
        finally:
            stop.set()
            t.join()
        assert done > 1000
    finally:
        vfs.close()
        cache.close()
        repo.close()
    assert (victim.parent / "f").read_bytes() == VICTIM
    assert stat.S_IMODE((victim.parent / "f").stat().st_mode) == 0o640
    assert sorted(os.listdir(victim.parent)) == ["f", "victim"]
    assert_intact(victim)
