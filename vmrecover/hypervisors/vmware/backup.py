"""Backing up a vSphere VM the way VADP-based products do: snapshot, changed block tracking, read the
frozen disks, remove the snapshot.

1. Find the VM (by moref or unique name); remove snapshots a crash of ours left (named
   ``vmrecover-...``; any other snapshot is never touched).
2. Enable changed block tracking if it is off (and say so: this backup is then full).
3. Take the writer lock of the repository, then create the snapshot (quiesced or with memory on
   request).  **It is always removed**: on success, on failure, on SIGTERM or ^C (signals wait while
   it is being removed).
4. For each disk of the snapshot: ``QueryChangedDiskAreas`` against the changeId stored with the VM's
   latest point (``*`` for a full backup) gives the areas to read; a changeId the host no longer
   accepts, a disk that grew, a latest point of another VM or a disk it did not have make that disk a
   full read, and the log says why.
5. The pipeline reads those areas of the frozen disk over HTTP and commits the point with the VM's
   configuration (the .vmx and a hardware summary) and each disk's new changeId.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from ... import interrupts
from ...errors import BadInput, Unreachable
from ...ingest.extents import merged
from ...ingest.pipeline import DiskJob, DiskStats, run_backup
from ...repo.catalog import Point, check_name
from ...repo.repository import Repository
from .. import snapshots
from . import hardware
from .hardware import DiskInfo
from .http import DatastoreFiles, DsPath
from .session import VSphere, fault_text
from .source import VmdkSource

log = logging.getLogger("vmrecover.vmware")


@dataclass
class Options:
    quiesce: bool = False
    memory: bool = False
    full: bool = False
    wait: float | None = None  # for the repository's locks: seconds, None as long as it takes


@dataclass
class DiskPlan:
    disk: DiskInfo
    areas: list[tuple[int, int]]  # what to read: changed areas (incremental) or allocated ones (full)
    incremental: bool
    why_full: str | None = None


# ------------------------------------------------------------------------------------ snapshots
def _snapshot_tree(vs: VSphere, vm: Any) -> Iterator[Any]:
    """Every snapshot of *vm* (vim.vm.SnapshotTree nodes)."""
    info = vs.prop(vm, "snapshot")
    todo = list(getattr(info, "rootSnapshotList", None) or [])
    while todo:
        node = todo.pop()
        yield node
        todo.extend(node.childSnapshotList or [])


def remove_stale_snapshots(repo: Repository, vs: VSphere, vm: Any) -> list[str]:
    """Remove the snapshots an interrupted vmrecover left on *vm* (ours by name, and only when their
    maker is gone: another backup of the VM may be reading one); return their names."""
    removed, me = [], snapshots.owner(repo)
    for node in list(_snapshot_tree(vs, vm)):
        if not node.name.startswith(snapshots.PREFIX):
            continue
        why = snapshots.stale(str(node.description or ""), getattr(node, "createTime", None), me)
        if why is None:
            log.warning(
                "snapshot %r of %s belongs to a backup that may still run: left alone", node.name, vm._moId
            )
            continue
        log.warning("removing snapshot %r left on %s by an interrupted backup: %s", node.name, vm._moId, why)
        with interrupts.deferred():
            _remove(vs, node.snapshot, node.name)
        removed.append(node.name)
    return removed


def _remove(vs: VSphere, snap: Any, name: str) -> None:
    vs.wait(snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True), f"removing snapshot {name!r}")


@contextlib.contextmanager
def snapshot(vs: VSphere, vm: Any, *, owner: dict[str, Any], quiesce: bool, memory: bool) -> Iterator[Any]:
    """A snapshot of *vm* for the block: created, and removed whatever happens in the block.  SIGTERM
    and ^C wait while it is being created and while it is being removed, so that neither can leave it."""
    name = snapshots.new_name()
    description = snapshots.description(owner)
    with interrupts.deferred():
        task = vm.CreateSnapshot_Task(name=name, description=description, memory=memory, quiesce=quiesce)
        fault = vs.task_error(task)
        snap = None if fault else next((n.snapshot for n in _snapshot_tree(vs, vm) if n.name == name), None)
    if fault is not None:
        hint = (
            "quiescing needs VMware Tools running in the guest; back up without --quiesce"
            if quiesce
            else None
        )
        raise Unreachable(f"cannot snapshot VM {vm._moId} on {vs.hv.name}: {fault_text(fault)}", hint=hint)
    if snap is None:
        raise Unreachable(f"snapshot {name!r} of VM {vm._moId} vanished right after it was made")
    try:
        yield snap
    finally:
        with interrupts.deferred():
            try:
                _remove(vs, snap, name)
                log.info("removed snapshot %r of %s", name, vm._moId)
            except Exception as exc:
                log.error(
                    "could not remove snapshot %r of VM %s on %s: %s; the next backup removes it, or remove "
                    "it in vSphere", name, vm._moId, vs.hv.name, exc,
                )  # fmt: skip


def still_there(vs: VSphere, vm: Any, snap: Any) -> None:
    """Refuse to commit a point whose snapshot was removed while it was read (its bytes may mix)."""
    if not any(n.snapshot == snap for n in _snapshot_tree(vs, vm)):
        raise Unreachable(
            f"the snapshot of VM {vm._moId} was removed on {vs.hv.name} while the backup read it: "
            "what was read may mix two moments, so no point is kept",
            hint="run the backup again; make sure nothing else removes vmrecover-* snapshots meanwhile",
        )


# ------------------------------------------------------------------------------------ CBT
def enable_cbt(vs: VSphere, vm: Any) -> bool:
    """Turn changed block tracking on; False if it already was."""
    if vs.prop(vm, "config.changeTrackingEnabled"):
        return False
    vs.wait(
        vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)),
        "enabling changed block tracking",
    )
    return True


def changed_areas(vs: VSphere, vm: Any, snap: Any, disk: DiskInfo, change_id: str) -> list[tuple[int, int]]:
    """``QueryChangedDiskAreas`` over the whole disk (the host answers in pieces), clipped to the disk,
    sorted and merged."""
    raw: list[tuple[int, int]] = []
    start = 0
    while start < disk.capacity:
        info = vm.QueryChangedDiskAreas(
            snapshot=snap, deviceKey=disk.key, startOffset=start, changeId=change_id
        )
        raw.extend((int(a.start), int(a.length)) for a in info.changedArea or [])
        nxt = int(info.startOffset) + int(info.length)
        if nxt <= start:
            raise Unreachable(f"QueryChangedDiskAreas of disk {disk.name} made no progress at offset {start}")
        start = nxt
    return merged(raw, disk.capacity)


# ------------------------------------------------------------------------------------ the backup
def plan(
    vs: VSphere, vm: Any, snap: Any, disks: list[DiskInfo], latest: Point | None,
    latest_tokens: dict[str, Any], *, uuid: str, cbt_fresh: bool, full: bool,
) -> list[DiskPlan]:  # fmt: skip
    """What to read of each disk, and why a disk is read whole."""
    same_vm = latest is not None and (latest.config or {}).get("instance_uuid") == uuid
    out = []
    for d in disks:
        prev = latest_tokens.get(d.name)
        why = snapshots.why_full(full=full, fresh=cbt_fresh, latest=latest, same_vm=same_vm, prev=prev,
                                 size=d.capacity, token="changeId")  # fmt: skip
        if why is None:
            try:
                out.append(DiskPlan(d, changed_areas(vs, vm, snap, d, prev.change_token), True))
                continue
            except Exception as exc:
                why = f"the host no longer accepts its changeId ({fault_text(exc)})"
        log.warning("disk %s of %s is read whole: %s", d.name, vm._moId, why)
        try:
            areas = changed_areas(vs, vm, snap, d, "*")  # the allocated areas
        except Exception as exc:
            log.warning("no allocation map for disk %s (%s): reading all of it", d.name, fault_text(exc))
            areas = [(0, d.capacity)]
        out.append(DiskPlan(d, areas, False, why))
    return out


def back_up(
    repo: Repository, vs: VSphere, vm_ref: str, *, name: str | None, options: Options, source_url: str,
    progress: Callable[[int], None] = lambda n: None, progress_total: Callable[[int], None] = lambda n: None,
) -> tuple[Point, list[DiskStats], list[DiskPlan], int]:  # fmt: skip
    """Back up VM *vm_ref* as a restore point of *name* (default: its vSphere name); returns the point,
    the disks' figures, what was read of each and why, and the bytes the HTTP transfers received."""
    vm = vs.vm(vm_ref)
    info = vs.props([vm], ["name", "config.instanceUuid", "config.uuid", "config.files.vmPathName"])[0]
    vm_name = check_name("VM", name or info["name"])
    files = DatastoreFiles(vs, vs.datacenter_path(vm))
    with contextlib.ExitStack() as stack:
        stack.enter_context(repo.backing_up(vm_name, wait=options.wait))  # first: a second backup of
        # the VM never touches our snapshot
        remove_stale_snapshots(repo, vs, vm)
        cbt_fresh = enable_cbt(vs, vm)
        if cbt_fresh:
            log.warning(
                "changed block tracking was off on %s: enabled now; this backup is full", info["name"]
            )
        snap = stack.enter_context(
            snapshot(vs, vm, owner=snapshots.owner(repo), quiesce=options.quiesce, memory=options.memory)
        )
        snap_config = vs.prop(snap, "config")
        devices = list(snap_config.hardware.device)
        skipped = {d.name: d.mode for d in hardware.disks(devices) if d.mode.startswith("independent")}
        for disk, mode in skipped.items():
            log.warning(
                "disk %s of %s is %s: a snapshot does not freeze it; not backed up", disk, info["name"], mode
            )
        disks = [d for d in hardware.disks(devices) if d.name not in skipped]
        if not disks:
            raise BadInput(f"VM {info['name']} has no virtual disks to back up (independent disks are not)")
        latest = repo.catalog.latest_point(vm_name)
        tokens = {d.name: d for d in repo.catalog.disks(latest.id)} if latest else {}
        plans = plan(
            vs, vm, snap, disks, latest, tokens, uuid=info["config.instanceUuid"], cbt_fresh=cbt_fresh,
            full=options.full,
        )  # fmt: skip
        vmx = DsPath.parse(info["config.files.vmPathName"])
        config = {
            "platform": "vmware", "source": source_url, "hypervisor": vs.hv.name, "moref": vm._moId,
            "name": info["name"], "uuid": info.get("config.uuid"),
            "instance_uuid": info["config.instanceUuid"],
            "vmx_path": str(vmx), "vmx": files.get(vmx).decode("utf-8", "replace"),
            "hardware": hardware.summary(snap_config, devices),
            "snapshot": {"quiesced": options.quiesce, "memory": options.memory},
            "full_reads": {p.disk.name: p.why_full for p in plans if not p.incremental},
            "skipped_disks": {d: f"{m}: snapshots do not freeze it" for d, m in skipped.items()},
        }  # fmt: skip
        sources = []
        try:
            jobs = []
            for p in plans:
                src = VmdkSource(
                    files, p.disk, p.areas, chunk_size=repo.config.chunk_size, incremental=p.incremental
                )
                sources.append(src)
                jobs.append(DiskJob(p.disk.name, src, p.areas if p.incremental else None, p.disk.change_id))
            point, stats = run_backup(
                repo, vm_name, jobs, config=config, progress=progress, progress_total=progress_total,
                precommit=lambda: still_there(vs, vm, snap),
            )  # fmt: skip
        finally:
            for src in sources:
                src.close()
            files.close()
    return point, stats, plans, files.received
