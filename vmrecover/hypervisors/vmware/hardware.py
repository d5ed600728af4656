"""A VM's hardware as vmrecover stores it with a restore point, from the vSphere device list.

The summary is what a full restore rebuilds the VM from and what the console shows: CPUs, memory,
firmware, guest OS, virtual hardware version, controllers, disks (name, controller, unit, capacity,
thin, datastore file, changeId) and NICs (type, network, MAC).  Disk names are stable across backups
and readable: ``<bus><bus number>-<unit>`` (``scsi0-0``, ``sata0-1``, ``nvme0-0``, ``ide1-0``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pyVmomi import vim

from .http import DsPath


def _bus(controller: Any) -> str:
    if isinstance(controller, vim.vm.device.VirtualSCSIController):
        return "scsi"
    sata = (vim.vm.device.VirtualAHCIController, getattr(vim.vm.device, "VirtualSATAController", ()))
    if isinstance(controller, sata):
        return "sata"
    if isinstance(controller, getattr(vim.vm.device, "VirtualNVMEController", ())):
        return "nvme"
    if isinstance(controller, vim.vm.device.VirtualIDEController):
        return "ide"
    return "other"


@dataclass(frozen=True)
class DiskInfo:
    name: str  # scsi0-0
    key: int
    controller_key: int
    bus: str
    bus_number: int
    unit: int
    capacity: int
    file: str  # "[datastore] folder/name.vmdk" (the descriptor)
    thin: bool
    change_id: str | None
    chained: bool  # the backing has a parent: a delta of someone else's snapshot
    mode: str = "persistent"  # diskMode; independent disks are left out of snapshots (and backups)


def disks(devices: list[Any]) -> list[DiskInfo]:
    controllers = {d.key: d for d in devices if isinstance(d, vim.vm.device.VirtualController)}
    out = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        c = controllers.get(d.controllerKey)
        bus, number = (_bus(c), int(getattr(c, "busNumber", 0) or 0)) if c else ("other", 0)
        b = d.backing
        capacity = int(getattr(d, "capacityInBytes", 0) or (d.capacityInKB or 0) * 1024)
        out.append(
            DiskInfo(
                name=f"{bus}{number}-{d.unitNumber}",
                key=d.key,
                controller_key=d.controllerKey,
                bus=bus,
                bus_number=number,
                unit=int(d.unitNumber or 0),
                capacity=capacity,
                file=b.fileName,
                thin=bool(getattr(b, "thinProvisioned", False)),
                change_id=getattr(b, "changeId", None) or None,
                chained=getattr(b, "parent", None) is not None,
                mode=str(getattr(b, "diskMode", None) or "persistent"),
            )
        )
    return sorted(out, key=lambda x: (x.bus, x.bus_number, x.unit))


def summary(config: Any, devices: list[Any]) -> dict[str, Any]:
    """The hardware summary stored with a point (JSON-ready)."""
    hw = config.hardware
    controllers = [
        {"key": d.key, "type": type(d).__name__.rsplit(".", 1)[-1], "bus": _bus(d),
         "bus_number": int(getattr(d, "busNumber", 0) or 0)}
        for d in devices
        if isinstance(d, vim.vm.device.VirtualController) and _bus(d) != "other"
    ]  # fmt: skip
    nics = []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualEthernetCard):
            net = getattr(d.backing, "deviceName", None) or getattr(
                getattr(d.backing, "port", None), "portgroupKey", None
            )
            nics.append({
                "type": type(d).__name__.rsplit(".", 1)[-1], "key": d.key, "network": net,
                "mac": d.macAddress, "address_type": d.addressType,
                "connected_at_power_on": bool(getattr(d.connectable, "startConnected", True)),
            })  # fmt: skip
    return {
        "cpus": hw.numCPU,
        "cores_per_socket": getattr(hw, "numCoresPerSocket", None) or 1,
        "memory_mb": hw.memoryMB,
        "firmware": getattr(config, "firmware", None) or "bios",
        "guest_id": getattr(config, "guestId", None),
        "version": getattr(config, "version", None),
        "controllers": controllers,
        "disks": [{**asdict(d), "datastore": DsPath.parse(d.file).datastore} for d in disks(devices)],
        "nics": nics,
    }
