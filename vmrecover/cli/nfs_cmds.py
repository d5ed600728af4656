"""The NFS datastore: ``nfs serve`` exports the datastore tree over NFSv3 (package nfs_export)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import signal
from typing import Any

from ..errors import BadInput, ExitCode, LockedError
from ..repo.repository import parse_size
from .common import open_repo
from .output import emit_json, stdout


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    np = sub.add_parser("nfs", help="the NFS datastore: a hypervisor mounts the backups and boots from them")
    nsub = np.add_subparsers(dest="nfs_command", required=True, metavar="ACTION")
    p = nsub.add_parser(
        "serve", parents=[common],
        help="export vms/ (read-only) and recover/ (writable sessions) as /vmrecover over NFSv3",
    )  # fmt: skip
    p.add_argument(
        "--listen", metavar="ADDR",
        help="the one IP address to listen on (default: 127.0.0.1 without --allow, else 0.0.0.0; :: for v6)",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=2049, help="NFS port (default 2049; 0 picks a free one)")
    p.add_argument("--mount-port", type=int, metavar="N", help="separate MOUNT port (default: the NFS port)")
    p.add_argument(
        "--portmapper", action="store_true", help="answer the portmapper on port 111 (qemu's nfs:// needs it)"
    )
    p.add_argument(
        "--allow", action="append", metavar="CIDR",
        help="clients that may mount, e.g. 10.0.0.0/24 (repeatable; default: this machine only)",
    )  # fmt: skip
    p.add_argument(
        "--insecure-ports", action="store_true",
        help="serve allowed clients from any source port (default: only from ports below 1024, which only "
        "root can use, as nfsd's 'secure' export option)",
    )  # fmt: skip
    p.add_argument(
        "--idle-timeout", type=_seconds, default=360.0, metavar="SECONDS",
        help="close a connection that sent no call for this long (default 360, as nfsd)",
    )  # fmt: skip
    p.add_argument(
        "--max-client-connections", type=_count, default=16, metavar="N",
        help="connections from one client address (default 16; 64 in all)",
    )  # fmt: skip
    p.add_argument("--cache-size", default="512M", help="decoded chunk cache (default 512M)")
    p.set_defaults(func=cmd_serve)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def _listen_address(listen: str | None, allow: list[str] | None) -> str:
    from nfs_export.server import LOOPBACK

    if listen is None:  # nobody else may connect: listen where nobody else can
        return LOOPBACK if not allow else "0.0.0.0"
    try:
        ipaddress.ip_address(listen.split("%", 1)[0])
    except ValueError:
        raise BadInput(
            f"--listen {listen!r} is not an IP address",
            hint="give one address of this machine, e.g. 192.168.1.10, or 0.0.0.0 (::) for all of them",
        ) from None
    return listen


def _networks(items: list[str] | None) -> list[str]:
    from nfs_export.server import LOCALHOST

    out = []
    for item in items or LOCALHOST:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise BadInput(
                f"--allow {item!r} is not an address or network", hint="give e.g. 192.168.1.0/24 or 10.0.0.5"
            ) from None
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from nfs_export.server import ExportConfig, serve

    from ..vfs.cache import ChunkCache
    from ..vfs.tree import Vfs

    config = ExportConfig(
        listen=_listen_address(args.listen, args.allow), port=args.port, mount_port=args.mount_port,
        portmapper=args.portmapper, allow=_networks(args.allow), insecure_ports=args.insecure_ports,
        idle_timeout=args.idle_timeout, max_connections_per_client=args.max_client_connections,
    )  # fmt: skip
    cache_size = parse_size(args.cache_size)
    with open_repo(args) as repo:
        cache = ChunkCache(repo.chunks, cache_size)
        vfs = Vfs(repo, cache)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(serve, vfs, config)
                if args.json:
                    ready = {"serving": True, **dataclasses.asdict(info), "allow": list(config.allow),
                             "insecure_ports": config.insecure_ports}  # fmt: skip
                    emit_json(ready, indent=None)
                else:
                    pmap = ", portmapper 111" if info.portmap_port else ""
                    ports = "any source port" if config.insecure_ports else "privileged source ports"
                    stdout.print(
                        f"serving nfs://{info.address}{info.export} (NFS port {info.nfs_port}, MOUNT port "
                        f"{info.mount_port}{pmap}) to {', '.join(config.allow)} from {ports}",
                        markup=False,
                    )
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

        try:
            trio.run(main)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise LockedError(
                    f"a port the export needs is taken: {exc.strerror}",
                    hint="another NFS server or rpcbind runs here: stop it, or pick --port/--mount-port "
                    "(and leave out --portmapper if rpcbind owns port 111)",
                ) from None
            if exc.errno == errno.EACCES:
                raise BadInput(f"cannot listen: {exc.strerror}", hint="ports below 1024 need root") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise BadInput(
                    f"cannot listen on {config.listen}: {exc.strerror}",
                    hint="--listen takes an address of this machine (ip -brief address)",
                ) from None
            raise
        finally:
            vfs.close()
            cache.close()
    return ExitCode.OK
