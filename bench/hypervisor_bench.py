#!/usr/bin/env python3
"""Hypervisor backup benchmark: a VM's disk read from a simulated vCenter (``--platform vmware``) or
XenServer pool (``--platform xen``) against the same disk backed up from a local file, in the same run.

The simulators are the tests': ``tests/vsphere`` (VMware's vcsim, built once into build/vcsim/, behind
the HTTPS proxy that answers QueryChangedDiskAreas from the disk files) and ``tests/xapi`` (a XAPI
simulator speaking XenAPI's XML-RPC, with real TLS NBD exports by qemu-nbd).  Steps, every work file
under ``--workdir``:

1. build the sparse test image (``--size``, 2 GiB: 1 MiB regions of holes, text and random bytes);
2. the peer: ``vmrecover backup IMAGE --format raw`` into a fresh repository (1 MiB chunks);
3. a VM ``bench`` whose disk is a copy of the image, changed block tracking on; ``vmrecover hypervisor
   add`` (TLS verified against the simulator's CA, the password on stdin) and ``vmrecover backup
   SCHEME://hv/bench`` into a second fresh repository: a full backup;
4. 5% of the VM's disk file is overwritten (as backup_bench does) and the VM is backed up again: the bytes
   the backup's transport received (HTTP for VMware, NBD for XenServer) against the bytes of the 1 MiB
   chunks touched by the changed areas the host reported (QueryChangedDiskAreas / list_changed_blocks);
5. the incremental point is restored to a raw file and compared with the disk file (sha256).

The page cache is dropped before every timed backup when allowed (root).  Times are wall clock plus a
final sync; peak RSS is each command's own.  The simulator runs on this machine's CPUs during the
hypervisor backups, which the local backup has to itself; the table shows how much CPU it took.  Costs
a real host does not have: vcsim's proxy hashes the whole disk file to tell what changed (ESXi records
writes as they happen), so that map is computed before each timed backup; the XAPI simulator copies and
hashes a VDI when it snapshots it (XenServer makes a copy-on-write snapshot), inside the timed backup,
and its CPU is counted as the simulator's.

This is a measurement, not a test: it exits 0 whether or not the targets are met (1 only when the set-up
or a command fails)::

    .venv/bin/python bench/hypervisor_bench.py --platform vmware     # make bench-vmware
    .venv/bin/python bench/hypervisor_bench.py --platform xen        # make bench-xen
    .venv/bin/python bench/hypervisor_bench.py --platform xen --size 256M
"""

from __future__ import annotations

import argparse
import base64
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/hypervisor_bench.py): import from the checkout
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
FULL_RATIO_MAX = 1.5  # full backup from the simulator / the same disk from a local file (issues 11, 12)
INCR_BYTES_RATIO_MAX = 1.15  # bytes received / bytes of the 1 MiB chunks the changed areas touch
CHANGED_SHARE = 0.05  # of the disk overwritten before the incremental backup

HV = "hv"  # the hypervisor's name in the repository
VM = "bench"


@dataclass
class Row:
    metric: str
    hypervisor: str
    local: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "hypervisor", "local file", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.hypervisor, self.local, self.target, self.result]


def touched_chunks(areas: list[tuple[int, int]], size: int) -> int:
    """Bytes of the CHUNK-sized chunks of a *size*-byte disk that (offset, length) *areas* touch."""
    chunks: set[int] = set()
    for offset, length in areas:
        if length > 0:
            chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    return sum(min(CHUNK, size - c * CHUNK) for c in chunks)


def self_cpu_s() -> float:
    """CPU seconds of this process, all threads (the simulators' servers run here), without children."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- the simulated hypervisors ----------------------------------------------------------------------
class VSphereSim:
    """vcsim behind the tests' proxy (tests/vsphere)."""

    scheme, label, transport = "vmware", "vcsim", "HTTP"

    def __init__(self, workdir: Path) -> None:
        from tests.vsphere import build, running

        try:
            log("building vcsim (cached after the first time)")
            self.version = str(build.vcsim_binary())
        except build.BuildUnavailable as exc:
            raise BenchError(f"cannot build vcsim: {exc} (run scripts/setup.sh)") from None
        self._ctx = running(workdir)
        self.vs = self._ctx.__enter__()
        self.url, self.ca_file, self.password = self.vs.vmware_url, self.vs.ca_file, self.vs.password

    def make_vm(self, image: Path) -> Path:
        self.vm = self.vs.make_vm(VM, [image], cbt=True)
        return Path(self.vs.disk_file(self.vm, 0))

    def before_timed(self, disk_file: Path) -> None:
        """Have the proxy's change tracking catch up with the disk file now, untimed (ESXi tracks writes
        as they happen; the proxy hashes the file, and again if it was modified in the last RACY_NS)."""
        from tests.vsphere import cbt

        time.sleep(cbt.RACY_NS / 1e9 + 0.05)
        self.vs.proxy.tracker.current(os.path.realpath(disk_file))

    def cpu(self) -> float:
        return self_cpu_s() + proc_cpu_s(self.vs.vcsim.pid)

    def mark(self) -> int:
        return len(self.vs.answered("QueryChangedDiskAreas", vm=self.vm))

    def changed_areas(self, since: int, size: int) -> list[tuple[int, int]]:
        queries = self.vs.answered("QueryChangedDiskAreas", vm=self.vm)[since:]
        return [
            (int(a[0]), int(a[1])) for q in queries if q.get("change_id") != "*" for a in q.get("areas", [])
        ]

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


