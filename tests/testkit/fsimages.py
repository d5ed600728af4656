"""Small raw disk images with real guest filesystems, built with libguestfs: test data for file restore.

Every image is built in ONE writable libguestfs appliance (partitioning, LVM, ``mkfs``, files written
with ``write``/``upload``/``tar_in``, modes, owners and times set explicitly): no host mount, no root
needed.  Each builder returns an :class:`ImageInfo` saying what is in the image (files and their
bytes, mtimes, modes, owners, symlinks, the filesystems and where the guest mounts them) and what
libguestfs' inspection is expected to recognise.  Contents are deterministic (fixed bytes, seeded
pseudo-random data, fixed UUIDs and times); the images are sparse.

===================  ============================================================================
kind                 what
===================  ============================================================================
``linux_lvm_xfs``    384 MiB, MBR: p1 ext4 ``/boot``; p2 LVM PV -> VG ``vg0`` -> LV ``root``, xfs,
                     ``/``.  Debian 12 as inspection sees it.  Alice's home: a 0600 file with a
                     fixed mtime, a nested tree, non-ASCII names, symlinks (relative, to a
                     directory, absolute, across filesystems, and ``../../../../../etc/shadow``
                     which climbs out of the filesystem), and ``/srv/many`` with 10 000 files.
``linux_ext4_gpt``   64 MiB, GPT, one ext4 root; Debian 12 with another ``/etc/hosts``.
``bare_ext4``        64 MiB, ext4 on the whole disk (no partition table), no OS; a few files.
``ntfs_disk``        64 MiB, MBR, one NTFS partition with a Windows-like tree; NOT recognised as
                     Windows (no registry hives), so it is a plain data filesystem to inspection.
``two_disk_linux``   two 64 MiB disks: disk 0 (MBR, ext4) a Debian root whose fstab mounts disk 1's
                     ext4 (by UUID) at ``/data``; inspection with both disks gives both mountpoints.
``unknown_disk``     64 MiB, MBR, partition 1 full of random bytes: no recognisable filesystem.
``big_file_disk``    MBR, ext4 with one ``/big.bin`` of pseudo-random bytes (100 MiB by default).
``dirty_journals``   680 MiB, MBR, no OS: ``/sda1`` ext4 whose journal needs recovery (and holds a
                     rewrite of ``/sda1/journal.txt`` not yet in place), ``/sda2`` clean xfs with
                     setuid/setgid files, ``/sda3`` xfs with a dirty log: a crash-consistent backup.
===================  ============================================================================

What inspection needs to recognise a Linux root (libguestfs 1.48, found by trying): ``/etc`` and
``/bin`` (a directory, or a symlink to one: ``/bin -> usr/bin`` works) and ``/etc/fstab`` or
``/etc/hosts``.  ``/etc/os-release`` then gives the distro (``ID``) and version, ``/etc/hostname``
the hostname, the fstab entries (``/dev/mapper/VG-LV``, ``UUID=``) the mountpoints.  The product
name is ``PRETTY_NAME``, unless ``/etc/debian_version`` exists: then it is that file's ``12.5``.  The
architecture comes from ``file`` on ``/bin/bash`` (or ``/bin/ls``, ``/bin/sh``...): a 64-byte ELF
header is enough; without one it is ``unknown``.  Beware: a Windows tree with an unreadable
``System32/cmd.exe`` makes ``inspect_os`` fail for the whole handle ("unknown architecture"), so the
NTFS image has none.  Inspection costs 3 s of augeas start-up per Linux root under TCG.

Paths in :class:`ImageInfo` are guest paths: from the OS's ``/`` when an OS is recognised (the
filesystems mounted at their mountpoints), else from the root of the image's only filesystem, or,
with several, from ``/<device>`` (``/sda2/...``), as ``vmrecover files`` mounts them.
:meth:`ImageInfo.locate` maps one to its filesystem and the path inside it.

:func:`change_files` (and :func:`change_file`) rewrite or delete files in an existing image, to make
restore points in which a file changed, then disappeared.

Command line::

    python -m tests.testkit.fsimages build KIND OUT [OUT2]     # prints the ImageInfo as JSON
    python -m tests.testkit.fsimages change DISK [DISK2] --path /etc/hosts (--data-file F | --delete)
    python -m tests.testkit.fsimages kinds

libguestfs runs with ``LIBGUESTFS_BACKEND=direct`` and ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``
unless the environment says otherwise (qemu with KVM aborts on our machines).  A launch takes 10-16 s.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import posixpath
import random
import struct
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrecover.errors import BadInput, NotFound, VmrecoverError
from vmrecover.files.guest import load_guestfs

MiB = 1 << 20
SECTOR = 512
FIRST_SECTOR = 2048  # partitions start at 1 MiB

NOTES_MTIME = 1704164645  # 2024-01-02 03:04:05 UTC: /home/alice/notes.txt
BASE_MTIME = 1685620800  # 2023-06-01 12:00:00 UTC: other files, one hour apart in creation order
BULK_MTIME = 1700000000  # 2023-11-14 22:13:20 UTC: every entry of a bulk directory
BULK_COUNT = 10_000

ALICE = (1000, 1000)
ROOT = (0, 0)

# Fixed filesystem UUIDs (the last group names the image and the filesystem), so fstab can name them.
LVM_BOOT_UUID = "564d5243-0001-4000-8000-000000000001"
LVM_ROOT_UUID = "564d5243-0001-4000-8000-000000000002"
GPT_ROOT_UUID = "564d5243-0002-4000-8000-000000000001"
BARE_UUID = "564d5243-0003-4000-8000-000000000001"
NTFS_SERIAL = 0x564D524300040001  # NTFS has a 64-bit volume serial, shown as 16 hex digits
TWO_ROOT_UUID = "564d5243-0005-4000-8000-000000000001"
TWO_DATA_UUID = "564d5243-0005-4000-8000-000000000002"
BIG_UUID = "564d5243-0007-4000-8000-000000000001"
JOURNAL_EXT4_UUID = "564d5243-0008-4000-8000-000000000001"
CLEAN_XFS_UUID = "564d5243-0008-4000-8000-000000000002"
DIRTY_XFS_UUID = "564d5243-0008-4000-8000-000000000003"
GPT_DISK_GUID = "564D5243-0002-4000-8000-0000000000D0"
GPT_PART_GUID = "564D5243-0002-4000-8000-0000000000D1"
LINUX_FS_GPT_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

NOT_A_FILESYSTEM = {"unknown", "swap", ""}


class FsImageError(VmrecoverError):
    """Building or changing a test filesystem image failed (libguestfs missing or an operation failed)."""


# --------------------------------------------------------------------------------------------- model


@dataclass
class Filesystem:
    """One filesystem of an image.

    ``device`` is libguestfs' name for it when the image's disks are added in order, alone
    (``/dev/sda1``, ``/dev/vg0/root``, ``/dev/sdb1``, ``/dev/sda`` for a whole-disk filesystem);
    ``fstype`` is what ``list_filesystems`` says (``unknown`` for the random partition);
    ``mountpoint`` is where the guest OS mounts it (``None`` without an OS: then the image's only
    filesystem holds the guest paths from its root).
    """

    device: str
    fstype: str
    disk: int
    partition: int | None = None
    lv: str | None = None
    uuid: str | None = None
    label: str | None = None
    mountpoint: str | None = None


@dataclass
class ImageInfo:
    """What a builder put into its image(s), and what libguestfs is expected to find there.

    * ``paths``/``disk_sizes``/``partition_tables``: the disks in order, as ``add_drive`` should add
      them; the tables as ``part_get_parttype`` names them: ``msdos`` (MBR), ``gpt``, or ``None`` for a
      whole-disk filesystem;
    * ``os_type``, ``distro``, ``product_name``, ``hostname``, ``arch``, ``os_root``: what
      ``inspect_os``/``inspect_get_*`` give (all ``None``: inspection finds no OS);
      ``mountpoints`` is ``inspect_get_mountpoints(os_root)``, mountpoint -> device;
    * ``files``: every regular file written one by one, guest path -> bytes; ``large_files`` the
      ones too big to keep, guest path -> (size, sha256 hex);
    * ``mtimes`` (seconds), ``modes`` (permission bits, e.g. ``0o600``) and ``owners`` ((uid, gid))
      of files and directories set explicitly (NTFS: mtimes only: ntfs-3g shows every mode as 0777);
    * ``symlinks``: guest path -> target, exactly as stored (relative or absolute);
    * ``dirs``: directories created explicitly (parents of files exist too);
    * ``bulk``: directory -> number of entries, named :func:`bulk_name` (``f00000.txt``...) with the
      bytes :func:`bulk_data`, mode 0644, owner root, mtime :data:`BULK_MTIME`;
    * ``notes``: anything a test author should know about this image.
    """

    kind: str
    paths: list[Path]
    disk_sizes: list[int]
    partition_tables: list[str | None]
    filesystems: list[Filesystem] = field(default_factory=list)
    os_type: str | None = None
    distro: str | None = None
    product_name: str | None = None
    hostname: str | None = None
    arch: str | None = None
    os_root: str | None = None
    mountpoints: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    large_files: dict[str, tuple[int, str]] = field(default_factory=dict)
    mtimes: dict[str, int] = field(default_factory=dict)
    modes: dict[str, int] = field(default_factory=dict)
    owners: dict[str, tuple[int, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)
    bulk: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    build_seconds: float = 0.0

    def filesystem(self, device: str) -> Filesystem:
        for fs in self.filesystems:
            if fs.device == device:
                return fs
        raise NotFound(f"{self.kind} has no filesystem {device}")

    def locate(self, guest_path: str) -> tuple[Filesystem, str]:
        """The filesystem holding *guest_path* and the path inside that filesystem.

        With an OS: the filesystem with the longest mountpoint that is a prefix of the path
        (``/boot/config-test`` -> (``/dev/sda1``, ``/config-test``)); without one: the only filesystem,
        or the one named by the path's first component (``/sda2/x`` -> (``/dev/sda2``, ``/x``)).
        """
        mountable = [fs for fs in self.filesystems if fs.fstype not in NOT_A_FILESYSTEM]
        if self.os_type is None:
            if len(mountable) == 1:
                return mountable[0], guest_path
            for fs in mountable:  # several: each at /<device name>
                top = "/" + fs.device.removeprefix("/dev/").replace("/", "-")
                if guest_path == top or guest_path.startswith(f"{top}/"):
                    return fs, guest_path[len(top) :] or "/"
            raise NotFound(f"{self.kind} has {len(mountable)} mountable filesystems and no OS, and "
                           f"{guest_path} is on none of them")  # fmt: skip
        best: Filesystem | None = None
        for fs in mountable:
            mp = fs.mountpoint
            holds = mp == "/" or guest_path == mp or guest_path.startswith(f"{mp}/")
            if mp and holds and (best is None or len(mp) > len(best.mountpoint or "")):
                best = fs
        if best is None or best.mountpoint is None:
            raise NotFound(f"no filesystem of {self.kind} holds {guest_path}")
        inner = guest_path if best.mountpoint == "/" else guest_path[len(best.mountpoint) :] or "/"
        return best, inner

    def to_json(self) -> dict[str, Any]:
        def file_entry(data: bytes) -> dict[str, Any]:
            out: dict[str, Any] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            with contextlib.suppress(UnicodeDecodeError):
                if len(data) <= 256:
                    out["text"] = data.decode()
            return out

        return {
            "kind": self.kind,
            "paths": [str(p) for p in self.paths],
            "disk_sizes": self.disk_sizes,
            "partition_tables": self.partition_tables,
            "filesystems": [vars(fs) for fs in self.filesystems],
            "os_type": self.os_type,
            "distro": self.distro,
            "product_name": self.product_name,
            "hostname": self.hostname,
            "arch": self.arch,
            "os_root": self.os_root,
            "mountpoints": self.mountpoints,
            "files": {p: file_entry(d) for p, d in self.files.items()},
            "large_files": {p: {"size": s, "sha256": h} for p, (s, h) in self.large_files.items()},
            "mtimes": self.mtimes,
            "modes": {p: f"{m:04o}" for p, m in self.modes.items()},
            "owners": {p: list(o) for p, o in self.owners.items()},
            "symlinks": self.symlinks,
            "dirs": self.dirs,
            "bulk": self.bulk,
            "notes": self.notes,
            "build_seconds": self.build_seconds,
        }


def bulk_name(i: int) -> str:
    return f"f{i:05d}.txt"


def bulk_data(i: int) -> bytes:
    return f"bulk entry {i}\n".encode()


def pseudo_random(seed: int, size: int) -> bytes:
    """*size* deterministic, incompressible bytes (the same for a seed on every machine)."""
    return random.Random(seed).randbytes(size)


# A bare ELF64 header (x86-64, ET_EXEC): enough for `file`, hence for inspection's architecture.
ELF_X86_64 = (
    b"\x7fELF\x02\x01\x01"
    + bytes(9)
    + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x401000, 64, 0, 0, 64, 56, 0, 64, 0, 0)
)

# --------------------------------------------------------------------------------------------- libguestfs


def drive_label(index: int) -> str:
    """The label of drive *index*: the appliance names it ``/dev/disk/guestfs/<label>`` (partitions
    ``<label>N``) whatever order its kernel found the disks in; shell commands run in the appliance
    (``_appliance_sh``) need that name, the API translates ``/dev/sda`` itself."""
    return "fsimg" + chr(ord("a") + index)


@contextlib.contextmanager
def guestfs_handle(paths: Sequence[Path | str], *, readonly: bool) -> Iterator[Any]:
    """A launched libguestfs handle (dicts for structs) with the raw *paths* added in order.

    Writable handles add the drives with ``discard=besteffort`` (so ``fstrim`` keeps the images
    sparse); every drive has a label (:func:`drive_label`).  On leaving, everything is unmounted and
    the appliance shut down (which reports write errors) and closed.
    """
    for p in paths:
        if not os.path.isfile(p):
            raise NotFound(f"disk image {p} does not exist")
    guestfs = load_guestfs()
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        for i, p in enumerate(paths):
            if readonly:
                g.add_drive_opts(str(p), format="raw", readonly=True, label=drive_label(i))
            else:
                g.add_drive_opts(str(p), format="raw", discard="besteffort", label=drive_label(i))
        try:
            g.launch()
        except RuntimeError as e:
            raise FsImageError(
                f"the libguestfs appliance did not start: {e}",
                hint="run 'libguestfs-test-tool'; with KVM problems keep LIBGUESTFS_BACKEND=direct and "
                "LIBGUESTFS_BACKEND_SETTINGS=force_tcg",
            ) from None
        yield g
        if not readonly:
            g.umount_all()
            g.shutdown()
    finally:
        g.close()


@contextlib.contextmanager
def _building(kind: str, paths: Sequence[Path | str], sizes: Sequence[int]) -> Iterator[Any]:
    """Fresh sparse files next to *paths*, a writable handle on them; renamed to *paths* on success."""
    final = [Path(p) for p in paths]
    tmps = [p.with_name(f".{p.name}.{os.getpid()}-{threading.get_ident()}.tmp") for p in final]
    try:
        for tmp, size in zip(tmps, sizes, strict=True):
            tmp.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.truncate(size)
        try:
            with guestfs_handle(tmps, readonly=False) as g:
                yield g
        except RuntimeError as e:
            raise FsImageError(f"building {kind} image {final[0]} failed: {e}") from None
        for tmp, out in zip(tmps, final, strict=True):
            os.replace(tmp, out)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


class _Writer:
    """Writes files, directories and symlinks through a handle and records them in an :class:`ImageInfo`."""

    def __init__(self, g: Any, info: ImageInfo, *, posix: bool = True) -> None:
        self.g = g
        self.info = info
        self.posix = posix
        self._tick = 0
        self._dir_times: list[str] = []

    def _next_mtime(self) -> int:
        self._tick += 1
        return BASE_MTIME + 3600 * self._tick

    def _attrs(self, path: str, mode: int, owner: tuple[int, int], mtime: int | None) -> None:
        if self.posix:
            self.g.chmod(mode, path)
            self.g.chown(owner[0], owner[1], path)
            self.info.modes[path] = mode
            self.info.owners[path] = owner
        if mtime is not None:
            self.g.utimens(path, mtime, 0, mtime, 0)
            self.info.mtimes[path] = mtime

    def dir(self, path: str, *, mode: int = 0o755, owner: tuple[int, int] = ROOT) -> None:
        self.g.mkdir_p(path)
        self._attrs(path, mode, owner, None)
        self.info.dirs.append(path)
        self._dir_times.append(path)  # the mtime is set by finish(): adding entries changes it

    def file(
        self,
        path: str,
        data: bytes,
        *,
        mode: int = 0o644,
        owner: tuple[int, int] = ROOT,
        mtime: int | None = None,
    ) -> None:
        self.g.mkdir_p(posixpath.dirname(path))
        if len(data) <= 2 * MiB:
            self.g.write(path, data)
        else:
            with tempfile.NamedTemporaryFile() as f:
                f.write(data)
                f.flush()
                self.g.upload(f.name, path)
        self._attrs(path, mode, owner, self._next_mtime() if mtime is None else mtime)
        self.info.files[path] = data

    def large_file(self, path: str, local: Path, sha256: str) -> None:
        self.g.mkdir_p(posixpath.dirname(path))
        self.g.upload(str(local), path)
        self._attrs(path, 0o644, ROOT, self._next_mtime())
        self.info.large_files[path] = (local.stat().st_size, sha256)

    def symlink(self, path: str, target: str, *, owner: tuple[int, int] = ROOT) -> None:
        self.g.mkdir_p(posixpath.dirname(path))
        self.g.ln_s(target, path)
        if self.posix:
            self.g.lchown(owner[0], owner[1], path)
        self.info.symlinks[path] = target

    def bulk(self, path: str, count: int) -> None:
        """*count* small files in *path* through one tar (``tar_in``), not *count* calls."""
        self.dir(path)
        with tempfile.TemporaryDirectory(prefix="vmrecover-fsimages-") as tmp:
            tar_path = Path(tmp) / "bulk.tar"
            with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(count):
                    data = bulk_data(i)
                    ti = tarfile.TarInfo(bulk_name(i))
                    ti.size, ti.mode, ti.mtime = len(data), 0o644, BULK_MTIME
                    tar.addfile(ti, io.BytesIO(data))
            self.g.tar_in(str(tar_path), path)
        self.info.bulk[path] = count

    def finish(self) -> None:
        """Give the explicitly created directories their mtimes, now that nothing is added to them."""
        for path in self._dir_times:
            mtime = self._next_mtime()
            self.g.utimens(path, mtime, 0, mtime, 0)
            self.info.mtimes[path] = mtime


def _fstrim(g: Any) -> None:
    """Give the blocks mkfs zeroed back to the sparse image (best effort: not every fs supports it)."""
    for _dev, mp in g.mountpoints().items():
        with contextlib.suppress(RuntimeError):
            g.fstrim(mp)


def _linux_os(w: _Writer, *, hostname: str, hosts: bytes, fstab: str) -> None:
    """The files that make inspection recognise a Debian 12 (usrmerged) root, plus a user alice."""
    for d in ("/etc", "/usr/bin", "/usr/sbin", "/usr/lib", "/root", "/tmp", "/var/log", "/home"):
        w.dir(d, mode=0o700 if d == "/root" else 0o1777 if d == "/tmp" else 0o755)
    for link, target in (("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib")):
        w.symlink(link, target)
    w.file("/usr/bin/bash", ELF_X86_64, mode=0o755)
    w.symlink("/usr/bin/sh", "bash")
    w.file(
        "/etc/os-release",
        b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
        b'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n',
    )
    w.file("/etc/debian_version", b"12.5\n")
    w.file("/etc/hostname", hostname.encode() + b"\n")
    w.file("/etc/hosts", hosts)
    w.file("/etc/fstab", fstab.encode())
    w.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000:Alice,,,:/home/alice:/bin/bash\n",
    )
    w.file("/etc/group", b"root:x:0:\nalice:x:1000:\n")


def _expect_debian(info: ImageInfo, root: str, hostname: str) -> None:
    info.os_type, info.distro, info.arch = "linux", "debian", "x86_64"
    info.product_name = "12.5"  # /etc/debian_version wins over os-release's PRETTY_NAME
    info.hostname, info.os_root = hostname, root
    info.mountpoints = {fs.mountpoint: fs.device for fs in info.filesystems if fs.mountpoint}


def _finish(info: ImageInfo, start: float) -> ImageInfo:
    info.build_seconds = round(time.monotonic() - start, 2)
    return info


# --------------------------------------------------------------------------------------------- builders


def linux_lvm_xfs(path: Path | str) -> ImageInfo:
    """A Debian root on xfs in LVM (``vg0/root``) with ``/boot`` on ext4; alice's home and ``/srv/many``.

    384 MiB sparse (mkfs.xfs refuses filesystems under 300 MB), MBR: p1 (boot flag) 32 MiB ext4
    ``/boot``, p2 (type 0x8e) the PV.  fstab names the root ``/dev/mapper/vg0-root`` and /boot by UUID.
    """
    start = time.monotonic()
    size = 384 * MiB
    boot_end = FIRST_SECTOR + 32 * MiB // SECTOR - 1
    info = ImageInfo("linux_lvm_xfs", [Path(path)], [size], ["msdos"])
    info.filesystems = [
        Filesystem("/dev/sda1", "ext4", 0, partition=1, uuid=LVM_BOOT_UUID, label="boot", mountpoint="/boot"),
        Filesystem(
            "/dev/vg0/root", "xfs", 0, lv="vg0/root", uuid=LVM_ROOT_UUID, label="root", mountpoint="/"
        ),
    ]
    with _building(info.kind, [path], [size]) as g:
        g.part_init("/dev/sda", "mbr")
        g.part_add("/dev/sda", "p", FIRST_SECTOR, boot_end)
        g.part_add("/dev/sda", "p", boot_end + 1, -1)
        g.part_set_bootable("/dev/sda", 1, True)
        g.part_set_mbr_id("/dev/sda", 2, 0x8E)
        g.mkfs("ext4", "/dev/sda1", label="boot")
        g.set_uuid("/dev/sda1", LVM_BOOT_UUID)
        g.pvcreate("/dev/sda2")
        g.vgcreate("vg0", ["/dev/sda2"])
        g.lvcreate_free("root", "vg0", 100)
        g.mkfs("xfs", "/dev/vg0/root", label="root")
        g.set_uuid("/dev/vg0/root", LVM_ROOT_UUID)
        g.mount("/dev/vg0/root", "/")
        g.mkdir("/boot")
        g.mount("/dev/sda1", "/boot")

        w = _Writer(g, info)
        _linux_os(
            w,
            hostname="lvmhost",
            hosts=b"127.0.0.1\tlocalhost\n127.0.1.1\tlvmhost.example.test\tlvmhost\n"
            b"10.20.30.40\tbackup.example.test\tbackup\n",
            fstab="# /etc/fstab of the vmrecover test image linux_lvm_xfs\n"
            "/dev/mapper/vg0-root  /      xfs   defaults  0 1\n"
            f"UUID={LVM_BOOT_UUID}  /boot  ext4  defaults  0 2\n",
        )
        w.file("/boot/config-test", b"# vmrecover test kernel config\nCONFIG_TEST=y\nCONFIG_XFS_FS=y\n")

        home = "/home/alice"
        w.dir(home, owner=ALICE)
        w.file(
            f"{home}/notes.txt",
            b"Alice's private notes.\nThe backup passphrase is NOT here.\n",
            mode=0o600,
            owner=ALICE,
            mtime=NOTES_MTIME,
        )
        w.file(f"{home}/run.sh", b"#!/bin/sh\necho hello from alice\n", mode=0o755, owner=ALICE)
        docs = f"{home}/docs"
        w.dir(docs, owner=ALICE)
        w.file(f"{docs}/report-2024.txt", b"Quarterly report 2024\n" + b"all good\n" * 20, owner=ALICE)
        w.file(f"{docs}/Résumé 2024 (final).txt", "Alice Ünïcødé — résumé\n".encode(), owner=ALICE)
        w.file(f"{docs}/empty.txt", b"", owner=ALICE)
        w.file(f"{docs}/photo.bin", pseudo_random(1, 3 * MiB // 2), owner=ALICE)
        w.dir(f"{docs}/projects", owner=ALICE)
        w.dir(f"{docs}/projects/vmrecover", owner=ALICE)
        w.file(f"{docs}/projects/vmrecover/plan.md", b"# Plan\n\n1. back up\n2. restore\n", owner=ALICE)
        w.file(
            f"{docs}/projects/vmrecover/data.csv",
            b"id,name\n" + b"".join(f"{i},item{i}\n".encode() for i in range(100)),
            owner=ALICE,
        )
        w.dir(f"{docs}/projects/old", owner=ALICE)  # stays empty
        w.symlink(f"{docs}/latest", "report-2024.txt", owner=ALICE)
        w.symlink(f"{home}/docs-link", "docs", owner=ALICE)
        w.symlink(f"{home}/escape", "../../../../../etc/shadow", owner=ALICE)
        w.symlink(f"{home}/abs", "/etc/hosts", owner=ALICE)
        w.symlink(f"{home}/bootcfg", "/boot/config-test", owner=ALICE)
        w.dir("/srv")
        w.bulk("/srv/many", BULK_COUNT)
        w.finish()
        _fstrim(g)
    _expect_debian(info, "/dev/vg0/root", "lvmhost")
    info.notes += [
        "/home/alice/escape -> ../../../../../etc/shadow climbs out of the filesystem and is dangling in "
        "the guest (there is no /etc/shadow); following it on the host would read the host's file",
        "/home/alice/abs -> /etc/hosts is absolute: in the guest it means the guest's /etc/hosts",
        "/home/alice/bootcfg -> /boot/config-test crosses from the xfs root into the ext4 /boot",
        "/home/alice/docs-link -> docs is a symlink to a directory",
        "/home/alice/notes.txt is mode 0600 owned by 1000:1000, mtime 2024-01-02 03:04:05 UTC",
    ]
    return _finish(info, start)


def linux_ext4_gpt(path: Path | str) -> ImageInfo:
    """A Debian root on one ext4 partition of a GPT disk (64 MiB), fixed disk and partition GUIDs."""
    start = time.monotonic()
    size = 64 * MiB
    info = ImageInfo("linux_ext4_gpt", [Path(path)], [size], ["gpt"])
    info.filesystems = [
        Filesystem("/dev/sda1", "ext4", 0, partition=1, uuid=GPT_ROOT_UUID, label="gptroot", mountpoint="/")
    ]
    with _building(info.kind, [path], [size]) as g:
        g.part_init("/dev/sda", "gpt")
        g.part_add("/dev/sda", "p", FIRST_SECTOR, -FIRST_SECTOR)
        g.part_set_gpt_type("/dev/sda", 1, LINUX_FS_GPT_TYPE)
        g.part_set_name("/dev/sda", 1, "root")
        g.part_set_disk_guid("/dev/sda", GPT_DISK_GUID)
        g.part_set_gpt_guid("/dev/sda", 1, GPT_PART_GUID)
        g.mkfs("ext4", "/dev/sda1", label="gptroot")
        g.set_uuid("/dev/sda1", GPT_ROOT_UUID)
        g.mount("/dev/sda1", "/")
        w = _Writer(g, info)
        _linux_os(
            w,
            hostname="gpthost",
            hosts=b"127.0.0.1\tlocalhost\n192.168.77.7\tgpthost.example.test\tgpthost\n",
            fstab="# /etc/fstab of the vmrecover test image linux_ext4_gpt\n"
            f"UUID={GPT_ROOT_UUID}  /  ext4  defaults  0 1\n",
        )
        w.dir("/home/alice", owner=ALICE)
        w.file("/home/alice/todo.txt", b"- restore a file from a GPT disk\n", owner=ALICE)
        w.dir("/var/www")
        w.file("/var/www/index.html", b"<html><body>gpthost</body></html>\n")
        w.finish()
        _fstrim(g)
    _expect_debian(info, "/dev/sda1", "gpthost")
    return _finish(info, start)


def bare_ext4(path: Path | str) -> ImageInfo:
    """ext4 on the whole disk (64 MiB, no partition table), no OS: a data disk with a few files."""
    start = time.monotonic()
    size = 64 * MiB
    info = ImageInfo("bare_ext4", [Path(path)], [size], [None])
    info.filesystems = [Filesystem("/dev/sda", "ext4", 0, uuid=BARE_UUID, label="bare")]
    with _building(info.kind, [path], [size]) as g:
        g.mkfs("ext4", "/dev/sda", label="bare")
        g.set_uuid("/dev/sda", BARE_UUID)
        g.mount("/dev/sda", "/")
        w = _Writer(g, info)
        w.file("/README.txt", b"A data disk without a partition table.\n")
        w.dir("/data")
        w.file("/data/a.txt", b"alpha\n")
        w.file("/data/secret.key", b"not really a key\n", mode=0o400, owner=(1000, 1000))
        w.dir("/data/sub")
        w.file("/data/sub/b.bin", pseudo_random(3, 200_000))
        w.symlink("/data/a-link", "a.txt")
        w.finish()
        _fstrim(g)
    info.notes.append("no OS: guest paths are from the root of the whole-disk ext4 (/dev/sda)")
    return _finish(info, start)


def _set_ntfs_serial(g: Any, device: str, serial: int) -> None:
    """Give an unmounted NTFS a fixed volume serial (mkntfs picks a random one; there is no tool for it).

    The serial is 8 bytes at 0x48 of the boot sector and of its backup in the volume's last sector.
    """
    boot = g.pread_device(device, SECTOR, 0)
    if boot[3:11] != b"NTFS    ":
        raise FsImageError(f"{device} has no NTFS boot sector")
    sector_size = int.from_bytes(boot[0x0B:0x0D], "little")
    backup = int.from_bytes(boot[0x28:0x30], "little") * sector_size
    value = serial.to_bytes(8, "little")
    offsets = [0]
    if g.pread_device(device, SECTOR, backup) == boot:
        offsets.append(backup)
    for off in offsets:
        g.pwrite_device(device, value, off + 0x48)


def ntfs_disk(path: Path | str) -> ImageInfo:
    """MBR (64 MiB) with one NTFS partition holding a Windows-like tree; not an OS to inspection."""
    start = time.monotonic()
    size = 64 * MiB
    info = ImageInfo("ntfs_disk", [Path(path)], [size], ["msdos"])
    info.filesystems = [
        Filesystem("/dev/sda1", "ntfs", 0, partition=1, uuid=f"{NTFS_SERIAL:016X}", label="Windows")
    ]
    with _building(info.kind, [path], [size]) as g:
        g.part_disk("/dev/sda", "mbr")
        g.part_set_mbr_id("/dev/sda", 1, 0x07)
        g.part_set_bootable("/dev/sda", 1, True)
        g.mkfs("ntfs", "/dev/sda1", label="Windows")
        g.mount("/dev/sda1", "/")
        w = _Writer(g, info, posix=False)
        w.file("/Users/Bob/Documents/report.txt", b"Bob's report\r\nQ1: fine\r\nQ2: better\r\n")
        w.file("/Users/Bob/Documents/Ünïcødé – 日本語.txt", "non-ASCII name: ✓\r\n".encode())
        w.file("/Users/Bob/Desktop/todo list.txt", b"call Alice\r\n")
        w.dir("/Users/Public")
        w.file(
            "/Windows/System32/drivers/etc/hosts",
            b"# Copyright (c) 1993-2009 Microsoft Corp.\r\n127.0.0.1       localhost\r\n",
        )
        w.dir("/Windows/System32/config")  # where the registry hives would be: none here
        w.file("/Program Files/Example App/readme.txt", b"Example App 1.0\r\n")
        w.file("/Program Files/Example App/app.dat", pseudo_random(4, 100_000))
        w.finish()
        g.umount_all()
        _set_ntfs_serial(g, "/dev/sda1", NTFS_SERIAL)
    info.notes += [
        "not recognised as Windows: inspection needs the registry hives (System32/config/SOFTWARE, "
        "SYSTEM), so inspect_os() finds no OS and the NTFS is a plain data filesystem",
        "there is deliberately no System32/cmd.exe: a fake one makes inspect_os() fail for the whole "
        "handle ('unknown architecture')",
        "ntfs-3g shows every file as mode 0777 owned by root: modes and owners are not recorded",
        "names are case-preserving; /Users/Bob/Documents/Ünïcødé – 日本語.txt has a non-ASCII name",
    ]
    return _finish(info, start)


def two_disk_linux(path0: Path | str, path1: Path | str) -> ImageInfo:
    """Two 64 MiB MBR disks: a Debian ext4 root whose fstab mounts the second disk's ext4 at /data."""
    start = time.monotonic()
    size = 64 * MiB
    info = ImageInfo("two_disk_linux", [Path(path0), Path(path1)], [size, size], ["msdos", "msdos"])
    info.filesystems = [
        Filesystem("/dev/sda1", "ext4", 0, partition=1, uuid=TWO_ROOT_UUID, label="tworoot", mountpoint="/"),
        Filesystem("/dev/sdb1", "ext4", 1, partition=1, uuid=TWO_DATA_UUID, label="data", mountpoint="/data"),
    ]
    with _building(info.kind, [path0, path1], [size, size]) as g:
        for disk, dev, label, uuid in (
            ("/dev/sda", "/dev/sda1", "tworoot", TWO_ROOT_UUID),
            ("/dev/sdb", "/dev/sdb1", "data", TWO_DATA_UUID),
        ):
            g.part_disk(disk, "mbr")
            g.mkfs("ext4", dev, label=label)
            g.set_uuid(dev, uuid)
        g.part_set_bootable("/dev/sda", 1, True)
        g.mount("/dev/sda1", "/")
        g.mkdir("/data")
        g.mount("/dev/sdb1", "/data")
        w = _Writer(g, info)
        _linux_os(
            w,
            hostname="dbhost",
            hosts=b"127.0.0.1\tlocalhost\n10.9.8.7\tdbhost.example.test\tdbhost\n",
            fstab="# /etc/fstab of the vmrecover test image two_disk_linux\n"
            f"UUID={TWO_ROOT_UUID}  /      ext4  defaults  0 1\n"
            f"UUID={TWO_DATA_UUID}  /data  ext4  defaults  0 2\n",
        )
        w.dir("/data/db")
        w.file(
            "/data/db/records.csv",
            b"id,customer,amount\n"
            + b"".join(f"{i},cust{i % 17},{i * 3.25:.2f}\n".encode() for i in range(500)),
        )
        w.file("/data/README", b"disk 1: the database volume\n")
        w.finish()
        _fstrim(g)
    _expect_debian(info, "/dev/sda1", "dbhost")
    info.notes.append(
        "/data comes from disk 1 (UUID in disk 0's fstab): add both disks, in order, to see both mountpoints"
    )
    return _finish(info, start)


