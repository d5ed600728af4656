"""Garbage collection: mark every digest referenced by a catalogued point, sweep everything else.

Swept: chunk files no index references, temp files of killed writers, and index directories the
catalog does not know (a backup killed between renaming its indexes and committing).  gc holds the
writer lock (no backup runs, so no chunk is "in flight") and the readers lock exclusively (no
restore or verify is reading), which is why it needs no grace window.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from .repository import Repository


@dataclass
class GcReport:
    referenced_chunks: int = 0
    removed_chunks: int = 0
    removed_bytes: int = 0
    removed_temp_files: int = 0
    removed_index_dirs: int = 0
    removed_session_dirs: int = 0
    kept_bytes: int = 0


def gc(repo: Repository, *, dry_run: bool = False) -> GcReport:
    rep = GcReport()
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
    live_sessions = {s.id for s in repo.catalog.sessions()}
    for entry in (repo.root / "sessions").iterdir():  # left by a crash in recover start/stop
        if entry.is_dir() and entry.name not in live_sessions:
            rep.removed_session_dirs += 1
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
    for name, path, size in repo.chunks.walk():
        if repo.chunks.is_temp(name):
            rep.removed_temp_files += 1
        else:
            try:
                alive = bytes.fromhex(name) in live
            except ValueError:
                alive = False
            if alive:
                rep.kept_bytes += size
                continue
            rep.removed_chunks += 1
            rep.removed_bytes += size
        if not dry_run:
            os.unlink(path)
    return rep
