"""The file-restore test images (tests.testkit.fsimages) hold what their descriptions say.

Each image is built once, then read back in a fresh READ-ONLY libguestfs appliance: inspection (OS,
distro, hostname, mountpoints), filesystems, partition tables, UUIDs and labels, every described
file's bytes, mode, owner and mtime, every symlink's target, the bulk directory; the tests compare
those observations with the :class:`ImageInfo`.  Appliances are slow to start under TCG (10-16 s)
and CPU-bound, so builds and read-backs run two at a time in a thread pool (the libguestfs binding
releases the GIL), all started when the module's first test asks, and only for the images that the
selected tests use; the read-backs share two appliances (device names mapped back per image).
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import posixpath
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.testkit import fsimages
from tests.testkit.fsimages import NOT_A_FILESYSTEM, ImageInfo
from vmrecover.errors import BadInput, ExitCode, NotFound

try:
    import guestfs  # noqa: F401

    HAVE_GUESTFS = True
except ImportError:
    HAVE_GUESTFS = False

needs_guestfs = pytest.mark.skipif(
    not HAVE_GUESTFS,
    reason="libguestfs' Python binding is missing (Debian packages python3-guestfs libguestfs-tools "
    "libguestfs-xfs ntfs-3g)",
)

BIG_MIB = 16
CHANGED_CSV = b"id,customer,amount\n1,changed,0.00\n"
CHANGE_MTIME = 1710000000


# --------------------------------------------------------------------------------------------- read-back


def _parttype(g: Any, device: str) -> str | None:
    try:
        return g.part_get_parttype(device)
    except RuntimeError:  # no partition table: a whole-disk filesystem
        return None


def _shift(offset: int) -> Callable[[str], str]:
    """Renames /dev/sdXN by *offset* disks: an image's own names <-> the names in a shared appliance."""

    def rename(dev: str) -> str:
        m = re.fullmatch(r"/dev/sd([a-z])(\d*)", dev)
        return f"/dev/sd{chr(ord(m[1]) + offset)}{m[2]}" if m else dev

    return rename


def _lv_disks(g: Any) -> dict[str, str]:
    """/dev/VG/LV -> the device of (one of) its PVs."""
    pv_names = {pv["pv_uuid"].replace("-", ""): pv["pv_name"] for pv in g.pvs_full()}
    return {lv: pv_names[g.vgpvuuids(lv.split("/")[2])[0].replace("-", "")] for lv in g.lvs()}


def readback(images: dict[str, tuple[list[Path], ImageInfo | None]]) -> dict[str, dict[str, Any]]:
    """What ONE fresh read-only appliance with all these images' disks sees in each of them.

    Per image: its filesystems, partition tables, UUIDs and labels, the OS roots inspection finds on
    its disks and their mountpoints (device names as if the image had been added alone), and, mounted
    per inspection (else its only filesystem at /), the things its description lists.  The images
    must not share filesystem UUIDs or VG names (inspection would mix them up).
    """
    start = time.monotonic()
    disks = [p for paths, _info in images.values() for p in paths]
    seen: dict[str, dict[str, Any]] = {}
    with fsimages.guestfs_handle(disks, readonly=True) as g:
        all_fs = g.list_filesystems()
        devices = g.list_devices()
        lv_disks = _lv_disks(g)
        roots = g.inspect_os()
        offset = 0
        for key, (paths, info) in images.items():
            local = _shift(-offset)
            mine = tuple(f"/dev/sd{chr(ord('a') + offset + i)}" for i in range(len(paths)))
            offset += len(paths)

            def is_mine(dev: str, mine: tuple[str, ...] = mine) -> bool:
                return lv_disks.get(dev, dev).startswith(mine)

            filesystems = {dev: t for dev, t in all_fs.items() if is_mine(dev)}
            mountable = [dev for dev, t in filesystems.items() if t not in NOT_A_FILESYSTEM]
            my_roots = [r for r in roots if is_mine(r)]
            if info is not None and info.os_root is not None and not my_roots:
                roots = _inspect_again(g, key, roots)
                my_roots = [r for r in roots if is_mine(r)]
            here = seen[key] = {
                "filesystems": {local(dev): t for dev, t in filesystems.items()},
                "parttypes": [_parttype(g, dev) for dev in devices if is_mine(dev)],
                "uuids": {local(dev): g.vfs_uuid(dev) for dev in mountable},
                "labels": {local(dev): g.vfs_label(dev) for dev in mountable},
                "roots": [local(r) for r in my_roots],
                "mountpoints": {},
            }
            g.umount_all()
            if my_roots:
                root = my_roots[0]
                here["os"] = {
                    "type": g.inspect_get_type(root),
                    "distro": g.inspect_get_distro(root),
                    "product_name": g.inspect_get_product_name(root),
                    "hostname": g.inspect_get_hostname(root),
                    "arch": g.inspect_get_arch(root),
                }
                mps = g.inspect_get_mountpoints(root)
                here["mountpoints"] = {mp: local(dev) for mp, dev in mps.items()}
                for mp in sorted(mps, key=len):
                    g.mount_ro(mps[mp], mp)
            elif len(mountable) == 1:
                g.mount_ro(mountable[0], "/")
            if info is not None:
                _read_contents(g, info, here)
    for here in seen.values():
        here["seconds"] = round(time.monotonic() - start, 2)
    return seen


