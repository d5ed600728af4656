"""A bootable test guest: a small Linux VM disk built from Debian packages, and qemu to boot it.

The disk (raw, sparse, 256 MiB by default) is made without mounting anything, from plain files:

* an MBR partition table (``sfdisk``) with syslinux's MBR boot code (``mbr.bin``, syslinux-common) and
  the disk identifier ``0x564d5243`` ("VMRC"), so the partitions' PARTUUIDs are fixed;
* partition 1, FAT16, active: ``syslinux --install`` (the mtools installer) with ``syslinux.cfg``, the
  host's Debian kernel ``/vmlinuz`` and its initramfs-tools ``/initrd.img`` (linux-image-amd64), put
  there with ``mcopy``;
* partition 2, ext4 (``mkfs.ext4 -d`` at an offset into the image): a static busybox (busybox-static)
  with its applets as symlinks in /bin, and ``/sbin/init``, a shell script.

Boot chain: SeaBIOS -> mbr.bin -> syslinux VBR/ldlinux.sys -> kernel + initrd -> initramfs finds the
root by ``root=PARTUUID=564d5243-02`` (any disk bus: virtio-blk /dev/vda2, IDE/SATA /dev/sda2, ...),
mounts it read-write and runs ``/sbin/init``.  The init counts the lines of ``/var/log/boots.log``
on its own disk, appends one for this boot, syncs, prints ``VMRECOVER-GUEST-BOOT n=<count>`` on the
serial console (ttyS0; printed only once the line is on disk), remounts / read-only and powers off.
So the first boot of a fresh disk says ``n=1``, the next ``n=2``: a restored or instantly recovered
copy that says ``n=k+1`` has really carried the guest's writes.

:func:`boot` runs ``qemu-system-x86_64 -accel tcg`` (KVM is not usable on our machines) with
``-no-reboot``; the guest's power-off ends qemu.  A guest that does not finish within the timeout is
killed and reported by :class:`GuestBootTimeout`.

Command line (building by hand)::

    python -m tests.testkit.guest build OUT.raw [--size 256M] [--cache DIR]
    python -m tests.testkit.guest boot DISK [--serial-log FILE] [--timeout 120] [--snapshot]
    python -m tests.testkit.guest boot --drive 'file=nfs://127.0.0.1/export/disk.raw,format=raw,if=virtio'
    python -m tests.testkit.guest log DISK        # the boots recorded on the disk (no boot)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrecover.errors import BadInput, NotFound, VmrecoverError
from vmrecover.recovery import qemu_boot

MiB = 1 << 20
# The guest boots the host's Debian kernel and initrd; that initrd grows with the host's packages (35 MB
# with lvm2/cryptsetup hooks once libguestfs is installed) and is unpacked in RAM: 256M then panics.
DEFAULT_MEMORY = "512M"
SECTOR = 512
DEFAULT_SIZE = 256 * MiB

GUEST_MARKER = "VMRECOVER-GUEST-BOOT"
GUEST_ERROR_MARKER = "VMRECOVER-GUEST-ERROR"
BOOT_LOG = "/var/log/boots.log"
DISK_ID = 0x564D5243  # MBR disk identifier, "VMRC": partition N's PARTUUID is 564d5243-0N
ROOT_PARTUUID = f"{DISK_ID:08x}-02"
ROOT_FS_UUID = "564d5243-0000-4000-8000-000000000002"
BOOT_START = 1 * MiB
MIN_BOOT_SIZE = 64 * MiB
MIN_ROOT_SIZE = 16 * MiB
BOOT_PART_TYPE = 0x0E  # FAT16 (LBA)
ROOT_PART_TYPE = 0x83  # Linux

KERNEL_CMDLINE = (
    f"root=PARTUUID={ROOT_PARTUUID} rootfstype=ext4 rw console=ttyS0,115200 init=/sbin/init"
    " panic=-1 edd=off modprobe.blacklist=floppy"
)

SYSLINUX_CFG = f"""\
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND {KERNEL_CMDLINE}
"""

INIT_SCRIPT = f"""\
#!/bin/sh
# vmrecover test guest: count this boot on the guest's own disk, say so on ttyS0, power off.
export PATH=/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
dmesg -n 1  # kernel messages off the console: the marker gets a line of its own
mount -o remount,rw / || echo "{GUEST_ERROR_MARKER} cannot remount / read-write"
mkdir -p {os.path.dirname(BOOT_LOG)}
n=1
[ -f {BOOT_LOG} ] && n=$(( $(wc -l < {BOOT_LOG}) + 1 ))
if echo "boot n=$n uptime=$(cut -d' ' -f1 /proc/uptime)" >> {BOOT_LOG} && sync; then
  echo "{GUEST_MARKER} n=$n"
