#!/usr/bin/env python3
"""Backup/restore benchmark of vmrecover against borg, measured against the project's acceptance targets.

Steps (every work file lives under ``--workdir`` and is removed at the end unless ``--keep``):

1. build a sparse raw disk image of 1 MiB regions: ~35% holes, ~35% text (compresses ~2.8x with zstd),
   ~30% random bytes, shuffled with a fixed seed;
2. full backup with ``vmrecover backup`` and with ``borg create --chunker-params fixed,4194304
   --compression zstd,3`` into fresh repositories;
3. modify 5% of the image in place (mostly chunk-aligned ranges, some unaligned ones), write the
   changed ranges as JSON and run ``vmrecover backup --changed-extents`` (and a second ``borg create``);
4. restore the latest point to a raw file (and ``borg extract --sparse``) and compare sha256 sums.

The page cache is dropped before every timed run when /proc/sys/vm/drop_caches is writable (root).
Every timed run is the command's wall time plus a final ``sync``, so data a tool left dirty in the
page cache is counted.  Peak RSS comes from ``os.wait4`` on each command.  MB means 10^6 bytes.

This is a measurement, not a test: the exit code is 0 whether or not the targets are met (1 only when
a vmrecover command itself fails).  Run it as root for cold-cache numbers::

    .venv/bin/python bench/backup_bench.py                 # 2 GiB image
    .venv/bin/python bench/backup_bench.py --size 256M     # quick run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vmrecover.cli.output import human_bytes
from vmrecover.errors import VmrecoverError
from vmrecover.repo.repository import parse_size as vmrecover_parse_size

MiB = 2**20
REGION = MiB
ROOT = Path(__file__).resolve().parent.parent
VMRECOVER = ROOT / ".venv" / "bin" / "vmrecover"
MARKER = ".vmrecover-bench"  # marks a workdir this script created, so a re-run may wipe it
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
BORG_CHUNKER = "fixed,4194304"
BORG_COMPRESSION = "zstd,3"

# Acceptance targets.
FULL_SPEEDUP_MIN = 3.0  # borg full backup time / vmrecover full backup time
INCR_FRACTION_MAX = 0.25  # incremental time / full time
GROWTH_RATIO_MAX = 1.2  # repository growth / changed bytes
RESTORE_MBPS_MIN = 400.0  # restore rate over the data (non-hole) bytes
RSS_MB_MAX = 300.0  # peak RSS of one vmrecover process

# Image composition and modification.
HOLE_SHARE, TEXT_SHARE = 0.35, 0.35  # the rest is random
CHANGED_SHARE = 0.05
ALIGNED_SHARE = 0.7  # probability that a changed range is a whole run of 1 MiB regions
SEED = 20240601
BUSY_WARNING = 0.3  # CPUs used by other work during a timed run above which the report warns

_started = time.monotonic()

# Commands run under this tiny launcher (python -I -S) that forks, execs and wait4()s them.  Running them
# straight from this process would not do: a child's ru_maxrss starts at its parent's peak RSS (exec
# records the RSS high-water mark of the mm it replaces, and subprocess uses vfork), so every command
# would report at least this script's own peak (~100 MB after building the image).  The launcher's
# peak is a few MB.  It writes "exit-code max-rss-KiB wall-s cpu-s" to the file named by argv[1].
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


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --- sizes and formatting --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'2G', '256M', '1048576' -> bytes (vmrecover's own parser), rounded down to whole MiB."""
    try:
        value = vmrecover_parse_size(text)
    except VmrecoverError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    value -= value % MiB
    if value < 16 * MiB:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: use at least 16M")
    return value


def mb(n: float) -> float:
    return n / 1e6


def human(n: float) -> str:
    return human_bytes(n)


# --- running commands ------------------------------------------------------------------------------


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


@dataclass
class Run:
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


