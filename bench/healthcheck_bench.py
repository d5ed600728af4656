#!/usr/bin/env python3
"""Boot health check benchmark: how long ``vmrecover verify --boot`` takes against the guest's plain boot.

The test guest (tests.testkit.guest: it prints its boot marker on the serial console, then powers off)
is backed up into a fresh repository served by a ``vmrecover serve`` with its FUSE mount.  Then,
alternating, median of ``--runs``: its plain boot to power-off from a fresh local raw copy, cold
(the peer), and ``vmrecover verify --boot guest --expect MARKER`` (a throw-away session, qemu reading
through the service's datastore, the verdict from the serial console; the command's whole wall time:
session, qemu start, boot, judgement, clean-up, catalog).  Target (issue 15): at most 1.3x the plain
boot.  Both use the same accelerator (TCG here: KVM aborts on this machine).  A measurement, not a
test: exit 0 whether or not the target is met (1 only when the set-up or a command fails)::

    .venv/bin/python bench/healthcheck_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    BenchError,
    arg_parser,
    bench_main,
    boot_local_copy,
    environment,
    log,
    median,
    parse_args,
    print_host,
    print_results,
    summary,
    verdict,
)
from bench.service_bench import ServiceContext, init_repo, serve, service_config, vmr
from tests.testkit.guest import GUEST_MARKER, build_guest_disk
from vmrecover.qemu import accelerator

RATIO_MAX = 1.3


@dataclass
class Row:
    metric: str
    vmrecover: str
    peer: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "vmrecover verify --boot", "plain boot (local copy)", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.vmrecover, self.peer, self.target, self.result]


def measure(ctx: ServiceContext) -> dict[str, Any]:
    args, work = ctx.args, ctx.workdir
    tok = ctx.run(vmr(ctx, ["token", "new", "healthcheck-bench", "--role", "admin"]), "token").stdout
    doc = json.loads(tok)
    ctx.token, ctx.token_block = doc["token"], doc["config"]
    repo = work / "repo"
    init_repo(ctx, repo, "--chunk-size", "1M")
    disk = build_guest_disk(work / "guest.raw", cache_dir=work / "guest-cache")
    ctx.run(vmr(ctx, ["backup", "--repo", repo, "--vm", "guest", disk, "--format", "raw"]), "backup")
    mnt = work / "mnt"
    mnt.mkdir()
    config = service_config(ctx, repo) + f"\n[fuse]\nmountpoint = {json.dumps(str(mnt))}\n"
    plain: list[float] = []
    checks: list[float] = []
    judged: list[float] = []
    with serve(ctx, "serve", config, repo):
        for i in range(args.runs):
            plain.append(boot_local_copy(ctx, i))
            ctx.cold()
            started = time.monotonic()
            res = ctx.run(vmr(ctx, ["verify", "--boot", "guest", "--repo", repo, "--expect",
                                    rf"{GUEST_MARKER} n=1\b", "--timeout", str(args.boot_timeout)]),
                          f"verify-boot-{i}")  # fmt: skip
            checks.append(time.monotonic() - started)
            result = json.loads(res.stdout)
            if not result["ok"]:
                raise BenchError(f"the boot check failed: {result}")
            judged.append(result["seconds"])
            log(f"  run {i + 1}: plain boot {plain[-1]:.1f} s, verify --boot {checks[-1]:.1f} s "
                f"(verdict after {judged[-1]:.1f} s)")  # fmt: skip
    p, c, j = median(plain), median(checks), median(judged)
    assert p is not None and c is not None and j is not None
    ratio = c / p
    rows = [
        Row(f"seconds, median of {args.runs} (command start to exit)", f"{c:.1f}", f"{p:.1f}",
            f"<= {RATIO_MAX:g}x", verdict(ratio <= RATIO_MAX), {"vmrecover": c, "peer": p, "ratio": ratio}),
        Row("ratio", f"{ratio:.2f}x", "1.00x"),
        Row("power-on to verdict, inside the check (s)", f"{j:.1f}", values={"vmrecover": j}),
        Row("accelerator", accelerator(), accelerator()),
    ]  # fmt: skip
    return {
        "environment": environment(ctx, runs=args.runs),
        "plain_boot_s": plain,
        "verify_boot_s": checks,
        "verdict_after_s": judged,
        "passed": all(r.result != "FAIL" for r in rows),
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env = doc["environment"]
    print(f"vmrecover boot health check benchmark  ({env['vmrecover']})")
    print_host(env)
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]])


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, runs=3, size=False, serves="serve")
    p.set_defaults(cache_size="256M")
    return parse_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return bench_main(args, ServiceContext, measure, print_report, prefix="vmrecover-healthcheck-bench-",
                      memory_ok=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
