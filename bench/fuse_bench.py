#!/usr/bin/env python3
"""FUSE datastore benchmark: ``vmrecover mount`` against ``borg mount`` of the same disk image.

Steps (every work file lives under ``--workdir``, a fresh directory under /var/tmp by default, and is
removed at the end unless ``--keep``):

1. build backup_bench.py's sparse raw image (1 MiB regions: ~35% holes, ~35% text, ~30% random bytes,
   shuffled with a fixed seed) and back it up with ``vmrecover backup --format raw`` (1 MiB chunks) and
   with ``borg init -e none`` + ``borg create`` (backup_bench's chunker and compression);
2. build the bootable test guest (vmrecover.testkit.guest) and back it up into the same vmrecover
   repository;
3. **sequential read**: a fresh mount (empty daemon cache), ``sync; echo 3 > /proc/sys/vm/drop_caches``,
   then the whole ``vms/<vm>/<point>/disk.raw`` (or the borg mount's file) read with 1 MiB ``readinto``
   calls; MB/s over the disk size (open included).  The view's sha256 is then compared with the image's
   (a second, untimed read);
4. **random reads**: a fresh mount, caches dropped, a freshly opened fd (``POSIX_FADV_RANDOM``), 2000
   ``os.pread`` of 4 KiB at 4 KiB-aligned offsets from a fixed seed, one at a time (queue depth 1), each
   timed with ``perf_counter``; p50/p90/p99/max pooled over the runs, plus the reads that fall in data
   regions and the first read in each 1 MiB data region (a chunk fetch), since a read in a hole or in
   an already fetched chunk costs almost nothing; the bytes are checked against the image afterwards;
5. **boot**: the test guest booted with qemu (TCG, ``testkit.guest.boot``) from a fresh local raw copy,
   and from a fresh recovery session (``vmrecover recover start``) through ``MOUNT/recover/<s>/guest.raw``
   with the same qemu command line; caches dropped and a fresh mount before every boot, so every boot is
   a first, cold boot; median of the runs;
6. **daemon peak RSS**: VmHWM from /proc/PID/status of every mount daemon just before it is unmounted
   (after its reads or boot); the largest is reported.

The local raw file (the source image, the guest's local copy) is measured the same way, cold, as a
reference for what the disk itself gives.  Targets (from the issue): sequential >= 400 MB/s, random p50
<= 1 ms and p99 <= 5 ms, boot from backup <= 1.2x the local boot, daemon VmHWM <= cache size + 150 MB.
MB means 10^6 bytes.  A phase whose daemon stops answering is cut off after a timeout (its FUSE
connection aborted, or the daemon killed) and reported as failed, and every mount is unmounted at the
end, also on Ctrl-C or SIGTERM.  This is a measurement, not a test: the exit code is 0 whether or not
the targets are met (1 only when the set-up or a vmrecover command fails).  Run it as root::

    .venv/bin/python bench/fuse_bench.py                  # 2 GiB image, 2 runs of everything
    .venv/bin/python bench/fuse_bench.py --size 256M --runs 1 --no-borg
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from backup_bench import (
    BORG_CHUNKER,
    BORG_COMPRESSION,
    DROP_CACHES,
    SEED,
    BenchError,
    bench_env,
    can_drop_caches,
    data_bytes,
    emit,
    fmt,
    human,
    log,
    machine_busy_s,
    make_image,
    mb,
    parse_size,
    prepare_workdir,
    ratio,
    sha256_file,
    tool_version,
    verdict,
)

from vmrecover.errors import VmrecoverError
from vmrecover.recovery import qemu_boot
from vmrecover.repo.repository import parse_size as vmrecover_parse_size
from vmrecover.testkit.guest import BootResult, build_guest_disk
from vmrecover.testkit.guest import boot as boot_guest

MiB = 2**20
PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent
VMRECOVER = ROOT / ".venv" / "bin" / "vmrecover"
DEFAULT_WORKDIR_PARENT = Path("/var/tmp")
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}

# Acceptance targets (borg mount measured on the project's machine: 199 MB/s, p50 7.7 ms, p99 15.8 ms).
SEQ_MBPS_MIN = 400.0
RANDOM_P50_MS_MAX = 1.0
RANDOM_P99_MS_MAX = 5.0
BOOT_RATIO_MAX = 1.2  # boot from a recovery session / boot from a local raw copy
RSS_SLACK_MB = 150.0  # daemon VmHWM <= cache size + this

RANDOM_READS = 2000
HANG_TIMEOUT_S = 300.0  # a read phase still running after this long has hung: its mount is aborted
RANDOM_SEED = SEED + 7
BUSY_WARNING = 0.3  # CPUs used by other work during a timed phase above which the report warns
MIN_PHASE_S = 2.0  # shorter phases are left out of that check: CPU time is counted in 10 ms ticks
LATENCY_LISTS = ("random_s", "random_data_s", "random_first_s")  # left out of the JSON: too long
TOOLS = ("vmrecover", "borg", "local")


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C so that the finally blocks unmount everything."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    vmrecover: str
    borg: str = "-"
    local: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)


def print_table(rows: list[Row]) -> None:
    header = ["metric", "vmrecover", "borg mount", "local file", "target", "result"]
    cells = [header] + [[r.metric, r.vmrecover, r.borg, r.local, r.target, r.result] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


def latency_stats(samples: list[float]) -> dict[str, float] | None:
    """p50/p90/p99/max in milliseconds (None for no samples)."""
    if not samples:
        return None
    s = sorted(samples)
    return {
        "n": len(s),
        "p50": percentile(s, 50) * 1e3,
        "p90": percentile(s, 90) * 1e3,
        "p99": percentile(s, 99) * 1e3,
        "max": s[-1] * 1e3,
    }


@dataclass
class ToolResult:
    """What one reader (vmrecover's mount, borg's mount, the local file) gave over all runs."""

    seq_s: list[float] = field(default_factory=list)
    seq_cpu_s: list[float] = field(default_factory=list)  # the mount daemon's CPU time during the read
    sha_ok: bool | None = None
    random_s: list[float] = field(default_factory=list)  # every 4 KiB read of every run
    random_data_s: list[float] = field(default_factory=list)  # those that fell in data regions
    random_first_s: list[float] = field(default_factory=list)  # the first of their run in a data MiB
    random_cpu_s: list[float] = field(default_factory=list)
    random_ok: bool | None = None
    boot_s: list[float] = field(default_factory=list)
    hwm: dict[str, int] = field(default_factory=dict)  # phase -> daemon VmHWM (bytes)
    errors: list[str] = field(default_factory=list)


@dataclass
class Phase:
    """One timed phase: wall time and the CPU the rest of the machine used meanwhile."""

    name: str
    wall_s: float
    daemon_cpu_s: float
    other_cpu_s: float


# --- processes -------------------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status in bytes (None if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process, all its threads (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def fs_type(path: Path) -> str:
    """The type of the filesystem *path* is on (longest mount point prefix in /proc/self/mounts)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, fstype, *_ = line.split()
            where = where.replace("\\040", " ")
            inside = target == where or target.startswith(where.rstrip("/") + "/")
            if inside and len(where) >= len(best):
                best, kind = where, fstype
    return kind


