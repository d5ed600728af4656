#!/usr/bin/env python3
"""Web console benchmark: the dashboard of 200 VMs and 10,000 points, and a folder of 10,000 entries,
in a real browser against the same data from the API by a plain HTTPS client.

Targets (issue 15): "The dashboard with 200 VMs and 10,000 points renders in under 1 s (server time plus
page load, measured in the browser)" and "A folder of 10,000 entries opens in the browser in under 2 s
once the appliance for the point is up".  The peer in the same run: the data each page shows, fetched by
urllib3 from the API with a bearer token (``GET /api/v1/dashboard``, ``GET
/api/v1/vms/files/points/latest/files?path=/big``), request to last byte, over one keep-alive connection.

The data:

- **the dashboard's**: a fresh repository (``vmrecover init --chunk-size 64K``) with ONE real backup, a
  1 MiB random image of ``vm000``; the other points (``--points-per-vm`` 50 for each of ``--vms`` 200
  VMs ``vm000``..``vm199``, 10,000 in all with the real one) are **synthetic catalog rows** added with
  ``Catalog.add_point`` (the dashboard reads only the catalog): unique random ids, creation times spread
  over 50 days before the real point, each VM's first point and every 7th one ``full`` and the others
  ``incremental`` with the VM's previous point as parent (as a backup sets it), invented figures (bytes
  read, new, stored, ...), and the real point's disk rows, whose index file is hard-linked into each
  synthetic point's index folder, so every point reads back as the real image;
- **the folder's**: a real ext4 filesystem (``mkfs.ext4 -d``, no mount) holding ``/big/f00000.txt`` ..
  ``f09999.txt`` (``--entries``), backed up for real (``--vm files --format raw``) and opened through a
  real libguestfs appliance, started by a first listing through the API before anything is timed (its
  time is shown: minutes under TCG).

``vmrecover serve`` runs with its API on a free loopback port (the certificate it generates), a local
console user and a token, the FUSE datastore, no NFS, no job; it is ready when it says READY=1 on its
NOTIFY_SOCKET.  The browser is Debian's chromium, headless, driven by Selenium through its chromedriver,
signed in through the page's form.  Each browser run loads the page afresh (``/?r=N#/dashboard``: a new
query string is a full page load) and is timed inside the page from its navigation start
(``performance.timeOrigin``).  Nothing is injected into the page: once chromedriver says it has loaded,
the benchmark polls it every 10 ms (``execute_async_script``) until it shows the content (the
dashboard's jobs table and a VM count of 201; for the folder, its status line counting 10,000 entries
and the first rows drawn: the console's table of a folder is windowed, only the rows in sight and a
margin are in the page, the rest scrolled in as they come into sight), reads
``performance.now()`` in that poll, then waits for the next frame (``requestAnimationFrame`` then
``setTimeout 0``: style, layout and paint done).  That last time is "in the browser", judged against the
target.  It is an upper bound: a poll is late by up to its interval plus a chromedriver round trip (shown
as "poll resolution"), and a poll cannot run while the page's main thread is busy, so when building and
drawing the content takes long it usually runs only after the frame that drew it, and then waits for one
more frame (shown: "the frame after the poll that saw the content").  The lower bound, when that work
takes over 50 ms, is the end of the main thread's frame that built and drew the content, from the
browser's long animation frame entries, which also split it into JavaScript and rendering (style,
layout, paint).  The rest of the breakdown is the page's navigation and resource timing: HTML received,
DOMContentLoaded, load, and the API call as the page made it (request to first byte: the server
working; to last byte).  One warm-up run of each, then the median of ``--runs`` (each part's median on
its own: they need not add up).  CPU used meanwhile by processes other than the service (and what it
started) and the browser is reported, and warned about, as in the other benchmarks.

A measurement, not a test: exit 0 whether or not the targets are met, 1 only when the set-up fails::

    .venv/bin/python bench/console_bench.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (.venv/bin/python bench/console_bench.py): import from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SEED,
    BenchError,
    Context,
    MiB,
    arg_parser,
    bench_main,
    environment,
    log,
    median,
    parse_args,
    print_host,
    print_results,
    stop_process,
    summary,
    tail,
    verdict,
)
from tests.testkit import browser as browser_kit
from vmrecover.repo.catalog import Disk, Point
from vmrecover.repo.repository import Repository
from vmrecover.service import auth, tls

DASHBOARD_S_MAX = 1.0
FOLDER_S_MAX = 2.0
SPREAD_DAYS = 50  # the synthetic points' creation times span this many days
FULL_EVERY = 7  # every 7th point of a VM is a full backup, the others incremental
FOLDER_VM, FOLDER = "files", "/big"
USER = "bench"
READY_TIMEOUT_S = 120.0  # vmrecover serve says READY=1 within this
APPLIANCE_TIMEOUT_S = 600.0  # the first listing of a point starts its libguestfs appliance (TCG: slow)
PAGE_TIMEOUT_S = 120.0  # a page shows its content within this (else the run failed)
POLL_S = 0.01

# Run in the page by each poll (execute_async_script): the time of the poll; once the content is there,
# also the time of the next frame (rAF runs before that frame's style, layout and
# paint; a task queued from it runs after them).  An error page or the sign-in form ends the wait.
READY_JS = """
const [kind, want, done] = arguments;
const seen = performance.now();
const error = document.getElementById("page-error");
if (error) { done({error: error.textContent}); return; }
if (document.getElementById("sign-in")) { done({error: "the page shows the sign-in form"}); return; }
let ok;
if (kind === "dashboard") {
  const count = document.querySelector("#main .cards .stat b");
  ok = document.getElementById("dashboard-jobs") !== null && count !== null && count.textContent === want;
} else {
  // the table is windowed (console.js: windowed): the rows in sight are drawn, and the status line counts all
  const status = document.getElementById("files-status");
  ok = status !== null && status.textContent.startsWith(want + " entries") &&
    document.querySelectorAll("#entries tbody tr[data-name]").length >= Math.min(Number(want), 20);
}
if (!ok) { done({seen: seen}); return; }
requestAnimationFrame(() => setTimeout(() => done({seen: seen, painted: performance.now()}), 0));
"""

# The page's own timing of this load (execute_async_script; all times in ms since its navigation started):
# navigation milestones, the API call whose URL contains arguments[0], the JavaScript heap, and the long
# animation frames (main-thread frames over 50 ms: their scripts, and when their rendering -- style,
# layout, paint -- started), which the browser keeps for an observer that asks for them.
TIMING_JS = """
const [part, done] = arguments;
const nav = performance.getEntriesByType("navigation")[0];
const calls = performance.getEntriesByType("resource").filter((e) => e.name.includes(part));
const r = calls[calls.length - 1];
const doc = {
  html: nav.responseEnd, dom_content_loaded: nav.domContentLoadedEventEnd, load: nav.loadEventEnd,
  api_start: r ? r.startTime : null, api_request: r ? r.requestStart : null,
  api_first_byte: r ? r.responseStart : null, api_end: r ? r.responseEnd : null,
  api_transfer_bytes: r ? r.encodedBodySize : null, api_bytes: r ? r.decodedBodySize : null,
  heap: performance.memory ? performance.memory.usedJSHeapSize : null, frames: null,
};
if (!(PerformanceObserver.supportedEntryTypes || []).includes("long-animation-frame")) { done(doc); return; }
doc.frames = [];
const obs = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    doc.frames.push({start: e.startTime, end: e.startTime + e.duration, render: e.styleAndLayoutStart || null,
                     scripts: e.scripts.map((x) => ({start: x.startTime, duration: x.duration}))});
  }
});
obs.observe({type: "long-animation-frame", buffered: true});
setTimeout(() => { obs.disconnect(); done(doc); }, 100);  // (buffered entries come at once; none: no call)
"""


@dataclass
class Row:
    metric: str
    api: str = "-"
    browser: str = "-"
    target: str = "-"
    result: str = "info"
    values: dict[str, Any] = field(default_factory=dict)

    HEADER = ("measurement", "API only (urllib3)", "in the browser", "target", "result")

    def cells(self) -> list[str]:
        return [self.metric, self.api, self.browser, self.target, self.result]


# --- the data --------------------------------------------------------------------------------------


def synthetic_points(root: Path, real_id: str, vms: int, per_vm: int) -> int:
    """Add catalog rows so that *vms* VMs have *per_vm* points each, *real_id* (vm000's only point, a real
    backup) among them as vm000's newest; returns how many were added."""
    rng = random.Random(SEED)
    with Repository.open(root) as repo, repo.writer("console benchmark: synthetic points"):
        cat = repo.catalog
        # one commit per point, as backups do; not each one fsynced (WAL: durable at the checkpoint)
        cat.db.execute("PRAGMA synchronous=NORMAL")
        real = cat.point(real_id)
        if real is None:
            raise BenchError(f"point {real_id} is not in the catalog")
        disks = cat.disks(real_id)
        size = sum(d.size for d in disks)
        used = set(cat.point_ids())
        start = real.created_dt - timedelta(days=SPREAD_DAYS)
        step = timedelta(days=SPREAD_DAYS) / per_vm
        added = 0
        for v in range(vms):
            vm, parent = f"vm{v:03d}", None
            for k in range(per_vm - 1 if v == 0 else per_vm):  # vm000's last one is the real point
                pid = secrets.token_hex(6)
                while pid in used:
                    pid = secrets.token_hex(6)
                used.add(pid)
                created = start + k * step + step * v / vms + timedelta(seconds=rng.uniform(0, 60))
                full = k % FULL_EVERY == 0
                read = size if full else rng.randint(1, 64) * 64 * 1024
                new = int(read * rng.uniform(0.05, 0.6))
                stored = int(new * rng.uniform(0.3, 0.8))
                stats = {
                    "duration_s": round(rng.uniform(0.5, 30), 3), "bytes_read": read, "new_bytes": new,
                    "stored_bytes": stored, "new_chunks": new // (64 * 1024),
                    "files_read": {d.name: [d.source] for d in disks},
                }  # fmt: skip
                os.makedirs(repo.index_dir(pid), mode=0o700)
                for d in disks:
                    os.link(repo.index_path(real_id, d.name), repo.index_path(pid, d.name))
                point = Point(pid, vm, created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), parent,
                              "full" if full else "incremental", stats)  # fmt: skip
                cat.add_point(point, [Disk(pid, *(getattr(d, f) for f in _DISK_FIELDS)) for d in disks])
                parent = pid
                added += 1
        cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.sync()
    return added


