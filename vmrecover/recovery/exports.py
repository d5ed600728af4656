"""The repository's NFS export, as recoveries on hypervisors need it.

``recover start --to vmware://...|xen://...`` needs an NFS server that the hypervisor's hosts may
mount, on the standard ports (NFS 2049, the portmapper on 111, which ESXi's and XenServer's NFS
clients ask for MOUNT), and an allow list that grows with the hosts that mount it.

- **The service** (``vmrecover serve``) runs one for good.  When it serves this repository, its export
  is the one used: its allow list grows while it runs (nothing restarts), directly when the caller is
  the service itself (a recovery started through its API), else through its local API socket (the
  CLI).  It is never stopped from here.
- **Without the service**, this starts ``vmrecover nfs serve`` as a daemon of the repository, on every
  address of this machine (a change of its allow list restarts it: NFS clients see a short outage and
  carry on, handles and the write verifier survive a restart).  ``run/nfs-export.json`` records it; it
  stops when the last session published on a hypervisor stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from nfs_export.rpc import AllowList

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
    by_service: bool = False  # the service's export: grown, never stopped from here
    address: str = "0.0.0.0"  # what it listens on

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


# The export of the service running in this process, by repository: its allow list (service/daemon.py)
_in_process: dict[Path, AllowList] = {}


@contextlib.contextmanager
def served_here(repo_root: Path, allow: AllowList) -> Iterator[None]:
    """While the block runs, this process's service serves *repo_root* with *allow*."""
    key = repo_root.resolve()
    _in_process[key] = allow
    try:
        yield
    finally:
        _in_process.pop(key, None)


def _service_export(repo_root: Path) -> Export | None:
    """The export of the service serving *repo_root* (in this process or another), if it serves NFS."""
    from ..service import daemon

    doc = daemon.running(repo_root)
    nfs = (doc or {}).get("nfs")
    if doc is None or not nfs:
        return None
    here = _in_process.get(repo_root.resolve())
    return Export(int(doc["pid"]), nfs["nfs_port"], nfs["mount_port"], nfs.get("portmap_port"),
                  here.strings() if here else [], "the service's log", by_service=True,
                  address=str(nfs.get("address", "0.0.0.0")))  # fmt: skip


def running(repo_root: Path) -> Export | None:
    svc = _service_export(repo_root)
    if svc is not None:
        return svc
    try:
        ex = Export(**json.loads(record_path(repo_root).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return ex if ex.alive else None


def _grow_service(repo_root: Path, ex: Export, allow: list[str]) -> None:
    if ex.nfs_port != NFS_PORT or ex.portmap_port is None:
        raise VmrecoverError(
            f"the service's NFS export runs on port {ex.nfs_port}"
            + ("" if ex.portmap_port else " without a portmapper")
            + ": a hypervisor's host mounts port 2049 and asks the portmapper (111) for MOUNT",
            hint="set [nfs] port = 2049 and portmapper = true in the service's configuration, and restart it",
        )
    outside = [a for a in allow if not ipaddress.ip_network(a, strict=False).network_address.is_loopback]
    if ipaddress.ip_address(ex.address).is_loopback and outside:
        raise VmrecoverError(
            f"the service's NFS export listens on {ex.address} only: {', '.join(outside)} cannot reach it",
            hint='set [nfs] listen = "0.0.0.0" (or an address the hosts reach) and restart the service',
        )
    allow_on_service(repo_root, allow)


def allow_on_service(repo_root: Path, allow: list[str]) -> None:
    """Let *allow* mount the export of the service serving *repo_root*, from now on."""
    here = _in_process.get(repo_root.resolve())
    if here is not None:
        added = here.grow(allow)
    else:
        from ..service.client import ServiceClient

        client = ServiceClient.of_repository(repo_root)
        added = client.request("POST", "/nfs/allow", {"allow": allow})["added"]
    if added:
        log.info("the service's NFS export now allows %s too", ", ".join(added))


def ensure(repo_root: Path, allow: list[str], *, passphrase: str | None = None) -> Export:
    """The export, serving at least *allow* (addresses or networks): the service's (grown), else our
    daemon's, started or restarted as needed."""
    cur = running(repo_root)
    if cur is not None and cur.by_service:
        _grow_service(repo_root, cur, allow)
        return cur
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
    """Stop our daemon (not the service's export: it serves for good)."""
    if _service_export(repo_root) is not None:
        return
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
