"""The backup pipeline: read chunks, hash, deduplicate, compress/encrypt and store them; then commit.

Threads: the calling thread reads the source sequentially (one reader keeps disks and qemu-nbd
streaming) and hands each chunk to a pool of ``workers`` threads that hash, look up and store it.
hashlib, zstd, AES-GCM and file writes release the GIL, so the pool uses every core.  At most
``2 * workers + 2`` chunks are in flight, which bounds memory whatever the disk size.

Commit protocol (crash-safe at any instant; see developer-notes/repository.md):
 1. chunks are written (temp + rename, no fsync each);
 2. indexes are written durably into ``indexes/<point>.tmp-…``, each with its piece tables (a read
    hint, repo/tables.py: made durable by step 3);
 3. ``syncfs`` makes every chunk durable;
 4. the index directory is renamed to ``indexes/<point>`` and ``indexes/`` fsynced;
 5. the catalog rows are committed in one transaction: only now does the point exist.
A crash before 5 leaves only garbage that ``gc`` removes.  A failed or interrupted run removes what it
wrote only if the catalog does not list its point: SIGTERM or ^C can arrive right after the COMMIT,
before this code learns that it succeeded, and the point is then kept, whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import faults
from ..errors import BadInput, IntegrityError
from ..fsutil import TMP_MARK, fsync_dir, syncfs
from ..repo.blob import ZERO_DIGEST, Identity
from ..repo.catalog import Disk, Point, check_name, now_iso
from ..repo.index import FixedIndex
from ..repo.repository import Repository
from ..repo.tables import PieceTables, TableWriter, record_size, tables_name
from .extents import Extents, check_within, chunks_touching
from .sources import DiskSource

log = logging.getLogger("vmrecover.backup")
Progress = Callable[[int], None]


@dataclass
class DiskStats:
    name: str
    size: int
    mode: str  # 'full' or 'incremental'
    bytes_read: int = 0
    zero_chunks: int = 0
    new_chunks: int = 0
    new_bytes: int = 0  # plaintext bytes of chunks that were not yet in the repository
    stored_bytes: int = 0  # bytes those chunks take on disk (compressed, with envelope)
    dedup_chunks: int = 0
    duration_s: float = 0.0  # reading and storing this disk (the point's own duration adds the commit)


@dataclass
class DiskJob:
    name: str
    source: DiskSource
    changed: Extents | None = None  # None: read every allocated extent
    change_token: str | None = None  # the platform's change-tracking state to store (VMware changeId)


@dataclass
class _Shared:
    repo: Repository
    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: set[bytes] = field(default_factory=set)  # digests stored (or being stored) by this run
    created: set[bytes] = field(default_factory=set)  # chunk files this run wrote: removed if it fails


def plan_chunks(
    job: DiskJob, parent: FixedIndex | None, chunk_size: int
) -> tuple[FixedIndex, list[int], str]:
    """The new index (pre-filled from the parent where inherited) and the chunk numbers to read."""
    size = job.source.size
    if job.changed is not None:
        check_within(job.name, job.changed, size)
    if parent is not None and job.changed is not None and parent.chunk_size == chunk_size:
        index = parent.resized(size)
        todo = set(chunks_touching(job.changed, chunk_size, index.count))
        # chunks beyond the parent's end, and its last (possibly partial) chunk if the disk grew
        if size != parent.disk_size:
            todo.update(range(max(0, min(parent.count, index.count) - 1), index.count))
        return index, sorted(todo), "incremental"
    index = FixedIndex.empty(size, chunk_size)
    return index, chunks_touching(job.source.data_extents(), chunk_size, index.count), "full"


def _store(
    shared: _Shared, stats: DiskStats, data: bytes | bytearray, before: tuple[bytes, bytes | None] | None
) -> tuple[bytes, bytes]:
    """Store one chunk (unless stored already); its digest and its file's head (b"": not known).
    *before*: the parent point's digest and head for this chunk number, if it has one."""
    repo = shared.repo
    ident = None
    if repo.config.legacy_chunks and repo.codec.version != 1:
        # an upgraded repository: data already stored as a v1 chunk is referenced as it is
        legacy = repo.codec.digest_v1(data)
        with shared.lock:
            known = legacy in shared.claimed
        if known or repo.chunks.has(legacy):
            ident = Identity(legacy)
    if ident is None:
        ident = repo.codec.identify(data)
    digest = ident.digest
    with shared.lock:
        fresh = digest not in shared.claimed
        shared.claimed.add(digest)
    stored, head = 0, b""
    if fresh and not repo.chunks.has(digest):
        try:
            stored, head = repo.chunks.put(ident, bytes(data))
        except BaseException:
            with shared.lock:
                shared.claimed.discard(digest)
            raise
    with shared.lock:
        if stored:
            shared.created.add(digest)
            stats.new_chunks += 1
            stats.new_bytes += len(data)
            stats.stored_bytes += stored
        else:
            stats.dedup_chunks += 1
    if not stored and ident.pieces:  # a dedup hit on a v2 chunk: the parent's record, else its file's
        head = before[1] if before is not None and before[0] == digest and before[1] else b""
        head = head or repo.chunks.read_head(digest)
    return digest, head