_DISK_FIELDS = ("name", "position", "size", "chunk_size", "source", "source_format", "index_sha256",
                "change_token")  # fmt: skip


def folder_image(ctx: Context, path: Path, entries: int) -> Path:
    """An ext4 image (64 MiB) with *entries* small files in /big, built without mounting it."""
    tree = path.with_suffix(".tree")
    (tree / FOLDER.strip("/")).mkdir(parents=True)
    for i in range(entries):
        (tree / FOLDER.strip("/") / f"f{i:05d}.txt").write_text(f"file {i} of the console benchmark\n")
    ctx.run(["mkfs.ext4", "-q", "-F", "-d", tree, path, "64M"], "mkfs")
    shutil.rmtree(tree)
    return path


def service_config(repo: Path, mnt: Path, token: str, password: str) -> str:
    q = json.dumps  # a JSON string is a TOML basic string
    return (
        f'# Written by bench/console_bench.py\n[repository]\npath = {q(str(repo))}\ncache_size = "256M"\n\n'
        '[api]\nlisten = ["127.0.0.1:0"]\n\n'
        + auth.config_block("bench", "admin", auth.digest(token))
        + auth.user_block(USER, "admin", auth.hash_password(password))
        + f'\n[nfs]\nenabled = false\n\n[fuse]\nmountpoint = {q(str(mnt))}\n\n[notify]\nsyslog = "none"\n'
    )


