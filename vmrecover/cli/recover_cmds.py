"""Instant recovery: recover start | list | boot | migrate | stop."""

from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path
from typing import Any

from ..errors import BadInput, ExitCode, NotFound
from ..hypervisors import publishing
from ..qemu import ACCELS
from ..recovery import exports, qemu_boot, sessions
from ..repo.keys import ask_passphrase
from ..repo.repository import parse_size
from ..restore import RESTORE_FORMATS
from .common import open_repo
from .output import emit_json, human_bytes, progress, stdout, table

log = logging.getLogger("vmrecover.recovery")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    rp = sub.add_parser("recover", help="instant recovery: run a VM from its backup, then migrate it")
    rsub = rp.add_subparsers(dest="recover_command", required=True, metavar="ACTION")

    p = rsub.add_parser(
        "start", parents=[common], help="create a writable recovery session of a restore point"
    )
    p.add_argument("target", metavar="VM[@POINT]")
    p.add_argument("--name", help="session name (default: <vm>-<6 hex>); shown as recover/<name>/")
    p.add_argument(
        "--to", metavar="vmware://HYPERVISOR|xen://POOL",
        help="run the VM there: vmware:// mounts this appliance's NFS export on a host as a datastore and "
        "registers the VM from it; xen:// attaches the session to the pool as an NFS SR and creates the VM "
        "on its VDIs",
    )  # fmt: skip
    p.add_argument("--host", help="with --to vmware://: the host (default: the first connected one)")
    p.add_argument(
        "--datastore-name",
        help="with --to vmware://: the NFS datastore's name (default: vmrecover-<appliance>)",
    )
    p.add_argument("--power-on", action="store_true", help="with --to: power the VM on")
    p.set_defaults(func=cmd_start)

    p = rsub.add_parser("list", parents=[common], help="list recovery sessions")
    p.set_defaults(func=cmd_list)

    p = rsub.add_parser("stop", parents=[common], help="end a session and discard everything it wrote")
    p.add_argument("session")
    p.add_argument(
        "--force", action="store_true",
        help="drop the session even if its VM cannot be undone on the hypervisor (unreachable, removed)",
    )  # fmt: skip
    p.set_defaults(func=cmd_stop)

    p = rsub.add_parser(
        "boot", parents=[common], help="boot a session's disks with qemu from the mounted datastore"
    )
    p.add_argument("session")
    p.add_argument("--memory", default="512M")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument(
        "--serial", type=Path, metavar="FILE", help="write the serial console here (default: stdout)"
    )
    p.add_argument("--accel", default="auto", choices=ACCELS,
                   help="qemu accelerator (default auto: kvm where it works, else tcg)")  # fmt: skip
    p.add_argument("--timeout", type=float, help="kill the VM after this many seconds")
    p.set_defaults(func=cmd_boot)

    p = rsub.add_parser(
        "migrate", parents=[common], help="write a session's current disk as a standalone image"
    )
    p.add_argument("session")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to", type=Path, metavar="PATH", help="write the disk as an image here")
    dest.add_argument(
        "--to-datastore", metavar="DS",
        help="a session running on vSphere: move the VM to this datastore (Storage vMotion), then end "
        "the session, leaving the VM running there",
    )  # fmt: skip
    dest.add_argument(
        "--to-sr", metavar="SR",
        help="a session running on a XenServer pool: move the VM's disks to this SR (name or UUID; live "
        "storage migration if it runs), then end the session, leaving the VM there",
    )  # fmt: skip
    p.add_argument("--disk", help="disk name (needed when the VM has several disks)")
    p.add_argument("--format", default="qcow2", choices=list(RESTORE_FORMATS))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--cache-size", default="256M")
    p.set_defaults(func=cmd_migrate)


def _print_info(args: argparse.Namespace, info: sessions.SessionInfo, verb: str) -> None:
    if args.json:
        emit_json(info.__dict__)
    else:
        stdout.print(f"{verb} session {info.name} of {info.vm}@{info.point} ({info.path})", markup=False)


