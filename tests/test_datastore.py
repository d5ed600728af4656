"""The FUSE datastore and instant recovery, end to end: real mounts, real qemu boots, real images.

Fault cases (corrupt chunks, killed daemons, busy unmounts, fio) are in test_datastore_faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path

import pytest

from tests.testkit.guest import MiB, boot, read_boot_log
from vmrecover.vfs.formats import vhd_footer, vhd_geometry

from .conftest import Cli, Mounted, needs_fuse, random_image, sha256_file

BOOT_TIMEOUT = 180


def _run(*argv: str | Path) -> str:
    import subprocess

    return subprocess.run(list(map(str, argv)), check=True, capture_output=True, text=True).stdout


# --------------------------------------------------------------------------- formats, no mount


def test_vhd_footer_is_what_qemu_reads(tmp_path: Path) -> None:
    """A raw file plus our footer is a fixed VHD of exactly the disk's size for qemu (creator 'tap')."""
    from datetime import UTC, datetime

    size = 37 * MiB + 4096  # not a CHS multiple: qemu must take the size from the footer
    img = tmp_path / "d.vhd"
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(vhd_footer(size, "p/d", datetime(2026, 1, 2, tzinfo=UTC)))
    info = json.loads(_run("qemu-img", "info", "-f", "vpc", "--output=json", img))
    assert info["virtual-size"] == size
    footer = img.read_bytes()[-512:]
    assert footer[:8] == b"conectix"
    stored = int.from_bytes(footer[64:68], "big")
    assert stored == ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF
    # the CHS geometry is the specification's, as qemu computes it for its own fixed VHDs
    ref = tmp_path / "ref.vhd"
    for mib in (127, 1024, 40000):
        _run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", ref, f"{mib}M")
        tail = _tail(ref)
        want = (int.from_bytes(tail[56:58], "big"), tail[58], tail[59])
        assert vhd_geometry(int.from_bytes(tail[48:56], "big")) == want
        ref.unlink()


def _tail(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-512, os.SEEK_END)
        return f.read()


# --------------------------------------------------------------------------- read-only views


@needs_fuse
def test_views_show_exact_bytes_and_metadata(cli: Cli, mounted: Mounted, tmp_path: Path) -> None:
    img = random_image(tmp_path / "web.raw", 24 * MiB + 512, seed=3)
    point = cli.json("backup", "--vm", "web", img, "--format", "raw")["point"]
    d = mounted.point_dir("web", point)
    names = sorted(os.listdir(d))
    assert names == ["vm.json", "web-flat.vmdk", "web.raw", "web.vhd", "web.vmdk"]
    assert sha256_file(d / "web.raw") == sha256_file(img)
    assert sha256_file(d / "web-flat.vmdk") == sha256_file(img)
    assert "Images are identical" in _run(
        "qemu-img", "compare", "-f", "raw", "-F", "vmdk", img, d / "web.vmdk"
    )
    assert "Images are identical" in _run("qemu-img", "compare", "-f", "raw", "-F", "vpc", img, d / "web.vhd")
    doc = json.loads((d / "vm.json").read_text())
    assert doc["vm"] == "web" and doc["point"] == point and doc["disks"][0]["size"] == img.stat().st_size
    assert os.readlink(mounted.path / "vms/web/latest") == point
    st = os.stat(d / "web.raw")
    assert stat.S_IMODE(st.st_mode) == 0o444 and st.st_size == img.stat().st_size
    with pytest.raises(OSError) as e, open(d / "web.raw", "r+b"):
        pass
    assert e.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path / "vms/web/000000000000")


@needs_fuse
def test_new_points_appear_and_inodes_are_stable(cli: Cli, mounted: Mounted, tmp_path: Path) -> None:
    """A backup taken while mounted shows up without remounting; inode numbers survive a remount."""
    img = random_image(tmp_path / "db.raw", 8 * MiB, seed=4)
    p1 = cli.json("backup", "--vm", "db", img, "--format", "raw")["point"]
    ino1 = os.stat(mounted.point_dir("db", p1) / "db.raw").st_ino
    with open(img, "r+b") as f:
        f.write(b"changed" * 100)
    p2 = cli.json("backup", "--vm", "db", img, "--format", "raw")["point"]
    deadline = time.monotonic() + 5
    while p2 not in os.listdir(mounted.path / "vms/db") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sorted(os.listdir(mounted.path / "vms/db")) == sorted([p1, p2, "latest"])
    assert os.readlink(mounted.path / "vms/db/latest") == p2
    assert sha256_file(mounted.point_dir("db", p2) / "db.raw") == sha256_file(img)
    mounted.unmount()
    cli.run("mount", mounted.path)
    assert os.stat(mounted.point_dir("db", p1) / "db.raw").st_ino == ino1


# --------------------------------------------------------------------------- instant recovery


