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
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/backup_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BORG_CREATE,
    SEED,
    BenchError,
    Change,
    Context,
    ImageInfo,
    Run,
    arg_parser,
    bench_main,
    borg_create_argv,
    cold_text,
    data_bytes,
    fmt,
    human,
    log,
    make_image,
    mb,
    modify_image,
    parse_args,
    print_host,
    print_results,
    ratio,
    sha256_file,
    summary,
    tool_version,
    verdict,
    yes_no,
)
from bench.common import environment as base_environment

MiB = 2**20

# Acceptance targets.
FULL_SPEEDUP_MIN = 3.0  # borg full backup time / vmrecover full backup time
INCR_FRACTION_MAX = 0.25  # incremental time / full time
GROWTH_RATIO_MAX = 1.2  # repository growth / changed bytes
RESTORE_MBPS_MIN = 400.0  # restore rate over the data (non-hole) bytes
RSS_MB_MAX = 300.0  # peak RSS of one vmrecover process
FORMAT_TIME_MAX = 1.1  # full backup into a format 2 repository / the same into a format 1 one

CHANGED_SHARE = 0.05  # of the image modified for the incremental backup


@dataclass
class BackupContext(Context):
    borg: str | None = None


def vm(ctx: BackupContext, args: list[str | Path], name: str) -> Run:
    """A timed ``vmrecover ARGS --json`` (wall time, CPU time, peak RSS)."""
    return ctx.measured([ctx.args.vmrecover, *args, "--json"], name)


