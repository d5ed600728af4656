#!/usr/bin/env python3
"""Service benchmark: ``vmrecover serve`` under load, push ingest, compression levels, parallel backups and
the service's memory, each against its peer in the same run.

Steps (every work file lives under ``--workdir``, a fresh directory under /var/tmp by default, and is
removed at the end unless ``--keep``):

1. build the benchmarks' sparse raw image (bench/common.py ``make_image``: 1 MiB regions, ~35% holes,
   ~35% text, ~30% random) and four copies of it as the disks of four VMs, each 1 MiB data region of a
   copy marked with 16 bytes of its own (so that no two VMs share a chunk: nothing deduplicates);
2. **compression**: full backups of the image into fresh repositories made with ``vmrecover init
   --compression-level 1`` and ``3``, and ``borg create`` at borg's defaults (lz4, buzhash chunker) and
   at the settings the other benchmarks use (``--chunker-params fixed,4194304 --compression zstd,3``):
   time, MB/s and stored size of each, and which level the figures favour;
3. **push vs local**: ``vmrecover backup disk.raw --vm bench`` into a fresh repository, against the same
   image pushed over HTTPS (``PUT /api/v1/vms/bench/disks/disk``, the sparse stream of
   ``vmrecover.ingest.push.encode``: only the data extents, as an agent sends them) to a fresh ``vmrecover
   serve`` on another fresh repository;
4. **parallel backups**: the four VMs backed up one at a time (``vmrecover backup`` processes, one after
   the other, into one fresh repository), against two and four of them at once (separate processes,
   into one fresh repository each time): wall time and aggregate MB/s;
5. **the service under load**: a ``vmrecover serve`` (chunk cache ``--cache-size``, 256M by default) with
   two backup jobs of images (VMs 1 and 2) and the test guest backed up; its VmHWM/VmRSS once started
   and asked one API call ("idle"); then, for at least ``--load-seconds`` (20) and until the rest is
   done, ``GET /api/v1/jobs`` with a bearer token at ``--rate`` (200) requests per second over HTTPS
   from ``--clients`` (8) keep-alive connections, while both jobs run at once in the service (``POST
   /api/v1/jobs/NAME/run``) and the test guest boots with qemu from a recovery session (``POST
   /api/v1/sessions``) over ``nfs://`` from the service's NFS export: achieved requests per second,
   latency percentiles, and the service's peak memory ("loaded").

The page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``) before every timed run when
allowed (root).  A timed command is its wall time plus a final ``sync``; a push is timed from its first
byte to the service's answer (the point committed) plus a ``sync``.  Targets (from the issue): 200 req/s
with p99 latency < 50 ms under that load; push rate >= 0.8x the local backup's; the service's VmHWM <=
cache size + 200 MB idle and <= cache size + 400 MB loaded.  MB means 10^6 bytes.

The boot needs port 111 (qemu's ``nfs://`` asks the portmapper): while that service runs, the script
holds /run/lock/vmrecover-port111.lock as the tests and nfs_bench do (``--no-boot`` skips the boot and
the portmapper).  Every server is stopped at the end, also on errors, Ctrl-C and SIGTERM.  This is a
measurement, not a test: the exit code is 0 whether or not the targets are met (1 only when the set-up
or a vmrecover command fails).  Run it as root, from the repository root::

    .venv/bin/python bench/service_bench.py                 # 2 GiB image
    .venv/bin/python bench/service_bench.py --size 512M     # quick run
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/service_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.backup_bench import du_bytes
from bench.common import (
    BORG_CREATE,
    LAUNCHER,
    NFS_EXPORT,
    SEED,
    BenchError,
    Context,
    Phase,
    Run,
    arg_parser,
    bench_main,
    boot_checked,
    borg_create_argv,
    cold_text,
    data_bytes,
    data_extents,
    environment,
    error_text,
    failed_command,
    fmt,
    human,
    latency_stats,
    log,
    machine_busy_s,
    make_image,
    mb,
    own_cpu_s,
    parse_args,
    print_host,
    print_results,
    proc_cpu_s,
    proc_status,
    pwrite_all,
    ratio,
    size_bytes,
    stop_process,
    summary,
    tail,
    tool_version,
    verdict,
)
from bench.nfs_bench import port111
from tests.testkit.guest import build_guest_disk
from vmrecover.errors import VmrecoverError
from vmrecover.ingest import push
from vmrecover.recovery import qemu_boot
from vmrecover.repo.catalog import UNFINISHED
from vmrecover.service import tls

MiB = 2**20
API = "/api/v1"
LOAD_PATH = f"{API}/jobs"  # the status endpoint under load: needs the token, answered from the catalog

# Acceptance targets.
RATE_SHARE_MIN = 0.99  # achieved requests per second / offered (--rate, 200)
P99_MS_MAX = 50.0
PUSH_RATIO_MIN = 0.8  # push rate / local backup rate
IDLE_MB_OVER_CACHE = 200.0  # service VmHWM idle <= cache size + this
LOADED_MB_OVER_CACHE = 400.0  # ... and loaded

VMS = 4  # copies of the image, the disks of the parallel backups (the load's jobs use the first two)
START_TIMEOUT_S = 60.0  # a service not ready after this long has failed
LOAD_EXTRA_MAX_S = 900.0  # the load goes on until the backups and the boot are done, at most this longer
BASELINE_S = 3.0  # seconds of load on the idle service before the backups and the boot start
JOB_SCHEDULE = "0 0 1 1 *"  # the jobs run when asked (POST .../run), never on their own during a run


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    vmrecover: str
    peer: str = "-"
    ratio: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "vmrecover", "peer", "ratio", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.vmrecover, self.peer, self.ratio, self.target, self.result]


@dataclass
class ServiceContext(Context):
    borg: str | None = None
    token: str = ""  # the API token (admin) of every service the benchmark starts
    token_block: str = ""  # its [[api.tokens]] lines


# --- the service -----------------------------------------------------------------------------------


def toml_str(value: str | Path) -> str:
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def service_config(
    ctx: ServiceContext, repo: Path, *, jobs: Sequence[tuple[str, Path]] = (), nfs: bool = False,
    portmapper: bool = False,
) -> str:  # fmt: skip
    """The configuration of a benchmark's service: API on a free loopback port, NFS on a free port (with
    the portmapper on 111 if asked), no syslog; *jobs*: (VM name, image) backup jobs, named after the VM,
    that only run when asked."""
    lines = [
        "# Written by bench/service_bench.py",
        "[repository]",
        f"path = {toml_str(repo)}",
        f"cache_size = {toml_str(ctx.args.cache_size)}",
        "",
        "[api]",
        'listen = ["127.0.0.1:0"]',
        ctx.token_block.rstrip("\n"),
        "",
        "[nfs]",
        f"enabled = {'true' if nfs else 'false'}",
        'listen = "127.0.0.1"',
        "port = 0",
        f"portmapper = {'true' if portmapper else 'false'}",
        'allow = ["127.0.0.1/32"]',
        "",
        "[scheduler]",
        "max_streams = 4",
        "retries = 0",
        "",
        "[notify]",
        'syslog = "none"',
    ]
    for vm, image in jobs:
        lines += ["", "[[jobs]]", f"name = {toml_str(vm)}", f"schedule = {toml_str(JOB_SCHEDULE)}",
                  f"images = [{toml_str(image)}]", f"vm = {toml_str(vm)}"]  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass
class Served:
    """A running ``vmrecover serve``: its process, what it said it serves (``run/service.json``)."""

    proc: subprocess.Popen[bytes]
    record: dict[str, Any]
    cert: Path  # the API's self-signed certificate, generated at its first start
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def api_port(self) -> int:
        return int(self.record["api"][0][1])

    def memory(self) -> tuple[int | None, int | None]:
        """(VmHWM, VmRSS) in bytes."""
        return proc_status(self.pid, "VmHWM"), proc_status(self.pid, "VmRSS")


@contextlib.contextmanager
def serve(
    ctx: ServiceContext, name: str, config: str, repo: Path, *, port_111: bool = False
) -> Iterator[Served]:
    """``vmrecover serve --config WORKDIR/NAME.toml``, ready once ``REPO/run/service.json`` names it;
    stopped with SIGTERM afterwards.  With *port_111* the machine's port-111 lock is held meanwhile."""
    path = ctx.workdir / name / "vmrecover.toml"
    path.parent.mkdir()
    path.write_text(config)
    record = repo / "run" / "service.json"
    with contextlib.ExitStack() as stack:
        if port_111:
            stack.enter_context(port111(ctx))
        err = Path(f"{ctx.log_base(name)}.log")
        argv = [str(ctx.args.vmrecover), "serve", "--config", str(path)]
        with open(err, "wb") as f:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=ctx.env,
                start_new_session=True,
            )  # fmt: skip
        stack.callback(stop_process, proc, "vmrecover serve", ctx.notes)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise BenchError(f"vmrecover serve exited with {proc.returncode}: {tail(err)}")
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(record.read_text())
                if doc.get("pid") == proc.pid:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"vmrecover serve not ready after {START_TIMEOUT_S:g} s: {tail(err)}")
            time.sleep(0.1)
        log(f"  vmrecover serve (pid {proc.pid}) ready: API port {doc['api'][0][1]}, nfs {doc.get('nfs')}")
        yield Served(proc, doc, tls.default_paths(path)[0], err)


