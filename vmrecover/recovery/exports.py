"""The repository's NFS export, run in the background for recoveries on hypervisors.

``recover start --to vmware://...`` needs an NFS server that the hypervisor's host may mount.  Until
the appliance's service (a later issue) runs one for good, this starts ``vmrecover nfs serve`` as a
daemon of the repository: the standard ports (NFS 2049, the portmapper on 111, which ESXi's NFS client
asks for MOUNT), every address of this machine, and an allow list that grows with the hosts that
mount it (a change restarts the daemon: NFS clients see a short outage and carry on, handles and the
write verifier survive a restart).  ``run/nfs-export.json`` records it; it stops when the last session
published on a hypervisor stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import LockedError, VmrecoverError
from ..fsutil import write_file
from ..repo.keys import PASSPHRASE_ENV

log = logging.getLogger("vmrecover.recovery")
NFS_PORT = 2049
EXPORT_PATH = "/vmrecover"


@dataclass
class Export:
    pid: int
    nfs_port: int
    mount_port: int
    portmap_port: int | None
    allow: list[str]
    log: str

    @property
    def alive(self) -> bool:
        """The recorded daemon runs: its pid is alive *and* is our ``nfs serve`` (after a reboot or pid
        reuse, the record must never make us signal some other process)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return False
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, IndexError):
            return False
        return b"vmrecover" in argv and b"nfs" in argv and b"serve" in argv and b"--repo" in argv


def record_path(repo_root: Path) -> Path:
    return repo_root / "run" / "nfs-export.json"


def running(repo_root: Path) -> Export | None:
    try:
        ex = Export(**json.loads(record_path(repo_root).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return ex if ex.alive else None


def ensure(repo_root: Path, allow: list[str], *, passphrase: str | None = None) -> Export:
    """The export, serving at least *allow* (addresses or networks); started or restarted as needed."""
    cur = running(repo_root)
    if cur is not None and set(allow) <= set(cur.allow):
        return cur
    wanted = sorted(set(allow) | set(cur.allow if cur else []))
    if cur is not None:
        log.info("restarting the NFS export to allow %s", ", ".join(wanted))
        stop(repo_root)
    return _start(repo_root, wanted, passphrase)


def _start(repo_root: Path, allow: list[str], passphrase: str | None) -> Export:
    logfile = record_path(repo_root).with_suffix(".log")
    logfile.parent.mkdir(exist_ok=True, mode=0o700)
    argv = [sys.executable, "-m", "vmrecover", "nfs", "serve", "--repo", str(repo_root),
            "--listen", "0.0.0.0", "--port", str(NFS_PORT), "--portmapper", "--json",
            *[a for x in allow for a in ("--allow", x)]]  # fmt: skip
    # A minimal environment: the daemon outlives this command, and its environment is readable (by
    # its owner) for as long as it runs, so no hypervisor or guest password may be in it.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR")}
    env["VMRECOVER_LOG_FORMAT"] = "json"
    if passphrase is not None:
        env[PASSPHRASE_ENV] = passphrase
    with open(logfile, "ab") as logf:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logf,
            start_new_session=True,
            env=env,
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    try:
        ready = json.loads(line)
    except ValueError:
        ready = {}
    if not ready.get("serving"):
        proc.wait()
        if ready.get("exit_code") == LockedError.exit_code:
            raise LockedError(
                f"the NFS export cannot start: {ready.get('message')}",
                hint="another NFS server (or rpcbind) holds port 2049 or 111 here: stop it",
            )
        raise VmrecoverError(
            f"the NFS export did not start (exit {proc.returncode}): {ready.get('message', '')}",
            hint=f"see {logfile}",
        )
    ex = Export(
        proc.pid, ready["nfs_port"], ready["mount_port"], ready.get("portmap_port"), allow, str(logfile)
    )
    write_file(record_path(repo_root), json.dumps(asdict(ex)).encode(), what="NFS export record")
    log.info("NFS export started (pid %d) for %s", ex.pid, ", ".join(allow))
    return ex


def stop(repo_root: Path, *, wait: float = 30) -> None:
    ex = running(repo_root)
    if ex is not None:
        os.kill(ex.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while ex.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        if ex.alive:
            os.kill(ex.pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        record_path(repo_root).unlink()
