"""Repository locks, with flock(2) (per open file description: closing another fd of the same file
does not drop them, unlike fcntl/lockf locks; the kernel drops them when the holder dies, so a
SIGKILLed backup never leaves a stale lock).

- ``locks/writer``: *shared* by backups, *exclusive* by the commands that remove restore points or
  chunks (prune, gc): backups of different VMs write into the repository at the same time, while
  prune and gc have it to themselves.  prune and gc fail at once with LockedError naming the holders.
- ``locks/vm-<hash of the VM name>``: exclusive, held by a backup of that VM: two backups of one VM
  exclude each other (they would both build on the same parent point).  A backup that finds either
  lock taken waits, saying for whom, unless told not to (``--no-wait``).
- ``locks/sessions``: shared by ``recover start`` while it creates a session's folder (before its
  catalog row exists), exclusive by gc while it removes folders that no session names: gc never
  mistakes a session being born for a crash's leftover.

Readers (restore, verify, mounts, the NFS export) take no lock: gc removes only chunks that no listed
restore point uses and that are older than gc's own start (repo/gc.py), so a reader of a listed point
never loses a chunk, and a reader of a point pruned under it gets a "was pruned" error.

**Naming the holder.**  Every holder writes its op, pid, host and start time into ``<lock>.<pid>``
once it holds the lock (removed when it lets go; an exclusive holder also writes it into the lock file
itself).  A process that finds the lock taken asks the kernel who holds it (``/proc/locks``) and reads
those holders' records: a record of an earlier holder is never believed, and a holder with none yet
(between its flock and its write) is named by its command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LockedError
from ..fsutil import write_file
from .catalog import now_iso

HOLDER_WAIT = 1.0  # seconds to wait for a holder that has the lock but has not written its record yet


def flock_holders(fd: int) -> set[int] | None:
    """Pids holding a flock on the file open at *fd*, from /proc/locks; None where it is unreadable."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    pids = set()
    for line in lines:
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:01:5678 0 EOF"; waiters have "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            with contextlib.suppress(ValueError):
                pids.add(int(fields[4]))
    return pids


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"pid {pid}"
    if len(argv) >= 3 and argv[1:3] == ["-m", "vmrecover"]:
        argv = ["vmrecover", *argv[3:]]
    text = " ".join(os.path.basename(argv[0]) if i == 0 else a for i, a in enumerate(argv))
    return f"{text[:120]} (pid {pid})"


def _record(path: Path, pid: int) -> dict[str, Any]:
    try:
        info: dict[str, Any] = json.loads(path.read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}
    return info if info.get("pid") == pid else {}


def _said(info: dict[str, Any]) -> str:
    g = info.get
    return f"{g('op', '?')} (pid {g('pid')} on {g('host', '?')} since {g('since', '?')})"


def describe_holder(fd: int, path: Path | None = None) -> str:
    """Who holds the lock on the file *path* open at *fd*: "backup of vm1 (pid 12 on host since ...)",
    several holders joined by commas."""
    deadline = time.monotonic() + HOLDER_WAIT
    while True:
        holders = flock_holders(fd)
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            info = {}
        pid = info.get("pid")
        if holders is None:  # no /proc/locks: believe the record if its process lives
            if pid is not None and pid_alive(pid):
                return _said(info)
        elif holders:
            said = {p: _record(path.with_name(f"{path.name}.{p}"), p) for p in holders} if path else {}
            if pid in holders:
                said[pid] = info
            if all(said.get(p) for p in holders) or time.monotonic() >= deadline:
                return ", ".join(_said(said[p]) if said.get(p) else _command(p) for p in sorted(holders))
        if time.monotonic() >= deadline:
            return "another process (/proc/locks does not say which)"
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """Does process *pid* exist (one of another user's counts as existing)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold(
    path: Path, *, exclusive: bool, op: str, repo: Path, wait: float | None = 0.0,
    waiting: Callable[[str], None] | None = None,
) -> Iterator[int]:  # fmt: skip
    """Hold the lock at *path* for the block; LockedError if it is not free within *wait* seconds (None:
    wait as long as it takes, telling *waiting* once who holds it).  Yields the lock file's fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    mine = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise LockedError(
                        f"repository {repo} is locked by {describe_holder(fd, path)}; cannot {op} now",
                        hint="wait for it to finish; a killed process releases its lock by itself",
                    ) from None
                if not told and waiting is not None:
                    waiting(describe_holder(fd, path))
                    told = True
                time.sleep(0.05)
        record = json.dumps({"op": op, "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()})
        write_file(mine, record.encode(), what=mine.name, durable=False)
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        yield fd
    finally:
        with contextlib.suppress(FileNotFoundError):
            mine.unlink()
        os.close(fd)


def upgrade(fd: int) -> bool:
    """Make the shared lock held through *fd* exclusive if nobody else holds the file at all.  False
    otherwise, and then the shared lock may be gone too (flock converts by dropping first): the caller
    must act as if it held nothing."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
