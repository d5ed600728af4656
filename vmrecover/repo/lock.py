"""Repository locks, with flock(2) (per open file description: closing another fd of the same file
does not drop them, unlike fcntl/lockf locks; the kernel drops them when the holder dies, so a
SIGKILLed backup never leaves a stale lock).

- ``locks/writer``: exclusive, held by every command that adds or removes data (backup, prune, gc).
  A second writer fails at once with LockedError naming the holder.
- ``locks/readers``: shared by commands that read chunks (restore, verify, later mounts);
  gc takes it exclusive so that it never deletes a chunk someone is reading.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import LockedError
from .catalog import now_iso


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        g = info.get
        return f"{g('op', '?')} (pid {g('pid', '?')} on {g('host', '?')} since {g('since', '?')})"
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def hold(path: Path, *, exclusive: bool, op: str, repo: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if path.name == "writer":
                raise LockedError(
                    f"repository {repo} is locked by {_holder(fd)}",
                    hint="wait for it to finish; a killed process releases its lock by itself",
                ) from None
            raise LockedError(
                f"repository {repo} is in use ({'readers are active' if exclusive else 'gc is running'}); "
                f"cannot {op} now",
                hint="retry when the restores/verifies (or the gc) have finished",
            ) from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                json.dumps(
                    {"op": op, "pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
                ).encode(),
                0,
            )
        yield
    finally:
        os.close(fd)