def unknown_disk(path: Path | str) -> ImageInfo:
    """MBR (64 MiB) with one 16 MiB partition full of pseudo-random bytes: no recognisable filesystem."""
    start = time.monotonic()
    size = 64 * MiB
    part_bytes = 16 * MiB
    info = ImageInfo("unknown_disk", [Path(path)], [size], ["msdos"])
    info.filesystems = [Filesystem("/dev/sda1", "unknown", 0, partition=1)]
    with tempfile.TemporaryDirectory(prefix="vmrecover-fsimages-") as tmp:
        noise = Path(tmp) / "noise"
        noise.write_bytes(pseudo_random(6, part_bytes))
        with _building(info.kind, [path], [size]) as g:
            g.part_init("/dev/sda", "mbr")
            g.part_add("/dev/sda", "p", FIRST_SECTOR, FIRST_SECTOR + part_bytes // SECTOR - 1)
            g.part_set_mbr_id("/dev/sda", 1, 0x83)
            g.upload(str(noise), "/dev/sda1")
    info.notes.append(
        "partition 1 is pseudo-random bytes: list_filesystems() says 'unknown', nothing to mount"
    )
    return _finish(info, start)


def big_file_disk(path: Path | str, size_mib: int = 100) -> ImageInfo:
    """MBR, one ext4 partition holding ``/big.bin``: *size_mib* MiB of pseudo-random bytes (benchmarks)."""
    if size_mib < 1:
        raise BadInput(f"size_mib must be at least 1, not {size_mib}")
    start = time.monotonic()
    size = (size_mib + size_mib // 16 + 32) * MiB  # room for ext4's metadata and journal
    info = ImageInfo("big_file_disk", [Path(path)], [size], ["msdos"])
    info.filesystems = [Filesystem("/dev/sda1", "ext4", 0, partition=1, uuid=BIG_UUID, label="big")]
    with tempfile.TemporaryDirectory(prefix="vmrecover-fsimages-") as tmp:
        local = Path(tmp) / "big.bin"
        digest = hashlib.sha256()
        rng = random.Random(7)
        with open(local, "wb") as f:
            for _ in range(size_mib):
                chunk = rng.randbytes(MiB)
                digest.update(chunk)
                f.write(chunk)
        with _building(info.kind, [path], [size]) as g:
            g.part_disk("/dev/sda", "mbr")
            g.mkfs("ext4", "/dev/sda1", label="big")
            g.set_uuid("/dev/sda1", BIG_UUID)
            g.mount("/dev/sda1", "/")
            w = _Writer(g, info)
            w.large_file("/big.bin", local, digest.hexdigest())
            _fstrim(g)
    info.notes.append(f"/big.bin: {size_mib} MiB of random.Random(7).randbytes, 1 MiB at a time")
    return _finish(info, start)


# /sda1/journal.txt: three 4 KiB blocks (more than one: a one-block file's filefrag report once sent
# it through the appliance anyway); the blocks on the disk hold OLD, the ext4 journal NEW.
JOURNAL_OLD = (b"old text: what the file's own blocks on the disk hold\n" * 250)[: 3 * 4096]
JOURNAL_NEW = (b"new text: committed to the journal, not yet written in place\n" * 250)[: 3 * 4096]


def _appliance_sh(g: Any, command: str) -> str:
    """A shell command in the appliance itself (not the guest): its output."""
    return str(g.debug("sh", [command]))


def xfs_log_state(g: Any, device: str) -> str:
    """``CLEAN`` or ``DIRTY`` as ``xfs_logprint -t`` (the kernel's head/tail search) finds the log of the
    unmounted xfs *device* (the appliance's own name of it: see :func:`drive_label`)."""
    out = _appliance_sh(g, f"xfs_logprint -t {device} 2>&1 | grep -m1 'state:'")
    if "<CLEAN>" in out:
        return "CLEAN"
    if "<DIRTY>" in out:
        return "DIRTY"
    raise FsImageError(f"xfs_logprint on {device} says: {out.strip()}")


def dirty_journals(path: Path | str) -> ImageInfo:
    """MBR, no OS, three filesystems in the states a crash-consistent backup catches them in.

    ``/sda1`` ext4 (4 KiB blocks) whose journal holds a committed rewrite of ``/journal.txt`` that is
    not yet in place (``needs_recovery``): the file's blocks on the disk hold :data:`JOURNAL_OLD`, the
    filesystem after replay :data:`JOURNAL_NEW`.  ``/sda2`` xfs unmounted cleanly, with a setgid
    folder ``/tools`` holding a setuid and a setgid file; ``/sda3`` xfs whose log is dirty (shut down
    with ``xfs_io -x -c 'shutdown -f'`` after ``/dirty.bin`` was written and synced, so its inode
    and extents are in the log only).  The builder checks the states it leaves with ``tune2fs -l``
    and ``xfs_logprint -t``.
    """
    start = time.monotonic()
    xfs_sectors = 320 * MiB // SECTOR  # mkfs.xfs wants more than 300 MB
    p1_end = FIRST_SECTOR + 32 * MiB // SECTOR - 1
    p2_end = p1_end + xfs_sectors
    p3_end = p2_end + xfs_sectors
    size = (p3_end + 1) * SECTOR + MiB
    info = ImageInfo("dirty_journals", [Path(path)], [size], ["msdos"])
    info.filesystems = [
        Filesystem("/dev/sda1", "ext4", 0, partition=1, uuid=JOURNAL_EXT4_UUID, label="journal"),
        Filesystem("/dev/sda2", "xfs", 0, partition=2, uuid=CLEAN_XFS_UUID, label="cleanxfs"),
        Filesystem("/dev/sda3", "xfs", 0, partition=3, uuid=DIRTY_XFS_UUID, label="dirtyxfs"),
    ]
    with _building(info.kind, [path], [size]) as g:
        g.part_init("/dev/sda", "mbr")
        g.part_add("/dev/sda", "p", FIRST_SECTOR, p1_end)
        g.part_add("/dev/sda", "p", p1_end + 1, p2_end)
        g.part_add("/dev/sda", "p", p2_end + 1, p3_end)
        g.mkfs("ext4", "/dev/sda1", label="journal", blocksize=4096)
        g.set_uuid("/dev/sda1", JOURNAL_EXT4_UUID)
        for dev, label, uuid in (
            ("/dev/sda2", "cleanxfs", CLEAN_XFS_UUID),
            ("/dev/sda3", "dirtyxfs", DIRTY_XFS_UUID),
        ):
            g.mkfs("xfs", dev, label=label)
            g.set_uuid(dev, uuid)
        w = _Writer(g, info)
        for n in (1, 2, 3):
            g.mkmountpoint(f"/sda{n}")
            g.mount(f"/dev/sda{n}", f"/sda{n}")
        w.file("/sda1/journal.txt", JOURNAL_OLD)
        w.file("/sda1/plain.txt", b"an ext4 file the journal does not touch\n")
        w.file("/sda2/clean.bin", pseudo_random(8, 300_000))
        w.dir("/sda2/tools", mode=0o2775)
        w.file("/sda2/tools/suid", ELF_X86_64, mode=0o4755)
        w.file("/sda2/tools/sgid", ELF_X86_64, mode=0o2711)
        w.file("/sda3/dirty.bin", pseudo_random(9, 300_000))
        w.finish()
        g.umount("/sda1")
        g.umount("/sda2")  # cleanly
        g.sync()
        _appliance_sh(g, "xfs_io -x -c 'shutdown -f' /sysroot/sda3 2>&1")  # the log stays dirty
        g.umount("/sda3")

        # A transaction rewriting the file's blocks, committed to the journal, not replayed.
        p1 = f"/dev/disk/guestfs/{drive_label(0)}1"
        blocks = ",".join(
            str(int(b))
            for b in _appliance_sh(g, f"debugfs -R 'blocks /journal.txt' {p1} 2>/dev/null").split()
        )
        b64 = base64.b64encode(JOURNAL_NEW).decode()
        _appliance_sh(
            g,
            f"echo {b64} | base64 -d > /tmp/new && printf 'jo\\njw -b {blocks} /tmp/new\\njc\\n' "
            f"> /tmp/cmds && debugfs -w -f /tmp/cmds {p1} 2>&1",
        )
        features = g.tune2fs_l("/dev/sda1").get("Filesystem features", "")
        states = {n: xfs_log_state(g, f"/dev/disk/guestfs/{drive_label(0)}{n}") for n in (2, 3)}
        if "needs_recovery" not in features or states != {2: "CLEAN", 3: "DIRTY"}:
            raise FsImageError(f"dirty_journals: ext4 features {features!r}, xfs logs {states}")
        for n in (1, 2, 3):
            g.rmmountpoint(f"/sda{n}")
    info.files["/sda1/journal.txt"] = JOURNAL_NEW  # what the guest sees: the journal replayed
    info.notes += [
        "no OS: the filesystems are /sda1, /sda2 and /sda3 (as 'vmrecover files' mounts them)",
        "/sda1/journal.txt reads JOURNAL_NEW once the ext4 journal is replayed; its blocks on the disk "
        "still holds JOURNAL_OLD (read it at its extents straight from the disk and you get old bytes)",
        "/sda3's xfs log is dirty: mounting it (read-only too, on a writable overlay) replays it",
    ]
    return _finish(info, start)


BUILDERS: dict[str, Callable[..., ImageInfo]] = {
    "linux_lvm_xfs": linux_lvm_xfs,
    "linux_ext4_gpt": linux_ext4_gpt,
    "bare_ext4": bare_ext4,
    "ntfs_disk": ntfs_disk,
    "two_disk_linux": two_disk_linux,
    "unknown_disk": unknown_disk,
    "big_file_disk": big_file_disk,
    "dirty_journals": dirty_journals,
}
DISKS = {kind: 2 if kind == "two_disk_linux" else 1 for kind in BUILDERS}


def build(kind: str, paths: Sequence[Path | str], **kwargs: Any) -> ImageInfo:
    """Build the image *kind* (``linux_lvm_xfs``, ``two-disk-linux``...) into *paths* (one per disk)."""
    name = kind.replace("-", "_")
    if name not in BUILDERS:
        raise BadInput(f"unknown image kind {kind!r}", hint=f"one of: {', '.join(BUILDERS)}")
    if len(paths) != DISKS[name]:
        raise BadInput(f"{name} needs {DISKS[name]} output path(s), got {len(paths)}")
    return BUILDERS[name](*paths, **kwargs)


# --------------------------------------------------------------------------------------------- changes


def _mount_guest(g: Any, what: str, *, readonly: bool) -> None:
    """Mount the guest's filesystems at their places: the only one at ``/``, or per inspection."""
    mount = g.mount_ro if readonly else g.mount
    mountable = [dev for dev, t in g.list_filesystems().items() if t not in NOT_A_FILESYSTEM]
    if len(mountable) == 1:
        mount(mountable[0], "/")
        return
    roots = g.inspect_os()
    if len(roots) != 1:
        raise BadInput(
            f"{what}: {len(mountable)} filesystems and {len(roots)} operating systems: "
            "cannot tell which file is meant",
            hint="change_files() needs one filesystem or one recognisable OS",
        )
    mps = g.inspect_get_mountpoints(roots[0])
    for mp in sorted(mps, key=len):
        mount(mps[mp], mp)


def change_files(
    paths: Path | str | Sequence[Path | str],
    changes: Mapping[str, bytes | None],
    *,
    mtime: int | None = None,
) -> None:
    """Rewrite (``bytes``) or delete (``None``) files of an existing image, in one appliance launch.

    *paths* is the image's disk (or its disks, in order).  Guest paths are resolved as in
    :class:`ImageInfo`: through the OS's mountpoints if the image has several filesystems, else from
    the root of its only filesystem.  A rewritten file keeps its mode and owner (a new file gets
    0644 root); *mtime* sets the mtime of every rewritten file.  Deleting a missing file, or writing
    into a missing directory, is :class:`NotFound`.
    """
    disks = [paths] if isinstance(paths, str | Path) else list(paths)
    what = ", ".join(str(p) for p in disks)
    try:
        with guestfs_handle(disks, readonly=False) as g:
            _mount_guest(g, what, readonly=False)
            for guest_path, data in changes.items():
                if data is None:
                    if not g.is_file(guest_path):
                        raise NotFound(f"{guest_path} is not a file in {what}: nothing to delete")
                    g.rm(guest_path)
                    continue
                if not g.is_dir(posixpath.dirname(guest_path)):
                    raise NotFound(f"{posixpath.dirname(guest_path)} is not a directory in {what}")
                g.write(guest_path, data)
                if mtime is not None:
                    g.utimens(guest_path, mtime, 0, mtime, 0)
    except RuntimeError as e:
        raise FsImageError(f"changing files in {what} failed: {e}") from None


def change_file(
    paths: Path | str | Sequence[Path | str], guest_path: str, data: bytes | None, *, mtime: int | None = None
) -> None:
    """Rewrite (*data*) or delete (``None``) one file of an image: :func:`change_files` with one change."""
    change_files(paths, {guest_path: data}, mtime=mtime)


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.testkit.fsimages", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an image and print what is in it as JSON")
    b.add_argument("kind", help=f"one of: {', '.join(BUILDERS)}")
    b.add_argument("out", nargs="+", type=Path, help="output raw image(s): two for two_disk_linux")
    b.add_argument("--size-mib", type=int, default=None, help="big_file_disk: size of /big.bin")
    c = sub.add_parser("change", help="rewrite or delete one file of an image")
    c.add_argument("disks", nargs="+", type=Path)
    c.add_argument("--path", required=True, help="guest path, e.g. /etc/hosts")
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--data-file", type=Path, help="the new contents")
    how.add_argument("--delete", action="store_true")
    c.add_argument("--mtime", type=int, default=None, help="mtime (seconds since the epoch) of the new file")
    sub.add_parser("kinds", help="list the image kinds")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "kinds":
            for kind, fn in BUILDERS.items():
                print(f"{kind:16} {(fn.__doc__ or '').splitlines()[0]}")
        elif args.cmd == "build":
            kwargs = {} if args.size_mib is None else {"size_mib": args.size_mib}
            info = build(args.kind, args.out, **kwargs)
            json.dump(info.to_json(), sys.stdout, indent=2, ensure_ascii=False)
            print()
        else:
            data = None if args.delete else args.data_file.read_bytes()
            change_file(args.disks, args.path, data, mtime=args.mtime)
    except VmrecoverError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
