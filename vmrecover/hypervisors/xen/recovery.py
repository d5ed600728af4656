"""Instant recovery on a XenServer / XCP-ng pool: a recovery session published as an NFS SR and a VM.

``publish`` (``recover start --to xen://POOL``):

1. the repository's NFS export runs and allows every host of the pool (recovery/exports.py);
2. the session gets its SR folder (vfs/srlayout.py: ``recover/<session>/<SR uuid>/<VDI uuid>.raw``,
   the layout xapi-project/sm's NFSSR driver expects, served by the same vfs core over NFS and FUSE);
3. ``SR.introduce`` with that UUID (a shared ``nfs`` SR named ``vmrecover-<session>``; one whose name
   another SR of the pool has is refused), then a ``PBD`` per host with ``server`` = this appliance,
   ``serverpath`` = ``/vmrecover/recover/<session>``, ``nfsversion`` = 3, each plugged: the hosts'
   own SM mounts it, probes it and takes its raw files as VDIs at ``SR.scan``.  Introduce, not
   ``SR.create``: create makes a folder of a UUID XAPI picks, while the session's SR must be the one
   the vfs shows; and a retried ``recover start`` finds (reuses) the same SR;
4. ``VM.create`` from the point's stored record with VBDs on those VDIs (restore.create_vm, the same
   VM a full restore makes), started if asked.

One SR per session, not one per appliance: a session's VDIs then appear only where it is published
(another pool mounting the appliance sees nothing of it), and ``stop`` ends it by forgetting the SR,
with no shared state to count.

Each step first records itself in the session's target, so that one undo path, ``unpublish``, serves
a failure half-way, a SIGTERM and ``recover stop``: shut the VM down and destroy it (never its disks'
data: the VDIs of the SR are the session's), unplug and destroy the PBDs, ``SR.forget``, stop the export
if nothing else is published.  ``migrate`` moves the VM's disks to a production SR (``VDI.pool_migrate``
while it runs: storage live migration; ``VDI.copy`` and new VBDs when halted), then releases the SR the
same way, leaving the VM alone.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import XenAPI

from ... import interrupts
from ...beneath import Beneath
from ...errors import BadInput, NotFound, Unreachable
from ...recovery import exports, sessions
from ...repo.catalog import Point, Session
from ...repo.repository import Repository
from ...vfs import srlayout
from .. import publishing
from . import restore
from .session import Xen, failure_text

log = logging.getLogger("vmrecover.xen")
NULL = "OpaqueRef:NULL"


@dataclass
class Published:
    platform: str  # "xen"
    hypervisor: str
    sr: str  # SR uuid (uuids, not refs: refs do not survive a xapi restart)
    sr_name: str
    serverpath: str
    appliance: str  # the address the hosts mount the export from
    vm: str = ""  # VM uuid, once created
    vm_name: str = ""


def published(repo: Repository, session: Session) -> Published | None:
    doc = sessions.target(repo, session)
    return None if doc is None or doc.get("platform") != "xen" else Published(**doc)


def _record(repo: Repository, session: Session, target: Published) -> Published:
    sessions.set_target(repo, session, asdict(target))
    return target


def _check_sr_name(xs: Xen, name: str, sr_uuid: str) -> None:
    for ref in xs.x.SR.get_by_name_label(name):
        r = xs.x.SR.get_record(ref)
        if r["uuid"] != sr_uuid:
            raise BadInput(
                f"pool {xs.hv.name} already has an SR named {name!r} (UUID {r['uuid']}, type {r['type']}); "
                "nothing was created",
                hint="start the session under another --name, or rename or forget that SR",
            )


def _find(xs: Xen, cls: str, uuid: str) -> str | None:
    try:
        return str(getattr(xs.x, cls).get_by_uuid(uuid))
    except XenAPI.Failure as exc:
        if exc.details and exc.details[0] in ("UUID_INVALID", "HANDLE_INVALID"):
            return None
        raise


def _attach(xs: Xen, target: Published) -> str:
    """The session's SR, introduced (or found again), with a plugged PBD on every host of the pool."""
    x = xs.x
    sr = _find(xs, "SR", target.sr)
    if sr is None:
        with interrupts.deferred():
            sr = str(x.SR.introduce(
                target.sr, target.sr_name, f"vmrecover instant recovery: {target.serverpath} on "
                f"{target.appliance}; 'vmrecover recover stop' removes it", "nfs", "user", True, {},
            ))  # fmt: skip
    device_config = {"server": target.appliance, "serverpath": target.serverpath, "nfsversion": "3"}
    pbds = {str(x.PBD.get_host(p)): str(p) for p in x.SR.get_PBDs(sr)}
    for host in x.host.get_all():
        if str(host) not in pbds:
            pbds[str(host)] = str(x.PBD.create({
                "host": host, "SR": sr, "device_config": device_config, "other_config": {},
            }))  # fmt: skip
    for host, pbd in pbds.items():
        if x.PBD.get_currently_attached(pbd):
            continue
        try:
            x.PBD.plug(pbd)
        except XenAPI.Failure as exc:
            raise Unreachable(
                f"host {x.host.get_name_label(host)} of {xs.hv.name} cannot attach the session's SR "
                f"nfs://{target.appliance}{target.serverpath}/{target.sr}: {failure_text(exc)}",
                hint="the pool's hosts must reach this appliance on TCP 111 and 2049 (its firewall, their "
                "storage network); see the host's /var/log/SMlog",
            ) from None
    return sr


