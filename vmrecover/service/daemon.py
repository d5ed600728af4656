"""``vmrecover serve``: the appliance's one long-running process.

It reads the configuration (service/config.py), opens the repository once, builds one datastore
model and chunk cache (core.Service), and runs its parts side by side in one trio loop:

- the NFS export (nfs_export/server.py) and the FUSE mount (fuse/mount.py ``run_mount``), both over
  that one model, so a session started through the API, the CLI or a hypervisor recovery is the same
  object everywhere;
- the HTTP API (service/api.py: HTTPS, tokens; and the local socket ``run/api.sock`` that the CLI's
  job commands use, see service/client.py) and the scheduler (service/scheduler.py).

Signals: SIGTERM/SIGINT stop it (the parts are cancelled: the mount is unmounted, the export closed);
SIGHUP reads the configuration again: a file with an error is refused (logged with its line and key)
and the running configuration stays; parts whose settings changed are told (the scheduler; the NFS
export's allow list grows at once), the listeners keep their addresses until a restart (said in the
log).  The NFS export's allow list is also grown by recoveries on hypervisors (recovery/exports.py),
so a host a session is published to may mount it without a restart.  With systemd (``Type=notify``)
it says READY=1 once everything listens, RELOADING=1/READY=1 around a reload and STOPPING=1.

``run/service.json`` in the repository records the running service (pid, API addresses and local
socket, NFS ports), for the CLI to find it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack, suppress
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import trio

from nfs_export.rpc import AllowList

from ..errors import AuthError
from ..fsutil import write_file
from ..recovery import exports
from ..repo.repository import Repository, parse_size
from ..vfs.cache import ChunkCache
from ..vfs.tree import Vfs
from . import config as configuration
from . import metrics
from .core import Service

log = logging.getLogger("vmrecover.service")
RECORD = "service.json"  # in the repository's run/

# A part is started with the service and may report what it serves (an address, ports).
Part = Callable[..., Awaitable[None]]


def sd_notify(state: str) -> None:
    """Tell systemd (``Type=notify``) *state*, e.g. "READY=1"; nothing without $NOTIFY_SOCKET."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return
    addr = "\0" + where[1:] if where.startswith("@") else where
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s, suppress(OSError):
        s.sendto(state.encode(), addr)


def read_passphrase(cfg: configuration.Config) -> str | None:
    pf = cfg.repository.passphrase_file
    if pf is None:
        return None
    text = pf.read_text().rstrip("\r\n")
    if not text:
        raise AuthError(f"repository.passphrase_file {pf} is empty", hint="write the passphrase into it")
    return text


def open_service(config_path: Path) -> Service:
    """Read the configuration, open the repository, build the shared model (nothing runs yet)."""
    cfg = configuration.load(config_path)
    passphrase = read_passphrase(cfg)
    repo = Repository.open(cfg.repository.path, passphrase=(lambda: passphrase) if passphrase else None)
    cache = ChunkCache(repo.chunks, parse_size(cfg.repository.cache_size))
    vfs = Vfs(repo, cache)
    return Service(repo, cfg, config_path, cache, vfs, started=time.time(), passphrase=passphrase)


def close_service(service: Service) -> None:
    service.vfs.close()
    service.cache.close()
    service.repo.close()


def _nfs_config(cfg: configuration.Config) -> Any:
    from nfs_export.server import ExportConfig

    allow = list(cfg.nfs.allow) or ["127.0.0.1/32", "::1/128"]
    return ExportConfig(listen=cfg.nfs.listen, port=cfg.nfs.port, portmapper=cfg.nfs.portmapper, allow=allow)


