"""Putting the programs together: listeners for NFS, MOUNT and (optionally) the portmapper.

NFS and MOUNT share one port unless a separate mount port is asked for: every listener serves every
program, so a client that is told the ports (``?nfsport=N&mountport=M``) and one that asks the
portmapper reach the same server.  Every listener binds exactly the one address configured (an IP
address, not a name that could resolve to several).

Who may talk to the export (see rpc.py): clients in the allow list, from a privileged source port
unless ``insecure_ports``; the portmapper also answers allowed clients on unprivileged ports, as
rpcbind does (Linux asks it from one).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from . import mount3, nfs3, portmap
from .fs import Filesystem
from .rpc import PRIVILEGED_PORTS, AllowList, Observe, RpcServer

log = logging.getLogger("nfs_export")

LOCALHOST = ["127.0.0.1/32", "::1/128"]
LOOPBACK = "127.0.0.1"  # the listen address when only this machine may connect
UNPRIVILEGED_PORT_START = "/proc/sys/net/ipv4/ip_unprivileged_port_start"


@dataclass
class ExportConfig:
    path: str = "/vmrecover"
    listen: str = LOOPBACK  # one IP address; 0.0.0.0 (or ::) for every address of its family
    port: int = 2049
    mount_port: int | None = None  # None: the NFS port
    portmapper: bool = False
    allow: Sequence[str] = field(default_factory=lambda: list(LOCALHOST))
    insecure_ports: bool = False  # True: serve allowed clients on any source port, not only < 1024
    threads: int = 8
    rtmax: int = 1 << 20
    wtmax: int = 1 << 20
    max_inflight: int = 64
    max_connections: int = 64
    max_connections_per_client: int = 16  # from one address, so that one client cannot take all 64
    idle_timeout: float = 360.0  # seconds without a call (nfsd: 6 minutes); also bounds a slow record
    refused_timeout: float = 5.0  # the longest a refused connection stays open
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


async def listen(address: str, port: int) -> trio.SocketListener:
    """A TCP listener on exactly *address* (an IP address literal) and *port* (0: any free one)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # ValueError for anything but an address
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        await sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _port(listener: trio.SocketListener) -> int:
    return int(listener.socket.getsockname()[1])


def _warn_unprivileged_ports() -> None:
    """Privileged source ports keep local accounts out only while only root can bind them."""
    try:
        with open(UNPRIVILEGED_PORT_START) as f:
            start = int(f.read())
    except (OSError, ValueError):
        return
    if start < PRIVILEGED_PORTS:
        log.warning("net.ipv4.ip_unprivileged_port_start is %d: any local account can use source ports from "
                    "%d, so the privileged-port check does not keep local accounts out; set it to %d",
                    start, start, PRIVILEGED_PORTS)  # fmt: skip


async def serve(
    fs: Filesystem, config: ExportConfig, *, allow: AllowList | None = None, observe: Observe | None = None,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Serve *fs* until cancelled; ``task_status.started`` gets the ports actually bound.  *allow*: an
    allow list the caller may grow while the export runs (default: ``config.allow``, fixed).  *observe*
    is told of every call answered (program, procedure, seconds): the service's metrics."""
    allow = allow if allow is not None else AllowList(config.allow)
    limiter = trio.CapacityLimiter(config.threads)
    nfs = nfs3.Nfs3(
        fs, limiter=limiter, write_verifier=config.write_verifier or boot_verifier(),
        rtmax=config.rtmax, wtmax=config.wtmax,
    )  # fmt: skip
    mount = mount3.Mount3(nfs, config.path, allow)
    pmap = portmap.Portmap()
    server = RpcServer(
        [nfs.program(), mount.program(), pmap.program()], allow=allow,
        max_record=config.wtmax + 4096, max_inflight=config.max_inflight,
        max_connections=config.max_connections, max_per_address=config.max_connections_per_client,
        idle_timeout=config.idle_timeout, secure_ports=not config.insecure_ports,
        open_programs=[portmap.PROGRAM], refused_timeout=config.refused_timeout, observe=observe,
    )  # fmt: skip
    listeners = [await listen(config.listen, config.port)]
    nfs_port = _port(listeners[0])
    mount_port = nfs_port
    try:
        if config.mount_port is not None and config.mount_port != config.port:
            listeners.append(await listen(config.listen, config.mount_port))
            mount_port = _port(listeners[-1])
        pmap_port = None
        if config.portmapper:
            listeners.append(await listen(config.listen, portmap.PORT))
            pmap_port = _port(listeners[-1])
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    if not config.insecure_ports:
        _warn_unprivileged_ports()
    pmap.register(nfs3.PROGRAM, nfs3.VERSION, nfs_port)
    pmap.register(mount3.PROGRAM, mount3.VERSION, mount_port)
    info = Serving(mount.export_path, config.listen, nfs_port, mount_port, pmap_port)
    log.info("serving NFSv3", extra={"export": info.export, "address": config.listen, "nfs_port": nfs_port,
                                     "mount_port": mount_port, "portmap_port": pmap_port,
                                     "allow": allow.strings(),
                                     "privileged_ports_only": not config.insecure_ports,
                                     "idle_timeout": config.idle_timeout})  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        nursery.start_soon(nfs.watch_changes)
        task_status.started(info)