def _vdis(repo: Repository, xs: Xen, session: Session, sr: str, vm_name: str, disks: list[Any]) -> list[str]:
    """The VDI of each disk, as ``SR.scan`` found them in the session's SR folder."""
    x = xs.x
    x.SR.scan(sr)
    out = []
    for d in disks:
        uuid = srlayout.vdi_uuid(repo.config.id, session.id, d.name)
        vdi = _find(xs, "VDI", uuid)
        if vdi is None:
            raise Unreachable(
                f"scanning the session's SR on {xs.hv.name} did not find disk {d.name} (VDI {uuid})",
                hint="the SR driver could not read the appliance's export: see the host's /var/log/SMlog",
            )
        x.VDI.set_name_label(vdi, f"{vm_name} {d.name}")
        out.append(vdi)
    return out


def publish(
    repo: Repository, xs: Xen, session: Session, point: Point, *, power_on: bool = False,
    passphrase: str | None = None,
) -> Published:  # fmt: skip
    rec = restore.check_point(point)
    vbds, disks = restore.vbd_disks(repo, point, rec)
    x = xs.x
    hosts = x.host.get_all_records()
    addresses = sorted({r["address"] for r in hosts.values() if r.get("address")})
    master = x.pool.get_master(x.pool.get_all()[0])
    if not addresses or not hosts[master].get("address"):
        raise Unreachable(f"the hosts of {xs.hv.name} report no address to allow on the NFS export")
    vm_name = session.name
    restore.check_name(xs, vm_name, chosen=True)
    sr_uuid = srlayout.sr_uuid(repo.config.id, session.id)
    target = Published(
        "xen", xs.hv.name, sr_uuid, f"vmrecover-{session.name}",
        f"{exports.EXPORT_PATH}/recover/{session.name}", publishing.route_address(hosts[master]["address"]),
    )  # fmt: skip
    _check_sr_name(xs, target.sr_name, sr_uuid)
    try:
        _record(repo, session, target)
        exports.ensure(repo.root, addresses, passphrase=passphrase)
        with contextlib.suppress(FileExistsError):
            Beneath(repo.session_dir(session.id) / "upper").mkdir(sr_uuid, 0o755)
        sr = _attach(xs, target)
        vdis = _vdis(repo, xs, session, sr, vm_name, disks)
        undo = restore.Undo(xs)
        nets = restore.networks(xs, list(dict.fromkeys(v["network"] for v in rec.get("vifs", []))))
        try:
            vm = restore.create_vm(xs, undo, rec, vm_name, list(zip(vbds, vdis, strict=True)),
                                   list(rec.get("vifs", [])), nets, new_identity=False)  # fmt: skip
            with interrupts.deferred():
                target = _record(repo, session, replace(target, vm=x.VM.get_uuid(vm), vm_name=vm_name))
        except BaseException:
            undo.undo()
            raise
        log.info("session %s runs on %s as VM %s from SR %s", session.name, xs.hv.name, vm_name, sr_uuid)
        if power_on:
            x.VM.start(vm, False, False)
        return target
    except BaseException:
        with interrupts.deferred():
            try:
                unpublish(repo, xs, session, published(repo, session) or target)
            except Exception as exc:
                log.error("could not undo all of session %s on %s: %s", session.name, xs.hv.name, exc)
        raise


def _on_sr(xs: Xen, vm: str, sr: str) -> list[str]:
    """The VBDs of *vm* whose VDI is on *sr*."""
    x = xs.x
    out = []
    for vbd in x.VM.get_VBDs(vm):
        vdi = x.VBD.get_VDI(vbd)
        if vdi != NULL and x.VDI.get_SR(vdi) == sr:
            out.append(str(vbd))
    return out