# --- the service -----------------------------------------------------------------------------------


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    cert: Path
    log: Path


@contextlib.contextmanager
def serve(ctx: Context, config: Path) -> Iterator[Served]:
    """``vmrecover serve --config CONFIG``, ready when it says READY=1 on its NOTIFY_SOCKET; stopped with
    SIGTERM afterwards (SIGKILL after 60 s, noted)."""
    sock_path = ctx.workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.5)
    err = Path(f"{ctx.log_base('serve')}.log")
    # the file-restore service it starts keeps an idle appliance for an hour (default 5 min)
    env = {**ctx.env, "NOTIFY_SOCKET": str(sock_path), "VMRECOVER_FILES_IDLE": "3600"}
    argv = [str(ctx.args.vmrecover), "serve", "--config", str(config), "--log-level", "info"]
    try:
        with open(err, "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            said = ""
            while "READY=1" not in said.splitlines():
                if proc.poll() is not None:
                    raise BenchError(f"vmrecover serve exited with {proc.returncode}: {tail(err)}")
                if time.monotonic() > deadline:
                    raise BenchError(f"vmrecover serve not ready after {READY_TIMEOUT_S:g} s: {tail(err)}")
                with contextlib.suppress(TimeoutError):
                    said = notify.recv(4096).decode()
            record = json.loads((ctx.repo / "run" / "service.json").read_text())
            if record.get("pid") != proc.pid:
                raise BenchError(f"run/service.json is not this service's: {record}")
            [(_, port)] = record["api"]
            log(f"  vmrecover serve (pid {proc.pid}) ready: API on 127.0.0.1:{port}")
            yield Served(proc, int(port), tls.default_paths(config)[0], err)
        finally:
            stop_process(proc, "vmrecover serve", ctx.notes, 60)
            if proc.returncode not in (0, None):
                ctx.notes.append(f"vmrecover serve exited with {proc.returncode} (log: {err})")
    finally:
        notify.close()


class Api:
    """The API over verified HTTPS with the bearer token: one keep-alive connection."""

    def __init__(self, served: Served, token: str) -> None:
        import urllib3

        self.pool = urllib3.HTTPSConnectionPool(
            "127.0.0.1", served.port, ca_certs=str(served.cert), cert_reqs="CERT_REQUIRED", retries=False,
            timeout=urllib3.Timeout(connect=10, read=APPLIANCE_TIMEOUT_S), maxsize=1,
        )  # fmt: skip
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def get(self, path: str) -> tuple[float, bytes]:
        """Seconds from the request to the answer's last byte, and its body."""
        started = time.monotonic()
        r = self.pool.urlopen("GET", path, headers=self.headers, redirect=False)
        data = r.data
        took = time.monotonic() - started
        if r.status != 200:
            raise BenchError(f"GET {path}: HTTP {r.status}: {data[:500]!r}")
        return took, data

    def close(self) -> None:
        self.pool.close()


def files_stop(ctx: Context) -> None:
    try:
        ctx.vmr(["files", "stop"], "files-stop")
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        ctx.notes.append(f"vmrecover files stop failed: {exc}")


# --- the browser -----------------------------------------------------------------------------------


class Browser:
    """Headless chromium through chromedriver (as tests/test_console.py drives it)."""

    def __init__(self, logs: Path) -> None:
        extra = ("--enable-precise-memory-info",)
        self.driver = browser_kit.chromium(log=logs / "chromedriver.log", extra=extra, timeout=PAGE_TIMEOUT_S)
        self.pid = self.driver.service.process.pid  # chromedriver: chromium's parent

    def quit(self) -> None:
        self.driver.quit()

    def text(self) -> str:
        return browser_kit.page_text(self.driver, 1500)

    def wait(self, css: str, text: str | None = None, timeout: float = PAGE_TIMEOUT_S) -> Any:
        try:
            return browser_kit.wait_for(self.driver, css, text=text, timeout=timeout)
        except browser_kit.PageTimeout as exc:
            raise BenchError(str(exc)) from None

    def sign_in(self, base: str, password: str) -> None:
        self.driver.get(base + "/#/dashboard")
        self.wait("#user").send_keys(USER)
        self.wait("#password").send_keys(password)
        self.wait("#sign-in-button").click()
        self.wait("#who", text=f"{USER} (")

    def load(self, url: str, kind: str, want: str, api_part: str) -> dict[str, Any]:
        """Load *url* afresh and wait until it shows its content: the page's times (ms since its
        navigation started)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver.get(url)
        polls: list[float] = []

        def ready(driver: Any) -> Any:
            got = driver.execute_async_script(READY_JS, kind, want)
            polls.append(got.get("seen", 0.0))
            return got if "painted" in got or "error" in got else False

        try:
            got = WebDriverWait(self.driver, PAGE_TIMEOUT_S, poll_frequency=POLL_S).until(ready)
        except TimeoutException:
            raise BenchError(f"{url}: the content was not shown within {PAGE_TIMEOUT_S:g} s; the page says:\n"
                             f"{self.text()}") from None  # fmt: skip
        if "error" in got:
            raise BenchError(f"{url}: {got['error']}\n{self.text()}")
        timing = self.driver.execute_async_script(TIMING_JS, api_part)
        if timing["api_end"] is None:
            raise BenchError(f"{url}: the page's resource timing has no call to {api_part}")
        return {**got, **timing, "polls": len(polls), "first_poll": polls[0]}

    def round_trip_ms(self, n: int = 20) -> float:
        """Median milliseconds of one poll's execute_async_script round trip (the polls' resolution)."""
        times = []
        for _ in range(n):
            started = time.monotonic()
            self.driver.execute_async_script("arguments[arguments.length - 1](null);")
            times.append((time.monotonic() - started) * 1e3)
        m = median(times)
        assert m is not None
        return m


# --- CPU accounting --------------------------------------------------------------------------------


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds of the processes *roots* and all their descendants, with those of their children
    that have ended and been reaped (cutime/cstime)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo, seen = 0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += sum(int(v) for v in stats[pid][11:15])  # utime, stime, cutime, cstime
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


# --- the measurements ------------------------------------------------------------------------------


def api_runs(api: Api, path: str, runs: int, check: Any) -> tuple[list[float], int]:
    """One warm-up call, then *runs* timed ones (seconds each) and the answer's size."""
    _, data = api.get(path)
    check(json.loads(data))
    times = []
    for _ in range(runs):
        took, data = api.get(path)
        times.append(took)
    check(json.loads(data))
    return times, len(data)


