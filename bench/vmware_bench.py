#!/usr/bin/env python3
"""VMware backup benchmark: a VM's disk read from vCenter (VMware's simulator) against the same disk
backed up from a local file, in the same run.

The vCenter is the one the tests use (tests/vsphere: vcsim, built once and cached in build/vcsim/, behind
the HTTPS proxy that answers QueryChangedDiskAreas from the disk files).  Steps, every work file under
``--workdir``:

1. build the sparse test image (``--size``, 2 GiB: 1 MiB regions of holes, text and random bytes);
2. the peer: ``vmrecover backup IMAGE --format raw`` into a fresh repository (1 MiB chunks);
3. a VM ``bench`` in vcsim whose disk is a copy of the image, changed block tracking on; ``vmrecover
   hypervisor add`` (TLS verified against the simulator's CA) and ``vmrecover backup vmware://vc/bench``
   into a second fresh repository: a full backup (snapshot, the allocated areas, datastore HTTP reads);
4. 5% of the VM's disk file is overwritten (as backup_bench does) and the VM is backed up again: the bytes
   the backup's HTTP client received against the bytes of the 1 MiB chunks touched by the changed areas
   the host reported (QueryChangedDiskAreas, as the proxy answered it);
5. the incremental point is restored to a raw file and compared with the disk file (sha256).

The page cache is dropped before every timed backup when allowed (root).  Times are wall clock plus a
final sync; peak RSS is each command's own.  The simulator runs on this machine's CPUs during the VMware
backups (vcsim serving the datastore over HTTPS, the proxy relaying it), which the local backup has to
itself; the table shows how much CPU it took.  One cost a real host does not have is taken out of the
timed runs: the proxy's changed block tracking hashes the whole disk file to tell what changed, where
ESXi records writes as they happen; so that map is computed before each timed backup.

This is a measurement, not a test: it exits 0 whether or not the targets are met (1 only when the set-up
or a command fails)::

    .venv/bin/python bench/vmware_bench.py                 # 2 GiB disk
    .venv/bin/python bench/vmware_bench.py --size 256M     # quick run
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/vmware_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SEED,
    BenchError,
    Context,
    Run,
    arg_parser,
    bench_main,
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
    proc_cpu_s,
    ratio,
    sha256_file,
    summary,
    verdict,
)
from bench.common import environment as base_environment

MiB = 2**20
CHUNK = MiB  # the repositories' chunk size: the unit the incremental target counts in

# Acceptance targets (issue 11).
FULL_RATIO_MAX = 1.5  # full backup from vcsim / the same disk from a local file
INCR_BYTES_RATIO_MAX = 1.15  # HTTP bytes received / bytes of the 1 MiB chunks the changed areas touch
CHANGED_SHARE = 0.05  # of the disk overwritten before the incremental backup

HV = "vc"  # the hypervisor's name in the repository
VM = "bench"


@dataclass
class Row:
    metric: str
    vmware: str
    local: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "vmware (vcsim)", "local file", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.vmware, self.local, self.target, self.result]


def touched_chunks(areas: list[tuple[int, int]], size: int) -> int:
    """Bytes of the CHUNK-sized chunks of a *size*-byte disk that (offset, length) *areas* touch."""
    chunks: set[int] = set()
    for offset, length in areas:
        if length > 0:
            chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    return sum(min(CHUNK, size - c * CHUNK) for c in chunks)


def add_hypervisor(ctx: Context, vs: Any, repo: Path) -> None:
    """``vmrecover hypervisor add`` with the password on stdin (never a command line)."""
    argv = [
        str(ctx.args.vmrecover),
        "hypervisor",
        "add",
        HV,
        vs.vmware_url,
        "--password-stdin",
        "--ca-file",
        str(vs.ca_file),
        "--repo",
        str(repo),
        "--json",
    ]
    proc = subprocess.run(
        argv, input=vs.password + "\n", capture_output=True, text=True, env=ctx.env, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"vmrecover hypervisor add failed ({proc.returncode}): {proc.stderr[-2000:]}")


def self_cpu_s() -> float:
    """CPU seconds of this process, all threads (the proxy's), without its children."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_backup(
    ctx: Context, args: list[str | Path], name: str, vs: Any = None
) -> tuple[Run, dict[str, Any], float]:
    """A cold, measured ``vmrecover backup``; the CPU seconds the simulator (vcsim and the proxy in
    this process) used meanwhile are taken out of the phase's "other work"."""
    ctx.cold()
    sim = -(self_cpu_s() + proc_cpu_s(vs.vcsim.pid)) if vs is not None else 0.0
    run = ctx.measured([ctx.args.vmrecover, "backup", *args, "--json"], name)
    if vs is not None:
        sim += self_cpu_s() + proc_cpu_s(vs.vcsim.pid)
        ctx.phases[-1].other_cpu_s = max(0.0, ctx.phases[-1].other_cpu_s - sim)
    log(f"  {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU, {mb(run.max_rss):.0f} MB peak RSS")
    return run, run.json(), sim