def _remove_vm(xs: Xen, target: Published, sr: str | None) -> None:
    x = xs.x
    vm = _find(xs, "VM", target.vm) if target.vm else None
    if vm is None:
        return
    if sr is None or not _on_sr(xs, vm, sr):
        log.warning("VM %s no longer runs from the appliance's SR: left as it is", target.vm_name)
        return
    if x.VM.get_power_state(vm) != "Halted":
        x.VM.hard_shutdown(vm)
    x.VM.destroy(vm)  # its VBDs and VIFs with it; the VDIs are the session's, forgotten with the SR
    log.info("destroyed VM %s (%s) on %s", target.vm_name, target.vm, xs.hv.name)


def _release(repo: Repository, xs: Xen, session: Session, target: Published, sr: str | None) -> None:
    """Unplug and destroy the SR's PBDs, forget the SR, forget the target (and stop the export if
    nothing else is published)."""
    x = xs.x
    if sr is not None:
        for pbd in x.SR.get_PBDs(sr):
            if x.PBD.get_currently_attached(pbd):
                x.PBD.unplug(pbd)
            x.PBD.destroy(pbd)
        x.SR.forget(sr)
        log.info("forgot SR %s (%s) on %s", target.sr_name, target.sr, xs.hv.name)
    publishing.forget(repo, session)


def unpublish(repo: Repository, xs: Xen, session: Session, target: Published) -> None:
    """Undo *target* in reverse: the VM (only while it runs from the session's SR), then the SR."""
    try:
        sr = _find(xs, "SR", target.sr)
        _remove_vm(xs, target, sr)
        _release(repo, xs, session, target, sr)
    except XenAPI.Failure as exc:
        raise Unreachable(
            f"undoing session {session.name} on {xs.hv.name} failed: {failure_text(exc)}",
            hint=f"VM {target.vm_name or '-'} ({target.vm or 'not created'}) and SR {target.sr_name} "
            f"({target.sr}) may be left; fix the cause and stop the session again",
        ) from None


def _dest_sr(xs: Xen, wanted: str, target: Published, disks: list[Any]) -> str:
    if wanted in (target.sr, target.sr_name):
        raise BadInput(f"{wanted} is the appliance's own SR", hint="name a production SR of the pool")
    size = sum(d.size for d in disks)
    ref, _ = restore.pick_sr(xs, wanted, sizes=size, data=size)
    return ref


def migrate(repo: Repository, xs: Xen, session: Session, target: Published, to_sr: str) -> dict[str, Any]:
    """Move the recovered VM's disks to *to_sr* (live if it runs), then release the session's SR."""
    x = xs.x
    vm = _find(xs, "VM", target.vm) if target.vm else None
    sr = _find(xs, "SR", target.sr)
    if vm is None or sr is None:
        raise NotFound(
            f"the VM or SR of session {session.name} is gone from {xs.hv.name}",
            hint="'vmrecover recover stop --force' drops the session",
        )
    dest = _dest_sr(xs, to_sr, target, repo.catalog.disks(session.point))
    running = x.VM.get_power_state(vm) == "Running"
    moved = []
    for vbd in _on_sr(xs, vm, sr):
        vdi, device = x.VBD.get_VDI(vbd), x.VBD.get_userdevice(vbd)
        label = x.VDI.get_name_label(vdi)  # the source is destroyed once a storage migration is done
        what = f"moving disk {device} of {target.vm_name} to SR {to_sr}"
        log.info("%s (%s)", what, "live, VDI.pool_migrate" if running else "halted, VDI.copy")
        if running:
            new = xs.wait(x.Async.VDI.pool_migrate(vdi, dest, {}), what)
        else:
            new = xs.wait(x.Async.VDI.copy(vdi, dest, NULL, NULL), what)
            r = x.VBD.get_record(vbd)
            keep = ("userdevice", "bootable", "mode", "type", "unpluggable", "empty", "other_config",
                    "qos_algorithm_type", "qos_algorithm_params")  # fmt: skip
            with interrupts.deferred():
                x.VBD.destroy(vbd)
                x.VBD.create({**{k: r[k] for k in keep}, "VM": vm, "VDI": new})
        x.VDI.set_name_label(new, label)
        moved.append({"userdevice": device, "vdi": x.VDI.get_uuid(new)})
    left = _on_sr(xs, vm, sr)
    if left:
        raise Unreachable(f"{len(left)} disk(s) of {target.vm_name} are still on the appliance's SR")
    _release(repo, xs, session, target, sr)
    log.info("moved %s to SR %s; it no longer needs the appliance", target.vm_name, to_sr)
    return {"live": running, "disks": moved}