class Api:
    """HTTPS to a service's API with the benchmark's token, the certificate verified."""

    def __init__(self, served: Served, token: str) -> None:
        self.port = served.api_port
        self.ssl = ssl.create_default_context(cafile=str(served.cert))
        self.headers = {"Authorization": f"Bearer {token}"}
        self.conn = self.connection()

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ssl, timeout=300)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        """One request on this object's connection (reopened after an error); the JSON answer."""
        headers = dict(self.headers)
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            self.conn.request(method, path, body=data, headers=headers)
            r = self.conn.getresponse()
            raw = r.read()
        except (OSError, http.client.HTTPException) as exc:
            self.conn.close()
            self.conn = self.connection()
            raise BenchError(f"{method} {path}: {exc}") from None
        if r.status != expect:
            raise BenchError(f"{method} {path} answered {r.status}: {raw[:1000]!r}")
        return json.loads(raw) if raw else None

    def close(self) -> None:
        self.conn.close()


# --- the images ------------------------------------------------------------------------------------


@dataclass
class Images:
    image: Path
    size: int
    data_bytes: int
    build_s: float
    regions: dict[str, int]
    vms: list[Path]  # marked copies, the disks of VMs vm-1..vm-4
    guest: Path | None = None


def data_regions(path: Path, size: int) -> list[int]:
    """Offsets of the 1 MiB regions of *path* that hold data (the image's regions are data or hole)."""
    return [r for start, end in data_extents(path) if start < size
            for r in range(start - start % MiB, min(end, size), MiB)]  # fmt: skip


def marked_copy(src: Path, dst: Path, tag: int, regions: list[int]) -> None:
    """A sparse copy of *src* with 16 bytes of its own at the start of each data region: the same work
    for a backup (compression, holes), and no chunk in common with the image or another copy."""
    size = os.path.getsize(src)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < end:
                off += os.copy_file_range(fin.fileno(), fout.fileno(), end - off, off, off)
            pos = end
        for region in regions:
            pwrite_all(fout.fileno(), f"vm-{tag:02d}@{region // MiB:08x}".encode()[:16].ljust(16), region)
        os.fsync(fout.fileno())