def browser_runs(
    browser: Browser, urls: Iterator[str], runs: int, kind: str, want: str, api_part: str
) -> list[dict[str, Any]]:
    """One warm-up load, then *runs* timed ones."""
    out = []
    for i in range(runs + 1):
        url = next(urls)
        got = browser.load(url, kind, want, api_part)
        if i:
            out.append(got)
            call, first = (got["api_end"] - got["api_request"]) / 1e3, got["first_poll"] / 1e3
            log(f"  {kind} in the browser: shown {got['painted'] / 1e3:.3f} s after navigation start "
                f"(API call {call:.3f} s; {got['polls']} polls from {first:.3f} s)")  # fmt: skip
    return out


def ms_median(samples: list[dict[str, Any]], fn: Any) -> float:
    m = median([fn(s) for s in samples])
    assert m is not None
    return m / 1e3


def long_frames(sample: dict[str, Any]) -> tuple[float, float, float | None]:
    """The main thread's frames over 50 ms that ended after the API's answer (long animation frames):
    ms of scripts they ran after it, ms of rendering (style, layout, paint), and the end of the first one
    that ran a script (the console's code: the frame that built and drew the content), or None."""
    after = sample["api_end"]
    frames = [f for f in sample["frames"] or [] if f["end"] > after]
    script = sum(x["duration"] for f in frames for x in f["scripts"] if x["start"] >= after - 1)
    drawing = sum(f["end"] - f["render"] for f in frames if f["render"])
    drawn = next((f["end"] for f in frames if any(x["start"] >= after - 1 for x in f["scripts"])), None)
    return script, drawing, drawn


