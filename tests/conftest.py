"""Shared fixtures: a CLI runner working on a fresh repository, and real disk images.

Tests run the real ``vmrecover`` command in a subprocess (as a user would) against real files and
real qemu tools; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmrecover.repo.blob import ChunkCodec

MiB = 1 << 20


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


class Cli:
    """Runs ``python -m vmrecover ...`` with VMRECOVER_REPO pointing at this test's repository."""

    def __init__(self, repo: Path, env: dict[str, str] | None = None) -> None:
        self.repo = repo
        inherited = {k: v for k, v in os.environ.items() if k != "VMRECOVER_PASSPHRASE"}
        self.env = {**inherited, "VMRECOVER_REPO": str(repo), **(env or {})}

    def run(self, *args: str | Path, check: bool = True, timeout: float = 300, **kw: Any) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "vmrecover", *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if "input" in kw else subprocess.DEVNULL,  # input= feeds stdin (a password, say)
            **kw,
        )
        res = Result(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"vmrecover {' '.join(map(str, args))} -> {proc.returncode}\n{proc.stderr}{proc.stdout}"
            )
        return res

    def json(self, *args: str | Path) -> Any:
        return self.run(*args, "--json").json()

    def popen(self, *args: str | Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "vmrecover", *map(str, args)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )


def message(res: Result) -> str:
    """stderr + stdout as one line of single-spaced words (messages and hints span lines)."""
    return " ".join((res.stderr + " " + res.stdout).split())


def assert_clean_error(res: Result, code: int, *patterns: str) -> None:
    """*res* failed with exit *code*, no traceback, and its message matches every regex in *patterns*."""
    text = message(res)
    assert res.returncode == code, f"expected exit {code}, got {res.returncode}: {text}"
    assert "Traceback" not in res.stderr, res.stderr
    for pat in patterns:
        assert re.search(pat, text, re.IGNORECASE), f"{pat!r} not in error message: {text}"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """A CLI bound to an initialised, unencrypted repository with 64 KiB chunks (small tests, many chunks)."""
    c = Cli(tmp_path / "repo")
    c.run("init", "--chunk-size", "64K")
    return c


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def make_sparse_image(path: Path, size: int, regions: list[tuple[int, bytes]]) -> Path:
    """A raw image of *size* bytes, sparse except for the given (offset, data) regions."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in regions:
            f.seek(off)
            f.write(data)
    return path


def random_image(path: Path, size: int, *, seed: int, density: float = 0.5, block: int = 64 * 1024) -> Path:
    """A sparse raw image where about *density* of the *block*-sized regions hold random or text data."""
    import random

    rng = random.Random(seed)
    regions = []
    for off in range(0, size, block):
        r = rng.random()
        if r < density / 2:
            regions.append((off, rng.randbytes(block)))
        elif r < density:
            regions.append((off, (f"line {off} " * (block // 8)).encode()[:block]))
    return make_sparse_image(path, size, regions)


def convert(src: Path, dst: Path, fmt: str) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", fmt, str(src), str(dst)], check=True)
    return dst


def guest_sha256(path: Path) -> str:
    """sha256 of an image as the guest sees it (any format), via qemu-img convert to raw."""
    if path.suffix == ".raw":
        return sha256_file(path)
    raw = path.with_name(path.name + ".as-raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    try:
        return sha256_file(raw)
    finally:
        raw.unlink()


# --------------------------------------------------------------------------- damaged repositories
CHUNK = 64 * 1024  # the `cli` fixture's repository chunk size
HEADER = 16  # size of a chunk file's envelope header (vmrecover/repo/blob.py); the payload follows


def chunky_image(path: Path, nchunks: int) -> bytes:
    """Chunk i is text (compressible, stored zstd) if i % 4 == 0, a hole if i % 4 == 1, else random
    bytes (stored as is).  Every non-hole chunk is unique, so it has a chunk file of its own."""
    rng = random.Random(11)
    parts = []
    for i in range(nchunks):
        if i % 4 == 0:
            parts.append((f"chunk {i} says hello. " * CHUNK).encode()[:CHUNK])
        elif i % 4 == 1:
            parts.append(bytes(CHUNK))
        else:
            parts.append(rng.randbytes(CHUNK))
    data = b"".join(parts)
    path.write_bytes(data)
    return data


def chunk_digest(plain: bytes) -> str:
    """The name of the chunk holding *plain* in an unencrypted repository of the current format."""
    return ChunkCodec(keys=None).digest(plain).hex()


def corrupt_chunk(repo: Path, plain: bytes) -> tuple[str, bool]:
    """Flip bytes in the stored piece of the chunk file holding *plain* (one piece: 64 KiB chunks);
    return (digest hex, whether that piece is a zstd frame)."""
    digest = chunk_digest(plain)
    path = repo / "chunks" / digest[:2] / digest
    blob = bytearray(path.read_bytes())
    layout = ChunkCodec(keys=None).layout(bytes.fromhex(digest), bytes(blob), len(blob))
    start, n = layout.offsets[0], layout.lengths[0]
    assert n > 8, f"chunk {digest} has a piece of {n} bytes"
    for pos in (start + 3, start + n // 2, start + n - 5):
        blob[pos] ^= 0xA5
    os.chmod(path, 0o644)
    path.write_bytes(bytes(blob))
    return digest, layout.zstd[0]


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bootable test guest (256 MiB raw, ext4 root on MBR), built once per test run; read-only."""
    from tests.testkit.guest import build_guest_disk

    return build_guest_disk(tmp_path_factory.mktemp("guest") / "guest.raw", size=256 * MiB)


