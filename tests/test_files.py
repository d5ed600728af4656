"""Single-file restore end to end: ``vmrecover files ...`` against real guest disks in libguestfs.

One repository per module and one file-restore service for it (appliances take ~20 s to start under
TCG; the service keeps them between commands, which is itself under test here).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cli, assert_clean_error, random_image, sha256_file

try:
    import guestfs  # noqa: F401

    HAVE_GUESTFS = True
except ImportError:
    HAVE_GUESTFS = False
pytestmark = pytest.mark.skipif(not HAVE_GUESTFS, reason="needs libguestfs (make setup)")


@pytest.fixture(scope="module")
def frepo(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Cli]:
    """A repository holding the bootable test guest as VM 'web01' and a disk of random bytes as
    'junk'; the file-restore service is stopped (and its datastore unmounted) at the end."""
    root = tmp_path_factory.mktemp("files")
    c = Cli(root / "repo", env={"VMRECOVER_FILES_IDLE": "600"})
    c.run("init", "--chunk-size", "1M")
    c.run("backup", "--vm", "web01", guest_image, "--format", "raw")
    c.run("backup", "--vm", "junk", random_image(root / "junk.raw", 8 << 20, seed=5), "--format", "raw")
    yield c
    stop_service(c)


def stop_service(c: Cli) -> None:
    """'files stop': appliances closed, the service's datastore unmounted, its socket gone."""
    c.run("files", "stop", timeout=120)
    assert not (c.repo / "run" / "files" / "files.sock").exists()
    assert not os.path.ismount(c.repo / "run" / "files" / "mnt")


def test_inspect_ls_and_reuse(frepo: Cli) -> None:
    """inspect names the filesystems; the second command reuses the appliance (no 20 s start)."""
    doc = frepo.json("files", "inspect", "web01")
    fss = {f["device"]: f for f in doc["filesystems"]}
    assert fss["/dev/sda1"]["type"] == "vfat" and fss["/dev/sda2"]["type"] == "ext4"
    assert fss["/dev/sda2"]["mountpoint"] == "/sda2"  # no OS recognised: mounted by device
    started = time.monotonic()
    listing = frepo.json("files", "ls", "web01", "/sda2/etc")
    assert time.monotonic() - started < 5, "the second command started a new appliance"
    names = {e["path"]: e for e in listing["entries"]}
    assert names["/sda2/etc/hostname"]["kind"] == "file" and listing["count"] == len(names)
    # '..' cannot climb out of the guest's root
    assert frepo.json("files", "ls", "web01", "/sda2/../../../sda2/etc")["path"] == "/sda2/etc"


def test_get_files_and_folders_keep_content_mode_mtime(frepo: Cli, tmp_path: Path, guest_image: Path) -> None:
    """Files and whole folders come out with their bytes, modes and mtimes; nothing is overwritten
    without --overwrite, and a missing path writes nothing at all."""
    out = tmp_path / "out"
    out.mkdir()
    doc = frepo.json("files", "get", "web01", "/sda2/etc/hostname", "/sda2/sbin", "--to", out)
    assert [w["kind"] for w in doc["written"]] == ["file", "dir"]
    ls = {e["path"]: e for e in frepo.json("files", "ls", "web01", "/sda2/etc")["entries"]}
    hostname = out / "hostname"
    assert f"{stat.S_IMODE(hostname.stat().st_mode):04o}" == ls["/sda2/etc/hostname"]["mode"]
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hostname.stat().st_mtime)) == ls[
        "/sda2/etc/hostname"]["mtime"]  # fmt: skip
    assert hostname.read_bytes().strip() != b""
    assert (out / "sbin" / "init").is_file() and os.access(out / "sbin" / "init", os.X_OK)

    before = hostname.read_bytes()
    hostname.write_bytes(b"mine")
    res = frepo.run("files", "get", "web01", "/sda2/etc/hostname", "--to", out, check=False)
    assert_clean_error(res, 6, "exists", "--overwrite")
    assert hostname.read_bytes() == b"mine"
    frepo.run("files", "get", "web01", "/sda2/etc/hostname", "--to", out, "--overwrite")
    assert hostname.read_bytes() == before

    res = frepo.run("files", "get", "web01", "/sda2/etc/hostname", "/nope/missing", "--to", out / "new",
                    check=False)  # fmt: skip
    assert_clean_error(res, 5, "destination")
    (out / "new").mkdir()
    two = ["/sda2/etc/vmrecover-guest", "/nope/missing"]
    res = frepo.run("files", "get", "web01", *two, "--to", out / "new", check=False)
    assert_clean_error(res, 5, "/nope/missing", "does not exist")
    assert os.listdir(out / "new") == []  # all or nothing: the first path was not written either