def _inspect_again(g: Any, key: str, roots: list[str]) -> list[str]:
    """Inspection once more, when it missed an OS the image was built with.

    Inspection mounts every filesystem in turn and silently skips one that fails to mount; one CI
    run on a loaded machine saw it miss a built root once (and never here in many runs).  A second
    inspection in the same appliance tells a passing hiccup from a broken image; a miss twice is
    reported with what inspection found and the appliance's kernel log, not as a later lookup error.
    """
    g.umount_all()
    again = g.inspect_os()
    if again != roots:
        print(f"fsimages read-back: {key}: inspection found {again} after {roots}", file=sys.stderr)
        return again
    tail = "\n".join(g.dmesg().splitlines()[-30:])
    raise AssertionError(
        f"{key}: inspect_os found no OS root of this image twice (roots {roots}); "
        f"filesystems {g.list_filesystems()}; appliance kernel log:\n{tail}"
    )


def _read_contents(g: Any, info: ImageInfo, seen: dict[str, Any]) -> None:
    seen["files"] = {p: g.read_file(p) if g.is_file(p) else None for p in info.files}
    seen["deleted"] = {p: not g.exists(p) for p, data in CHANGES.items() if data is None}
    seen["large_files"] = {p: (g.filesize(p), g.checksum("sha256", p)) for p in info.large_files}
    stats = {p: g.lstatns(p) for p in {*info.modes, *info.mtimes, *info.owners}}
    seen["modes"] = {p: stats[p]["st_mode"] & 0o7777 for p in info.modes}
    seen["mtimes"] = {p: stats[p]["st_mtime_sec"] for p in info.mtimes}
    seen["owners"] = {p: (stats[p]["st_uid"], stats[p]["st_gid"]) for p in info.owners}
    seen["symlinks"] = {p: g.readlink(p) if g.is_symlink(p) else None for p in info.symlinks}
    seen["dirs"] = {p: g.is_dir(p, followsymlinks=False) for p in info.dirs}
    seen["bulk"] = {}
    for d, count in info.bulk.items():
        names = g.ls(d)
        samples = [0, count // 2, count - 1]
        seen["bulk"][d] = {
            "names": names,
            "samples": {i: g.read_file(f"{d}/{fsimages.bulk_name(i)}") for i in samples},
            "stat": g.lstatns(f"{d}/{fsimages.bulk_name(count - 1)}"),
        }


# --------------------------------------------------------------------------------------------- jobs


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.testkit.fsimages", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )


@dataclass
class Built:
    """An image as its builder described it, and what a read-only appliance saw in it afterwards."""

    info: ImageInfo
    seen: dict[str, Any]


@dataclass
class CliBuilt:
    proc: subprocess.CompletedProcess[str]
    paths: list[Path]


CHANGES: dict[str, bytes | None] = {
    "/data/db/records.csv": CHANGED_CSV,
    "/etc/hosts": None,
    "/var/log/new.log": b"new\n",
}


KINDS = {
    "lvm": "linux_lvm_xfs",
    "two": "two_disk_linux",
    "gpt": "linux_ext4_gpt",
    "bare": "bare_ext4",
    "ntfs": "ntfs_disk",
    "big": "big_file_disk",
}


class Jobs:
    """Builds and read-backs, run two (up to four, one per CPU) at a time: appliances are CPU-bound.

    Launches are what cost (10-16 s each), so the read-backs share appliances: two of them, balanced,
    each with images that share no UUID (the changed copy of the two-disk guest has the original's).
    Builds are queued first; a job that waits for another's result waits for one queued (so
    started) before it.
    """

    GROUPS = (("lvm", "two", "bare", "ntfs"), ("gpt", "big", "unknown", "changed"))

    def __init__(self, wanted: set[str], d: Path, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.d = d
        self.builds: dict[str, concurrent.futures.Future[Any]] = {}
        self.readbacks: dict[str, concurrent.futures.Future[Any]] = {}
        if "changed" in wanted:
            wanted = wanted | {"two_built"}
        for name in ("lvm", "two", "bare", "ntfs", "changed", "gpt", "big", "unknown"):
            if name == "changed" and name in wanted:
                self.builds[name] = pool.submit(self._change, self.builds["two"])
            elif name == "unknown" and name in wanted:
                self.builds[name] = pool.submit(self._cli_build_unknown)
            elif name in KINDS and (name in wanted or (name == "two" and "two_built" in wanted)):
                kwargs = {"size_mib": BIG_MIB} if name == "big" else {}
                self.builds[name] = pool.submit(self._build, KINDS[name], **kwargs)
        for group in self.GROUPS:
            names = [name for name in group if name in wanted]
            if names:
                fut = pool.submit(self._readback, names)
                self.readbacks |= dict.fromkeys(names, fut)

    def _build(self, kind: str, **kwargs: Any) -> ImageInfo:
        return fsimages.build(
            kind, [self.d / f"{kind}-{i}.raw" for i in range(fsimages.DISKS[kind])], **kwargs
        )

    def _cli_build_unknown(self) -> CliBuilt:
        out = self.d / "unknown-cli.raw"
        return CliBuilt(_cli("build", "unknown-disk", out), [out])

    def _change(self, two: concurrent.futures.Future[ImageInfo]) -> ImageInfo:
        """Copies of two_disk_linux changed by change_files (which mounts per inspection)."""
        info = two.result()
        paths = []
        for i, p in enumerate(info.paths):
            paths.append(self.d / f"changed-{i}.raw")
            subprocess.run(["cp", "--sparse=always", str(p), str(paths[-1])], check=True)
        fsimages.change_files(paths, CHANGES, mtime=CHANGE_MTIME)
        changed = copy.deepcopy(info)
        changed.paths = paths
        for path, data in CHANGES.items():
            changed.mtimes.pop(posixpath.dirname(path), None)  # an entry came or went
            if data is None:
                for attrs in (changed.files, changed.mtimes, changed.modes, changed.owners):
                    attrs.pop(path, None)
            else:
                changed.files[path] = data
                changed.mtimes[path] = CHANGE_MTIME
        return changed

    def _readback(self, names: list[str]) -> dict[str, Any]:
        images: dict[str, tuple[list[Path], ImageInfo | None]] = {}
        for name in names:
            built = self.builds[name].result()
            images[name] = (built.paths, None if isinstance(built, CliBuilt) else built)
        return readback(images)

    def result(self, name: str) -> tuple[Any, dict[str, Any]]:
        built = self.builds[name].result(timeout=600)
        return built, self.readbacks[name].result(timeout=600)[name]


FIXTURES = ("lvm", "two", "gpt", "bare", "ntfs", "big", "unknown", "changed")


@pytest.fixture(scope="module")
def jobs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    """The builds and read-backs the module's selected tests need, all started at once."""
    wanted = {
        name
        for item in request.session.items
        if item.module is request.module
        for name in getattr(item, "fixturenames", ())
        if name in FIXTURES
    }
    workers = max(2, min(4, os.cpu_count() or 2))  # each appliance keeps one CPU busy
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsimages") as pool:
        jobs = Jobs(wanted, tmp_path_factory.mktemp("fsimages"), pool)
        yield jobs
        for f in [*jobs.builds.values(), *jobs.readbacks.values()]:
            f.cancel()


@pytest.fixture(scope="module")
def lvm(jobs: Jobs) -> Built:
    return Built(*jobs.result("lvm"))


@pytest.fixture(scope="module")
def gpt(jobs: Jobs) -> Built:
    return Built(*jobs.result("gpt"))


@pytest.fixture(scope="module")
def bare(jobs: Jobs) -> Built:
    return Built(*jobs.result("bare"))


@pytest.fixture(scope="module")
def ntfs(jobs: Jobs) -> Built:
    return Built(*jobs.result("ntfs"))


@pytest.fixture(scope="module")
def two(jobs: Jobs) -> Built:
    return Built(*jobs.result("two"))


@pytest.fixture(scope="module")
def big(jobs: Jobs) -> Built:
    return Built(*jobs.result("big"))


@pytest.fixture(scope="module")
def unknown(jobs: Jobs) -> tuple[CliBuilt, dict[str, Any]]:
    return jobs.result("unknown")


@pytest.fixture(scope="module")
def changed(jobs: Jobs) -> Built:
    return Built(*jobs.result("changed"))


# --------------------------------------------------------------------------------------------- checks


def assert_matches(built: Built) -> None:
    """Everything the description says is what the read-only appliance saw."""
    info, seen = built.info, built.seen
    assert seen["filesystems"] == {fs.device: fs.fstype for fs in info.filesystems}
    assert seen["parttypes"] == info.partition_tables
    for fs in info.filesystems:
        if fs.fstype not in NOT_A_FILESYSTEM:
            assert seen["uuids"][fs.device].lower() == (fs.uuid or "").lower(), fs
            assert seen["labels"][fs.device] == (fs.label or ""), fs
    if info.os_type is None:
        assert seen["roots"] == []
    else:
        assert seen["roots"] == [info.os_root]
        assert seen["os"] == {
            "type": info.os_type,
            "distro": info.distro,
            "product_name": info.product_name,
            "hostname": info.hostname,
            "arch": info.arch,
        }
    assert seen["mountpoints"] == info.mountpoints
    assert seen["files"] == info.files
    assert seen["large_files"] == info.large_files
    assert seen["modes"] == info.modes
    assert seen["mtimes"] == info.mtimes
    assert seen["owners"] == info.owners
    assert seen["symlinks"] == info.symlinks
    assert seen["dirs"] == dict.fromkeys(info.dirs, True)
    for d, count in info.bulk.items():
        b = seen["bulk"][d]
        assert b["names"] == [fsimages.bulk_name(i) for i in range(count)]
        assert b["samples"] == {i: fsimages.bulk_data(i) for i in b["samples"]}
        assert b["stat"]["st_mtime_sec"] == fsimages.BULK_MTIME
        assert b["stat"]["st_mode"] & 0o7777 == 0o644
    json.dumps(info.to_json())  # the CLI's output is plain JSON


@needs_guestfs
def test_linux_lvm_xfs(lvm: Built) -> None:
    assert_matches(lvm)
    info = lvm.info
    assert lvm.seen["mountpoints"] == {"/": "/dev/vg0/root", "/boot": "/dev/sda1"}
    assert lvm.seen["filesystems"] == {"/dev/sda1": "ext4", "/dev/vg0/root": "xfs"}
    assert info.modes["/home/alice/notes.txt"] == 0o600
    assert info.mtimes["/home/alice/notes.txt"] == 1704164645  # 2024-01-02 03:04:05 UTC
    assert info.owners["/home/alice/notes.txt"] == (1000, 1000)
    assert info.symlinks["/home/alice/escape"] == "../../../../../etc/shadow"
    assert info.symlinks["/home/alice/abs"] == "/etc/hosts"
    assert "/etc/shadow" not in info.files
    assert info.bulk == {"/srv/many": 10_000}
    assert info.locate("/boot/config-test") == (info.filesystem("/dev/sda1"), "/config-test")
    assert info.locate("/home/alice/notes.txt")[0].fstype == "xfs"


@needs_guestfs
def test_linux_ext4_gpt(gpt: Built, lvm: Built) -> None:
    assert_matches(gpt)
    assert gpt.seen["mountpoints"] == {"/": "/dev/sda1"}
    assert gpt.info.files["/etc/hosts"] != lvm.info.files["/etc/hosts"]


@needs_guestfs
def test_bare_ext4(bare: Built) -> None:
    assert_matches(bare)
    assert bare.seen["filesystems"] == {"/dev/sda": "ext4"}
    assert bare.info.locate("/data/a.txt") == (bare.info.filesystems[0], "/data/a.txt")


@needs_guestfs
def test_ntfs_disk(ntfs: Built) -> None:
    assert_matches(ntfs)
    assert ntfs.seen["filesystems"] == {"/dev/sda1": "ntfs"}
    assert ntfs.seen["roots"] == []  # no registry hives: not recognised as Windows
    assert "/Users/Bob/Documents/report.txt" in ntfs.info.files
    assert any(not p.isascii() for p in ntfs.info.files)


@needs_guestfs
def test_two_disk_linux(two: Built) -> None:
    assert_matches(two)
    assert two.seen["mountpoints"] == {"/": "/dev/sda1", "/data": "/dev/sdb1"}
    fs, inner = two.info.locate("/data/db/records.csv")
    assert (fs.device, fs.disk, inner) == ("/dev/sdb1", 1, "/db/records.csv")


@needs_guestfs
def test_big_file_disk(big: Built) -> None:
    assert_matches(big)
    assert big.info.large_files["/big.bin"][0] == BIG_MIB << 20


@needs_guestfs
def test_cli_builds_unknown_disk(unknown: tuple[CliBuilt, dict[str, Any]]) -> None:
    built, seen = unknown
    assert built.proc.returncode == 0, built.proc.stderr
    out = json.loads(built.proc.stdout)
    assert out["kind"] == "unknown_disk"
    assert out["os_type"] is None and out["files"] == {}
    assert [(f["device"], f["fstype"]) for f in out["filesystems"]] == [("/dev/sda1", "unknown")]
    assert seen["filesystems"] == {"/dev/sda1": "unknown"}
    assert seen["parttypes"] == ["msdos"]
    assert seen["roots"] == []


@needs_guestfs
def test_change_files(changed: Built) -> None:
    """Rewritten, deleted and new files of a two-disk guest (change_files mounts per inspection)."""
    assert_matches(changed)
    assert changed.seen["files"]["/data/db/records.csv"] == CHANGED_CSV
    assert changed.seen["mtimes"]["/data/db/records.csv"] == CHANGE_MTIME
    assert changed.seen["modes"]["/data/db/records.csv"] == 0o644  # kept
    assert changed.seen["deleted"] == {"/etc/hosts": True}
    assert changed.seen["roots"] == ["/dev/sda1"]  # still a Linux root without /etc/hosts


# --------------------------------------------------------------------------------------------- no appliance


def test_cli_rejects_unknown_kind(tmp_path: Path) -> None:
    proc = _cli("build", "no-such-kind", tmp_path / "x.raw")
    assert proc.returncode == ExitCode.BAD_INPUT
    assert "linux_lvm_xfs" in proc.stderr  # the hint lists the kinds
    assert not (tmp_path / "x.raw").exists()


def test_build_checks_the_number_of_outputs(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="2 output"):
        fsimages.build("two_disk_linux", [tmp_path / "a.raw"])


def test_locate_without_os() -> None:
    info = ImageInfo("x", [Path("a"), Path("b")], [1, 1], [None, None])
    info.filesystems = [
        fsimages.Filesystem("/dev/sda", "ext4", 0),
        fsimages.Filesystem("/dev/sdb", "ext4", 1),
    ]
    with pytest.raises(NotFound, match="2 mountable"):
        info.locate("/x")
    # as 'vmrecover files' mounts several filesystems without an OS: at /<device name>
    assert info.locate("/sdb/data/x") == (info.filesystems[1], "/data/x")
    assert info.locate("/sda") == (info.filesystems[0], "/")


def test_change_missing_disk(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        fsimages.change_file(tmp_path / "nope.raw", "/x", None)


def test_cli_change_missing_disk(tmp_path: Path) -> None:
    proc = _cli("change", tmp_path / "nope.raw", "--path", "/etc/hosts", "--delete")
    assert proc.returncode == ExitCode.NOT_FOUND, proc.stderr
    assert "does not exist" in proc.stderr


def test_cli_lists_kinds() -> None:
    proc = _cli("kinds")
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list(fsimages.BUILDERS)
