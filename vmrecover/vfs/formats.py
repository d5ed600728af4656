"""The file views a disk is shown as, beside its raw bytes: one place for these two formats.

- **vmdk**: a text descriptor ``<disk>.vmdk`` whose single extent is ``<disk>-flat.vmdk``, the raw
  disk bytes (what ESXi writes for a "thick" disk on an NFS datastore: ``createType="vmfs"``).
- **vhd**: a *fixed* VHD, which is the raw bytes followed by a 512-byte footer (what XenServer's NFS
  storage repositories and Hyper-V accept).  The creator application is ``tap\\0`` (XenServer), which
  also tells qemu to take the disk size from the footer rather than from the CHS geometry.

Both are pure functions of (disk name, size, a stable identity), so a view's bytes never change.
"""

from __future__ import annotations

import re
import struct
import uuid
from datetime import UTC, datetime

VHD_FOOTER_SIZE = 512
_VHD_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_VHD_FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427s")


def vhd_geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) by the algorithm of the VHD specification, appendix."""
    total = min(size // 512, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def vhd_footer(size: int, identity: str, created: datetime) -> bytes:
    """The 512-byte footer of a fixed VHD holding *size* bytes; *identity* seeds its UUID."""
    cyl, heads, spt = vhd_geometry(size)
    stamp = max(0, int((created - _VHD_EPOCH).total_seconds())) & 0xFFFFFFFF
    fields = [
        b"conectix",
        2,  # features: reserved bit, always set
        0x00010000,  # file format version 1.0
        0xFFFFFFFFFFFFFFFF,  # data offset: none for a fixed disk
        stamp,
        b"tap\0",  # creator application: XenServer's blktap
        0x00010000,
        b"Wi2k",  # creator host OS, as XenServer writes it
        size,  # original size
        size,  # current size
        cyl,
        heads,
        spt,
        2,  # disk type: fixed
        0,  # checksum, filled in below
        uuid.uuid5(uuid.NAMESPACE_URL, "vmrecover:" + identity).bytes,
        0,  # saved state
        b"",
    ]
    raw = _VHD_FOOTER.pack(*fields)
    fields[14] = ~sum(raw) & 0xFFFFFFFF
    return _VHD_FOOTER.pack(*fields)


def vmdk_descriptor(disk: str, size: int, identity: str) -> bytes:
    """A monolithic flat descriptor for ``<disk>-flat.vmdk`` (a whole number of sectors is shown)."""
    sectors = size // 512
    cyl = max(1, min(sectors // (255 * 63), 65535))
    cid = uuid.uuid5(uuid.NAMESPACE_URL, "vmrecover:" + identity).int & 0xFFFFFFFF
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        f"CID={cid:08x}\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{flat_vmdk_name(disk)}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cyl}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.uuid = "{uuid.uuid5(uuid.NAMESPACE_URL, "vmrecover-vmdk:" + identity)}"\n'
        'ddb.virtualHWVersion = "13"\n'
    ).encode()


def flat_vmdk_name(disk: str) -> str:
    return f"{disk}-flat.vmdk"


def vmdk_extents(descriptor: bytes) -> list[tuple[str, int, str, str]]:
    """The extents a text vmdk descriptor lists: (access, sectors, type, file name), in order.
    ``RW 4194304 VMFS "web01-flat.vmdk"`` -> ("RW", 4194304, "VMFS", "web01-flat.vmdk").  An offset
    after the name (``FLAT "x" 0``) is accepted only when it is 0."""
    try:
        text = descriptor.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not a text vmdk descriptor") from None
    if "# Disk DescriptorFile" not in text.split("\n", 1)[0] and "createType" not in text:
        raise ValueError("not a text vmdk descriptor")
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r'\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]+)"(?:\s+(\d+))?\s*', line)
        if m:
            if m.group(5) not in (None, "0"):
                raise ValueError(f"extent {m.group(4)!r} starts at sector {m.group(5)} of its file")
            out.append((m.group(1), int(m.group(2)), m.group(3).upper(), m.group(4)))
    return out