def cmd_start(args: argparse.Namespace) -> int:
    if not args.to and (args.host or args.datastore_name or args.power_on):
        raise BadInput(
            "--host, --datastore-name and --power-on go with --to vmware://HYPERVISOR or xen://POOL"
        )
    with open_repo(args) as repo:
        point = repo.catalog.resolve(args.target)
        if args.to:
            session = publishing.start_on(
                repo, point, args.to, name=args.name, host=args.host, datastore_name=args.datastore_name,
                power_on=args.power_on, passphrase=_passphrase(repo),
            )  # fmt: skip
        else:
            session = sessions.start(repo, point, args.name)
        _print_info(args, sessions.info(repo, session), "started")
    return ExitCode.OK


def _passphrase(repo: Any) -> str | None:
    """The repository's passphrase for a daemon this command starts (None if not encrypted, or if the
    service's export serves: it needs none from us)."""
    ex = exports.running(repo.root) if repo.encrypted else None
    if not repo.encrypted or (ex is not None and ex.by_service):
        return None
    return ask_passphrase(str(repo.root))


def cmd_list(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        infos = [sessions.info(repo, s) for s in repo.catalog.sessions()]
    if args.json:
        emit_json([i.__dict__ for i in infos])
    else:
        rows = [[i.name, f"{i.vm}@{i.point}", i.created, human_bytes(sum(i.written.values()))] for i in infos]
        table("recovery sessions", ["name", "restore point", "created", "written"], rows)
    return ExitCode.OK


def cmd_stop(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        s = publishing.stop(repo, args.session, force=args.force)
    if args.json:
        emit_json({"name": s.name, "id": s.id, "stopped": True})
    else:
        stdout.print(f"stopped session {s.name}; its writes are discarded", markup=False)
    return ExitCode.OK


def _migrate_on_hypervisor(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        doc = publishing.migrate_off(repo, args.session, datastore=args.to_datastore, sr=args.to_sr)
    if args.json:
        emit_json(doc)
    else:
        where = f"datastore {doc['datastore']}" if "datastore" in doc else f"SR {doc['sr']}"
        stdout.print(
            f"moved {doc['vm_name']} to {where} on {doc['hypervisor']}; session "
            f"{doc['session']} ended (the VM no longer needs this appliance)",
            markup=False,
        )
    return ExitCode.OK


def cmd_boot(args: argparse.Namespace) -> int:
    from ..fuse.mount import active_mounts

    with open_repo(args) as repo:
        session = repo.catalog.session(args.session)
        disks = repo.catalog.disks(session.point)
        mounts = active_mounts(repo.root)
    if not mounts:
        raise NotFound(
            f"the repository is not mounted, so session {session.name} has no disk files to boot from",
            hint="mount it first: vmrecover mount /mnt/vmrecover",
        )
    folder = Path(mounts[0].mountpoint) / "recover" / session.name
    argv = qemu_boot.argv(
        [folder / f"{d.name}.raw" for d in disks], memory=args.memory, cpus=args.cpus, serial=args.serial,
        accel=args.accel,
    )  # fmt: skip
    try:
        proc = subprocess.run(argv, check=False, timeout=args.timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = ExitCode.INTERRUPTED
    if args.json:
        emit_json({"session": session.name, "qemu_exit": code, "argv": argv})
    return ExitCode.OK if code == 0 else code


def cmd_migrate(args: argparse.Namespace) -> int:
    if args.to_datastore or args.to_sr:
        return _migrate_on_hypervisor(args)
    with open_repo(args) as repo:
        session = repo.catalog.session(args.session)
        with progress(f"migrate {session.name}", enabled=not args.json) as (total, advance):
            res = sessions.migrate(
                repo, session, args.disk, args.to, fmt=args.format, overwrite=args.overwrite,
                cache_size=parse_size(args.cache_size), progress=advance, total=total,
            )  # fmt: skip
    if args.json:
        emit_json(res.__dict__)
    else:
        stdout.print(
            f"migrated session {session.name} disk {res.disk} ({human_bytes(res.size)}, "
            f"{human_bytes(res.data_bytes)} data) to {res.path} as {res.format}",
            markup=False,
        )
    return ExitCode.OK
