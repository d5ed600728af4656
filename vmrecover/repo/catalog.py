"""The catalog (``catalog.sqlite``): VMs, restore points and their disks, recovery sessions, and the
service's job runs.  Schema in one place.

The catalog is the only thing that makes a restore point exist: a point is visible exactly when its
``points`` row and all its ``disks`` rows are committed, which happens in one transaction after its
index files are durable.  Anything on disk the catalog does not name (an index directory of a killed
backup, an unreferenced chunk) is garbage for ``gc``.

SQLite runs in WAL mode with synchronous=FULL: a committed point survives power loss, and readers
(list, restore, verify) are never blocked by the writer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from .. import faults
from ..errors import BadInput, NotFound
from ..fsutil import raise_if_no_space

SCHEMA_VERSION = 5  # 2 added `sessions`, 3 `points.config` and `disks.change_token`, 4 `job_runs` and
# `job_slots`, 5 `boot_checks`; upgraded in place

# Table -> (columns, primary key, not-null columns, foreign keys).  Every column is described here.
NULLABLE = {"parent", "config", "change_token", "started", "ended", "error", "vms", "retry_of", "screenshot"}
RUN_STATES = ("queued", "running", "waiting", "succeeded", "failed", "interrupted")
UNFINISHED = ("queued", "running", "waiting")
SCHEMA: dict[str, dict[str, Any]] = {
    "meta": {
        # key/value facts about the catalog itself: 'schema_version'
        "columns": {"key": str, "value": str},
        "pk": "key",
    },
    "vms": {
        # name: the VM's name as given to `backup --vm`; safe as a file name (see check_name)
        # created: ISO 8601 UTC time of the VM's first restore point
        "columns": {"name": str, "created": str},
        "pk": "name",
    },
    "points": {
        # id: 12 lowercase hex digits, random; also the directory name under indexes/
        # vm: owning VM
        # created: ISO 8601 UTC with microseconds ("2026-11-23T09:30:00.123456Z"); sorts by time
        # parent: id of the point this one was derived from, NULL for the first; informational only
        #         (every point has complete indexes), so pruning a parent never breaks a child
        # kind: 'full' (everything allocated was read) or 'incremental' (changed extents only)
        # stats: JSON: bytes read, new chunks, stored bytes, duration ...
        # config: JSON, NULL for local images: where the point came from and the VM's configuration
        #         as the platform describes it ({"platform": "vmware", "source": ..., "vmx": ...,
        #         "hardware": {...}}), what a full restore or a recovery rebuilds the VM from
        "columns": {
            "id": str,
            "vm": str,
            "created": str,
            "parent": str,
            "kind": str,
            "stats": str,
            "config": str,
        },
        "pk": "id",
        "foreign_keys": [("vm", "vms", "name")],
    },
    "disks": {
        # point, name: the disk `name` of restore point `point`; file is indexes/<point>/<name>.fidx
        # position: order of the disk in the VM (0 = first image given to backup)
        # size: virtual disk size in bytes; chunk_size: the index's chunk size
        # source: path the disk was read from; source_format: raw, qcow2, vmdk, vpc (vhd), vhdx
        # index_sha256: sha256 of the whole index file, checked by verify
        # change_token: the platform's change-tracking state of the disk at this point (VMware's
        #               changeId), which the next incremental backup asks for changes since; NULL
        #               when the platform tracks nothing (local images) or tracking was off
        "columns": {
            "point": str,
            "name": str,
            "position": int,
            "size": int,
            "chunk_size": int,
            "source": str,
            "source_format": str,
            "index_sha256": str,
            "change_token": str,
        },
        "pk": ("point", "name"),
        "foreign_keys": [("point", "points", "id")],
    },
    "sessions": {
        # name: the recovery session's name (`recover start --name`), shown as recover/<name>/;
        #       safe as a file name (see check_name)
        # id: 12 lowercase hex digits, random; its overlay lives in sessions/<id>/ (disks/<disk>.delta,
        #     upper/ for files the hypervisor creates).  The foreign key keeps prune from deleting a
        #     point a session still reads.
        # point: the restore point the session boots from; created: ISO 8601 UTC
        "columns": {"name": str, "id": str, "point": str, "created": str},
        "pk": "name",
        "foreign_keys": [("point", "points", "id")],
    },
    "job_runs": {
        # One run of a job of the service's configuration (service/scheduler.py), kept as history.
        # id: increasing (rows are never deleted, so an id is never given twice)
        # job: the job's name; kind: 'backup', 'gc', 'verify' or 'boot-check'
        # trigger: 'schedule' (a cron slot, or the one run of slots missed while the service was down),
        #          'manual' (run now: API or `job run`), 'retry' (after a failure, with backoff),
        #          'resume' (the one retry of a run the service's death interrupted)
        # state: queued, running, waiting (for a host, a datastore, a stream or the repository's lock),
        #        then succeeded, failed or interrupted (its process died or was stopped during the run)
        # scheduled_for: ISO 8601 UTC: the slot (schedule), the request (manual), the backoff's end (retry)
        # started, ended: ISO 8601 UTC, NULL until then
        # attempt: 1 for a first run; a retry or resume counts on from the run it repeats (retry_of)
        # vms: JSON list of the job's VMs this run backs up when not all of them (a retry of those that
        #      failed); NULL: all
        # error: why the run failed (the first failure, and how many VMs failed), NULL otherwise
        # stats: JSON: per VM its state, point, figures, host, datastores and per-disk figures (as
        #        `backup --json` prints them), error; retention's removals; gc's or verify's report; log
        # pid, host: the process (and machine) that owns the run: a run still unfinished whose process
        #            is gone is what a crash left (the next service start marks it interrupted)
        "columns": {
            "id": int,
            "job": str,
            "kind": str,
            "trigger": str,
            "state": str,
            "scheduled_for": str,
            "started": str,
            "ended": str,
            "attempt": int,
            "retry_of": int,
            "vms": str,
            "error": str,
            "stats": str,
            "pid": int,
            "host": str,
        },
        "pk": "id",
    },
    "job_slots": {
        # job: a job's name; schedule: its cron schedule when last_slot was handled
        # last_slot: ISO 8601 UTC of the latest cron slot the scheduler handled (ran, or merged into a run
        #            that was still going); first seen, a job starts from that moment, so slots from before
        #            it existed (or before its schedule changed) are not "missed"
        "columns": {"job": str, "schedule": str, "last_slot": str},
        "pk": "job",
    },
    "boot_checks": {
        # One boot health check of a restore point (recovery/healthcheck.py: `verify --boot`): the
        # point booted in a throw-away session under qemu with no network, judged from its consoles.
        # id: increasing; point: the point checked (its checks go when it is pruned); checked: ISO 8601 UTC
        # ok: 1 if it booted; verdict: how that was decided ('login', 'expect', 'screen') or why not
        #     ('timeout', 'stopped', 'no-boot-device', 'panic', 'error')
        # detail: one line for a person; seconds: from power-on to the verdict; accel: kvm or tcg
        # serial: the serial console's last 64 KiB (text); screenshot: the screen at the verdict (PNG),
        #         NULL if qemu had ended before it could be taken
        "columns": {
            "id": int,
            "point": str,
            "checked": str,
            "ok": int,
            "verdict": str,
            "detail": str,
            "seconds": float,
            "accel": str,
            "serial": str,
            "screenshot": bytes,
        },
        "pk": "id",
        "foreign_keys": [("point", "points", "id")],
    },
}


@dataclass(frozen=True)
class BootCheck:
    """A boot health check's result (the ``boot_checks`` table)."""

    point: str
    checked: str
    ok: bool
    verdict: str
    detail: str
    seconds: float
    accel: str
    serial: str
    screenshot: bytes | None = None
    id: int = 0
    screenshot_bytes: int | None = None  # the screenshot's size when it was not read (not a column)

    def summary(self) -> dict[str, Any]:
        """JSON-ready, without the console's bytes."""
        doc = asdict(self)
        doc.pop("screenshot")
        doc.pop("serial")
        if self.screenshot is not None or self.screenshot_bytes is None:
            doc["screenshot_bytes"] = len(self.screenshot or b"")
        return doc


