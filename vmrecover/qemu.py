"""Thin wrappers over qemu's tools (qemu-img, qemu-nbd via libnbd): the one place that runs them.

Image formats other than raw are read and written through qemu's own block layer: ``qemu-nbd`` is
started by libnbd with systemd socket activation (no socket path, no port, no race; the server dies
with the handle), so every format qemu knows reads exactly as a guest would see it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .errors import BadInput, VmrecoverError

# qemu format names we accept as backup sources / restore targets; 'vpc' is qemu's name for VHD.
SOURCE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx")
FORMAT_ALIASES = {"vhd": "vpc"}


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise VmrecoverError(f"{tool} is not installed", hint="run 'make setup' (Debian package qemu-utils)")
    return path


def run_json(args: list[str], *, what: str) -> Any:
    proc = subprocess.run([_require(args[0]), *args[1:]], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise BadInput(f"cannot read {what}: {msg}", hint="check that the file is a complete disk image")
    return json.loads(proc.stdout)


def image_info(path: Path) -> dict[str, Any]:
    return run_json(["qemu-img", "info", "--output=json", str(path)], what=f"image {path}")


def image_map(path: Path, fmt: str) -> list[dict[str, Any]]:
    return run_json(["qemu-img", "map", "--output=json", "-f", fmt, str(path)], what=f"image {path}")


def nbd_connect(path: Path, fmt: str, *, readonly: bool):
    """A libnbd handle on *path* served by a private qemu-nbd (killed when the handle is closed)."""
    try:
        import nbd
    except ImportError:
        raise VmrecoverError(
            "the libnbd Python binding is missing", hint="run 'make setup' (Debian package python3-libnbd)"
        ) from None
    argv = [_require("qemu-nbd"), f"--format={fmt}", "--cache=writeback", "--aio=threads"]
    if readonly:
        argv.append("--read-only")
    h = nbd.NBD()
    try:
        h.connect_systemd_socket_activation([*argv, str(path)])
    except nbd.Error as exc:
        raise BadInput(f"qemu-nbd cannot open {path} as {fmt}: {exc}") from None
    return h


def create_image(path: Path, fmt: str, size: int) -> None:
    opts = ["-o", "subformat=dynamic"] if fmt == "vpc" else []
    proc = subprocess.run(
        [_require("qemu-img"), "create", "-q", "-f", fmt, *opts, str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VmrecoverError(f"qemu-img cannot create {path}: {proc.stderr.strip()}")
