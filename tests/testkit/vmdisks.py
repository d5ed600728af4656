"""Disks for the hypervisor tests (vSphere, XenServer): a test image, and a restored disk's sha256."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

MiB = 1 << 20


def disk_image(path: Path, size: int, *, seed: int) -> Path:
    """Random data in about half of the MiB-sized regions, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):
            if rng.random() < 0.5:
                f.seek(off)
                f.write(rng.randbytes(MiB // 2))
    return path


def restored_sha(cli: Any, target: str, disk: str, tmp_path: Path) -> str:
    """``vmrecover restore TARGET --disk DISK`` to a raw file, and its sha256."""
    out = tmp_path / f"{disk}.raw"
    cli.run("restore", target, "--disk", disk, "--to", out, "--overwrite")
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