# --- the benchmark context -------------------------------------------------------------------------


@dataclass
class Mount:
    tool: str  # "vmrecover" or "borg"
    path: Path
    pid: int  # the daemon's
    proc: subprocess.Popen[bytes] | None = None  # borg mount -f, which we started ourselves
    conn: str | None = None  # its /sys/fs/fuse/connections/ entry, to abort it if the daemon hangs


def fuse_connection(path: Path) -> str | None:
    """The FUSE connection number of the mount at *path* (the kernel's dev_t of its superblock)."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    return str(os.major(dev) << 20 | os.minor(dev))


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    env: dict[str, str]
    can_drop_caches: bool
    borg: str | None
    cache_bytes: int
    repo: Path = field(init=False)
    borg_repo: Path = field(init=False)
    logs: Path = field(init=False)
    mounts: list[Mount] = field(default_factory=list)  # mounted now: the finally blocks unmount these
    sessions: list[str] = field(default_factory=list)  # recovery sessions started and not yet stopped
    notes: list[str] = field(default_factory=list)  # anomalies seen on the way (hung daemons...)
    phases: list[Phase] = field(default_factory=list)
    load_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    count: int = 0

    def __post_init__(self) -> None:
        self.repo = self.workdir / "vmrecover-repo"
        self.borg_repo = self.workdir / "borg-repo"
        self.logs = self.workdir / "logs"

    def cold(self) -> None:
        """``sync; echo 3 > /proc/sys/vm/drop_caches`` (when allowed)."""
        os.sync()
        if self.can_drop_caches:
            DROP_CACHES.write_text("3\n")

    def log_base(self, name: str) -> Path:
        self.count += 1
        return self.logs / f"{self.count:03d}-{name}"

    def run(self, argv: list[str], name: str, *, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
        base = self.log_base(name)
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL, timeout=timeout
        )
        Path(f"{base}.out").write_text(proc.stdout)
        Path(f"{base}.err").write_text(proc.stderr)
        if proc.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} exited with {proc.returncode}\nstdout: {proc.stdout[-2000:]}\n"
                f"stderr: {proc.stderr[-2000:]}"
            )
        return proc

    def vmr(self, args: list[str | Path], name: str) -> Any:
        argv = [str(self.args.vmrecover), *map(str, args), "--repo", str(self.repo), "--json"]
        out = self.run(argv, f"vmrecover-{name}").stdout
        try:
            return json.loads(out)
        except ValueError:
            raise BenchError(f"vmrecover {name} printed no JSON: {out[-500:]!r}") from None

    @contextlib.contextmanager
    def phase(self, name: str, pid: int | None = None) -> Iterator[None]:
        """Time a phase; remember how much CPU the rest of the machine used meanwhile."""
        busy, mine, daemon = machine_busy_s(), own_cpu_s(), proc_cpu_s(pid)
        start = time.monotonic()
        yield
        wall = time.monotonic() - start
        daemon = proc_cpu_s(pid) - daemon
        other = machine_busy_s() - busy - (own_cpu_s() - mine) - daemon
        self.phases.append(Phase(name, wall, daemon, max(0.0, other)))


# --- mounts ----------------------------------------------------------------------------------------


def mount_vmrecover(ctx: Context) -> Mount:
    mp = ctx.workdir / "mnt-vmrecover"
    mp.mkdir(exist_ok=True)
    doc = ctx.vmr(["mount", mp, "--cache-size", ctx.args.cache_size], "mount")
    pid = doc.get("pid")
    if not isinstance(pid, int):  # fall back on the daemon's own record, REPO/run/mount-*.json
        for rec in (ctx.repo / "run").glob("mount-*.json"):
            with contextlib.suppress(OSError, ValueError):
                r = json.loads(rec.read_text())
                if r.get("mountpoint") == str(mp.resolve()):
                    pid = r["pid"]
    if not isinstance(pid, int):
        raise BenchError(f"cannot tell the pid of the mount daemon at {mp}")
    m = Mount("vmrecover", mp, pid, conn=fuse_connection(mp))
    ctx.mounts.append(m)
    return m


def mount_borg(ctx: Context) -> Mount:
    assert ctx.borg is not None
    mp = ctx.workdir / "mnt-borg"
    mp.mkdir(exist_ok=True)
    base = ctx.log_base("borg-mount")
    with open(f"{base}.log", "wb") as logf:
        proc = subprocess.Popen(
            [ctx.borg, "mount", "-f", f"{ctx.borg_repo}::disk", str(mp)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=ctx.env,
            start_new_session=True,
        )
    m = Mount("borg", mp, proc.pid, proc)
    ctx.mounts.append(m)
    deadline = time.monotonic() + 120
    while not os.path.ismount(mp):
        if proc.poll() is not None:
            ctx.mounts.remove(m)
            raise BenchError(f"borg mount exited with {proc.returncode}: {Path(f'{base}.log').read_text()}")
        if time.monotonic() > deadline:
            raise BenchError("borg mount did not come up within 120 s")
        time.sleep(0.05)
    m.conn = fuse_connection(mp)
    return m


def unmount(ctx: Context, m: Mount) -> None:
    """Unmount with the tool's own command; detach lazily (``fusermount3 -u -z``) if that fails."""
    try:
        if m.tool == "vmrecover":
            ctx.vmr(["umount", m.path], "umount")
        else:
            ctx.run([str(ctx.borg), "umount", str(m.path)], "borg-umount", timeout=120)
    except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
        log(f"  unmounting {m.path} failed ({str(exc).splitlines()[0]}): detaching it lazily")
        subprocess.run(["fusermount3", "-u", "-z", str(m.path)], capture_output=True, check=False)
    finally:
        if m in ctx.mounts:
            ctx.mounts.remove(m)
    if m.proc is not None:
        try:
            m.proc.wait(timeout=60)
            return
        except subprocess.TimeoutExpired:
            pass
    elif wait_exit(m.pid, 15):
        return
    # Still running after its unmount: a hung daemon (ours, so we may end it by its pid).
    ctx.notes.append(f"{m.tool} mount daemon {m.pid} did not exit after its unmount; it was killed")
    log(f"  the {m.tool} daemon {m.pid} did not exit after its unmount: SIGTERM, then SIGKILL")
    for sig, seconds in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, sig)
        if wait_exit(m.pid, seconds):
            break
    if m.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            m.proc.wait(timeout=5)


