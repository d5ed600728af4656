"""What the service measures: the repository's usage (``GET /api/v1/repository``) and the Prometheus
metrics of ``/metrics`` (official ``prometheus_client``).

Most figures are read when asked, from what already keeps them (the catalog's points, the
scheduler's jobs and runs, the chunk cache's counters), so nothing has to be fed: a scrape gathers
:class:`Facts` (the API reads the catalog in a worker thread and the scheduler on the event loop) and
:func:`exposition` renders them through a registry of its own.  Walking ``chunks/`` for the stored size
is slow on a big repository, so :class:`ChunkUsage` keeps its result for a while.

What only the serving code sees is fed into module-level metrics, added to every exposition:

- ``nfs_calls``: the service's NFS server tells :func:`observe_nfs` of each call answered: calls by
  procedure (``_count``) and latency.
- ``api_requests``: requests answered by the API, by method and status (service/api.py counts them).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..repo.catalog import Point, parse_iso
from ..repo.chunkstore import ChunkStore
from ..repo.repository import Repository
from ..vfs.cache import ChunkCache

nfs_calls = Histogram(
    "vmrecover_nfs_call_seconds", "NFS calls answered, by procedure, and how long each took",
    ["procedure"], registry=None,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip


def observe_nfs(program: str, procedure: str, seconds: float) -> None:
    """The NFS server's *observe* (nfs_export/server.py): NFS procedures by their name (READ, GETATTR),
    MOUNT's and the portmapper's with their program's (mount3:MNT)."""
    name = procedure.upper() if program == "nfs3" else f"{program}:{procedure.upper()}"
    nfs_calls.labels(procedure=name).observe(seconds)


api_requests = Counter(
    "vmrecover_api_requests", "HTTP API requests answered, by method and status", ["method", "status"],
    registry=None,
)  # fmt: skip
JOB_STATES = ("idle", "queued", "running", "waiting")  # the scheduler's (core.JobScheduler.jobs)
CHUNK_USAGE_MAX_AGE = 300.0  # seconds a walk of chunks/ is reused


# ------------------------------------------------------------------------------------- repository usage
class ChunkUsage:
    """The stored chunks' count and bytes (a walk of ``chunks/``), remembered for *max_age* seconds;
    one walk at a time (callers meanwhile wait for its result).  Call from worker threads."""

    def __init__(self, max_age: float = CHUNK_USAGE_MAX_AGE) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._when = 0.0

    def get(self, chunks: ChunkStore, *, fresh: bool = False) -> dict[str, Any]:
        with self._lock:
            if fresh or self._value is None or time.monotonic() - self._when > self.max_age:
                started = time.monotonic()
                count = size = temp = 0
                for name, _path, st in chunks.walk():
                    if ChunkStore.is_temp(name):
                        temp += 1
                    else:
                        count += 1
                        size += st.st_size
                self._when = time.monotonic()
                self._value = {
                    "count": count, "bytes": size, "temporary_files": temp,
                    "measured": datetime.now().astimezone().isoformat(timespec="seconds"),
                    "walk_seconds": round(self._when - started, 3),
                }  # fmt: skip
            return dict(self._value)


def catalog_usage(repo: Repository) -> dict[str, Any]:
    """What the catalog says of the repository's contents (always current)."""
    cat = repo.catalog
    points = cat.points()
    disks = [d for p in points for d in cat.disks(p.id)]
    return {
        "vms": len(cat.vm_names()),
        "points": len(points),
        "sessions": len(cat.sessions()),
        "disks": len(disks),
        "virtual_bytes": sum(d.size for d in disks),  # all points' disks as a guest sees them
        "backups": {  # summed over the points kept
            k: sum(int(p.stats.get(k) or 0) for p in points)
            for k in ("bytes_read", "new_bytes", "stored_bytes")
        },
    }


def usage(repo: Repository, chunk_usage: ChunkUsage, *, fresh: bool = False) -> dict[str, Any]:
    """``GET /api/v1/repository``: the repository, its contents, its chunks and its filesystem."""
    cfg = repo.config
    fs = os.statvfs(repo.root)
    return {
        "path": str(repo.root),
        "id": cfg.id,
        "encrypted": repo.encrypted,
        "chunk_size": cfg.chunk_size,
        "compression": f"{cfg.compression},{cfg.compression_level}",
        **catalog_usage(repo),
        "chunks": chunk_usage.get(repo.chunks, fresh=fresh),
        "filesystem": {
            "size": fs.f_blocks * fs.f_frsize,
            "free": fs.f_bfree * fs.f_frsize,
            "available": fs.f_bavail * fs.f_frsize,  # to vmrecover's account
        },
    }


