"""The bootable test guest: its disk layout, and real boots with qemu (TCG) that count themselves.

The disk is built once per module; tests that boot it work on a sparse copy, so each test sees a
never-booted disk whatever the order.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.testkit.guest import (
    BOOT_LOG,
    BOOT_PART_TYPE,
    DISK_ID,
    GUEST_MARKER,
    ROOT_PART_TYPE,
    GuestBootTimeout,
    MiB,
    _sparse_copy,
    boot,
    build_guest_disk,
    guest_layout,
    read_boot_log,
)

SIZE = 256 * MiB
BOOT_TIMEOUT = 120


@pytest.fixture(scope="module")
def guest_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly built, never-booted guest disk (do not boot it: copy it with ``fresh_copy``)."""
    t0 = time.monotonic()
    disk = build_guest_disk(tmp_path_factory.mktemp("guest") / "guest.raw", size=SIZE)
    st = disk.stat()
    print(
        f"\nguest disk built in {time.monotonic() - t0:.2f} s: {st.st_size / MiB:.0f} MiB apparent, "
        f"{st.st_blocks * 512 / MiB:.1f} MiB allocated"
    )
    return disk


def fresh_copy(disk: Path, dst: Path) -> Path:
    _sparse_copy(disk, dst)
    return dst


def test_disk_has_mbr_bootloader_and_filesystems(guest_disk: Path) -> None:
    data = guest_disk.read_bytes()
    assert len(data) == SIZE
    st = guest_disk.stat()
    assert st.st_blocks * 512 < SIZE // 2, "the image should be sparse"

    mbr = data[:512]
    assert mbr[510:512] == b"\x55\xaa"
    mbr_bin = Path("/usr/lib/syslinux/mbr/mbr.bin").read_bytes()
    assert mbr[: len(mbr_bin)] == mbr_bin, "MBR boot code is syslinux's mbr.bin"
    assert struct.unpack_from("<I", mbr, 440)[0] == DISK_ID
    entries = [struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i) for i in range(4)]
    (st1, t1, lba1, n1), (st2, t2, lba2, n2) = entries[:2]
    assert (st1, t1, lba1) == (0x80, BOOT_PART_TYPE, 2048), "partition 1: active FAT16 at 1 MiB"
    assert (st2, t2) == (0x00, ROOT_PART_TYPE)
    assert lba2 == lba1 + n1 and (lba2 + n2) * 512 == SIZE, "partition 2 follows and fills the disk"
    assert mbr[446 + 32 : 510] == bytes(32), "entries 3 and 4 are empty"

    lay = guest_layout(guest_disk)
    assert (lay.boot_start, lay.root_start, lay.root_size) == (lba1 * 512, lba2 * 512, n2 * 512)
    vbr = data[lay.boot_start : lay.boot_start + 512]
    assert vbr[510:512] == b"\x55\xaa" and vbr[3:11] == b"SYSLINUX", "syslinux installed in partition 1"
    assert vbr[54:62] == b"FAT16   "
    assert data[lay.root_start + 1080 : lay.root_start + 1082] == b"\x53\xef", "ext4 in partition 2"
    assert read_boot_log(guest_disk) == [], "a fresh disk has never booted"


def test_boots_count_on_own_disk(guest_disk: Path, tmp_path: Path) -> None:
    disk = fresh_copy(guest_disk, tmp_path / "vm.raw")
    for n in (1, 2):
        log = tmp_path / f"serial-{n}.log"
        res = boot(disk, serial_log=log, timeout=BOOT_TIMEOUT)
        print(f"\nboot {n}: {res.seconds:.1f} s, qemu exit {res.returncode}")
        assert res.returncode == 0, res.qemu_output
        assert res.powered_off, f"guest did not power off:\n{res.serial_tail()}"
        assert res.boots_seen == [n], f"expected '{GUEST_MARKER} n={n}':\n{res.serial_tail()}"
        assert f"{GUEST_MARKER} n={n}\n" in log.read_text(errors="replace")
        assert res.guest_errors == []
    assert [line.split()[1] for line in read_boot_log(disk)] == ["n=1", "n=2"], BOOT_LOG


def test_drive_args_override_ide_bus_and_snapshot(guest_disk: Path, tmp_path: Path) -> None:
    """*drive_args* is the whole -drive value.  Here: the IDE bus (the guest finds its root by PARTUUID,
    /dev/sda2 this time) and a snapshot overlay, which leaves the disk as it was."""
    disk = fresh_copy(guest_disk, tmp_path / "vm,with,commas.raw")
    before = disk.read_bytes()
    drive = "file=" + str(disk).replace(",", ",,") + ",format=raw,if=ide,snapshot=on"
    res = boot(None, drive_args=drive, serial_log=tmp_path / "serial.log", timeout=BOOT_TIMEOUT)
    assert res.powered_off and res.boots_seen == [1], res.serial_tail()
    assert "sda: sda1 sda2" in res.serial_text, "the disk was the IDE disk /dev/sda"
    assert res.argv[res.argv.index("-drive") + 1] == drive
    assert disk.read_bytes() == before, "snapshot=on: the guest's writes were discarded"
    assert read_boot_log(disk) == []


def test_timeout_kills_qemu_and_says_so(guest_disk: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(GuestBootTimeout, match=r"did not power off within 2 s: killed qemu") as exc:
        boot(guest_disk, serial_log=tmp_path / "serial.log", timeout=2, snapshot=True)
    assert time.monotonic() - t0 < 30
    res = exc.value.result
    assert res.returncode != 0 and res.boots_seen == []
    assert res.argv[res.argv.index("-drive") + 1] == f"file={guest_disk},format=raw,if=virtio,snapshot=on"


def test_build_cache_and_cli(guest_disk: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = build_guest_disk(tmp_path / "a.raw", size=SIZE, cache_dir=cache)
    b = build_guest_disk(tmp_path / "b.raw", size=SIZE, cache_dir=cache)
    cached = list(cache.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("guest-256M-")
    assert a.read_bytes() == b.read_bytes() == cached[0].read_bytes()
    assert os.stat(b).st_blocks <= os.stat(cached[0]).st_blocks + 8, "the copy keeps the holes"

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    cli = [sys.executable, "-W", "error", "-m", "tests.testkit.guest"]
    out = tmp_path / "cli.raw"
    proc = subprocess.run([*cli, "build", out, "--size", "128M"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == 128 * MiB and "built" in proc.stdout
    proc = subprocess.run([*cli, "log", guest_disk], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stderr