def build_images(ctx: ServiceContext) -> Images:
    wd, size = ctx.workdir, ctx.args.size
    image = wd / "disk.raw"
    log(f"building a {human(size)} sparse image at {image}")
    info = make_image(image, size, SEED)
    log(f"  {info.holes} hole, {info.text} text, {info.random} random regions in {info.build_s:.1f} s")
    regions = data_regions(image, size)
    (wd / "vms").mkdir()
    vms = []
    for i in range(1, VMS + 1):
        vms.append(wd / "vms" / f"vm-{i}.raw")
        marked_copy(image, vms[-1], i, regions)
    log(f"  {VMS} marked copies in {wd / 'vms'}")
    guest = None
    if not ctx.args.no_boot:
        guest = build_guest_disk(wd / "guest.raw", cache_dir=wd / "guest-cache")
        log(f"  test guest {guest}")
    counts = {"holes": info.holes, "text": info.text, "random": info.random}
    return Images(image, size, data_bytes(image), info.build_s, counts, vms, guest)


# --- commands --------------------------------------------------------------------------------------


def vmr(ctx: ServiceContext, args: Sequence[str | Path]) -> list[str | Path]:
    return [ctx.args.vmrecover, *args, "--json"]


def init_repo(ctx: ServiceContext, repo: Path, *args: str) -> None:
    ctx.run(vmr(ctx, ["init", "--repo", repo, *args]), "init")


def remove(ctx: ServiceContext, *paths: Path) -> None:
    if not ctx.args.keep:
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)


def timed(ctx: ServiceContext, argv: Sequence[str | Path], name: str) -> Run:
    """A command from a cold page cache: wall time (plus a final sync), CPU time, peak RSS."""
    ctx.cold()
    run = ctx.measured(argv, name)
    log(f"  {name}: {run.wall_s:.2f} s wall, {run.cpu_s:.2f} s CPU, {mb(run.max_rss):.0f} MB peak RSS")
    return run


def run_parallel(ctx: ServiceContext, argvs: Sequence[Sequence[str | Path]], name: str) -> dict[str, Any]:
    """Start every command at once (each through the launcher, for its CPU time and peak RSS), wait for
    all, then sync: the wall time of the whole."""
    procs: list[tuple[subprocess.Popen[bytes], Path, list[str]]] = []
    busy = machine_busy_s()
    start = time.monotonic()
    try:
        for i, argv in enumerate(argvs, 1):
            args = [str(a) for a in argv]
            base = ctx.log_base(f"{name}-{i}")
            with open(f"{base}.out", "wb") as out, open(f"{base}.err", "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", LAUNCHER, f"{base}.usage", *args],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=ctx.env, start_new_session=True,
                )  # fmt: skip
            procs.append((proc, base, args))
        for proc, _, _ in procs:
            proc.wait()
        os.sync()
        wall = time.monotonic() - start
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:  # interrupted: the process groups we started go too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    busy = machine_busy_s() - busy
    cpu, peak = 0.0, 0
    for _, base, args in procs:
        try:
            rc, maxrss_kib, _, cpu_s = Path(f"{base}.usage").read_text().split()
        except (OSError, ValueError):
            raise BenchError(f"the launcher of {args[0]} failed: {tail(Path(f'{base}.err'))}") from None
        if int(rc) != 0:
            raise failed_command(args, int(rc), tail(Path(f"{base}.out")), tail(Path(f"{base}.err")))
        cpu += float(cpu_s)
        peak = max(peak, int(maxrss_kib) * 1024)
    ctx.phases.append(Phase(name, wall, cpu, max(0.0, busy - cpu)))
    log(f"  {name}: {wall:.2f} s wall, {cpu:.2f} s CPU in all, {mb(peak):.0f} MB peak RSS (largest)")
    return {"wall_s": wall, "cpu_s": cpu, "max_rss": peak, "processes": len(argvs)}


# --- 2. compression --------------------------------------------------------------------------------


def measure_compression(ctx: ServiceContext, im: Images) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in (1, 3):
        repo = ctx.workdir / f"zstd{level}-repo"
        init_repo(ctx, repo, "--compression-level", str(level))
        log(f"vmrecover full backup, zstd level {level}")
        run = timed(
            ctx, vmr(ctx, ["backup", im.image, "--vm", "bench", "--repo", repo]), f"zstd{level}-backup"
        )
        out[f"zstd{level}"] = {**run.summary(), "stored": du_bytes(repo)}
        remove(ctx, repo)
    borg = ctx.borg
    if borg is None:
        return out
    for key, label in (("borg_default", "defaults (lz4, buzhash)"), ("borg_matched", BORG_CREATE)):
        repo = ctx.workdir / f"{key}-repo"
        try:
            ctx.run([borg, "init", "-e", "none", str(repo)], "borg-init")
            log(f"borg create, {label}")
            if key == "borg_default":
                argv = [borg, "create", f"{repo}::full", str(im.image)]
            else:
                argv = borg_create_argv(borg, repo, "full", im.image)
            run = timed(ctx, argv, key)
            out[key] = {**run.summary(), "stored": du_bytes(repo)}
        except (BenchError, OSError) as exc:
            log(f"  borg failed, its rows will be n/a: {exc}")
            ctx.notes.append(f"borg {label} failed: {str(exc)[:500]}")
        remove(ctx, repo)
    return out


def recommendation(comp: dict[str, Any]) -> str:
    """Which zstd level the compression figures favour: level 1 when it saves at least 10% of the time
    and twice as much time as it costs in space, else level 3."""
    one, three = comp.get("zstd1"), comp.get("zstd3")
    if not one or not three:
        return "n/a"
    t, c, s = (one[k] / three[k] if three[k] else 1.0 for k in ("wall_s", "cpu_s", "stored"))
    facts = f"level 1 took {t:.2f}x the time and {c:.2f}x the CPU of level 3 and stored {s:.3f}x as much"
    if t <= 0.9 and 1 - t >= 2 * (s - 1):
        return f"speed, zstd level 1, the product's default ({facts})"
    return f"size, zstd level 3 ({facts}): the product's default (1) should be reconsidered"