def wait_exit(pid: int, seconds: float) -> bool:
    """Wait until *pid* has exited (or is a zombie: no VmHWM any more); False if it still runs."""
    deadline = time.monotonic() + seconds
    while proc_status(pid, "VmHWM") is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def watchdog(m: Mount, seconds: float, what: str) -> Iterator[None]:
    """Cut *m* off if *what* is still running after *seconds*, and report the hang.

    A read from a daemon that stopped answering would otherwise block this process for good (in the
    kernel, where no signal reaches it).  The mount's FUSE connection is aborted (fusectl), or where
    fusectl is not mounted the daemon, our own process, is killed: either way every request it left
    unanswered fails with ENOTCONN/ECONNABORTED.
    """
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        abort = Path(f"/sys/fs/fuse/connections/{m.conn}/abort")
        how = "aborting its FUSE connection" if abort.exists() else f"killing the daemon (pid {m.pid})"
        log(f"  {what} still running after {seconds:g} s: {how}")
        try:
            abort.write_text("1\n")
        except OSError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    hung = f"{what} hung: no answer from the {m.tool} daemon for {seconds:g} s (the mount was cut off)"
    try:
        yield
    except (OSError, BenchError, VmrecoverError) as exc:
        if fired.is_set():
            raise BenchError(hung) from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise BenchError(hung)


