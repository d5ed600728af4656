#!/usr/bin/env python3
"""The appliance's image in the formats hypervisors import: an OVA (ESXi, XenServer) and a Vagrant box.

    appliance/formats.py ova IMAGE.qcow2 OUT.ova [--name N] [--version V] [--repo-disk 200G]
                             [--firmware bios|efi]
    appliance/formats.py box IMAGE.qcow2 OUT.box

**OVA** (OVF 1.0, the version ESXi's and XenCenter's importers both take): a ustar archive of, in
this order, the OVF descriptor, its manifest (SHA-256 of each file) and the disks as streamOptimized
VMDKs (what an OVA must carry for ESXi).  The VM is the appliance's default size: 2 vCPUs, 4 GiB,
one NIC, the system disk and a second, empty disk for the repository (labelled by the first boot).
Everything in the archive has the same owner and the time SOURCE_DATE_EPOCH (else 0), and the
VMDKs' content IDs are fixed (qemu-img picks random ones), so two packings of one image are the
same bytes.

**Box** (vagrant-libvirt's box format, version 1): a gzipped tar of ``metadata.json`` (provider
libvirt, format qcow2, virtual size in GiB), ``box.img`` (the qcow2) and a ``Vagrantfile`` with the
appliance's size.

Uses only the standard library and qemu-img (qemu-utils).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

CPUS = 2
MEMORY_MIB = 4096
REPO_DISK = "200G"  # the empty repository disk's capacity (sparse: nothing is stored for it)
GiB = 1 << 30
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"


@dataclass
class Disk:
    file: Path  # the streamOptimized VMDK
    capacity: int  # bytes the guest sees
    populated: int  # bytes of data in it (what the hypervisor allocates when it imports thin)


def qemu_img(*args: str | Path) -> str:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"qemu-img {' '.join(map(str, args))}: {proc.stderr.strip()}")
    return proc.stdout


def virtual_size(image: Path) -> int:
    return int(json.loads(qemu_img("info", "--output=json", image))["virtual-size"])


def populated(image: Path) -> int:
    """Bytes of *image* that hold data, from qemu-img map (zeros and holes are not data)."""
    extents = json.loads(qemu_img("map", "--output=json", image))
    return sum(e["length"] for e in extents if e.get("data") and not e.get("zero"))


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if m is None:
        raise SystemExit(f"{text!r} is not a size such as 200G")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2) or " "))


def fix_cid(vmdk: Path) -> None:
    """Give *vmdk*'s embedded descriptor a content ID derived from its file name, not qemu-img's
    random one, so that packing one image twice gives the same bytes.  (The CID only tells a child
    disk whether its parent changed; a streamOptimized disk has no parent.)"""
    with open(vmdk, "r+b") as f:
        header = f.read(512)
        if header[:4] != b"KDMV":
            raise SystemExit(f"{vmdk}: not a sparse VMDK")
        offset, size = struct.unpack_from("<QQ", header, 28)  # descriptorOffset, descriptorSize (sectors)
        f.seek(offset * 512)
        text = f.read(size * 512)
        body = text.rstrip(b"\0")
        cid = hashlib.sha256(vmdk.name.encode()).hexdigest()[:8].encode()
        fixed = re.sub(rb"(?m)^CID=[0-9a-fA-F]+$", b"CID=" + cid, body, count=1)
        if len(fixed) > len(text):
            raise SystemExit(f"{vmdk}: its descriptor has no room for a longer CID")
        f.seek(offset * 512)
        f.write(fixed.ljust(len(text), b"\0"))


def stream_vmdk(src: Path | None, dst: Path, size: int) -> Disk:
    """*src* (any format qemu reads; None: an empty disk of *size* bytes) as a streamOptimized VMDK."""
    opts = "subformat=streamOptimized,adapter_type=lsilogic"
    if src is None:
        qemu_img("create", "-q", "-f", "vmdk", "-o", opts, dst, size)
        disk = Disk(dst, size, 0)
    else:
        qemu_img("convert", "-q", "-O", "vmdk", "-o", opts, src, dst)
        disk = Disk(dst, virtual_size(src), populated(src))
    fix_cid(dst)
    return disk


def _item(**fields: str | int) -> str:
    """One ``<Item>`` of the VirtualHardwareSection (rasd fields in the schema's alphabetical order)."""
    body = "".join(f"<rasd:{k}>{escape(str(v))}</rasd:{k}>" for k, v in sorted(fields.items()))
    return f"      <Item>{body}</Item>\n"


def ovf(name: str, version: str, disks: list[Disk], firmware: str) -> str:
    """The OVF 1.0 descriptor of the appliance with *disks* (the first boots)."""
    refs = "".join(
        f'    <File ovf:href={quoteattr(d.file.name)} ovf:id="file{i}" ovf:size="{d.file.stat().st_size}"/>\n'
        for i, d in enumerate(disks, 1)
    )
    disk_section = "".join(
        f'    <Disk ovf:capacity="{d.capacity}" ovf:capacityAllocationUnits="byte" '
        f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:format="{STREAM_OPTIMIZED}" '
        f'ovf:populatedSize="{d.populated}"/>\n'
        for i, d in enumerate(disks, 1)
    )
    items = _item(
        AllocationUnits="hertz * 10^6",
        Description="Number of Virtual CPUs",
        ElementName=f"{CPUS} virtual CPU(s)",
        InstanceID=1,
        ResourceType=3,
        VirtualQuantity=CPUS,
    )
    items += _item(
        AllocationUnits="byte * 2^20",
        Description="Memory Size",
        ElementName=f"{MEMORY_MIB}MB of memory",
        InstanceID=2,
        ResourceType=4,
        VirtualQuantity=MEMORY_MIB,
    )
    items += _item(
        Address=0,
        Description="SCSI Controller",
        ElementName="SCSI Controller 0",
        InstanceID=3,
        ResourceSubType="lsilogic",
        ResourceType=6,
    )
    for i, _ in enumerate(disks, 1):
        items += _item(
            AddressOnParent=i - 1,
            ElementName=f"Hard Disk {i}",
            HostResource=f"ovf:/disk/vmdisk{i}",
            InstanceID=3 + i,
            Parent=3,
            ResourceType=17,
        )
    items += _item(AddressOnParent=7, AutomaticAllocation="true", Connection="VM Network",
                   Description="VmxNet3 ethernet adapter on VM Network", ElementName="Network adapter 1",
                   InstanceID=4 + len(disks), ResourceSubType="VmxNet3", ResourceType=10)  # fmt: skip
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" \
xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" \
xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" \
xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
{disk_section}  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>The network the appliance's API and NFS export are reached on</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id={quoteattr(name)}>
    <Info>vmrecover backup and instant-recovery appliance</Info>
    <Name>{escape(name)}</Name>
    <ProductSection>
      <Info>The appliance</Info>
      <Product>vmrecover appliance</Product>
      <Version>{escape(version)}</Version>
    </ProductSection>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian12_64Guest">
      <Info>Debian GNU/Linux 12 (64-bit)</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>2 vCPUs, 4 GiB, the system disk and an empty repository disk, one NIC</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{escape(name)}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-13</vssd:VirtualSystemType>
      </System>
{items}      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value={quoteattr(firmware)}/>
      <vmw:Config ovf:required="false" vmw:key="nestedHVEnabled" vmw:value="true"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""  # fmt: skip


def _epoch() -> int:
    return int(os.environ.get("SOURCE_DATE_EPOCH", "0"))


def _info(name: str, size: int, mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, _epoch(), mode
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes | Path) -> None:
    if isinstance(data, bytes):
        tar.addfile(_info(name, len(data)), io.BytesIO(data))
    else:
        with open(data, "rb") as f:
            tar.addfile(_info(name, data.stat().st_size), f)


def make_ova(image: Path, out: Path, *, name: str, version: str, repo_disk: int, firmware: str) -> Path:
    """*image* (the appliance's system disk) packed as the OVA *out*."""
    with tempfile.TemporaryDirectory(prefix="ova-", dir=out.parent) as tmp:
        work = Path(tmp)
        disks = [stream_vmdk(image, work / f"{name}-disk1.vmdk", 0),
                 stream_vmdk(None, work / f"{name}-disk2.vmdk", repo_disk)]  # fmt: skip
        descriptor = ovf(name, version, disks, firmware).encode()
        manifest = f"SHA256({name}.ovf)= {hashlib.sha256(descriptor).hexdigest()}\n"
        manifest += "".join(f"SHA256({d.file.name})= {sha256(d.file)}\n" for d in disks)
        partial = out.with_name(out.name + ".partial")
        with tarfile.open(partial, "w", format=tarfile.USTAR_FORMAT) as tar:  # the .ovf first: a must
            _add(tar, f"{name}.ovf", descriptor)
            _add(tar, f"{name}.mf", manifest.encode())
            for d in disks:
                _add(tar, d.file.name, d.file)
        os.replace(partial, out)
    return out


BOX_VAGRANTFILE = f"""# The box's defaults (the repository's top-level Vagrantfile may override them).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.cpus = {CPUS}
    lv.memory = {MEMORY_MIB}
    lv.disk_bus = "virtio"
  end
end
"""


def make_box(image: Path, out: Path) -> Path:
    """*image* packed as a vagrant-libvirt box *out* (box format version 1)."""
    meta = {"provider": "libvirt", "format": "qcow2", "virtual_size": math.ceil(virtual_size(image) / GiB)}
    partial = out.with_name(out.name + ".partial")
    # gzip's own header holds a time and a file name: both fixed, so the box is reproducible
    with (
        open(partial, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=_epoch(), compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        _add(tar, "metadata.json", json.dumps(meta, indent=2).encode() + b"\n")
        _add(tar, "Vagrantfile", BOX_VAGRANTFILE.encode())
        _add(tar, "box.img", image)
    os.replace(partial, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("ova", help="an OVA (ESXi, XenServer)")
    o.add_argument("image", type=Path)
    o.add_argument("out", type=Path)
    o.add_argument("--name", default="vmrecover-appliance")
    o.add_argument("--version", default="0")
    o.add_argument("--repo-disk", default=REPO_DISK, help=f"the repository disk's size (default {REPO_DISK})")
    o.add_argument("--firmware", choices=["bios", "efi"], default="bios")
    b = sub.add_parser("box", help="a Vagrant box (libvirt provider)")
    b.add_argument("image", type=Path)
    b.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img is missing: apt-get install qemu-utils")
    if args.what == "ova":
        made = make_ova(args.image, args.out, name=args.name, version=args.version,
                        repo_disk=parse_size(args.repo_disk), firmware=args.firmware)  # fmt: skip
    else:
        made = make_box(args.image, args.out)
    print(f"{made}: {made.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