def backup_disk(
    shared: _Shared,
    pool: ThreadPoolExecutor,
    workers: int,
    job: DiskJob,
    plan: tuple[FixedIndex, list[int], str],
    progress: Progress,
    tables: TableWriter | None = None,
    parent: tuple[FixedIndex, PieceTables] | None = None,
) -> tuple[FixedIndex, DiskStats]:
    """Read and store the chunks *plan* names.  *tables* receives each chunk's head; *parent* (the
    same disk's index and tables in the VM's latest point) spares a dedup hit the read of its head
    when the chunk is where it was (a full backup of unchanged data)."""
    cs = shared.repo.config.chunk_size
    index, todo, mode = plan
    stats = DiskStats(job.name, job.source.size, mode)
    began = time.monotonic()
    zero = bytes(cs)
    pending: deque[tuple[int, Future[tuple[bytes, bytes]]]] = deque()
    limit = 2 * workers + 2

    def drain(keep: int) -> None:
        while len(pending) > keep:
            i, fut = pending.popleft()
            digest, head = fut.result()
            index.set(i, digest)
            if tables is not None:
                tables.set(i, head)

    try:
        for i in todo:
            off, length = index.extent(i)
            data = job.source.read(off, length)
            stats.bytes_read += length
            if data == (zero if length == cs else bytes(length)):
                index.set(i, ZERO_DIGEST)
                if tables is not None:
                    tables.set(i, b"")
                stats.zero_chunks += 1
            else:
                before = None
                if parent is not None and i < parent[0].count:
                    before = parent[0].digest(i), parent[1].head(i)
                pending.append((i, pool.submit(_store, shared, stats, data, before)))
                drain(limit)
            progress(length)
        drain(0)
        stats.duration_s = round(time.monotonic() - began, 3)
    finally:
        for _, fut in pending:
            fut.cancel()
        for _, fut in pending:
            with contextlib.suppress(BaseException):
                fut.result()
    return index, stats


