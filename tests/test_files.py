"""Single-file restore end to end: ``vmrecover files ...`` against real guest disks in libguestfs.

One repository per module and one file-restore service for it (appliances take ~20 s to start under
TCG; the service keeps them between commands, which is itself under test here).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import sys
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


MODULE_IMAGES = {"dirty_image": "dirty_journals"}  # fixture -> tests.testkit.fsimages kind


@pytest.fixture(scope="module")
def builds(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, concurrent.futures.Future[Any]]]:
    """The images only this module uses (and only if a selected test asks for them), built in the
    background from the module's first test on, at a lower priority: a build keeps one core busy for
    ~45 s, and the tests before the one that needs it mostly wait for their own appliance."""
    from tests.testkit import fsimages

    wanted = {
        name
        for item in request.session.items
        if item.module is request.module
        for name in getattr(item, "fixturenames", ())
        if name in MODULE_IMAGES
    }

    def build(kind: str, path: Path) -> Any:
        os.nice(10)  # this thread and its appliance only (Linux nice is per thread): tests come first
        return fsimages.build(kind, [path])

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsimages") as pool:
        futures = {
            name: pool.submit(build, MODULE_IMAGES[name], tmp_path_factory.mktemp(name) / "disk0.raw")
            for name in sorted(wanted)
        }
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.fixture(scope="module")
def dirty_image(builds: dict[str, concurrent.futures.Future[Any]]) -> Any:
    """fsimages.dirty_journals: ext4 needing recovery, a clean xfs, an xfs with a dirty log."""
    return builds["dirty_image"].result(timeout=900)


@pytest.fixture(scope="module")
def frepo(tmp_path_factory: pytest.TempPathFactory, guest_image: Path, builds: Any) -> Iterator[Cli]:
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
    doc = frepo.json("files", "get", "lin", "/etc/hosts", "/boot", "/home/alice", "--to", out)
    assert doc["written"][0]["read"] == "appliance" and "LVM" in doc["written"][0]["fallback"]
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
    """ext4 on a whole disk, cleanly unmounted: files are read straight from the disk view."""
    _backup_image(frepo, "bare", bare_image)
    gp, data = next(iter(bare_image.files.items()))
    (w,) = frepo.json("files", "get", "bare", gp, "--to", tmp_path)["written"]
    assert (w["read"], w["fallback"]) == ("disk", None)
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


def test_journal_needing_recovery_is_read_through_the_appliance(
    frepo: Cli, dirty_image: Any, tmp_path: Path
) -> None:
    """A crash-consistent backup: a filesystem whose journal needs recovery is replayed when the
    appliance mounts it, so the extents it reports need not hold on the disk what it shows.  Its
    files are read through the appliance (and say so), a clean xfs's straight from the disk; the
    bytes are the replayed filesystem's either way.  Setuid/setgid bits of a real guest's files are
    dropped, single files and folders (tar-out) alike."""
    from tests.testkit.fsimages import JOURNAL_NEW, JOURNAL_OLD

    with open(dirty_image.paths[0], "rb") as f:  # the trap is real: the block on the disk is old
        head = f.read(34 << 20)
    assert JOURNAL_OLD in head and JOURNAL_NEW in head  # the file's block, the journal
    _backup_image(frepo, "crashed", dirty_image)
    fss = {f["device"]: f for f in frepo.json("files", "inspect", "crashed")["filesystems"]}
    assert {d: f["needs_recovery"] for d, f in fss.items()} == {"/dev/sda1": True, "/dev/sda2": False,
                                                                "/dev/sda3": True}  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    paths = ["/sda1/journal.txt", "/sda1/plain.txt", "/sda2/clean.bin", "/sda3/dirty.bin", "/sda2/tools"]
    written = {
        w["guest_path"]: w for w in frepo.json("files", "get", "crashed", *paths, "--to", out)["written"]
    }
    assert (written["/sda2/clean.bin"]["read"], written["/sda2/clean.bin"]["fallback"]) == ("disk", None)
    for gp in ("/sda1/journal.txt", "/sda1/plain.txt", "/sda3/dirty.bin"):
        assert written[gp]["read"] == "appliance" and "journal" in written[gp]["fallback"], written[gp]
    for gp in paths[:4]:
        assert (out / posixpath.basename(gp)).read_bytes() == dirty_image.files[gp], gp
    assert (out / "journal.txt").read_bytes() == JOURNAL_NEW
    log = (frepo.repo / "run" / "files" / "files.log").read_text().splitlines()
    assert any("/sda2/clean.bin" in line and "from the disk at its extents" in line for line in log)
    assert any("/sda1/journal.txt" in line and "through the appliance (the journal of /dev/sda1" in line
               for line in log)  # fmt: skip

    assert dirty_image.modes["/sda2/tools/suid"] == 0o4755  # as the guest has them
    assert stat.S_IMODE((out / "tools").stat().st_mode) == 0o775
    assert stat.S_IMODE((out / "tools" / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "tools" / "sgid").stat().st_mode) == 0o711
    frepo.run("files", "get", "crashed", "/sda2/tools/suid", "--to", out / "tools", "--overwrite")
    assert stat.S_IMODE((out / "tools" / "suid").stat().st_mode) == 0o755


def _as_nobody(cwd: Path, script: str, *args: str) -> dict[str, Any]:
    """The JSON a Python *script* prints, run as uid/gid 65534 in *cwd* (entered as root before the
    switch: the test's temporary folders above it are 0700)."""
    res = subprocess.run(
        [sys.executable, "-I", "-c", script, *args], cwd=cwd, user=65534, group=65534, extra_groups=[],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("files.sock")
except OSError as e:
    print(json.dumps({"connect": e.strerror}))
    sys.exit()
req = {"op": "get", "target": "web01", "paths": ["/sda2/etc/hostname"], "to": sys.argv[1]}
try:  # a refusing service may answer and close before it reads: the request then meets a closed socket
    s.sendall(json.dumps(req).encode() + b"\\n")
except OSError:
    pass
print(s.makefile().readline())
"""


def test_service_socket_is_private_and_checks_its_peer(frepo: Cli, tmp_path: Path) -> None:
    """The service writes where it is told, as its own (root) account: its folder is 0700, its socket
    0600, and a connection from another uid is refused whatever the modes (SO_PEERCRED)."""

    def served() -> None:
        """The service answers its own account (here about a VM that is not there: no appliance)."""
        assert_clean_error(frepo.run("files", "ls", "nosuchvm", check=False), 5, "no VM named")

    served()
    run = frepo.repo / "run" / "files"
    st = (run / "files.sock").lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    to = tmp_path / "to"
    to.mkdir()

    def probe() -> dict[str, Any]:
        return _as_nobody(run, PROBE, str(to))

    assert probe() == {"connect": "Permission denied"}
    os.chmod(run, 0o711)  # as if someone opened them up: the service itself still refuses
    os.chmod(run / "files.sock", 0o666)
    try:
        answer = probe()
    finally:
        os.chmod(run / "files.sock", 0o600)
        os.chmod(run, 0o700)
    assert answer["error"]["error"] == "AuthError", answer
    assert "not uid 65534" in answer["error"]["message"]
    assert os.listdir(to) == []
    assert "refused a connection from uid 65534" in (run / "files.log").read_text()
    served()


def _mount_options(mp: Path) -> tuple[set[str], set[str]]:
    """(mount options, superblock options) of the mount at *mp*, from /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mp):
            sep = fields.index("-")
            return set(fields[5].split(",")), set(fields[sep + 3].split(","))
    raise AssertionError(f"{mp} is not mounted")


READ_AS_NOBODY = """
import json, sys
out = {}
for p in sys.argv[1:]:
    try:
        with open(p, "rb") as f:
            out[p] = len(f.read())
    except OSError as e:
        out[p] = e.strerror
print(json.dumps(out))
"""


def _read_as_nobody(cwd: Path, *paths: str) -> dict[str, Any]:
    """Each relative path read by uid 65534 from *cwd*, as its length or the error."""
    return _as_nobody(cwd, READ_AS_NOBODY, *paths)


def test_files_mount(frepo: Cli, lvm_image: Any, tmp_path: Path) -> None:
    """The guest's filesystems, read-only, nosuid, nodev, at a host mount point, until 'files
    umount'; for the account that mounted them only, unless --allow-other (then other accounts get
    what the guest's modes and owners give them).  The two mounts start at once (two appliances)."""
    _backup_image(frepo, "linm", lvm_image)
    mine, shared = tmp_path / "guest", tmp_path / "shared"
    mine.mkdir()
    shared.mkdir()
    procs = [
        frepo.popen("files", "mount", "linm", mine),
        frepo.popen("files", "mount", "linm", shared, "--allow-other"),
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    try:
        for mp in (mine, shared):
            assert (mp / "etc" / "hosts").read_bytes() == lvm_image.files["/etc/hosts"]
            with pytest.raises(OSError):
                (mp / "etc" / "new").write_text("x")
            assert {"ro", "nosuid", "nodev"} <= _mount_options(mp)[0]
        assert "allow_other" not in _mount_options(mine)[1]
        assert {"allow_other", "default_permissions"} <= _mount_options(shared)[1]
        wanted = ["etc/hosts", "home/alice/notes.txt"]  # 0644 root, 0600 uid 1000
        assert _read_as_nobody(mine, *wanted) == dict.fromkeys(wanted, "Permission denied")
        assert _read_as_nobody(shared, *wanted) == {
            "etc/hosts": len(lvm_image.files["/etc/hosts"]),
            "home/alice/notes.txt": "Permission denied",
        }
    finally:
        frepo.run("files", "umount", mine)
        frepo.run("files", "umount", shared)
    assert not os.path.ismount(mine) and not os.path.ismount(shared)


def test_stop_running_ends_the_service_asked_or_not(cli: Cli) -> None:
    """`vmrecover serve` stops the file-restore service it started (systemd waits for its cgroup): one
    that answers stops when asked; one that cannot (here SIGSTOPped, like one deep in an appliance's
    start) is terminated with its process group within seconds."""
    import signal

    from vmrecover.files.service import request, socket_path, stop_running

    def start() -> int:
        doc = request(cli.repo, {"op": "ping"}, progress=lambda t: None, on_entries=lambda e: None,
                      env=dict(os.environ))  # fmt: skip
        return int(doc["pid"])

    assert stop_running(cli.repo) is None  # none runs: nothing to do
    pid = start()
    assert os.getpgid(pid) == pid  # its own session, so its qemu goes with it
    t = time.monotonic()
    assert stop_running(cli.repo) == pid
    assert time.monotonic() - t < 8 and not Path(f"/proc/{pid}").exists()
    assert not socket_path(cli.repo).exists()  # it went its own way: closed and cleaned up
    pid = start()
    os.kill(pid, signal.SIGSTOP)
    t = time.monotonic()
    assert stop_running(cli.repo, grace=1) == pid
    assert time.monotonic() - t < 15 and not Path(f"/proc/{pid}").exists()


def test_a_start_that_fails_says_what_the_console_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A libguestfs start is watched: while it lasts, a line every LAUNCH_REPORT_S (log and progress);
    when it fails, the error and the log carry the appliance's console (here: its hypervisor's own
    message), not only libguestfs' 'see earlier error messages'.  A failed start is tried once more, in
    verbose mode, so the log of a second failure holds libguestfs' own steps as well."""
    from vmrecover.files import guest as guest_mod

    hv = tmp_path / "hv"
    hv.write_text(  # answers libguestfs' capability questions as qemu does, then fails to start
        '#!/bin/sh\ncase "$1" in -help|-version|-machine|-display) exec qemu-system-x86_64 "$@";; esac\n'
        "sleep 2\necho 'the hypervisor refuses: no such CPU model' >&2\nexit 1\n"
    )
    hv.chmod(0o755)
    monkeypatch.setenv("LIBGUESTFS_HV", str(hv))
    monkeypatch.setattr(guest_mod, "LAUNCH_REPORT_S", 0.5)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    said: list[str] = []
    with caplog.at_level("INFO", logger="vmrecover.files"), pytest.raises(guest_mod.GuestfsError) as err:
        guest_mod.GuestImage([disk], what="vm@point", progress=said.append)
    assert "cannot open vm@point with libguestfs" in str(err.value)
    assert "the hypervisor refuses: no such CPU model" in str(err.value), err.value
    assert any(m.startswith("still starting the libguestfs appliance for vm@point (") for m in said), said
    assert "the libguestfs appliance for vm@point failed to start; starting it once more" in said, said
    logged = [r.getMessage() for r in caplog.records]
    failures = [m for m in logged if "failed to start after" in m]
    assert len(failures) == 2 and all("no such CPU model" in m for m in failures), logged
    assert any(m.startswith("starting the libguestfs appliance for vm@point once more") for m in logged)
    # the second start was verbose: its kept lines hold libguestfs' own messages, the first's do not
    assert str(hv) not in failures[0] and str(hv) in failures[1], failures


def test_a_start_that_fails_once_is_tried_again_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second start (verbose) gives a handle that works like any other, quiet again once started:
    the filesystem on the disk is mounted and read."""
    from vmrecover.files import guest as guest_mod

    content = b"hello from the second start\n"
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "hello.txt").write_bytes(content)
    disk = tmp_path / "disk.raw"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", tmp_path / "root", disk, "16M"], check=True)
    marker = tmp_path / "failed-once"
    hv = tmp_path / "hv"
    hv.write_text(  # the first start fails as a lost nested start does; the next ones are qemu's
        '#!/bin/sh\ncase "$1" in -help|-version|-machine|-display) exec qemu-system-x86_64 "$@";; esac\n'
        f'if [ ! -e {marker} ]; then touch {marker}; echo "KVM: entry failed" >&2; exit 1; fi\n'
        'exec qemu-system-x86_64 "$@"\n'
    )
    hv.chmod(0o755)
    monkeypatch.setenv("LIBGUESTFS_HV", str(hv))
    with caplog.at_level("INFO", logger="vmrecover.files"):
        img = guest_mod.GuestImage([disk], what="vm@point")
    try:
        assert img.launch_tries == 2 and marker.exists()
        assert not img.g.get_verbose()
        assert img.sha256("/hello.txt") == hashlib.sha256(content).hexdigest()
    finally:
        img.close()
    logged = [r.getMessage() for r in caplog.records]
    assert any("failed to start after" in m and "KVM: entry failed" in m for m in logged), logged
    assert any("started in" in m and "(try 2)" in m for m in logged), logged