# --- 3. push vs local ------------------------------------------------------------------------------


def push_disk(api: Api, image: Path, vm: str, disk: str) -> dict[str, Any]:
    """PUT the sparse stream of *image* (push.encode: its data extents) as disk *disk* of a new point of
    *vm*; timed from the first byte to the answer, plus a sync."""
    pieces = push.encode(str(image))
    head = next(pieces)
    extents = json.loads(head)["extents"]
    length = len(head) + sum(n for _, n in extents)
    conn = api.connection()
    start, cpu0 = time.monotonic(), time.thread_time()
    try:
        conn.putrequest("PUT", f"{API}/vms/{vm}/disks/{disk}")
        for k, v in {**api.headers, "Content-Type": push.SPARSE, "Content-Length": str(length)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(head)
        for piece in pieces:
            conn.send(piece)
        r = conn.getresponse()
        raw = r.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"push of {image}: {exc}") from None
    finally:
        conn.close()
    if r.status != 201:
        raise BenchError(f"push of {image} answered {r.status}: {raw[:1000]!r}")
    os.sync()
    return {"wall_s": time.monotonic() - start, "client_cpu_s": time.thread_time() - cpu0, "bytes": length,
            "answer": json.loads(raw)}  # fmt: skip


def measure_push(ctx: ServiceContext, im: Images) -> dict[str, Any]:
    local_repo, push_repo = ctx.workdir / "local-repo", ctx.workdir / "push-repo"
    init_repo(ctx, local_repo)
    log("local vmrecover backup of the image")
    local = timed(ctx, vmr(ctx, ["backup", im.image, "--vm", "bench", "--repo", local_repo]), "local-backup")
    remove(ctx, local_repo)
    init_repo(ctx, push_repo)
    with serve(ctx, "serve-push", service_config(ctx, push_repo), push_repo) as served:
        api = Api(served, ctx.token)
        api.call("GET", f"{API}/health")
        log("push of the image over HTTPS")
        ctx.cold()
        with CpuMeter(served.pid) as cpu, ctx.phase("push", served.pid):
            pushed = push_disk(api, im.image, "bench", "disk")
        pushed.update(service_cpu_s=cpu.used["service_cpu_s"], loop_cpu_s=cpu.used["loop_cpu_s"])
        hwm, _ = served.memory()
        api.close()
    log(
        f"  push: {pushed['wall_s']:.2f} s, service CPU {pushed['service_cpu_s']:.2f} s (its event loop's "
        f"thread {pushed['loop_cpu_s']:.2f} s), client CPU "
        f"{pushed['client_cpu_s']:.2f} s; service VmHWM {mb(hwm or 0):.0f} MB"
    )
    remove(ctx, push_repo)
    return {"local": local.summary(), "local_doc": local.json(), "push": pushed, "service_hwm": hwm}


# --- 4. parallel backups ---------------------------------------------------------------------------


def measure_parallel(ctx: ServiceContext, im: Images) -> dict[str, Any]:
    def backup(i: int, repo: Path) -> list[str | Path]:
        return vmr(ctx, ["backup", im.vms[i - 1], "--vm", f"vm-{i}", "--repo", repo])

    repo = ctx.workdir / "sequential-repo"
    init_repo(ctx, repo)
    log(f"{VMS} backups one at a time")
    ctx.cold()
    seq = [ctx.measured(backup(i, repo), f"sequential-{i}").summary() for i in range(1, VMS + 1)]
    for i, s in enumerate(seq, 1):
        log(f"  vm-{i}: {s['wall_s']:.2f} s wall, {s['cpu_s']:.2f} s CPU")
    remove(ctx, repo)
    out: dict[str, Any] = {"sequential": seq}
    for n in (2, 4):
        repo = ctx.workdir / f"parallel{n}-repo"
        init_repo(ctx, repo)
        log(f"{n} backups at once")
        ctx.cold()
        out[f"parallel{n}"] = run_parallel(ctx, [backup(i, repo) for i in range(1, n + 1)], f"parallel-{n}")
        remove(ctx, repo)
    return out


# --- 1 and 5. the service under load ---------------------------------------------------------------


@dataclass
class Sample:
    due: float  # when the request was to be sent (monotonic)
    sent: float
    latency: float  # seconds from sending to the whole answer
    ok: bool


