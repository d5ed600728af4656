"""Instant recovery on the appliance itself: a session's VM run by qemu, from the service's datastores.

The service's API starts it (``POST /api/v1/sessions`` with ``"run": "qemu"``); it is one more
platform of hypervisors/publishing.py (``published``, ``publish``, ``unpublish``), so stopping the
session stops the VM the same way as on vSphere or XenServer.  qemu reads and writes the session's
disks through the service's FUSE mount, else over ``nfs://`` from its own export on the loopback (the
session's overlay gets the writes, the backup none), with no network device (the recovered
VM must not meet the production one it replaces until someone decides so), its serial console written
to ``console.log`` in the session's folder, its QMP monitor on a private socket (the console's
screenshots: healthcheck.session_screenshot), and no reboot.

The service owns these processes: its own stop stops them (their disks go away with its export), and
its next start stops what a killed service left running (:func:`stop_all`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput, VmrecoverError
from ..repo.catalog import Point, Session
from ..repo.repository import Repository
from . import exports, qemu_boot, sessions

log = logging.getLogger("vmrecover.recovery")
PLATFORM = "qemu"
CONSOLE = "console.log"  # in the session's folder
STARTUP_CHECK = 1.0  # seconds qemu must survive to count as started (bad options end it at once)
STOP_WAIT = 15.0  # seconds between SIGTERM (ACPI-less: qemu quits) and SIGKILL
_children: dict[int, subprocess.Popen[bytes]] = {}  # started by this process: reaped when stopped


@dataclass
class Published:
    platform: str  # "qemu"
    hypervisor: str  # "appliance": no hypervisor connection is needed
    pid: int
    console: str
    argv: list[str] = field(default_factory=list)
    started: str = ""
    vm: str = ""
    vm_name: str = ""
    qmp: str = ""  # qemu's QMP socket (none for sessions started before it had one)


def published(repo: Repository, session: Session) -> Published | None:
    doc = sessions.target(repo, session)
    return None if doc is None or doc.get("platform") != PLATFORM else Published(**doc)


def _disk_path(repo: Repository, session: Session) -> str:
    """Where qemu finds the session's disks: the service's FUSE mount if it has one, else its NFS export
    (qemu's nfs:// asks the portmapper, so that must run)."""
    from ..service.daemon import running

    doc = running(repo.root) or {}
    if doc.get("fuse"):
        return f"{doc['fuse']}/recover/{session.name}"
    ex = exports.running(repo.root)
    if ex is None or not ex.by_service or ex.portmap_port is None:
        raise VmrecoverError(
            "running a session under qemu needs the service's FUSE mount, or its NFS export with the "
            "portmapper (qemu's nfs:// asks it for the ports)",
            hint="set [fuse] mountpoint, or [nfs] enabled = true and portmapper = true, in the service's "
            "configuration",
        )
    exports.allow_on_service(repo.root, ["127.0.0.1/32"])  # qemu mounts it from the loopback
    return f"nfs://127.0.0.1{exports.EXPORT_PATH}/recover/{session.name}"


def publish(
    repo: Repository, session: Session, point: Point, *, memory: str = "1G", cpus: int = 1,
    accel: str = "auto", extra: Sequence[str] = (),
) -> Published:  # fmt: skip
    """Run *session*'s VM under qemu from the service's datastores (which must serve this repository)."""
    where = _disk_path(repo, session)
    disks = repo.catalog.disks(point.id)
    if not disks:
        raise BadInput(f"point {point.id} of {point.vm} has no disk")
    console = repo.session_dir(session.id) / CONSOLE
    qmp = _qmp_path(repo, session)
    extra = [*extra, "-qmp", f"unix:{qmp},server=on,wait=off"]
    argv = qemu_boot.argv([], memory=memory, cpus=cpus, serial=console, accel=accel, extra=extra,
                          drives=[qemu_boot.drive(f"{where}/{d.name}.raw") for d in disks])  # fmt: skip
    logfile = repo.session_dir(session.id) / "qemu.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    _children[proc.pid] = proc
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    target = Published(
        PLATFORM, "appliance", proc.pid, str(console), argv, started, session.name, session.name, str(qmp)
    )
    sessions.set_target(repo, session, asdict(target))
    try:
        proc.wait(timeout=STARTUP_CHECK)
    except subprocess.TimeoutExpired:
        log.info("session %s runs under qemu (pid %d), console %s", session.name, proc.pid, console)
        return target
    sessions.set_target(repo, session, None)
    _children.pop(proc.pid, None)
    _forget_qmp(str(qmp))
    tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
    raise VmrecoverError(
        f"qemu ended at once (exit {proc.returncode}) for session {session.name}: {' / '.join(tail)}",
        hint=f"see {logfile}",
    )


def _qmp_path(repo: Repository, session: Session) -> Path:
    """``REPO/run/qmp/<session id>.sock`` (0700 folder), or in a private temporary folder when that
    path is too long for a socket (108 bytes)."""
    folder = repo.run_dir() / "qmp"
    path = folder / f"{session.id}.sock"
    if len(os.fsencode(path)) >= 100:
        return Path(tempfile.mkdtemp(prefix="vmr-qmp-")) / "qmp.sock"
    folder.mkdir(mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # of a killed service's qemu
    return path


def _forget_qmp(path: str) -> None:
    if not path:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    parent = os.path.dirname(path)
    if os.path.basename(parent).startswith("vmr-qmp-"):
        shutil.rmtree(parent, ignore_errors=True)


def _ours(target: Published) -> bool:
    """Is *target*'s pid still the qemu this session started (not a reused pid)?"""
    try:
        with open(f"/proc/{target.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv)
        and os.path.basename(argv[0]).startswith(b"qemu-system")
        and any(f"/recover/{target.vm_name}/".encode() in a for a in argv)
    )


def alive(target: Published) -> bool:
    """Is the session's qemu still running?"""
    proc = _children.get(target.pid)
    return proc.poll() is None if proc is not None else _ours(target)


def exit_code(target: Published) -> int | None:
    """How the session's qemu ended, if this process started it and it has ended."""
    proc = _children.get(target.pid)
    return None if proc is None else proc.poll()


def unpublish(repo: Repository, conn: Any, session: Session, target: Published) -> None:
    """Stop the session's qemu (SIGTERM, then SIGKILL), then forget it.  *conn* is unused (no
    hypervisor)."""
    if _ours(target):
        os.kill(target.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while _ours(target) and time.monotonic() < deadline:
            _reap(target.pid)
            time.sleep(0.05)
        if _ours(target):
            os.kill(target.pid, signal.SIGKILL)
    _reap(target.pid, wait=True)
    _forget_qmp(target.qmp)
    sessions.set_target(repo, session, None)
    log.info("session %s: its qemu (pid %d) is stopped", session.name, target.pid)


def _reap(pid: int, *, wait: bool = False) -> None:
    proc = _children.get(pid)
    if proc is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5 if wait else 0)
    if proc.returncode is not None:
        _children.pop(pid, None)


def running(repo: Repository) -> list[tuple[Session, Published]]:
    """Sessions published under qemu, with their record."""
    out = []
    for s in repo.catalog.sessions():
        t = published(repo, s)
        if t is not None:
            out.append((s, t))
    return out


def stop_all(repo: Repository) -> None:
    """Stop every session's qemu (the service stops, or starts after a crash: their disks are gone)."""
    for s, t in running(repo):
        try:
            unpublish(repo, None, s, t)
        except OSError as exc:
            log.warning("could not stop the qemu of session %s (pid %d): %s", s.name, t.pid, exc)
