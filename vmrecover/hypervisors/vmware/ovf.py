"""The OVF descriptor of a VM to import (OVF 1.x with VMware's extensions): one home for the format.

A full restore imports the VM the way ovftool does: ``OvfManager.CreateImportSpec`` reads this
descriptor, ``ImportVApp`` creates the VM and an NFC lease, and each disk is uploaded as a
streamOptimized vmdk (compressed, holes never sent, written thin by the host).  The descriptor is
made from the hardware summary stored with the point (vmware/hardware.py), or from defaults for a
point of local images (one CPU, 1 GiB, the disks on an LSI Logic controller).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
STREAM = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
for _p, _u in (("ovf", OVF), ("rasd", RASD), ("vssd", VSSD), ("vmw", VMW)):
    ET.register_namespace(_p, _u)

# controller type as pyvmomi names it -> (OVF ResourceType, ResourceSubType)
CONTROLLERS = {
    "VirtualLsiLogicController": (6, "lsilogic"),
    "VirtualLsiLogicSASController": (6, "lsilogicsas"),
    "ParaVirtualSCSIController": (6, "VirtualSCSI"),
    "VirtualBusLogicController": (6, "buslogic"),
    "VirtualAHCIController": (20, "vmware.sata.ahci"),
    "VirtualNVMEController": (20, "vmware.nvme.controller"),
    "VirtualIDEController": (5, None),
}
NICS = {
    "VirtualVmxnet3": "VmxNet3",
    "VirtualE1000": "E1000",
    "VirtualE1000e": "E1000e",
    "VirtualVmxnet2": "VmxNet2",
}


@dataclass(frozen=True)
class DiskFile:
    name: str  # the disk's name in the point (scsi0-0, or a local image's disk0)
    capacity: int
    href: str  # the file name uploaded for it


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def network_names(hardware: dict[str, Any] | None) -> list[str]:
    """The OVF network names of the NICs in *hardware*: what each was connected to (a standard port
    group's name, a distributed one's key), "VM Network" where that is unknown."""
    return sorted({str(n.get("network") or "VM Network") for n in (hardware or {}).get("nics") or []})


def descriptor(
    vm_name: str, hardware: dict[str, Any] | None, disks: list[DiskFile], *, connected: bool
) -> bytes:
    """The OVF descriptor for *disks* on the VM described by *hardware* (None: defaults)."""
    hw = hardware or {}
    env = ET.Element(_q(OVF, "Envelope"))
    refs = ET.SubElement(env, _q(OVF, "References"))
    disk_section = ET.SubElement(env, _q(OVF, "DiskSection"))
    ET.SubElement(disk_section, _q(OVF, "Info")).text = "Virtual disks"
    for i, d in enumerate(disks, 1):
        ET.SubElement(refs, _q(OVF, "File"), {_q(OVF, "id"): f"file{i}", _q(OVF, "href"): d.href})
        ET.SubElement(disk_section, _q(OVF, "Disk"), {
            _q(OVF, "diskId"): f"vmdisk{i}", _q(OVF, "fileRef"): f"file{i}",
            _q(OVF, "capacity"): str(d.capacity), _q(OVF, "capacityAllocationUnits"): "byte",
            _q(OVF, "format"): STREAM,
        })  # fmt: skip
    nics = hw.get("nics") or []
    networks = network_names(hw)
    net_section = ET.SubElement(env, _q(OVF, "NetworkSection"))
    ET.SubElement(net_section, _q(OVF, "Info")).text = "Networks"
    for net in networks:
        ET.SubElement(net_section, _q(OVF, "Network"), {_q(OVF, "name"): net})
    vs = ET.SubElement(env, _q(OVF, "VirtualSystem"), {_q(OVF, "id"): vm_name})
    ET.SubElement(vs, _q(OVF, "Info")).text = "A virtual machine restored by vmrecover"
    ET.SubElement(vs, _q(OVF, "Name")).text = vm_name
    os_section = ET.SubElement(vs, _q(OVF, "OperatingSystemSection"), {
        _q(OVF, "id"): "1", _q(VMW, "osType"): str(hw.get("guest_id") or "otherGuest64")})  # fmt: skip
    ET.SubElement(os_section, _q(OVF, "Info")).text = "Guest operating system"
    hws = ET.SubElement(vs, _q(OVF, "VirtualHardwareSection"))
    ET.SubElement(hws, _q(OVF, "Info")).text = "Virtual hardware"
    system = ET.SubElement(hws, _q(OVF, "System"))
    for tag, text in (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", vm_name),
        ("VirtualSystemType", str(hw.get("version") or "vmx-13")),
    ):
        ET.SubElement(system, _q(VSSD, tag)).text = text  # fmt: skip
    ids = iter(range(1, 10_000))

    def item(rtype: int, name: str, **fields: str | None) -> str:
        iid = str(next(ids))
        el = ET.SubElement(hws, _q(OVF, "Item"))
        values = {"ElementName": name, "InstanceID": iid, "ResourceType": str(rtype), **fields}
        for tag in sorted(values):  # the CIM schema wants its properties in alphabetical order
            if values[tag] is not None:
                ET.SubElement(el, _q(RASD, tag)).text = values[tag]
        return iid

    item(3, f"{hw.get('cpus') or 1} virtual CPU(s)", VirtualQuantity=str(hw.get("cpus") or 1),
         AllocationUnits="hertz * 10^6")  # fmt: skip
    item(4, f"{hw.get('memory_mb') or 1024} MB of memory", VirtualQuantity=str(hw.get("memory_mb") or 1024),
         AllocationUnits="byte * 2^20")  # fmt: skip
    controllers = hw.get("controllers") or [{"key": 1000, "type": "VirtualLsiLogicController", "bus": "scsi",
                                             "bus_number": 0}]  # fmt: skip
    by_bus: dict[tuple[str, int], str] = {}
    for c in controllers:
        rtype, sub = CONTROLLERS.get(c["type"], (6, "lsilogic"))
        by_bus[(c["bus"], c["bus_number"])] = item(
            rtype,
            f"{c['bus']} controller {c['bus_number']}",
            ResourceSubType=sub,
            Address=str(c["bus_number"]),
        )
    placed = {d["name"]: d for d in hw.get("disks") or []}
    first = by_bus.get(("scsi", 0)) or next(iter(by_bus.values()))
    for i, d in enumerate(disks, 1):
        where = placed.get(d.name)
        parent = by_bus.get((where["bus"], where["bus_number"]), first) if where else first
        unit = str(where["unit"]) if where else str(i - 1 + (i - 1 >= 7))
        item(17, f"Hard disk {i}", HostResource=f"ovf:/disk/vmdisk{i}", Parent=parent, AddressOnParent=unit)
    for n, nic in enumerate(nics, 1):
        item(10, f"Network adapter {n}", ResourceSubType=NICS.get(nic["type"], "VmxNet3"),
             Connection=str(nic.get("network") or "VM Network"),
             AutomaticAllocation="true" if connected else "false", AddressOnParent=str(6 + n))  # fmt: skip
    firmware = str(hw.get("firmware") or "bios")
    ET.SubElement(hws, _q(VMW, "Config"), {_q(OVF, "required"): "false", _q(VMW, "key"): "firmware",
                                           _q(VMW, "value"): firmware})  # fmt: skip
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(env)
