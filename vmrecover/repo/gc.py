"""Garbage collection: mark every digest a listed restore point uses, sweep the rest, while datastores
serve (as Proxmox Backup Server's gc does: mark, then sweep only what is both unmarked and older than
the gc).

Swept: chunk files no listed point's index references and that were last written before this gc
started, temp files of killed writers, index directories the catalog does not know (a backup killed
between renaming its indexes and committing), and session folders no session names (a crash in
``recover start`` or ``recover stop``).

Why this is safe with readers running (mounts, the NFS export, restores, verifies, sessions):
- everything a listed point or a live session reads is marked; gc holds the writer lock, so no point is
  added or removed between the mark and the sweep (backups and prune wait or fail);
- a chunk written or rewritten after gc started is never swept (its mtime is newer than gc's start):
  the grace that a writer running beside gc would need;
- a reader of a point that prune removed before this gc loses that point's chunks: it reports "this
  restore point was pruned", never damage (see Repository.pruned);
- session folders are swept under the exclusive ``locks/sessions``, which ``recover start`` holds
  shared while it creates a folder before its catalog row exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass

from ..errors import LockedError
from .repository import Repository

log = logging.getLogger("vmrecover.gc")
SESSIONS_WAIT = 10.0  # seconds gc waits for session starts to finish before it leaves their folders


@dataclass
class GcReport:
    referenced_chunks: int = 0
    removed_chunks: int = 0
    removed_bytes: int = 0
    removed_temp_files: int = 0
    removed_index_dirs: int = 0
    removed_session_dirs: int = 0
    kept_bytes: int = 0
    kept_recent_chunks: int = 0  # unreferenced, but written after this gc started: the next gc's
    sessions_checked: bool = True  # False: session starts kept locks/sessions busy; their folders wait


def gc(repo: Repository, *, dry_run: bool = False) -> GcReport:
    """Caller holds the writer lock."""
    rep = GcReport()
    started_ns = time.time_ns()
    live: set[bytes] = set()
    known = set()
    for p in repo.catalog.points():
        known.add(p.id)
        for d in repo.catalog.disks(p.id):
            live |= repo.read_index(p.id, d.name).digests()
    rep.referenced_chunks = len(live)
    for entry in (repo.root / "indexes").iterdir():
        if entry.name not in known:
            rep.removed_index_dirs += 1
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
    _sweep_session_dirs(repo, rep, dry_run)
    for name, path, st in repo.chunks.walk():
        if not repo.chunks.is_temp(name):
            try:
                alive = bytes.fromhex(name) in live
            except ValueError:
                alive = False
            if alive:
                rep.kept_bytes += st.st_size
                continue
            if st.st_mtime_ns >= started_ns:
                rep.kept_recent_chunks += 1
                continue
            rep.removed_chunks += 1
            rep.removed_bytes += st.st_size
        else:
            rep.removed_temp_files += 1
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return rep


def _sweep_session_dirs(repo: Repository, rep: GcReport, dry_run: bool) -> None:
    try:
        with repo.session_folders("gc", exclusive=True, wait=SESSIONS_WAIT):
            live_sessions = {s.id for s in repo.catalog.sessions()}
            for entry in (repo.root / "sessions").iterdir():
                if entry.is_dir() and entry.name not in live_sessions:
                    rep.removed_session_dirs += 1
                    if not dry_run:
                        shutil.rmtree(entry, ignore_errors=True)
    except LockedError as exc:
        log.warning("leaving session folders for the next gc: %s", exc.message)
        rep.sessions_checked = False