@dataclass(frozen=True)
class JobRun:
    id: int
    job: str
    kind: str
    trigger: str
    state: str
    scheduled_for: str
    started: str | None
    ended: str | None
    attempt: int
    retry_of: int | None
    vms: list[str] | None
    error: str | None
    stats: dict[str, Any]
    pid: int
    host: str

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Session:
    name: str
    id: str
    point: str
    created: str

    @property
    def created_dt(self) -> datetime:
        return parse_iso(self.created)


@dataclass(frozen=True)
class Disk:
    point: str
    name: str
    position: int
    size: int
    chunk_size: int
    source: str
    source_format: str
    index_sha256: str
    change_token: str | None = None


@dataclass(frozen=True)
class Point:
    id: str
    vm: str
    created: str
    parent: str | None
    kind: str
    stats: dict[str, Any]
    config: dict[str, Any] | None = None  # the VM's configuration, for hypervisor backups

    @property
    def created_dt(self) -> datetime:
        return parse_iso(self.created)

    def summary(self) -> dict[str, Any]:
        """What commands and vm.json show of a point."""
        return {
            "vm": self.vm,
            "point": self.id,
            "created": self.created,
            "kind": self.kind,
            "parent": self.parent,
        }


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_name(kind: str, name: str) -> str:
    """VM and disk names become file and directory names (FUSE, NFS): keep them safe and plain."""
    bad = (
        not name
        or len(name) > 200
        or name in {".", ".."}
        or name.startswith((".", "-"))
        or any(c in name for c in "/\\@\0\n\r\t")
        or not name.isprintable()
    )
    if bad:
        raise BadInput(
            f"invalid {kind} name {name!r}",
            hint="use up to 200 printable characters without '/', '\\' or '@', not starting with '.' or '-'",
        )
    return name


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Private from its first byte (SQLite gives its -wal and -shm files the database's mode).  Only
        # when it is missing: closing a descriptor of a file drops every POSIX lock the process holds on
        # it, among them SQLite's WAL-mode SHARED lock of another connection of this process; another
        # process then takes itself for the last one and deletes the WAL under us (found by the API's tests).
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)

    def close(self) -> None:
        self.db.conn.close()

    def create_schema(self) -> None:
        """Create the tables (at init, before repo.toml exists, so atomicity is not needed here)."""
        for name in SCHEMA:
            self._create_table(name)
        self.db["points"].create_index(["vm", "created"])  # type: ignore[union-attr]
        self._job_indexes()
        self._boot_check_index()
        self.db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _create_table(self, name: str) -> None:
        spec = SCHEMA[name]
        self.db[name].create(  # type: ignore[union-attr]
            spec["columns"],
            pk=spec["pk"],
            foreign_keys=spec.get("foreign_keys"),
            not_null=set(spec["columns"]) - NULLABLE,
        )

    def upgrade(self) -> None:
        """Bring an older catalog to SCHEMA_VERSION (additions only, in one transaction)."""
        with self.transaction():
            if self.schema_version() == 1:
                self._create_table("sessions")
                self.db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
            if self.schema_version() == 2:
                self.db.execute("ALTER TABLE points ADD COLUMN config TEXT")
                self.db.execute("ALTER TABLE disks ADD COLUMN change_token TEXT")
                self.db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
            if self.schema_version() == 3:
                for table in ("job_runs", "job_slots"):
                    if not self.db[table].exists():  # (a catalog made at version 4 and set back has them)
                        self._create_table(table)
                self._job_indexes()
                self.db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
            if self.schema_version() == 4:
                if not self.db["boot_checks"].exists():
                    self._create_table("boot_checks")
                self._boot_check_index()
                self.db.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")

    def _job_indexes(self) -> None:
        self.db.execute("CREATE INDEX IF NOT EXISTS idx_job_runs_job_id ON job_runs (job, id)")
        self.db.execute("CREATE INDEX IF NOT EXISTS idx_job_runs_state ON job_runs (state)")

    def _boot_check_index(self) -> None:
        self.db.execute("CREATE INDEX IF NOT EXISTS idx_boot_checks_point ON boot_checks (point, id)")

    def schema_version(self) -> int:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError:
            return 0
        return int(row[0]) if row else 0

    def transaction(self, name: str = "catalog") -> _Transaction:
        """``with catalog.transaction("backup"):`` one BEGIN IMMEDIATE ... COMMIT; *name* labels its
        fault-injection moments (vmrecover.faults)."""
        return _Transaction(self, name)

    # --- queries -------------------------------------------------------------------------------
    def vms(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            """SELECT v.name, v.created, COUNT(p.id), MAX(p.created)
               FROM vms v LEFT JOIN points p ON p.vm = v.name GROUP BY v.name ORDER BY v.name"""
        ).fetchall()
        return [{"name": r[0], "created": r[1], "points": r[2], "latest": r[3]} for r in rows]

    def point_ids(self) -> dict[str, str]:
        """Every point's id and VM, without loading the points."""
        return dict(self.db.execute("SELECT id, vm FROM points").fetchall())

    def vm_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM vms ORDER BY name").fetchall()]

    def points(self, vm: str | None = None) -> list[Point]:
        sql = f"SELECT {_POINT_COLUMNS} FROM points"
        args: tuple[Any, ...] = ()
        if vm is not None:
            sql += " WHERE vm = ?"
            args = (vm,)
        rows = self.db.execute(sql + " ORDER BY created", args).fetchall()
        return [_point(r) for r in rows]

    def disks(self, point: str) -> list[Disk]:
        rows = self.db.execute(
            "SELECT point, name, position, size, chunk_size, source, source_format, index_sha256, "
            "change_token FROM disks WHERE point = ? ORDER BY position",
            (point,),
        ).fetchall()
        return [Disk(*r) for r in rows]

    def point_sizes(self) -> dict[str, int]:
        """Every point's disks' virtual size in all, by point id (one query, for overviews)."""
        return dict(self.db.execute("SELECT point, SUM(size) FROM disks GROUP BY point").fetchall())

    def has_vm(self, vm: str) -> bool:
        return self.db.execute("SELECT 1 FROM vms WHERE name = ?", (vm,)).fetchone() is not None

    def latest_point(self, vm: str) -> Point | None:
        pts = self.points(vm)
        return pts[-1] if pts else None

    def resolve(self, spec: str) -> Point:
        """``VM``, ``VM@latest``, ``VM@<id or id prefix>`` or ``VM@<timestamp prefix>`` -> Point."""
        vm, _, sel = spec.partition("@")
        sel = sel or "latest"
        if not self.has_vm(vm):
            known = ", ".join(v["name"] for v in self.vms()) or "none"
            raise NotFound(f"no VM named {vm!r} in the repository", hint=f"known VMs: {known}")
        pts = self.points(vm)
        if not pts:
            raise NotFound(f"VM {vm!r} has no restore points")
        if sel == "latest":
            return pts[-1]
        matches = [p for p in pts if p.id == sel]
        if not matches:
            matches = [p for p in pts if p.id.startswith(sel) or p.created.startswith(sel)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFound(
                f"VM {vm!r} has no restore point matching {sel!r}",
                hint="use 'latest', a point id, or a prefix of its time (vmrecover list " + vm + ")",
            )
        listing = ", ".join(f"{p.id} ({p.created})" for p in matches[:10])
        raise BadInput(f"{spec!r} matches {len(matches)} restore points: {listing}", hint="be more specific")

    def sessions(self) -> list[Session]:
        rows = self.db.execute("SELECT name, id, point, created FROM sessions ORDER BY created").fetchall()
        return [Session(*r) for r in rows]

    def session(self, name: str) -> Session:
        row = self.db.execute(
            "SELECT name, id, point, created FROM sessions WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            known = ", ".join(s.name for s in self.sessions()) or "none"
            raise NotFound(f"no recovery session named {name!r}", hint=f"sessions: {known}")
        return Session(*row)

    def point(self, point_id: str) -> Point | None:
        r = self.db.execute(f"SELECT {_POINT_COLUMNS} FROM points WHERE id = ?", (point_id,)).fetchone()
        return None if r is None else _point(r)

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap "has anything changed?"."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    # --- changes -------------------------------------------------------------------------------
    # Writes use plain SQL inside BEGIN IMMEDIATE ... COMMIT: sqlite-utils' insert helpers wrap
    # themselves in ``with conn:``, which would commit our transaction half-way.
    def add_point(self, point: Point, disks: Iterable[Disk]) -> None:
        with self.transaction("backup"):
            ex = self.db.execute
            ex("INSERT OR IGNORE INTO vms (name, created) VALUES (?, ?)", (point.vm, point.created))
            ex(
                "INSERT INTO points (id, vm, created, parent, kind, stats, config) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    point.id,
                    point.vm,
                    point.created,
                    point.parent,
                    point.kind,
                    json.dumps(point.stats, sort_keys=True),
                    None if point.config is None else json.dumps(point.config, sort_keys=True),
                ),
            )
            for d in disks:
                ex(
                    "INSERT INTO disks (point, name, position, size, chunk_size, source, source_format, "
                    "index_sha256, change_token) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        d.point,
                        d.name,
                        d.position,
                        d.size,
                        d.chunk_size,
                        d.source,
                        d.source_format,
                        d.index_sha256,
                        d.change_token,
                    ),
                )

    def add_session(self, session: Session) -> None:
        with self.transaction("session"):
            if self.db.execute("SELECT 1 FROM sessions WHERE name = ?", (session.name,)).fetchone():
                raise BadInput(
                    f"a recovery session named {session.name!r} exists", hint="choose another --name"
                )
            if self.point(session.point) is None:  # pruned since it was chosen
                raise NotFound(
                    f"restore point {session.point} was pruned before the session could start",
                    hint="choose another point (vmrecover list)",
                )
            self.db.execute(
                "INSERT INTO sessions (name, id, point, created) VALUES (?, ?, ?, ?)",
                (session.name, session.id, session.point, session.created),
            )

    def has_session(self, session_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is not None

    def delete_session(self, name: str) -> None:
        with self.transaction("stop"):
            self.db.execute("DELETE FROM sessions WHERE name = ?", (name,))

    def delete_points(self, ids: list[str]) -> list[str]:
        """Delete the points *ids* but those a recovery session uses (checked in the same transaction:
        a session may have started since the caller looked); returns the ids deleted."""
        with self.transaction("prune"):
            ex = self.db.execute
            in_use = {r[0] for r in ex("SELECT point FROM sessions").fetchall()}
            deleted = [pid for pid in ids if pid not in in_use]
            for pid in deleted:
                ex("DELETE FROM boot_checks WHERE point = ?", (pid,))
                ex("DELETE FROM disks WHERE point = ?", (pid,))
                ex("DELETE FROM points WHERE id = ?", (pid,))
            ex("DELETE FROM vms WHERE name NOT IN (SELECT vm FROM points)")
        return deleted

    # --- boot health checks (recovery/healthcheck.py) ---------------------------------------------
    def add_boot_check(self, check: BootCheck) -> int:
        """Keep *check*'s result (its id is given here); the new id, or NotFound if its point was pruned
        while it ran."""
        with self.transaction("boot check"):
            if self.point(check.point) is None:
                raise NotFound(f"restore point {check.point} was pruned while its boot check ran")
            row = asdict(check)
            row.pop("id")
            row.pop("screenshot_bytes")
            row["ok"] = int(check.ok)
            cur = self.db.execute(
                f"INSERT INTO boot_checks ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            return int(cur.lastrowid or 0)

    def boot_checks(
        self, point: str | None = None, *, limit: int = 20, screenshots: bool = False
    ) -> list[BootCheck]:
        """The newest checks first, of *point* or of every point; without the screenshots unless asked."""
        where, args = ("point = ?", (point,)) if point else ("1", ())
        return self._boot_checks(where, args, limit=limit, screenshots=screenshots)

    def _boot_checks(
        self, where: str, args: tuple[Any, ...], *, limit: int, screenshots: bool
    ) -> list[BootCheck]:
        cols = [c for c in SCHEMA["boot_checks"]["columns"] if screenshots or c != "screenshot"]
        sql = f"SELECT {', '.join(cols)}, LENGTH(screenshot) FROM boot_checks WHERE {where} ORDER BY id DESC"
        rows = self.db.execute(sql + " LIMIT ?", (*args, limit)).fetchall()
        found = []
        for r in rows:
            doc = dict(zip(cols, r[:-1], strict=True))
            found.append(BootCheck(**doc | {"ok": bool(doc["ok"]), "screenshot_bytes": r[-1] or 0}))
        return found

    def latest_boot_checks(self) -> dict[str, dict[str, Any]]:
        """Each checked point's newest check (BootCheck.summary()), by point id (one query)."""
        newest = "id IN (SELECT MAX(id) FROM boot_checks GROUP BY point)"
        return {c.point: c.summary() for c in self._boot_checks(newest, (), limit=-1, screenshots=False)}

    # --- job runs (service/scheduler.py) ----------------------------------------------------------
    def add_job_run(
        self, job: str, kind: str, *, trigger: str, scheduled_for: str, attempt: int = 1,
        retry_of: int | None = None, vms: list[str] | None = None, pid: int, host: str,
    ) -> int:  # fmt: skip
        """A new run in state 'queued'; its id."""
        with self.transaction("job"):
            cur = self.db.execute(
                "INSERT INTO job_runs (job, kind, trigger, state, scheduled_for, attempt, retry_of, vms, "
                "stats, pid, host) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, '{}', ?, ?)",
                (job, kind, trigger, scheduled_for, attempt, retry_of,
                 None if vms is None else json.dumps(vms), pid, host),
            )  # fmt: skip
            return int(cur.lastrowid or 0)

    def update_job_run(self, run_id: int, **changes: Any) -> None:
        """Set columns of run *run_id*: state, started, ended, error, stats (a dict), pid, host."""
        allowed = {"state", "started", "ended", "error", "stats", "pid", "host"}
        if not changes or set(changes) - allowed:
            raise ValueError(f"cannot change {sorted(set(changes) - allowed) or 'nothing'} of a job run")
        if "state" in changes and changes["state"] not in RUN_STATES:
            raise ValueError(f"unknown job run state {changes['state']!r}")
        if "stats" in changes:
            changes["stats"] = json.dumps(changes["stats"], sort_keys=True, default=str)
        cols = ", ".join(f"{k} = ?" for k in changes)
        with self.transaction("job"):
            self.db.execute(f"UPDATE job_runs SET {cols} WHERE id = ?", (*changes.values(), run_id))

    def forget_job_runs(self, job: str, keep: int) -> int:
        """Forget the finished runs of *job* older than its *keep* newest runs; how many went."""
        done = tuple(s for s in RUN_STATES if s not in UNFINISHED)
        marks = ", ".join("?" * len(done))
        with self.transaction("job"):
            cur = self.db.execute(
                f"DELETE FROM job_runs WHERE job = ? AND state IN ({marks}) AND id NOT IN "
                "(SELECT id FROM job_runs WHERE job = ? ORDER BY id DESC LIMIT ?)",
                (job, *done, job, keep),
            )
            return int(cur.rowcount)

    def job_run(self, run_id: int) -> JobRun | None:
        r = self.db.execute(f"SELECT {_RUN_COLUMNS} FROM job_runs WHERE id = ?", (run_id,)).fetchone()
        return None if r is None else _job_run(r)

    def job_runs(
        self, job: str | None = None, *, limit: int = 50, states: Iterable[str] | None = None
    ) -> list[JobRun]:
        """Runs (of *job*, in *states*), newest first."""
        where, args = [], []
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if states is not None:
            states = list(states)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args += states
        sql = f"SELECT {_RUN_COLUMNS} FROM job_runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self.db.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [_job_run(r) for r in rows]

    def latest_job_runs(self) -> dict[str, JobRun]:
        """Each job's newest run."""
        rows = self.db.execute(
            f"SELECT {_RUN_COLUMNS} FROM job_runs WHERE id IN (SELECT MAX(id) FROM job_runs GROUP BY job)"
        ).fetchall()
        return {r.job: r for r in map(_job_run, rows)}

    def retried(self, run_id: int) -> bool:
        """Is there a run that repeats run *run_id* (a retry or a resume)?"""
        return self.db.execute("SELECT 1 FROM job_runs WHERE retry_of = ?", (run_id,)).fetchone() is not None

    def job_slots(self) -> dict[str, tuple[str, str]]:
        """job -> (schedule, last slot handled)."""
        rows = self.db.execute("SELECT job, schedule, last_slot FROM job_slots").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def set_job_slot(self, job: str, schedule: str, last_slot: str) -> None:
        with self.transaction("job"):
            self.db.execute(
                "INSERT INTO job_slots (job, schedule, last_slot) VALUES (?, ?, ?) ON CONFLICT (job) "
                "DO UPDATE SET schedule = excluded.schedule, last_slot = excluded.last_slot",
                (job, schedule, last_slot),
            )


_POINT_COLUMNS = "id, vm, created, parent, kind, stats, config"
_RUN_COLUMNS = (
    "id, job, kind, trigger, state, scheduled_for, started, ended, attempt, retry_of, vms, error, stats, "
    "pid, host"
)


def _job_run(r: tuple[Any, ...]) -> JobRun:
    return JobRun(
        *r[:10], None if r[10] is None else json.loads(r[10]), r[11], json.loads(r[12] or "{}"), r[13], r[14]
    )


def _point(r: tuple[Any, ...]) -> Point:
    return Point(
        r[0], r[1], r[2], r[3], r[4], json.loads(r[5] or "{}"), None if r[6] is None else json.loads(r[6])
    )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.  Whether it committed is a fact of
    the database, not of this object: an interrupt can arrive right after COMMIT returned, so callers
    that clean up after a failure ask the catalog what exists (see ingest.pipeline, recovery.sessions)."""

    def __init__(self, cat: Catalog, name: str) -> None:
        self.cat = cat
        self.name = name

    def __enter__(self) -> Catalog:
        self.cat.db.execute("BEGIN IMMEDIATE")
        return self.cat

    def __exit__(self, exc_type, exc, tb) -> None:
        conn = self.cat.db.conn
        if exc_type is None:
            try:
                faults.moment(f"{self.name}.in-commit")
                conn.execute("COMMIT")
            except sqlite3.OperationalError as err:
                exc = err
            except BaseException:  # the interrupt of the in-commit moment: nothing was committed
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            else:
                faults.moment(f"{self.name}.after-commit")
                return
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
            raise_if_no_space(OSError(errno.ENOSPC, str(exc)), self.cat.path, "the catalog")
        if exc_type is None:
            raise exc
