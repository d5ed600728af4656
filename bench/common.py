"""What the benchmarks share: their work directory, the commands they run and how, the test image, the
numbers and the report.

Every script in bench/ is a measurement, not a test: it prints a table with a PASS/FAIL column per target
and exits 0 whether or not the targets are met (1 only when its set-up or a vmrecover command fails).
The pieces here keep them alike:

- **work directory**: ``--workdir`` (a directory this code made earlier is emptied; any other non-empty
  one is refused) or a new one under /var/tmp; removed at the end unless ``--keep`` or a failure, and never
  while something is still mounted inside it;
- **commands**: :meth:`Context.run` (output kept under ``WORKDIR/logs/``), :meth:`Context.measured`
  (through a tiny launcher, for the command's own peak RSS and CPU time), :meth:`Context.vmr`
  (``vmrecover ... --json``), ``vmrecover nfs serve`` (:func:`nfs_serve`), recovery sessions;
- **cold runs**: ``sync; echo 3 > /proc/sys/vm/drop_caches`` when allowed (root), and how much CPU the
  rest of the machine used during each timed phase, so that a busy machine is reported;
- **the test image**: sparse 1 MiB regions of holes, text and random bytes (:func:`make_image`);
- **the report**: MB = 10^6 bytes, medians and percentiles, a table, a summary line, JSON with
  ``--json``; SIGTERM unwinds like Ctrl-C so that everything is unmounted and stopped.

Scripts import this as ``bench.common``: run them from the repository root, as the Makefile does
(``.venv/bin/python bench/X.py`` or ``.venv/bin/python -m bench.X``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar

from tests.testkit.guest import BootResult, build_guest_disk
from tests.testkit.guest import boot as boot_guest
from vmrecover.cli.output import human_bytes
from vmrecover.errors import VmrecoverError
from vmrecover.repo.repository import parse_size as vmrecover_parse_size

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
VMRECOVER = ROOT / ".venv" / "bin" / "vmrecover"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
MARKER = ".vmrecover-bench"  # marks a workdir a benchmark created, so a re-run may empty it
DEFAULT_WORKDIR_PARENT = Path("/var/tmp")
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"}
SEED = 20240601
BORG_CHUNKER = "fixed,4194304"  # borg's settings in every comparison: backup_bench's, borg mount's
BORG_COMPRESSION = "zstd,3"
BORG_CREATE = f"borg create --chunker-params {BORG_CHUNKER} --compression {BORG_COMPRESSION}"
BUSY_WARNING = 0.3  # CPUs used by other work during a timed phase above which the report warns
MIN_PHASE_S = 2.0  # shorter phases are left out of that check: CPU time is counted in 10 ms ticks
NFS_EXPORT = "/vmrecover"  # what ``vmrecover nfs serve`` exports
NFS_START_TIMEOUT_S = 60.0  # a server not ready after this long has failed

_started = time.monotonic()


def log(msg: str) -> None:
    """Progress, on stderr, with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _started:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    """SIGTERM: unwinds like Ctrl-C, so that the finally blocks unmount and stop everything."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def error_text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, VmrecoverError) else str(exc)


# --- sizes and formatting --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'2G', '256M', '1048576' -> bytes (vmrecover's own parser), rounded down to whole MiB, >= 16M."""
    try:
        value = vmrecover_parse_size(text)
    except VmrecoverError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    value -= value % MiB
    if value < 16 * MiB:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: use at least 16M")
    return value


def size_text(text: str) -> str:
    """A size given to a vmrecover option (``--cache-size 512M``): checked, passed on as written."""
    try:
        vmrecover_parse_size(text)
    except VmrecoverError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    return text


def size_bytes(text: str) -> int:
    return vmrecover_parse_size(text)


def mb(n: float) -> float:
    return n / 1e6


def human(n: float) -> str:
    return human_bytes(n)


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def yes_no(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "NO")


# --- statistics ------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    k = max(0, min(len(sorted_values) - 1, -(-len(sorted_values) * p // 100) - 1))
    return sorted_values[int(k)]


def latency_stats(samples: Sequence[float]) -> dict[str, float] | None:
    """Count and p50/p90/p99/max in milliseconds of latencies in seconds (None for no samples)."""
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


# --- the table and the summary ---------------------------------------------------------------------


class Judged(Protocol):
    metric: str
    result: str  # "PASS", "FAIL", "n/a" or "info"