def test_get_as_tar(frepo: Cli, tmp_path: Path) -> None:
    doc = frepo.json("files", "get", "web01", "/sda2/etc", "/sda2/sbin/init", "--to", tmp_path, "--tar")
    archive = Path(doc["written"][0]["to"])
    with tarfile.open(archive) as tf:
        names = tf.getnames()
    assert "etc/hostname" in names and "init" in names and "etc" in names


def test_a_disk_without_filesystems_is_a_clear_error(frepo: Cli) -> None:
    res = frepo.run("files", "ls", "junk", check=False, timeout=300)
    assert_clean_error(res, 5, "junk@", "no filesystem")


def test_unknown_vm_and_point(frepo: Cli) -> None:
    assert_clean_error(frepo.run("files", "inspect", "nosuchvm", check=False), 5, "no VM named")
    assert_clean_error(frepo.run("files", "ls", "web01@ffffffff", check=False), 5, "no restore point")


def test_works_while_a_session_of_the_point_runs(frepo: Cli, tmp_path: Path, guest_image: Path) -> None:
    """A recovery session writing to the same point's disk changes nothing the file restore sees."""
    session = frepo.json("recover", "start", "web01", "--name", "busy")
    try:
        delta = Path(session["path"]) / "disks" / "guest.delta"
        with open(delta, "r+b") as f:  # the session's disk is overwritten at the start
            f.write(b"\xff" * (4 << 20))
        out = tmp_path / "o"
        out.mkdir()
        frepo.run("files", "get", "web01", "/sda2/etc/hostname", "--to", out)
        assert (out / "hostname").stat().st_size > 0
    finally:
        frepo.run("recover", "stop", "busy")
    assert sha256_file(guest_image)  # the image the point came from is untouched by all this


def test_service_closes_idle_appliances_and_exits(tmp_path: Path, guest_image: Path) -> None:
    """With a short idle time the service closes its appliance, unmounts its datastore and exits."""
    c = Cli(tmp_path / "repo", env={"VMRECOVER_FILES_IDLE": "3"})
    c.run("init", "--chunk-size", "1M")
    c.run("backup", "--vm", "web01", guest_image, "--format", "raw")
    try:
        c.json("files", "inspect", "web01")
        sock = c.repo / "run" / "files" / "files.sock"
        assert sock.exists()
        deadline = time.monotonic() + 60
        while sock.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not sock.exists(), "the service did not exit when idle"
        assert not os.path.ismount(c.repo / "run" / "files" / "mnt")
    finally:
        stop_service(c)
        shutil.rmtree(c.repo / "run" / "files" / "mnt", ignore_errors=True)


# --------------------------------------------------------------------------- real guest layouts
def _backup_image(c: Cli, vm: str, info: Any) -> str:
    return c.json("backup", "--vm", vm, *info.paths, "--format", "raw")["point"]


def _check_copied(out: Path, guest_root: str, info: Any) -> int:
    """Every file, mode, mtime and symlink *info* says is under *guest_root* is at *out* the same."""
    checked = 0
    for gp, data in info.files.items():
        if gp.startswith(guest_root + "/"):
            host = out / gp[len(guest_root) + 1 :]
            assert host.read_bytes() == data, gp
            checked += 1
    for gp, target in info.symlinks.items():
        if gp.startswith(guest_root + "/"):
            assert os.readlink(out / gp[len(guest_root) + 1 :]) == target, gp  # copied as a link
            checked += 1
    for gp, mode in info.modes.items():
        if gp.startswith(guest_root + "/") and gp not in info.symlinks:
            assert stat.S_IMODE((out / gp[len(guest_root) + 1 :]).lstat().st_mode) == mode, gp
    for gp, mtime in info.mtimes.items():
        if gp.startswith(guest_root + "/") and gp not in info.symlinks:
            assert int((out / gp[len(guest_root) + 1 :]).lstat().st_mtime) == mtime, gp
    return checked


def test_lvm_xfs_guest_paths_as_the_guest_sees_them(frepo: Cli, lvm_image: Any, tmp_path: Path) -> None:
    """An LVM + xfs Linux guest: inspection finds the OS and mounts /boot and / where the guest does;
    a folder comes out recursively with modes, mtimes and symlinks (also ones pointing outside the
    guest's filesystem, as links); a 10 000-entry folder is listed completely."""
    _backup_image(frepo, "lin", lvm_image)
    doc = frepo.json("files", "inspect", "lin")
    (os_,) = doc["operating_systems"]
    assert (os_["type"], os_["distro"]) == ("linux", "debian")
    assert set(os_["mountpoints"]) == set(lvm_image.mountpoints)
    mounted = {f["mountpoint"] for f in doc["filesystems"] if f["mountpoint"]}
    assert {"/", "/boot"} <= mounted
    out = tmp_path / "out"
    out.mkdir()
    frepo.run("files", "get", "lin", "/etc/hosts", "/boot", "/home/alice", "--to", out)
    assert (out / "hosts").read_bytes() == lvm_image.files["/etc/hosts"]
    assert _check_copied(out / "alice", "/home/alice", lvm_image) >= 4
    assert _check_copied(out / "boot", "/boot", lvm_image) >= 1
    for many, n in lvm_image.bulk.items():
        listing = frepo.json("files", "ls", "lin", many)
        assert listing["count"] == n == len({e["path"] for e in listing["entries"]})