@contextlib.contextmanager
def mounted(ctx: Context, tool: str, res: ToolResult, phase: str) -> Iterator[Mount]:
    """A fresh mount (so an empty daemon cache); its VmHWM is recorded just before it is unmounted."""
    m = mount_vmrecover(ctx) if tool == "vmrecover" else mount_borg(ctx)
    try:
        yield m
        hwm = proc_status(m.pid, "VmHWM")
        if hwm is not None:
            res.hwm[phase] = hwm
    finally:
        unmount(ctx, m)


def cleanup(ctx: Context) -> None:
    """Whatever happened: stop our sessions' mounts and the sessions themselves."""
    for m in list(ctx.mounts):
        unmount(ctx, m)
    for name in list(ctx.sessions):
        with contextlib.suppress(BenchError, OSError):
            ctx.vmr(["recover", "stop", name], "recover-stop")
        ctx.sessions.remove(name)


# --- measurements ----------------------------------------------------------------------------------


def sequential_read(path: Path) -> tuple[float, int]:
    """Seconds to open and read the whole file with 1 MiB reads, and the bytes read."""
    buf = bytearray(MiB)
    total = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return time.perf_counter() - start, total


def random_reads(path: Path, offsets: list[int]) -> tuple[list[float], list[bytes]]:
    """One 4 KiB pread at each offset, one at a time, on a freshly opened fd: (latencies, data)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        lat, data = [], []
        clock, pread = time.perf_counter, os.pread
        for off in offsets:
            t = clock()
            d = pread(fd, PAGE, off)
            lat.append(clock() - t)
            data.append(d)
    finally:
        os.close(fd)
    return lat, data


def is_data(fd: int, off: int) -> bool:
    """Whether *off* of the (sparse) source image is in a data region rather than a hole."""
    try:
        return os.lseek(fd, off, os.SEEK_DATA) == off
    except OSError:
        return False


def boot_checked(what: str, **kw: Any) -> BootResult:
    res = boot_guest(**kw)
    if not (res.powered_off and res.boots_seen == [1]):
        raise BenchError(
            f"{what}: qemu exit {res.returncode}, boots seen {res.boots_seen} (want [1]), "
            f"powered off: {res.powered_off}\n{res.serial_tail()}\n{res.qemu_output[-1000:]}"
        )
    return res


@dataclass
class Setup:
    image: Path
    image_sha256: str
    image_data_bytes: int
    point: str
    disk: str
    guest_point: str
    guest_disk: str
    borg_path: Path | None  # the image inside a borg mount
    vm_backup: dict[str, Any]
    build_s: float


def prepare(ctx: Context, results: dict[str, ToolResult]) -> Setup:
    wd, size = ctx.workdir, ctx.args.size
    image = wd / "disk.raw"
    log(f"building a {human(size)} sparse image at {image}")
    info = make_image(image, size, SEED)
    log(f"  {info.holes} hole, {info.text} text, {info.random} random regions in {info.build_s:.1f} s")
    image_sha = sha256_file(image)
    log(f"  sha256 {image_sha}")

    ctx.vmr(["init"], "init")
    log("vmrecover backup of the image")
    doc = ctx.vmr(["backup", "--vm", "bench", image, "--format", "raw"], "backup")
    point, disk = doc["point"], doc["disks"][0]["name"]
    log(f"  point {point}, {doc['duration_s']} s")

    guest = build_guest_disk(wd / "guest.raw", cache_dir=wd / "guest-cache")
    gdoc = ctx.vmr(["backup", "--vm", "guest", guest, "--format", "raw"], "backup-guest")
    log(f"test guest {guest} backed up as guest@{gdoc['point']}")

    borg_path = None
    if ctx.borg:
        try:
            ctx.run([ctx.borg, "init", "-e", "none", str(ctx.borg_repo)], "borg-init")
            log(f"borg create --chunker-params {BORG_CHUNKER} --compression {BORG_COMPRESSION}")
            argv = [ctx.borg, "create", "--chunker-params", BORG_CHUNKER, "--compression", BORG_COMPRESSION]
            ctx.run([*argv, f"{ctx.borg_repo}::disk", str(image)], "borg-create")
            borg_path = Path(str(image).lstrip("/"))
        except (BenchError, OSError) as exc:
            results["borg"].errors.append(f"borg create: {exc}")
            log(f"borg failed, borg columns will be n/a: {exc}")
    return Setup(
        image, image_sha, data_bytes(image), point, disk, gdoc["point"], gdoc["disks"][0]["name"],
        borg_path, doc, info.build_s,
    )  # fmt: skip


def on_fresh_mount(
    ctx: Context, tool: str, results: dict[str, ToolResult], phase: str, timeout: float,
    fn: Callable[[Mount], None],
) -> None:  # fmt: skip
    """Run *fn* on a fresh mount of *tool* under a watchdog; a failure is recorded, not raised."""
    res = results[tool]
    try:
        with mounted(ctx, tool, res, phase) as m, watchdog(m, timeout, f"{tool} {phase}"):
            fn(m)
    except (BenchError, OSError, VmrecoverError) as exc:
        msg = exc.message if isinstance(exc, VmrecoverError) else str(exc)
        res.errors.append(f"{phase}: {msg}")
        log(f"  {tool} {phase} failed: {msg}")


def borg_usable(s: Setup, results: dict[str, ToolResult]) -> bool:
    return s.borg_path is not None and not results["borg"].errors  # after a failure borg is left out


def measure_sequential(ctx: Context, s: Setup, results: dict[str, ToolResult], run: int) -> None:
    size = ctx.args.size
    timeout = max(HANG_TIMEOUT_S, size / 5e6)  # the timed read and the sha256 pass: 5 MB/s at least

    def one(tool: str, path: Path, pid: int | None) -> None:
        res = results[tool]
        ctx.cold()
        with ctx.phase(f"{tool} sequential read {run}", pid):
            cpu0 = proc_cpu_s(pid)
            seconds, n = sequential_read(path)
            cpu = proc_cpu_s(pid) - cpu0
        if n != size:
            raise BenchError(f"{tool}: read {n} bytes of a {size}-byte disk")
        res.seq_s.append(seconds)
        res.seq_cpu_s.append(cpu)
        log(f"  {tool}: {mb(size) / seconds:.0f} MB/s ({seconds:.2f} s, daemon CPU {cpu:.2f} s)")
        if pid is not None and res.sha_ok is None:  # once per tool, untimed (mostly from the page cache)
            digest = sha256_file(path)
            res.sha_ok = digest == s.image_sha256
            log(f"  {tool} view sha256 {digest} ({'equal' if res.sha_ok else 'DIFFERENT'})")

    def vmrecover(m: Mount) -> None:
        latest = m.path / "vms" / "bench" / "latest"
        if os.readlink(latest) != s.point:
            ctx.notes.append(f"{latest} -> {os.readlink(latest)}, expected {s.point}")
        one("vmrecover", m.path / "vms" / "bench" / s.point / f"{s.disk}.raw", m.pid)

    log(f"sequential read, cold (run {run})")
    on_fresh_mount(ctx, "vmrecover", results, f"sequential read {run}", timeout, vmrecover)
    if borg_usable(s, results):
        assert s.borg_path is not None
        borg_path = s.borg_path
        on_fresh_mount(
            ctx, "borg", results, f"sequential read {run}", timeout,
            lambda m: one("borg", m.path / borg_path, m.pid),
        )  # fmt: skip
    one("local", s.image, None)


def measure_random(ctx: Context, s: Setup, results: dict[str, ToolResult], run: int) -> None:
    rng = random.Random(RANDOM_SEED)
    pages = ctx.args.size // PAGE
    offsets = [rng.randrange(pages) * PAGE for _ in range(RANDOM_READS)]
    with open(s.image, "rb", buffering=0) as f:
        in_data = [is_data(f.fileno(), off) for off in offsets]
        expected = [os.pread(f.fileno(), PAGE, off) for off in offsets]
    seen: set[int] = set()
    first = []  # the first read of its run in a data MiB: for vmrecover, a chunk the daemon must fetch
    for off, data in zip(offsets, in_data, strict=True):
        first.append(data and off // MiB not in seen)
        seen.add(off // MiB)

    def one(tool: str, path: Path, pid: int | None) -> None:
        res = results[tool]
        ctx.cold()
        with ctx.phase(f"{tool} random reads {run}", pid):
            cpu0 = proc_cpu_s(pid)
            lat, data = random_reads(path, offsets)
            cpu = proc_cpu_s(pid) - cpu0
        res.random_s += lat
        res.random_data_s += [t for t, d in zip(lat, in_data, strict=True) if d]
        res.random_first_s += [t for t, d in zip(lat, first, strict=True) if d]
        res.random_cpu_s.append(cpu)
        ok = data == expected
        res.random_ok = ok if res.random_ok is None else res.random_ok and ok
        st = latency_stats(lat)
        assert st is not None
        log(
            f"  {tool}: p50 {st['p50']:.3f} ms, p99 {st['p99']:.3f} ms, max {st['max']:.1f} ms, "
            f"{sum(lat):.2f} s in all, daemon CPU {cpu:.2f} s{'' if ok else ', WRONG BYTES'}"
        )

    log(f"random 4 KiB reads, cold, queue depth 1 (run {run})")
    view = Path("vms") / "bench" / s.point / f"{s.disk}.raw"
    phase = f"random reads {run}"
    on_fresh_mount(
        ctx, "vmrecover", results, phase, HANG_TIMEOUT_S, lambda m: one("vmrecover", m.path / view, m.pid)
    )
    if borg_usable(s, results):
        assert s.borg_path is not None
        borg_path = s.borg_path
        on_fresh_mount(
            ctx, "borg", results, phase, HANG_TIMEOUT_S, lambda m: one("borg", m.path / borg_path, m.pid)
        )
    one("local", s.image, None)


def measure_boot(ctx: Context, s: Setup, results: dict[str, ToolResult], run: int) -> None:
    wd, timeout = ctx.workdir, ctx.args.boot_timeout
    log(f"boot of the test guest, cold (run {run})")
    local = build_guest_disk(wd / f"guest-local-{run}.raw", cache_dir=wd / "guest-cache")  # a fresh copy
    ctx.cold()
    with ctx.phase(f"local boot {run}"):
        res = boot_checked(
            "boot from the local copy", disk=local, serial_log=ctx.logs / f"boot-local-{run}.serial",
            timeout=timeout,
        )  # fmt: skip
    results["local"].boot_s.append(res.seconds)
    log(f"  local raw copy: {res.seconds:.2f} s")
    if not ctx.args.keep:
        local.unlink()

    name = f"fuse-bench-{run}"
    ctx.vmr(["recover", "start", f"guest@{s.guest_point}", "--name", name], "recover-start")
    ctx.sessions.append(name)

    def session_boot(m: Mount) -> None:
        disk = m.path / "recover" / name / f"{s.guest_disk}.raw"
        ctx.cold()
        with ctx.phase(f"vmrecover boot {run}", m.pid):
            res = boot_checked(
                "boot from the recovery session", disk=None, drive_args=qemu_boot.drive(disk),
                serial_log=ctx.logs / f"boot-session-{run}.serial", timeout=timeout,
            )  # fmt: skip
        results["vmrecover"].boot_s.append(res.seconds)
        log(f"  recovery session {name} via {disk}: {res.seconds:.2f} s")

    try:
        on_fresh_mount(ctx, "vmrecover", results, f"boot {run}", timeout + 60, session_boot)
    finally:
        ctx.vmr(["recover", "stop", name], "recover-stop")
        ctx.sessions.remove(name)


# --- the report ------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def make_rows(ctx: Context, s: Setup, results: dict[str, ToolResult]) -> list[Row]:
    vm, borg, local = (results[t] for t in TOOLS)
    size = ctx.args.size
    rows: list[Row] = []

    def failed(phase: str) -> bool:
        return bool(phase) and any(e.startswith(phase) for e in vm.errors)

    def row(
        metric: str,
        values: dict[str, Any],
        spec: str = ".2f",
        target: str = "-",
        ok: Callable[[float], bool] | None = None,
        phase: str = "",
    ) -> None:
        text = {t: "-" if t not in values else fmt(values[t], spec) for t in TOOLS}
        v = values.get("vmrecover")
        result = verdict(None if v is None else ok(v)) if ok else "info"
        if ok and failed(phase):  # a run of the phase failed (a hung daemon...): so does the target
            result = "FAIL"
        rows.append(Row(metric, text["vmrecover"], text["borg"], text["local"], target, result, values))

    def seq_rate(r: ToolResult) -> float | None:
        return ratio(mb(size), median(r.seq_s))

    n = ctx.args.runs
    of = f"median of {n}" if n > 1 else "1 run"
    row(
        f"sequential read, cold, 1 MiB reads (MB/s over {human(size)}; {of})",
        {t: seq_rate(results[t]) for t in TOOLS},
        ".0f",
        f">= {SEQ_MBPS_MIN:g}",
        lambda x: x >= SEQ_MBPS_MIN,
        "sequential",
    )
    row("sequential read time (s)", {t: median(results[t].seq_s) for t in TOOLS})
    row(
        "mount daemon CPU during the sequential read (s)",
        {t: median(results[t].seq_cpu_s) for t in TOOLS[:2]},
    )

    def yes_no(ok: bool | None) -> str:
        return "n/a" if ok is None else ("yes" if ok else "NO")

    rows.append(
        Row(
            "view sha256 == image sha256",
            yes_no(vm.sha_ok),
            yes_no(borg.sha_ok),
            "-",
            "equal",
            "FAIL" if failed("sequential") else verdict(vm.sha_ok),
            {"vmrecover": vm.sha_ok, "borg": borg.sha_ok, "image_sha256": s.image_sha256},
        )
    )

    stats = {t: latency_stats(results[t].random_s) for t in TOOLS}
    data_stats = {t: latency_stats(results[t].random_data_s) for t in TOOLS}
    first_stats = {t: latency_stats(results[t].random_first_s) for t in TOOLS}
    reads = f"{RANDOM_READS} x {n}" if n > 1 else str(RANDOM_READS)

    def pct(key: str, table: dict[str, dict[str, float] | None] = stats) -> dict[str, float | None]:
        return {t: (table[t] or {}).get(key) for t in TOOLS}

    row(
        f"random 4 KiB reads, QD1, cold ({reads}): p50 (ms)",
        pct("p50"),
        ".3f",
        f"<= {RANDOM_P50_MS_MAX:g}",
        lambda x: x <= RANDOM_P50_MS_MAX,
        "random",
    )
    row("random 4 KiB reads: p90 (ms)", pct("p90"), ".3f")
    row(
        "random 4 KiB reads: p99 (ms)",
        pct("p99"),
        ".3f",
        f"<= {RANDOM_P99_MS_MAX:g}",
        lambda x: x <= RANDOM_P99_MS_MAX,
        "random",
    )
    row("random 4 KiB reads: max (ms)", pct("max"), ".1f")
    n_data = (data_stats["local"] or data_stats["vmrecover"] or {"n": 0})["n"]
    row(f"random reads in data regions only ({n_data:.0f} reads): p50 (ms)", pct("p50", data_stats), ".3f")
    n_first = (first_stats["local"] or first_stats["vmrecover"] or {"n": 0})["n"]
    first_label = f"random reads, first in their 1 MiB data region ({n_first:.0f})"
    row(f"{first_label}: p50 (ms)", pct("p50", first_stats), ".3f")
    row(f"{first_label}: p99 (ms)", pct("p99", first_stats), ".3f")
    rows.append(
        Row(
            "random reads return the image's bytes",
            yes_no(vm.random_ok),
            yes_no(borg.random_ok),
            yes_no(local.random_ok),
            "equal",
            "FAIL" if failed("random") else verdict(vm.random_ok),
            {"vmrecover": vm.random_ok, "borg": borg.random_ok, "local": local.random_ok},
        )
    )

    vb, lb = median(vm.boot_s), median(local.boot_s)
    row(f"guest boot to power-off, cold ({of}, s)", {"vmrecover": vb, "local": lb})
    boot_ratio = ratio(vb, lb)
    rows.append(
        Row(
            "boot from recovery session / boot from local raw copy",
            fmt(boot_ratio, ".2f", "x"),
            target=f"<= {BOOT_RATIO_MAX:g}x",
            result="FAIL"
            if failed("boot")
            else verdict(None if boot_ratio is None else boot_ratio <= BOOT_RATIO_MAX),
            values={"vmrecover": boot_ratio},
        )
    )

    limit = mb(ctx.cache_bytes) + RSS_SLACK_MB
    peak = {t: mb(max(results[t].hwm.values())) if results[t].hwm else None for t in TOOLS[:2]}
    row(
        f"mount daemon peak RSS, VmHWM (MB; max of {len(vm.hwm)} mounts; cache {ctx.args.cache_size})",
        peak,
        ".0f",
        f"<= {limit:.0f}",
        lambda x: x <= limit,
    )
    return rows


def summary(rows: list[Row]) -> dict[str, Any]:
    judged = [r for r in rows if r.result in ("PASS", "FAIL")]
    failed = [r.metric for r in judged if r.result == "FAIL"]
    return {"targets": len(judged), "passed": len(judged) - len(failed), "failed": failed}


def environment(ctx: Context) -> dict[str, Any]:
    git = tool_version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_at_start": ctx.load_at_start,
        "workdir": str(ctx.workdir),
        "workdir_fs": fs_type(ctx.workdir),
        "runs": ctx.args.runs,
        "cache_size": ctx.args.cache_size,
        "page_cache_dropped": ctx.can_drop_caches,
        "vmrecover": f"{tool_version([str(ctx.args.vmrecover), '--version'])} (git {git})",
        "borg": tool_version([ctx.borg, "--version"]) if ctx.borg else None,
        "borg_create": f"borg create --chunker-params {BORG_CHUNKER} --compression {BORG_COMPRESSION}",
        "qemu": tool_version(["qemu-system-x86_64", "--version"]),
    }


def report(ctx: Context, s: Setup, results: dict[str, ToolResult]) -> dict[str, Any]:
    rows = make_rows(ctx, s, results)
    return {
        "environment": environment(ctx),
        "image": {
            "size": ctx.args.size,
            "data_bytes": s.image_data_bytes,
            "sha256": s.image_sha256,
            "build_s": s.build_s,
            "vmrecover_point": s.point,
            "vmrecover_backup": s.vm_backup,
        },
        "results": {
            t: {k: v for k, v in asdict(r).items() if k not in LATENCY_LISTS} for t, r in results.items()
        },
        "latency_ms": {
            t: {
                "all": latency_stats(r.random_s),
                "data_regions": latency_stats(r.random_data_s),
                "first_in_data_mib": latency_stats(r.random_first_s),
            }
            for t, r in results.items()
        },
        "phases": [asdict(p) for p in ctx.phases],
        "notes": ctx.notes,
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env, img = doc["environment"], doc["image"]
    load = ", ".join(f"{v:.2f}" for v in env["load_average_at_start"])
    print(f"vmrecover FUSE datastore benchmark  ({env['vmrecover']}; {env['borg'] or 'borg: not run'})")
    print(
        f"host: {env['cpus']} CPUs, {human(env['memory_bytes'])} RAM, kernel {env['kernel']}, "
        f"load average at start {load}; workdir {env['workdir']} ({env['workdir_fs']})"
    )
    print(
        f"image: {human(img['size'])} raw sparse ({human(img['data_bytes'])} data), sha256 {img['sha256']}; "
        f"vmrecover 1 MiB chunks, {env['borg_create']}"
    )
    cold = "yes" if env["page_cache_dropped"] else "NO (not root: runs are not cold, numbers are optimistic)"
    print(
        f"page cache dropped and a fresh mount before each timed run: {cold}; "
        f"daemon cache {env['cache_size']}"
    )
    print(f"qemu: {env['qemu']} (TCG); MB = 10^6 bytes")
    for tool, r in doc["results"].items():
        for error in r["errors"]:
            print(f"{tool} failed: {error}")
    for note in doc["notes"]:
        print(f"note: {note}")
    print_load(doc)
    print()
    print_table([Row(**r) for r in doc["rows"]])
    print()
    print_summary(doc)


def print_load(doc: dict[str, Any]) -> None:
    """How busy the machine was during the timed phases, and a warning when that distorts them."""
    phases = [p for p in doc["phases"] if p["wall_s"] >= MIN_PHASE_S]
    others = [(p["other_cpu_s"] / p["wall_s"], p["name"]) for p in phases]
    if others:
        worst, name = max(others)
        print(
            f"CPU used by other processes during timed phases of >= {MIN_PHASE_S:g} s: "
            f"up to {worst:.2f} CPUs ({name})"
        )
        if worst > BUSY_WARNING:
            busy = ", ".join(f"{n} {c:.2f}" for c, n in others if c > BUSY_WARNING)
            print(f"WARNING: other work used CPUs during: {busy}; the times of those phases are unreliable")


def print_summary(doc: dict[str, Any]) -> None:
    s = doc["summary"]
    status = "all targets met" if not s["failed"] else "FAILED: " + "; ".join(s["failed"])
    print(f"summary: {s['passed']}/{s['targets']} targets met -- {status}")


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="disk image size (default 2G)")
    p.add_argument(
        "--workdir", type=Path, help="work files go here (default: a new directory under /var/tmp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work files (image, repositories, logs)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--runs", type=int, default=2, metavar="N", help="runs of each measurement (default 2)")
    p.add_argument("--no-borg", action="store_true", help="skip the borg mount comparison")
    p.add_argument("--cache-size", default="512M", help="vmrecover mount --cache-size (default 512M)")
    p.add_argument("--boot-timeout", type=float, default=300, help="seconds per guest boot (default 300)")
    p.add_argument(
        "--vmrecover", type=Path, default=VMRECOVER, help="vmrecover command (default: the venv's)"
    )
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    try:
        vmrecover_parse_size(args.cache_size)
    except VmrecoverError as exc:
        p.error(f"--cache-size: {exc.message}")
    return args


def make_workdir(args: argparse.Namespace, prefix: str = "vmrecover-fuse-bench-") -> Path:
    """The work directory: --workdir (emptied if a previous run made it) or a new one under /var/tmp."""
    path = DEFAULT_WORKDIR_PARENT if args.workdir is None else args.workdir.resolve()
    kind = fs_type(next(p for p in (path, *path.parents) if p.exists()))
    if kind in MEMORY_FILESYSTEMS:
        raise BenchError(f"{path} is on {kind}, in memory: choose a --workdir on a disk")
    if args.workdir is None:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=DEFAULT_WORKDIR_PARENT))
    prepare_workdir(path)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(args.vmrecover, os.X_OK):
        print(f"error: {args.vmrecover} is missing; run scripts/setup.sh", file=sys.stderr)
        return 1
    if not os.path.exists("/dev/fuse"):
        print("error: /dev/fuse is missing: FUSE mounts are not possible here", file=sys.stderr)
        return 1
    borg = None if args.no_borg else shutil.which("borg")
    if borg is None and not args.no_borg:
        log("borg is not installed (scripts/setup.sh borgbackup): borg columns will be n/a")
    try:
        workdir = make_workdir(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    env = bench_env(workdir)
    cache_bytes = vmrecover_parse_size(args.cache_size)
    ctx = Context(args, workdir, env, can_drop_caches(), borg, cache_bytes)
    if not ctx.can_drop_caches:
        log("cannot write /proc/sys/vm/drop_caches (not root?): runs will not start cold")
    free = shutil.disk_usage(workdir).free
    if free < 2 * args.size:
        log(f"warning: {human(free)} free under {workdir}; the benchmark needs up to ~2x the image size")
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = {t: ToolResult() for t in TOOLS}
    keep = args.keep
    try:
        try:
            setup = prepare(ctx, results)
            for run in range(1, args.runs + 1):
                measure_sequential(ctx, setup, results, run)
            for run in range(1, args.runs + 1):
                measure_random(ctx, setup, results, run)
            for run in range(1, args.runs + 1):
                measure_boot(ctx, setup, results, run)
        finally:
            cleanup(ctx)
        doc = report(ctx, setup, results)
    except (BenchError, VmrecoverError, OSError) as exc:
        msg = exc.message if isinstance(exc, VmrecoverError) else str(exc)
        print(f"error: {msg}\n(work files and logs kept under {workdir})", file=sys.stderr)
        keep = True
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(doc, args.json, print_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