else
  echo "{GUEST_ERROR_MARKER} cannot write {BOOT_LOG} (n=$n)"
fi
mount -o remount,ro /
sync
echo o > /proc/sysrq-trigger
poweroff -f
sleep 60
"""

_MARKER_RE = re.compile(re.escape(GUEST_MARKER) + r" n=(\d+)")
_MBR_PATHS = ("/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin")


class GuestError(VmrecoverError):
    """Building or booting the test guest failed (a tool is missing or failed, qemu could not start)."""


class GuestBootTimeout(GuestError):
    """The guest did not power off in time; qemu was killed.  ``result`` holds what was seen."""

    def __init__(self, message: str, *, result: BootResult, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


@dataclass(frozen=True)
class GuestLayout:
    """Where the partitions of a guest disk are (bytes), as read back from its MBR."""

    size: int
    disk_id: int
    boot_start: int
    boot_size: int
    root_start: int
    root_size: int


@dataclass
class BootResult:
    """What one qemu run of the guest did.

    ``boots_seen`` lists the boot counts of the marker lines in the serial output (normally exactly one);
    ``powered_off`` says the guest powered off (rather than panicking, which ``-no-reboot`` also turns
    into a qemu exit with status 0).
    """

    returncode: int
    seconds: float
    serial_text: str
    boots_seen: list[int]
    qemu_output: str = ""
    argv: list[str] = field(default_factory=list)

    @property
    def last_boot(self) -> int | None:
        return self.boots_seen[-1] if self.boots_seen else None

    @property
    def powered_off(self) -> bool:
        return self.returncode == 0 and "reboot: Power down" in self.serial_text

    @property
    def guest_errors(self) -> list[str]:
        return [line.strip() for line in self.serial_text.splitlines() if GUEST_ERROR_MARKER in line]

    def serial_tail(self, lines: int = 25) -> str:
        return "\n".join(self.serial_text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------- tools


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := os.path.join(d, tool), os.X_OK)), None
    )
    if path is None:
        raise GuestError(f"{tool} is not installed", hint=f"run 'make setup' (Debian package {package})")
    return path


def _run(argv: Sequence[str | Path], *, what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
        check=False,
    )
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()
        raise GuestError(f"{what} failed: {' | '.join(out[-5:])}", command=[str(a) for a in argv])
    return proc.stdout


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def host_kernel(boot_dir: Path = Path("/boot")) -> tuple[Path, Path]:
    """The newest Debian kernel in *boot_dir* that has an initrd: ``(vmlinuz, initrd.img)``."""
    hint = "run 'make setup' (Debian package linux-image-amd64, initrd from initramfs-tools)"
    kernels = sorted(boot_dir.glob("vmlinuz-*"), key=lambda p: _version_key(p.name), reverse=True)
    for kernel in kernels:
        initrd = boot_dir / ("initrd.img-" + kernel.name.removeprefix("vmlinuz-"))
        if initrd.is_file():
            for f in (kernel, initrd):
                if not os.access(f, os.R_OK):
                    raise GuestError(f"cannot read {f}", hint="build the guest as root, or make it readable")
            return kernel, initrd
    raise GuestError(f"no kernel with an initrd in {boot_dir}", hint=hint)


def _static_busybox() -> Path:
    hint = "run 'make setup' (Debian package busybox-static)"
    path = Path("/bin/busybox")
    if not path.is_file():
        raise GuestError("busybox is not installed", hint=hint)
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:5] != b"\x7fELF\x02":
            raise GuestError(f"{path} is not a 64-bit ELF program", hint=hint)
        (phoff,) = struct.unpack_from("<Q", hdr, 32)
        phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    if any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum)):  # PT_INTERP
        raise GuestError(f"{path} is dynamically linked: the guest has no libraries", hint=hint)
    return path


def _mbr_code() -> bytes:
    for p in _MBR_PATHS:
        if os.path.isfile(p):
            code = Path(p).read_bytes()
            if len(code) > 440:
                raise GuestError(f"{p} is {len(code)} bytes, more than the 440 of MBR boot code")
            return code
    hint = "run 'make setup' (Debian package syslinux-common)"
    raise GuestError("syslinux's mbr.bin is missing", hint=hint)


def parse_size(text: str) -> int:
    """``"256M"``, ``"1G"``, ``"268435456"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise BadInput(f"bad size {text!r}", hint="use e.g. 256M or 1G")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


