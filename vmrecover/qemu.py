"""Thin wrappers over qemu's tools (qemu-img, qemu-nbd via libnbd): the one place that runs them.

Image formats other than raw are read and written through qemu's own block layer: ``qemu-nbd`` is
started by libnbd with systemd socket activation (no socket path, no port, no race; the server dies
with the handle), so every format qemu knows reads exactly as a guest would see it.

qemu is always told which file to open with a ``json:`` spec (:func:`image_spec`): a local name is
then a file name and never a protocol (``nbd:…``, ``json:…``), and backing files can be switched off.
Format probing is done here from the image's first bytes (:func:`probe_format`), never by qemu:
``qemu-img info`` opens what an image names (a vmdk descriptor's extents, a qcow2's data file)
while it probes.  :func:`nbd_connect` reports every file the server has open, so a caller can tell
exactly which host files an image made qemu read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from .errors import BadInput, VmrecoverError

log = logging.getLogger("vmrecover.qemu")

# qemu format names we accept as backup sources / restore targets; 'vpc' is qemu's name for VHD.
SOURCE_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx")
FORMAT_ALIASES = {"vhd": "vpc"}

PROBE_BYTES = 2048  # what qemu reads to probe a format (BLOCK_PROBE_BUF_SIZE)

# (offset, magic, format) as qemu 7.2's block drivers probe them (their bdrv_probe functions)
_MAGICS = [
    (0, b"KDMV", "vmdk"),  # sparse extent (monolithicSparse, streamOptimized)
    (0, b"COWD", "vmdk"),  # ESX sparse extent
    (0, b"QED\0", "qed"),
    (64, (0xBEDA107F).to_bytes(4, "little"), "vdi"),
    (0, b"conectix", "vpc"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image\0", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n", "cloop"),
]


def probe_format(head: bytes, name: str) -> str:
    """The format qemu would detect for an image whose first bytes are *head* (``PROBE_BYTES`` of
    them) and whose file name is *name*, found without opening anything."""
    if head[:4] == b"QFI\xfb":
        return "qcow2" if int.from_bytes(head[4:8], "big") >= 2 else "qcow"
    for offset, magic, fmt in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    if _looks_like_vmdk_descriptor(head):
        return "vmdk"
    if name.endswith(".dmg"):  # qemu's dmg driver probes by name only
        return "dmg"
    return "raw"


def _looks_like_vmdk_descriptor(head: bytes) -> bool:
    """qemu's vmdk_probe for text: comment lines and blank lines of spaces, then 'version=1|2|3'."""
    p, end = 0, len(head)
    while p < end:
        if head[p] == ord("#"):
            nl = head.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if head[p] == ord(" "):
            while p < end and head[p] == ord(" "):
                p += 1
            if p < end and head[p] == ord("\r"):
                p += 1
            if p == end or head[p] != ord("\n"):
                return False
            p += 1
            continue
        return any(head.startswith(f"version={v}{eol}".encode(), p) for v in "123" for eol in ("\n", "\r\n"))
    return False


def image_spec(path: Path | str, fmt: str, *, backing: bool, device: bool = False) -> str:
    """How qemu is told to open the file *path* as *fmt*.  ``backing=False`` opens no backing file
    (a qcow2 or vmdk then reads zeros where its backing file would have supplied data)."""
    opts: dict[str, Any] = {
        "driver": fmt,
        "file": {"driver": "host_device" if device else "file", "filename": os.path.abspath(path)},
    }
    if not backing:
        opts["backing"] = None
    return "json:" + json.dumps(opts)


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


def image_info(spec: str, *, what: str) -> dict[str, Any]:
    return run_json(["qemu-img", "info", "--output=json", spec], what=what)


def image_map(spec: str, *, what: str) -> list[dict[str, Any]]:
    return run_json(["qemu-img", "map", "--output=json", spec], what=what)


class OpenFile(NamedTuple):
    """A regular file or block device a qemu-nbd server has open (its name as the kernel shows it)."""

    name: str
    dev: int
    ino: int


