"""Finding a VM in a pool and describing it: its disks in VBD order and the record stored with a point.

A VM is named by its name label, UUID or OpaqueRef; it is found wherever it runs in the pool (it may
have moved to another host, or failed over, between backups).  Templates, snapshots and the control
domain are never candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...errors import BadInput, NotFound
from .session import Xen

UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


KEEP = (  # the fields of a VM record stored with a point
    "name_label", "name_description", "uuid", "memory_static_max", "memory_static_min", "memory_dynamic_max",
    "memory_dynamic_min", "VCPUs_max", "VCPUs_at_startup", "VCPUs_params", "platform", "HVM_boot_policy",
    "HVM_boot_params", "PV_bootloader", "PV_kernel", "PV_ramdisk", "PV_args", "PV_bootloader_args",
    "PV_legacy_args", "other_config", "domain_type", "actions_after_shutdown", "actions_after_reboot",
    "actions_after_crash", "recommendations",
)  # fmt: skip


@dataclass(frozen=True)
class Disk:
    """One virtual disk of a VM: where it plugs in (VBD ``userdevice``) and what backs it (the VDI)."""

    name: str  # "xvda"-style by userdevice: stable across backups, used as the point's disk name
    userdevice: str
    vbd: str
    vdi: str  # OpaqueRef
    vdi_uuid: str
    size: int
    cbt_enabled: bool
    bootable: bool
    mode: str  # "RW" or "RO"


def disk_name(userdevice: str) -> str:
    """``xvda`` for userdevice 0, ``xvdb`` for 1, ... (``disk<N>`` past z)."""
    n = int(userdevice) if userdevice.isdigit() else -1
    return f"xvd{chr(ord('a') + n)}" if 0 <= n < 26 else f"disk{userdevice}"


def find_vm(xs: Xen, name: str) -> tuple[str, dict[str, Any]]:
    """The VM *name* (name label, UUID or OpaqueRef) and its record."""
    x = xs.x
    if name.startswith("OpaqueRef:"):
        refs = [name]
    elif UUID.fullmatch(name):
        refs = [x.VM.get_by_uuid(name)]
    else:
        refs = x.VM.get_by_name_label(name)
    found = []
    for ref in refs:
        rec = x.VM.get_record(ref)
        if not (rec["is_a_template"] or rec["is_a_snapshot"] or rec["is_control_domain"]):
            found.append((ref, rec))
    if not found:
        raise NotFound(f"no VM {name!r} on {xs.hv.name}", hint="name it by its name label or UUID")
    if len(found) > 1:
        uuids = ", ".join(r["uuid"] for _, r in found)
        raise BadInput(f"{len(found)} VMs are named {name!r} on {xs.hv.name}", hint=f"use a UUID: {uuids}")
    return found[0]


def disks(xs: Xen, vm_record: dict[str, Any]) -> list[Disk]:
    """The VM's (or snapshot's) virtual disks in ``userdevice`` order; CD drives and empty VBDs are not
    disks."""
    x, out = xs.x, []
    for vbd in vm_record["VBDs"]:
        b = x.VBD.get_record(vbd)
        if b["type"] != "Disk" or b["empty"]:
            continue
        v = x.VDI.get_record(b["VDI"])
        out.append(Disk(
            disk_name(b["userdevice"]), b["userdevice"], vbd, b["VDI"], v["uuid"], int(v["virtual_size"]),
            bool(v.get("cbt_enabled")), bool(b.get("bootable")), b.get("mode", "RW"),
        ))  # fmt: skip
    return sorted(out, key=lambda d: int(d.userdevice) if d.userdevice.isdigit() else 1 << 30)


def record(xs: Xen, rec: dict[str, Any], vm_disks: list[Disk]) -> dict[str, Any]:
    """What is stored with a point: enough to create the VM again (name, memory, vCPUs, platform
    flags, boot settings, VIFs with networks and MACs, VBD order and devices)."""
    x = xs.x
    vifs = []
    for vif in rec["VIFs"]:
        v = x.VIF.get_record(vif)
        network = x.network.get_name_label(v["network"])
        vifs.append({"device": v["device"], "mac": v["MAC"], "network": network, "mtu": v.get("MTU")})
    vbds = [
        {"name": d.name, "userdevice": d.userdevice, "bootable": d.bootable, "mode": d.mode, "size": d.size,
         "vdi_uuid": d.vdi_uuid}
        for d in vm_disks
    ]  # fmt: skip
    return {
        **{k: rec[k] for k in KEEP if k in rec},
        "vifs": sorted(vifs, key=lambda v: int(v["device"]) if str(v["device"]).isdigit() else 1 << 30),
        "vbds": vbds,
    }
