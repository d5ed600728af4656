"""Single-file restore benchmark: copy a 100 MB file out of a restore point, list a 10 000-entry folder.

Both once the point's libguestfs appliance is up (the first command starts it and is timed apart),
through the real command line (``vmrecover files get`` / ``files ls --json``), median of 3 runs.
Targets (issue 5): copy-out at least 100 MB/s, the listing in under 3 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VMRECOVER = Path(sys.executable).parent / "vmrecover"


def run(env: dict[str, str], *args: str | Path) -> tuple[float, Any]:
    started = time.monotonic()
    argv = [str(VMRECOVER), *map(str, args), "--json"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    took = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"vmrecover {' '.join(map(str, args))} failed: {proc.stderr}{proc.stdout}")
    return took, json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=100, help="size of the file copied out (default 100)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from vmrecover.testkit import fsimages

    work = Path(tempfile.mkdtemp(prefix="vmrecover-files-bench-", dir="/var/tmp"))
    env = dict(os.environ, VMRECOVER_REPO=str(work / "repo"))
    try:
        print("building the guest images (libguestfs)...", file=sys.stderr)
        big = fsimages.big_file_disk(work / "big.raw", size_mib=args.size_mib)
        lin = fsimages.linux_lvm_xfs(work / "lin.raw")
        run(env, "init", "--chunk-size", "1M")
        run(env, "backup", "--vm", "big", work / "big.raw", "--format", "raw")
        run(env, "backup", "--vm", "lin", work / "lin.raw", "--format", "raw")
        ((gp, (size, sha)),) = big.large_files.items()
        many, n = next(iter(lin.bulk.items()))

        first_big, _ = run(env, "files", "inspect", "big")
        first_lin, _ = run(env, "files", "inspect", "lin")
        copies, lists = [], []
        for i in range(args.runs):
            out = work / f"out{i}"
            out.mkdir()
            took, _ = run(env, "files", "get", "big", gp, "--to", out)
            copies.append(took)
            h = hashlib.sha256((out / os.path.basename(gp)).read_bytes()).hexdigest()
            if h != sha:
                raise SystemExit(f"copied {gp} has sha256 {h}, expected {sha}")
            shutil.rmtree(out)
            took, doc = run(env, "files", "ls", "lin", many)
            if doc["count"] != n:
                raise SystemExit(f"listing {many} gave {doc['count']} entries, expected {n}")
            lists.append(took)
        copy_s, list_s = statistics.median(copies), statistics.median(lists)
        rate = size / copy_s / 1e6
        rows = [
            (f"copy out a {args.size_mib} MiB file, appliance up (MB/s, median of {args.runs})",
             f"{rate:.0f}", ">= 100", rate >= 100),
            (f"list a {n}-entry folder, appliance up (s, median of {args.runs})", f"{list_s:.2f}", "< 3",
             list_s < 3),
            ("first command on a point: appliance start + inspection (s)",
             f"{first_big:.1f} / {first_lin:.1f}", "-", None),
        ]  # fmt: skip
        doc = {
            "copy_mb_s": rate, "copy_s": copies, "list_s": lists, "first_command_s": [first_big, first_lin],
            "passed": all(r[3] is not False for r in rows),
        }  # fmt: skip
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            width = max(len(r[0]) for r in rows)
            print(f"{'metric':<{width}}  {'vmrecover':>12}  {'target':>7}  result")
            for name, value, target, ok in rows:
                verdict = "info" if ok is None else ("PASS" if ok else "FAIL")
                print(f"{name:<{width}}  {value:>12}  {target:>7}  {verdict}")
    finally:
        subprocess.run(["pkill", "-f", f"vmrecover files serve --repo {work / 'repo'}"], check=False)
        sock = work / "repo" / "run" / "files" / "files.sock"
        deadline = time.monotonic() + 60
        while sock.exists() and time.monotonic() < deadline:  # until its datastore is unmounted
            time.sleep(0.2)
        if not os.path.ismount(work / "repo" / "run" / "files" / "mnt"):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