async def run(
    service: Service, *, parts: dict[str, Part] | None = None,
    task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Run the service until SIGTERM/SIGINT (or cancelled).  *parts*: more parts to start, by name,
    each an async function ``part(service, task_status=...)`` that reports what it serves."""
    from nfs_export.server import serve as nfs_serve

    from ..fuse.mount import run_mount

    cfg = service.config
    serving: dict[str, Any] = {"pid": os.getpid(), "repository": str(service.repo.root)}
    record = service.repo.root / "run" / RECORD
    # Signals are ours from the start: a SIGTERM while the parts start up stops them cleanly too, and
    # a SIGHUP right after READY=1 is a reload, not the default action (death).
    with (
        trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals,
        ExitStack() as stack,
    ):
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for sig in signals:
                    if sig == signal.SIGHUP:
                        await reload(service)
                        continue
                    log.info("signal %s: stopping", signal.Signals(sig).name)
                    sd_notify("STOPPING=1")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signals)
            await trio.to_thread.run_sync(stop_vms, service)  # what a killed service left running
            if cfg.nfs.enabled:
                nfs_config = _nfs_config(cfg)
                # one allow list, which recoveries on hypervisors grow while the export runs
                service.nfs_allow = AllowList(nfs_config.allow)
                stack.enter_context(exports.served_here(service.repo.root, service.nfs_allow))
                info = await nursery.start(
                    partial(nfs_serve, allow=service.nfs_allow, observe=metrics.observe_nfs),
                    service.vfs, nfs_config,
                )  # fmt: skip
                serving["nfs"] = asdict(info)
                log.info("NFS export %s on %s port %d", info.export, info.address, info.nfs_port)
            if cfg.fuse.mountpoint is not None:
                await nursery.start(run_mount, service.vfs, cfg.fuse.mountpoint)
                serving["fuse"] = str(cfg.fuse.mountpoint)
            from .scheduler import run_scheduler

            serving["scheduler"] = await nursery.start(run_scheduler, service)
            from .api import serve_api  # also with api.enabled = false: its local socket, for the CLI
            from .client import local_socket

            serving["api"] = await nursery.start(serve_api, service)
            serving["api_socket"] = str(local_socket(service.repo.root))
            for name, part in (parts or {}).items():
                serving[name] = await nursery.start(part, service)
            record.parent.mkdir(mode=0o700, exist_ok=True)
            write_file(record, json.dumps(serving).encode(), what=RECORD)
            try:
                log.info("service ready: %s", serving)
                sd_notify("READY=1")
                task_status.started(serving)
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):  # their disks go away with the export
                    if service.scheduler is not None:  # first: a boot check must not judge its qemu's end
                        service.scheduler.abort("the service stopped")
                    await trio.to_thread.run_sync(stop_vms, service)
                    await trio.to_thread.run_sync(stop_files_service, service)
                with suppress(FileNotFoundError):
                    record.unlink()


def stop_files_service(service: Service) -> None:
    """(blocking) Stop the file-restore service the API started (files/service.py), with its
    appliances and datastore mount: it is in the unit's cgroup, which systemd waits to be empty."""
    from ..files.service import stop_running

    pid = stop_running(service.repo.root)
    if pid is not None:
        log.info("stopped the file-restore service (pid %d)", pid)


def stop_vms(service: Service) -> None:
    """(blocking) Stop the sessions' VMs that run under qemu here (recovery/qemu_run.py)."""
    from ..recovery import qemu_run
    from .runner import handle

    repo = handle(service.repo)
    try:
        qemu_run.stop_all(repo)
    finally:
        repo.catalog.close()


async def reload(service: Service) -> bool:
    """SIGHUP: the configuration again; a bad file leaves the running one in force.  True if taken."""
    sd_notify("RELOADING=1")
    try:
        new = await trio.to_thread.run_sync(configuration.load, service.config_path)
    except configuration.ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc.message)
        sd_notify("READY=1")
        return False
    old = service.config
    fixed = [k for k in ("repository", "fuse") if getattr(old, k) != getattr(new, k)]
    if old.nfs.model_copy(update={"allow": []}) != new.nfs.model_copy(update={"allow": []}):
        fixed.append("nfs")
    if service.nfs_allow is not None and (added := service.nfs_allow.grow(new.nfs.allow)):
        log.info("the NFS export allows %s from now", ", ".join(added))
    if set(old.nfs.allow) - set(new.nfs.allow):
        fixed.append("nfs.allow (a network taken out)")
    if old.api.listen != new.api.listen or old.api.tls_cert != new.api.tls_cert:
        fixed.append("api listen/TLS")
    if fixed:
        log.warning("reload: %s changed; that takes effect at the next restart", ", ".join(fixed))
    service.config = new
    if service.scheduler is not None:
        service.scheduler.reload(new)
    log.info("configuration %s reloaded (%d jobs)", service.config_path, len(new.jobs))
    sd_notify("READY=1")  # after the log line: a reader of the log who was told READY finds it
    return True


def running(repo_root: Path) -> dict[str, Any] | None:
    """The record of the service running on *repo_root*, if its process lives."""
    try:
        doc: dict[str, Any] = json.loads((repo_root / "run" / RECORD).read_text())
        os.kill(int(doc["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return doc