def page_rows(name: str, api_name: str, api_s: float, size: int, samples: list[dict[str, Any]]) -> list[Row]:
    """The breakdown of a page's load (medians of each part on its own: they need not add up)."""

    def med(fn: Any) -> float:
        return ms_median(samples, fn)

    nav = (med(lambda s: s["html"]), med(lambda s: s["dom_content_loaded"]), med(lambda s: s["load"]))
    call = med(lambda s: s["api_end"] - s["api_request"])
    server = med(lambda s: s["api_first_byte"] - s["api_request"])
    start = med(lambda s: s["api_start"])
    render = med(lambda s: s["painted"] - s["api_end"])
    paint = med(lambda s: s["painted"] - s["seen"])
    first = med(lambda s: s["first_poll"])
    frames = [long_frames(s) for s in samples]
    script, drawing = med(lambda s: long_frames(s)[0]), med(lambda s: long_frames(s)[1])
    drawn = median([f[2] for f in frames if f[2] is not None])
    no_loaf = samples[0]["frames"] is None
    at_first = sum(s["polls"] == 1 for s in samples)
    heap = median([s["heap"] for s in samples if s["heap"] is not None])
    transfer = samples[-1]["api_bytes"]
    rows = [
        Row(f"  {name}: page HTML / DOMContentLoaded / load (s)", browser=" / ".join(f"{v:.3f}" for v in nav),
            values={"html": nav[0], "dom_content_loaded": nav[1], "load": nav[2]}),
        Row(f"  {name}: {api_name} starts (s after navigation start)", browser=f"{start:.3f}",
            values={"browser": start}),
        Row(f"  {name}: {api_name}, request to first byte (s)", browser=f"{server:.3f}",
            values={"browser": server}),
        Row(f"  {name}: {api_name}, request to last byte (s)", f"{api_s:.3f}", f"{call:.3f}",
            values={"api": api_s, "browser": call}),
        Row(f"  {name}: from the API's last byte to painted (s)", browser=f"{render:.3f}",
            values={"browser": render}),
        Row(f"  {name}: main thread after the answer, frames > 50 ms: JavaScript / rendering (s)",
            browser="n/a" if no_loaf else f"{script:.3f} / {drawing:.3f}",
            values={"javascript": script, "rendering": drawing}),
        Row(f"  {name}: end of the frame > 50 ms that built and drew the content (s)",
            browser="n/a" if no_loaf else "none" if drawn is None else f"{drawn / 1e3:.3f}",
            values={"browser": None if drawn is None else drawn / 1e3}),
        Row(f"  {name}: of which the frame after the poll that saw the content (s)", browser=f"{paint:.3f}",
            values={"browser": paint}),
        Row(f"  {name}: first poll (s after navigation start), runs whose first poll saw the content",
            browser=f"{first:.3f}, {at_first} of {len(samples)}",
            values={"browser": first, "at_first": at_first}),
        Row(f"  {name}: answer size (MB)", f"{size / 1e6:.2f}",
            "-" if transfer is None else f"{transfer / 1e6:.2f}", values={"api": size, "browser": transfer}),
        Row(f"  {name}: page's JavaScript heap (MB)", browser="n/a" if heap is None else f"{heap / 1e6:.1f}",
            values={"browser": heap}),
    ]  # fmt: skip
    return rows


