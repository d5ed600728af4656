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
    p.add_argument("--listen", default="0.0.0.0", metavar="ADDR", help="address to listen on (default all)")
    p.add_argument("--port", type=int, default=2049, help="NFS port (default 2049; 0 picks a free one)")
    p.add_argument("--mount-port", type=int, metavar="N", help="separate MOUNT port (default: the NFS port)")
    p.add_argument(
        "--portmapper", action="store_true", help="answer the portmapper on port 111 (qemu's nfs:// needs it)"
    )
    p.add_argument(
        "--allow", action="append", metavar="CIDR",
        help="clients that may mount, e.g. 10.0.0.0/24 (repeatable; default: this machine only)",
    )  # fmt: skip
    p.add_argument("--cache-size", default="512M", help="decoded chunk cache (default 512M)")
    p.set_defaults(func=cmd_serve)


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

    from ..vfs.cache import ChunkCache, limit_malloc_arenas
    from ..vfs.tree import Vfs

    config = ExportConfig(
        listen=args.listen, port=args.port, mount_port=args.mount_port, portmapper=args.portmapper,
        allow=_networks(args.allow),
    )  # fmt: skip
    cache_size = parse_size(args.cache_size)
    limit_malloc_arenas()
    with open_repo(args) as repo, repo.reader("nfs"):
        cache = ChunkCache(repo.chunks, cache_size)
        vfs = Vfs(repo, cache)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                info = await nursery.start(serve, vfs, config)
                if args.json:
                    ready = {"serving": True, **dataclasses.asdict(info), "allow": list(config.allow)}
                    emit_json(ready, indent=None)
                else:
                    pmap = ", portmapper 111" if info.portmap_port else ""
                    stdout.print(
                        f"serving nfs://{info.address}{info.export} (NFS port {info.nfs_port}, MOUNT port "
                        f"{info.mount_port}{pmap}) to {', '.join(config.allow)}",
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
            raise
        finally:
            vfs.close()
            cache.close()
    return ExitCode.OK
