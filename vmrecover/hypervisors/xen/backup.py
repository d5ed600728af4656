"""Backing up a XenServer / XCP-ng VM the way XenServer's changed block tracking API intends.

1. Find the VM wherever it runs in the pool; take the repository's writer lock; remove what an
   interrupted backup of ours left (``snapshots.py`` decides when one is a leftover).
2. ``VDI.enable_cbt`` on every disk where it is off (that disk is read whole this time, and said so).
3. Take our snapshot by the chosen mode: ``normal`` (``VM.snapshot``), ``quiesced``
   (``VM.snapshot_with_quiesce``: refused by the pool where the guest cannot quiesce, and said so),
   ``memory`` (``VM.checkpoint``: the memory image is backed up as disk ``memory``), ``offline``
   (clean shutdown, snapshot, read, start again: also when the backup fails).  Creating and removing
   it hold off SIGTERM (``interrupts.deferred``), so a snapshot is never made without being recorded.
4. Per disk, ``VDI.list_changed_blocks(base, new)`` against the base snapshot VDI the previous point
   names (its ``change_token``) gives 64 KiB blocks to read; a broken chain (CBT off, base gone, size
   changed, another VM's point) reads that disk whole and says why.
5. Read over NBD (``VDI.get_nbd_info``, TLS with the host's certificate pinned: ``nbd.py``).
6. On success the new snapshot becomes the base of the next backup (renamed ``vmrecover-base-<point>``)
   and the previous base keeps only its CBT metadata (``VDI.data_destroy``; its snapshot record goes).
   On failure or SIGTERM the new snapshot is destroyed and the previous base is kept.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import XenAPI

from ... import interrupts
from ...errors import BadInput, Unreachable
from ...ingest.extents import bitmap_extents
from ...ingest.pipeline import DiskJob, DiskStats, run_backup
from ...repo.catalog import Point, check_name
from ...repo.repository import Repository
from .. import snapshots
from .export import ExportSource
from .inventory import Disk, disks, find_vm, record
from .nbd import NbdSource
from .session import Xen, failure_text

log = logging.getLogger("vmrecover.xen")
MODES = ("normal", "quiesced", "offline", "memory")
BASE_PREFIX = f"{snapshots.PREFIX}base-"  # a finished backup's snapshot, kept as the next CBT base
CBT_BLOCK = 64 * 1024  # the granularity of list_changed_blocks


@dataclass(frozen=True)
class Options:
    mode: str = "normal"
    full: bool = False
    wait: float | None = None  # for the repository's locks: seconds, None as long as it takes


@dataclass
class DiskPlan:
    disk: Disk  # the snapshot's disk
    areas: list[tuple[int, int]] | None  # changed areas; None: read whole
    why_full: str | None

    @property
    def incremental(self) -> bool:
        return self.areas is not None


# ------------------------------------------------------------------------------------ snapshots
def _time(rec: dict[str, Any]) -> datetime | None:
    try:
        return datetime.strptime(str(rec.get("snapshot_time")), "%Y%m%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def destroy_snapshot(xs: Xen, ref: str) -> None:
    """Destroy a snapshot VM and its disks (and memory image)."""
    x = xs.x
    rec = x.VM.get_record(ref)
    vdis = [x.VBD.get_VDI(vbd) for vbd in rec["VBDs"] if x.VBD.get_type(vbd) == "Disk"]
    if rec.get("suspend_VDI", "OpaqueRef:NULL") != "OpaqueRef:NULL":
        vdis.append(rec["suspend_VDI"])
    x.VM.destroy(ref)
    for vdi in vdis:
        if vdi != "OpaqueRef:NULL":
            with contextlib.suppress(XenAPI.Failure):  # one already gone
                x.VDI.destroy(vdi)


def remove_stale_snapshots(repo: Repository, xs: Xen, rec: dict[str, Any]) -> list[str]:
    """Destroy the snapshots an interrupted backup of ours left on the VM (never a base, never one of a
    backup that may still run, never anyone else's); return their names."""
    removed, me = [], snapshots.owner(repo)
    for ref in rec["snapshots"]:
        srec = xs.x.VM.get_record(ref)
        name = srec["name_label"]
        if not name.startswith(snapshots.PREFIX) or name.startswith(BASE_PREFIX):
            continue
        why = snapshots.stale(srec["name_description"], _time(srec), me)
        if why is None:
            log.warning(
                "snapshot %r of %s belongs to a backup that may still run: left alone", name, rec["uuid"]
            )
            continue
        log.warning("removing snapshot %r left on %s by an interrupted backup: %s", name, rec["uuid"], why)
        with interrupts.deferred():
            destroy_snapshot(xs, ref)
        removed.append(name)
    return removed


class Snapshot:
    """Our snapshot of one backup: destroyed when the backup ends, unless :meth:`keep` made it the base
    of the next one."""

    def __init__(self, xs: Xen, vm_ref: str, *, owner: dict[str, Any], mode: str) -> None:
        x = xs.x
        self.xs, self.name, self.kept = xs, snapshots.new_name(), False
        make = {"normal": x.VM.snapshot, "offline": x.VM.snapshot, "quiesced": x.VM.snapshot_with_quiesce,
                "memory": x.VM.checkpoint}[mode]  # fmt: skip
        with interrupts.deferred():
            try:
                self.ref = make(vm_ref, self.name)
            except XenAPI.Failure as exc:
                hint = (
                    "the guest needs the XenServer VSS provider (Windows) to quiesce; use --mode normal"
                    if mode == "quiesced" else None
                )  # fmt: skip
                raise Unreachable(
                    f"cannot snapshot the VM on {xs.hv.name}: {failure_text(exc)}", hint=hint
                ) from None
            x.VM.set_name_description(self.ref, snapshots.description(owner))

    def keep(self, point: Point) -> None:
        x = self.xs.x
        x.VM.set_name_label(self.ref, f"{BASE_PREFIX}{point.id}")
        x.VM.set_name_description(
            self.ref,
            f"vmrecover: changed block tracking base of {point.vm}@{point.id}; the next backup empties it",
        )  # fmt: skip
        self.kept = True

    def still_there(self) -> None:
        """Refuse to commit a point whose snapshot vanished while it was read (its bytes may mix)."""
        try:
            self.xs.x.VM.get_uuid(self.ref)
        except XenAPI.Failure:
            raise Unreachable(
                f"snapshot {self.name} was destroyed on {self.xs.hv.name} while the backup read it: what "
                "was read may mix two moments, so no point is kept",
                hint="run the backup again; make sure nothing else removes vmrecover-* snapshots meanwhile",
            ) from None

    def close(self) -> None:
        if self.kept:
            return
        with interrupts.deferred():
            try:
                destroy_snapshot(self.xs, self.ref)
                log.info("destroyed snapshot %r", self.name)
            except Exception as exc:
                log.error("could not destroy snapshot %r on %s: %s; the next backup removes it", self.name,
                          self.xs.hv.name, exc)  # fmt: skip


@contextlib.contextmanager
def offline(xs: Xen, vm_ref: str, rec: dict[str, Any]) -> Iterator[None]:
    """The VM shut down cleanly for the block, and started again after it, whatever happened."""
    running = rec["power_state"] == "Running"
    if running:
        log.warning("shutting VM %s down for an offline backup", rec["name_label"])
        with interrupts.deferred():
            xs.x.VM.clean_shutdown(vm_ref)
    try:
        yield
    finally:
        if running:
            with interrupts.deferred():
                try:
                    xs.x.VM.start(vm_ref, False, False)
                    log.info("started VM %s again", rec["name_label"])
                except Exception as exc:
                    log.error(
                        "could not start VM %s again: %s; start it in XenCenter", rec["name_label"], exc
                    )


# ------------------------------------------------------------------------------------ the plan
def plan(
    xs: Xen, snap_disks: list[Disk], latest: Point | None, tokens: dict[str, Any], *, uuid: str,
    fresh: set[str], full: bool,
) -> list[DiskPlan]:  # fmt: skip
    """What to read of each disk, and why a disk is read whole."""
    x = xs.x
    same_vm = latest is not None and (latest.config or {}).get("uuid") == uuid
    out = []
    for d in snap_disks:
        prev = tokens.get(d.name)
        why = snapshots.why_full(full=full, fresh=d.name in fresh, latest=latest, same_vm=same_vm, prev=prev,
                                 size=d.size, token="base snapshot")  # fmt: skip
        if why is None:
            try:
                base = x.VDI.get_by_uuid(prev.change_token)
                bitmap = base64.b64decode(x.VDI.list_changed_blocks(base, d.vdi))
            except XenAPI.Failure as exc:
                why = (
                    f"its changed blocks cannot be listed ({failure_text(exc)}): the base snapshot is gone "
                    "or changed block tracking was turned off"
                )
            else:
                out.append(DiskPlan(d, bitmap_extents(bitmap, CBT_BLOCK, d.size), None))
                continue
        log.warning("disk %s of VM %s is read whole: %s", d.name, uuid, why)
        out.append(DiskPlan(d, None, why))
    return out


def _retire(xs: Xen, latest: Point | None, tokens: dict[str, Any]) -> None:
    """The previous base gives up its data: only CBT metadata stays on the SR; its snapshot record
    goes.  Failures are logged: the next backup reads what it cannot list whole."""
    x = xs.x
    for t in tokens.values():
        if not t.change_token:
            continue
        try:
            vdi = x.VDI.get_by_uuid(t.change_token)
            if x.VDI.get_type(vdi) != "cbt_metadata":
                x.VDI.data_destroy(vdi)
        except XenAPI.Failure as exc:
            log.warning("could not empty the previous base VDI %s: %s", t.change_token, failure_text(exc))
    base = ((latest.config or {}) if latest else {}).get("base_snapshot")
    if base:
        with contextlib.suppress(XenAPI.Failure):  # already gone
            x.VM.destroy(x.VM.get_by_uuid(base))


# ------------------------------------------------------------------------------------ the backup
def _source(xs: Xen, p: DiskPlan, transports: dict[str, str], chunk_size: int) -> NbdSource | ExportSource:
    """NBD where a host serves the disk that way, else XAPI's HTTP export (and the log says so)."""
    d = p.disk

    def nbd_info() -> dict[str, Any]:
        info = xs.x.VDI.get_nbd_info(d.vdi)
        if not info:
            raise Unreachable(f"no host of {xs.hv.name} serves disk {d.name} over NBD any more")
        return dict(info[0])

    if xs.x.VDI.get_nbd_info(d.vdi):
        transports[d.name] = "nbd"
        return NbdSource(nbd_info, name=d.name, vdi_uuid=d.vdi_uuid, size=d.size, areas=p.areas,
                         verify=not xs.hv.insecure, chunk_size=chunk_size)  # fmt: skip
    log.warning(
        "no host of %s serves disk %s over NBD (no network with purpose 'nbd' reaches it): reading it over "
        "HTTP /export_raw_vdi, whole", xs.hv.name, d.name,
    )  # fmt: skip
    transports[d.name] = "http"
    return ExportSource(
        xs, vdi=d.vdi, name=d.name, vdi_uuid=d.vdi_uuid, size=d.size, incremental=p.incremental
    )


def back_up(
    repo: Repository, xs: Xen, vm_name: str, *, name: str | None, options: Options, source_url: str,
    progress: Callable[[int], None] = lambda n: None, progress_total: Callable[[int], None] = lambda n: None,
) -> tuple[Point, list[DiskStats], list[DiskPlan], int, str]:  # fmt: skip
    """Back up VM *vm_name* (name label, UUID or ref) as a restore point of *name* (default: its name
    label); returns the point, the disks' figures, what was read of each and why, the bytes the
    transports delivered, and which were used ("NBD", "HTTP" or both)."""
    if options.mode not in MODES:
        raise BadInput(f"unknown backup mode {options.mode!r}", hint=f"one of {', '.join(MODES)}")
    x = xs.x
    vm_ref, rec = find_vm(xs, vm_name)
    point_vm = check_name("VM", name or rec["name_label"])
    sources: list[NbdSource | ExportSource] = []
    transports: dict[str, str] = {}  # disk -> "nbd" or "http"
    with contextlib.ExitStack() as stack:
        stack.enter_context(repo.backing_up(point_vm, wait=options.wait))  # first: a second backup of
        # the VM never touches our snapshot
        remove_stale_snapshots(repo, xs, rec)
        live = disks(xs, rec)
        if not live:
            raise BadInput(f"VM {rec['name_label']} has no virtual disks to back up")
        fresh = {d.name for d in live if not d.cbt_enabled}
        for d in live:
            if d.name in fresh:
                log.warning("changed block tracking was off on disk %s of %s: enabled now; it is read whole",
                            d.name, rec["name_label"])  # fmt: skip
                x.VDI.enable_cbt(d.vdi)
        if options.mode == "offline":
            stack.enter_context(offline(xs, vm_ref, rec))
        snap = Snapshot(xs, vm_ref, owner=snapshots.owner(repo), mode=options.mode)
        stack.callback(snap.close)
        srec = x.VM.get_record(snap.ref)
        snap_disks = disks(xs, srec)
        latest = repo.catalog.latest_point(point_vm)
        tokens = {d.name: d for d in repo.catalog.disks(latest.id)} if latest else {}
        plans = plan(xs, snap_disks, latest, tokens, uuid=rec["uuid"], fresh=fresh, full=options.full)
        if options.mode == "memory" and srec.get("suspend_VDI", "OpaqueRef:NULL") != "OpaqueRef:NULL":
            v = x.VDI.get_record(srec["suspend_VDI"])
            memory = Disk("memory", "memory", "", srec["suspend_VDI"], v["uuid"], int(v["virtual_size"]),
                          True, False, "RO")  # fmt: skip
            plans.append(DiskPlan(memory, None, "the memory image is always read whole"))
        config = {
            "platform": "xen", "source": source_url, "hypervisor": xs.hv.name, "uuid": rec["uuid"],
            "name": rec["name_label"], "record": record(xs, rec, live), "mode": options.mode,
            "transport": transports, "base_snapshot": srec["uuid"],
            "full_reads": {p.disk.name: p.why_full for p in plans if not p.incremental},
        }  # fmt: skip
        try:
            jobs = []
            for p in plans:
                src = _source(xs, p, transports, repo.config.chunk_size)
                sources.append(src)
                jobs.append(
                    DiskJob(p.disk.name, src, p.areas, None if p.disk.name == "memory" else p.disk.vdi_uuid)
                )
            point, stats = run_backup(
                repo, point_vm, jobs, config=config, progress=progress, progress_total=progress_total,
                precommit=snap.still_there,
            )  # fmt: skip
        finally:
            for src in sources:
                src.close()
        snap.keep(point)
        _retire(xs, latest, tokens)
    used = "+".join(t.upper() for t in sorted(set(transports.values()), reverse=True))
    return point, stats, plans, sum(s.received for s in sources), used
