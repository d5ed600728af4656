"""One restore point's disks opened read-only in a libguestfs appliance, its guest filesystems mounted
where the guest mounts them.

- **Layout.**  If libguestfs' inspection recognises an operating system, its filesystems are mounted
  at the guest's own mount points (``/etc/hosts`` comes from the right filesystem on a multi-disk,
  multi-filesystem guest).  Otherwise a single filesystem is mounted at ``/`` and several at
  ``/<device>`` (``/sda1``, ``/vg0-root``).  Swap, unknown and encrypted filesystems are reported,
  never mounted; a point with nothing mountable is :class:`NotFound` naming what was found.
- **Paths** are guest paths: ``/etc/hosts``, ``/Windows/System32`` or ``C:\\Users\\Bob``.  ``..``
  never climbs above the guest's root, and on NTFS the case of each component is found as Windows
  would (``case_sensitive_path``).  Nothing is ever written to the disks (``readonly``, ``mount_ro``).
- **Big folders** are listed in batches (``ls0`` to a host file, then ``lstatnslist`` per
  :data:`BATCH` names), never all entries' attributes in one message.
- **Journals.**  Before anything is mounted, each ext2/3/4 and xfs filesystem's journal is looked at
  (:meth:`GuestImage._journal_state`): mounting one whose journal needs recovery replays it (even
  ``mount_ro``: the read-only drive has a writable overlay), so the filesystem the appliance shows
  is not what the disk holds, and such files are never read straight from the disk.

All methods are synchronous and serialised by a lock (a guestfs handle is not thread-safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import shlex
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFound, VmrecoverError
from ..qemu import accelerator, kvm_works

log = logging.getLogger("vmrecover.files")

BATCH = 1000
CONSOLE_LINES = 40  # of a starting appliance's console, kept for a failure's report
VERBOSE_CONSOLE_LINES = 400  # the same, for a second start in verbose mode (the kernel's whole boot)
LAUNCH_REPORT_S = 60.0  # a start that takes longer says so this often
LAUNCH_TRIES = 2  # a start that fails is tried once more, verbosely
SKIP_TYPES = {"swap", "unknown", ""}
ENCRYPTED_TYPES = {"crypto_LUKS", "BitLocker"}
Extents = tuple[Path, list[tuple[int, int, int]]]  # a disk image, and (file offset, disk offset, length)


class GuestfsError(VmrecoverError):
    """libguestfs failed (the appliance could not start, or an operation failed unexpectedly)."""


def load_guestfs() -> Any:
    """The libguestfs module, with the environment this project runs it in: the direct backend (no
    libvirtd), and TCG unless KVM really works here (:func:`vmrecover.qemu.accelerator`: libguestfs
    would pick KVM whenever /dev/kvm opens, and qemu 7.2 then aborts on some hosts).  An appliance
    with nested virtualization starts in seconds with KVM where TCG inside a VM takes many minutes.
    ``LIBGUESTFS_BACKEND_SETTINGS``, when set, is left as it is."""
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    if "LIBGUESTFS_BACKEND_SETTINGS" not in os.environ:
        accel = accelerator()
        os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg" if accel == "tcg" else ""
        log.info("libguestfs runs with %s (%s)", accel, kvm_works()[1])
    try:
        import guestfs
    except ImportError:
        raise GuestfsError(
            "the libguestfs Python binding is not installed",
            hint="run 'make setup' (Debian packages libguestfs-tools python3-guestfs libguestfs-xfs)",
        ) from None
    return guestfs


@dataclass
class FsInfo:
    device: str
    type: str
    label: str = ""
    uuid: str = ""
    mountpoint: str | None = None  # the guest path it is mounted at, None if not mounted
    note: str = ""  # why it is not mounted
    # ext2/3/4 and xfs, as found before mounting: True if its journal (log) needs recovery, False if
    # clean, None if not known (another filesystem, or the tools gave no clear answer)
    needs_recovery: bool | None = None


@dataclass
class OsInfo:
    root: str
    type: str
    distro: str
    product: str
    version: str
    hostname: str
    mountpoints: dict[str, str] = field(default_factory=dict)  # guest path -> device
    drives: dict[str, str] = field(default_factory=dict)  # Windows drive letter -> device


@dataclass
class Entry:
    path: str
    kind: str  # file, dir, symlink, other
    mode: int
    size: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    target: str | None = None  # of a symlink

    @property
    def name(self) -> str:
        return posixpath.basename(self.path) or "/"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["mode"] = f"{stat.S_IMODE(self.mode):04o}"
        out["mtime"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.mtime_ns / 1e9))
        del out["mtime_ns"]
        return out


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    return "symlink" if stat.S_ISLNK(mode) else "other"


def _entry(path: str, st: dict[str, int], target: str | None = None) -> Entry:
    mode = st["st_mode"]
    mtime = st["st_mtime_sec"] * 1_000_000_000 + st["st_mtime_nsec"]
    return Entry(path, _kind(mode), mode, st["st_size"], mtime, st["st_uid"], st["st_gid"], target)


def _dev_name(device: str) -> str:
    return device.removeprefix("/dev/").replace("/", "-")


def _drive_label(index: int) -> str:
    """The label of the drive *index* (letters only, as libguestfs wants): the appliance names the
    drive ``/dev/disk/guestfs/<label>`` and its partitions ``<label>N``, whatever order its kernel
    found the disks in (the API's ``/dev/sda`` is translated; a shell command's is not)."""
    return "vmr" + "".join(chr(ord("a") + int(c)) for c in str(index))


def _disk_index(letters: str) -> int:
    """``a`` -> 0, ``z`` -> 25, ``aa`` -> 26 (libguestfs' /dev/sdX names)."""
    n = 0
    for c in letters:
        n = n * 26 + ord(c) - ord("a") + 1
    return n - 1


def _ext_needs_recovery(tune2fs: dict[str, str]) -> bool | None:
    """From ``tune2fs -l``: the journal needs recovery, or orphans are waiting to be cleaned up
    (both change the filesystem when it is mounted)."""
    features = tune2fs.get("Filesystem features")
    if features is None:
        return None
    words = set(features.split())
    return bool(words & {"needs_recovery", "orphan_present"}) or "First orphan inode" in tune2fs


def _xfs_log_dirty(logprint: str) -> bool | None:
    """From ``xfs_logprint -t``: its ``log tail: T head: H state: <CLEAN>|<DIRTY>`` line (the
    kernel's own head/tail search, libxlog: clean when the last record is an unmount record)."""
    m = re.search(r"log tail: *(\d+) +head: *(\d+) +state: *<(CLEAN|DIRTY)>", logprint)
    if m is None:
        return None
    return m.group(3) == "DIRTY" or m.group(1) != m.group(2)


class _LaunchWatch:
    """A libguestfs start, watched: the appliance's console is kept (its last :data:`CONSOLE_LINES`
    lines, from libguestfs' appliance events, so no verbose mode and no console on stderr), and while
    the start lasts, every :data:`LAUNCH_REPORT_S` seconds the log and the caller's progress say how
    long it has taken and what the console said last.  A start that fails logs the kept lines.  Under
    TCG, or with nested virtualization, a start takes minutes; this is how a slow one is told from a
    stuck one, and where it stopped."""

    def __init__(self, guestfs: Any, g: Any, what: str, progress: Callable[[str], None]) -> None:
        self.g, self.what, self.progress = g, what, progress
        self.lines: deque[str] = deque(maxlen=VERBOSE_CONSOLE_LINES if g.get_verbose() else CONSOLE_LINES)
        self._partial = ""
        self._done = threading.Event()
        # library messages come only in verbose mode (qemu's command line, supermin's steps); with a
        # callback registered, libguestfs prints none of these on stderr
        events = guestfs.EVENT_APPLIANCE | guestfs.EVENT_WARNING | guestfs.EVENT_LIBRARY
        self._handle = g.set_event_callback(self._on_event, events)
        self.started = time.monotonic()
        self.seconds = 0.0
        self.failed = False

    def _on_event(self, event: int, handle: int, buf: bytes | str, array: Any) -> None:
        text = buf.decode("utf-8", "replace") if isinstance(buf, bytes) else str(buf)
        *whole, self._partial = (self._partial + text).split("\n")
        for line in whole:
            line = "".join(c for c in line if c.isprintable()).strip()
            if line:
                self.lines.append(line)

    def tail(self, n: int) -> list[str]:
        return list(self.lines)[-n:]

    def _report(self) -> None:
        while not self._done.wait(LAUNCH_REPORT_S):
            took = time.monotonic() - self.started
            last = self.lines[-1] if self.lines else "(nothing yet)"
            log.warning("the libguestfs appliance for %s is still starting after %.0f s; its console's "
                        "last line: %s", self.what, took, last[:200])  # fmt: skip
            self.progress(f"still starting the libguestfs appliance for {self.what} ({took:.0f} s)")

    def __enter__(self) -> _LaunchWatch:
        threading.Thread(target=self._report, name=f"launch {self.what}", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        self._done.set()
        self.seconds = time.monotonic() - self.started
        self.failed = kind is not None
        with contextlib.suppress(RuntimeError):
            self.g.delete_event_callback(self._handle)
        if self.failed:
            log.warning("the libguestfs appliance for %s failed to start after %.0f s; its console's last "
                        "lines:\n%s", self.what, self.seconds, "\n".join(self.lines))  # fmt: skip


class GuestImage:
    """A read-only appliance over *disks* (raw files, e.g. the datastore's ``.raw`` views)."""

    def __init__(self, disks: Sequence[Path], *, what: str, progress: Callable[[str], None] = lambda m: None):
        guestfs = load_guestfs()
        self.what = what
        self.disks = [Path(d) for d in disks]
        self._lock = threading.Lock()
        self.launch_tries = 0
        self.g = self._launch(guestfs, progress)
        try:
            progress(f"inspecting {what}")
            self.os, self.filesystems = self._mount()
        except RuntimeError as exc:
            self.g.close()
            raise GuestfsError(f"cannot open {what} with libguestfs: {exc}") from None
        except BaseException:
            self.g.close()
            raise
        self.ntfs = any(f.type == "ntfs" and f.mountpoint for f in self.filesystems)
        self.last_used = time.monotonic()

    def _launch(self, guestfs: Any, progress: Callable[[str], None]) -> Any:
        """A started handle over the disks.  A start that fails is tried once more with a new handle in
        verbose mode: a nested hypervisor (KVM on an emulated AMD-V, TCG inside a VM) now and then loses
        a start that the next one survives, and if the second fails too, its log holds the kernel's
        whole boot rather than a quiet console."""
        what = self.what
        while True:
            self.launch_tries += 1
            g = guestfs.GuestFS(python_return_dict=True)
            watch = None
            try:
                g.set_verbose(self.launch_tries > 1)
                for i, d in enumerate(self.disks):
                    g.add_drive_opts(str(d), readonly=True, format="raw", label=_drive_label(i))
                progress(f"starting a libguestfs appliance for {what} (about 20 s under TCG)")
                with _LaunchWatch(guestfs, g, what, progress) as watch:
                    g.launch()
            except RuntimeError as exc:
                g.close()
                tail = ""
                if watch is not None and watch.failed:
                    tail = f"; its console's last lines: {' | '.join(watch.tail(5))}"
                if watch is not None and watch.failed and self.launch_tries < LAUNCH_TRIES:
                    log.warning("starting the libguestfs appliance for %s once more, in verbose mode, after: "
                                "%s%s", what, exc, tail)  # fmt: skip
                    progress(f"the libguestfs appliance for {what} failed to start; starting it once more")
                    continue
                hint = "run 'libguestfs-test-tool' to see why the appliance fails here"
                raise GuestfsError(f"cannot open {what} with libguestfs: {exc}{tail}", hint=hint) from None
            except BaseException:
                g.close()
                raise
            self.launch_seconds = watch.seconds
            log.info("the libguestfs appliance for %s started in %.1f s (try %d)", what, watch.seconds,
                     self.launch_tries)  # fmt: skip
            if self.launch_tries > 1:
                g.set_verbose(False)  # what it does from now on needs no debug messages
            return g

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(RuntimeError):
                self.g.umount_all()
            self.g.close()

    # ----------------------------------------------------------------------------- layout
    def _mount(self) -> tuple[list[OsInfo], list[FsInfo]]:
        g = self.g
        fss = []
        for dev, fstype in sorted(g.list_filesystems().items()):
            info = FsInfo(dev, fstype)
            with contextlib.suppress(RuntimeError):
                info.label = g.vfs_label(dev)
            with contextlib.suppress(RuntimeError):
                info.uuid = g.vfs_uuid(dev)
            if fstype in ENCRYPTED_TYPES:
                info.note = "encrypted: not opened (no key)"
            elif fstype in SKIP_TYPES:
                info.note = "no filesystem libguestfs recognises" if fstype != "swap" else "swap"
            info.needs_recovery = self._journal_state(dev, fstype)  # before inspection mounts it
            fss.append(info)
        by_dev = {f.device: f for f in fss}
        systems = []
        for root in g.inspect_os():
            mps = g.inspect_get_mountpoints(root)
            drives = {}
            if g.inspect_get_type(root) == "windows":
                with contextlib.suppress(RuntimeError):
                    drives = g.inspect_get_drive_mappings(root)
            systems.append(OsInfo(
                root, g.inspect_get_type(root), g.inspect_get_distro(root), g.inspect_get_product_name(root),
                f"{g.inspect_get_major_version(root)}.{g.inspect_get_minor_version(root)}",
                g.inspect_get_hostname(root), mps, drives,
            ))  # fmt: skip
        if systems:
            # The first operating system's layout; a second one (dual boot) is reported by inspect.
            for mp, dev in sorted(systems[0].mountpoints.items(), key=lambda kv: len(kv[0])):
                self._mount_one(by_dev.get(dev) or FsInfo(dev, "?"), mp)
        else:
            usable = [f for f in fss if not f.note]
            for f in usable:
                if len(usable) == 1:
                    self._mount_one(f, "/")
                else:
                    g.mkmountpoint("/" + _dev_name(f.device))
                    self._mount_one(f, "/" + _dev_name(f.device))
        if not any(f.mountpoint for f in fss):
            found = ", ".join(f"{f.device}: {f.type or 'nothing'}" for f in fss) or "no partitions"
            raise NotFound(
                f"{self.what} has no filesystem that can be opened ({found})",
                hint="supported: ext2/3/4, xfs, btrfs, vfat, NTFS, on partitions or LVM; encrypted "
                "volumes are not opened",
            )
        return systems, fss

    def _appliance_device(self, device: str) -> str | None:
        """The appliance's own name of an API device, for shell commands (LVs keep theirs)."""
        m = re.fullmatch(r"/dev/sd([a-z]+)(\d*)", device)
        if m is None:
            return device if re.fullmatch(r"/dev/[\w.+-]+/[\w.+-]+", device) else None
        index = _disk_index(m.group(1))
        return f"/dev/disk/guestfs/{_drive_label(index)}{m.group(2)}" if index < len(self.disks) else None

    def _journal_state(self, device: str, fstype: str) -> bool | None:
        """Whether the journal of ext2/3/4 or xfs *device* needs recovery (see :class:`FsInfo`).
        Must run before the filesystem is first mounted: mounting replays the journal into the
        drive's overlay, after which the appliance only sees a clean one."""
        try:
            if fstype in ("ext2", "ext3", "ext4"):
                return _ext_needs_recovery(self.g.tune2fs_l(device))
            if fstype == "xfs":
                dev = self._appliance_device(device)
                if dev is None:
                    return None
                cmd = f"xfs_logprint -t {shlex.quote(dev)} 2>&1 | grep -m1 'state:'"
                return _xfs_log_dirty(self.g.debug("sh", [cmd]))
        except RuntimeError as exc:
            log.info("%s: cannot tell whether the journal of %s needs recovery: %s", self.what, device, exc)
        return None

    def _mount_one(self, f: FsInfo, where: str) -> None:
        try:
            self.g.mount_ro(f.device, where)
            f.mountpoint = where
        except RuntimeError as exc:
            f.note = f"cannot be mounted: {exc}"

    def info(self) -> dict[str, Any]:
        return {
            "operating_systems": [asdict(o) for o in self.os],
            "filesystems": [asdict(f) for f in self.filesystems],
        }

    # ----------------------------------------------------------------------------- paths
    def resolve(self, guest_path: str) -> str:
        """The appliance path of a guest path (``/etc/hosts``, ``C:\\Users\\Bob``)."""
        text = guest_path.strip()
        m = re.fullmatch(r"([A-Za-z]):(.*)", text, re.S)
        if m:
            text = self._drive_root(m.group(1).upper()) + "/" + m.group(2).replace("\\", "/")
        elif self.ntfs and "\\" in text:
            text = text.replace("\\", "/")
        path = posixpath.normpath("/" + text.lstrip("/"))  # '..' stops at the guest's root
        path = "/" if path == "//" else path
        if self.ntfs:
            with self._lock, contextlib.suppress(RuntimeError):
                path = self.g.case_sensitive_path(path)
        return path

    def _drive_root(self, letter: str) -> str:
        for o in self.os:
            dev = o.drives.get(letter)
            if dev is not None:
                for f in self.filesystems:
                    if f.device == dev and f.mountpoint:
                        return f.mountpoint.rstrip("/")
        ntfs = [f for f in self.filesystems if f.type == "ntfs" and f.mountpoint]
        if letter == "C" and len(ntfs) == 1:
            return ntfs[0].mountpoint.rstrip("/")  # type: ignore[union-attr]
        raise NotFound(f"{self.what} has no drive {letter}:", hint="see 'vmrecover files inspect'")

    # ----------------------------------------------------------------------------- reading
    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self.last_used = time.monotonic()
            return fn(*args)

    def stat(self, path: str) -> Entry:
        try:
            st = self._call(self.g.lstatns, path)
        except RuntimeError as exc:
            if "No such file" in str(exc) or "ENOENT" in str(exc):
                raise NotFound(f"{path} does not exist in {self.what}",
                               hint="list the folder with 'vmrecover files ls'") from None  # fmt: skip
            raise GuestfsError(f"cannot read {path} in {self.what}: {exc}") from None
        target = self._call(self.g.readlink, path) if stat.S_ISLNK(st["st_mode"]) else None
        return _entry(path, st, target)

    def _names(self, fn: Callable[[str, str], None], path: str) -> Iterator[str]:
        """Names a *fn* (ls0, find0) writes NUL-separated to a host file, read back lazily."""
        with tempfile.NamedTemporaryFile(prefix="vmrecover-names-") as tmp:
            self._call(fn, path, tmp.name)
            with open(tmp.name, "rb") as f:
                rest = b""
                while block := f.read(1 << 20):
                    parts = (rest + block).split(b"\0")
                    rest = parts.pop()
                    for p in parts:
                        if p:
                            yield os.fsdecode(p)
                if rest:
                    yield os.fsdecode(rest)

    def listdir(self, path: str) -> Iterator[Entry]:
        """The entries of a folder, in batches of :data:`BATCH` (sorted by name within the folder)."""
        top = self.stat(path)
        if top.kind != "dir":
            yield top
            return
        batch: list[str] = []
        names = sorted(self._names(self.g.ls0, path))
        for i in range(0, len(names), BATCH):
            batch = names[i : i + BATCH]
            stats = self._call(self.g.lstatnslist, path, batch)
            links = [n for n, st in zip(batch, stats, strict=True) if stat.S_ISLNK(st["st_mode"])]
            targets = {}
            if links:
                targets = dict(zip(links, self._call(self.g.readlinklist, path, links), strict=True))
            for name, st in zip(batch, stats, strict=True):
                yield _entry(posixpath.join(path, name), st, targets.get(name))

    def find(self, top: str = "/") -> Iterator[str]:
        """Every path below *top* (not crossing into unmounted space), lazily."""
        for rel in self._names(self.g.find0, top):
            yield posixpath.join(top, rel)

    def sha256(self, path: str) -> str:
        return str(self._call(self.g.checksum, "sha256", path))

    def download(self, path: str, fd: int) -> None:
        """The guest file *path* into the open host file *fd* (libguestfs reopens it through
        /dev/fd: the same inode, never a name)."""
        self._call(self.g.download, path, f"/dev/fd/{fd}")

    def copy_file(self, e: Entry, fd: int) -> dict[str, Any]:
        """Write regular file *e* into the open, empty host file *fd*; returns how it was read:
        ``{"read": "disk" | "appliance", "fallback": why the disk was not read, or None}``.

        Where the file's filesystem sits directly on a partition or whole disk (ext2/3/4, xfs) and
        its journal is clean, its extents are mapped in the appliance (FIEMAP) and the bytes read
        straight from the disk image on the host: under TCG the appliance moves about 40 MB/s, the
        host read several hundred.  Anything else goes through the appliance."""
        extents, why = self._extents(e)
        if extents is None:
            log.debug("%s: %s through the appliance: %s", self.what, e.path, why)
            self.download(e.path, fd)
            return {"read": "appliance", "fallback": why}
        disk, pieces = extents
        with open(disk, "rb") as src:
            for logical, physical, length in pieces:
                done = 0
                while done < length:
                    n = min(length - done, 4 << 20)
                    data = os.pread(src.fileno(), n, physical + done)
                    if len(data) != n:
                        raise GuestfsError(
                            f"{e.path} in {self.what}: short read of its disk at {physical + done}"
                        )
                    os.pwrite(fd, data, logical + done)
                    done += n
        os.ftruncate(fd, e.size)  # holes between extents and after the last stay holes (zeros)
        return {"read": "disk", "fallback": None}

    def _filesystem_of(self, path: str) -> FsInfo | None:
        """The mounted filesystem holding guest *path* (the longest mount point above it)."""
        best = None
        for f in self.filesystems:
            mp = f.mountpoint
            inside = mp is not None and (path == mp or path.startswith(mp.rstrip("/") + "/"))
            if inside and (best is None or len(mp or "") > len(best.mountpoint or "")):
                best = f
        return best

    def _extents(self, e: Entry) -> tuple[Extents | None, str]:
        """The file's extents on one of the disks, or None and why it must be read through the
        appliance."""
        fs = self._filesystem_of(e.path)
        if fs is None or fs.type not in FIEMAP_TYPES:
            return None, f"{fs.type if fs else 'its'} filesystem: no extent map to read the disk at"
        m = re.fullmatch(r"/dev/sd([a-z]+)(\d*)", fs.device)
        if m is None:
            return None, f"{fs.device} is not a partition or whole disk (LVM, RAID...)"
        if fs.needs_recovery is not False:
            if fs.needs_recovery:
                return None, (f"the journal of {fs.device} ({fs.type}) needs recovery: the appliance "
                              "replayed it, the disk does not hold what it describes")  # fmt: skip
            return None, f"the state of the journal of {fs.device} ({fs.type}) is not known"
        if e.kind != "file" or e.size == 0:
            return None, "an empty file"
        disk_index = _disk_index(m.group(1))
        start = 0
        try:
            if m.group(2):
                parts = self._call(self.g.part_list, f"/dev/sd{m.group(1)}")
                start = next(p["part_start"] for p in parts if p["part_num"] == int(m.group(2)))
            report = self._call(self.g.debug, "sh", [f"filefrag -e {shlex.quote('/sysroot' + e.path)}"])
        except (RuntimeError, StopIteration):
            return None, "filefrag failed"
        extents = _parse_filefrag(report, start, e.size, self.disks[disk_index])
        return extents, "" if extents else "extents not plainly on the disk (inline, unwritten, encoded)"

    def tar_out(self, path: str, fd: int) -> None:
        """A tar of folder *path* into the open host file *fd*."""
        self._call(lambda: self.g.tar_out(path, f"/dev/fd/{fd}", numericowner=True))


FIEMAP_TYPES = {"ext2", "ext3", "ext4", "xfs"}  # physical offsets are offsets on the device
_PLAIN_FLAGS = {"", "last", "eof", "merged", "shared"}


def _parse_filefrag(
    report: str, start: int, size: int, disk: Path
) -> tuple[Path, list[tuple[int, int, int]]] | None:
    """``filefrag -e`` output -> (disk, [(file offset, disk offset, length)]) in bytes, or None when
    any extent is not plainly on disk (inline, delayed, encoded, unwritten) or the report is odd."""
    bm = re.search(r"blocks? of (\d+) bytes", report)  # "1 block of 4096 bytes" too
    if bm is None:
        return None
    bs = int(bm.group(1))
    pieces, covered = [], 0
    for line in report.splitlines():
        em = re.match(r"\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*(\d+):\s*(\d+):\s*(\d*):?\s*(.*)$", line)
        if em is None:
            continue
        flags = {f for f in em.group(7).strip().split(",") if f}
        if not flags <= _PLAIN_FLAGS:
            return None
        logical, physical, n = int(em.group(1)) * bs, int(em.group(3)) * bs, int(em.group(5)) * bs
        n = min(n, size - logical)
        if n <= 0:
            continue
        pieces.append((logical, start + physical, n))
        covered += n
    if not pieces or covered > size:
        return None
    return disk, pieces