@dataclass
class Context:
    workdir: Path
    env: dict[str, str]
    can_drop_caches: bool
    vmrecover: Path
    borg: str | None
    keep: bool
    logs: Path = field(init=False)
    load_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    count: int = 0

    def __post_init__(self) -> None:
        self.logs = self.workdir / "logs"

    def cold(self) -> None:
        """Flush dirty pages and, when allowed, drop the page cache so the next run starts cold."""
        os.sync()
        if self.can_drop_caches:
            DROP_CACHES.write_text("3\n")

    def run(self, argv: list[str], name: str, *, cwd: Path | None = None) -> Run:
        """Run *argv* through the launcher: its wall time (plus a final sync), CPU time and peak RSS."""
        self.count += 1
        base = self.logs / f"{self.count:02d}-{name}"
        usage_file = Path(f"{base}.usage")
        busy = machine_busy_s()
        with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
            subprocess.run(
                [sys.executable, "-I", "-S", "-c", LAUNCHER, str(usage_file), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=self.env,
                check=False,
            )
        start = time.monotonic()
        os.sync()
        sync_s = time.monotonic() - start
        busy = machine_busy_s() - busy
        try:
            rc, maxrss_kib, wall, cpu = usage_file.read_text().split()
        except (OSError, ValueError):
            raise BenchError(f"the launcher of {argv[0]} failed: {Path(f'{base}.err').read_text()}") from None
        run = Run(
            argv,
            int(rc),
            float(wall) + sync_s,
            float(cpu),
            int(maxrss_kib) * 1024,
            max(0.0, busy - float(cpu)),
            Path(f"{base}.out").read_text(errors="replace"),
            Path(f"{base}.err").read_text(errors="replace"),
        )
        if run.rc != 0:
            raise BenchError(
                f"{' '.join(argv)} exited with {run.rc}\nstdout: {run.stdout[-2000:]}\n"
                f"stderr: {run.stderr[-2000:]}"
            )
        return run

    def vmr(self, args: list[str], name: str) -> Run:
        return self.run([str(self.vmrecover), *args, "--json"], name)


def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# --- files -----------------------------------------------------------------------------------------


def du_bytes(path: Path) -> int:
    """Allocated bytes (st_blocks * 512) of every file under *path*, like ``du -s --block-size=1``."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total + os.lstat(path).st_blocks * 512


def data_bytes(path: Path) -> int:
    """Bytes of *path* that are not holes (SEEK_DATA/SEEK_HOLE)."""
    total = pos = 0
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    return total


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


# --- the disk image --------------------------------------------------------------------------------


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


@dataclass
class Change:
    extents: list[tuple[int, int]]
    changed_bytes: int
    aligned: int
    unaligned: int


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


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    vmrecover: str
    borg: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def print_table(rows: list[Row]) -> None:
    header = ["metric", "vmrecover", "borg", "target", "result"]
    cells = [header] + [[r.metric, r.vmrecover, r.borg, r.target, r.result] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(c: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip()

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for c in cells[1:]:
        print(line(c))


# --- the benchmark ---------------------------------------------------------------------------------

STEPS = ("vm_full", "borg_full", "vm_incr", "borg_incr", "vm_restore", "borg_extract")


@dataclass
class Measurements:
    """One pass of the benchmark (or the aggregate of several: best times, worst RSS)."""

    runs: dict[str, Run] = field(default_factory=dict)  # step (see STEPS) -> its timed run
    docs: dict[str, Any] = field(default_factory=dict)  # vmrecover step -> the JSON it printed
    repo_bytes: dict[str, int] = field(default_factory=dict)  # "vm_full", "borg_incr"... -> du of the repo
    sha_ok: dict[str, bool] = field(default_factory=dict)  # "vm", "borg" -> restored sha256 == image's
    borg_error: str | None = None
    image: ImageInfo | None = None
    change: Change | None = None
    data_bytes_full: int = 0
    data_bytes_modified: int = 0
    image_sha256: str = ""


def borg_create_argv(borg: str, repo: Path, archive: str, image: Path, sparse: bool) -> list[str]:
    argv = [borg, "create", "--chunker-params", BORG_CHUNKER, "--compression", BORG_COMPRESSION]
    return [*argv, *(["--sparse"] if sparse else []), f"{repo}::{archive}", str(image)]


def borg_step(m: Measurements, step: str, fn: Callable[[], None]) -> None:
    """Run a borg step; a failure is recorded (borg columns become n/a) but does not stop the benchmark."""
    if m.borg_error is not None:
        return
    try:
        fn()
    except (BenchError, OSError) as exc:
        m.borg_error = f"{step}: {exc}"
        log(f"borg {step} failed, borg columns will be n/a: {exc}")


def timed(ctx: Context, m: Measurements, step: str, label: str, fn: Callable[[], Run]) -> Run:
    ctx.cold()
    log(label)
    run = m.runs[step] = fn()
    log(f"  {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU, {mb(run.max_rss):.0f} MB peak RSS")
    return run


def measure(ctx: Context, args: argparse.Namespace, wd: Path) -> Measurements:
    """One pass: image, full backups, modification, incremental backups, restores."""
    wd.mkdir()
    image, changed_file = wd / "disk.raw", wd / "changed-extents.json"
    vm_repo, borg_repo = wd / "vmrecover-repo", wd / "borg-repo"
    restored, borg_out = wd / "restored.raw", wd / "borg-extract"
    m = Measurements()
    borg = ctx.borg

    log(f"building a {human(args.size)} sparse image at {image}")
    m.image = make_image(image, args.size, SEED)
    m.data_bytes_full = data_bytes(image)
    img = m.image
    log(f"  {img.holes} hole, {img.text} text, {img.random} random regions in {img.build_s:.1f} s")

    # full backups
    ctx.vmr(["init", "--repo", str(vm_repo)], "vmrecover-init")
    full = ["backup", str(image), "--vm", "bench", "--repo", str(vm_repo)]
    run = timed(ctx, m, "vm_full", "vmrecover full backup", lambda: ctx.vmr(full, "vmrecover-full"))
    m.docs["vm_full"] = run.json()
    m.repo_bytes["vm_full"] = du_bytes(vm_repo)
    if borg:

        def borg_full() -> None:
            ctx.run([borg, "init", "-e", "none", str(borg_repo)], "borg-init")
            argv = borg_create_argv(borg, borg_repo, "full", image, args.borg_sparse)
            timed(ctx, m, "borg_full", "borg full backup", lambda: ctx.run(argv, "borg-full"))
            m.repo_bytes["borg_full"] = du_bytes(borg_repo)

        borg_step(m, "full backup", borg_full)

    # incremental backups
    log(f"modifying {CHANGED_SHARE:.0%} of the image")
    m.change = modify_image(image, args.size, CHANGED_SHARE, SEED + 100)
    changed_file.write_text(json.dumps([list(e) for e in m.change.extents]))
    m.image_sha256 = sha256_file(image)
    m.data_bytes_modified = data_bytes(image)
    incr = [*full, "--changed-extents", str(changed_file)]
    run = timed(ctx, m, "vm_incr", "vmrecover incremental backup", lambda: ctx.vmr(incr, "vmrecover-incr"))
    m.docs["vm_incr"] = run.json()
    m.repo_bytes["vm_incr"] = du_bytes(vm_repo)
    if borg:

        def borg_incr() -> None:
            argv = borg_create_argv(borg, borg_repo, "incr", image, args.borg_sparse)
            label = "borg second backup (no changed-extents input: borg re-reads the image)"
            timed(ctx, m, "borg_incr", label, lambda: ctx.run(argv, "borg-incr"))
            m.repo_bytes["borg_incr"] = du_bytes(borg_repo)

        borg_step(m, "incremental backup", borg_incr)

    # restores
    restore = ["restore", "bench", "--to", str(restored), "--repo", str(vm_repo)]
    run = timed(ctx, m, "vm_restore", "vmrecover restore", lambda: ctx.vmr(restore, "vmrecover-restore"))
    m.docs["vm_restore"] = run.json()
    m.sha_ok["vm"] = sha256_file(restored) == m.image_sha256
    if not ctx.keep:
        restored.unlink()
    if borg:

        def borg_extract() -> None:
            borg_out.mkdir()
            argv = [borg, "extract", "--sparse", f"{borg_repo}::incr"]
            label = "borg extract --sparse"
            timed(ctx, m, "borg_extract", label, lambda: ctx.run(argv, "borg-extract", cwd=borg_out))
            m.sha_ok["borg"] = sha256_file(borg_out / str(image).lstrip("/")) == m.image_sha256

        borg_step(m, "extract", borg_extract)
    if not ctx.keep:
        shutil.rmtree(wd)
    return m


def aggregate(passes: list[Measurements]) -> Measurements:
    """Best (shortest) time of each step over the passes, with the largest peak RSS any pass saw."""
    first = passes[0]
    agg = replace(first, runs={}, sha_ok={})
    for step in STEPS:
        runs = [p.runs[step] for p in passes if step in p.runs]
        if runs:
            best = min(runs, key=lambda r: r.wall_s)
            agg.runs[step] = replace(best, max_rss=max(r.max_rss for r in runs))
    for tool in ("vm", "borg"):
        oks = [p.sha_ok[tool] for p in passes if tool in p.sha_ok]
        if oks:
            agg.sha_ok[tool] = all(oks)
    agg.borg_error = next((p.borg_error for p in passes if p.borg_error), None)
    return agg


def wall(run: Run | None) -> float | None:
    return None if run is None else run.wall_s


def make_rows(m: Measurements, size: int) -> list[Row]:
    assert m.change is not None
    r = m.runs.get
    rows: list[Row] = []

    def pair(metric: str, vm: float | None, borg: float | None, spec: str = ".2f") -> None:
        rows.append(Row(metric, fmt(vm, spec), fmt(borg, spec), values={"vmrecover": vm, "borg": borg}))

    def judged(
        metric: str, vm: float | None, borg: float | None, spec: str, target: str, ok: Callable[[float], bool]
    ) -> None:
        result = verdict(None if vm is None else ok(vm))
        rows.append(
            Row(metric, fmt(vm, spec), fmt(borg, spec), target, result, {"vmrecover": vm, "borg": borg})
        )

    def rss(metric: str, vm: Run | None, borg: Run | None) -> None:
        v, b = (None if x is None else mb(x.max_rss) for x in (vm, borg))
        judged(metric, v, b, ".0f", f"<= {RSS_MB_MAX:g}", lambda x: x <= RSS_MB_MAX)

    def cpu(metric: str, vm: Run | None, borg: Run | None) -> None:
        text = [
            "n/a" if x is None else f"{x.cpu_s:.2f} ({x.cpu_s / x.wall_s:.2f} CPUs)" if x.wall_s else "n/a"
            for x in (vm, borg)
        ]
        values = {"vmrecover": None if vm is None else vm.cpu_s, "borg": None if borg is None else borg.cpu_s}
        rows.append(Row(metric, text[0], text[1], values=values))

    vf, bf = wall(r("vm_full")), wall(r("borg_full"))
    pair("full backup time (s)", vf, bf)
    speedup = ratio(bf, vf)
    rows.append(
        Row(
            "full backup speedup (borg time / vmrecover time)",
            fmt(speedup, ".2f", "x"),
            target=f">= {FULL_SPEEDUP_MIN:g}x",
            result=verdict(None if speedup is None else speedup >= FULL_SPEEDUP_MIN),
            values={"vmrecover": speedup},
        )
    )
    pair("full backup rate over disk size (MB/s)", ratio(mb(size), vf), ratio(mb(size), bf), ".0f")
    cpu("full backup CPU time, user+sys (s)", r("vm_full"), r("borg_full"))
    vm_repo, borg_repo = m.repo_bytes.get("vm_full"), m.repo_bytes.get("borg_full")
    rows.append(
        Row(
            "repository size after full backup",
            "n/a" if vm_repo is None else human(vm_repo),
            "n/a" if borg_repo is None else human(borg_repo),
            values={"vmrecover": vm_repo, "borg": borg_repo},
        )
    )
    rss("full backup peak RSS (MB)", r("vm_full"), r("borg_full"))

    vi, bi = wall(r("vm_incr")), wall(r("borg_incr"))
    pair("incremental backup time (s)", vi, bi)
    judged(
        "incremental time / full backup time",
        ratio(vi, vf),
        ratio(bi, bf),
        ".3f",
        f"<= {INCR_FRACTION_MAX:g}",
        lambda x: x <= INCR_FRACTION_MAX,
    )
    changed = m.change.changed_bytes

    def growth(tool: str) -> int | None:
        before, after = m.repo_bytes.get(f"{tool}_full"), m.repo_bytes.get(f"{tool}_incr")
        return None if before is None or after is None else after - before

    vg, bg = growth("vm"), growth("borg")
    rows.append(
        Row(
            f"repository growth (changed: {changed:,} B)",
            "n/a" if vg is None else f"{vg:,} B",
            "n/a" if bg is None else f"{bg:,} B",
            values={"vmrecover": vg, "borg": bg, "changed_bytes": changed},
        )
    )
    judged(
        "repository growth / changed bytes",
        ratio(vg, changed),
        ratio(bg, changed),
        ".3f",
        f"<= {GROWTH_RATIO_MAX:g}",
        lambda x: x <= GROWTH_RATIO_MAX,
    )
    rss("incremental backup peak RSS (MB)", r("vm_incr"), r("borg_incr"))

    vr, br = wall(r("vm_restore")), wall(r("borg_extract"))
    pair("restore time (s)", vr, br)
    disk_size = m.docs.get("vm_restore", {}).get("size", size)
    data = m.docs.get("vm_restore", {}).get("data_bytes")
    pair("restore rate over disk size (MB/s)", ratio(mb(disk_size), vr), ratio(mb(disk_size), br), ".0f")
    judged(
        f"restore rate over data bytes (MB/s; {human(data or 0)} data)",
        None if data is None else ratio(mb(data), vr),
        None if data is None else ratio(mb(data), br),
        ".0f",
        f">= {RESTORE_MBPS_MIN:g}",
        lambda x: x >= RESTORE_MBPS_MIN,
    )
    cpu("restore CPU time, user+sys (s)", r("vm_restore"), r("borg_extract"))

    def yes_no(ok: bool | None) -> str:
        return "n/a" if ok is None else ("yes" if ok else "NO")

    vm_ok, borg_ok = m.sha_ok.get("vm"), m.sha_ok.get("borg")
    rows.append(
        Row(
            "restored sha256 == modified image sha256",
            yes_no(vm_ok),
            yes_no(borg_ok),
            "equal",
            verdict(vm_ok),
            {"vmrecover": vm_ok, "borg": borg_ok},
        )
    )
    rss("restore peak RSS (MB)", r("vm_restore"), r("borg_extract"))
    return rows


def summary(rows: list[Row]) -> dict[str, Any]:
    judged = [r for r in rows if r.result in ("PASS", "FAIL")]
    failed = [r.metric for r in judged if r.result == "FAIL"]
    return {"targets": len(judged), "passed": len(judged) - len(failed), "failed": failed}


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def environment(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    git = tool_version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_at_start": ctx.load_at_start,
        "workdir": str(ctx.workdir),
        "passes": args.runs,
        "page_cache_dropped": ctx.can_drop_caches,
        "vmrecover": f"{tool_version([str(ctx.vmrecover), '--version'])} (git {git})",
        "borg": tool_version([ctx.borg, "--version"]) if ctx.borg else None,
        "borg_create": " ".join(
            ["borg create --chunker-params", BORG_CHUNKER, "--compression", BORG_COMPRESSION]
            + (["--sparse"] if args.borg_sparse else [])
        ),
    }


def report(ctx: Context, args: argparse.Namespace, passes: list[Measurements]) -> dict[str, Any]:
    m = aggregate(passes)
    assert m.image is not None and m.change is not None
    rows = make_rows(m, args.size)
    return {
        "environment": environment(ctx, args),
        "image": {
            **asdict(m.image),
            "data_bytes_full": m.data_bytes_full,
            "data_bytes_modified": m.data_bytes_modified,
            "sha256_modified": m.image_sha256,
        },
        "change": {
            "changed_bytes": m.change.changed_bytes,
            "ranges": len(m.change.extents),
            "aligned_ranges": m.change.aligned,
            "unaligned_ranges": m.change.unaligned,
        },
        "vmrecover_json": m.docs,
        "repo_bytes": m.repo_bytes,
        "borg_error": m.borg_error,
        "runs": {step: [p.runs[step].summary() for p in passes if step in p.runs] for step in STEPS},
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env, img, ch = doc["environment"], doc["image"], doc["change"]
    ratio_text = "n/a" if img["text_zstd_ratio"] is None else f"{img['text_zstd_ratio']:.2f}x"
    load = ", ".join(f"{v:.2f}" for v in env["load_average_at_start"])
    print(f"vmrecover backup benchmark  ({env['vmrecover']}; {env['borg'] or 'borg: not run'})")
    print(
        f"host: {env['cpus']} CPUs, {human(env['memory_bytes'])} RAM, kernel {env['kernel']}, "
        f"load average at start {load}"
    )
    print(
        f"image: {human(img['size'])} raw sparse, {img['regions']} x 1 MiB regions: {img['holes']} holes, "
        f"{img['text']} text (zstd -3 ratio {ratio_text}), {img['random']} random; "
        f"data {human(img['data_bytes_full'])} (after modification {human(img['data_bytes_modified'])})"
    )
    print(
        f"incremental change: {ch['changed_bytes']:,} B in {ch['ranges']} ranges "
        f"({ch['aligned_ranges']} whole-MiB aligned, {ch['unaligned_ranges']} unaligned)"
    )
    cold = "yes" if env["page_cache_dropped"] else "NO (not root: runs are not cold, numbers are optimistic)"
    print(f"page cache dropped before each timed run: {cold}")
    print(f"borg command: {env['borg_create']}")
    if doc["borg_error"]:
        print(f"borg failed: {doc['borg_error']}")
    passes = env["passes"]
    best = f"best of {passes} passes, peak RSS the largest seen" if passes > 1 else "one pass"
    print(f"times: wall clock incl. a final sync ({best}); MB = 10^6 bytes; peak RSS from wait4 per process")
    others = [
        (run["other_cpu_s"] / run["wall_s"], step)
        for step, runs in doc["runs"].items()
        for run in runs
        if run["wall_s"] > 0
    ]
    if others:
        worst, step = max(others)
        print(
            f"CPU used outside the measured command during timed runs (other processes, kernel writeback): "
            f"up to {worst:.2f} CPUs ({step})"
        )
        if worst > BUSY_WARNING:
            print("WARNING: the machine was busy with other work during the runs: the times are unreliable")
    print()
    print_table([Row(**r) for r in doc["rows"]])
    print()
    s = doc["summary"]
    status = "all targets met" if not s["failed"] else "FAILED: " + "; ".join(s["failed"])
    print(f"summary: {s['passed']}/{s['targets']} targets met -- {status}")


# --- main ------------------------------------------------------------------------------------------


def prepare_workdir(path: Path) -> None:
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise BenchError(f"{path} is not empty and was not made by this script: choose another --workdir")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()
    (path / "logs").mkdir()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("2G"), help="disk image size (default 2G)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/vmrecover-bench"), help="work files go here")
    p.add_argument("--keep", action="store_true", help="keep the work files (image, repositories, logs)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--runs", type=int, default=1, metavar="N", help="passes; report the best time of each")
    p.add_argument("--no-borg", action="store_true", help="skip the borg comparison")
    p.add_argument(
        "--borg-sparse", action="store_true", help="pass --sparse to borg create (skips holes like vmrecover)"
    )
    p.add_argument(
        "--vmrecover", type=Path, default=VMRECOVER, help="vmrecover command (default: the venv's)"
    )
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    if not os.access(args.vmrecover, os.X_OK):
        print(f"error: {args.vmrecover} is missing; run scripts/setup.sh", file=sys.stderr)
        return 1
    borg = None if args.no_borg else shutil.which("borg")
    if borg is None and not args.no_borg:
        log("borg is not installed (apt-get install borgbackup): borg columns will be n/a")
    try:
        prepare_workdir(workdir)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    free = shutil.disk_usage(workdir).free
    if free < 4 * args.size:
        log(f"warning: {human(free)} free under {workdir}; the benchmark needs up to ~4x the image size")
    env = bench_env(workdir)
    ctx = Context(workdir, env, can_drop_caches(), args.vmrecover, borg, args.keep)
    if not ctx.can_drop_caches:
        log("cannot write /proc/sys/vm/drop_caches (not root?): runs will not start cold")
    keep = args.keep
    try:
        passes = []
        for i in range(args.runs):
            if args.runs > 1:
                log(f"pass {i + 1} of {args.runs}")
            passes.append(measure(ctx, args, workdir / f"pass-{i + 1}"))
        doc = report(ctx, args, passes)
    except BenchError as exc:
        print(f"error: {exc}\n(work files and logs kept under {workdir})", file=sys.stderr)
        keep = True
        return 1
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    emit(doc, args.json, print_report)
    return 0


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


def emit(doc: dict[str, Any], as_json: bool, printer: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        printer(doc)


if __name__ == "__main__":
    sys.exit(main())