class Load:
    """``GET LOAD_PATH`` at *rate* requests per second from *clients* threads, each on one keep-alive
    connection and sending its share of the schedule (request i*clients+k at start + that/rate; late, at
    once, and the next ones keep their times); the service's VmRSS sampled every 0.25 s meanwhile."""

    def __init__(self, api: Api, clients: int, rate: float, pid: int) -> None:
        self.api, self.clients, self.rate, self.pid = api, clients, rate, pid
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.rss: list[tuple[float, int]] = []
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.start = self.end = 0.0

    def __enter__(self) -> Load:
        self.start = time.monotonic() + 0.2
        self.threads = [
            threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(self.clients)
        ]
        self.threads.append(threading.Thread(target=self._sampler, daemon=True))
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = time.monotonic()
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)

    def _client(self, k: int) -> None:
        conn = self.api.connection()
        i = 0
        try:
            while True:
                due = self.start + (i * self.clients + k) / self.rate
                if self.stopping.wait(max(0.0, due - time.monotonic())):
                    break
                sent = time.monotonic()
                ok = False
                try:
                    conn.request("GET", LOAD_PATH, headers=self.api.headers)
                    r = conn.getresponse()
                    r.read()
                    ok = r.status == 200
                    if not ok:
                        self.errors.append(f"HTTP {r.status}")
                except (OSError, http.client.HTTPException) as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = self.api.connection()
                self.samples.append(Sample(due, sent, time.monotonic() - sent, ok))
                i += 1
        finally:
            conn.close()

    def _sampler(self) -> None:
        while not self.stopping.wait(0.25):
            v = proc_status(self.pid, "VmRSS")
            if v is not None:
                self.rss.append((time.monotonic(), v))

    def analyse(self, windows: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """Rate, errors and latencies over the whole load, and in each named (start, end) window: the
        latencies of the requests sent then, and the rate of answers that came then."""
        start, end = self.start, self.end
        every = [s for s in self.samples if s.due < end]
        ok = [s for s in every if s.ok]
        doc: dict[str, Any] = {
            "window_s": end - start,
            "requests": len(every),
            "ok": len(ok),
            "errors": len(every) - len(ok),
            "error_samples": self.errors[:20],
            "late_10ms": sum(1 for s in every if s.sent - s.due > 0.010),
            "rps": len(ok) / (end - start),
            "latency_ms": latency_stats([s.latency for s in ok]),
            "windows": {},
        }
        for name, (lo, hi) in windows.items():
            answered = sum(1 for s in ok if lo <= s.sent + s.latency < hi)
            doc["windows"][name] = {
                "start_s": lo - start,
                "seconds": hi - lo,
                "rps": answered / (hi - lo) if hi > lo else None,
                "latency_ms": latency_stats([s.latency for s in ok if lo <= s.sent < hi]),
            }
        timeline = []  # per second of the load: answers, p50, p99, max (ms) of the requests sent then
        for sec in range(int(end - start) + 1):
            st = latency_stats([s.latency for s in ok if start + sec <= s.sent < start + sec + 1])
            if st:
                timeline.append([sec, st["n"], round(st["p50"], 1), round(st["p99"], 1), round(st["max"], 1)])
        doc["timeline"] = timeline
        return doc


def wall_to_mono(iso: str) -> float:
    """An ISO time of the service (UTC, ``...Z``) on this process's monotonic clock."""
    t = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    return time.monotonic() - (time.time() - t)


def child_pids_with(text: str) -> list[int]:
    """Our child processes whose command line contains *text* (a qemu left by an interrupted boot)."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                        pids.append(int(pid))
    return pids


@dataclass
class CpuMeter:
    """CPU seconds of the service, of this process (the load's clients) and of our children (qemu)
    over a phase, and of the rest of the machine (recorded as a Phase for the busy-machine warning)."""

    pid: int
    t0: tuple[float, ...] = ()
    used: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> CpuMeter:
        self.t0 = (machine_busy_s(), time.process_time(), own_cpu_s(), proc_cpu_s(self.pid), self.loop())
        return self

    def loop(self) -> float:
        """CPU seconds of the service's main thread: its trio loop (the API's HTTP and TLS, the scheduler,
        the NFS export's RPC), where the worker threads run the blocking work."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        busy, mine, everything, service, loop = self.t0
        self.used["service_cpu_s"] = proc_cpu_s(self.pid) - service
        self.used["loop_cpu_s"] = self.loop() - loop
        self.used["client_cpu_s"] = time.process_time() - mine
        self.used["children_cpu_s"] = max(0.0, own_cpu_s() - everything - self.used["client_cpu_s"])
        mine = self.used["service_cpu_s"] + self.used["client_cpu_s"] + self.used["children_cpu_s"]
        self.used["other_cpu_s"] = max(0.0, machine_busy_s() - busy - mine)


def booter(ctx: ServiceContext, url: str, serial: Path, result: dict[str, Any]) -> None:
    """The test guest booted over *url* (a thread's target): seconds or error into *result*."""
    result["url"], result["start"] = url, time.monotonic()
    try:
        res = boot_checked(
            "boot over nfs:// during the load", disk=None, drive_args=qemu_boot.drive(url), serial_log=serial,
            timeout=ctx.args.boot_timeout,
        )  # fmt: skip
        result["seconds"] = res.seconds
    except (BenchError, VmrecoverError, OSError) as exc:
        result["error"] = error_text(exc)
    result["end"] = time.monotonic()


def measure_load(ctx: ServiceContext, im: Images) -> dict[str, Any]:
    args = ctx.args
    repo = ctx.workdir / "service-repo"
    init_repo(ctx, repo)
    guest_disk = None
    if im.guest is not None:
        argv = vmr(ctx, ["backup", im.guest, "--vm", "guest", "--format", "raw", "--repo", repo])
        guest_disk = json.loads(ctx.run(argv, "backup-guest").stdout)["disks"][0]["name"]
    jobs = [("load-a", im.vms[0]), ("load-b", im.vms[1])]
    boot = im.guest is not None
    config = service_config(ctx, repo, jobs=jobs, nfs=boot, portmapper=boot)
    out: dict[str, Any] = {"jobs": [j for j, _ in jobs], "backup_bytes": len(jobs) * im.size}
    log("the service under load" + (" (port 111: the portmapper, for qemu's nfs://)" if boot else ""))
    with serve(ctx, "serve-load", config, repo, port_111=boot) as served:
        api = Api(served, ctx.token)
        api.call("GET", LOAD_PATH)  # one API call, then the idle figures
        time.sleep(1)
        out["idle_hwm"], out["idle_rss"] = served.memory()
        log(f"  idle: VmHWM {mb(out['idle_hwm'] or 0):.0f} MB, VmRSS {mb(out['idle_rss'] or 0):.0f} MB")
        session = None
        if boot:
            session = api.call(
                "POST", f"{API}/sessions", {"vm": "guest", "name": "service-bench"}, expect=201
            )
        boot_result: dict[str, Any] = {}
        serial = ctx.logs / "boot-nfs.serial"
        runs: dict[str, Any] = {}
        ctx.cold()
        try:
            with CpuMeter(served.pid) as cpu, Load(api, args.clients, args.rate, served.pid) as load:
                time.sleep(max(0.0, load.start + BASELINE_S - time.monotonic()))  # the idle service first
                posted = time.monotonic()
                run_ids = {j: api.call("POST", f"{API}/jobs/{j}/run", expect=202)["run"] for j, _ in jobs}
                log(f"  {args.rate:g} req/s of GET {LOAD_PATH}; jobs {', '.join(run_ids)} started")
                boot_thread = None
                if session is not None:
                    url = f"nfs://127.0.0.1{NFS_EXPORT}/recover/{session['name']}/{guest_disk}.raw"
                    boot_thread = threading.Thread(
                        target=booter, args=(ctx, url, serial, boot_result), daemon=True
                    )
                    boot_thread.start()
                hard_end = load.start + args.load_seconds + LOAD_EXTRA_MAX_S
                while time.monotonic() < hard_end:
                    runs = {j: api.call("GET", f"{API}/runs/{rid}") for j, rid in run_ids.items()}
                    backups_done = all(r["state"] not in UNFINISHED for r in runs.values())
                    boot_done = boot_thread is None or not boot_thread.is_alive()
                    if backups_done and boot_done and time.monotonic() >= load.start + args.load_seconds:
                        break
                    time.sleep(0.5)
                else:
                    ctx.notes.append(f"the load was stopped after {LOAD_EXTRA_MAX_S:g} s more than asked")
                out["loaded_rss_max"] = max((v for _, v in load.rss), default=None)
                out["loaded_hwm"], _ = served.memory()
        finally:
            for pid in child_pids_with(str(serial)):  # the qemu of an interrupted boot
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        ctx.phases.append(Phase("service under load", load.end - load.start, cpu.used["service_cpu_s"],
                                cpu.used["other_cpu_s"]))  # fmt: skip
        for j, r in runs.items():
            if r["state"] != "succeeded":
                raise BenchError(f"job {j} (run {r['id']}) ended {r['state']}: {r.get('error')}")
        if "error" in boot_result:
            ctx.notes.append(f"the boot over nfs:// during the load failed: {boot_result['error'][:1000]}")
        b_start = min(wall_to_mono(r["started"]) for r in runs.values())
        b_end = max(wall_to_mono(r["ended"]) for r in runs.values())
        out["backups_s"] = b_end - b_start
        out["service"] = load.analyse(
            {"idle": (load.start, posted), "backups": (b_start, b_end), "after": (b_end, load.end)}
        )
        out["service"].update(cpu.used, rss_samples=[(round(t - load.start, 2), v) for t, v in load.rss])
        out.update(runs=runs, boot=boot_result)
        log_load("service backups", out["service"])
        if session is not None:
            api.call("DELETE", f"{API}/sessions/{session['name']}")

        # the peer: the same load while the same work runs outside the service, in two processes
        log("the same load while two backups run as vmrecover backup processes (VMs 3 and 4)")
        argvs = [vmr(ctx, ["backup", im.vms[i], "--vm", f"cli-{i + 1}", "--repo", repo]) for i in (2, 3)]
        ctx.cold()
        with CpuMeter(served.pid) as cpu, Load(api, args.clients, args.rate, served.pid) as load:
            time.sleep(max(0.0, load.start + BASELINE_S - time.monotonic()))
            b_start = time.monotonic()
            cli = run_parallel(ctx, argvs, "cli-backups-under-load")
            b_end = time.monotonic()
            time.sleep(0.5)
        out["cli_backups"] = cli
        out["cli"] = load.analyse({"idle": (load.start, b_start), "backups": (b_start, b_end)})
        out["cli"].update(cpu.used)
        log_load("backups in processes", out["cli"])
        out["final_hwm"], _ = served.memory()
        api.close()
    return out


def log_load(what: str, d: dict[str, Any]) -> None:
    w = d["windows"]["backups"]
    lat, wl = d["latency_ms"] or {}, w["latency_ms"] or {}
    log(
        f"  {what}: {d['rps']:.1f} req/s over {d['window_s']:.1f} s (p50 {lat.get('p50', 0):.1f} ms, p99 "
        f"{lat.get('p99', 0):.1f} ms, {d['errors']} errors); while the backups ran ({w['seconds']:.1f} s): "
        f"{w['rps'] or 0:.1f} req/s answered, p50 {wl.get('p50', 0):.1f} ms, p99 {wl.get('p99', 0):.1f} ms"
    )


# --- the report ------------------------------------------------------------------------------------


def make_rows(ctx: ServiceContext, doc: dict[str, Any]) -> list[Row]:
    args, size = ctx.args, ctx.args.size
    rows: list[Row] = []
    load, pushed, comp, par = doc["load"], doc["push"], doc["compression"], doc["parallel"]

    def info(metric: str, value: str, peer: str = "-", q: float | None = None, **values: Any) -> None:
        rows.append(Row(metric, value, peer, fmt(q, ".2f", "x") if q is not None else "-", values=values))

    def judged(
        metric: str, value: str, target: str, ok: bool | None, peer: str = "-", q: str = "-", **values: Any
    ) -> None:
        rows.append(Row(metric, value, peer, q, target, verdict(ok), values))

    # 1. the API under load; the peer: the same load while the backups run as processes of their own
    svc, cli = load["service"], load["cli"]
    rate_min = args.rate * RATE_SHARE_MIN

    def lat(d: dict[str, Any] | None, keys: Sequence[str] = ("p50", "p99", "max")) -> str:
        return " / ".join(fmt((d or {}).get(k), ".1f") for k in keys)

    sb, cb = svc["windows"]["backups"], cli["windows"]["backups"]
    ok = svc["rps"] >= rate_min and svc["errors"] == 0
    judged(
        "API answered req/s, whole load",
        f"{svc['rps']:.1f} in {svc['window_s']:.0f} s",
        f">= {rate_min:g}",
        ok,
        f"{cli['rps']:.1f} in {cli['window_s']:.0f} s",
        rps=svc["rps"],
        peer_rps=cli["rps"],
    )
    rps = sb["rps"]
    judged(
        "API answered req/s while the backups ran",
        f"{fmt(rps, '.1f')} in {sb['seconds']:.0f} s",
        f">= {rate_min:g}",
        None if rps is None else rps >= rate_min,
        f"{fmt(cb['rps'], '.1f')} in {cb['seconds']:.0f} s",
        rps=rps,
        peer_rps=cb["rps"],
    )
    info(
        "API answers 200 / failed / sent > 10 ms late",
        f"{svc['ok']} / {svc['errors']} / {svc['late_10ms']}",
        f"{cli['ok']} / {cli['errors']} / {cli['late_10ms']}",
    )
    info(
        "API latency p50 / p90, whole load (ms)",
        lat(svc["latency_ms"], ("p50", "p90")),
        lat(cli["latency_ms"], ("p50", "p90")),
    )
    p99 = (svc["latency_ms"] or {}).get("p99")
    judged(
        "API latency p99, whole load (ms)",
        fmt(p99, ".1f"),
        f"< {P99_MS_MAX:g}",
        None if p99 is None else p99 < P99_MS_MAX,
        fmt((cli["latency_ms"] or {}).get("p99"), ".1f"),
    )
    info(
        f"API latency p50 / p99 / max, first {BASELINE_S:g} s, idle (ms)",
        lat(svc["windows"]["idle"]["latency_ms"]),
        lat(cli["windows"]["idle"]["latency_ms"]),
    )
    info(
        "API latency p50 / p99 / max while the backups ran (ms)", lat(sb["latency_ms"]), lat(cb["latency_ms"])
    )
    if load["boot"]:
        after = svc["windows"]["after"]
        info(
            f"API latency p50 / p99 / max after them, boot going on ({after['seconds']:.0f} s; ms)",
            lat(after["latency_ms"]),
        )
    b_rate = mb(load["backup_bytes"]) / load["backups_s"]
    c_rate = mb(load["backup_bytes"]) / load["cli_backups"]["wall_s"]
    info(
        f"the 2 backups ({human(size)} each) during the load: time; MB/s",
        f"{load['backups_s']:.1f} s; {b_rate:.0f} MB/s",
        f"{load['cli_backups']['wall_s']:.1f} s; {c_rate:.0f} MB/s",
    )
    boot = load["boot"]
    if boot:
        text = f"{boot['seconds']:.1f} s" if "seconds" in boot else "FAILED (see notes)"
        info("the test guest's boot over nfs:// during the load (s)", text)
    info(
        "CPU in the load: service (its loop) / clients / qemu or backups (s)",
        f"{svc['service_cpu_s']:.1f} ({svc['loop_cpu_s']:.1f}) / {svc['client_cpu_s']:.1f} / "
        f"{svc['children_cpu_s']:.1f}",
        f"{cli['service_cpu_s']:.1f} ({cli['loop_cpu_s']:.1f}) / {cli['client_cpu_s']:.1f} / "
        f"{cli['children_cpu_s']:.1f}",
    )

    # 2. push vs local
    local_s, push_s = pushed["local"]["wall_s"], pushed["push"]["wall_s"]
    pr, lr = mb(size) / push_s, mb(size) / local_s
    q = pr / lr
    judged(
        f"push vs local backup: MB/s over {human(size)}",
        f"{pr:.0f}",
        f">= {PUSH_RATIO_MIN:g}x",
        q >= PUSH_RATIO_MIN,
        f"{lr:.0f}",
        f"{q:.2f}x",
        push=pr,
        local=lr,
    )
    info("push vs local backup: time (s)", f"{push_s:.2f}", f"{local_s:.2f}", push_s / local_s)
    info(
        "push: CPU of service (its loop) / client; local: backup (s)",
        f"{pushed['push']['service_cpu_s']:.1f} ({pushed['push']['loop_cpu_s']:.1f}) / "
        f"{pushed['push']['client_cpu_s']:.1f}",
        f"{pushed['local']['cpu_s']:.1f}",
    )

    # 3. compression
    base = comp.get("zstd3")
    for key, label in (
        ("zstd1", "vmrecover zstd,1 (default)"),
        ("zstd3", "vmrecover zstd,3"),
        ("borg_default", "borg defaults (lz4, buzhash)"),
        ("borg_matched", "borg fixed 4 MiB, zstd,3"),
    ):
        r = comp.get(key)
        metric = f"full backup, {label}: time; MB/s; CPU; stored"
        if r is None:
            info(metric, "n/a")
            continue
        text = (
            f"{r['wall_s']:.2f} s; {mb(size) / r['wall_s']:.0f} MB/s; {r['cpu_s']:.1f} s; "
            f"{human(r['stored'])}"
        )
        info(metric, text, "-", ratio(r["wall_s"], base["wall_s"]) if base else None, **r)

    # 4. parallel backups
    seq = par["sequential"]
    for n in (2, 4):
        p = par[f"parallel{n}"]
        one_by_one = sum(s["wall_s"] for s in seq[:n])
        agg, agg_seq = mb(n * size) / p["wall_s"], mb(n * size) / one_by_one
        info(
            f"{n} backups at once vs one at a time: wall (s); MB/s",
            f"{p['wall_s']:.2f}; {agg:.0f}",
            f"{one_by_one:.2f}; {agg_seq:.0f}",
            ratio(agg, agg_seq),
            wall=p["wall_s"],
            sequential_wall=one_by_one,
            aggregate=agg,
            sequential_aggregate=agg_seq,
        )

    # 5. memory
    cache = mb(size_bytes(args.cache_size))

    def mem(v: int | None) -> str:
        return fmt(None if v is None else mb(v), ".0f")

    idle_max, loaded_max = cache + IDLE_MB_OVER_CACHE, cache + LOADED_MB_OVER_CACHE
    hwm = load["idle_hwm"]
    judged(
        f"service VmHWM idle (MB; cache_size {args.cache_size})",
        mem(hwm),
        f"<= {idle_max:.0f}",
        None if hwm is None else mb(hwm) <= idle_max,
        vmhwm=hwm,
    )
    info("service VmRSS idle (MB)", mem(load["idle_rss"]))
    hwm = load["loaded_hwm"]
    judged(
        "service VmHWM loaded (MB)",
        mem(hwm),
        f"<= {loaded_max:.0f}",
        None if hwm is None else mb(hwm) <= loaded_max,
        vmhwm=hwm,
    )
    info("service VmRSS loaded, largest sample (MB)", mem(load["loaded_rss_max"]))
    info("service VmHWM at its end, after the peer load (MB)", mem(load["final_hwm"]))
    info("push service VmHWM after the push (MB)", mem(pushed["service_hwm"]))
    return rows


def report(ctx: ServiceContext, im: Images, doc: dict[str, Any]) -> dict[str, Any]:
    rows = make_rows(ctx, doc)
    load = dict(doc["load"])
    env = environment(
        ctx,
        cache_size=ctx.args.cache_size,
        rate=ctx.args.rate,
        clients=ctx.args.clients,
        load_seconds=ctx.args.load_seconds,
        borg=tool_version([ctx.borg, "--version"]) if ctx.borg else None,
        borg_matched=BORG_CREATE,
        qemu=tool_version(["qemu-system-x86_64", "--version"]),
        no_boot=ctx.args.no_boot,
    )
    return {
        "environment": env,
        "image": {
            "path": str(im.image),
            "size": im.size,
            "data_bytes": im.data_bytes,
            "build_s": im.build_s,
            "regions": im.regions,
            "vms": [str(p) for p in im.vms],
        },
        **doc,
        "load": load,
        "recommendation": recommendation(doc["compression"]),
        "phases": [asdict(p) for p in ctx.phases],
        "notes": ctx.notes,
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env, img = doc["environment"], doc["image"]
    print(f"vmrecover service benchmark  ({env['vmrecover']}; {env['borg'] or 'borg: not run'})")
    print_host(env)
    r = img["regions"]
    print(
        f"image: {human(img['size'])} raw sparse ({human(img['data_bytes'])} data: {r['holes']} hole, "
        f"{r['text']} text, {r['random']} random 1 MiB regions); {VMS} copies with marked regions as the "
        "VMs of the parallel backups and the load's jobs"
    )
    boot = "" if env["no_boot"] else " and the test guest boots over nfs:// from a recovery session"
    print(
        f"API load: GET {LOAD_PATH}, {env['rate']:g} req/s offered over HTTPS with a bearer token from "
        f"{env['clients']} keep-alive connections (a late request is sent at once), {BASELINE_S:g} s idle, "
        f"then while two backup jobs run in the service{boot}; >= {env['load_seconds']:g} s, until all end"
    )
    print(
        "peer column: API rows: the same load while the same backups run as two `vmrecover backup` "
        "processes; push: the local backup; parallel: one at a time; compression rows' ratio: time / zstd,3's"
    )
    print(
        f"page cache dropped before each timed run: {cold_text(env)}; service cache_size "
        f"{env['cache_size']}; borg matched: {env['borg_matched']}"
    )
    print(f"qemu: {env['qemu']} (TCG); MB = 10^6 bytes")
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]])
    print(f"compression recommendation: {doc['recommendation']}")


