"""Full restore of a XenServer / XCP-ng restore point to a pool, the way XenCenter's disk import does it.

1. Only a point backed up from XenServer is taken (its ``config["record"]`` describes the VM); a name
   clash with a VM of the pool (not a template or snapshot) is refused: ``--name`` gives another name.
2. The SR: ``--sr`` (name label or UUID), else the pool's default SR; one that holds no virtual disks
   (ISO libraries, removable media) or has too little free space is refused before anything is made.
3. Per disk of the point: ``VDI.create`` (the disk's size, type user), then ``PUT /import_raw_vdi``
   streams the point's bytes, read through the repository's verifying reader, in disk order with a
   Content-Length (XAPI's raw import has no sparse mode: holes are sent as zeros, from one buffer, so
   memory stays constant whatever the disk's size).
4. ``VM.create`` from the stored record (memory, vCPUs, platform flags, boot settings), then VBDs in
   the stored userdevice order (bootable, mode) and VIFs on the networks of the stored names (a
   network the pool lacks: its first non-internal one, said in the result).
5. Identity: XAPI makes a new UUID at ``VM.create`` and lets nobody choose it, so the copy's UUID is
   always new (and the result says so); the MAC addresses are the original's, what matters on the
   network, unless ``--new-identity`` (empty MACs: XAPI generates them, from a new seed).
   ``--no-network`` creates no VIFs.
6. On any failure or SIGTERM what was created (VIFs, VBDs, the VM, the VDIs) is destroyed in reverse
   order and the error raised; each create and its recording hold off SIGTERM (``interrupts.deferred``),
   so nothing is created without being known.  ``--power-on`` starts the VM last: if only that fails,
   the complete VM is kept and the error says so.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import urllib3
import XenAPI

from ... import interrupts
from ...errors import BadInput, CorruptChunk, IntegrityError, NoSpace, NotFound, Unreachable, VmrecoverError
from ...repo.blob import ZERO_DIGEST
from ...repo.catalog import Disk, Point
from ...repo.reader import read_disk, read_pool
from ...repo.repository import Repository
from .inventory import UUID
from .session import Xen, failure_text

log = logging.getLogger("vmrecover.xen")
NULL = "OpaqueRef:NULL"
UNDO_TRIES = 10  # a VDI whose import was cut may stay busy a moment on the host
BUSY = ("VDI_IN_USE", "OTHER_OPERATION_IN_PROGRESS")
NOT_DISK_SR = ("iso", "udev")  # SR types / content types that hold no virtual disks
THICK_SR = ("lvm", "lvmoiscsi", "lvmohba", "lvmofcoe")  # a VDI takes its whole size at creation
VM_DEFAULTS: dict[str, Any] = {  # what VM.create wants besides the stored record (XAPI's defaults)
    "name_description": "", "user_version": "1", "affinity": NULL, "VCPUs_params": {},
    "actions_after_shutdown": "destroy", "actions_after_reboot": "restart", "actions_after_crash": "restart",
    "PV_bootloader": "", "PV_kernel": "", "PV_ramdisk": "", "PV_args": "", "PV_bootloader_args": "",
    "PV_legacy_args": "", "HVM_boot_policy": "BIOS order", "HVM_boot_params": {"order": "cd"},
    "platform": {}, "PCI_bus": "", "other_config": {}, "recommendations": "",
}  # fmt: skip


def check_point(point: Point) -> dict[str, Any]:
    """The stored VM record of a XenServer point; any other point is refused, saying why."""
    config = point.config or {}
    platform = config.get("platform")
    if platform != "xen" or not isinstance(config.get("record"), dict):
        what = {None: "disk images", "vmware": "VMware vSphere"}.get(platform, str(platform))
        raise BadInput(
            f"restore point {point.vm}@{point.id} was backed up from {what}, not from XenServer / XCP-ng: "
            "there is no XenServer VM description to create the VM from",
            hint="restore its disks with 'vmrecover restore --to FILE' and import them, or choose a point "
            "of a xen:// backup (restoring other points to a pool may come later)",
        )
    return dict(config["record"])


def check_name(xs: Xen, name: str, *, chosen: bool) -> None:
    x = xs.x
    for ref in x.VM.get_by_name_label(name):
        r = x.VM.get_record(ref)
        if not (r["is_a_template"] or r["is_a_snapshot"] or r["is_control_domain"]):
            raise BadInput(
                f"a VM named {name!r} exists on {xs.hv.name} (UUID {r['uuid']}); nothing was created",
                hint="choose another free name with --name NEW" if chosen else
                "restore under another name with --name NEW, or remove or rename that VM first",
            )  # fmt: skip


def _sr_list(xs: Xen) -> str:
    recs = xs.x.SR.get_all_records().values()
    return ", ".join(sorted(f"{r['name_label']} ({r['uuid']})" for r in recs if not _not_disks(r))) or "none"


def _not_disks(r: dict[str, Any]) -> bool:
    return r.get("type") in NOT_DISK_SR or r.get("content_type") in NOT_DISK_SR


def pick_sr(xs: Xen, wanted: str | None, *, sizes: int, data: int) -> tuple[str, dict[str, Any]]:
    """The SR *wanted* (name label or UUID), else the pool's default SR; refused if it holds no virtual
    disks or lacks the space: *sizes* (the disks' sizes) on a thick SR, *data* (their data) on a thin
    one."""
    x = xs.x
    if wanted:
        refs: list[str] = []
        if UUID.fullmatch(wanted):
            with contextlib.suppress(XenAPI.Failure):
                refs = [x.SR.get_by_uuid(wanted)]
        if not refs:
            refs = x.SR.get_by_name_label(wanted)
        if not refs:
            raise NotFound(f"{xs.hv.name} has no SR {wanted!r}", hint=f"its disk SRs: {_sr_list(xs)}")
        if len(refs) > 1:
            uuids = ", ".join(x.SR.get_uuid(r) for r in refs)
            raise BadInput(
                f"{len(refs)} SRs are named {wanted!r} on {xs.hv.name}", hint=f"use a UUID: {uuids}"
            )
        ref = refs[0]
    else:
        ref = x.pool.get_default_SR(x.pool.get_all()[0])
        if ref == NULL:
            raise BadInput(
                f"pool {xs.hv.name} has no default SR",
                hint=f"choose one with --sr; its disk SRs: {_sr_list(xs)}",
            )
    r = x.SR.get_record(ref)
    if _not_disks(r):
        kind = r["type"] if r.get("type") in NOT_DISK_SR else r.get("content_type")
        raise BadInput(
            f"SR {r['name_label']} of {xs.hv.name} holds {kind} images, not "
            "virtual disks", hint=f"choose a disk SR with --sr: {_sr_list(xs)}",
        )  # fmt: skip
    free = int(r["physical_size"]) - int(r["physical_utilisation"])
    need = sizes if r["type"] in THICK_SR else data
    if free < need:
        raise NoSpace(
            f"SR {r['name_label']} of {xs.hv.name} has {free} bytes free, the VM's disks need {need}"
            + (" (a thick-provisioned SR: their whole size)" if r["type"] in THICK_SR else " (their data)"),
            hint=f"free space there, or choose another SR with --sr: {_sr_list(xs)}",
        )  # fmt: skip
    return ref, r


def _usable(r: dict[str, Any]) -> bool:
    """A network a guest can use: not the host-internal management network or the installer's."""
    oc = r.get("other_config") or {}
    internal = oc.get("is_host_internal_management_network") == "true" or oc.get("is_guest_installer_network")
    return not internal and r.get("bridge") != "xenapi"


def networks(xs: Xen, names: list[str]) -> dict[str, tuple[str, str] | None]:
    """Each stored network name -> (ref, name) of the pool's network of that name, else of its first
    usable network (said in the log), else None."""
    recs = xs.x.network.get_all_records()
    by_name: dict[str, str] = {}
    for ref, r in recs.items():
        by_name.setdefault(r["name_label"], ref)
    usable = sorted((ref for ref, r in recs.items() if _usable(r)),
                    key=lambda ref: (not recs[ref].get("PIFs"), recs[ref]["name_label"]))  # fmt: skip
    out: dict[str, tuple[str, str] | None] = {}
    for name in names:
        ref = by_name.get(name)
        if ref is None and usable:
            ref = usable[0]
            log.warning("network %r of the VM is not in pool %s: its NICs go on %r", name, xs.hv.name,
                        recs[ref]["name_label"])  # fmt: skip
        elif ref is None:
            log.warning("network %r of the VM is not in pool %s, which has no other: its NICs are left out",
                        name, xs.hv.name)  # fmt: skip
        out[name] = (ref, recs[ref]["name_label"]) if ref is not None else None
    return out


@dataclass
class _Created:
    cls: str  # "VDI", "VM", "VBD", "VIF"
    ref: str
    what: str


class Undo:
    """What this restore created, destroyed in reverse order if it fails."""

    def __init__(self, xs: Xen) -> None:
        self.xs = xs
        self.made: list[_Created] = []

    def create(self, cls: str, record: dict[str, Any], what: str) -> str:
        with interrupts.deferred():  # created and recorded, or neither
            ref = str(getattr(self.xs.x, cls).create(record))
            self.made.append(_Created(cls, ref, what))
        return ref

    def undo(self) -> None:
        with interrupts.deferred():
            for c in reversed(self.made):
                self._destroy(c)
            self.made.clear()

    def _destroy(self, c: _Created) -> None:
        """Destroy *c*; a VDI an aborted import still holds is tried again for a while."""
        for attempt in range(UNDO_TRIES):
            try:
                getattr(self.xs.x, c.cls).destroy(c.ref)
            except XenAPI.Failure as exc:
                code = exc.details[0] if exc.details else ""
                if code == "HANDLE_INVALID":
                    return  # gone with the VM (its VBDs, VIFs)
                if code in BUSY and attempt + 1 < UNDO_TRIES:
                    time.sleep(1)
                    continue
                why = failure_text(exc)
            except Exception as exc:
                why = str(exc)
            else:
                log.info("removed %s %s of the failed restore", c.cls, c.what)
                return
            log.error("could not remove %s %s (%s) from %s: %s; remove it in XenCenter", c.cls, c.what, c.ref,
                      self.xs.hv.name, why)  # fmt: skip
            return


def _data_bytes(repo: Repository, point: Point, d: Disk) -> int:
    index = repo.read_index(point.id, d.name)
    return sum(index.extent(i)[1] for i in range(index.count) if index.digest(i) != ZERO_DIGEST)


def _upload(
    repo: Repository, xs: Xen, point: Point, d: Disk, vdi: str, progress: Callable[[int], None]
) -> int:
    """Stream disk *d* of *point* into *vdi* with ``PUT /import_raw_vdi``; return the bytes sent."""
    what = f"{point.vm}@{point.id} disk {d.name}"
    query = urlencode({"session_id": xs.ref, "vdi": vdi, "format": "raw"})
    pool = urllib3.HTTPSConnectionPool(
        xs.hv.host, xs.hv.port, maxsize=1, ssl_context=xs.ssl, retries=False,
        assert_hostname=False if xs.hv.insecure else None, timeout=urllib3.Timeout(connect=30, read=600),
    )  # fmt: skip
    sent = 0
    try:
        with (
            repo.reading(point, outcome="; what was created on the pool is removed"),
            read_pool("restore") as workers,
        ):
            index = repo.read_index(point.id, d.name)
            chunks = read_disk(repo.chunks, index, workers)
            zeros = memoryview(bytes(index.chunk_size))

            def body() -> Any:
                nonlocal sent
                for i, _, data in chunks:
                    n = index.extent(i)[1]
                    yield zeros[:n] if data is None else data
                    sent += n
                    progress(n)

            stream = body()
            try:
                headers = {"Content-Length": str(index.disk_size), "Content-Type": "application/octet-stream"}
                r = pool.urlopen(
                    "PUT", f"/import_raw_vdi?{query}", body=stream, headers=headers, preload_content=True
                )
            finally:
                stream.close()
                chunks.close()
    except CorruptChunk as exc:
        raise IntegrityError(
            f"restore of {what} failed: chunk {exc.digest.hex()[:16]}… cannot be read: {exc.reason}; "
            "what was created on the pool is removed",
            hint="run 'vmrecover verify' to list every affected restore point, and restore an older point",
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unreachable(f"uploading {what} to {xs.hv.name} failed after {sent} bytes: {exc}") from None
    finally:
        pool.close()
    if r.status != 200:
        raise Unreachable(f"uploading {what} to {xs.hv.name}: HTTP {r.status} {r.data[:200]!r}")
    return sent


def vbd_disks(repo: Repository, point: Point, rec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Disk]]:
    """The stored VBDs of *rec* in userdevice order, and the point's disk of each."""
    by_name = {d.name: d for d in repo.catalog.disks(point.id)}
    vbds = sorted(
        rec.get("vbds", []), key=lambda b: int(b["userdevice"]) if b["userdevice"].isdigit() else 1 << 30
    )
    missing = [b["name"] for b in vbds if b["name"] not in by_name]
    if missing or not vbds:
        raise BadInput(
            f"restore point {point.vm}@{point.id} lacks the disk(s) its VM record names: {missing}"
        )
    if "memory" in by_name:
        log.warning("the memory image of %s@%s is not used: the VM starts from its disks", point.vm, point.id)
    return vbds, [by_name[b["name"]] for b in vbds]


def restore(
    repo: Repository, xs: Xen, point: Point, *, name: str | None = None, sr: str | None = None,
    no_network: bool = False, new_identity: bool = False, power_on: bool = False,
    progress: Callable[[int], None] = lambda n: None, progress_total: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:  # fmt: skip
    """Create the VM of *point* (a XenServer point) on *xs*'s pool; see the module doc."""
    rec = check_point(point)
    config = point.config or {}
    vm_name = name or config.get("name") or rec.get("name_label") or point.vm
    check_name(xs, vm_name, chosen=name is not None)
    vbds, disks = vbd_disks(repo, point, rec)
    sr_ref, sr_rec = pick_sr(xs, sr, sizes=sum(d.size for d in disks),
                         data=sum(_data_bytes(repo, point, d) for d in disks))  # fmt: skip
    vifs = [] if no_network else list(rec.get("vifs", []))
    nets = networks(xs, list(dict.fromkeys(v["network"] for v in vifs)))
    progress_total(sum(d.size for d in disks))
    x, undo = xs.x, Undo(xs)
    out_disks: list[dict[str, Any]] = []
    try:
        vdis = []
        for b, d in zip(vbds, disks, strict=True):
            vdi = undo.create("VDI", {
                "name_label": f"{vm_name}-{d.name}", "SR": sr_ref, "virtual_size": str(d.size),
                "name_description": f"restored by vmrecover from {point.vm}@{point.id} disk {d.name}",
                "type": "user", "sharable": False, "read_only": False, "other_config": {},
                "xenstore_data": {}, "sm_config": {}, "tags": [],
            }, f"{vm_name}-{d.name}")  # fmt: skip
            sent = _upload(repo, xs, point, d, vdi, progress)
            vdis.append(vdi)
            out_disks.append({"name": d.name, "vdi": x.VDI.get_uuid(vdi), "userdevice": b["userdevice"],
                              "bootable": bool(b.get("bootable")), "mode": b.get("mode", "RW"),
                              "size": d.size, "bytes_sent": sent})  # fmt: skip
        vm = create_vm(xs, undo, rec, vm_name, list(zip(vbds, vdis, strict=True)), vifs, nets,
                       new_identity=new_identity)  # fmt: skip
        vm_uuid = x.VM.get_uuid(vm)
        macs = [x.VIF.get_MAC(ref) for ref in x.VM.get_VIFs(vm)]
    except BaseException:
        undo.undo()
        raise
    log.info("restored %s@%s to %s as VM %s (%s)", point.vm, point.id, xs.hv.name, vm_name, vm_uuid)
    if power_on:
        try:
            x.VM.start(vm, False, False)
        except Exception as exc:  # the VM and its disks are there: say so rather than lose track of it
            err = Unreachable(
                f"VM {vm_name} ({vm_uuid}) was restored on {xs.hv.name} with all its disks, but could not be "
                f"started: {exc.message if isinstance(exc, VmrecoverError) else failure_text(exc)}",
                hint="start it in XenCenter once the cause is fixed, or remove it and restore again",
            )
            raise err from None
    used = {v["network"]: (nets.get(v["network"]) or (None, None))[1] for v in rec.get("vifs", [])}
    return {
        "vm": vm_uuid, "name": vm_name, "sr": sr_rec["name_label"], "sr_uuid": sr_rec["uuid"],
        "networks": used,
        "new_identity": new_identity, "original_uuid": config.get("uuid") or rec.get("uuid"),
        "uuid_kept": False,
        "uuid_note": "XAPI gives every VM it creates a new UUID: the copy's is new"
        + ("" if new_identity or no_network else "; its MAC addresses are the original's"),
        "macs": macs, "network_connected": not no_network, "powered_on": power_on,
        "disks": out_disks,
    }  # fmt: skip


def create_vm(
    xs: Xen, undo: Undo, rec: dict[str, Any], vm_name: str, disks: list[tuple[dict[str, Any], str]],
    vifs: list[dict[str, Any]], nets: dict[str, tuple[str, str] | None], *, new_identity: bool,
) -> str:  # fmt: skip
    """``VM.create`` from the stored record *rec*, then a VBD per (stored VBD, VDI ref) of *disks* and a
    VIF per stored VIF on its network of *nets*; all recorded in *undo*.  The VM's ref."""
    x = xs.x
    other_config = dict(rec.get("other_config") or {})
    if new_identity:
        other_config.pop("mac_seed", None)  # XAPI derives generated MACs from it: the original's again
    vm_record = {
        **VM_DEFAULTS,
        **{k: v for k, v in rec.items() if k not in ("uuid", "vifs", "vbds")},
        "name_label": vm_name, "is_a_template": False, "other_config": other_config,
    }  # fmt: skip
    vm = undo.create("VM", vm_record, vm_name)
    for b, vdi in disks:
        undo.create("VBD", {
            "VM": vm, "VDI": vdi, "userdevice": b["userdevice"], "bootable": bool(b.get("bootable")),
            "mode": b.get("mode", "RW"), "type": "Disk", "unpluggable": True, "empty": False,
            "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
        }, f"{vm_name} {b['name']}")  # fmt: skip
    for v in vifs:
        net = nets.get(v["network"])
        if net is None:
            continue
        mtu = v.get("mtu") or x.network.get_MTU(net[0])
        undo.create("VIF", {
            "VM": vm, "network": net[0], "device": str(v["device"]),
            "MAC": "" if new_identity else v["mac"], "MTU": str(mtu),
            "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
        }, f"{vm_name} NIC {v['device']}")  # fmt: skip
    return vm
