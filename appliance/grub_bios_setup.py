#!/usr/bin/env python3
"""GRUB's BIOS boot set-up on a disk image file: what ``grub-bios-setup`` does, without a device.

``grub-bios-setup`` only takes an OS device: given an image file it resolves the filesystem the file
lives on (the host's own disk) and fails, so it is not an option without a loop device.  For a GPT
disk with a BIOS boot partition its work is small (GRUB 2.06, util/setup.c, embedding case):

* ``core.img`` (from ``grub-mkimage -O i386-pc``) goes to the BIOS boot partition's first sectors;
  its first sector (diskboot.img) ends with a blocklist telling where the rest is: one entry
  ``(start = first sector + 1, len = sectors - 1, segment = 0x820)`` and a zero entry before it;
* ``boot.img`` goes to the MBR's first 440 bytes, with the 64-bit LBA of core.img's first sector at
  0x5c, boot drive 0xff at 0x64 and the "buggy BIOS" drive check at 0x66 replaced by two NOPs, as
  for any hard disk; its BPB area (0x03-0x5a) takes what the disk has there, and the disk signature,
  the (protective) partition table and the 0x55AA signature stay the disk's.

No Reed-Solomon codes are added (``grub-bios-setup --no-rs-codes`` does the same): the redundancy
field in core.img stays 0, which core.img reads as "none".

    grub_bios_setup.py IMAGE BOOT_IMG CORE_IMG PART_START_SECTOR PART_SECTORS
"""

from __future__ import annotations

import struct
import sys

SECTOR = 512
KERNEL_SECTOR = 0x5C
BOOT_DRIVE = 0x64
DRIVE_CHECK = 0x66
BPB_START, BPB_END = 0x03, 0x5A
NT_MAGIC = 0x1B8  # disk signature; partition table from 0x1be; 0x55AA at 0x1fe
KERNEL_SEG = 0x800
BLOCKLIST = struct.Struct("<QHH")  # start, len, segment: 12 bytes, the last ones of diskboot.img


def setup(image: str, boot_img: bytes, core_img: bytes, part_start: int, part_sectors: int) -> int:
    if len(boot_img) != SECTOR:
        raise SystemExit(f"boot.img is {len(boot_img)} bytes, not {SECTOR}")
    nsec = -(-len(core_img) // SECTOR)
    if nsec > part_sectors:
        raise SystemExit(f"core.img ({nsec} sectors) does not fit the BIOS boot partition ({part_sectors})")
    core = bytearray(core_img.ljust(nsec * SECTOR, b"\0"))
    first = SECTOR - BLOCKLIST.size
    entry = BLOCKLIST.pack(part_start + 1, nsec - 1, KERNEL_SEG + (SECTOR >> 4))
    core[first : first + BLOCKLIST.size] = entry
    core[first - BLOCKLIST.size : first] = bytes(BLOCKLIST.size)  # terminator
    with open(image, "r+b") as f:
        mbr = f.read(SECTOR)
        if mbr[510:512] != b"\x55\xaa":
            raise SystemExit(f"{image} has no partition table (no MBR signature)")
        boot = bytearray(boot_img)
        boot[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
        boot[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
        boot[BOOT_DRIVE] = 0xFF
        boot[KERNEL_SECTOR : KERNEL_SECTOR + 8] = struct.pack("<Q", part_start)
        boot[NT_MAGIC:SECTOR] = mbr[NT_MAGIC:SECTOR]
        f.seek(part_start * SECTOR)
        f.write(core)
        f.seek(0)
        f.write(boot)
    return nsec


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    image, boot, core, start, sectors = argv
    with open(boot, "rb") as b, open(core, "rb") as c:
        n = setup(image, b.read(), c.read(), int(start), int(sectors))
    print(f"grub_bios_setup: core.img ({n} sectors) at sector {start} of {image}, boot.img in its MBR")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