def print_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> None:
    """Columns as wide as their widest cell, two spaces apart, a rule under the header."""
    cells = [list(header), *map(list, lines)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def summary(rows: Sequence[Judged]) -> dict[str, Any]:
    judged = [r for r in rows if r.result in ("PASS", "FAIL")]
    failed = [r.metric for r in judged if r.result == "FAIL"]
    return {"targets": len(judged), "passed": len(judged) - len(failed), "failed": failed}


def print_summary(doc: dict[str, Any]) -> None:
    s = doc["summary"]
    status = "all targets met" if not s["failed"] else "FAILED: " + "; ".join(s["failed"])
    print(f"summary: {s['passed']}/{s['targets']} targets met -- {status}")


def emit(doc: dict[str, Any], as_json: bool, printer: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        printer(doc)


# --- processes -------------------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds all CPUs of the machine have spent busy since boot (/proc/stat; 0 where missing)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # guest time is already counted in user/nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def proc_status(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmHWM, VmRSS...) in bytes (None if the process is gone)."""
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


def wait_exit(pid: int, seconds: float) -> bool:
    """Wait until *pid* has exited (or is a zombie: no VmHWM any more); False if it still runs."""
    deadline = time.monotonic() + seconds
    while proc_status(pid, "VmHWM") is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_process(proc: subprocess.Popen[bytes], what: str, notes: list[str], seconds: float = 30) -> None:
    """SIGTERM a process we started, then SIGKILL if it is still there after *seconds* (noted)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            notes.append(f"{what} (pid {proc.pid}) did not stop within {seconds:g} s of SIGTERM: killed")
            proc.kill()
            proc.wait()


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def tool_version(argv: list[str]) -> str:
    """The first line a tool prints for its version ("n/a" if it cannot be run)."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def dpkg_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True,
                         check=False)  # fmt: skip
    return out.stdout.strip() or "n/a"


# Commands whose peak RSS is measured run under this tiny launcher (python -I -S) that forks, execs and
# wait4()s them.  Running them straight from the benchmark would not do: a child's ru_maxrss starts at
# its parent's peak RSS (exec records the RSS high-water mark of the mm it replaces, and subprocess uses
# vfork), so every command would report at least the benchmark's own peak (~100 MB after building the
# image).  The launcher's peak is a few MB.  It writes "exit-code max-rss-KiB wall-s cpu-s" to argv[1].
LAUNCHER = """
import os, sys, time
start = time.monotonic()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        os.write(2, f"cannot run {sys.argv[2]}: {exc}\\n".encode())
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.monotonic() - start
with open(sys.argv[1], "w") as f:
    cpu = usage.ru_utime + usage.ru_stime
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} {wall} {cpu}")
"""


@dataclass
class Run:
    """A command run through the launcher."""

    argv: list[str]
    rc: int
    wall_s: float  # the command's wall time plus the sync after it
    cpu_s: float  # user + system CPU time of the command (and its children)
    max_rss: int  # bytes
    other_cpu_s: float  # CPU time the rest of the machine used meanwhile (other processes, kernel threads)
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError:
            raise BenchError(f"{self.argv[0]} printed no JSON: {self.stdout[-500:]!r}") from None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("stdout", "stderr")}


def failed_command(argv: Sequence[str], rc: int, stdout: str, stderr: str) -> BenchError:
    return BenchError(
        f"{' '.join(argv)} exited with {rc}\nstdout: {stdout[-2000:]}\nstderr: {stderr[-2000:]}"
    )


# --- files -----------------------------------------------------------------------------------------


def data_extents(path: Path) -> Iterator[tuple[int, int]]:
    """(start, end) of each stretch of *path* that is not a hole (SEEK_DATA/SEEK_HOLE)."""
    pos = 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            yield start, end
            pos = end


