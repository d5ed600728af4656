#!/usr/bin/env python3
"""Single-file restore benchmark: copy a 100 MB file out of a restore point, list a 10 000-entry folder.

Both once the point's libguestfs appliance is up (the first command starts it and is timed apart),
through the real command line (``vmrecover files get`` / ``files ls --json``), median of 3 runs.
Targets (issue 5): copy-out at least 100 MB/s, the listing in under 3 s.  The guest images are built
with libguestfs by tests.testkit.fsimages.  Like the other benchmarks it is a measurement, not a test:
the exit code is 0 whether or not the targets are met (1 only when the set-up or a command fails).
Run it from the repository root::

    .venv/bin/python bench/files_bench.py
    .venv/bin/python bench/files_bench.py --size-mib 20 --runs 1     # quick run
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/files_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchError,
    Context,
    arg_parser,
    bench_main,
    environment,
    log,
    median,
    parse_args,
    print_host,
    print_results,
    summary,
    verdict,
)
from tests.testkit import fsimages

COPY_MBPS_MIN = 100.0
LIST_S_MAX = 3.0


@dataclass
class Row:
    metric: str
    vmrecover: str
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "vmrecover", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.vmrecover, self.target, self.result]


def timed(ctx: Context, args: list[str | Path], name: str) -> tuple[float, Any]:
    """Seconds ``vmrecover ARGS --json`` took, start to exit, and what it printed."""
    started = time.monotonic()
    doc = ctx.vmr(args, name)
    return time.monotonic() - started, doc


def measure(ctx: Context) -> dict[str, Any]:
    args, work = ctx.args, ctx.workdir
    log("building the guest images (libguestfs)...")
    big = fsimages.big_file_disk(work / "big.raw", size_mib=args.size_mib)
    lin = fsimages.linux_lvm_xfs(work / "lin.raw")
    ctx.vmr(["init", "--chunk-size", "1M"], "init")
    ctx.vmr(["backup", "--vm", "big", work / "big.raw", "--format", "raw"], "backup-big")
    ctx.vmr(["backup", "--vm", "lin", work / "lin.raw", "--format", "raw"], "backup-lin")
    ((gp, (size, sha)),) = big.large_files.items()
    many, n = next(iter(lin.bulk.items()))
    try:
        log("first command on each point (starts its appliance)")
        first_big, _ = timed(ctx, ["files", "inspect", "big"], "files-inspect-big")
        first_lin, _ = timed(ctx, ["files", "inspect", "lin"], "files-inspect-lin")
        copies, lists = [], []
        for i in range(args.runs):
            out = work / f"out{i}"
            out.mkdir()
            took, _ = timed(ctx, ["files", "get", "big", gp, "--to", out], "files-get")
            copies.append(took)
            h = hashlib.sha256((out / os.path.basename(gp)).read_bytes()).hexdigest()
            if h != sha:
                raise BenchError(f"copied {gp} has sha256 {h}, expected {sha}")
            shutil.rmtree(out)
            took, doc = timed(ctx, ["files", "ls", "lin", many], "files-ls")
            if doc["count"] != n:
                raise BenchError(f"listing {many} gave {doc['count']} entries, expected {n}")
            lists.append(took)
            log(f"  run {i + 1}: get {copies[-1]:.2f} s, ls {took:.2f} s")
    finally:  # the service's appliances and its datastore mount go with it
        ctx.vmr(["files", "stop"], "files-stop")
    copy_s, list_s = median(copies), median(lists)
    assert copy_s is not None and list_s is not None
    rate = size / copy_s / 1e6
    rows = [
        Row(
            f"copy out a {args.size_mib} MiB file, appliance up (MB/s, median of {args.runs})", f"{rate:.0f}",
            f">= {COPY_MBPS_MIN:g}", verdict(rate >= COPY_MBPS_MIN), {"vmrecover": rate},
        ),
        Row(
            f"list a {n}-entry folder, appliance up (s, median of {args.runs})", f"{list_s:.2f}",
            f"< {LIST_S_MAX:g}", verdict(list_s < LIST_S_MAX), {"vmrecover": list_s},
        ),
        Row(
            "first command on a point: appliance start + inspection (s)",
            f"{first_big:.1f} / {first_lin:.1f}", values={"vmrecover": [first_big, first_lin]},
        ),
    ]  # fmt: skip
    return {
        "environment": environment(ctx, runs=args.runs, size_mib=args.size_mib),
        "copy_mb_s": rate,
        "copy_s": copies,
        "list_s": lists,
        "first_command_s": [first_big, first_lin],
        "passed": all(r.result != "FAIL" for r in rows),
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env = doc["environment"]
    print(f"vmrecover single-file restore benchmark  ({env['vmrecover']}); MB = 10^6 bytes")
    print_host(env)
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]])


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, runs=3, size=False)
    p.add_argument("--size-mib", type=int, default=100, help="size of the file copied out (default 100)")
    args = parse_args(p, argv)
    if args.size_mib < 1:
        p.error("--size-mib must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return bench_main(
        args, Context, measure, print_report, prefix="vmrecover-files-bench-", memory_ok=True,
        free_needed=(args.size_mib + 2048) * 2**20,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
