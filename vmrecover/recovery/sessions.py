"""Recovery sessions: a restore point made writable, kept until stopped.

A session is a catalog row (name, id, point) plus ``sessions/<id>/``::

    session.json          who and what, for a human looking at the directory
    disks/<disk>.delta    the session's writes to each disk (see vfs/disk.py)
    upper/                files and folders a hypervisor created in recover/<name>/

Creation makes the directory first and commits the row last, holding ``locks/sessions`` shared so
that gc does not take the new folder for a leftover; stopping deletes the row first and the directory
after.  A crash in between leaves a directory no row names, which ``gc`` removes.  Sessions need no
running mount: the datastore shows them as soon as the row is committed.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, NotFound
from ..fsutil import write_file
from ..repo.catalog import Point, Session, check_name, now_iso
from ..repo.repository import Repository
from ..restore import RestoreResult, write_image
from ..vfs.cache import ChunkCache
from ..vfs.disk import BackupDisk, SessionDisk, create_delta

START_WAIT = 60.0  # seconds `recover start` waits for a gc sweeping session folders


@dataclass
class SessionInfo:
    name: str
    id: str
    vm: str
    point: str
    created: str
    path: str
    written: dict[str, int]  # disk -> bytes the session wrote
    published: dict[str, Any] | None = None  # where it runs on a hypervisor (recover start --to)


def start(repo: Repository, point: Point, name: str | None = None) -> Session:
    sid = secrets.token_hex(6)
    name = check_name("session", name or f"{point.vm}-{sid[:6]}")
    if any(s.name == name for s in repo.catalog.sessions()):
        raise BadInput(f"a recovery session named {name!r} exists", hint="choose another --name")
    disks = repo.catalog.disks(point.id)
    root = repo.session_dir(sid)
    # gc removes session folders without a catalog row; this one has none until the end
    with repo.session_folders("recover start", exclusive=False, wait=START_WAIT):
        try:
            (root / "disks").mkdir(parents=True, mode=0o700)
            (root / "upper").mkdir(mode=0o700)
            for d in disks:
                create_delta(root / "disks" / f"{d.name}.delta", d.size)
            meta = {"name": name, "id": sid, "vm": point.vm, "point": point.id,
                    "disks": [d.name for d in disks]}  # fmt: skip
            write_file(root / "session.json", json.dumps(meta, indent=2).encode(), what="session.json")
            session = Session(name, sid, point.id, now_iso())
            repo.catalog.add_session(session)
        except BaseException:
            if not _listed(repo, sid):  # an interrupt right after the COMMIT leaves a live session
                shutil.rmtree(root, ignore_errors=True)
            raise
    return session


def _listed(repo: Repository, sid: str) -> bool:
    """Does the catalog list the session?  When that cannot be read, yes (gc removes a folder no
    session names; a live session without its folder would be lost)."""
    try:
        return repo.catalog.has_session(sid)
    except Exception:
        return True


TARGET = "target.json"  # sessions/<id>/target.json: where the session runs on a hypervisor (not over NFS)


def target(repo: Repository, session: Session) -> dict[str, Any] | None:
    """What ``recover start --to`` did on a hypervisor for *session* (its platform module's record)."""
    try:
        doc: dict[str, Any] = json.loads((repo.session_dir(session.id) / TARGET).read_text())
        return doc
    except FileNotFoundError:
        return None


def set_target(repo: Repository, session: Session, doc: dict[str, Any] | None) -> None:
    path = repo.session_dir(session.id) / TARGET
    if doc is None:
        path.unlink(missing_ok=True)
    else:
        write_file(path, json.dumps(doc).encode(), what=TARGET)


def stop(repo: Repository, name: str) -> Session:
    session = repo.catalog.session(name)
    repo.catalog.delete_session(name)
    shutil.rmtree(repo.session_dir(session.id), ignore_errors=True)
    return session


def info(repo: Repository, session: Session) -> SessionInfo:
    point = repo.catalog.point(session.point)
    assert point is not None  # the foreign key keeps it
    written = {}
    for d in repo.catalog.disks(session.point):
        delta = repo.session_dir(session.id) / "disks" / f"{d.name}.delta"
        written[d.name] = SessionDisk.written_in(delta) if delta.exists() else 0
    return SessionInfo(
        session.name,
        session.id,
        point.vm,
        point.id,
        session.created,
        str(repo.session_dir(session.id)),
        written,
        target(repo, session),
    )


def _merged_chunks(disk: SessionDisk) -> Iterator[tuple[int, int, bytes | None]]:
    index = disk.base.index
    for i in range(index.count):
        off, length = index.extent(i)
        data = disk.read(off, length)
        yield i, off, None if data == bytes(length) else data


def migrate(
    repo: Repository,
    session: Session,
    disk_name: str | None,
    dest: Path,
    *,
    fmt: str = "qcow2",
    overwrite: bool = False,
    cache_size: int = 256 * 2**20,
    progress: Callable[[int], None] = lambda n: None,
    total: Callable[[int], None] = lambda n: None,
) -> RestoreResult:
    """Write the session's current disk (backup + delta) as a standalone image at *dest*.

    Safe while the session runs (reads only); a VM still writing gives a crash-consistent copy.
    """
    point = repo.catalog.point(session.point)
    assert point is not None
    disks = repo.catalog.disks(session.point)
    if disk_name is None and len(disks) != 1:
        raise BadInput(f"session {session.name} has {len(disks)} disks", hint="choose one with --disk NAME")
    disk = next((d for d in disks if disk_name in (None, d.name)), None)
    if disk is None:
        raise NotFound(
            f"session {session.name} has no disk {disk_name!r}", hint=f"disks: {[d.name for d in disks]}"
        )
    total(disk.size)
    cache = ChunkCache(repo.chunks, cache_size)
    try:
        base = BackupDisk(repo.read_index(point.id, disk.name), cache)
        sdisk = SessionDisk(base, repo.session_dir(session.id) / "disks" / f"{disk.name}.delta")
        try:
            what = f"session {session.name} disk {disk.name}"
            written = write_image(
                _merged_chunks(sdisk),
                base.index,
                dest,
                fmt=fmt,
                overwrite=overwrite,
                what=what,
                progress=progress,
            )
        finally:
            sdisk.close()
    finally:
        cache.close()
    return RestoreResult(point.vm, point.id, disk.name, str(dest), fmt, disk.size, written)