def measure(ctx: Context) -> dict[str, Any]:
    from selenium.common.exceptions import WebDriverException
    from urllib3.exceptions import HTTPError

    try:
        return _measure(ctx)
    except (WebDriverException, HTTPError, ValueError, KeyError) as exc:
        raise BenchError(f"{type(exc).__name__}: {exc}") from exc


def _measure(ctx: Context) -> dict[str, Any]:
    args, work = ctx.args, ctx.workdir
    vms, points = args.vms, args.vms * args.points_per_vm
    setup_started = time.monotonic()
    ctx.vmr(["init", "--chunk-size", "64K"], "init")
    small = work / "vm000.raw"
    small.write_bytes(random.Random(SEED).randbytes(MiB))
    real = ctx.vmr(["backup", "--vm", "vm000", small, "--format", "raw"], "backup-vm000")["point"]
    log(f"vm000@{real} backed up; adding {points - 1} synthetic points to the catalog")
    started = time.monotonic()
    added = synthetic_points(ctx.repo, real, vms, args.points_per_vm)
    catalog_s = time.monotonic() - started
    log(f"  {added} points added in {catalog_s:.1f} s")
    log(f"building an ext4 image with {args.entries} files in {FOLDER}")
    image = folder_image(ctx, work / "files.raw", args.entries)
    ctx.vmr(["backup", "--vm", FOLDER_VM, image, "--format", "raw"], "backup-files")
    total_vms, total_points = vms + 1, points + 1  # and the folder's VM
    token, password = auth.new_token(), secrets.token_urlsafe(18)
    mnt = work / "mnt"
    mnt.mkdir()
    config = work / "etc" / "vmrecover.toml"
    config.parent.mkdir()
    config.write_text(service_config(ctx.repo, mnt, token, password))
    setup_s = time.monotonic() - setup_started

    def dashboard_ok(doc: dict[str, Any]) -> None:
        if len(doc["vms"]) != total_vms or doc["points"] != total_points:
            raise BenchError(f"the dashboard shows {len(doc['vms'])} VMs, {doc['points']} points; "
                             f"expected {total_vms}, {total_points}")  # fmt: skip

    def folder_ok(doc: dict[str, Any]) -> None:
        if doc["count"] != args.entries or len(doc["entries"]) != args.entries:
            raise BenchError(f"{FOLDER} lists {doc['count']} ({len(doc['entries'])}) entries, "
                             f"expected {args.entries}")  # fmt: skip

    dashboard_path = "/api/v1/dashboard"
    folder_path = f"/api/v1/vms/{FOLDER_VM}/points/latest/files?path={urllib.parse.quote(FOLDER, safe='')}"
    with contextlib.ExitStack() as stack:
        stack.callback(files_stop, ctx)  # after the service has stopped (a stack: last in, first out)
        served = stack.enter_context(serve(ctx, config))
        api = Api(served, token)
        stack.callback(api.close)
        log(f"opening {FOLDER_VM}:{FOLDER} through the API (starts the point's libguestfs appliance)")
        appliance_s, data = api.get(folder_path)
        folder_ok(json.loads(data))
        log(f"  listed in {appliance_s:.1f} s")
        log("starting chromium")
        browser = Browser(ctx.logs)
        stack.callback(browser.quit)
        base = f"https://127.0.0.1:{served.port}"
        browser.sign_in(base, password)
        rtt_ms = browser.round_trip_ms()
        loads = itertools.count(1)  # ?r=N: every load a new URL, so a full page load
        measured = [served.proc.pid, *([browser.pid] if browser.pid else [])]

        log(f"dashboard: {args.runs} runs through the API")
        with ctx.phase("dashboard, API", cpu=lambda: tree_cpu_s(measured)):
            dash_api, dash_size = api_runs(api, dashboard_path, args.runs, dashboard_ok)
        log(f"dashboard: {args.runs} runs in the browser")
        with ctx.phase("dashboard, browser", cpu=lambda: tree_cpu_s(measured)):
            dash_web = browser_runs(browser, (f"{base}/?r={n}#/dashboard" for n in loads), args.runs,
                                    "dashboard", str(total_vms), dashboard_path)  # fmt: skip
        log(f"folder: {args.runs} runs through the API")
        with ctx.phase("folder, API", cpu=lambda: tree_cpu_s(measured)):
            folder_api, folder_size = api_runs(api, folder_path, args.runs, folder_ok)
        log(f"folder: {args.runs} runs in the browser")
        route = f"#/files/{FOLDER_VM}/latest?path={urllib.parse.quote(FOLDER, safe='')}"
        with ctx.phase("folder, browser", cpu=lambda: tree_cpu_s(measured)):
            folder_web = browser_runs(browser, (f"{base}/?r={n}{route}" for n in loads), args.runs,
                                      "folder", str(args.entries), "/files?path=")  # fmt: skip

    d_api, f_api = median(dash_api), median(folder_api)
    assert d_api is not None and f_api is not None
    d_web, f_web = ms_median(dash_web, lambda s: s["painted"]), ms_median(folder_web, lambda s: s["painted"])
    rows = [
        Row(f"dashboard, {total_vms} VMs, {total_points} points: navigation start to painted (s, median of "
            f"{args.runs})", f"{d_api:.3f}", f"{d_web:.3f}", f"< {DASHBOARD_S_MAX:g} s",
            verdict(d_web < DASHBOARD_S_MAX), {"api": d_api, "browser": d_web}),
        *page_rows("dashboard", "GET /dashboard", d_api, dash_size, dash_web),
        Row(f"folder of {args.entries} entries, appliance up: navigation start to painted (s, median of "
            f"{args.runs})", f"{f_api:.3f}", f"{f_web:.3f}", f"< {FOLDER_S_MAX:g} s",
            verdict(f_web < FOLDER_S_MAX), {"api": f_api, "browser": f_web}),
        *page_rows("folder", "GET .../files", f_api, folder_size, folder_web),
        Row("first listing of the folder's point: starts its appliance (s)", f"{appliance_s:.1f}",
            values={"api": appliance_s}),
        Row("poll resolution: one chromedriver round trip (ms), polls every 10 ms", browser=f"{rtt_ms:.1f}",
            values={"browser": rtt_ms}),
    ]  # fmt: skip
    env = environment(ctx, runs=args.runs, vms=total_vms, points=total_points, synthetic_points=added,
                      entries=args.entries, chromium=_chromium_version(browser))  # fmt: skip
    return {
        "environment": env,
        "setup_s": setup_s,
        "synthetic_catalog_s": catalog_s,
        "dashboard": {"api_s": dash_api, "browser": dash_web},
        "folder": {"api_s": folder_api, "browser": folder_web},
        "notes": ctx.notes,
        "phases": [asdict(p) for p in ctx.phases],
        "passed": all(r.result != "FAIL" for r in rows),
        "rows": [asdict(r) for r in rows],
        "summary": summary(rows),
    }