# --------------------------------------------------------------------------- FUSE datastore
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@dataclass
class Mounted:
    """A datastore mounted with ``vmrecover mount`` (a background daemon) at ``path``."""

    cli: Cli
    path: Path

    def point_dir(self, vm: str, point: str = "latest") -> Path:
        return self.path / "vms" / vm / point

    def session_dir(self, name: str) -> Path:
        return self.path / "recover" / name

    def daemon_pid(self) -> int:
        recs = [json.loads(p.read_text()) for p in (self.cli.repo / "run").glob("mount-*.json")]
        return next(r["pid"] for r in recs if r["mountpoint"] == str(self.path.resolve()))

    def unmount(self) -> None:
        self.cli.run("umount", self.path)


def force_unmount(path: Path) -> None:
    """Whatever state the mount is in (busy, dead daemon): detach it so the next test starts clean."""
    subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


@pytest.fixture
def mounted(cli: Cli, tmp_path: Path):
    """The ``cli`` repository mounted at tmp_path/mnt (64 MiB cache); always unmounted afterwards."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    mp = tmp_path / "mnt"
    mp.mkdir()
    cli.run("mount", mp, "--cache-size", "64M")
    try:
        yield Mounted(cli, mp)
    finally:
        if os.path.ismount(mp):
            cli.run("umount", mp, check=False)
        force_unmount(mp)


# --------------------------------------------------------------------------- NFS datastore
PORTMAP_LOCK = Path("/run/lock/vmrecover-port111.lock")


class NfsServer:
    """``vmrecover nfs serve`` in a subprocess, on free ports (and port 111 with ``portmapper``).

    Port 111 is one per machine: holding PORTMAP_LOCK while it is ours makes a second test run or
    a benchmark wait instead of failing on 'address in use'."""

    def __init__(self, cli: Cli, *args: str, portmapper: bool = False) -> None:
        self.cli = cli
        self.lock_fd: int | None = None
        if portmapper:
            self.lock_fd = os.open(PORTMAP_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        argv = ["nfs", "serve", "--port", "0", "--json", "--cache-size", "64M", *args]
        self.proc = cli.popen(*argv, *(["--portmapper"] if portmapper else []))
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith('{"'):  # the ready line, or an error document and exit
            out = line + self.proc.stdout.read()
            err = self.stop()
            raise AssertionError(f"nfs serve did not start (exit {self.proc.returncode}): {out} {err}")
        self.info = json.loads(line)
        self.port = int(self.info["nfs_port"])
        self.mount_port = int(self.info["mount_port"])

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        """A libnfs URL naming the ports (no portmapper needed)."""
        return f"nfs://{host}/vmrecover/{path.lstrip('/')}?version=3&nfsport={self.port}&mountport={self.mount_port}"

    def stop(self) -> str:
        """SIGTERM, wait, and return what it logged (stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        return err or ""


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    """systemd's notify socket, for a `vmrecover serve` under test (tests/test_service.py: Served)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify.sock"))
    yield s
    s.close()


@pytest.fixture
def port111() -> Iterator[None]:
    """The product's own NFS export (recovery/exports.py) takes ports 2049 and 111: one test at a time."""
    fd = os.open(PORTMAP_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


@pytest.fixture
def nfs_server(cli: Cli):
    """Start servers of the ``cli`` repository: ``nfs_server(*args, portmapper=False)``; all stopped after."""
    servers: list[NfsServer] = []

    def start(*args: str, portmapper: bool = False) -> NfsServer:
        s = NfsServer(cli, *args, portmapper=portmapper)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


# --------------------------------------------------------------------------- guest filesystem images
def _fsimage(tmp_path_factory: pytest.TempPathFactory, kind: str, n: int = 1) -> Any:
    """An image built by tests.testkit.fsimages (libguestfs), once per test run; read-only."""
    pytest.importorskip("guestfs", reason="needs libguestfs (make setup)")
    from tests.testkit import fsimages

    d = tmp_path_factory.mktemp(kind)
    return fsimages.build(kind, [d / f"disk{i}.raw" for i in range(n)])


@pytest.fixture(scope="session")
def lvm_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Debian-like guest: /boot ext4 + LVM vg0/root xfs (fsimages.linux_lvm_xfs)."""
    return _fsimage(tmp_path_factory, "linux_lvm_xfs")


@pytest.fixture(scope="session")
def ntfs_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _fsimage(tmp_path_factory, "ntfs_disk")


@pytest.fixture(scope="session")
def two_disk_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _fsimage(tmp_path_factory, "two_disk_linux", 2)


@pytest.fixture(scope="session")
def bare_image(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _fsimage(tmp_path_factory, "bare_ext4")


# --------------------------------------------------------------------------- watching opens
class OpenWatch:
    """Counts opens of files by any process (inotify IN_OPEN): proof that nothing opened them."""

    IN_OPEN = 0x20

    def __init__(self, paths: list[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names = {}
        for p in paths:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(p), self.IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = str(p)
        self.seen: list[str] = []

    def opened(self) -> list[str]:
        """The watched files opened since the watch began (one entry per open)."""
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return self.seen
            pos = 0
            while pos < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, pos)
                pos += 16 + length
                if mask & self.IN_OPEN:
                    self.seen.append(self.names[wd])

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def watching(paths: list[Path]) -> Iterator[OpenWatch]:
    w = OpenWatch(paths)
    try:
        yield w
    finally:
        w.close()


# --------------------------------------------------------------------------- vSphere (vcsim + proxy)
# tests/vsphere/: a vcsim built once (cached in build/vcsim/) and started once per run, behind an
# HTTPS proxy that answers the calls vcsim lacks.  Tests take ``vsphere`` (fault switches reset after
# each test); VMs and datastores made by one test stay for the run, so give them unique names.
@pytest.fixture(scope="session")
def vsphere_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.vsphere import build, running

    try:
        build.vcsim_binary()
    except build.BuildUnavailable as e:
        pytest.skip(str(e))
    with running(tmp_path_factory.mktemp("vsphere")) as vs:
        yield vs


@pytest.fixture
def vsphere(vsphere_session: Any) -> Iterator[Any]:
    errors = len(vsphere_session.answered("proxy-error"))
    yield vsphere_session
    vsphere_session.reset()
    new = vsphere_session.answered("proxy-error")[errors:]
    assert not new, f"the vSphere test proxy failed (a harness bug, see stderr): {new}"


# --------------------------------------------------------------------------- XenServer (XAPI simulator)
# tests/xapi/: a XAPI simulator (XML-RPC over HTTPS, raw VDI export/import, TLS NBD with qemu-nbd) started
# once per run.  Tests take ``xapi`` (fault switches reset and the test's sessions closed after each
# test); VMs made by one test stay for the run, so give them unique names.
@pytest.fixture(scope="session")
def xapi_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import shutil

    from tests.xapi import running

    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd is missing (make setup installs qemu-utils)")
    with running(tmp_path_factory.mktemp("xapi")) as sim:
        yield sim


@pytest.fixture
def xapi(xapi_session: Any) -> Iterator[Any]:
    errors = len(xapi_session.calls("sim-error"))
    yield xapi_session
    xapi_session.reset()
    new = xapi_session.calls("sim-error")[errors:]
    assert not new, f"the XAPI simulator failed (a harness bug): {new}"


# A run started in the background by a non-interactive shell (`make test &`) inherits SIGINT ignored,
# and so would every vmrecover it starts; the interrupt tests deliver ^C and need it to arrive as it
# does for a user at a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# --------------------------------------------------------------------------- measured figures
MEASURED: dict[str, list[str]] = {}  # a section's title -> its lines, printed at the end of the run


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the items that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The appliance tier runs last, its image built in the background meanwhile (4-5 minutes, much of
    it downloads and disk work, that the other tests' time then hides)."""
    tier = [item for item in items if item.nodeid.startswith("tests/test_appliance.py::")]
    if tier:
        items[:] = [item for item in items if item not in tier] + tier
        if not config.option.collectonly:
            from tests.testkit import appliance_build

            appliance_build.start()
    if len(items) > 20 and not config.option.collectonly:
        # The KVM probe boots a kernel: 1-5 s, or its whole time limit on a host whose KVM starts VMs
        # but never runs them.  Asked now, in the background, its verdict (kept for the host's boot)
        # is ready before the first test that starts a guest, whose own time limit it would eat.
        global _KVM_PROBE
        _KVM_PROBE = subprocess.Popen(
            [sys.executable, "-c", "from vmrecover import qemu; qemu.kvm_works()"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


_KVM_PROBE: subprocess.Popen[bytes] | None = None


def pytest_sessionfinish() -> None:
    """A background appliance build or KVM probe still running (the run was interrupted) ends with
    the run."""
    if "tests.testkit.appliance_build" in sys.modules:
        sys.modules["tests.testkit.appliance_build"].stop()
    if _KVM_PROBE is not None and _KVM_PROBE.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_KVM_PROBE.pid, signal.SIGKILL)  # its qemu too


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """What slow tests measured (tests/test_appliance.py's timings), whatever the capture mode."""
    for title, lines in MEASURED.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.line(line)