# --- main ------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, serves="serve")
    p.set_defaults(cache_size="256M")
    p.add_argument("--rate", type=float, default=200, help="API requests per second offered (default 200)")
    p.add_argument("--clients", type=int, default=8, help="keep-alive connections of the load (default 8)")
    p.add_argument("--load-seconds", type=float, default=20, help="shortest load (default 20 s)")
    p.add_argument("--no-boot", action="store_true", help="no boot during the load (and no port 111)")
    p.add_argument("--no-borg", action="store_true", help="skip borg in the compression comparison")
    args = parse_args(p, argv)
    if args.rate <= 0 or args.clients < 1 or args.load_seconds <= 0:
        p.error("--rate, --clients and --load-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    borg = None if args.no_borg else shutil.which("borg")
    if borg is None and not args.no_borg:
        log("borg is not installed (scripts/setup.sh borgbackup): borg rows will be n/a")

    def body(ctx: ServiceContext) -> dict[str, Any]:
        tok = json.loads(
            ctx.run(vmr(ctx, ["token", "new", "service-bench", "--role", "admin"]), "token").stdout
        )
        ctx.token, ctx.token_block = tok["token"], tok["config"]
        im = build_images(ctx)
        doc: dict[str, Any] = {}
        doc["load"] = measure_load(ctx, im)
        doc["push"] = measure_push(ctx, im)
        doc["compression"] = measure_compression(ctx, im)
        doc["parallel"] = measure_parallel(ctx, im)
        return report(ctx, im, doc)

    tools = {} if args.no_boot else {"qemu-system-x86_64": "qemu-system-x86"}
    return bench_main(
        args, lambda a, wd: ServiceContext(a, wd, borg=borg), body, print_report,
        prefix="vmrecover-service-bench-", free_needed=7 * args.size, tools=tools,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