def _chromium_version(browser: Browser) -> str:
    caps = browser.driver.capabilities
    return f"{caps.get('browserName', 'chromium')} {caps.get('browserVersion', '?')}"


def print_report(doc: dict[str, Any]) -> None:
    env = doc["environment"]
    print(f"vmrecover web console benchmark  ({env['vmrecover']})")
    print_host(env)
    print(f"browser: {env['chromium']} (headless, Selenium); API peer: urllib3, one keep-alive connection")
    print(f"data: {env['vms']} VMs, {env['points']} points ({env['synthetic_points']} of them synthetic "
          f"catalog rows); a real ext4 folder of {env['entries']} files through libguestfs")  # fmt: skip
    print_results(doc, Row.HEADER, [Row(**r).cells() for r in doc["rows"]])


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    p = arg_parser(__doc__, runs=5, size=False)
    p.add_argument("--vms", type=int, default=200, help="VMs with synthetic points (default 200)")
    p.add_argument("--points-per-vm", type=int, default=50, help="points of each (default 50)")
    p.add_argument("--entries", type=int, default=10_000, help="files in the folder (default 10000)")
    args = parse_args(p, argv)
    if args.vms < 1 or args.points_per_vm < 1 or not 1 <= args.entries <= 100_000:
        p.error("--vms and --points-per-vm must be at least 1, --entries 1 to 100000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    tools = {
        "mkfs.ext4": "e2fsprogs",
        browser_kit.CHROMIUM: "chromium",
        browser_kit.CHROMEDRIVER: "chromium-driver",
    }
    return bench_main(args, Context, measure, print_report, prefix="vmrecover-console-bench-", memory_ok=True,
                      tools=tools)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