def nbd_connect(spec: str, *, readonly: bool, what: str) -> tuple[Any, list[OpenFile]]:
    """A libnbd handle on the image *spec* (see :func:`image_spec`) served by a private qemu-nbd
    (killed when the handle is closed), and the files that server opened to serve it."""
    try:
        import nbd
    except ImportError:
        raise VmrecoverError(
            "the libnbd Python binding is missing", hint="run 'make setup' (Debian package python3-libnbd)"
        ) from None
    argv = [_require("qemu-nbd"), "--cache=writeback", "--aio=threads"]
    if readonly:
        argv.append("--read-only")
    with tempfile.TemporaryDirectory(prefix="vmrecover-nbd-") as tmp:
        pid_file = Path(tmp, "pid")
        inherited = _inheritable_fds()  # the server starts with these: they are ours, not its files
        h = nbd.NBD()
        try:
            h.connect_systemd_socket_activation([*argv, f"--pid-file={pid_file}", spec])
        except nbd.Error as exc:
            raise BadInput(f"qemu-nbd cannot open {what}: {exc}") from None
        try:
            pid_st = os.stat(pid_file)
            files = [
                f
                for f in _open_files(int(pid_file.read_text()), skip_fds=inherited | {0, 1, 2})
                if (f.dev, f.ino) != (pid_st.st_dev, pid_st.st_ino)
            ]
        except BaseException:
            h.shutdown()
            raise
    return h, files


def _inheritable_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is closed by now
            if not fcntl.fcntl(int(name), fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                out.add(int(name))
    return out


def _open_files(pid: int, *, skip_fds: set[int]) -> list[OpenFile]:
    """The regular files and block devices process *pid* has open, in descriptor order, once each."""
    fd_dir = f"/proc/{pid}/fd"
    out: list[OpenFile] = []
    for n in sorted(map(int, os.listdir(fd_dir))):
        if n in skip_fds:
            continue
        try:
            st = os.stat(f"{fd_dir}/{n}")
            name = os.readlink(f"{fd_dir}/{n}")
        except FileNotFoundError:
            continue
        if (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)) and all(
            (f.dev, f.ino) != (st.st_dev, st.st_ino) for f in out
        ):
            out.append(OpenFile(name, st.st_dev, st.st_ino))
    return out


