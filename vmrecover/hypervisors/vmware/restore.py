"""Full restore of a restore point to vSphere, the way ovftool imports a VM.

1. A name clash with a VM of the inventory is refused (``--name`` gives another name).
2. Each disk is written from the repository as a streamOptimized vmdk (compressed; holes are never
   written, so the host creates it thin) in a private folder of the repository's filesystem.
3. ``OvfManager.CreateImportSpec`` reads an OVF descriptor made from the point's hardware summary
   (vmware/ovf.py); ``ResourcePool.ImportVApp`` creates the VM on the chosen host and datastore and
   returns an NFC lease; each disk is uploaded to its lease URL (progress reported, so the lease
   stays alive), and the lease completed.  On any failure the lease is aborted (the host then
   deletes the half-made VM), and the temporary disks are removed.
4. Identity: by default the copy keeps the original's BIOS UUID and MAC addresses (it replaces a lost
   VM: licences, DHCP reservations and inventory keep working); ``--new-identity`` gives it new
   ones, and ``--no-network`` leaves its NICs disconnected at power-on, so that a copy can run beside
   the original.  ``--power-on`` powers it on.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import urllib3
from pyVmomi import vim

from ...errors import BadInput, NotFound, Unreachable, VmrecoverError
from ...repo.catalog import Point
from ...repo.repository import Repository
from ...restore import restore_disk
from . import ovf
from .session import VSphere, fault_text

log = logging.getLogger("vmrecover.vmware")
UPLOAD_BLOCK = 1 << 20
LEASE_PROGRESS_SECONDS = 30.0


def _datastore(vs: VSphere, host: Any, name: str | None, hardware: dict[str, Any] | None) -> Any:
    """The datastore named *name*, else the original's if the host has it, else the host's roomiest."""
    docs = vs.props(
        vs.prop(host, "datastore") or [], ["summary.name", "summary.freeSpace", "summary.accessible"]
    )
    usable = [d for d in docs if d.get("summary.accessible")]
    wanted = name or next(iter([d.get("datastore") for d in (hardware or {}).get("disks", [])]), None)
    for d in usable:
        if d.get("summary.name") == wanted:
            return d["obj"]
    if name is not None:
        have = ", ".join(str(d.get("summary.name")) for d in usable) or "none"
        raise NotFound(
            f"host {vs.prop(host, 'name')} has no datastore {name!r}", hint=f"its datastores: {have}"
        )
    if not usable:
        raise Unreachable(f"host {vs.prop(host, 'name')} has no accessible datastore")
    return max(usable, key=lambda d: d.get("summary.freeSpace") or 0)["obj"]


def _check_name(vs: VSphere, name: str) -> None:
    if any(d.get("name") == name for d in vs.all_of(vim.VirtualMachine, ["name"])):
        raise BadInput(
            f"a VM named {name!r} exists on {vs.hv.name}", hint="restore under another name with --name NEW"
        )


def _wait_lease(vs: VSphere, lease: Any, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        doc = vs.props([lease], ["state", "error"])[0]
        if doc.get("state") == "ready":
            return
        if doc.get("state") == "error":
            raise Unreachable(f"the import on {vs.hv.name} failed: {fault_text(doc.get('error'))}")
        if time.monotonic() > deadline:
            raise Unreachable(f"the import lease on {vs.hv.name} did not get ready in {timeout:.0f} s")
        time.sleep(0.2)


def _upload(vs: VSphere, url: str, path: Path, done: Callable[[int], None], *, create: bool) -> None:
    """Send the file at *path* to an NFC *url* (``https://*/nfc/...``: the host is the one we talk to):
    a disk (the lease's file item says create=false) is POSTed as a streamOptimized vmdk, any other
    file PUT with ``Overwrite: t`` (as govmomi and ovftool do)."""
    url = vs.transfer_url(url)
    size = path.stat().st_size

    def body() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(UPLOAD_BLOCK):
                done(len(block))
                yield block

    pool = urllib3.PoolManager(ssl_context=vs.ssl, assert_hostname=False if vs.hv.insecure else None)
    try:
        kind = {"Overwrite": "t"} if create else {"Content-Type": "application/x-vnd.vmware-streamVmdk"}
        r = pool.request(
            "PUT" if create else "POST", url, body=body(), preload_content=True,
            timeout=urllib3.Timeout(connect=30, read=600),
            headers={**kind, "Content-Length": str(size), "Cookie": vs.cookie},
        )  # fmt: skip
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unreachable(f"uploading {path.name} to {vs.hv.name} failed: {exc}") from None
    finally:
        pool.clear()
    if r.status not in (200, 201, 204):
        raise Unreachable(f"uploading {path.name} to {vs.hv.name}: HTTP {r.status} {r.data[:200]!r}")


def restore(
    repo: Repository, vs: VSphere, point: Point, *, name: str | None = None, datastore: str | None = None,
    host: str | None = None, no_network: bool = False, new_identity: bool = False, power_on: bool = False,
    progress: Callable[[int], None] = lambda n: None, progress_total: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:  # fmt: skip
    config = point.config or {}
    hardware = config.get("hardware")
    vm_name = name or config.get("name") or point.vm
    _check_name(vs, vm_name)
    h = vs.host(host)
    ds = _datastore(vs, h, datastore, hardware)
    disks = repo.catalog.disks(point.id)
    progress_total(sum(d.size for d in disks))
    work = Path(tempfile.mkdtemp(prefix=f"restore-{point.id}-", dir=repo.run_dir()))
    lease = None
    try:
        files = []
        for d in disks:  # streamOptimized vmdks: what is uploaded is only the data, compressed
            out = work / f"{d.name}.vmdk"
            restore_disk(repo, point, d, out, fmt="vmdk-stream")
            files.append(ovf.DiskFile(d.name, d.size, out.name))
        descriptor = ovf.descriptor(vm_name, hardware, files, connected=not no_network).decode()
        pool = vs.prop(vs.prop(h, "parent"), "resourcePool")
        mapping = _network_mapping(vs, h, ovf.network_names(hardware))
        params = vim.OvfManager.CreateImportSpecParams(
            entityName=vm_name, diskProvisioning="thin", networkMapping=[m for m in mapping.values() if m]
        )
        result = vs.content.ovfManager.CreateImportSpec(descriptor, pool, ds, params)
        if result.error:
            raise BadInput(f"{vs.hv.name} refuses the VM's description: {fault_text(result.error[0])}")
        folder = vs.prop(vs.datacenter(h), "vmFolder")
        lease = pool.ImportVApp(result.importSpec, folder, h)
        _wait_lease(vs, lease)
        urls = {u.importKey: u.url for u in vs.prop(lease, "info").deviceUrl}
        sent, total, last = 0, sum((work / f.href).stat().st_size for f in files), time.monotonic()

        def done(n: int) -> None:
            nonlocal sent, last
            sent += n
            if time.monotonic() - last > LEASE_PROGRESS_SECONDS:  # an idle lease times out
                lease.HttpNfcLeaseProgress(int(100 * sent / max(total, 1)))
                last = time.monotonic()

        items = {f.path: f for f in result.fileItem or []}
        for f, d in zip(files, disks, strict=True):
            item = items.get(f.href)
            if item is None or item.deviceId not in urls:
                raise Unreachable(f"the import lease of {vs.hv.name} has no upload URL for {f.href}")
            _upload(vs, urls[item.deviceId], work / f.href, done, create=bool(item.create))
            progress(d.size)
        vm = vs.prop(lease, "info").entity  # (the lease is gone once complete)
        lease.HttpNfcLeaseComplete()
        lease = None
        try:
            _identity(vs, vm, config, new_identity=new_identity)
            if power_on:
                vs.wait(vm.PowerOnVM_Task(), f"powering on {vm_name}")
        except Exception as exc:  # the VM and its disks are there: say so rather than lose track of it
            err = Unreachable(
                f"VM {vm_name} ({vm._moId}) was restored on {vs.hv.name} with all its disks, but then: "
                f"{exc.message if isinstance(exc, VmrecoverError) else fault_text(exc)}",
                hint="finish that in vSphere (identity: UUID and MAC addresses; power), or remove the VM "
                "and restore again (--new-identity gives it new ones)",
            )
            err.exit_code = exc.exit_code if isinstance(exc, VmrecoverError) else err.exit_code
            raise err from None
        return {"vm": vm._moId, "name": vm_name, "host": vs.prop(h, "name"),
                "datastore": vs.prop(ds, "summary.name"), "new_identity": new_identity,
                "network_connected": not no_network, "powered_on": power_on,
                "networks": {n: m and vs.prop(m.network, "name") for n, m in mapping.items()}}  # fmt: skip
    except BaseException:
        if lease is not None:
            with contextlib.suppress(Exception):
                lease.HttpNfcLeaseAbort()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _network_mapping(vs: VSphere, h: Any, names: list[str]) -> dict[str, Any]:
    """Each OVF network name -> a mapping to the host's network of that name or moref (a distributed
    port group is stored by its key), so every NIC lands where it was.  Without one the host would
    put the NIC on its first network: a name it does not have is left to it and said so (None)."""
    by: dict[str, Any] = {}
    for net in vs.prop(h, "network") or []:
        by.setdefault(net._moId, net)
        by.setdefault(vs.prop(net, "name"), net)
    out: dict[str, Any] = {}
    for name in names:
        net = by.get(name)
        if net is None:
            log.warning("network %r of the VM is not on the host: its NICs go to the host's default", name)
        out[name] = vim.OvfManager.NetworkMapping(name=name, network=net) if net is not None else None
    return out


def _identity(vs: VSphere, vm: Any, config: dict[str, Any], *, new_identity: bool) -> None:
    """Give the imported VM the original's BIOS UUID and MACs (unless *new_identity*)."""
    if new_identity or not config:
        return
    spec = vim.vm.ConfigSpec()
    if config.get("uuid"):
        spec.uuid = config["uuid"]
    macs = [n.get("mac") for n in (config.get("hardware") or {}).get("nics", [])]
    changes = []
    nics = [
        d
        for d in vs.prop(vm, "config.hardware.device") or []
        if isinstance(d, vim.vm.device.VirtualEthernetCard)
    ]
    for nic, mac in zip(nics, macs, strict=False):
        if mac:
            nic.addressType = "manual"
            nic.macAddress = mac
            changes.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic))
    spec.deviceChange = changes
    vs.wait(vm.ReconfigVM_Task(spec=spec), "restoring the VM's UUID and MAC addresses")
