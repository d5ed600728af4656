#!/usr/bin/env python3
"""NFS datastore benchmark: ``vmrecover nfs serve`` against NFS-Ganesha (FSAL_VFS) serving a plain copy.

Steps (every work file lives under ``--workdir``, a fresh directory under /var/tmp by default, and is
removed at the end unless ``--keep``):

1. build the benchmarks' sparse raw image (bench/common.py ``make_image``: 1 MiB regions, ~35% holes,
   ~35% text, ~30% random bytes, shuffled with a fixed seed) and back it up with ``vmrecover init
   --chunk-size 1M`` + ``vmrecover backup --vm bench --format raw``; the image itself is the plain copy
   Ganesha exports;
2. build the bootable test guest (tests.testkit.guest) and back it up into the same repository;
3. **sequential read**, ``--runs`` rounds (default 3) of vmrecover then Ganesha: a freshly started
   server (rpcbind + ``ganesha.nfsd -F`` with a config written into the work directory, or ``vmrecover
   nfs serve --port 0``), ``sync; echo 3 > /proc/sys/vm/drop_caches``, then ``nfs-cat`` (libnfs) of
   the image, ``vms/bench/<point>/disk.raw`` for vmrecover, piped into sha256 in this process; MB/s
   over the disk size, median of the rounds; the cold target is judged on the median of each round's
   vmrecover/Ganesha pair.  Then the same ``nfs-cat`` again on the same server without dropping
   anything ("warm").  A "cold" read here is served partly by the host's cache, so the order is the
   same in every round (a tool's data was last read one round before, with the other tool's reads
   between), and the decode-and-verify limit, which reads every chunk file, is measured after all
   rounds: between rounds, it made vmrecover's next cold read a host-cache read;
4. **boot**: the test guest booted with qemu (TCG, ``testkit.guest.boot``) from a fresh local raw copy,
   and from a fresh recovery session (``vmrecover recover start``) over ``nfs://127.0.0.1/vmrecover/
   recover/<session>/guest.raw`` (qemu's libnfs driver, which asks the portmapper: the server runs with
   ``--portmapper``); same qemu command line, caches dropped and a fresh server before every boot;
   The same boot over ``nfs://`` from Ganesha, serving a fresh plain copy of the guest's disk from a
   second, writable export (the peer: what NFS and qemu's libnfs driver cost against a local file,
   before any backup is read);
5. **server peak RSS**: VmHWM (/proc/PID/status) of every ``nfs serve`` process just before it is
   stopped; the largest is reported (Ganesha's for comparison).

Targets (from the issue): vmrecover's nfs-cat rate >= 50% of Ganesha's, boot over nfs:// <= 1.3x the
local boot.  Port 111 belongs to the whole machine: while rpcbind or a ``--portmapper`` server of ours
runs, this script holds an exclusive flock on /run/lock/vmrecover-port111.lock (as the test suite does)
and waits for the port to be free.  Every server is stopped at the end, also on errors, Ctrl-C or
SIGTERM.  MB means 10^6 bytes.  This is a measurement, not a test: the exit code is 0 whether or not the
targets are met (1 only when the set-up fails).  Run it as root, from the repository root::

    .venv/bin/python bench/nfs_bench.py                    # 2 GiB image, 3 rounds of everything
    .venv/bin/python bench/nfs_bench.py --size 256M --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/nfs_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    NFS_EXPORT,
    BenchError,
    Context,
    NfsServer,
    Prepared,
    arg_parser,
    bench_main,
    boot_checked,
    boot_local_copy,
    build_guest_disk,
    cold_text,
    decode_limit,
    dpkg_version,
    environment,
    error_text,
    fmt,
    human,
    image_line,
    log,
    mb,
    median,
    nfs_serve,
    parse_args,
    prepare_backups,
    print_host,
    print_results,
    proc_cpu_s,
    proc_status,
    ratio,
    recovery_session,
    stop_process,
    summary,
    tail,
    tool_version,
    verdict,
)
from vmrecover.errors import VmrecoverError
from vmrecover.recovery import qemu_boot

MiB = 2**20

# Acceptance targets.
SEQ_RATIO_MIN = 1.0  # vmrecover nfs-cat rate / Ganesha's, cold
WARM_RATIO_MIN = 0.6  # the same, both servers' data in the page cache
WARM_LIMIT_MIN = 0.85  # vmrecover's warm rate / this machine's decode-and-verify limit
BOOT_RATIO_MAX = 1.05  # boot over nfs:// from a recovery session / boot from a local raw copy

PORT111_LOCK = Path("/run/lock/vmrecover-port111.lock")  # the test suite's (tests/conftest.py)
PORT111_WAIT_S = 900.0  # how long to wait for port 111 before giving up
START_TIMEOUT_S = 60.0  # a server not ready after this long has failed (Ganesha, rpcbind)
HANG_TIMEOUT_S = 300.0
RPCBIND_STATE = (Path("/run/rpcbind/rpcbind.xdr"), Path("/run/rpcbind/portmap.xdr"))  # written on exit
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

GANESHA_CONF = """\
# Written by bench/nfs_bench.py: NFSv3 over TCP only, on loopback: the plain image read-only, and a
# writable folder for the guest's boots.
NFS_CORE_PARAM {{
    Bind_addr = 127.0.0.1;
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    Protocols = 3;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFS_KRB5 {{
    Active_krb5 = false;
}}
NFSV4 {{
    Graceless = true;
    RecoveryRoot = {workdir}/ganesha-recovery;
}}
LOG {{
    Default_Log_Level = EVENT;
}}
EXPORT {{
    Export_Id = 1;
    Path = {path};
    Pseudo = /ganesha;
    Protocols = 3;
    Transports = TCP;
    Access_Type = RO;
    Squash = No_Root_Squash;
    FSAL {{
        Name = VFS;
    }}
}}
EXPORT {{
    Export_Id = 2;
    Path = {boot_path};
    Pseudo = /ganesha-boot;
    Protocols = 3;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    FSAL {{
        Name = VFS;
    }}
}}
"""


# --- results ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One timed run (an nfs-cat or a boot) of one tool."""

    kind: str  # "read", "warm read" or "boot"
    tool: str
    round: int
    seconds: float | None = None
    bytes: int = 0
    server_cpu_s: float | None = None  # the NFS server's CPU time during the run
    client_cpu_s: float | None = None  # nfs-cat's (reads only)
    sha_ok: bool | None = None
    server_hwm: int | None = None  # VmHWM of the server just before it was stopped (bytes)
    error: str | None = None


@dataclass
class Row:
    metric: str
    vmrecover: str
    other: str = "-"  # Ganesha for the read rows, the local raw copy for the boot rows
    ratio: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("metric", "vmrecover", "ganesha/local", "ratio", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.vmrecover, self.other, self.ratio, self.target, self.result]


# --- servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a listener could bind *port* on every address now (as rpcbind and trio do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def port_holder(port: int) -> str:
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


@contextlib.contextmanager
def port111(ctx: Context) -> Iterator[None]:
    """Hold the machine's port-111 lock, and wait until nobody listens on port 111."""
    fd = os.open(PORT111_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + PORT111_WAIT_S
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    log(f"  waiting for {PORT111_LOCK} (another test run or benchmark uses port 111)")
                    told = True
                if time.monotonic() > deadline:
                    raise BenchError(f"{PORT111_LOCK} still locked after {PORT111_WAIT_S:g} s") from None
                time.sleep(0.5)
        told = False
        while not port_free(111):
            if not told:
                log(f"  port 111 is in use (not by a lock holder): waiting; {port_holder(111)}")
                ctx.notes.append(f"port 111 was taken by a process that does not hold {PORT111_LOCK}")
                told = True
            if time.monotonic() > deadline:
                raise BenchError(f"port 111 still in use after {PORT111_WAIT_S:g} s: {port_holder(111)}")
            time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # releases the flock


def wait_listening(proc: subprocess.Popen[bytes], port: int, what: str, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {tail(log_file)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"{what} is not listening on port {port} after {START_TIMEOUT_S:g} s")
        time.sleep(0.1)


@contextlib.contextmanager
def ganesha_server(ctx: Context, s: Setup) -> Iterator[NfsServer]:
    """rpcbind and a fresh ``ganesha.nfsd -F`` exporting the plain image's folder (and the writable
    boot folder); both stopped afterwards."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(port111(ctx))
        base = ctx.log_base("ganesha")
        state_before = {p for p in RPCBIND_STATE if p.exists()}

        def forget_rpcbind_state() -> None:  # rpcbind writes its registrations there when it stops
            for p in RPCBIND_STATE:
                if p not in state_before:
                    with contextlib.suppress(OSError):
                        p.unlink()

        stack.callback(forget_rpcbind_state)
        rpc_log = Path(f"{base}-rpcbind.log")
        with open(rpc_log, "wb") as f:
            rpcbind = subprocess.Popen(
                ["rpcbind", "-f"], stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        stack.callback(stop_process, rpcbind, "rpcbind", ctx.notes)
        wait_listening(rpcbind, 111, "rpcbind", rpc_log)

        nfs_port, mount_port = free_port(), free_port()
        while mount_port == nfs_port:
            mount_port = free_port()
        conf = ctx.workdir / "ganesha.conf"
        conf.write_text(
            GANESHA_CONF.format(
                nfs_port=nfs_port,
                mount_port=mount_port,
                workdir=ctx.workdir,
                path=s.export_dir,
                boot_path=s.boot_dir,
            )
        )
        glog = Path(f"{base}.log")
        with open(Path(f"{base}.out"), "wb") as f:
            proc = subprocess.Popen(
                ["ganesha.nfsd", "-F", "-f", conf, "-L", glog, "-p", ctx.workdir / "ganesha.pid"],
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        stack.callback(stop_process, proc, "ganesha.nfsd", ctx.notes)
        wait_listening(proc, nfs_port, "ganesha.nfsd", glog)
        wait_listening(proc, mount_port, "ganesha.nfsd", glog)
        yield NfsServer("ganesha", proc, nfs_port, mount_port, str(s.export_dir), glog)


# --- measurements ----------------------------------------------------------------------------------


@dataclass
class Setup(Prepared):
    export_dir: Path = Path()  # holds the image: what Ganesha exports
    boot_dir: Path = Path()  # Ganesha's writable export: a fresh copy of the guest's disk per boot
    decode_s: list[float] = field(default_factory=list)  # decode_limit's seconds, one per round


def prepare(ctx: Context) -> Setup:
    export_dir = ctx.workdir / "plain"
    export_dir.mkdir()
    boot_dir = ctx.workdir / "ganesha-boot"
    boot_dir.mkdir()
    p = prepare_backups(ctx, export_dir / "disk.raw", ctx.args.size, guest=not ctx.args.no_boot)
    return Setup(**vars(p), export_dir=export_dir, boot_dir=boot_dir)


@contextlib.contextmanager
def vmrecover_server(ctx: Context, *, portmapper: bool = False) -> Iterator[NfsServer]:
    """A fresh ``vmrecover nfs serve`` (an empty chunk cache); with *portmapper*, port 111's lock held."""
    with (
        port111(ctx) if portmapper else contextlib.nullcontext(),
        nfs_serve(ctx, cache_size=ctx.args.cache_size, portmapper=portmapper) as server,
    ):
        yield server


def nfs_cat(url: str, timeout: float) -> tuple[float, int, str, float]:
    """``nfs-cat URL`` piped into sha256 here: (seconds, bytes, hex digest, nfs-cat's CPU seconds).

    The time runs from the start of nfs-cat to its exit (mount, reads, unmount).  A run still going
    after *timeout* seconds is killed (nfs-cat is ours) and reported as hung."""
    h = hashlib.sha256()
    view = memoryview(bytearray(MiB))
    total = 0
    hung = threading.Event()
    with tempfile.TemporaryFile() as errf:
        start = time.perf_counter()
        proc = subprocess.Popen(["nfs-cat", url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errf, bufsize=0)  # fmt: skip
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        with contextlib.suppress(OSError):  # fewer, larger reads from the pipe (up to pipe-max-size)
            fcntl.fcntl(fd, F_SETPIPE_SZ, MiB)

        def kill() -> None:
            hung.set()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            while n := os.readv(fd, [view]):
                h.update(view[:n])
                total += n
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            if proc.returncode is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    if hung.is_set():
        raise BenchError(f"nfs-cat {url} hung: killed after {timeout:g} s ({total} bytes read)")
    if proc.returncode != 0:
        raise BenchError(f"nfs-cat {url} exited with {proc.returncode}: {err.strip()[-1000:]}")
    return seconds, total, h.hexdigest(), usage.ru_utime + usage.ru_stime


def attempt(ctx: Context, run: Run, fn: Callable[[], None]) -> Run:
    """Run *fn*; a failure is recorded in *run* (and fails its target), not raised."""
    try:
        fn()
    except (BenchError, OSError, VmrecoverError, subprocess.SubprocessError) as exc:
        msg = error_text(exc)
        run.error = msg.splitlines()[0] if msg else type(exc).__name__
        log(f"  {run.tool} {run.kind} {run.round} failed: {msg}")
        ctx.notes.append(f"{run.tool} {run.kind} {run.round} failed: {msg[:1000]}")
    return run


def measure_read(ctx: Context, s: Setup, tool: str, rnd: int, runs: list[Run]) -> None:
    size = ctx.args.size
    timeout = max(HANG_TIMEOUT_S, size / 5e6)  # 5 MB/s at least
    cold, warm = Run("read", tool, rnd), Run("warm read", tool, rnd)
    runs += [cold, warm]

    def timed(server: NfsServer, r: Run, path: str) -> None:
        name = f"{tool} {r.kind} {rnd}"
        with ctx.phase(name, server.pid):
            cpu0 = proc_cpu_s(server.pid)
            seconds, n, digest, client_cpu = nfs_cat(server.url(path), timeout)
            r.server_cpu_s = proc_cpu_s(server.pid) - cpu0
        r.seconds, r.bytes, r.client_cpu_s = seconds, n, client_cpu
        r.sha_ok = digest == s.image_sha256 and n == size
        log(
            f"  {name}: {mb(n) / seconds:.0f} MB/s ({seconds:.2f} s; server CPU {r.server_cpu_s:.2f} s, "
            f"nfs-cat CPU {client_cpu:.2f} s){'' if r.sha_ok else f', WRONG DATA: {n} bytes, {digest}'}"
        )

    def one() -> None:
        if tool == "vmrecover":
            server_cm = vmrecover_server(ctx)
            path = f"vms/bench/{s.point}/{s.disk}.raw"
        else:
            server_cm = ganesha_server(ctx, s)
            path = s.image.name
        with server_cm as server:
            ctx.run(["nfs-ls", server.url(str(Path(path).parent))], f"{tool}-nfs-ls", timeout=120)
            ctx.cold()
            timed(server, cold, path)
            attempt(ctx, warm, lambda: timed(server, warm, path))  # no cache dropped: for information
            cold.server_hwm = proc_status(server.pid, "VmHWM")

    attempt(ctx, cold, one)


def measure_boot(ctx: Context, s: Setup, tool: str, rnd: int, runs: list[Run]) -> None:
    run = Run("boot", tool, rnd)
    runs.append(run)

    def local() -> None:
        run.seconds = boot_local_copy(ctx, rnd)

    def boot_over(server: NfsServer, url: str) -> None:
        """The timed boot from *url* (qemu's nfs:// driver asks the portmapper for the ports)."""
        ctx.cold()
        with ctx.phase(f"{tool} boot {rnd}", server.pid):
            cpu0 = proc_cpu_s(server.pid)
            res = boot_checked(
                f"boot over nfs:// from {tool}", disk=None, drive_args=qemu_boot.drive(url),
                serial_log=ctx.logs / f"boot-nfs-{tool}-{rnd}.serial", timeout=ctx.args.boot_timeout,
            )  # fmt: skip
            run.server_cpu_s = proc_cpu_s(server.pid) - cpu0
        run.seconds = res.seconds
        run.server_hwm = proc_status(server.pid, "VmHWM")
        log(f"  {tool}, {url}: {res.seconds:.2f} s (server CPU {run.server_cpu_s:.2f} s)")

    def over_vmrecover() -> None:
        with (
            recovery_session(ctx, f"guest@{s.guest_point}", f"nfs-bench-{rnd}") as name,
            vmrecover_server(ctx, portmapper=True) as server,
        ):
            boot_over(server, f"nfs://127.0.0.1{NFS_EXPORT}/recover/{name}/{s.guest_disk}.raw")

    def over_ganesha() -> None:
        disk = build_guest_disk(s.boot_dir / f"guest-{rnd}.raw", cache_dir=ctx.workdir / "guest-cache")
        try:
            with ganesha_server(ctx, s) as server:
                boot_over(server, f"nfs://127.0.0.1{s.boot_dir}/{disk.name}")
        finally:
            if not ctx.args.keep:
                disk.unlink(missing_ok=True)

    attempt(ctx, run, {"local": local, "vmrecover": over_vmrecover, "ganesha": over_ganesha}[tool])


# --- the report ------------------------------------------------------------------------------------


def make_rows(ctx: Context, s: Setup, runs: list[Run]) -> list[Row]:
    size = ctx.args.size
    n = ctx.args.runs
    of = f"median of {n}" if n > 1 else "1 run"
    rows: list[Row] = []

    def of_kind(kind: str, tool: str) -> list[Run]:
        return [r for r in runs if r.kind == kind and r.tool == tool]

    def failed(kind: str, tool: str) -> bool:
        return any(r.error for r in of_kind(kind, tool))

    def values(kind: str, tool: str, get: Callable[[Run], float | None]) -> float | None:
        return median([v for r in of_kind(kind, tool) if r.seconds is not None and (v := get(r)) is not None])

    def row(
        metric: str, vm: float | None, other: float | None, spec: str = ".2f", *, show_ratio: bool = True,
        target: str = "-", ok: Callable[[float], bool] | None = None, fail: bool = False,
        shown_ratio: float | None = None,
    ) -> None:  # fmt: skip
        q = (shown_ratio if shown_ratio is not None else ratio(vm, other)) if show_ratio else None
        result = "info"
        if ok is not None:
            result = "FAIL" if fail else verdict(None if q is None else ok(q))
        shown = fmt(q, ".2f", "x") if show_ratio else "-"
        vals = {"vmrecover": vm, "other": other, "ratio": q}
        rows.append(Row(metric, fmt(vm, spec), fmt(other, spec), shown, target, result, vals))

    def rate(r: Run) -> float | None:
        return ratio(mb(r.bytes), r.seconds)

    other = "ganesha"
    by_round = {(r.tool, r.round): rate(r) for r in runs if r.kind == "read" and r.seconds is not None}
    pairs = [
        q for rnd in range(1, n + 1)
        if (q := ratio(by_round.get(("vmrecover", rnd)), by_round.get((other, rnd)))) is not None
    ]  # fmt: skip
    paired = median(pairs)
    row(
        f"nfs-cat of the disk, cold (MB/s over {human(size)}; {of}); ratio: median of each round's pair "
        f"({', '.join(fmt(q, '.2f', 'x') for q in pairs)})",
        values("read", "vmrecover", rate), values("read", other, rate), ".0f",
        target=f">= {SEQ_RATIO_MIN:g}x", ok=lambda q: paired is not None and paired >= SEQ_RATIO_MIN,
        fail=failed("read", "vmrecover"), shown_ratio=paired,
    )  # fmt: skip
    row("nfs-cat time, cold (s)", values("read", "vmrecover", lambda r: r.seconds),
        values("read", other, lambda r: r.seconds))  # fmt: skip
    row("server CPU during the cold nfs-cat (s)", values("read", "vmrecover", lambda r: r.server_cpu_s),
        values("read", other, lambda r: r.server_cpu_s))  # fmt: skip
    row("nfs-cat's own CPU, cold (s)", values("read", "vmrecover", lambda r: r.client_cpu_s),
        values("read", other, lambda r: r.client_cpu_s), show_ratio=False)  # fmt: skip
    warm = values("warm read", "vmrecover", rate)
    row(
        "nfs-cat again on the same server, caches warm (MB/s)",
        warm, values("warm read", other, rate), ".0f",
        target=f">= {WARM_RATIO_MIN:g}x", ok=lambda q: q >= WARM_RATIO_MIN,
        fail=failed("warm read", "vmrecover"),
    )  # fmt: skip
    limit = ratio(mb(size), median(s.decode_s))
    row(
        "decode-and-verify limit: every chunk of the disk decoded and proven on all CPUs, no I/O "
        f"(MB/s over the disk; {of}); vmrecover column: the warm nfs-cat",
        warm, limit, ".0f",
        target=f">= {WARM_LIMIT_MIN:g}x", ok=lambda q: q >= WARM_LIMIT_MIN,
        fail=failed("warm read", "vmrecover"),
    )  # fmt: skip
    row("server CPU during the warm nfs-cat (s)", values("warm read", "vmrecover", lambda r: r.server_cpu_s),
        values("warm read", other, lambda r: r.server_cpu_s))  # fmt: skip

    def sha(tool: str) -> tuple[str, bool | None]:
        done = [r for r in runs if r.kind != "boot" and r.tool == tool and r.sha_ok is not None]
        if not done:
            return "n/a", None
        ok = all(r.sha_ok for r in done)
        return f"{'yes' if ok else 'NO'} ({sum(bool(r.sha_ok) for r in done)}/{len(done)})", ok

    (vt, vok), (gt, gok) = sha("vmrecover"), sha(other)
    rows.append(
        Row(
            "nfs-cat output sha256 == image sha256 (runs equal/all)", vt, gt, "-", "equal",
            "FAIL" if failed("read", "vmrecover") else verdict(vok),
            {"vmrecover": vok, "other": gok, "image_sha256": s.image_sha256},
        )
    )  # fmt: skip

    if not ctx.args.no_boot:
        secs: Callable[[Run], float | None] = lambda r: r.seconds  # noqa: E731
        row(
            f"guest boot to power-off, cold, nfs:// vs local raw ({of}, s)",
            values("boot", "vmrecover", secs), values("boot", "local", secs),
            target=f"<= {BOOT_RATIO_MAX:g}x", ok=lambda q: q <= BOOT_RATIO_MAX,
            fail=failed("boot", "vmrecover"),
        )  # fmt: skip
        row(
            f"guest boot over nfs://: from a vmrecover session vs from Ganesha serving a plain copy "
            f"({of}, s)",
            values("boot", "vmrecover", secs), values("boot", other, secs),
        )  # fmt: skip
        row(
            f"guest boot over nfs:// from Ganesha (a plain copy) vs local raw ({of}, s); vmrecover "
            "column: Ganesha's",
            values("boot", other, secs), values("boot", "local", secs),
        )  # fmt: skip
        boot_cpu: Callable[[Run], float | None] = lambda r: r.server_cpu_s  # noqa: E731
        row("server CPU during the boot over nfs:// (s)", values("boot", "vmrecover", boot_cpu),
            values("boot", other, boot_cpu), show_ratio=False)  # fmt: skip

    def hwm(tool: str) -> tuple[float | None, int]:
        seen = [r.server_hwm for r in runs if r.tool == tool and r.server_hwm is not None]
        return (mb(max(seen)) if seen else None), len(seen)

    (vh, vn), (gh, _) = hwm("vmrecover"), hwm(other)
    row(
        f"server peak RSS, VmHWM (MB; max of {vn} servers; --cache-size {ctx.args.cache_size})", vh, gh,
        ".0f", show_ratio=False,
    )  # fmt: skip
    return rows


def report(ctx: Context, s: Setup, runs: list[Run]) -> dict[str, Any]:
    rows = make_rows(ctx, s, runs)
    env = environment(
        ctx,
        runs=ctx.args.runs,
        cache_size=ctx.args.cache_size,
        qemu=tool_version(["qemu-system-x86_64", "--version"]),
        ganesha=tool_version(["ganesha.nfsd", "-v"]),
        libnfs=dpkg_version("libnfs-utils"),
        nfs_ganesha_package=dpkg_version("nfs-ganesha"),
        rpcbind=dpkg_version("rpcbind"),
        no_boot=ctx.args.no_boot,
    )
    return {
        "environment": env,
        "image": s.image_doc(),
        "runs": [asdict(r) for r in runs],
        "phases": [asdict(p) for p in ctx.phases],
        "notes": ctx.notes,
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def print_report(doc: dict[str, Any]) -> None:
    env, img = doc["environment"], doc["image"]
    print(f"vmrecover NFS datastore benchmark  ({env['vmrecover']}; {env['ganesha']})")
    print_host(env)
    print(f"{image_line(img)}; Ganesha FSAL_VFS exports the plain image")
    print(
        f"page cache dropped and servers restarted before each timed run: {cold_text(env)}; "
        f"nfs serve --cache-size {env['cache_size']}; client nfs-cat (libnfs {env['libnfs']}), NFSv3/TCP"
    )
    print(f"qemu: {env['qemu']} (TCG); MB = 10^6 bytes")
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]])


# --- main ------------------------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, runs=3, serves="nfs serve")
    p.add_argument("--no-boot", action="store_true", help="skip the boot measurement")
    return parse_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)

    def body(ctx: Context) -> dict[str, Any]:
        runs: list[Run] = []
        setup = prepare(ctx)
        for rnd in range(1, args.runs + 1):  # the same order every round: see the docstring
            log(f"nfs-cat, cold then warm (round {rnd})")
            for tool in ("vmrecover", "ganesha"):
                measure_read(ctx, setup, tool, rnd, runs)
        for rnd in range(1, args.runs + 1):
            with ctx.phase(f"decode-and-verify limit {rnd}"):
                seconds, n = decode_limit(ctx, setup.point, setup.disk)
            setup.decode_s.append(seconds)
            log(f"  decode-and-verify limit: {mb(n) / seconds:.0f} MB/s of data ({seconds:.2f} s)")
        if not args.no_boot:
            for rnd in range(1, args.runs + 1):
                log(f"boot of the test guest, cold (round {rnd})")
                tools = ("local", "vmrecover", "ganesha")  # a different one first every round
                for tool in tools[rnd % 3 :] + tools[: rnd % 3]:
                    measure_boot(ctx, setup, tool, rnd, runs)
        return report(ctx, setup, runs)

    tools = {
        "nfs-cat": "libnfs-utils",
        "nfs-ls": "libnfs-utils",
        "ganesha.nfsd": "nfs-ganesha nfs-ganesha-vfs",
    }
    return bench_main(
        args, Context, body, print_report, prefix="vmrecover-nfs-bench-", free_needed=2 * args.size,
        tools={**tools, "rpcbind": "rpcbind", "ss": "iproute2"},
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