class XenSim:
    """The XAPI simulator (tests/xapi), its NBD exports served by qemu-nbd."""

    scheme, label, transport = "xen", "XAPI simulator", "NBD"

    def __init__(self, workdir: Path) -> None:
        from tests.xapi import running

        if shutil.which("qemu-nbd") is None:
            raise BenchError("qemu-nbd is missing (run scripts/setup.sh)")
        self.version = "tests/xapi"
        self._ctx = running(workdir)
        self.sim = self._ctx.__enter__()
        self.url = f"xen://root@127.0.0.1:{self.sim.port}"
        self.ca_file, self.password = self.sim.ca_file, self.sim.password
        self._seen: dict[int, float] = {}  # qemu-nbd pid -> CPU seconds last seen

    def make_vm(self, image: Path) -> Path:
        self.vm = self.sim.make_vm(VM, [image], cbt=True)
        return Path(self.sim.vdi_file(self.sim.vm_disks(self.vm)[0]))

    def before_timed(self, disk_file: Path) -> None:
        pass

    def cpu(self) -> float:
        """This process's CPU and every qemu-nbd export's seen so far (one stopped since is counted as
        last seen; one that starts and stops between two looks is missed)."""
        for e in list(self.sim.nbd.exports.values()):
            pid = e.proc.pid
            self._seen[pid] = max(self._seen.get(pid, 0.0), proc_cpu_s(pid))
        return self_cpu_s() + sum(self._seen.values())

    def mark(self) -> int:
        return len(self.sim.calls("VDI.list_changed_blocks", ok=True))

    def changed_areas(self, since: int, size: int) -> list[tuple[int, int]]:
        from vmrecover.ingest.extents import bitmap_extents

        out: list[tuple[int, int]] = []
        for c in self.sim.calls("VDI.list_changed_blocks", ok=True)[since:]:
            out += bitmap_extents(base64.b64decode(c["result"]), 64 * 1024, size)
        return out

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


PLATFORMS = {"vmware": VSphereSim, "xen": XenSim}


def add_hypervisor(ctx: Context, sim: Any, repo: Path) -> None:
    """``vmrecover hypervisor add`` with the password on stdin (never a command line)."""
    argv = [str(ctx.args.vmrecover), "hypervisor", "add", HV, sim.url, "--password-stdin", "--ca-file",
            str(sim.ca_file), "--repo", str(repo), "--json"]  # fmt: skip
    proc = subprocess.run(argv, input=sim.password + "\n", capture_output=True, text=True, env=ctx.env,
                          timeout=120, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"vmrecover hypervisor add failed ({proc.returncode}): {proc.stderr[-2000:]}")


def timed_backup(
    ctx: Context, args: list[str | Path], name: str, sim: Any = None
) -> tuple[Run, dict[str, Any], float]:
    """A cold, measured ``vmrecover backup``; the CPU seconds the simulator used meanwhile are taken out
    of the phase's "other work"."""
    ctx.cold()
    used = -sim.cpu() if sim is not None else 0.0
    run = ctx.measured([ctx.args.vmrecover, "backup", *args, "--json"], name)
    if sim is not None:
        used += sim.cpu()
        ctx.phases[-1].other_cpu_s = max(0.0, ctx.phases[-1].other_cpu_s - used)
    log(f"  {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU, {mb(run.max_rss):.0f} MB peak RSS")
    return run, run.json(), used