def du_bytes(path: Path) -> int:
    """Allocated bytes (st_blocks * 512) of every file under *path*, like ``du -s --block-size=1``."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total + os.lstat(path).st_blocks * 512


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    vmrecover: str
    borg: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "vmrecover", "borg", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.vmrecover, self.borg, self.target, self.result]


# --- the benchmark ---------------------------------------------------------------------------------

STEPS = ("vm_full", "vm_full_v1", "borg_full", "vm_incr", "borg_incr", "vm_restore", "borg_extract")


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


def borg_step(m: Measurements, step: str, fn: Callable[[], None]) -> None:
    """Run a borg step; a failure is recorded (borg columns become n/a) but does not stop the benchmark."""
    if m.borg_error is not None:
        return
    try:
        fn()
    except (BenchError, OSError) as exc:
        m.borg_error = f"{step}: {exc}"
        log(f"borg {step} failed, borg columns will be n/a: {exc}")


def timed(ctx: BackupContext, m: Measurements, step: str, label: str, fn: Callable[[], Run]) -> Run:
    ctx.cold()
    log(label)
    run = m.runs[step] = fn()
    log(f"  {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU, {mb(run.max_rss):.0f} MB peak RSS")
    return run


def measure(ctx: BackupContext, args: argparse.Namespace, wd: Path) -> Measurements:
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
    ctx.vmr(["init", "--compression-level", "3"], "init", repo=vm_repo)  # borg's zstd level: matched
    full: list[str | Path] = ["backup", image, "--vm", "bench", "--repo", vm_repo]
    run = timed(ctx, m, "vm_full", "vmrecover full backup", lambda: vm(ctx, full, "vmrecover-full"))
    m.docs["vm_full"] = run.json()
    m.repo_bytes["vm_full"] = du_bytes(vm_repo)
    # the same into a format 1 repository: what a full backup cost before chunks were stored in pieces
    v1_repo = wd / "vmrecover-repo-v1"
    ctx.vmr(["init", "--compression-level", "3", "--format", "1"], "init-v1", repo=v1_repo)
    full_v1: list[str | Path] = ["backup", image, "--vm", "bench", "--repo", v1_repo]
    label = "vmrecover full backup, format 1 repository"
    timed(ctx, m, "vm_full_v1", label, lambda: vm(ctx, full_v1, "vmrecover-full-v1"))
    m.repo_bytes["vm_full_v1"] = du_bytes(v1_repo)
    shutil.rmtree(v1_repo)
    if borg:

        def borg_full() -> None:
            ctx.run([borg, "init", "-e", "none", str(borg_repo)], "borg-init")
            argv = borg_create_argv(borg, borg_repo, "full", image, sparse=args.borg_sparse)
            timed(ctx, m, "borg_full", "borg full backup", lambda: ctx.measured(argv, "borg-full"))
            m.repo_bytes["borg_full"] = du_bytes(borg_repo)

        borg_step(m, "full backup", borg_full)

    # incremental backups
    log(f"modifying {CHANGED_SHARE:.0%} of the image")
    m.change = modify_image(image, args.size, CHANGED_SHARE, SEED + 100)
    changed_file.write_text(json.dumps([list(e) for e in m.change.extents]))
    m.image_sha256 = sha256_file(image)
    m.data_bytes_modified = data_bytes(image)
    incr = [*full, "--changed-extents", changed_file]
    run = timed(ctx, m, "vm_incr", "vmrecover incremental backup", lambda: vm(ctx, incr, "vmrecover-incr"))
    m.docs["vm_incr"] = run.json()
    m.repo_bytes["vm_incr"] = du_bytes(vm_repo)
    if borg:

        def borg_incr() -> None:
            argv = borg_create_argv(borg, borg_repo, "incr", image, sparse=args.borg_sparse)
            label = "borg second backup (no changed-extents input: borg re-reads the image)"
            timed(ctx, m, "borg_incr", label, lambda: ctx.measured(argv, "borg-incr"))
            m.repo_bytes["borg_incr"] = du_bytes(borg_repo)

        borg_step(m, "incremental backup", borg_incr)

    # restores
    restore: list[str | Path] = ["restore", "bench", "--to", restored, "--repo", vm_repo]
    run = timed(ctx, m, "vm_restore", "vmrecover restore", lambda: vm(ctx, restore, "vmrecover-restore"))
    m.docs["vm_restore"] = run.json()
    m.sha_ok["vm"] = sha256_file(restored) == m.image_sha256
    if not ctx.args.keep:
        restored.unlink()
    if borg:

        def borg_extract() -> None:
            borg_out.mkdir()
            argv = [borg, "extract", "--sparse", f"{borg_repo}::incr"]
            label = "borg extract --sparse"
            timed(ctx, m, "borg_extract", label, lambda: ctx.measured(argv, "borg-extract", cwd=borg_out))
            m.sha_ok["borg"] = sha256_file(borg_out / str(image).lstrip("/")) == m.image_sha256

        borg_step(m, "extract", borg_extract)
    if not ctx.args.keep:
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
    v1 = wall(r("vm_full_v1"))
    q = ratio(vf, v1)
    rows.append(
        Row(
            f"full backup time, format 2 / format 1 repository ({fmt(vf)} s / {fmt(v1)} s)",
            fmt(q, ".2f", "x"),
            target=f"<= {FORMAT_TIME_MAX:g}x",
            result=verdict(None if q is None else q <= FORMAT_TIME_MAX),
            values={"vmrecover": vf, "format_1": v1, "ratio": q},
        )
    )
    v2b, v1b = m.repo_bytes.get("vm_full"), m.repo_bytes.get("vm_full_v1")
    rows.append(
        Row(
            "repository size after full backup, format 2 / format 1",
            f"{human(v2b)} / {human(v1b)}" if v2b and v1b else "n/a",
            values={"vmrecover": v2b, "format_1": v1b},
        )
    )
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


def report(ctx: BackupContext, passes: list[Measurements]) -> dict[str, Any]:
    args = ctx.args
    m = aggregate(passes)
    assert m.image is not None and m.change is not None
    rows = make_rows(m, args.size)
    return {
        "environment": base_environment(
            ctx,
            passes=args.runs,
            borg=tool_version([ctx.borg, "--version"]) if ctx.borg else None,
            borg_create=BORG_CREATE + (" --sparse" if args.borg_sparse else ""),
        ),
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
        "phases": [asdict(p) for p in ctx.phases],
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env, img, ch = doc["environment"], doc["image"], doc["change"]
    ratio_text = "n/a" if img["text_zstd_ratio"] is None else f"{img['text_zstd_ratio']:.2f}x"
    print(f"vmrecover backup benchmark  ({env['vmrecover']}; {env['borg'] or 'borg: not run'})")
    print_host(env, workdir=False)
    print(
        f"image: {human(img['size'])} raw sparse, {img['regions']} x 1 MiB regions: {img['holes']} holes, "
        f"{img['text']} text (zstd -3 ratio {ratio_text}), {img['random']} random; "
        f"data {human(img['data_bytes_full'])} (after modification {human(img['data_bytes_modified'])})"
    )
    print(
        f"incremental change: {ch['changed_bytes']:,} B in {ch['ranges']} ranges "
        f"({ch['aligned_ranges']} whole-MiB aligned, {ch['unaligned_ranges']} unaligned)"
    )
    print(f"page cache dropped before each timed run: {cold_text(env)}")
    print(f"borg command: {env['borg_create']}")
    if doc["borg_error"]:
        print(f"borg failed: {doc['borg_error']}")
    passes = env["passes"]
    best = f"best of {passes} passes, peak RSS the largest seen" if passes > 1 else "one pass"
    print(f"times: wall clock incl. a final sync ({best}); MB = 10^6 bytes; peak RSS from wait4 per process")
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]], min_phase_s=0)


# --- main ------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.set_defaults(workdir=Path("/tmp/vmrecover-bench"))
    p.add_argument("--runs", type=int, default=1, metavar="N", help="passes; report the best time of each")
    p.add_argument("--no-borg", action="store_true", help="skip the borg comparison")
    p.add_argument(
        "--borg-sparse", action="store_true", help="pass --sparse to borg create (skips holes like vmrecover)"
    )
    return parse_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    borg = None if args.no_borg else shutil.which("borg")
    if borg is None and not args.no_borg:
        log("borg is not installed (scripts/setup.sh borgbackup): borg columns will be n/a")

    def body(ctx: BackupContext) -> dict[str, Any]:
        passes = []
        for i in range(args.runs):
            if args.runs > 1:
                log(f"pass {i + 1} of {args.runs}")
            passes.append(measure(ctx, args, ctx.workdir / f"pass-{i + 1}"))
        return report(ctx, passes)

    return bench_main(
        args, lambda a, wd: BackupContext(a, wd, borg=borg), body, print_report,
        prefix="vmrecover-bench-", memory_ok=True, free_needed=4 * args.size,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