# ------------------------------------------------------------------------------------- metrics
@dataclass
class Facts:
    """What one scrape reports (gathered by the API, rendered by :func:`exposition`)."""

    uptime: float
    points: list[Point] = field(default_factory=list)
    sessions: int = 0
    usage: dict[str, Any] | None = None  # ChunkUsage.get()
    filesystem: os.statvfs_result | None = None
    cache: ChunkCache | None = None
    jobs: list[dict[str, Any]] | None = None  # JobScheduler.jobs(); None: no scheduler
    runs: list[dict[str, Any]] | None = None  # JobScheduler.history(), newest first


def gather(repo: Repository, chunk_usage: ChunkUsage, **known: Any) -> Facts:
    """The facts of the catalog, chunks and filesystem (blocking: a worker thread), with *known*
    (uptime, cache, jobs, runs) as the caller has them."""
    return Facts(
        points=repo.catalog.points(), sessions=len(repo.catalog.sessions()),
        usage=chunk_usage.get(repo.chunks), filesystem=os.statvfs(repo.root), **known,
    )  # fmt: skip


def _seconds(text: Any) -> float | None:
    """An ISO 8601 time (the catalog's, or any fromisoformat reads) as a Unix time; None if not one."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse_iso(text).timestamp()
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


HELP = {  # every metric the facts give, and what it means
    "vmrecover_build_info": "The running vmrecover's version",
    "vmrecover_uptime_seconds": "Seconds since the service started",
    "vmrecover_recovery_sessions": "Recovery sessions running",
    "vmrecover_restore_points": "Restore points kept, by VM",
    "vmrecover_backup_read_bytes": "Bytes the backups of the points kept read from their sources, by VM",
    "vmrecover_backup_stored_bytes": "Bytes the backups of the points kept added to the repository, by VM",
    "vmrecover_last_backup_timestamp_seconds": "When the latest restore point of each VM was taken",
    "vmrecover_last_backup_read_bytes": "Bytes the latest backup of each VM read",
    "vmrecover_last_backup_stored_bytes": "Bytes the latest backup of each VM stored",
    "vmrecover_last_backup_duration_seconds": "How long the latest backup of each VM took",
    "vmrecover_repository_chunks": "Chunk files stored (as of the last walk of chunks/, at most 5 min old)",
    "vmrecover_repository_chunk_bytes": "Bytes of the chunk files stored (as of the same walk)",
    "vmrecover_repository_filesystem_size_bytes": "Size of the repository's filesystem",
    "vmrecover_repository_filesystem_available_bytes": "Bytes of the repository's filesystem left to use",
    "vmrecover_chunk_cache_hits": "Chunk reads the shared chunk cache answered",
    "vmrecover_chunk_cache_misses": "Chunk reads that went to the repository",
    "vmrecover_chunk_cache_capacity_bytes": "The shared chunk cache's capacity",
    "vmrecover_chunk_cache_used_bytes": "Bytes of chunks in the shared chunk cache",
    "vmrecover_jobs": "Configured jobs by state",
    "vmrecover_job_last_run_duration_seconds": "How long each job's latest finished run took",
    "vmrecover_job_last_run_end_timestamp_seconds": "When each job's latest finished run ended",
    "vmrecover_job_last_run_failed": "1 if each job's latest finished run failed, else 0",
}
Rows = list[tuple[list[str], float]]


def _gauge(name: str, value: float | None = None, *, label: str = "", rows: Rows | None = None) -> Metric:
    g = GaugeMetricFamily(name, HELP[name], value=value, labels=[label] if label else None)
    for values, v in rows or []:
        g.add_metric(values, v)
    return g


def _counter(name: str, value: float) -> Metric:
    return CounterMetricFamily(name, HELP[name], value=value)


class _FactsCollector(Collector):
    def __init__(self, facts: Facts) -> None:
        self.facts = facts

    def collect(self) -> Iterator[Metric]:
        f = self.facts
        yield _gauge("vmrecover_build_info", label="version", rows=[([__version__], 1)])
        yield _gauge("vmrecover_uptime_seconds", f.uptime)
        yield _gauge("vmrecover_recovery_sessions", f.sessions)
        yield from self._backups()
        yield from self._repository()
        yield from self._cache()
        yield from self._jobs()

    def _backups(self) -> Iterator[Metric]:
        by_vm: dict[str, list[Point]] = {}
        for p in self.facts.points:
            by_vm.setdefault(p.vm, []).append(p)
        last = {vm: max(pts, key=lambda p: p.created) for vm, pts in by_vm.items()}

        def total(key: str) -> Rows:
            return [([vm], float(sum(int(p.stats.get(key) or 0) for p in pts))) for vm, pts in by_vm.items()]

        def latest(key: str) -> Rows:
            return [([vm], float(p.stats.get(key) or 0)) for vm, p in last.items()]

        yield _gauge("vmrecover_restore_points", label="vm", rows=[([vm], len(p)) for vm, p in by_vm.items()])
        yield _gauge("vmrecover_backup_read_bytes", label="vm", rows=total("bytes_read"))
        yield _gauge("vmrecover_backup_stored_bytes", label="vm", rows=total("stored_bytes"))
        when = [([vm], parse_iso(p.created).timestamp()) for vm, p in last.items()]
        yield _gauge("vmrecover_last_backup_timestamp_seconds", label="vm", rows=when)
        yield _gauge("vmrecover_last_backup_read_bytes", label="vm", rows=latest("bytes_read"))
        yield _gauge("vmrecover_last_backup_stored_bytes", label="vm", rows=latest("stored_bytes"))
        yield _gauge("vmrecover_last_backup_duration_seconds", label="vm", rows=latest("duration_s"))

    def _repository(self) -> Iterator[Metric]:
        u, fs = self.facts.usage, self.facts.filesystem
        if u is not None:
            yield _gauge("vmrecover_repository_chunks", u["count"])
            yield _gauge("vmrecover_repository_chunk_bytes", u["bytes"])
        if fs is not None:
            yield _gauge("vmrecover_repository_filesystem_size_bytes", fs.f_blocks * fs.f_frsize)
            yield _gauge("vmrecover_repository_filesystem_available_bytes", fs.f_bavail * fs.f_frsize)

    def _cache(self) -> Iterator[Metric]:
        c = self.facts.cache
        if c is None:
            return
        yield _counter("vmrecover_chunk_cache_hits", c.hits)
        yield _counter("vmrecover_chunk_cache_misses", c.misses)
        yield _gauge("vmrecover_chunk_cache_capacity_bytes", c.capacity)
        used = getattr(c, "_size", None)  # the cache keeps no public figure of its fill yet
        if isinstance(used, int):
            yield _gauge("vmrecover_chunk_cache_used_bytes", used)

    def _jobs(self) -> Iterator[Metric]:
        jobs, runs = self.facts.jobs, self.facts.runs
        if jobs is None:
            return
        states = Tally(str(j.get("state", "idle")) for j in jobs)
        rows: Rows = [([s], states.get(s, 0)) for s in sorted({*JOB_STATES, *states})]
        yield _gauge("vmrecover_jobs", label="state", rows=rows)
        finished: dict[str, dict[str, Any]] = {}
        for r in runs or []:  # newest first: the first finished run of each job is its latest
            if r.get("ended") and str(r.get("job")) not in finished:
                finished[str(r.get("job"))] = r
        durations: Rows = []
        ends: Rows = []
        for job, r in sorted(finished.items()):
            start, end = _seconds(r.get("started")), _seconds(r.get("ended"))
            if start is not None and end is not None:
                durations.append(([job], max(0.0, end - start)))
            if end is not None:
                ends.append(([job], end))
        failed: Rows = [([job], 1.0 if r.get("error") else 0.0) for job, r in sorted(finished.items())]
        yield _gauge("vmrecover_job_last_run_duration_seconds", label="job", rows=durations)
        yield _gauge("vmrecover_job_last_run_end_timestamp_seconds", label="job", rows=ends)
        yield _gauge("vmrecover_job_last_run_failed", label="job", rows=failed)


def exposition(facts: Facts) -> bytes:
    """The Prometheus text exposition of *facts* and of the module-level metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FactsCollector(facts))
    registry.register(nfs_calls)
    registry.register(api_requests)
    return generate_latest(registry)