def measure(ctx: Context) -> dict[str, Any]:
    args, wd = ctx.args, ctx.workdir
    image = wd / "disk.raw"
    log(f"building a {human(args.size)} sparse image at {image}")
    img = make_image(image, args.size, SEED)
    image_data = data_bytes(image)
    local_repo, hv_repo = wd / "repo-local", wd / "repo-hypervisor"
    for repo in (local_repo, hv_repo):
        ctx.vmr(["init", "--chunk-size", "1M"], "init", repo=repo)

    log("local file: full backup")
    local, local_doc, _ = timed_backup(
        ctx, [image, "--vm", VM, "--format", "raw", "--repo", local_repo], "local-full"
    )

    sim = PLATFORMS[args.platform](wd / "simulator")
    try:
        log(f"{sim.label}: making the VM (its disk is a sparse copy of the image)")
        disk_file = sim.make_vm(image)
        if not args.keep:
            image.unlink()  # only the VM's copy is needed from here on
        add_hypervisor(ctx, sim, hv_repo)
        source = [f"{sim.scheme}://{HV}/{VM}", "--repo", hv_repo]
        sim.before_timed(disk_file)
        log(f"{sim.label}: full backup")
        full, full_doc, sim_full = timed_backup(ctx, source, f"{sim.scheme}-full", sim)

        log(f"overwriting {CHANGED_SHARE:.0%} of the VM's disk file")
        change = modify_image(disk_file, args.size, CHANGED_SHARE, SEED + 100)
        disk_sha = sha256_file(disk_file)
        before = sim.mark()
        sim.before_timed(disk_file)
        log(f"{sim.label}: incremental backup")
        incr, incr_doc, sim_incr = timed_backup(ctx, source, f"{sim.scheme}-incr", sim)
        areas = sim.changed_areas(before, args.size)
    finally:
        sim.close()

    log("restoring the incremental point and comparing it with the disk file")
    restored = wd / "restored.raw"
    ctx.vmr(["restore", f"{VM}@{incr_doc['point']}", "--to", restored, "--format", "raw"], "restore",
            repo=hv_repo)  # fmt: skip
    same = sha256_file(restored) == disk_sha
    restored.unlink()

    figures = {
        "platform": args.platform,
        "simulator": sim.label,
        "transport": sim.transport,
        "image_data_bytes": image_data,
        "changed_bytes_written": change.changed_bytes,
        "changed_ranges": len(change.extents),
        "changed_areas_reported": len(areas),
        "changed_area_bytes": sum(n for _, n in areas),
        "touched_chunk_bytes": touched_chunks(areas, args.size),
        "written_chunk_bytes": touched_chunks(change.extents, args.size),
        "received_full": full_doc["bytes_received"],
        "received_incr": incr_doc["bytes_received"],
        "incremental": [d.get("mode") == "incremental" for d in incr_doc["disks"]],
        "restored_matches": same,
        "simulator_cpu_full_s": sim_full,
        "simulator_cpu_incr_s": sim_incr,
    }
    rows = make_rows(local, full, incr, figures, img.size)
    return {
        "environment": base_environment(ctx, simulator=f"{sim.label} ({sim.version})"),
        "image": asdict(img),
        "figures": figures,
        "vmrecover_json": {"local_full": local_doc, "full": full_doc, "incr": incr_doc},
        "runs": {n: r.summary() for n, r in (("local_full", local), ("full", full), ("incr", incr))},
        "phases": [asdict(p) for p in ctx.phases],
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def make_rows(local: Run, full: Run, incr: Run, f: dict[str, Any], size: int) -> list[Row]:
    rows: list[Row] = []

    def judged(metric: str, value: float | None, spec: str, target: str, ok: bool | None) -> None:
        rows.append(
            Row(metric, fmt(value, spec), target=target, result=verdict(ok), values={"hypervisor": value})
        )

    rows.append(
        Row(
            "full backup time (s)",
            fmt(full.wall_s),
            fmt(local.wall_s),
            values={"hypervisor": full.wall_s, "local": local.wall_s},
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
        Row(
            f"full backup: bytes over {f['transport']}",
            f"{f['received_full']:,}",
            "-",
            values={"hypervisor": f["received_full"]},
        )
    )
    rows.append(Row("full backup peak RSS (MB)", fmt(mb(full.max_rss), ".0f"), fmt(mb(local.max_rss), ".0f")))
    rows.append(
        Row(
            "incremental: bytes written to the disk",
            f"{f['changed_bytes_written']:,}",
            values={"hypervisor": f["changed_bytes_written"]},
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
            values={"hypervisor": f["touched_chunk_bytes"]},
        )
    )
    rows.append(
        Row(
            f"incremental: bytes over {f['transport']}",
            f"{f['received_incr']:,}",
            values={"hypervisor": f["received_incr"]},
        )
    )
    r = ratio(f["received_incr"], f["touched_chunk_bytes"])
    judged(
        "incremental bytes received / touched chunk bytes",
        r,
        ".3f",
        f"<= {INCR_BYTES_RATIO_MAX:g}",
        None if r is None else r <= INCR_BYTES_RATIO_MAX,
    )
    rows.append(Row("incremental backup time (s)", fmt(incr.wall_s), values={"hypervisor": incr.wall_s}))
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
    print(f"vmrecover {f['platform']} backup benchmark  ({env['vmrecover']}; {env['simulator']})")
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
    p = arg_parser(__doc__)
    p.add_argument("--platform", choices=sorted(PLATFORMS), default="vmware", help="the simulated hypervisor")
    return parse_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    return bench_main(
        args,
        Context,
        measure,
        print_report,
        prefix=f"vmrecover-{args.platform}-bench-",
        tools={"go": "golang-go"} if args.platform == "vmware" else {"qemu-nbd": "qemu-utils"},
        free_needed=4 * args.size,
    )


if __name__ == "__main__":
    sys.exit(main())