def track_changes(vs: Any, disk_file: Path) -> None:
    """Have the simulator's changed block tracking catch up with the disk file now, untimed (ESXi
    tracks writes as they happen; the proxy hashes the file, and again if it was modified in the
    last RACY_NS before)."""
    from tests.vsphere import cbt

    time.sleep(cbt.RACY_NS / 1e9 + 0.05)
    vs.proxy.tracker.current(os.path.realpath(disk_file))


def measure(ctx: Context) -> dict[str, Any]:
    from tests.vsphere import build, running

    args, wd = ctx.args, ctx.workdir
    try:
        log("building vcsim (cached after the first time)")
        build.vcsim_binary()
    except build.BuildUnavailable as exc:
        raise BenchError(f"cannot build vcsim: {exc} (run scripts/setup.sh)") from None
    image = wd / "disk.raw"
    log(f"building a {human(args.size)} sparse image at {image}")
    img = make_image(image, args.size, SEED)
    image_data = data_bytes(image)
    local_repo, vmware_repo = wd / "repo-local", wd / "repo-vmware"
    for repo in (local_repo, vmware_repo):
        ctx.vmr(["init", "--chunk-size", "1M"], "init", repo=repo)

    log("local file: full backup")
    local, local_doc, _ = timed_backup(
        ctx, [image, "--vm", VM, "--format", "raw", "--repo", local_repo], "local-full"
    )

    with running(wd / "vsphere") as vs:
        log("vcsim: making the VM (its disk is a sparse copy of the image)")
        vm = vs.make_vm(VM, [image], cbt=True)
        disk_file = vs.disk_file(vm, 0)
        if not args.keep:
            image.unlink()  # only the VM's copy is needed from here on
        add_hypervisor(ctx, vs, vmware_repo)
        source = ["backup", f"vmware://{HV}/{VM}", "--repo", vmware_repo]
        track_changes(vs, disk_file)
        log("vcsim: full backup")
        full, full_doc, sim_full = timed_backup(ctx, source[1:], "vmware-full", vs)

        log(f"overwriting {CHANGED_SHARE:.0%} of the VM's disk file")
        change = modify_image(disk_file, args.size, CHANGED_SHARE, SEED + 100)
        disk_sha = sha256_file(disk_file)
        before = len(vs.answered("QueryChangedDiskAreas", vm=vm))
        track_changes(vs, disk_file)
        log("vcsim: incremental backup")
        incr, incr_doc, sim_incr = timed_backup(ctx, source[1:], "vmware-incr", vs)
        queries = vs.answered("QueryChangedDiskAreas", vm=vm)[before:]
        areas = [tuple(a) for q in queries if q.get("change_id") != "*" for a in q.get("areas", [])]
        proxy_sent = sum(v for k, v in vs.proxy.folder_bytes.items() if k.startswith("GET "))

    log("restoring the incremental point and comparing it with the disk file")
    restored = wd / "restored.raw"
    ctx.vmr(
        ["restore", f"{VM}@{incr_doc['point']}", "--to", restored, "--format", "raw"],
        "restore",
        repo=vmware_repo,
    )
    same = sha256_file(restored) == disk_sha
    restored.unlink()

    changed_areas = sum(n for _, n in areas)
    touched = touched_chunks(areas, args.size)
    figures = {
        "image_data_bytes": image_data,
        "changed_bytes_written": change.changed_bytes,
        "changed_ranges": len(change.extents),
        "changed_areas_reported": len(areas),
        "changed_area_bytes": changed_areas,
        "touched_chunk_bytes": touched,
        "written_chunk_bytes": touched_chunks(change.extents, args.size),
        "http_full": full_doc["http_bytes_received"],
        "http_incr": incr_doc["http_bytes_received"],
        "proxy_get_bytes": proxy_sent,
        "incremental": [d.get("mode") == "incremental" for d in incr_doc["disks"]],
        "restored_matches": same,
        "simulator_cpu_full_s": sim_full,
        "simulator_cpu_incr_s": sim_incr,
    }
    rows = make_rows(local, full, incr, figures, img.size)
    return {
        "environment": base_environment(ctx, vcsim=str(build.vcsim_binary())),
        "image": asdict(img),
        "figures": figures,
        "vmrecover_json": {"local_full": local_doc, "vmware_full": full_doc, "vmware_incr": incr_doc},
        "runs": {
            n: r.summary() for n, r in (("local_full", local), ("vmware_full", full), ("vmware_incr", incr))
        },
        "phases": [asdict(p) for p in ctx.phases],
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def make_rows(local: Run, full: Run, incr: Run, f: dict[str, Any], size: int) -> list[Row]:
    rows: list[Row] = []

    def judged(metric: str, value: float | None, spec: str, target: str, ok: bool | None) -> None:
        rows.append(
            Row(metric, fmt(value, spec), target=target, result=verdict(ok), values={"vmware": value})
        )

    rows.append(
        Row(
            "full backup time (s)",
            fmt(full.wall_s),
            fmt(local.wall_s),
            values={"vmware": full.wall_s, "local": local.wall_s},
        )
    )
    r = ratio(full.wall_s, local.wall_s)
    judged(
        "full backup time / local file's",
        r,
        ".2f",
        f"<= {FULL_RATIO_MAX:g}",
        None if r is None else r <= FULL_RATIO_MAX,
    )
    rows.append(
        Row(
            "full backup rate over disk size (MB/s)",
            fmt(ratio(mb(size), full.wall_s), ".0f"),
            fmt(ratio(mb(size), local.wall_s), ".0f"),
        )
    )
    rows.append(Row("full backup CPU time of vmrecover (s)", fmt(full.cpu_s), fmt(local.cpu_s)))
    rows.append(Row("full backup CPU time of vmrecover / local file's", fmt(ratio(full.cpu_s, local.cpu_s))))
    rows.append(Row("full backup CPU time of the simulator (s)", fmt(f["simulator_cpu_full_s"])))
    rows.append(
        Row(
            "full backup CPU time, both / wall (CPUs busy)",
            fmt(ratio(full.cpu_s + f["simulator_cpu_full_s"], full.wall_s)),
            fmt(ratio(local.cpu_s, local.wall_s)),
        )
    )
    rows.append(
        Row("full backup: bytes over HTTP", f"{f['http_full']:,}", "-", values={"vmware": f["http_full"]})
    )
    rows.append(Row("full backup peak RSS (MB)", fmt(mb(full.max_rss), ".0f"), fmt(mb(local.max_rss), ".0f")))
    rows.append(
        Row(
            "incremental: bytes written to the disk",
            f"{f['changed_bytes_written']:,}",
            values={"vmware": f["changed_bytes_written"]},
        )
    )
    rows.append(
        Row(
            "incremental: changed areas the host reported",
            f"{f['changed_areas_reported']} ({f['changed_area_bytes']:,} B)",
        )
    )
    rows.append(
        Row(
            "incremental: bytes of the 1 MiB chunks they touch",
            f"{f['touched_chunk_bytes']:,}",
            values={"vmware": f["touched_chunk_bytes"]},
        )
    )
    rows.append(Row("incremental: bytes over HTTP", f"{f['http_incr']:,}", values={"vmware": f["http_incr"]}))
    r = ratio(f["http_incr"], f["touched_chunk_bytes"])
    judged(
        "incremental HTTP bytes / touched chunk bytes",
        r,
        ".3f",
        f"<= {INCR_BYTES_RATIO_MAX:g}",
        None if r is None else r <= INCR_BYTES_RATIO_MAX,
    )
    rows.append(Row("incremental backup time (s)", fmt(incr.wall_s), values={"vmware": incr.wall_s}))
    rows.append(Row("incremental backup CPU time of the simulator (s)", fmt(f["simulator_cpu_incr_s"])))
    rows.append(Row("incremental backup peak RSS (MB)", fmt(mb(incr.max_rss), ".0f")))
    incremental = all(f["incremental"]) and bool(f["incremental"])
    rows.append(
        Row(
            "second backup read changed areas only",
            "yes" if incremental else "NO",
            target="yes",
            result=verdict(incremental),
        )
    )
    rows.append(
        Row(
            "restored point equals the disk (sha256)",
            "yes" if f["restored_matches"] else "NO",
            target="yes",
            result=verdict(f["restored_matches"]),
        )
    )
    return rows


def print_report(doc: dict[str, Any]) -> None:
    env, img, f = doc["environment"], doc["image"], doc["figures"]
    print(f"vmrecover VMware benchmark  ({env['vmrecover']}; vcsim {env['vcsim']})")
    print_host(env)
    print(
        f"disk: {human(img['size'])} raw sparse, {img['regions']} x 1 MiB regions: {img['holes']} holes, "
        f"{img['text']} text, {img['random']} random; 1 MiB chunks"
    )
    print(
        f"change before the incremental: {f['changed_bytes_written']:,} B in {f['changed_ranges']} ranges, "
        f"touching {f['written_chunk_bytes']:,} B of 1 MiB chunks"
    )
    print(f"page cache dropped before each timed backup: {cold_text(env)}")
    print("times: wall clock incl. a final sync; MB = 10^6 bytes; peak RSS from wait4 per process")
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]], min_phase_s=0)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    return parse_args(arg_parser(__doc__), argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return bench_main(
        args,
        Context,
        measure,
        print_report,
        prefix="vmrecover-vmware-bench-",
        tools={"go": "golang-go"},
        free_needed=4 * args.size,
    )


if __name__ == "__main__":
    sys.exit(main())