def test_ntfs_windows_paths(frepo: Cli, ntfs_image: Any, tmp_path: Path) -> None:
    """NTFS: C:\\ paths with backslashes and in any case reach the file, as on Windows."""
    _backup_image(frepo, "win", ntfs_image)
    gp = next(p for p in ntfs_image.files if p.lower().endswith("report.txt"))
    for spelling in ("C:" + gp.replace("/", "\\"), "c:" + gp.upper().replace("/", "\\"), gp.lower()):
        out = tmp_path / str(abs(hash(spelling)))
        out.mkdir()
        doc = frepo.json("files", "get", "win", spelling, "--to", out)
        assert doc["written"][0]["guest_path"] == gp
        assert (out / posixpath.basename(gp)).read_bytes() == ntfs_image.files[gp]


def test_two_disk_vm(frepo: Cli, two_disk_image: Any, tmp_path: Path) -> None:
    """A VM whose /data is on its second disk: both disks of the point are opened together."""
    _backup_image(frepo, "pair", two_disk_image)
    data_paths = [p for p in two_disk_image.files if p.startswith("/data/")]
    assert data_paths
    frepo.run("files", "get", "pair", data_paths[0], "/etc/hosts", "--to", tmp_path)
    assert (tmp_path / posixpath.basename(data_paths[0])).read_bytes() == two_disk_image.files[data_paths[0]]


def test_disk_without_partition_table(frepo: Cli, bare_image: Any, tmp_path: Path) -> None:
    _backup_image(frepo, "bare", bare_image)
    gp, data = next(iter(bare_image.files.items()))
    frepo.run("files", "get", "bare", gp, "--to", tmp_path)
    assert (tmp_path / posixpath.basename(gp)).read_bytes() == data


def test_history_and_find_across_points(frepo: Cli, bare_image: Any, tmp_path: Path) -> None:
    """A file present, then changed, then deleted over three points: history says so with sizes and
    sha256; find lists the points that hold it."""
    from tests.testkit.fsimages import change_file

    disk = tmp_path / "bare.raw"
    subprocess.run(["cp", "--sparse=always", str(bare_image.paths[0]), str(disk)], check=True)
    gp = next(p for p in bare_image.files if p.count("/") > 1)  # a file in a folder
    p1 = frepo.json("backup", "--vm", "hist", disk, "--format", "raw")["point"]
    change_file(disk, gp, b"changed notes\n", mtime=1_700_000_000)
    p2 = frepo.json("backup", "--vm", "hist", disk, "--format", "raw")["point"]
    change_file(disk, gp, None)
    p3 = frepo.json("backup", "--vm", "hist", disk, "--format", "raw")["point"]
    rows = frepo.json("files", "history", "hist", gp)["points"]
    assert [r["point"] for r in rows] == [p1, p2, p3]
    assert rows[0]["change"] == "present" and rows[0]["size"] == len(bare_image.files[gp])
    assert rows[0]["sha256"] == hashlib.sha256(bare_image.files[gp]).hexdigest()
    assert rows[1]["change"].startswith("changed") and "sha256" in rows[1]["change"]
    assert rows[1]["sha256"] == hashlib.sha256(b"changed notes\n").hexdigest()
    assert rows[2]["change"] == "deleted"
    found = frepo.json("files", "find", "hist", posixpath.basename(gp))
    assert sorted(e["point"] for e in found["entries"]) == sorted([p1, p2])
    assert {e["path"] for e in found["entries"]} == {gp}


def test_files_mount(frepo: Cli, lvm_image: Any, tmp_path: Path) -> None:
    """The guest's filesystems, read-only, at a host mount point, until 'files umount'."""
    _backup_image(frepo, "linm", lvm_image)
    mp = tmp_path / "guest"
    mp.mkdir()
    frepo.run("files", "mount", "linm", mp)
    try:
        assert (mp / "etc" / "hosts").read_bytes() == lvm_image.files["/etc/hosts"]
        with pytest.raises(OSError):
            (mp / "etc" / "new").write_text("x")
    finally:
        frepo.run("files", "umount", mp)
    assert not os.path.ismount(mp)