@needs_fuse
def test_boot_from_backup_twice_then_migrate(
    cli: Cli, mounted: Mounted, guest_image: Path, tmp_path: Path
) -> None:
    """The guest boots from a session through the FUSE path; its second boot reads the first boot's
    write; the backup's bytes never change; migrate writes a standalone disk holding both boots."""
    backup_sha = sha256_file(guest_image)
    point = cli.json("backup", "--vm", "guest", guest_image, "--format", "raw")["point"]
    started = cli.json("recover", "start", "guest", "--name", "rescue")
    assert started["point"] == point and started["written"] == {"guest": 0}
    disk = mounted.session_dir("rescue") / "guest.raw"
    assert sorted(os.listdir(mounted.session_dir("rescue"))) == [
        "guest-flat.vmdk", "guest.raw", "guest.vhd", "guest.vmdk"
    ]  # fmt: skip
    assert os.access(disk, os.W_OK)

    serial = tmp_path / "serial1.log"
    res = cli.run(
        "recover", "boot", "rescue", "--serial", serial, "--timeout", str(BOOT_TIMEOUT), timeout=300
    )
    assert res.returncode == 0
    assert "VMRECOVER-GUEST-BOOT n=1" in serial.read_text()

    # The second boot goes through the testkit's own qemu runner, on the same FUSE file.
    second = boot(None, serial_log=tmp_path / "serial2.log", timeout=BOOT_TIMEOUT,
                  drive_args=f"file={disk},format=raw,if=virtio")  # fmt: skip
    assert second.boots_seen == [2] and second.powered_off

    assert sha256_file(mounted.point_dir("guest", point) / "guest.raw") == backup_sha
    listed = cli.json("recover", "list")
    assert [s["name"] for s in listed] == ["rescue"] and listed[0]["written"]["guest"] > 0

    migrated = tmp_path / "migrated.qcow2"
    cli.run("recover", "migrate", "rescue", "--to", migrated, "--format", "qcow2")
    as_raw = tmp_path / "migrated.raw"
    _run("qemu-img", "convert", "-O", "raw", migrated, as_raw)
    assert sha256_file(as_raw) == sha256_file(disk)
    assert len(read_boot_log(as_raw)) == 2

    # prune keeps a point a session uses; stop discards the session and lets it go
    cli.run("backup", "--vm", "guest", guest_image, "--format", "raw")
    pruned = cli.json("prune", "--keep-last", "1")
    assert point not in json.dumps(pruned)
    cli.run("recover", "stop", "rescue")
    assert cli.json("recover", "list") == []
    deadline = time.monotonic() + 5
    while "rescue" in os.listdir(mounted.path / "recover") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "rescue" not in os.listdir(mounted.path / "recover")
    assert point in json.dumps(cli.json("prune", "--keep-last", "1"))


@needs_fuse
def test_xenserver_sr_folder_shows_the_session_disks_as_the_nfs_sr_driver_expects(
    cli: Cli, mounted: Mounted, tmp_path: Path
) -> None:
    """The folder named by the session's SR UUID lists each disk as <VDI uuid>.raw (the same file as
    <disk>.raw: one overlay) beside the SR driver's own files; the driver's removal of a VDI file only
    hides it; the disks and the SR folder itself cannot be removed, renamed or shadowed."""
    import tomllib

    from vmrecover.vfs import srlayout

    image = random_image(tmp_path / "disk.img", 4 * MiB, seed=7)
    cli.json("backup", "--vm", "vm1", image, "--format", "raw")
    session = cli.json("recover", "start", "vm1", "--name", "s1")
    repo_id = tomllib.loads((cli.repo / "repo.toml").read_text())["repository"]["id"]
    sid = session["id"]
    top = mounted.session_dir("s1")
    sr = top / srlayout.sr_uuid(repo_id, sid)
    vdi = srlayout.vdi_file(repo_id, sid, "disk")
    assert not sr.exists()  # only a session published on a pool has one
    sr.mkdir()
    assert sorted(os.listdir(sr)) == [vdi]
    assert sha256_file(sr / vdi) == sha256_file(image)
    assert os.stat(sr / vdi).st_ino == os.stat(top / "disk.raw").st_ino

    with open(sr / vdi, "r+b") as f:  # what tapdisk does for the running VM
        f.seek(MiB)
        f.write(b"written through the SR")
    with open(top / "disk.raw", "rb") as f:
        f.seek(MiB)
        assert f.read(22) == b"written through the SR"
    (sr / "sm-hardlink.conf").write_text("0")  # the driver's own files live beside the VDIs
    assert sorted(os.listdir(sr)) == [vdi, "sm-hardlink.conf"]

    for bad in (
        lambda: (sr / vdi).rename(sr / "other.raw"),
        lambda: os.close(os.open(sr / vdi, os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        lambda: sr.rmdir(),
        lambda: sr.rename(top / "elsewhere"),
    ):
        with pytest.raises(OSError) as e:
            bad()
        assert e.value.errno in (errno.EPERM, errno.EEXIST, errno.ENOTEMPTY)
    (sr / vdi).unlink()  # the SR driver deleting the source of a storage migration
    assert os.listdir(sr) == ["sm-hardlink.conf"]
    with open(top / "disk.raw", "rb") as f:  # the session's disk is untouched
        f.seek(MiB)
        assert f.read(22) == b"written through the SR"
