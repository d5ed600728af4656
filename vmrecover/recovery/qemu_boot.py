"""The qemu command line that boots a VM's disks: one place, used by ``recover boot`` and the tests."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import NotFound
from ..qemu import accelerator


def _esc(value: str | Path) -> str:
    """qemu option values escape ',' by doubling it."""
    return str(value).replace(",", ",,")


def drive(path: str | Path, *, bus: str = "virtio", fmt: str = "raw", extra: str = "") -> str:
    return f"file={_esc(path)},format={fmt},if={bus}" + (f",{extra}" if extra else "")


def argv(
    disks: Sequence[str | Path],
    *,
    memory: str = "512M",
    cpus: int = 1,
    serial: str | Path | None = None,
    accel: str = "auto",
    bus: str = "virtio",
    drives: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """Boot *disks* (raw, the first is the boot disk) or the given ``-drive`` values, headless.

    The serial console goes to *serial* (a file) or to stdout; the VM has no network and does not
    reboot (a guest that reboots ends qemu).  *accel* ``auto`` is KVM where it works, else TCG."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise NotFound("qemu-system-x86_64 is not installed", hint="apt-get install qemu-system-x86")
    console = (
        ["-chardev", f"file,id=serial0,path={_esc(serial)}", "-serial", "chardev:serial0"]
        if serial
        else ["-serial", "stdio"]
    )
    out = [qemu, "-accel", accelerator(accel), "-m", memory, "-smp", str(cpus), "-display", "none",
           "-no-reboot", "-nic", "none", "-monitor", "none", *console]  # fmt: skip
    for d in [*(drive(p, bus=bus) for p in disks), *drives]:
        out += ["-drive", d]
    return out + list(extra)