def create_image(path: str, fmt: str, size: int) -> None:
    """A new, empty image; *fmt* is qemu's format, optionally with a subformat (``vmdk:streamOptimized``)."""
    driver, _, sub = fmt.partition(":")
    opts = ["-o", f"subformat={sub}"] if sub else ["-o", "subformat=dynamic"] if driver == "vpc" else []
    proc = subprocess.run(
        [_require("qemu-img"), "create", "-q", "-f", driver, *opts, path, str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise VmrecoverError(f"qemu-img cannot create {path}: {proc.stderr.strip()}")


# ------------------------------------------------------------------------------------------ accelerator
ACCELS = ("auto", "kvm", "tcg")
_KVM_PROBE_QMP = '{"execute": "qmp_capabilities"} {"execute": "quit"}\n'
_kvm_verdict: tuple[bool, str] | None = None
_KILLED = "the probe's qemu was killed"
# How long the probe's guest may take to boot a kernel to its panic.  About 1 s on hardware and 4.5 s
# under TCG here; nested under emulation (the appliance tier: KVM on TCG's emulated AMD-V) it is
# slower still, and a probe cut short there would send libguestfs to TCG inside TCG: twenty minutes
# instead of thirty seconds.  A host whose KVM starts VMs but never runs them costs this once per boot.
KVM_PROBE_TIMEOUT_S = 120
# The verdict, kept for the host's boot (processes share it: each would otherwise wait out a hang).
KVM_VERDICT_FILE = Path("/run/vmrecover/kvm-verdict.json")


def kvm_works() -> tuple[bool, str]:
    """Whether qemu runs a VM with KVM here, and why not.

    /dev/kvm must be readable and writable, and a guest must really run: qemu with ``-accel kvm
    -cpu host`` boots the host's kernel without a root file system, and the kernel's panic must end
    qemu (``-no-reboot``) within :data:`KVM_PROBE_TIMEOUT_S`.  Starting qemu is not enough: on some
    hosts qemu aborts setting the vCPU's MSRs, on others (a nested KVM such as kvm-pvm) it starts and
    the guest never gets past its real-mode start.  Without a kernel in /boot, qemu starting and
    quitting with the vCPU created is taken as the answer.  Asked once per process, and once per boot
    of the host where :data:`KVM_VERDICT_FILE` can be written; libguestfs and ``recover boot`` take
    their accelerator from it."""
    global _kvm_verdict
    if _kvm_verdict is None:
        started = time.monotonic()
        _kvm_verdict, cached = _shared_verdict()
        how = "kept from an earlier probe this boot" if cached else f"{time.monotonic() - started:.1f} s"
        log.info("KVM probe: %s (%s)", _kvm_verdict[1], how)
    return _kvm_verdict


def _probe_key(qemu: str, kernel: Path | None) -> str:
    st = os.stat(qemu)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{boot} {qemu} {st.st_ino} {st.st_mtime_ns} {kernel} {KVM_PROBE_TIMEOUT_S}"


def _shared_verdict() -> tuple[tuple[bool, str], bool]:
    """The probe's verdict, and whether it came from :data:`KVM_VERDICT_FILE` (taken under a lock, so
    processes that ask at once wait for one probe)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return (False, "/dev/kvm is missing or not accessible (no hardware or nested virtualization)"), False
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return (False, "qemu-system-x86_64 is not installed"), False
    kernel = _probe_kernel()
    key = _probe_key(qemu, kernel)
    try:
        KVM_VERDICT_FILE.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        lock = os.open(KVM_VERDICT_FILE.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return _probe_kvm(qemu, kernel), False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            ok, why = json.loads(KVM_VERDICT_FILE.read_text())[key]
            return (bool(ok), str(why)), True
        verdict = _probe_kvm(qemu, kernel)
        if verdict[1].startswith(_KILLED):
            return verdict, False  # not this host's answer: the next process asks again
        with contextlib.suppress(OSError, ValueError):
            try:
                known = json.loads(KVM_VERDICT_FILE.read_text())
                known = known if isinstance(known, dict) else {}
            except (OSError, ValueError):
                known = {}
            known[key] = list(verdict)
            tmp = KVM_VERDICT_FILE.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, KVM_VERDICT_FILE)
        return verdict, False
    finally:
        os.close(lock)


def _probe_kernel() -> Path | None:
    """The newest kernel in /boot (what libguestfs' appliance boots), if one is readable."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((k for k in kernels if os.access(k, os.R_OK)), None)


def _probe_kvm(qemu: str, kernel: Path | None) -> tuple[bool, str]:
    argv = [qemu, "-accel", "kvm", "-cpu", "host", "-machine", "q35", "-m", "128", "-display", "none",
            "-nodefaults", "-no-user-config", "-no-reboot"]  # fmt: skip
    if kernel is not None:  # no root file system: the kernel panics, and panic=-1 ends qemu
        argv += ["-kernel", str(kernel), "-append", "panic=-1 quiet loglevel=0", "-serial", "none"]
        what = f"boot {kernel.name} to its panic"
    else:
        argv += ["-S", "-qmp", "stdio"]
        what = "start"
    try:
        proc = subprocess.run(argv, input=_KVM_PROBE_QMP if kernel is None else "", capture_output=True,
                              text=True, timeout=KVM_PROBE_TIMEOUT_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return False, f"a qemu with KVM did not {what} within {KVM_PROBE_TIMEOUT_S} s"
    if proc.returncode in (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT):
        return False, f"{_KILLED} (signal {-proc.returncode})"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return False, f"qemu with KVM failed (exit {proc.returncode}): {lines[-1] if lines else 'no message'}"
    return True, "qemu runs with KVM"


def accelerator(requested: str = "auto") -> str:
    """The qemu accelerator to use: *requested* (or ``VMRECOVER_ACCEL``) when it is ``kvm`` or ``tcg``;
    for ``auto``, ``kvm`` where :func:`kvm_works`, else ``tcg`` (correct everywhere, 10-50x slower)."""
    if requested == "auto":
        requested = os.environ.get("VMRECOVER_ACCEL", "auto") or "auto"
    if requested not in ACCELS:
        raise BadInput(f"unknown qemu accelerator {requested!r}", hint="use one of: " + ", ".join(ACCELS))
    if requested != "auto":
        return requested
    return "kvm" if kvm_works()[0] else "tcg"
