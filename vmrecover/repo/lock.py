"""Repository locks, with flock(2) (per open file description: closing another fd of the same file
does not drop them, unlike fcntl/lockf locks; the kernel drops them when the holder dies, so a
SIGKILLed backup never leaves a stale lock).

- ``locks/writer``: exclusive, held by every command that adds or removes restore points or chunks
  (backup, prune, gc).  A second writer fails at once with LockedError naming the holder.
- ``locks/sessions``: shared by ``recover start`` while it creates a session's folder (before its
  catalog row exists), exclusive by gc while it removes folders that no session names: gc never
  mistakes a session being born for a crash's leftover.

Readers (restore, verify, mounts, the NFS export) take no lock: gc removes only chunks that no listed
restore point uses and that are older than gc's own start (repo/gc.py), so a reader of a listed point
never loses a chunk, and a reader of a point pruned under it gets a "was pruned" error.

**Naming the holder.**  An exclusive holder writes its op, pid, host and start time into the lock file
once it holds the lock.  A process that finds the lock taken reads that, and checks it against the
kernel's list of holders (``/proc/locks``): a record of an earlier holder, or none yet (the holder is
between its flock and its write), falls back to the pid the kernel names and its command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import LockedError
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


def describe_holder(fd: int) -> str:
    """Who holds the lock on the file open at *fd*: "backup (pid 12 on host since ...)"."""
    deadline = time.monotonic() + HOLDER_WAIT
    while True:
        holders = flock_holders(fd)
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            info = {}
        pid = info.get("pid")
        current = pid is not None and (pid in holders if holders is not None else _alive(pid))
        if current:
            g = info.get
            return f"{g('op', '?')} (pid {pid} on {g('host', '?')} since {g('since', '?')})"
        if time.monotonic() >= deadline:
            if holders:
                return ", ".join(_command(p) for p in sorted(holders))
            return "another process (/proc/locks does not say which)"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold(path: Path, *, exclusive: bool, op: str, repo: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock at *path* for the block; LockedError if it is not free within *wait* seconds."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockedError(
                        f"repository {repo} is locked by {describe_holder(fd)}; cannot {op} now",
                        hint="wait for it to finish; a killed process releases its lock by itself",
                    ) from None
                time.sleep(0.05)
        if exclusive:
            record = {"op": op, "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        os.close(fd)
