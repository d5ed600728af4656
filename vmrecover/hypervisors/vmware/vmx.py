"""The .vmx file: VMware's VM configuration, ``key = "value"`` lines.  One home for reading it and for
writing the .vmx of a recovered VM.

A recovered VM runs from the session folder of the NFS datastore, where its disks are the session's
``<disk>.vmdk`` views.  Its .vmx is the one stored with the restore point, with:

- each disk's ``fileName`` pointing at that disk's view (disks are named ``scsi0-0`` and so on, which
  is also their place in the .vmx: ``scsi0:0.fileName``);
- what belongs to the original's files, not to this copy, removed: changed block tracking files
  (``ctkEnabled``), the swap file's derived name, the suspend state, vCenter's instance UUID;
- ``displayName`` the recovered VM's name, ``nvram`` its own file, and ``uuid.action = "keep"`` so that
  ESXi does not ask whether the VM was moved or copied (the guest keeps its identity).

A point backed up from local images has no .vmx: one is made from its hardware summary, or from
defaults (one CPU, 1 GiB, the disks on an LSI Logic SCSI controller, "other 64-bit" guest).
"""

from __future__ import annotations

import re
from typing import Any

DROP = re.compile(
    r"^(ctkEnabled|.*\.ctkEnabled|sched\.swap\.derivedName|checkpoint\.vmState|vc\.uuid|"
    r"migrate\..*|vmotion\..*|displayName|nvram|uuid\.action|extendedConfigFile|"
    r"(scsi|sata|nvme|ide)\d+:\d+\.fileName)$",
    re.IGNORECASE,
)


SLOT = re.compile(r"(scsi|sata|nvme|ide)(\d+)-(\d+)")  # a disk name that says where it sits


def parse(text: str) -> dict[str, str]:
    """key -> value of a .vmx (keys keep their case; later lines win, as in VMware)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.fullmatch(r'\s*([^#=\s][^=]*?)\s*=\s*"(.*)"\s*', line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def quote(value: str) -> str:
    """A value as a .vmx holds it: VMware writes ``|`` as ``|7C`` and ``"`` as ``|22`` (values read by
    :func:`parse` are already in this form; only values made here need it)."""
    return value.replace("|", "|7C").replace('"', "|22")


def render(entries: dict[str, str]) -> bytes:
    lines = ['.encoding = "UTF-8"'] + [f'{k} = "{v}"' for k, v in entries.items() if k.lower() != ".encoding"]
    return ("\n".join(lines) + "\n").encode()


def _defaults(config: dict[str, Any] | None, disk_names: list[str]) -> dict[str, str]:
    hw = (config or {}).get("hardware") or {}
    out = {
        "config.version": "8",
        "virtualHW.version": str(hw.get("version") or "vmx-13").removeprefix("vmx-"),
        "numvcpus": str(hw.get("cpus") or 1),
        "cpuid.coresPerSocket": str(hw.get("cores_per_socket") or 1),
        "memSize": str(hw.get("memory_mb") or 1024),
        "guestOS": str(hw.get("guest_id") or "other-64").removesuffix("Guest"),
        "firmware": str(hw.get("firmware") or "bios"),
    }
    buses = {name.split("-")[0] for name in disk_names}
    for bus in sorted(buses):
        if bus.startswith("scsi"):
            out[f"{bus}.present"] = "TRUE"
            out.setdefault(f"{bus}.virtualDev", "lsilogic")
        elif bus.startswith(("sata", "nvme")):
            out[f"{bus}.present"] = "TRUE"
    return out


def recovered(config: dict[str, Any] | None, disk_names: list[str], name: str) -> bytes:
    """The .vmx of a VM recovered from a point with *config* (None for local images) whose disks are
    *disk_names* (``scsi0-0``...), as views ``<disk>.vmdk`` beside the .vmx."""
    original = parse((config or {}).get("vmx") or "")
    entries = (
        {k: v for k, v in original.items() if not DROP.match(k)}
        if original
        else _defaults(config, disk_names)
    )
    for i, disk in enumerate(disk_names):
        m = SLOT.fullmatch(disk)
        if m:
            slot = f"{m.group(1)}{m.group(2)}:{m.group(3)}"
        else:  # a local image's disk: on scsi0, in order (unit 7 is the controller's own)
            unit = sum(1 for d in disk_names[:i] if not SLOT.fullmatch(d))
            slot = f"scsi0:{unit + (unit >= 7)}"
            entries.setdefault("scsi0.present", "TRUE")
            entries.setdefault("scsi0.virtualDev", "lsilogic")
        entries[f"{slot}.present"] = "TRUE"
        entries[f"{slot}.fileName"] = quote(f"{disk}.vmdk")
        entries.setdefault(f"{slot}.deviceType", "scsi-hardDisk" if slot.startswith("scsi") else "disk")
    entries["displayName"] = quote(name)
    entries["nvram"] = quote(f"{name}.nvram")
    entries["uuid.action"] = "keep"
    return render(entries)
