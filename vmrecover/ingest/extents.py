"""Changed-extent lists (what a hypervisor's changed block tracking returns) and chunk planning."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ..errors import BadInput, NotFound

Extents = list[tuple[int, int]]


def _parse_list(raw: object, where: str) -> Extents:
    if not isinstance(raw, list):
        raise BadInput(f"{where}: expected a JSON list of [offset, length] pairs")
    out: Extents = []
    for i, item in enumerate(raw):
        ok = (
            isinstance(item, list | tuple)
            and len(item) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)
        )
        if not ok:
            raise BadInput(f"{where}: entry {i} is {item!r}, expected [offset, length] with integers >= 0")
        if item[1]:
            out.append((item[0], item[1]))
    return out


def load_changed_extents(path: Path, disk_names: list[str]) -> dict[str, Extents]:
    """Read ``--changed-extents FILE``: a list (one disk) or an object {disk name: list}."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"changed-extents file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot read changed-extents file {path}: {exc}") from None
    if isinstance(raw, dict):
        unknown = set(raw) - set(disk_names)
        if unknown:
            raise BadInput(f"{path} names disks {sorted(unknown)} that are not in this backup ({disk_names})")
        return {name: _parse_list(raw.get(name, []), f"{path}[{name!r}]") for name in disk_names}
    if len(disk_names) != 1:
        raise BadInput(
            f"{path} holds one list but the backup has {len(disk_names)} disks",
            hint='give an object: {"disk-name": [[offset, length], ...], ...}',
        )
    return {disk_names[0]: _parse_list(raw, str(path))}


def check_within(disk: str, extents: Extents, size: int) -> None:
    """Refuse a changed extent that ends past the disk (a CBT list for another disk, or garbage)."""
    for off, length in extents:
        if off + length > size:
            raise BadInput(
                f"changed extent [{off}, {length}] of disk {disk!r} ends past the disk's size {size}"
            )


def merged(extents: Iterable[tuple[int, int]], size: int) -> Extents:
    """*extents* clipped to a *size*-byte disk, sorted, with touching or overlapping ones joined (what a
    hypervisor's changed block tracking answers is not trusted to be any of these)."""
    spans = sorted((max(0, off), min(size, off + length)) for off, length in extents)
    out: Extents = []
    for start, end in spans:
        if end <= start:
            continue
        if out and out[-1][0] + out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], end) - out[-1][0])
        else:
            out.append((start, end - start))
    return out


def bitmap_extents(bitmap: bytes, block: int, size: int) -> Extents:
    """The (offset, length) runs of set bits of a change bitmap (bit i: block i, the first bit the most
    significant of byte 0, as XenServer's ``VDI.list_changed_blocks`` and NBD's dirty maps have it),
    clipped to a *size*-byte disk."""
    out: Extents = []
    start = None
    n = min(len(bitmap) * 8, -(-size // block))  # blocks the bitmap speaks of, within the disk
    for i in range(n):
        if bitmap[i >> 3] & (0x80 >> (i & 7)):
            if start is None:
                start = i
        elif start is not None:
            out.append((start * block, (i - start) * block))
            start = None
    if start is not None:
        out.append((start * block, min(size, n * block) - start * block))
    return merged(out, size)


def chunks_touching(extents: Iterable[tuple[int, int]], chunk_size: int, count: int) -> list[int]:
    """Sorted chunk numbers that overlap any of *extents* (clipped to *count* chunks)."""
    out: set[int] = set()
    for off, length in extents:
        if length <= 0:
            continue
        first, last = off // chunk_size, (off + length - 1) // chunk_size
        out.update(range(first, min(last, count - 1) + 1))
    return sorted(out)