# --------------------------------------------------------------------------------------------- build


def _layout_for(size: int, kernel: Path, initrd: Path) -> GuestLayout:
    if size % MiB:
        raise BadInput(f"guest disk size {size} is not a whole number of MiB")
    payload = kernel.stat().st_size + initrd.stat().st_size
    boot_size = max(MIN_BOOT_SIZE, -(-(payload + 16 * MiB) // (8 * MiB)) * (8 * MiB))
    root_start = BOOT_START + boot_size
    if size - root_start < MIN_ROOT_SIZE:
        need = (root_start + MIN_ROOT_SIZE) // MiB
        raise BadInput(f"guest disk size {size // MiB} MiB is too small", hint=f"use at least {need} MiB")
    return GuestLayout(size, DISK_ID, BOOT_START, boot_size, root_start, size - root_start)


def _root_tree(root: Path, busybox: Path) -> None:
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "mnt", "root", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = _run([busybox, "--list"], what="busybox --list").split()
    for name in applets:
        if name != "busybox" and "/" not in name:
            (root / "bin" / name).symlink_to("busybox")
    init = root / "sbin/init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (root / "etc/hostname").write_text("vmrecover-guest\n")
    (root / "etc/vmrecover-guest").write_text(f"kernel-cmdline: {KERNEL_CMDLINE}\nboot-log: {BOOT_LOG}\n")


def _build(out: Path, size: int, kernel: Path, initrd: Path) -> None:
    """Write the whole guest disk to *out* (created or truncated), in place, without mounting."""
    tools = {
        "sfdisk": "fdisk",
        "mkfs.fat": "dosfstools",
        "mcopy": "mtools",
        "syslinux": "syslinux",
        "mkfs.ext4": "e2fsprogs",
    }
    tool = {name: _require(name, pkg) for name, pkg in tools.items()}
    busybox = _static_busybox()
    mbr_code = _mbr_code()
    lay = _layout_for(size, kernel, initrd)

    with open(out, "wb") as f:
        f.truncate(size)
    boot_part = f"start={lay.boot_start // SECTOR}, size={lay.boot_size // SECTOR}, type={BOOT_PART_TYPE:x}"
    root_part = f"start={lay.root_start // SECTOR}, size={lay.root_size // SECTOR}, type={ROOT_PART_TYPE:x}"
    table = f"label: dos\nlabel-id: 0x{DISK_ID:08x}\nunit: sectors\n\n{boot_part}, bootable\n{root_part}\n"
    proc = subprocess.run(
        [tool["sfdisk"], "--quiet", "--no-reread", "--no-tell-kernel", str(out)],
        input=table,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise GuestError(f"sfdisk failed: {proc.stderr.strip()}")
    with open(out, "r+b") as f:
        f.write(mbr_code)  # boot code only: bytes 0..439; the table sfdisk wrote starts at 440

    # partition 1: FAT16 with syslinux, kernel and initrd
    start_sectors = lay.boot_start // SECTOR
    _run(
        [
            tool["mkfs.fat"],
            "-F",
            "16",
            "-n",
            "VMRBOOT",
            "-i",
            f"{DISK_ID:08x}",
            "-h",
            str(start_sectors),
            f"--offset={start_sectors}",
            "--invariant",
            out,
            str(lay.boot_size // 1024),
        ],
        what="mkfs.fat",
    )
    with tempfile.TemporaryDirectory(prefix="vmrecover-guest-") as tmp:
        work = Path(tmp)
        rc = work / "mtoolsrc"
        rc.write_text("mtools_skip_check=1\n")
        mtools_env = {"MTOOLSRC": str(rc), "MTOOLS_SKIP_CHECK": "1"}
        cfg = work / "syslinux.cfg"
        cfg.write_text(SYSLINUX_CFG)
        image = f"{out}@@{lay.boot_start}"
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
            _run([tool["mcopy"], "-i", image, src, f"::/{name}"], what=f"mcopy {name}", env=mtools_env)
        _run(
            [tool["syslinux"], "--offset", str(lay.boot_start), "--install", out],
            what="syslinux --install",
            env=mtools_env,
        )

        # partition 2: ext4 root with busybox and the init script
        root = work / "root"
        _root_tree(root, busybox)
        _run(
            [
                tool["mkfs.ext4"],
                "-q",
                "-F",
                "-b",
                "4096",
                "-L",
                "vmrroot",
                "-U",
                ROOT_FS_UUID,
                "-E",
                f"offset={lay.root_start},nodiscard,root_owner=0:0",
                "-d",
                root,
                out,
                str(lay.root_size // 4096),
            ],
            what="mkfs.ext4",
        )
    if os.path.getsize(out) != size:
        raise GuestError(f"building {out} changed its size to {os.path.getsize(out)} bytes (expected {size})")


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy *src* to *dst* keeping its holes (SEEK_DATA/SEEK_HOLE; falls back to copying everything)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        fo.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < end:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), end - off, off, off)
                if n == 0:
                    break
                off += n
            pos = end


def _cache_key(size: int, kernel: Path, initrd: Path) -> str:
    def ident(p: Path) -> list[Any]:
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]

    mbr = next((p for p in _MBR_PATHS if os.path.isfile(p)), "")
    blob = json.dumps(
        {
            "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
            "size": size,
            "kernel": ident(kernel),
            "initrd": ident(initrd),
            "busybox": ident(Path("/bin/busybox")) if os.path.exists("/bin/busybox") else None,
            "mbr": ident(Path(mbr)) if mbr else None,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_guest_disk(
    path: Path | str,
    *,
    size: int = DEFAULT_SIZE,
    cache_dir: Path | str | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
) -> Path:
    """Write a fresh, never-booted guest disk (raw, sparse) to *path* and return *path*.

    *path* is replaced atomically if it exists (a booted disk is not "fresh": it holds its boot count).
    With *cache_dir*, the disk is built once into ``cache_dir/guest-<size>-<key>.raw`` (key: this
    module's source, the size, the kernel, initrd, busybox and mbr.bin) and then copied sparsely, so
    repeated calls cost a copy.  *kernel*/*initrd* default to the newest pair in /boot.
    """
    path = Path(path)
    if kernel is None or initrd is None:
        k, i = host_kernel()
        kernel, initrd = kernel or k, initrd or i
    _layout_for(size, kernel, initrd)  # validate before doing anything
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if cache_dir is not None:
            cache = Path(cache_dir)
            cache.mkdir(parents=True, exist_ok=True)
            cached = cache / f"guest-{size // MiB}M-{_cache_key(size, kernel, initrd)}.raw"
            if not cached.is_file():
                ctmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
                try:
                    _build(ctmp, size, kernel, initrd)
                    os.replace(ctmp, cached)
                finally:
                    ctmp.unlink(missing_ok=True)
            _sparse_copy(cached, tmp)
        else:
            _build(tmp, size, kernel, initrd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------- inspect


def guest_layout(disk: Path | str) -> GuestLayout:
    """Read the partition layout of a guest disk back from its MBR (raises :class:`BadInput` if none)."""
    disk = Path(disk)
    if not disk.exists():
        raise NotFound(f"disk {disk} does not exist")
    with open(disk, "rb") as f:
        mbr = f.read(512)
        size = f.seek(0, os.SEEK_END)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        raise BadInput(f"{disk} has no MBR (no 0x55AA signature at byte 510)")
    (disk_id,) = struct.unpack_from("<I", mbr, 440)
    parts = []
    for i in range(4):
        _status, ptype, lba, count = struct.unpack_from("<B3xB3xII", mbr, 446 + 16 * i)
        parts.append((ptype, lba * SECTOR, count * SECTOR))
    (t1, s1, n1), (t2, s2, n2) = parts[0], parts[1]
    if t1 != BOOT_PART_TYPE or t2 != ROOT_PART_TYPE:
        raise BadInput(f"{disk} is not a vmrecover test guest (partition types {t1:#x}, {t2:#x})")
    return GuestLayout(size, disk_id, s1, n1, s2, n2)


def read_boot_log(disk: Path | str) -> list[str]:
    """The lines of the guest's boot log, read from the disk image itself with debugfs (no boot, no mount).

    A never-booted disk gives ``[]``.  The path must not contain ``?`` (debugfs's option separator).
    """
    lay = guest_layout(disk)
    debugfs = _require("debugfs", "e2fsprogs")
    proc = subprocess.run(
        [debugfs, "-R", f"cat {BOOT_LOG}", f"{disk}?offset={lay.root_start}"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0 or "Bad magic" in proc.stderr or "Couldn't find" in proc.stderr:
        raise GuestError(f"cannot read {BOOT_LOG} from {disk}: {proc.stderr.strip()}")
    return proc.stdout.splitlines()


# --------------------------------------------------------------------------------------------- boot


def boot(
    disk: Path | str | None,
    *,
    serial_log: Path | str,
    timeout: float = 120,
    memory: str = DEFAULT_MEMORY,
    bus: str = "virtio",
    drive_args: str | None = None,
    snapshot: bool = False,
    accel: str = "tcg",
    extra_args: Sequence[str] = (),
) -> BootResult:
    """Boot the guest from *disk* with qemu until it powers off; return what happened.

    The disk is attached as ``-drive file=DISK,format=raw,if=BUS`` (``virtio``: /dev/vda; ``ide``:
    /dev/sda; the guest finds its root by PARTUUID either way), with ``snapshot=on`` if *snapshot*
    (writes go to a temporary overlay, the disk is left as it was).  *drive_args* replaces that whole
    ``-drive`` value, e.g. ``"file=nfs://127.0.0.1/export/vm.raw,format=raw,if=virtio"`` or a FUSE
    path with ``cache=none``; *disk* is then ignored (may be ``None``).  The serial console (ttyS0) is
    written to *serial_log*.

    qemu's exit status, the elapsed time and the boot counts seen are returned, whatever they are; a
    guest that has not powered off after *timeout* seconds is killed and :class:`GuestBootTimeout`
    raised (with the partial :class:`BootResult` as ``.result``).
    """
    _require("qemu-system-x86_64", "qemu-system-x86")
    if drive_args is None:
        if disk is None:
            raise BadInput("boot() needs a disk or drive_args")
        drive_args = qemu_boot.drive(disk, bus=bus, extra="snapshot=on" if snapshot else "")
    serial_log = Path(serial_log)
    serial_log.parent.mkdir(parents=True, exist_ok=True)
    serial_log.write_bytes(b"")
    argv = qemu_boot.argv(
        [], memory=memory, serial=serial_log, accel=accel, drives=[drive_args], extra=extra_args
    )
    timed_out = False
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                proc.kill()
            returncode = proc.wait()
        seconds = time.monotonic() - start
        out.seek(0)
        qemu_output = out.read().decode(errors="replace")
    serial_text = serial_log.read_bytes().decode(errors="replace")
    result = BootResult(
        returncode=returncode,
        seconds=round(seconds, 2),
        serial_text=serial_text,
        boots_seen=[int(m) for m in _MARKER_RE.findall(serial_text)],
        qemu_output=qemu_output,
        argv=argv,
    )
    if timed_out:
        raise GuestBootTimeout(
            f"the guest did not power off within {timeout:g} s: killed qemu (pid {proc.pid}); "
            f"boots seen: {result.boots_seen or 'none'}; last serial lines ({serial_log}):\n"
            f"{result.serial_tail()}",
            result=result,
            hint="a slow machine may need a longer timeout; otherwise see the serial log",
        )
    return result


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.testkit.guest build|boot|log ...``; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m tests.testkit.guest", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a fresh guest disk")
    b.add_argument("out", type=Path)
    b.add_argument("--size", default="256M", help="disk size (default 256M)")
    b.add_argument("--cache", type=Path, help="build once into this directory, then copy")
    r = sub.add_parser("boot", help="boot a guest disk with qemu (TCG) until it powers off")
    r.add_argument("disk", nargs="?", help="disk image (path or anything qemu takes as file=)")
    r.add_argument("--serial-log", type=Path, help="serial console file (default: DISK.serial.log)")
    r.add_argument("--timeout", type=float, default=120)
    r.add_argument("--memory", default=DEFAULT_MEMORY)
    r.add_argument("--bus", default="virtio", help="virtio (default), ide, ...")
    r.add_argument("--snapshot", action="store_true", help="discard the guest's writes")
    r.add_argument("--drive", help="the whole -drive value, instead of DISK")
    lg = sub.add_parser("log", help="print the boot log stored on a guest disk (no boot)")
    lg.add_argument("disk", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            t0 = time.monotonic()
            out = build_guest_disk(args.out, size=parse_size(args.size), cache_dir=args.cache)
            st = out.stat()
            print(
                f"built {out} in {time.monotonic() - t0:.1f} s: {st.st_size // MiB} MiB, "
                f"{st.st_blocks * 512 / MiB:.1f} MiB allocated; kernel command line: {KERNEL_CMDLINE}"
            )
            return 0
        if args.cmd == "log":
            print("\n".join(read_boot_log(args.disk)))
            return 0
        if args.disk is None and args.drive is None:
            ap.error("boot needs DISK or --drive")
        serial = args.serial_log
        if serial is None:
            local = args.disk is not None and os.path.exists(args.disk)
            serial = Path(f"{args.disk}.serial.log") if local else Path("guest-serial.log")
        res = boot(
            args.disk, serial_log=serial, timeout=args.timeout, memory=args.memory, bus=args.bus,
            drive_args=args.drive, snapshot=args.snapshot,
        )  # fmt: skip
        state = "powered off" if res.powered_off else "did NOT power off"
        print(
            f"qemu exit {res.returncode} after {res.seconds:.1f} s, guest {state}; "
            f"boots seen: {res.boots_seen or 'none'}; serial log: {serial}"
        )
        for line in res.guest_errors:
            print(line)
        if res.returncode != 0 and res.qemu_output.strip():
            print(res.qemu_output.strip(), file=sys.stderr)
        return 0 if res.powered_off and res.boots_seen else 1
    except VmrecoverError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code or 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
