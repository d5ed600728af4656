"""Instant recovery on ESXi: a recovery session published as a VM that runs from the appliance.

``publish`` (``recover start --to vmware://...``), each step undone in reverse order if a later one
fails:

1. make sure the repository's NFS export runs and allows the host (recovery/exports.py);
2. mount the export on the host as an NFS datastore (``CreateNasDatastore``; one per appliance,
   named ``vmrecover-<appliance>`` unless ``--datastore-name``, reused by every session; a datastore
   of that name that is something else is a clash, refused);
3. write the recovered VM's .vmx into the session folder (vmx.py), beside the session's disk views;
4. register it (``RegisterVM_Task``) on the host, and power it on if asked.

What was done is kept as the session's target (sessions.set_target: not visible over NFS), which ``unpublish``
(``recover stop``) undoes in reverse: power off, unregister, unmount the datastore if no other session
of this appliance uses it on that host, stop the export if nothing else is published.  ``migrate``
moves the VM to a production datastore with ``RelocateVM_Task`` (Storage vMotion while it runs),
then leaves it there and cleans up as ``unpublish`` does, without touching the VM.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any

from pyVmomi import vim, vmodl

from ... import interrupts
from ...beneath import Beneath
from ...errors import BadInput, NotFound, Unreachable
from ...recovery import exports, sessions
from ...repo.catalog import Point, Session
from ...repo.repository import Repository
from .. import publishing
from . import vmx
from .session import VSphere, fault_text

log = logging.getLogger("vmrecover.vmware")


@dataclass
class Published:
    platform: str
    hypervisor: str
    host: str  # moref
    datastore: str  # name on the host
    vm: str  # moref of the registered VM
    vm_name: str
    vmx: str  # datastore path
    appliance: str  # the address the host mounts the export from


def published(repo: Repository, session: Session) -> Published | None:
    doc = sessions.target(repo, session)
    return None if doc is None or doc.get("platform") != "vmware" else Published(**doc)


def _all_published(repo: Repository) -> list[tuple[Session, Published]]:
    return [(s, Published(**doc)) for s, doc in publishing.targets(repo, "vmware")]


def _host_addresses(vs: VSphere, host: Any) -> list[str]:
    vnics = vs.prop(host, "config.network.vnic") or []
    return sorted({v.spec.ip.ipAddress for v in vnics if v.spec and v.spec.ip and v.spec.ip.ipAddress})


def _mount(vs: VSphere, host: Any, name: str, remote: str) -> Any:
    """The NFS datastore *name* on *host* for ``remote:/vmrecover``: found (reused) or created."""
    for ds in vs.prop(host, "datastore") or []:
        doc = vs.props([ds], ["summary.name", "info"])[0]
        if doc.get("summary.name") != name:
            continue
        nas = getattr(doc.get("info"), "nas", None)
        if nas is not None and nas.remoteHost == remote and nas.remotePath == exports.EXPORT_PATH:
            return ds
        where = f"{nas.remoteHost}:{nas.remotePath}" if nas is not None else "not this appliance's export"
        raise BadInput(
            f"host {vs.prop(host, 'name')} already has a datastore named {name!r} ({where})",
            hint="choose another name with --datastore-name",
        )
    spec = vim.host.NasVolume.Specification(
        remoteHost=remote, remotePath=exports.EXPORT_PATH, localPath=name, accessMode="readWrite", type="NFS"
    )
    system = vs.prop(host, "configManager.datastoreSystem")
    try:
        return system.CreateNasDatastore(spec)
    except vim.fault.DuplicateName:
        raise BadInput(
            f"a datastore named {name!r} exists on {vs.hv.name}", hint="choose another --datastore-name"
        ) from None
    except Exception as exc:
        raise Unreachable(
            f"host {vs.prop(host, 'name')} cannot mount nfs://{remote}{exports.EXPORT_PATH}: "
            f"{fault_text(exc)}",
            hint="the host must reach this appliance on TCP 111 and 2049; check its firewall and NFS client",
        ) from None


def _unmount(vs: VSphere, host: Any, name: str) -> None:
    for ds in vs.prop(host, "datastore") or []:
        if vs.prop(ds, "summary.name") == name:
            vs.prop(host, "configManager.datastoreSystem").RemoveDatastore(ds)
            return
    log.info("datastore %s is not mounted on %s any more", name, host._moId)


def publish(
    repo: Repository, vs: VSphere, session: Session, point: Point, *, host: str | None = None,
    datastore_name: str | None = None, power_on: bool = False, passphrase: str | None = None,
) -> Published:  # fmt: skip
    h = vs.host(host)
    host_ips = _host_addresses(vs, h)
    if not host_ips:
        raise Unreachable(f"host {vs.prop(h, 'name')} reports no IP address to allow on the NFS export")
    appliance = publishing.route_address(host_ips[0])
    name = datastore_name or f"vmrecover-{socket.gethostname().split('.')[0]}"
    disks = [d.name for d in repo.catalog.disks(point.id)]
    vm_name = session.name
    with publishing.undo_on_failure() as undo:
        was_running = exports.running(repo.root) is not None
        exports.ensure(repo.root, host_ips, passphrase=passphrase)
        if not was_running:
            undo.append(("the NFS export", lambda: exports.stop(repo.root)))
        _mount(vs, h, name, appliance)
        if not any(p.datastore == name and p.host == h._moId for _, p in _all_published(repo)):
            undo.append((f"datastore {name}", lambda: _unmount(vs, h, name)))
        upper = Beneath(repo.session_dir(session.id) / "upper")
        fd = upper.create_open(f"{vm_name}.vmx", 0o644)
        with open(fd, "wb") as f:
            f.write(vmx.recovered(point.config, disks, vm_name))
            os.fsync(f.fileno())
        undo.append(("the .vmx", lambda: upper.unlink(f"{vm_name}.vmx")))
        path = f"[{name}] recover/{session.name}/{vm_name}.vmx"
        dc = vs.datacenter(h)
        folder = vs.prop(dc, "vmFolder")
        pool = vs.prop(vs.prop(h, "parent"), "resourcePool")
        with interrupts.deferred():  # a registered VM is always recorded, so that it can be undone
            task = folder.RegisterVM_Task(path=path, name=vm_name, asTemplate=False, pool=pool, host=h)
            fault = vs.task_error(task)
            if fault is not None:
                raise Unreachable(f"registering {path} on {vs.hv.name} failed: {fault_text(fault)}")
            vm = vs.props([task], ["info.result"])[0]["info.result"]
            undo.append((f"VM {vm_name}", lambda: vm.UnregisterVM()))
            target = Published("vmware", vs.hv.name, h._moId, name, vm._moId, vm_name, path, appliance)
            sessions.set_target(repo, session, asdict(target))
        if power_on:
            vs.wait(vm.PowerOnVM_Task(), f"powering on {vm_name}")
        return target
    raise AssertionError("unreachable")


def _release(repo: Repository, vs: VSphere, session: Session, target: Published) -> None:
    """Unmount the datastore and stop the export if no other session needs them; forget the target."""
    others = [p for s, p in _all_published(repo) if s.id != session.id]
    if not any(p.datastore == target.datastore and p.host == target.host for p in others):
        try:
            _unmount(vs, vs.ref(vim.HostSystem, target.host), target.datastore)
        except Exception as exc:
            log.error(
                "could not remove datastore %s from %s: %s", target.datastore, target.host, fault_text(exc)
            )
    publishing.forget(repo, session)


def unpublish(repo: Repository, vs: VSphere, session: Session, target: Published) -> None:
    """Power off and unregister the recovered VM (only if it still runs from the appliance's datastore:
    one an administrator moved to production storage is left alone), then release the datastore."""
    vm = vs.ref(vim.VirtualMachine, target.vm)
    try:
        doc = vs.props([vm], ["runtime.powerState", "config.files.vmPathName"])[0]
    except vmodl.fault.ManagedObjectNotFound:
        doc = {}  # unregistered by someone already
    where = str(doc.get("config.files.vmPathName") or "")
    if doc and not where.startswith(f"[{target.datastore}]"):
        log.warning("VM %s now lives at %s, not on the appliance: left as it is", target.vm_name, where)
    elif doc:
        if doc.get("runtime.powerState") == "poweredOn":
            vs.wait(vm.PowerOffVM_Task(), f"powering off {target.vm_name}")
        vm.UnregisterVM()
    _release(repo, vs, session, target)


def migrate(repo: Repository, vs: VSphere, session: Session, target: Published, datastore: str) -> None:
    """Storage vMotion of the recovered VM to *datastore*, then the session is no longer needed."""
    vm = vs.ref(vim.VirtualMachine, target.vm)
    host = vs.ref(vim.HostSystem, target.host)
    ds = next((d for d in vs.prop(host, "datastore") or [] if vs.prop(d, "summary.name") == datastore), None)
    if ds is None:
        raise NotFound(f"host of {target.vm_name} has no datastore {datastore!r}")
    if datastore == target.datastore:
        raise BadInput(f"{datastore} is the appliance's own datastore", hint="name a production datastore")
    vs.wait(
        vm.RelocateVM_Task(spec=vim.vm.RelocateSpec(datastore=ds)), f"moving {target.vm_name} to {datastore}"
    )
    log.info("moved %s to datastore %s; it no longer needs the appliance", target.vm_name, datastore)
    _release(repo, vs, session, target)
