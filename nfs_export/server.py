"""Putting the programs together: listeners for NFS, MOUNT and (optionally) the portmapper.

NFS and MOUNT share one port unless a separate mount port is asked for: every listener serves every
program, so a client that is told the ports (``?nfsport=N&mountport=M``) and one that asks the
portmapper reach the same server.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from . import mount3, nfs3, portmap
from .fs import Filesystem
from .rpc import RpcServer, parse_networks

log = logging.getLogger("nfs_export")

LOCALHOST = ["127.0.0.1/32", "::1/128"]


@dataclass
class ExportConfig:
    path: str = "/vmrecover"
    listen: str = "0.0.0.0"
    port: int = 2049
    mount_port: int | None = None  # None: the NFS port
    portmapper: bool = False
    allow: Sequence[str] = field(default_factory=lambda: list(LOCALHOST))
    threads: int = 8
    rtmax: int = 1 << 20
    wtmax: int = 1 << 20
    max_inflight: int = 64
    max_connections: int = 64
    write_verifier: bytes | None = None  # None: derived from the machine's boot id


@dataclass(frozen=True)
class Serving:
    export: str
    address: str
    nfs_port: int
    mount_port: int
    portmap_port: int | None


def boot_verifier() -> bytes:
    """A write verifier that stays the same while the machine is up and changes when it reboots.

    Unstable writes go straight to the filesystem's page cache, so a restart of the server loses
    nothing; only a crash of the machine can, and that is exactly when clients must resend."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            boot = f.read().strip()
    except OSError:
        import time

        boot = str(time.time_ns()).encode()
    return hashlib.blake2b(boot, digest_size=nfs3.WRITEVERF, person=b"nfs-writeverf").digest()


def _port(listeners: Sequence[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])


async def serve(
    fs: Filesystem, config: ExportConfig, *, task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve *fs* until cancelled; ``task_status.started`` gets the ports actually bound."""
    allow = parse_networks(config.allow)
    limiter = trio.CapacityLimiter(config.threads)
    nfs = nfs3.Nfs3(
        fs, limiter=limiter, write_verifier=config.write_verifier or boot_verifier(),
        rtmax=config.rtmax, wtmax=config.wtmax,
    )  # fmt: skip
    mount = mount3.Mount3(nfs, config.path, [str(n) for n in allow])
    pmap = portmap.Portmap()
    server = RpcServer(
        [nfs.program(), mount.program(), pmap.program()], allow=allow,
        max_record=config.wtmax + 4096, max_inflight=config.max_inflight,
        max_connections=config.max_connections,
    )  # fmt: skip
    listeners = await trio.open_tcp_listeners(config.port, host=config.listen)
    nfs_port = _port(listeners)
    mount_port = nfs_port
    if config.mount_port is not None and config.mount_port != config.port:
        extra = await trio.open_tcp_listeners(config.mount_port, host=config.listen)
        mount_port = _port(extra)
        listeners += extra
    pmap_port = None
    if config.portmapper:
        extra = await trio.open_tcp_listeners(portmap.PORT, host=config.listen)
        pmap_port = _port(extra)
        listeners += extra
    pmap.register(nfs3.PROGRAM, nfs3.VERSION, nfs_port)
    pmap.register(mount3.PROGRAM, mount3.VERSION, mount_port)
    info = Serving(mount.export_path, config.listen, nfs_port, mount_port, pmap_port)
    log.info("serving NFSv3", extra={"export": info.export, "address": config.listen, "nfs_port": nfs_port,
                                     "mount_port": mount_port, "portmap_port": pmap_port,
                                     "allow": [str(n) for n in allow]})  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        task_status.started(info)