class PointWriter:
    """One restore point of *vm* being written: disks are added one after the other, each stored as
    it is read, then the point is committed as one (steps 2-5 of the commit protocol above).  Closed
    without a commit (an error, a cut upload, SIGTERM), it leaves nothing: its index folder is removed
    and, as the sole writer, the chunks it created (see :meth:`close`).  The caller holds
    ``repo.backing_up(vm)`` for its whole life."""

    def __init__(self, repo: Repository, vm: str, *, workers: int | None = None) -> None:
        self.repo, self.vm = repo, check_name("VM", vm)
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.parent = repo.catalog.latest_point(vm)
        self._parent_disks = {d.name: d for d in repo.catalog.disks(self.parent.id)} if self.parent else {}
        self._parent_indexes: dict[str, FixedIndex] = {}  # read by plan(), kept until add() is done with it
        self.point_id = secrets.token_hex(6)
        self._tmpdir = repo.root / "indexes" / f"{self.point_id}{TMP_MARK}{os.getpid()}"
        self._final = repo.index_dir(self.point_id)
        self._started = time.monotonic()
        self._shared = _Shared(repo)
        self.disks: list[Disk] = []
        self.stats: list[DiskStats] = []
        self.files_read: dict[str, list[str]] = {}
        self.committed = False
        self._tmpdir.mkdir(mode=0o700)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="backup")

    def plan(self, job: DiskJob) -> tuple[FixedIndex, list[int], str]:
        """What *job* reads: a new index (pre-filled from the parent point where inherited) and the
        chunks to read."""
        name = check_name("disk", job.name)
        if name in self.files_read or any(d.name == name for d in self.disks):
            raise BadInput(f"two disks of this backup have the same name: {name}", hint="use --disk-name")
        parent = None
        if job.changed is not None and job.name in self._parent_disks:
            parent = self._parent_index(job.name)
        elif job.changed is not None:
            log.warning("disk %s of VM %s has no parent point: reading it whole", job.name, self.vm)
        return plan_chunks(job, parent, self.repo.config.chunk_size)

    def add(
        self, job: DiskJob, plan: tuple[FixedIndex, list[int], str] | None = None, *,
        progress: Progress = lambda n: None,
    ) -> DiskStats:  # fmt: skip
        """Read and store disk *job* (as *plan* says, else as :meth:`plan` says) into the point."""
        plan = plan or self.plan(job)
        tables = self._tables(job.name, plan)
        parent = self._parent_tables(job.name) if tables is not None else None
        try:
            index, stats = backup_disk(
                self._shared, self._pool, self.workers, job, plan, progress, tables, parent
            )
        finally:
            if tables is not None:
                tables.close()
        sha = index.write(self._tmpdir / f"{job.name}.fidx")
        src = job.source
        self.disks.append(Disk(self.point_id, job.name, len(self.disks), src.size, index.chunk_size, src.path,
                               src.format, sha, job.change_token))  # fmt: skip
        self.stats.append(stats)
        self.files_read[job.name] = list(src.files_read)
        return stats

    def _tables(self, name: str, plan: tuple[FixedIndex, list[int], str]) -> TableWriter | None:
        """The disk's piece tables (format 2 repositories), started from the parent's records when
        the new index starts from the parent's."""
        repo = self.repo
        if repo.codec.version == 1:
            return None
        index, _, mode = plan
        parent = repo.tables_path(self.parent.id, name) if mode == "incremental" and self.parent else None
        rec = record_size(index.chunk_size, repo.encrypted)
        return TableWriter(self._tmpdir / tables_name(name), index.count, rec, parent)

    def _parent_tables(self, name: str) -> tuple[FixedIndex, PieceTables] | None:
        """The same disk's index and piece tables in the VM's latest point, if both can be read."""
        if self.parent is None or name not in self._parent_disks:
            return None
        try:
            index = self._parent_index(name)
        except IntegrityError:
            return None
        finally:
            self._parent_indexes.pop(name, None)  # (a 2 TiB disk's is 64 MiB)
        tables = self.repo.read_tables(self.parent.id, name, index)
        return None if tables is None else (index, tables)

    def _parent_index(self, name: str) -> FixedIndex:
        """The same disk's index in the VM's latest point, read once for the plan and the tables."""
        assert self.parent is not None
        index = self._parent_indexes.get(name)
        if index is None:
            index = self._parent_indexes[name] = self.repo.read_index(self.parent.id, name)
        return index

    def commit(
        self, *, config: dict[str, Any] | None = None, precommit: Callable[[], None] = lambda: None
    ) -> Point:
        """Make the point exist (steps 3-5).  *precommit* may refuse (raise) once everything is durable:
        a source that can tell its data was not one moment's (a snapshot removed under it)."""
        if not self.disks:
            raise BadInput(f"the backup of {self.vm} has no disk", hint="add at least one disk")
        self._pool.shutdown(wait=True)
        syncfs(self.repo.root)
        os.rename(self._tmpdir, self._final)
        fsync_dir(self._final.parent)
        kind = "incremental" if all(s.mode == "incremental" for s in self.stats) else "full"
        stats_doc: dict[str, Any] = {
            "duration_s": round(time.monotonic() - self._started, 3),
            "bytes_read": sum(s.bytes_read for s in self.stats),
            "new_bytes": sum(s.new_bytes for s in self.stats),
            "stored_bytes": sum(s.stored_bytes for s in self.stats),
            "new_chunks": sum(s.new_chunks for s in self.stats),
            # every host file each disk was read from (an image's backing chain or extents included)
            "files_read": self.files_read,
        }
        point = Point(self.point_id, self.vm, now_iso(), self.parent.id if self.parent else None, kind,
                      stats_doc, config)  # fmt: skip
        precommit()
        faults.moment("backup.before-commit")
        self.repo.catalog.add_point(point, self.disks)
        self.committed = True
        log.info("backup committed vm=%s point=%s kind=%s %s", self.vm, self.point_id, kind, stats_doc)
        return point

    def close(self) -> None:
        """Without a commit: remove what was written (a point the catalog lists is kept whatever
        happened: SIGTERM may arrive right after the COMMIT)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if not self.committed and _listed(self.repo, self.point_id, self.vm):
            self.committed = True  # the interrupt came after the COMMIT: the point exists and keeps its data
        if self.committed:
            return
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self._final.exists():
            shutil.rmtree(self._final, ignore_errors=True)
        # The chunks this run created free the space a full disk needs back, but only while no other
        # backup runs: one may have found them and be about to commit a point that uses them.  Else
        # (and after a SIGKILL) gc removes them.
        created = self._shared.created
        if created and self.repo.sole_writer():
            for digest in created:
                with contextlib.suppress(OSError):
                    os.unlink(self.repo.chunks.path(digest))
        elif created:
            log.info(
                "%d chunks of the failed backup of %s stay for gc: other backups run", len(created), self.vm
            )

    def __enter__(self) -> PointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_backup(
    repo: Repository,
    vm: str,
    jobs: list[DiskJob],
    *,
    progress: Progress = lambda n: None,
    progress_total: Progress = lambda n: None,
    workers: int | None = None,
    config: dict[str, Any] | None = None,
    precommit: Callable[[], None] = lambda: None,
) -> tuple[Point, list[DiskStats]]:
    """Back up *jobs* as one new restore point of *vm*, with the VM's *config* (hypervisor backups);
    see :class:`PointWriter`.  Caller holds ``repo.backing_up(vm)``."""
    names = [check_name("disk", j.name) for j in jobs]
    if len(set(names)) != len(names):
        raise BadInput(f"two disks of this backup have the same name: {names}", hint="use --disk-name")
    with PointWriter(repo, vm, workers=workers) as w:
        plans = [w.plan(job) for job in jobs]
        progress_total(sum(index.extent(i)[1] for index, todo, _ in plans for i in todo))
        for job, plan in zip(jobs, plans, strict=True):
            w.add(job, plan, progress=progress)
        point = w.commit(config=config, precommit=precommit)
        return point, w.stats


def _listed(repo: Repository, point_id: str, vm: str) -> bool:
    """Does the catalog list the point?  When that cannot be read, say yes: what is kept by mistake
    is garbage gc removes, what is deleted by mistake is a restore point lost."""
    try:
        listed = repo.catalog.point(point_id) is not None
    except Exception:
        log.warning("cannot tell whether point %s of %s was committed: keeping its data", point_id, vm)
        return True
    if listed:
        log.warning("backup of %s was interrupted after its point %s was committed: kept", vm, point_id)
    return listed