def data_bytes(path: Path) -> int:
    """Bytes of *path* that are not holes."""
    return sum(end - start for start, end in data_extents(path))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def mounts_under(path: Path) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount at or below *path*, and of the longest mount point
    above it last (/proc/self/mounts)."""
    target = str(path.resolve())
    below, above, kind = [], "", "unknown"
    with open("/proc/self/mounts") as f:
        for line in f:
            _, where, fstype, *_ = line.split()
            where = where.replace("\\040", " ")
            if where != target and where.startswith(target.rstrip("/") + "/"):
                below.append((where, fstype))
            elif (target == where or target.startswith(where.rstrip("/") + "/")) and len(where) >= len(above):
                above, kind = where, fstype
    return [*below, (above, kind)]


def fs_type(path: Path) -> str:
    """The type of the filesystem *path* is on."""
    return mounts_under(path)[-1][1]


# --- the test image --------------------------------------------------------------------------------

REGION = MiB
HOLE_SHARE, TEXT_SHARE = 0.35, 0.35  # the rest is random


class TextSource:
    """Lines of words drawn (Zipf-like) from a fixed pseudo-word vocabulary: ~2.8x with zstd -3."""

    LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
    FREQ = (12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8)
    FREQ += (2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1)
    LENGTHS = (1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12)

    def __init__(self, rng: random.Random, vocabulary: int = 50_000, lines: int = 1 << 18) -> None:
        words: set[str] = set()
        while len(words) < vocabulary:
            words.add("".join(rng.choices(self.LETTERS, self.FREQ, k=rng.choice(self.LENGTHS))))
        vocab = sorted(words)
        rng.shuffle(vocab)
        cum, acc = [], 0.0
        for rank in range(len(vocab)):
            acc += 1 / (rank + 1)
            cum.append(acc)
        self.lines = [
            " ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(4, 16)))
            + ("." if rng.random() < 0.6 else ",")
            + "\n"
            for _ in range(lines)
        ]
        self.avg_line = sum(map(len, self.lines)) / len(self.lines)

    def region(self, rng: random.Random, size: int = REGION) -> bytes:
        out = b""
        while len(out) < size:
            out += "".join(rng.choices(self.lines, k=int(size / self.avg_line * 1.05) + 64)).encode()
        return out[:size]


@dataclass
class ImageInfo:
    path: str
    size: int
    regions: int
    holes: int
    text: int
    random: int
    text_zstd_ratio: float | None
    build_s: float


def make_image(path: Path, size: int, seed: int) -> ImageInfo:
    """A sparse raw image of shuffled 1 MiB regions: holes (never written), text and random bytes."""
    started = time.monotonic()
    rng = random.Random(seed)
    n = size // REGION
    holes, text = round(n * HOLE_SHARE), round(n * TEXT_SHARE)
    kinds = ["hole"] * holes + ["text"] * text + ["random"] * (n - holes - text)
    rng.shuffle(kinds)
    source = TextSource(random.Random(seed + 1))
    text_rng, random_rng = random.Random(seed + 2), random.Random(seed + 3)
    samples: list[bytes] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i, kind in enumerate(kinds):
            if kind == "hole":
                continue
            if kind == "text":
                data = source.region(text_rng)
                if len(samples) < 16:
                    samples.append(data)
            else:
                data = random_rng.randbytes(REGION)
            pwrite_all(fd, data, i * REGION)
        os.fsync(fd)
    finally:
        os.close(fd)
    return ImageInfo(
        str(path), size, n, holes, text, n - holes - text, zstd_ratio(samples), time.monotonic() - started
    )


def zstd_ratio(samples: list[bytes]) -> float | None:
    """zstd level 3 compression ratio of 1 MiB samples compressed one by one (None without zstandard)."""
    try:
        import zstandard
    except ImportError:
        return None
    if not samples:
        return None
    c = zstandard.ZstdCompressor(level=3)
    return sum(map(len, samples)) / sum(len(c.compress(s)) for s in samples)


def borg_create_argv(borg: str, repo: Path, archive: str, image: Path, *, sparse: bool = False) -> list[str]:
    argv = [borg, "create", "--chunker-params", BORG_CHUNKER, "--compression", BORG_COMPRESSION]
    return [*argv, *(["--sparse"] if sparse else []), f"{repo}::{archive}", str(image)]


# --- the incremental change ------------------------------------------------------------------------


@dataclass
class Change:
    extents: list[tuple[int, int]]
    changed_bytes: int
    aligned: int
    unaligned: int


ALIGNED_SHARE = 0.7  # probability that a changed range is a whole run of 1 MiB regions


def modify_image(path: Path, size: int, share: float, seed: int) -> Change:
    """Overwrite ~*share* of the image with random bytes at non-overlapping positions.

    Most ranges are runs of 1-4 whole 1 MiB regions (chunk-aligned for 1 MiB chunks); the others start
    at any byte offset and are 4 KiB..2 MiB long.  No two ranges touch the same 1 MiB region, so the
    changed byte count is exact and every touched chunk holds one range only.
    """
    rng = random.Random(seed)
    target = int(size * share)
    slots = size // REGION
    used = bytearray(slots)
    extents: list[tuple[int, int]] = []
    aligned = unaligned = total = 0
    for _ in range(1_000_000):
        if total >= target:
            break
        is_aligned = rng.random() < ALIGNED_SHARE
        if is_aligned:
            start, length = rng.randrange(slots) * REGION, rng.randint(1, 4) * REGION
        else:
            start, length = rng.randrange(size), rng.randint(4096, 2 * MiB)
        length = min(length, target - total, size - start)
        first, last = start // REGION, (start + length - 1) // REGION
        if length <= 0 or any(used[first : last + 1]):
            continue
        used[first : last + 1] = b"\x01" * (last - first + 1)
        extents.append((start, length))
        total += length
        if is_aligned and length % REGION == 0:
            aligned += 1
        else:
            unaligned += 1
    extents.sort()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for start, length in extents:
            pwrite_all(fd, rng.randbytes(length), start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Change(extents, total, aligned, unaligned)


# --- the work directory ----------------------------------------------------------------------------


def prepare_workdir(path: Path) -> None:
    """Make *path* an empty work directory with a logs/ folder; refuse one this code did not make."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise BenchError(f"{path} is not empty and was not made by this script: choose another --workdir")
        if len(mounts_under(path)) > 1:
            raise BenchError(
                f"something is still mounted under {path}: unmount it or choose another --workdir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    (path / "logs").mkdir()


def make_workdir(path: Path | None, prefix: str, *, memory_ok: bool = False) -> Path:
    """The work directory: *path* (emptied if a benchmark made it) or a new ``/var/tmp/PREFIX*``.

    A directory in memory (tmpfs) is refused unless *memory_ok*: numbers about reading must come from a
    disk."""
    where = DEFAULT_WORKDIR_PARENT if path is None else path.resolve()
    kind = fs_type(next(p for p in (where, *where.parents) if p.exists()))
    if kind in MEMORY_FILESYSTEMS and not memory_ok:
        raise BenchError(f"{where} is on {kind}, in memory: choose a --workdir on a disk")
    if path is None:
        where = Path(tempfile.mkdtemp(prefix=prefix, dir=DEFAULT_WORKDIR_PARENT))
    prepare_workdir(where)
    return where


def remove_workdir(path: Path) -> None:
    """Remove the work directory, unless something is still mounted inside it (then it is kept)."""
    mounted = [where for where, _ in mounts_under(path)[:-1]]
    if mounted:
        log(f"not removing {path}: still mounted there: {', '.join(mounted)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def bench_env(workdir: Path) -> dict[str, str]:
    """The environment for the tools under test: no inherited repository, borg kept inside *workdir*."""
    env = dict(os.environ)
    env.pop("VMRECOVER_REPO", None)
    env.update(
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_BASE_DIR=str(workdir / "borg-base"),  # borg's cache, config and security dirs
    )
    return env


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# --- the benchmark context -------------------------------------------------------------------------


@dataclass
class Phase:
    """One timed phase: wall time and the CPU the rest of the machine used meanwhile."""

    name: str
    wall_s: float
    daemon_cpu_s: float  # the process under test's (a daemon, a measured command)
    other_cpu_s: float


@dataclass
class Context:
    """The work directory, the environment of the commands run, and what happened on the way."""

    args: argparse.Namespace
    workdir: Path
    env: dict[str, str] = field(init=False)
    can_drop_caches: bool = field(init=False)
    logs: Path = field(init=False)
    repo: Path = field(init=False)  # the vmrecover repository vmr() works on by default
    notes: list[str] = field(default_factory=list)  # anomalies seen on the way (hung daemons...)
    phases: list[Phase] = field(default_factory=list)
    load_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    count: int = 0

    def __post_init__(self) -> None:
        self.env = bench_env(self.workdir)
        self.can_drop_caches = can_drop_caches()
        self.logs = self.workdir / "logs"
        self.repo = self.workdir / "vmrecover-repo"

    def cold(self) -> None:
        """``sync; echo 3 > /proc/sys/vm/drop_caches`` (when allowed)."""
        os.sync()
        if self.can_drop_caches:
            DROP_CACHES.write_text("3\n")

    def log_base(self, name: str) -> Path:
        """``WORKDIR/logs/NNN-name``: where a command's output is kept (add .out, .err, .log)."""
        self.count += 1
        return self.logs / f"{self.count:03d}-{name}"

    def run(
        self, argv: Sequence[str | Path], name: str, *, timeout: float = 3600, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (BenchError if it fails); its output is kept under logs/."""
        argv = [str(a) for a in argv]
        base = self.log_base(name)
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL, timeout=timeout,
            cwd=cwd,
        )  # fmt: skip
        Path(f"{base}.out").write_text(proc.stdout)
        Path(f"{base}.err").write_text(proc.stderr)
        if proc.returncode != 0:
            raise failed_command(argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def measured(self, argv: Sequence[str | Path], name: str, *, cwd: Path | None = None) -> Run:
        """Run a command through the launcher: its wall time (plus a final sync), CPU time and peak RSS."""
        argv = [str(a) for a in argv]
        base = self.log_base(name)
        usage_file = Path(f"{base}.usage")
        busy = machine_busy_s()
        with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
            subprocess.run(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage_file), *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=self.env, check=False,
            )  # fmt: skip
        start = time.monotonic()
        os.sync()
        sync_s = time.monotonic() - start
        busy = machine_busy_s() - busy
        try:
            rc, maxrss_kib, wall, cpu = usage_file.read_text().split()
        except (OSError, ValueError):
            raise BenchError(f"the launcher of {argv[0]} failed: {tail(Path(f'{base}.err'))}") from None
        run = Run(
            argv, int(rc), float(wall) + sync_s, float(cpu), int(maxrss_kib) * 1024,
            max(0.0, busy - float(cpu)), Path(f"{base}.out").read_text(errors="replace"),
            Path(f"{base}.err").read_text(errors="replace"),
        )  # fmt: skip
        self.phases.append(Phase(name, run.wall_s, run.cpu_s, run.other_cpu_s))
        if run.rc != 0:
            raise failed_command(argv, run.rc, run.stdout, run.stderr)
        return run

    def vmr(self, args: Sequence[str | Path], name: str, *, repo: Path | None = None) -> Any:
        """``vmrecover ARGS --repo REPO --json``: what it printed, parsed."""
        argv = [self.args.vmrecover, *args, "--repo", repo or self.repo, "--json"]
        out = self.run(argv, f"vmrecover-{name}").stdout
        try:
            return json.loads(out)
        except ValueError:
            raise BenchError(f"vmrecover {name} printed no JSON: {out[-500:]!r}") from None

    @contextlib.contextmanager
    def phase(
        self, name: str, pid: int | None = None, cpu: Callable[[], float] | None = None
    ) -> Iterator[None]:
        """Time a phase; remember how much CPU the rest of the machine used meanwhile.  The measured
        process's CPU: *pid*'s, or what *cpu* says (several processes, say)."""
        measured = cpu if cpu is not None else (lambda: proc_cpu_s(pid))
        busy, mine, daemon = machine_busy_s(), own_cpu_s(), measured()
        start = time.monotonic()
        yield
        wall = time.monotonic() - start
        daemon = measured() - daemon
        other = machine_busy_s() - busy - (own_cpu_s() - mine) - daemon
        self.phases.append(Phase(name, wall, daemon, max(0.0, other)))


C = TypeVar("C", bound=Context)


@contextlib.contextmanager
def recovery_session(ctx: Context, target: str, name: str) -> Iterator[str]:
    """``vmrecover recover start TARGET --name NAME``, stopped afterwards whatever happens."""
    ctx.vmr(["recover", "start", target, "--name", name], "recover-start")
    try:
        yield name
    finally:
        try:
            ctx.vmr(["recover", "stop", name], "recover-stop")
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            ctx.notes.append(f"recovery session {name} could not be stopped: {exc}")


# --- vmrecover nfs serve ---------------------------------------------------------------------------


@dataclass
class NfsServer:
    tool: str  # "vmrecover" or "ganesha"
    proc: subprocess.Popen[bytes]
    nfs_port: int
    mount_port: int
    export: str  # the path a client mounts
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str = "") -> str:
        """A libnfs URL of *path* inside the export that names the ports (no portmapper needed)."""
        return (
            f"nfs://127.0.0.1{self.export}/{path.lstrip('/')}"
            f"?version=3&nfsport={self.nfs_port}&mountport={self.mount_port}"
        )


@contextlib.contextmanager
def nfs_serve(
    ctx: Context, *, cache_size: str, repo: Path | None = None, portmapper: bool = False
) -> Iterator[NfsServer]:
    """A fresh ``vmrecover nfs serve`` on 127.0.0.1 (an empty chunk cache), stopped with SIGTERM after.

    With *portmapper* it answers on port 111: the caller holds whatever lock keeps that port to itself."""
    with contextlib.ExitStack() as stack:
        err = Path(f"{ctx.log_base('nfs-serve')}.err")
        argv = [
            str(ctx.args.vmrecover), "nfs", "serve", "--listen", "127.0.0.1", "--port", "0", "--json",
            "--cache-size", cache_size, "--repo", str(repo or ctx.repo),
            *(["--portmapper"] if portmapper else []),
        ]  # fmt: skip
        with open(err, "wb") as errf:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf, env=ctx.env,
                start_new_session=True,
            )  # fmt: skip
        stack.callback(stop_process, proc, "vmrecover nfs serve", ctx.notes)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], NFS_START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if not line:
            stop_process(proc, "vmrecover nfs serve", ctx.notes)
            raise BenchError(f"vmrecover nfs serve did not start (exit {proc.returncode}): {tail(err)}")
        try:
            info = json.loads(line)
            server = NfsServer(
                "vmrecover", proc, int(info["nfs_port"]), int(info["mount_port"]), NFS_EXPORT, err
            )
        except (ValueError, KeyError, TypeError):
            raise BenchError(f"nfs serve printed {line[:500]!r} instead of its ready line") from None
        if portmapper and info.get("portmap_port") != 111:
            raise BenchError(f"nfs serve --portmapper does not answer on port 111: {info}")
        yield server


# --- the test image, its backups and the test guest ------------------------------------------------


@dataclass
class Prepared:
    """The test image, backed up into ``ctx.repo`` as ``bench@point``; the test guest as ``guest@point``."""

    image: Path
    image_sha256: str
    image_data_bytes: int
    point: str
    disk: str
    vm_backup: dict[str, Any]  # what ``vmrecover backup --json`` printed
    build_s: float
    guest_point: str = ""
    guest_disk: str = ""

    def image_doc(self) -> dict[str, Any]:
        return {
            "size": os.path.getsize(self.image),
            "data_bytes": self.image_data_bytes,
            "sha256": self.image_sha256,
            "build_s": self.build_s,
            "vmrecover_point": self.point,
            "vmrecover_backup": self.vm_backup,
        }


def prepare_backups(ctx: Context, image: Path, size: int, *, guest: bool) -> Prepared:
    """Build the test image at *image*, ``vmrecover init --chunk-size 1M`` and back it up (``--format
    raw``); with *guest*, also build the bootable test guest and back it up."""
    log(f"building a {human(size)} sparse image at {image}")
    info = make_image(image, size, SEED)
    log(f"  {info.holes} hole, {info.text} text, {info.random} random regions in {info.build_s:.1f} s")
    image_sha = sha256_file(image)
    log(f"  sha256 {image_sha}")
    ctx.vmr(["init", "--chunk-size", "1M", "--format", str(ctx.args.repo_format)], "init")
    log("vmrecover backup of the image")
    doc = ctx.vmr(["backup", "--vm", "bench", image, "--format", "raw"], "backup")
    log(f"  point {doc['point']}, {doc['duration_s']} s")
    s = Prepared(
        image, image_sha, data_bytes(image), doc["point"], doc["disks"][0]["name"], doc, info.build_s
    )
    if guest:
        disk = build_guest_disk(ctx.workdir / "guest.raw", cache_dir=ctx.workdir / "guest-cache")
        gdoc = ctx.vmr(["backup", "--vm", "guest", disk, "--format", "raw"], "backup-guest")
        s.guest_point, s.guest_disk = gdoc["point"], gdoc["disks"][0]["name"]
        log(f"test guest {disk} backed up as guest@{s.guest_point}")
    return s


def decode_limit(ctx: Context, point: str, disk: str) -> tuple[float, int]:
    """This machine's decode-and-verify limit for a point's disk: the chunk file of every non-hole
    chunk of the disk read into memory first, then each decoded and proven (ChunkCodec.decode:
    decompress, hash, check) on all CPUs, no I/O.  Returns (seconds, plaintext bytes decoded); the
    disk's size over those seconds is the fastest any reader of the whole disk could go here."""
    from concurrent.futures import ThreadPoolExecutor

    from vmrecover.repo.blob import ZERO_DIGEST
    from vmrecover.repo.repository import Repository

    with Repository.open(ctx.repo) as repo:
        index = repo.read_index(point, disk)
        digests = [d for d in map(index.digest, range(index.count)) if d != ZERO_DIGEST]
        files = {d: repo.chunks.read_raw(d) for d in set(digests)}
        blobs = [(d, files[d]) for d in digests]
        codec = repo.codec
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        began = time.perf_counter()
        total = sum(pool.map(lambda db: len(codec.decode(db[0], db[1])), blobs, chunksize=4))
        return time.perf_counter() - began, total


def boot_checked(what: str, **kw: Any) -> BootResult:
    """Boot the test guest (``tests.testkit.guest.boot``): BenchError unless it booted once, then stopped."""
    res = boot_guest(**kw)
    if not (res.powered_off and res.boots_seen == [1]):
        raise BenchError(
            f"{what}: qemu exit {res.returncode}, boots seen {res.boots_seen} (want [1]), "
            f"powered off: {res.powered_off}\n{res.serial_tail()}\n{res.qemu_output[-1000:]}"
        )
    return res


def boot_local_copy(ctx: Context, run: int) -> float:
    """Seconds the test guest takes to boot to power-off, cold, from a fresh local raw copy."""
    wd = ctx.workdir
    disk = build_guest_disk(wd / f"guest-local-{run}.raw", cache_dir=wd / "guest-cache")  # never booted
    try:
        ctx.cold()
        with ctx.phase(f"local boot {run}"):
            res = boot_checked(
                "boot from the local copy", disk=disk, serial_log=ctx.logs / f"boot-local-{run}.serial",
                timeout=ctx.args.boot_timeout,
            )  # fmt: skip
    finally:
        if not ctx.args.keep:
            disk.unlink()
    log(f"  local raw copy: {res.seconds:.2f} s")
    return res.seconds


# --- the report ------------------------------------------------------------------------------------


def environment(ctx: Context, **more: Any) -> dict[str, Any]:
    """The machine, the work directory and vmrecover's version; *more* is added."""
    git = tool_version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_at_start": ctx.load_at_start,
        "workdir": str(ctx.workdir),
        "workdir_fs": fs_type(ctx.workdir),
        "page_cache_dropped": ctx.can_drop_caches,
        "vmrecover": f"{tool_version([str(ctx.args.vmrecover), '--version'])} (git {git})",
        **more,
    }


def print_host(env: dict[str, Any], *, workdir: bool = True) -> None:
    load = ", ".join(f"{v:.2f}" for v in env["load_average_at_start"])
    where = f"; workdir {env['workdir']} ({env['workdir_fs']})" if workdir else ""
    print(
        f"host: {env['cpus']} CPUs, {human(env['memory_bytes'])} RAM, kernel {env['kernel']}, "
        f"load average at start {load}{where}"
    )


def image_line(img: dict[str, Any]) -> str:
    """The test image as :meth:`Prepared.image_doc` describes it."""
    return (
        f"image: {human(img['size'])} raw sparse ({human(img['data_bytes'])} data), sha256 {img['sha256']}; "
        "vmrecover 1 MiB chunks"
    )


def cold_text(env: dict[str, Any]) -> str:
    return "yes" if env["page_cache_dropped"] else "NO (not root: runs are not cold, numbers are optimistic)"


def print_load(doc: dict[str, Any], min_s: float = MIN_PHASE_S) -> None:
    """How busy the machine was during the timed phases, and a warning when that distorts them."""
    phases = [p for p in doc.get("phases", []) if p["wall_s"] >= min_s and p["wall_s"] > 0]
    others = [(p["other_cpu_s"] / p["wall_s"], p["name"]) for p in phases]
    if others:
        worst, name = max(others)
        which = f"timed phases of >= {min_s:g} s" if min_s else "timed phases"
        print(f"CPU used by other processes during {which}: up to {worst:.2f} CPUs ({name})")
        if worst > BUSY_WARNING:
            busy = ", ".join(f"{n} {c:.2f}" for c, n in others if c > BUSY_WARNING)
            print(f"WARNING: other work used CPUs during: {busy}; the times of those phases are unreliable")


def print_results(
    doc: dict[str, Any],
    header: Sequence[str],
    lines: Sequence[Sequence[str]],
    *,
    min_phase_s: float = MIN_PHASE_S,
) -> None:
    """The end of every report: notes, the load during the timed phases, the table, the summary line."""
    for note in doc.get("notes", []):
        print(f"note: {note}")
    print_load(doc, min_phase_s)
    print()
    print_table(header, lines)
    print()
    print_summary(doc)


# --- main ------------------------------------------------------------------------------------------


def arg_parser(
    doc: str | None, *, runs: int | None = None, size: bool = True, serves: str | None = None
) -> argparse.ArgumentParser:
    """The options every benchmark has: --workdir, --keep, --json, --vmrecover; --runs, --size; for one
    that *serves* the datastore (``mount``, ``nfs serve``) and boots the test guest from it, --cache-size
    and --boot-timeout."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    if size:
        p.add_argument(
            "--size", type=parse_size, default=parse_size("2G"), help="disk image size (default 2G)"
        )
    p.add_argument(
        "--workdir", type=Path, help="work files go here (default: a new directory under /var/tmp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the work files (images, repositories, logs)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    if runs is not None:
        p.add_argument(
            "--runs", type=int, default=runs, metavar="N", help=f"runs of each measurement (default {runs})"
        )
    p.add_argument(
        "--vmrecover", type=Path, default=VMRECOVER, help="vmrecover command (default: the venv's)"
    )
    p.add_argument(
        "--repo-format", type=int, choices=(1, 2), default=2,
        help="repository format of the repositories it makes (default 2; 1 to measure the old one)",
    )  # fmt: skip
    if serves:
        p.add_argument(
            "--cache-size",
            type=size_text,
            default="512M",
            help=f"vmrecover {serves} --cache-size (default 512M)",
        )
        p.add_argument("--boot-timeout", type=float, default=300, help="seconds per guest boot (default 300)")
    return p


def parse_args(p: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if getattr(args, "runs", 1) < 1:
        p.error("--runs must be at least 1")
    return args


def bench_main(
    args: argparse.Namespace,
    make_context: Callable[[argparse.Namespace, Path], C],
    body: Callable[[C], dict[str, Any]],
    printer: Callable[[dict[str, Any]], None],
    *,
    prefix: str,
    memory_ok: bool = False,
    tools: dict[str, str] | None = None,
    free_needed: int = 0,
) -> int:
    """What every benchmark's main() does around its measurements.

    Checks the vmrecover command and the *tools* it needs (name -> the package to install), makes the
    work directory (``--workdir`` or a new ``/var/tmp/PREFIX*``), runs *body* with a context (SIGTERM
    unwinds like Ctrl-C), removes the work directory unless ``--keep`` or a failure, and prints the
    document *body* returns (the table through *printer*, or JSON).  Returns the exit code: 1 if the
    set-up or a command failed, else 0 whatever the targets say."""
    if not os.access(args.vmrecover, os.X_OK):
        print(f"error: {args.vmrecover} is missing; run scripts/setup.sh", file=sys.stderr)
        return 1
    missing = {tool: pkg for tool, pkg in (tools or {}).items() if shutil.which(tool) is None}
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        print(f"error: {', '.join(missing)} missing: scripts/setup.sh {packages}", file=sys.stderr)
        return 1
    try:
        workdir = make_workdir(args.workdir, prefix, memory_ok=memory_ok)
    except (BenchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ctx = make_context(args, workdir)
    if not ctx.can_drop_caches:
        log("cannot write /proc/sys/vm/drop_caches (not root?): runs will not start cold")
    free = shutil.disk_usage(workdir).free
    if free < free_needed:
        log(f"warning: {human(free)} free under {workdir}; the benchmark needs up to {human(free_needed)}")
    signal.signal(signal.SIGTERM, _on_sigterm)
    keep = args.keep
    try:
        doc = body(ctx)
    except (BenchError, VmrecoverError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {error_text(exc)}\n(work files and logs kept under {workdir})", file=sys.stderr)
        keep = True
        return 1
    finally:
        if not keep:
            remove_workdir(workdir)
    emit(doc, args.json, printer)
    return 0
