"""The datastore's namespace: the one model the FUSE adapter and the NFS export both serve.

::

    /                               root (inode 1)
    vms/<vm>/                       one folder per VM
    vms/<vm>/latest -> <point>      symlink to the newest restore point
    vms/<vm>/<point>/               one folder per restore point, named by its 12-hex id; never changes
        <disk>.raw  <disk>.vmdk  <disk>-flat.vmdk  <disk>.vhd      read-only views of each disk
        vm.json                     the point's metadata
    recover/<session>/              a recovery session: the same disk views, writable (copy-on-write
                                    over the backup), plus any file or folder a hypervisor creates
    recover/<session>/<SR uuid>/    once created (XenServer publishing): the disks again, as the
                                    NFS SR driver names them (vfs/srlayout.py)

**Inode numbers are structural**, so they are the same in every daemon run without any table:
the top 4 bits give the kind, the rest the object (a point's 48-bit id, a disk's position, a view
kind; a session's 48-bit id; for a file a hypervisor created, 20 bits of its session's id and the
40-bit inode number of the real file under ``sessions/<id>/upper/``).  NFS file handles (inode +
generation) therefore survive a restart, and a pruned point's numbers are never reused because point
ids are random.

Every method is synchronous and may block (catalog, index, chunk and delta I/O): front ends call them
from worker threads; only :meth:`read_cached` and :meth:`getattr_cached` are safe on an event loop
(a session's views answer there only while the catalog was looked at within the last 0.5 s, as a
worker would not look again either: a stopped session is noticed as soon).  Failures are ``OSError`` with
an errno the front end passes on; corrupt or missing chunks raise ``CorruptChunk``, which front ends
answer with EIO.  A restore point pruned while it is being read is ESTALE ("stale file handle"), not
damage: its files are gone, and gc may have freed its chunks.

**Memory is bounded** whatever the repository holds: the memos of points, disk indexes, views and
session files are LRU maps (vfs/lru.py) with the limits below, and new points, pruned points and
stopped sessions are noticed through the catalog's ``data_version`` (checked at most every 0.5 s).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from pathlib import Path

from ..beneath import Beneath, safe_mode
from ..errors import CorruptChunk, IntegrityError
from ..repo.catalog import Disk, Point, Session
from ..repo.repository import Repository
from . import srlayout
from .cache import ChunkCache
from .disk import BackupDisk, SessionDisk, View, ViewKind, view_name
from .lru import Lru

ROOT_INO = 1
VMS_INO = 2
RECOVER_INO = 3
KIND_SHIFT = 60
CATALOG_REFRESH_SECONDS = 0.5
POINTS_KEPT = 512  # points (and their disk lists) remembered
INDEX_BYTES_KEPT = 64 << 20  # disk indexes remembered, by the size of their digest tables
VIEWS_KEPT = 256  # disk views remembered (a view holds its disk's index: evicted with it)
UPPER_KEPT = 4096  # names of files hypervisors created, by inode


class Kind(IntEnum):
    FIXED = 0  # root, vms/, recover/
    VM = 1  # payload: 48-bit hash of the VM name
    POINT = 2  # point id
    LATEST = 3  # 48-bit hash of the VM name
    VMJSON = 4  # point id
    BVIEW = 5  # point id << 12 | disk position << 4 | view kind
    SESSION = 6  # session id
    SVIEW = 7  # session id << 12 | disk position << 4 | view kind
    UPPER = 8  # 20 bits of the session id << 40 | inode of the real file


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int  # st_mode: type and permission bits
    size: int
    mtime_ns: int
    nlink: int = 1
    ctime_ns: int = 0
    atime_ns: int = 0
    uid: int = 0
    gid: int = 0
    generation: int = 1
    immutable: bool = False  # never changes while it exists: front ends may cache it for long

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _ino(kind: Kind, payload: int) -> int:
    return (int(kind) << KIND_SHIFT) | payload


def _split(ino: int) -> tuple[Kind, int]:
    """(kind, payload) of an inode number; ENOENT for a number no object can have (a forged handle)."""
    try:
        return Kind(ino >> KIND_SHIFT), ino & (2**KIND_SHIFT - 1)
    except ValueError:
        raise _err(errno.ENOENT, f"inode {ino}") from None


FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long): the inode's generation (ext4, xfs, btrfs)


def _generation(upper: Beneath, rel: str) -> int:
    """The host filesystem's generation of a file a hypervisor created, so that an NFS handle of a
    deleted file never reaches a new file that reuses its inode number.  1 where the filesystem has
    none (tmpfs) or the object is neither a regular file nor a folder (a symlink)."""
    try:
        fd = upper.open_any(rel)
    except OSError:
        return 1
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)
        return struct.unpack("=q", buf)[0] & 0xFFFFFFFF or 1
    except OSError:
        return 1
    finally:
        os.close(fd)


def _hash48(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=6).digest(), "big")


def _ns(dt: datetime) -> int:
    return int(dt.timestamp() * 1e9)


def _times(st: os.stat_result, atime_ns: int | None, mtime_ns: int | None) -> tuple[int, int]:
    """The (atime, mtime) to set: the given ones, the current ones where None."""
    return (
        st.st_atime_ns if atime_ns is None else atime_ns,
        st.st_mtime_ns if mtime_ns is None else mtime_ns,
    )


def _err(code: int, what: str) -> OSError:
    return OSError(code, f"{os.strerror(code)}: {what}")


class Vfs:
    def __init__(self, repo: Repository, cache: ChunkCache) -> None:
        self.repo = repo
        self.cache = cache
        self.uid, self.gid = os.getuid(), os.getgid()
        self._lock = threading.RLock()  # guards the catalog connection, sessions and session disks
        self._points: Lru[str, tuple[Point, list[Disk]]] = Lru(POINTS_KEPT)
        self._views: Lru[int, View] = Lru(VIEWS_KEPT)
        self._backup_disks: Lru[tuple[str, str], BackupDisk] = Lru(
            POINTS_KEPT, budget=INDEX_BYTES_KEPT, weigh=lambda d: len(d.index.table),
            on_evict=lambda _, d: self._forget_views(d),
        )  # fmt: skip
        self._sessions: dict[str, Session] = {}  # by name: live sessions only
        self._session_disks: dict[tuple[str, str], SessionDisk] = {}  # of live sessions only
        self._catalog_seen = (-1, 0.0)  # (catalog data_version, monotonic time) of the last refresh
        self._upper: Lru[int, tuple[str, str]] = Lru(UPPER_KEPT)  # inode -> (session id, path in upper/)
        self._vm_hashes: dict[int, str] = {}  # VM inode payload -> name; renewed when the catalog moves
        self._listed: dict[str, str] | None = None  # point id -> VM at the last refresh
        self._pruned_log: deque[tuple[int, str, str]] = deque(maxlen=4096)  # (change number, VM, point id)
        self._changes = 0  # moves whenever a refresh finds points pruned
        self.started_ns = time.time_ns()
        self.root_ino = ROOT_INO
        self.fsid = int.from_bytes(hashlib.blake2b(repo.config.id.encode(), digest_size=8).digest(), "big")

    def close(self) -> None:
        with self._lock:
            for d in self._session_disks.values():
                d.close()
            self._session_disks.clear()
            self._views.clear()

    # ------------------------------------------------------------------ catalog (memoized)
    def _point(self, point_id: str) -> tuple[Point, list[Disk]]:
        self._refresh()
        got = self._points.get(point_id)
        if got is None:
            with self._lock:
                p = self.repo.catalog.point(point_id)
                if p is None:
                    raise _err(errno.ENOENT, f"restore point {point_id}")
                got = self._points.put(point_id, (p, self.repo.catalog.disks(point_id)))
        return got

    def _pruned(self, point_id: str) -> OSError:
        return _err(errno.ESTALE, f"restore point {point_id} was pruned while it was being read")

    def _vm_points(self, vm: str) -> list[Point]:
        with self._lock:
            return self.repo.catalog.points(vm)

    def _vm_names(self) -> list[str]:
        with self._lock:
            names = self.repo.catalog.vm_names()
            self._vm_hashes = {_hash48(n): n for n in names}
            return names

    def _vm_by_hash(self, h: int) -> str:
        self._refresh()
        name = self._vm_hashes.get(h)
        if name is None and h in {_hash48(n) for n in self._vm_names()}:  # new since the last look
            name = self._vm_hashes.get(h)
        if name is None:
            raise _err(errno.ENOENT, "VM")
        return name

    def sessions(self, *, force: bool = False) -> dict[str, Session]:
        """Live sessions by name; re-read from the catalog when another process changed it."""
        self._refresh(force=force)
        return self._sessions

    def _refresh(self, *, force: bool = False) -> None:
        """When another process changed the catalog: re-read sessions, forget pruned points."""
        with self._lock:
            version = self._catalog_seen[0]
            now = time.monotonic()
            if force or not self._fresh(now):
                dv = self.repo.catalog.data_version()
                if force or dv != version:
                    self._sessions = {s.name: s for s in self.repo.catalog.sessions()}
                    self._drop_stopped()
                    self._drop_pruned()
                    self._vm_hashes = {}
                self._catalog_seen = (dv, now)

    def _drop_pruned(self) -> None:
        listed, before = self.repo.catalog.point_ids(), self._listed
        self._listed = listed
        for pid, vm in (before or {}).items():
            if pid not in listed:
                self._changes += 1
                self._pruned_log.append((self._changes, vm, pid))
        for pid, _ in self._points.items():
            if pid not in listed:
                self._points.pop(pid)
        for key, disk in self._backup_disks.items():
            if key[0] not in self._points:
                self._backup_disks.pop(key)
                self._forget_views(disk)

    def changes(self) -> int:
        """A number that moves whenever restore points were pruned (checked at most every 0.5 s):
        front ends then drop what they kept of immutable objects (NFS attributes, kernel entries)."""
        self._refresh()
        return self._changes

    def pruned_since(self, change: int) -> list[tuple[int, int, str]]:
        """(inode of the VM folder, inode of the point folder, point id) of each point pruned after
        change number *change* (as far back as the last 4096)."""
        return [
            (_ino(Kind.VM, _hash48(vm)), _ino(Kind.POINT, int(pid, 16)), pid)
            for n, vm, pid in list(self._pruned_log)
            if n > change
        ]

    def _forget_views(self, disk: BackupDisk) -> None:
        """Views of a backup disk that is no longer remembered (evicted or pruned) go with it, so that
        no view keeps its index in memory."""
        for ino, v in self._views.items():
            if v.disk is disk:
                self._views.pop(ino)

    def _drop_stopped(self) -> None:
        live = {s.id for s in self._sessions.values()}
        for key in [k for k in self._session_disks if k[0] not in live]:
            self._session_disks.pop(key).close()
        for ino in self._views:
            if ino >> KIND_SHIFT == Kind.SVIEW and f"{(ino >> 12) & (2**48 - 1):012x}" not in live:
                self._views.pop(ino)

    def _session_by_id(self, sid: str) -> Session:
        for s in self.sessions().values():
            if s.id == sid:
                return s
        for s in self.sessions(force=True).values():
            if s.id == sid:
                return s
        raise _err(errno.ENOENT, f"recovery session {sid}")

    # ------------------------------------------------------------------ disks and views
    def backup_disk(self, point_id: str, disk: str) -> BackupDisk:
        key = (point_id, disk)
        d = self._backup_disks.get(key)
        if d is None:
            try:
                index = self.repo.read_index(point_id, disk)
            except IntegrityError:
                if self.repo.catalog.point(point_id) is None:
                    raise self._pruned(point_id) from None
                raise
            tables = self.repo.read_tables(point_id, disk, index)
            d = self._backup_disks.put(key, BackupDisk(index, self.cache, tables))
        return d

    def session_disk(self, session: Session, disk: str) -> SessionDisk:
        with self._lock:
            key = (session.id, disk)
            d = self._session_disks.get(key)
            if d is None:
                delta = self.repo.session_dir(session.id) / "disks" / f"{disk}.delta"
                if not delta.parent.is_dir():
                    raise _err(errno.ENOENT, f"overlay of recovery session {session.name}")
                d = self._session_disks[key] = SessionDisk(self.backup_disk(session.point, disk), delta)
            return d

    def _view(self, ino: int) -> View:
        self._refresh()  # a pruned point's and a stopped session's views are forgotten
        if ino >> KIND_SHIFT == Kind.SVIEW:  # a stopped session's disk is gone (its delta may be open still)
            self._session_by_id(f"{(ino >> 12) & (2**48 - 1):012x}")
        v = self._views.get(ino)
        if v is not None:
            return v
        kind, payload = _split(ino)
        if kind not in (Kind.BVIEW, Kind.SVIEW) or payload & 0xF >= len(ViewKind):
            raise _err(errno.ENOENT, f"inode {ino}")
        owner, pos, vk = f"{payload >> 12:012x}", (payload >> 4) & 0xFF, ViewKind(payload & 0xF)
        if kind is Kind.BVIEW:
            try:
                point, disks = self._point(owner)
            except FileNotFoundError:
                raise self._pruned(owner) from None
            disk = self._disk_at(disks, pos)
            v = View(
                vk,
                disk.name,
                self.backup_disk(point.id, disk.name),
                f"{point.id}/{disk.name}",
                point.created_dt,
            )
        else:
            session = self._session_by_id(owner)
            point, disks = self._point(session.point)
            disk = self._disk_at(disks, pos)
            v = View(
                vk,
                disk.name,
                self.session_disk(session, disk.name),
                f"{session.id}/{disk.name}",
                session.created_dt,
            )
        return self._views.put(ino, v)

    @staticmethod
    def _disk_at(disks: list[Disk], pos: int) -> Disk:
        for d in disks:
            if d.position == pos:
                return d
        raise _err(errno.ENOENT, f"disk {pos}")

    def _view_entries(self, kind: Kind, owner: str, disks: list[Disk]) -> list[tuple[str, int]]:
        return [
            (view_name(d.name, vk), _ino(kind, int(owner, 16) << 12 | d.position << 4 | vk))
            for d in disks
            for vk in ViewKind
        ]

    # ------------------------------------------------------------------ attributes
    def _dir(self, ino: int, mtime_ns: int, *, writable: bool = False, immutable: bool = False) -> Attr:
        mode = stat.S_IFDIR | (0o755 if writable else 0o555)
        return Attr(ino, mode, 0, mtime_ns, 2, mtime_ns, mtime_ns, self.uid, self.gid, immutable=immutable)

    def _file(self, ino: int, size: int, mtime_ns: int, *, writable: bool, immutable: bool) -> Attr:
        mode = stat.S_IFREG | (0o644 if writable else 0o444)
        return Attr(ino, mode, size, mtime_ns, 1, mtime_ns, mtime_ns, self.uid, self.gid, immutable=immutable)

    def getattr(self, ino: int) -> Attr:
        kind, payload = _split(ino)
        if kind is Kind.FIXED:
            if ino not in (ROOT_INO, VMS_INO, RECOVER_INO):
                raise _err(errno.ENOENT, f"inode {ino}")
            return self._dir(ino, self.started_ns, writable=ino == RECOVER_INO)
        if kind in (Kind.VM, Kind.LATEST):
            vm = self._vm_by_hash(payload)
            points = self._vm_points(vm)
            mtime = _ns(points[-1].created_dt) if points else self.started_ns
            if kind is Kind.VM:
                return self._dir(ino, mtime)
            target = points[-1].id if points else ""
            return Attr(ino, stat.S_IFLNK | 0o777, len(target), mtime, 1, mtime, mtime, self.uid, self.gid)
        if kind is Kind.POINT:
            point, _ = self._point(f"{payload:012x}")
            return self._dir(ino, _ns(point.created_dt), immutable=True)
        if kind is Kind.VMJSON:
            point, disks = self._point(f"{payload:012x}")
            size = len(self._vm_json(point, disks))
            return self._file(ino, size, _ns(point.created_dt), writable=False, immutable=True)
        if kind is Kind.BVIEW:
            v = self._view(ino)
            point, _ = self._point(f"{payload >> 12:012x}")
            return self._file(ino, v.size, _ns(point.created_dt), writable=False, immutable=True)
        if kind is Kind.SESSION:
            session = self._session_by_id(f"{payload:012x}")
            st = self._beneath(session.id).lstat("")
            return self._dir(ino, st.st_mtime_ns, writable=True)
        if kind is Kind.SVIEW:
            return self._session_view_attr(ino, self._view(ino))
        sid, rel = self._upper_path(ino)
        return self._upper_attr(sid, rel)

    def _session_view_attr(self, ino: int, v: View) -> Attr:
        assert isinstance(v.disk, SessionDisk)
        st = v.disk.stat()
        return Attr(
            ino, stat.S_IFREG | 0o644, v.size, st.st_mtime_ns, 1, st.st_ctime_ns, st.st_atime_ns, self.uid,
            self.gid,
        )  # fmt: skip

    def _fresh(self, now: float | None = None) -> bool:
        """Was the catalog looked at within CATALOG_REFRESH_SECONDS (of *now*)?  The one rule for both
        ``_refresh`` (look again when not) and the event loop's session reads (go to a worker when not).
        ``watch_changes`` of the front ends has it looked at every 0.5 s."""
        when = self._catalog_seen[1]
        return (time.monotonic() if now is None else now) - when <= CATALOG_REFRESH_SECONDS

    def _loop_view(self, ino: int) -> View | None:
        """The view of *ino* if it is open and may be used on an event loop now."""
        v = self._views.get(ino)
        if v is not None and ino >> KIND_SHIFT == Kind.SVIEW and not self._fresh():
            return None
        return v

    def getattr_cached(self, ino: int) -> Attr | None:
        """A session disk view's attributes if its view is open (one fstat), else None.  Never blocks
        long: for an event loop."""
        v = self._loop_view(ino) if ino >> KIND_SHIFT == Kind.SVIEW else None
        if v is None:
            return None
        try:
            return self._session_view_attr(ino, v)
        except OSError:
            return None  # stopped: a worker answers

    def _vm_json(self, point: Point, disks: list[Disk]) -> bytes:
        doc = {
            **point.summary(),
            "disks": [
                {"name": d.name, "position": d.position, "size": d.size, "source_format": d.source_format,
                 "files": {vk.name.lower(): view_name(d.name, vk) for vk in ViewKind}}
                for d in disks
            ],
        }  # fmt: skip
        return (json.dumps(doc, indent=2) + "\n").encode()

    # ------------------------------------------------------------------ names
    def readdir(self, ino: int) -> list[tuple[str, int]]:
        """(name, inode) of every entry but '.' and '..', in a stable order."""
        kind, payload = _split(ino)
        if ino == ROOT_INO:
            return [("vms", VMS_INO), ("recover", RECOVER_INO)]
        if ino == VMS_INO:
            return [(vm, _ino(Kind.VM, _hash48(vm))) for vm in self._vm_names()]
        if ino == RECOVER_INO:
            return [(s.name, _ino(Kind.SESSION, int(s.id, 16))) for s in self.sessions().values()]
        if kind is Kind.VM:
            vm = self._vm_by_hash(payload)
            points = self._vm_points(vm)
            out = [(p.id, _ino(Kind.POINT, int(p.id, 16))) for p in points]
            return out + ([("latest", _ino(Kind.LATEST, payload))] if points else [])
        if kind is Kind.POINT:
            point, disks = self._point(f"{payload:012x}")
            return [*self._view_entries(Kind.BVIEW, point.id, disks), ("vm.json", _ino(Kind.VMJSON, payload))]
        if kind is Kind.SESSION:
            session = self._session_by_id(f"{payload:012x}")
            _, disks = self._point(session.point)
            return self._view_entries(Kind.SVIEW, session.id, disks) + self._upper_list(session.id, "")
        if kind is Kind.UPPER:
            sid, rel = self._upper_path(ino)
            if rel != self._sr_folder(sid):
                return self._upper_list(sid, rel)
            own = [e for e in self._upper_list(sid, rel) if not e[0].startswith(srlayout.HIDDEN)]
            return self._reserved(sid, rel) + own
        raise _err(errno.ENOTDIR, f"inode {ino}")

    def lookup(self, parent: int, name: str) -> Attr:
        if name in (".", "..", "") or "/" in name or "\0" in name:
            raise _err(errno.EINVAL, f"{name!r} is not a name in a folder ('.' and '..' are the front end's)")
        kind, payload = _split(parent)
        if kind in (Kind.SESSION, Kind.UPPER):
            sid, rel = self._dir_of(parent)
            for n, ino in self._reserved(sid, rel):
                if n == name:
                    return self.getattr(ino)
            return self._upper_attr(sid, os.path.join(rel, name))
        # Names that the catalog answers directly: a lookup costs the same with 10 or 10,000 points.
        if parent == RECOVER_INO:  # a session started a moment ago is found at once
            session = self.sessions().get(name) or self.sessions(force=True).get(name)
            if session is None:
                raise _err(errno.ENOENT, name)
            return self.getattr(_ino(Kind.SESSION, int(session.id, 16)))
        if parent == VMS_INO:
            with self._lock:
                known = self.repo.catalog.has_vm(name)
            if known:
                return self.getattr(_ino(Kind.VM, _hash48(name)))
            raise _err(errno.ENOENT, name)
        if kind is Kind.VM and name != "latest":
            vm = self._vm_by_hash(payload)
            try:
                point, _ = self._point(name)
            except FileNotFoundError:
                point = None
            if point is None or point.vm != vm:
                raise _err(errno.ENOENT, name)
            return self.getattr(_ino(Kind.POINT, int(point.id, 16)))
        for n, ino in self.readdir(parent):
            if n == name:
                return self.getattr(ino)
        raise _err(errno.ENOENT, name)

    def parent(self, ino: int) -> int:
        """The folder holding *ino* (the root for the root): how NFS answers '..'."""
        kind, payload = _split(ino)
        if kind is Kind.FIXED:
            self.getattr(ino)
            return ROOT_INO
        if kind is Kind.VM:
            return VMS_INO
        if kind is Kind.LATEST:
            return _ino(Kind.VM, payload)
        if kind is Kind.POINT:
            point, _ = self._point(f"{payload:012x}")
            return _ino(Kind.VM, _hash48(point.vm))
        if kind in (Kind.VMJSON, Kind.BVIEW):
            return _ino(Kind.POINT, payload if kind is Kind.VMJSON else payload >> 12)
        if kind is Kind.SESSION:
            return RECOVER_INO
        if kind is Kind.SVIEW:
            return _ino(Kind.SESSION, payload >> 12)
        sid, rel = self._upper_path(ino)
        up = os.path.dirname(rel)
        return _ino(Kind.SESSION, int(sid, 16)) if not up else self._upper_attr(sid, up).ino

    def readlink(self, ino: int) -> str:
        kind, payload = _split(ino)
        if kind is Kind.LATEST:
            points = self._vm_points(self._vm_by_hash(payload))
            if points:
                return points[-1].id
            raise _err(errno.ENOENT, "latest")
        if kind is Kind.UPPER:
            sid, rel = self._upper_path(ino)
            return self._beneath(sid).readlink(rel)
        raise _err(errno.EINVAL, f"inode {ino} is not a symlink")

    # ------------------------------------------------------------------ data
    def read_cached(self, ino: int, off: int, size: int) -> bytes | None:
        v = self._loop_view(ino)
        return None if v is None else v.read_cached(off, size)

    def read(self, ino: int, off: int, size: int) -> bytes:
        kind, payload = _split(ino)
        if kind is Kind.BVIEW:
            try:
                return self._view(ino).read(off, size)
            except CorruptChunk:  # damage, or gc freed the chunks of a point pruned under this reader
                owner = f"{payload >> 12:012x}"
                with self._lock:  # one query: a guest retrying a damaged sector must not cost a refresh
                    pruned = self.repo.catalog.point(owner) is None
                if pruned:
                    raise self._pruned(owner) from None
                raise
        if kind is Kind.SVIEW:
            return self._view(ino).read(off, size)
        if kind is Kind.VMJSON:
            point, disks = self._point(f"{ino & (2**KIND_SHIFT - 1):012x}")
            return self._vm_json(point, disks)[off : off + size]
        if kind is Kind.UPPER:
            fd = self._upper_open(ino, os.O_RDONLY)
            try:
                return os.pread(fd, size, off)
            finally:
                os.close(fd)
        raise _err(errno.EISDIR if self.getattr(ino).is_dir else errno.EINVAL, f"inode {ino}")

    def check_writable(self, ino: int) -> None:
        """EROFS for anything under vms/ (what opening it for writing must answer)."""
        if _split(ino)[0] not in (Kind.SVIEW, Kind.UPPER, Kind.SESSION) and ino != RECOVER_INO:
            raise _err(errno.EROFS, "restore points are read-only; start a recovery session to write")

    def write(self, ino: int, off: int, data: bytes | memoryview) -> int:
        self.check_writable(ino)
        if _split(ino)[0] is Kind.SVIEW:
            return self._view(ino).write(off, data)
        fd = self._upper_open(ino, os.O_WRONLY)
        try:
            return os.pwrite(fd, data, off)
        finally:
            os.close(fd)

    def flush(self, ino: int) -> None:
        kind, _ = _split(ino)
        if kind is Kind.SVIEW:
            self._view(ino).flush()
        elif kind is Kind.UPPER and not self.getattr(ino).is_dir:
            fd = self._upper_open(ino, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def setattr(
        self, ino: int, *, size: int | None = None, mode: int | None = None, uid: int | None = None,
        gid: int | None = None, atime_ns: int | None = None, mtime_ns: int | None = None,
    ) -> Attr:  # fmt: skip
        self.check_writable(ino)
        kind, _ = _split(ino)
        if kind is Kind.SVIEW:
            if size is not None and size != self._view(ino).size:
                raise _err(errno.EPERM, "a recovery session's disk keeps the size of its backup")
            if (uid is not None and uid != self.uid) or (gid is not None and gid != self.gid):
                raise _err(errno.EPERM, "a recovery session's disk keeps its owner")
            v = self._view(ino)
            assert isinstance(v.disk, SessionDisk)
            if atime_ns is not None or mtime_ns is not None:
                v.disk.utime(_times(v.disk.stat(), atime_ns, mtime_ns))
            return self.getattr(ino)
        if kind is not Kind.UPPER:
            if size is None and mode is None and uid is None and gid is None:
                return self.getattr(ino)  # touch on a session folder: nothing to keep
            raise _err(errno.EPERM, f"inode {ino}")
        sid, rel = self._upper_path(ino)
        upper = self._beneath(sid)
        if size is not None:
            upper.truncate(rel, size)  # a regular file only: never a symlink's target
        if mode is not None:
            upper.chmod(rel, safe_mode(mode))
        if uid is not None or gid is not None:
            upper.chown(rel, -1 if uid is None else uid, -1 if gid is None else gid)
        if atime_ns is not None or mtime_ns is not None:
            upper.utime(rel, _times(upper.lstat(rel), atime_ns, mtime_ns))
        return self._upper_attr(sid, rel)

    # ------------------------------------------------------------------ files a hypervisor creates
    # Every host operation on them goes through vmrecover.beneath: from the descriptor of the
    # session's upper/ folder, one component at a time, never following a symlink (a client can
    # create symlinks pointing anywhere, and rename folders while we work).
    def _upper_root(self, sid: str) -> Path:
        return self.repo.session_dir(sid) / "upper"

    def _beneath(self, sid: str) -> Beneath:
        return Beneath(self._upper_root(sid))

    def _dir_of(self, parent: int) -> tuple[str, str]:
        """(session id, relative path) of a writable directory; EROFS for anything else."""
        kind, payload = _split(parent)
        if kind is Kind.SESSION:
            return self._session_by_id(f"{payload:012x}").id, ""
        if kind is Kind.UPPER:
            sid, rel = self._upper_path(parent)
            if not stat.S_ISDIR(self._beneath(sid).lstat(rel).st_mode):
                raise _err(errno.ENOTDIR, rel)
            return sid, rel
        if parent == RECOVER_INO:
            raise _err(errno.EPERM, "sessions are created with 'vmrecover recover start'")
        raise _err(errno.EROFS, "restore points are read-only; start a recovery session to write")

    def _upper_ino(self, sid: str, st_ino: int) -> int:
        if st_ino >= 2**40:
            raise _err(errno.EOVERFLOW, f"inode {st_ino} of the session's filesystem is too large")
        return _ino(Kind.UPPER, (int(sid, 16) & 0xFFFFF) << 40 | st_ino)

    def _remember(self, sid: str, rel: str, st: os.stat_result) -> int:
        ino = self._upper_ino(sid, st.st_ino)
        self._upper.put(ino, (sid, rel))
        return ino

    def _upper_attr(self, sid: str, rel: str) -> Attr:
        upper = self._beneath(sid)
        st = upper.lstat(rel)
        ino = self._remember(sid, rel, st)
        return Attr(
            ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink, st.st_ctime_ns, st.st_atime_ns,
            st.st_uid, st.st_gid, _generation(upper, rel) if not stat.S_ISLNK(st.st_mode) else 1,
        )  # fmt: skip

    def _upper_path(self, ino: int) -> tuple[str, str]:
        got = self._upper.get(ino)
        if got is not None:
            sid, rel = got
            try:
                if self._upper_ino(sid, self._beneath(sid).lstat(rel).st_ino) == ino:
                    return got
            except (FileNotFoundError, NotADirectoryError):
                pass
        # Not seen in this run (an NFS handle from before a restart) or moved: search its session.
        tag = (ino >> 40) & 0xFFFFF
        for s in self.sessions().values():
            if int(s.id, 16) & 0xFFFFF != tag:
                continue
            for rel, st in self._beneath(s.id).walk():
                if self._upper_ino(s.id, st.st_ino) == ino:
                    self._remember(s.id, rel, st)
                    return s.id, rel
        raise _err(errno.ENOENT, f"inode {ino}")

    def _upper_list(self, sid: str, rel: str) -> list[tuple[str, int]]:
        return [
            (name, self._remember(sid, os.path.join(rel, name), st))
            for name, st in self._beneath(sid).listdir(rel)
        ]

    def _upper_open(self, ino: int, flags: int) -> int:
        """A descriptor of the regular file *ino* names; ENOENT if its name now holds another file
        (renamed between finding the name and opening it)."""
        sid, rel = self._upper_path(ino)
        fd = self._beneath(sid).open(rel, flags)
        if self._upper_ino(sid, os.fstat(fd).st_ino) != ino:
            os.close(fd)
            self._upper.pop(ino)
            raise _err(errno.ENOENT, f"inode {ino} (moved)")
        return fd

    def _new_name(self, parent: int, name: str) -> tuple[str, str]:
        sid, rel = self._dir_of(parent)
        if "/" in name or name in (".", "..", "") or "\0" in name:
            raise _err(errno.EINVAL, f"name {name!r}")
        if any(n == name for n, _ in self._reserved(sid, rel)):
            raise _err(errno.EEXIST, f"{name} is a disk of the session")
        return sid, os.path.join(rel, name)

    @staticmethod
    def _raw_view(sid: str, d: Disk) -> int:
        return _ino(Kind.SVIEW, int(sid, 16) << 12 | d.position << 4 | ViewKind.RAW)

    def _sr_folder(self, sid: str) -> str:
        return srlayout.sr_uuid(self.repo.config.id, sid)

    def _reserved(self, sid: str, rel: str) -> list[tuple[str, int]]:
        """The session's disks among the names of its folder *rel*: the views at its top, and in its
        XenServer SR folder the raw views under their VDI names (less those the SR driver removed)."""
        if rel and rel != self._sr_folder(sid):
            return []
        session = self._session_by_id(sid)
        _, disks = self._point(session.point)
        if not rel:
            return self._view_entries(Kind.SVIEW, sid, disks)
        out = []
        upper = self._beneath(sid)
        for d in disks:
            vdi = srlayout.vdi_uuid(self.repo.config.id, sid, d.name)
            try:
                upper.lstat(os.path.join(rel, srlayout.HIDDEN + vdi))
                continue
            except FileNotFoundError:
                pass
            out.append((vdi + srlayout.RAW, self._raw_view(sid, d)))
        return out

    def create(self, parent: int, name: str, mode: int) -> Attr:
        """A new regular file with exactly *mode*'s permission bits (no umask; never setuid/setgid)."""
        sid, rel = self._new_name(parent, name)
        fd = self._beneath(sid).create_open(rel, 0o600)
        try:
            os.fchmod(fd, safe_mode(mode))
        finally:
            os.close(fd)
        return self._upper_attr(sid, rel)

    def mkdir(self, parent: int, name: str, mode: int) -> Attr:
        sid, rel = self._new_name(parent, name)
        upper = self._beneath(sid)
        upper.mkdir(rel, 0o700)
        upper.chmod(rel, safe_mode(mode))
        return self._upper_attr(sid, rel)

    def symlink(self, parent: int, name: str, target: str) -> Attr:
        sid, rel = self._new_name(parent, name)
        self._beneath(sid).symlink(target, rel)  # stored as text; the server never follows it
        return self._upper_attr(sid, rel)

    def _existing(self, parent: int, name: str) -> tuple[str, str]:
        sid, rel = self._dir_of(parent)
        if any(n == name for n, _ in self._reserved(sid, rel)):
            raise _err(errno.EPERM, f"{name} is a disk of the session; stop the session to discard it")
        if not rel and name == self._sr_folder(sid):
            raise _err(errno.EPERM, f"{name} is the session's XenServer SR; 'vmrecover recover stop' ends it")
        return sid, os.path.join(rel, name)

    def unlink(self, parent: int, name: str) -> None:
        sid, rel = self._dir_of(parent)
        if rel and any(n == name for n, _ in self._reserved(sid, rel)):  # the SR driver deletes a VDI (after
            marker = os.path.join(rel, srlayout.HIDDEN + name.removesuffix(srlayout.RAW))  # moving it): the
            self._beneath(sid).create(marker, 0o600)  # session keeps its disk
            return
        sid, rel = self._existing(parent, name)
        upper = self._beneath(sid)
        if stat.S_ISDIR(upper.lstat(rel).st_mode):
            raise _err(errno.EISDIR, name)
        upper.unlink(rel)

    def rmdir(self, parent: int, name: str) -> None:
        sid, rel = self._existing(parent, name)
        self._beneath(sid).rmdir(rel)

    def rename(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        sid, rel = self._existing(parent, name)
        sid2, new_rel = self._existing(new_parent, new_name)
        if sid != sid2:
            raise _err(errno.EXDEV, "rename between recovery sessions")
        self._beneath(sid).rename(rel, new_rel)
        for i, (s, r) in self._upper.items():  # paths below a moved folder changed: _upper_path finds
            if s == sid and (r == rel or r.startswith(rel + "/")):  # them again
                self._upper.pop(i)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.repo.root / "sessions")
