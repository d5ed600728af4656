"""A job's pre- and post-hooks: commands run on the appliance around a backup.

``pre_hook`` runs before the snapshot (to quiesce an application the guest tools cannot), ``post_hook``
after the backup, each an argv list of the job's configuration (config.Job), run by :func:`run_hook`:

- never through a shell: the argv is executed as given (``;``, ``$`` and quotes are plain characters);
- in a session (and process group) of its own, with stdin from /dev/null, in ``/``, and with an
  environment made of a few harmless variables of the service's (PATH, locale, TZ, ...: never its
  secrets) and the caller's (:func:`hook_env`: VMRECOVER_JOB, VMRECOVER_VM, VMRECOVER_PHASE and, after
  the backup, VMRECOVER_RESULT);
- within its timeout: past it, the whole process group gets SIGTERM, then SIGKILL after
  :data:`KILL_GRACE`, so children the hook started go too.  When the hook itself ends, whatever it left
  running in its process group is killed as well: nothing a hook starts outlives it (a daemon that
  must, detaches with a session of its own);
- its output (stdout and stderr together) is kept, the last :data:`TAIL_LINES` lines, for the run
  record and the error message.

A hook that exits non-zero, is killed by a signal, times out or cannot be started raises
:class:`HookFailed` (with its :class:`HookResult`): for a pre-hook the runner then fails the job
without starting the backup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import VmrecoverError

log = logging.getLogger("vmrecover.hooks")

KILL_GRACE = 5.0  # after SIGTERM to a hook's process group, SIGKILL this much later
TAIL_LINES = 20  # lines of output kept
TAIL_BYTES = 64 * 1024  # bytes of output kept to find them in
LINE_MAX = 500  # characters kept of one line
DRAIN = 1.0  # after a hook ended, its output is read this much longer (a pipe some escapee holds)
SAFE_ENV = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "HOME", "USER", "LOGNAME")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class HookResult:
    what: str  # "pre-hook", "post-hook"
    argv: tuple[str, ...]
    exit_code: int | None  # the exit status; -N: killed by signal N; None: it could not be started
    duration: float  # seconds
    output: tuple[str, ...]  # the last lines of its stdout and stderr
    timed_out: bool = False

    def to_json(self) -> dict[str, Any]:
        """For the run record."""
        doc = asdict(self)
        doc["argv"], doc["output"] = list(self.argv), list(self.output)
        doc["duration"] = round(self.duration, 3)
        return doc

    def last_line(self) -> str:
        return next((line for line in reversed(self.output) if line.strip()), "")


class HookFailed(VmrecoverError):
    """A hook failed: exited non-zero, was killed, timed out or could not be started."""

    def __init__(self, message: str, result: HookResult, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint, hook=result.to_json())
        self.result = result


def hook_env(
    job: str, vms: Sequence[str], phase: str, result: str | None = None, *, run_id: int | None = None
) -> dict[str, str]:
    """The variables a hook gets: VMRECOVER_JOB, VMRECOVER_VM (the VMs, one per line: a name may hold
    spaces, never a newline), VMRECOVER_PHASE ("pre" or "post"), VMRECOVER_RESULT for post (the
    backup's outcome: "succeeded" or "failed") and VMRECOVER_RUN (the run's id) when given."""
    if phase not in ("pre", "post"):
        raise ValueError(f"phase {phase!r} is pre or post")
    env = {"VMRECOVER_JOB": job, "VMRECOVER_VM": "\n".join(vms), "VMRECOVER_PHASE": phase}
    if phase == "post":
        env["VMRECOVER_RESULT"] = result or "unknown"
    if run_id is not None:
        env["VMRECOVER_RUN"] = str(run_id)
    return env


def _environment(env: dict[str, str]) -> dict[str, str]:
    base = {k: os.environ[k] for k in SAFE_ENV if k in os.environ}
    base.setdefault("PATH", DEFAULT_PATH)
    for k, v in env.items():
        if not k or "=" in k or "\0" in k or "\0" in v:
            raise ValueError(f"environment variable {k!r} cannot be passed")
    return {**base, **env}


def _tail(data: bytes) -> tuple[str, ...]:
    lines = data.decode(errors="replace").splitlines()
    return tuple(line[:LINE_MAX] for line in lines[-TAIL_LINES:])


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # (all gone already)
        os.killpg(pgid, sig)


def run_hook(argv: Sequence[str], *, timeout: float, env: dict[str, str], what: str) -> HookResult:
    """Run *argv* (no shell) with *env* added to a clean environment, within *timeout* seconds.  Its
    :class:`HookResult` if it exits 0, else :class:`HookFailed` naming *what* ("pre-hook"), the command,
    how it ended, after how long, and its last line of output."""
    argv = tuple(argv)
    if not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise HookFailed(f"{what} {argv!r} is not a command", HookResult(what, argv, None, 0.0, ()))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_environment(env),
            cwd="/",
            start_new_session=True,  # its own process group: what a timeout kills
            close_fds=True,
        )
    except OSError as exc:
        res = HookResult(what, argv, None, time.monotonic() - start, ())
        raise HookFailed(
            f"{what} {argv[0]} cannot be run: {exc.strerror or exc}", res, hint="check the job's hook path"
        ) from None
    assert proc.stdout is not None
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    buf = bytearray()
    pidfd = os.pidfd_open(proc.pid)
    timed_out = False
    try:

        def read_some(wait: float) -> bool:
            """Read what is there (waiting at most *wait*); False at the end of the output."""
            r, _, _ = select.select([out], [], [], max(0.0, wait))
            if not r:
                return True
            chunk = os.read(out, 65536)
            if chunk:
                buf.extend(chunk)
                del buf[:-TAIL_BYTES]
            return bool(chunk)

        deadline = start + timeout
        eof = False
        while True:  # until the hook (the group's leader) has exited, or the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([pidfd] + ([] if eof else [out]), [], [], left)
            if pidfd in r:
                break
            if out in r:
                eof = not read_some(0)
        # the leader has exited (a zombie until waited for: its pid, the group's id, stays ours) or
        # is late: stop the group
        if not select.select([pidfd], [], [], 0)[0]:
            timed_out = True
            _killpg(proc.pid, signal.SIGTERM)
            select.select([pidfd], [], [], KILL_GRACE)
        _killpg(proc.pid, signal.SIGKILL)  # anything the hook left running (or it, past the grace)
        end = time.monotonic() + DRAIN
        while not eof and time.monotonic() < end:
            eof = not read_some(end - time.monotonic())
        code = proc.wait()
    finally:
        os.close(pidfd)
        proc.stdout.close()
        if proc.returncode is None:  # (an exception above) never leave it behind
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    res = HookResult(what, argv, code, time.monotonic() - start, _tail(bytes(buf)), timed_out)
    last = res.last_line()
    tail = f": {last}" if last else ""
    if timed_out:
        raise HookFailed(
            f"{what} {argv[0]} did not finish within {timeout:g} s: "
            f"it and its process group were killed{tail}",
            res,
            hint="make the hook faster, or raise the job's hook_timeout",
        )
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise HookFailed(f"{what} {argv[0]} was killed by {name} after {res.duration:.1f} s{tail}", res)
    if code != 0:
        raise HookFailed(f"{what} {argv[0]} exited {code} after {res.duration:.1f} s{tail}", res)
    log.info("%s %s exited 0 after %.1f s", what, argv[0], res.duration)
    return res
