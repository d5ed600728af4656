"""Data commands: backup and restore."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, ExitCode
from ..hypervisors import Hypervisor, Registry, require
from ..ingest.extents import load_changed_extents
from ..ingest.pipeline import DiskJob, DiskStats, Progress, run_backup
from ..ingest.sources import DiskSource, open_image
from ..repo.catalog import Point
from ..repo.repository import Repository
from ..restore import RESTORE_FORMATS, pick_disk, restore_disk
from .common import open_repo
from .output import emit_json, human_bytes, progress, stdout


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "backup", parents=[common], help="back up a hypervisor's VM, or disk images, as one restore point",
        description="vmrecover backup vmware://HYPERVISOR/VM_NAME_OR_MOREF [--quiesce] [--memory] [--full] "
        "[--vm NAME]  |  vmrecover backup xen://POOL/VM_NAME_OR_UUID [--mode M] [--full] [--vm NAME]  |  "
        "vmrecover backup IMAGE [IMAGE...] --vm NAME",
    )  # fmt: skip
    p.add_argument(
        "images", nargs="+", metavar="SOURCE",
        help="vmware://HYPERVISOR/VM or xen://POOL/VM (see 'vmrecover hypervisor add'), or image files: "
        "raw, qcow2, vmdk, vhd, vhdx",
    )  # fmt: skip
    p.add_argument("--vm", help="VM name in the repository (needed for images; default: the VM's own name)")
    p.add_argument("--quiesce", action="store_true", help="hypervisor: a quiesced snapshot (guest tools)")
    p.add_argument("--memory", action="store_true", help="hypervisor: a snapshot with the VM's memory")
    p.add_argument("--full", action="store_true", help="hypervisor: read every disk whole, not what changed")
    p.add_argument(
        "--no-wait", action="store_true",
        help="fail at once if a backup of the same VM, prune or gc holds the repository (default: wait, "
        "saying for whom)",
    )  # fmt: skip
    p.add_argument(
        "--mode", choices=["normal", "quiesced", "offline", "memory"],
        help="xen://: normal (a snapshot), quiesced (the guest's VSS), offline (shut down, read, start "
        "again), memory (a checkpoint: memory too)",
    )  # fmt: skip
    p.add_argument(
        "--disk-name",
        action="append",
        default=[],
        metavar="NAME",
        help="name of each disk in order (default: the image file name without extension)",
    )
    p.add_argument(
        "--changed-extents",
        type=Path,
        metavar="FILE",
        help="JSON [[offset, length], ...] changed since the VM's latest point "
        "(or {disk: [...]} for several disks); only those ranges are read",
    )
    p.add_argument(
        "--format",
        choices=["raw", "qcow2", "vmdk", "vhd", "vhdx"],
        help="format of every IMAGE (default: detected from its first bytes). Give --format raw for raw "
        "disks of guests: a guest can write an image header at the start of its own disk",
    )
    p.add_argument(
        "--untrusted",
        action="store_true",
        help="the images come from a place you do not trust: read each only from itself, never from a "
        "file it names (a backing file reads as zeros; a vmdk descriptor or a qcow2 with a data file "
        "is refused). Without it, backing chains, vmdk extents and data files are read, and listed",
    )
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore", parents=[common],
        help="write a disk of a restore point to a file or device, or create the whole VM on a hypervisor",
        description="vmrecover restore VM[@POINT] --to PATH [--disk NAME] [--format F]  |  vmrecover restore "
        "VM[@POINT] --to vmware://HYPERVISOR [--datastore DS] [--host HOST] [--name NEW] [--no-network] "
        "[--new-identity] [--power-on]  |  vmrecover restore VM[@POINT] --to xen://POOL [--sr SR] "
        "[--name NEW] [--no-network] [--new-identity] [--power-on]",
    )  # fmt: skip
    p.add_argument(
        "target", metavar="VM[@POINT]", help="POINT: latest (default), a point id, or a time prefix"
    )
    p.add_argument("--disk", help="disk name (needed when the point has several disks)")
    p.add_argument(
        "--to", required=True, metavar="PATH|vmware://HYPERVISOR|xen://POOL",
        help="a file or block device (one disk), or a hypervisor: the whole VM is created there (xen:// "
        "takes points of xen:// backups)",
    )  # fmt: skip
    p.add_argument("--format", default="raw", choices=list(RESTORE_FORMATS))
    p.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")
    p.add_argument(
        "--datastore", help="vmware://: the datastore (default: the original's, else the roomiest)"
    )
    p.add_argument("--host", help="vmware://: the host (default: the first connected one)")
    p.add_argument("--sr", help="xen://: the SR, by name label or UUID (default: the pool's default SR)")
    p.add_argument(
        "--name", help="hypervisor: the new VM's name (default: the original's; a clash is refused)"
    )
    p.add_argument(
        "--no-network", action="store_true",
        help="hypervisor: NICs disconnected at power-on (vmware://), no NICs at all (xen://)",
    )  # fmt: skip
    p.add_argument(
        "--new-identity", action="store_true",
        help="hypervisor: new MAC addresses, and a new BIOS UUID (xen://: the VM's UUID is new anyway)",
    )  # fmt: skip
    p.add_argument("--power-on", action="store_true", help="hypervisor: power the VM on")
    p.set_defaults(func=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> int:
    if any("://" in s for s in args.images):
        return _backup_vm(args)
    if args.vm is None:
        raise BadInput("backing up images needs --vm NAME", hint="vmrecover backup IMAGE... --vm NAME")
    if args.quiesce or args.memory or args.full or args.mode:
        raise BadInput(
            "--quiesce, --memory, --mode and --full are for hypervisor backups (vmware://, xen://)"
        )
    args.images = [Path(i) for i in args.images]
    if args.disk_name and len(args.disk_name) != len(args.images):
        raise BadInput(f"{len(args.images)} images but {len(args.disk_name)} --disk-name options")
    names = args.disk_name or image_disk_names(args.images)
    with open_repo(args) as repo:
        done = back_up_images(
            repo, args.vm, args.images, names, fmt=args.format, trusted=not args.untrusted,
            changed_extents=args.changed_extents, wait=_wait(args),
            meter=lambda: progress(f"backup {args.vm}", enabled=not args.json),
        )  # fmt: skip
    point, stats, doc = done.point, done.stats, done.doc()
    disks = doc["disks"]
    if args.json:
        emit_json(doc)
    else:
        stdout.print(
            f"{point.vm}@{point.id}: {point.kind} backup of {len(stats)} disk(s) in {doc['duration_s']} s; "
            f"read {human_bytes(doc['bytes_read'])}, new {human_bytes(doc['new_bytes'])}, "
            f"stored {human_bytes(doc['stored_bytes'])}",
            markup=False,
        )
        for d in disks:
            line = f"  disk {d['name']} read from: {', '.join(d['files_read'])}"
            if d["backing_not_read"]:
                line += f"; backing file {d['backing_not_read']} not read (untrusted): it read as zeros"
            stdout.print(line, markup=False, soft_wrap=True)
    return ExitCode.OK


Reads = dict[str, tuple[str | None, list[str]]]  # disk -> (why it was read whole, what it was read from)
Meter = Callable[[], AbstractContextManager[tuple[Progress, Progress]]]  # -> (set_total, advance)


def _no_meter() -> AbstractContextManager[tuple[Progress, Progress]]:
    return contextlib.nullcontext(((lambda n: None), (lambda n: None)))


def _wait(args: argparse.Namespace) -> float | None:
    return 0.0 if args.no_wait else None


# --- the backups themselves, shared with the service's job runner (service/runner.py) ------------------
def image_disk_names(images: list[Path]) -> list[str]:
    """Each image's disk name when none is given: its file name without extension."""
    return [img.name.split(".")[0] or img.name for img in images]


@dataclass
class ImageBackup:
    """What a backup of image files made: the point, each disk's figures and where it was read from."""

    point: Point
    stats: list[DiskStats]
    files: dict[str, dict[str, Any]]  # disk -> {"files_read": [...], "backing_not_read": ...}
    untrusted: bool

    def doc(self) -> dict[str, Any]:
        """What `backup --json` prints."""
        disks = [{**s.__dict__, **self.files[s.name]} for s in self.stats]
        return {**self.point.summary(), **self.point.stats, "untrusted": self.untrusted, "disks": disks}


def back_up_images(
    repo: Repository, vm: str, images: list[Path], names: list[str], *, fmt: str | None = None,
    trusted: bool = True, changed_extents: Path | None = None, wait: float | None = None,
    meter: Meter = _no_meter,
) -> ImageBackup:  # fmt: skip
    """Back up *images* (disks *names*, in order) as one restore point of *vm*: the VM's lock (waiting
    *wait* seconds, None: as long as it takes), the changed extents file if given, then the images
    opened (*trusted*: their backing files are read too) and read, with *meter*'s progress."""
    with repo.backing_up(vm, wait=wait), contextlib.ExitStack() as stack:
        changed = load_changed_extents(changed_extents, names) if changed_extents else {}
        jobs = []
        sources = {}
        for name, img in zip(names, images, strict=True):
            src = open_image(img, fmt, trusted=trusted)
            stack.callback(src.close)
            sources[name] = src
            jobs.append(DiskJob(name, src, changed.get(name) if changed_extents else None))
        with meter() as (total, advance):
            point, stats = run_backup(repo, vm, jobs, progress=advance, progress_total=total)
    return ImageBackup(point, stats, {n: _files_doc(src) for n, src in sources.items()}, not trusted)


@dataclass
class VmBackup:
    """What a backup of a hypervisor's VM made: the point, each disk's figures, what was read of each
    disk and why, the bytes the transport delivered, and which transport ("HTTP", "NBD", "NBD+HTTP")."""

    point: Point
    stats: list[DiskStats]
    reads: Reads
    received: int
    transport: str

    def doc(self, url: str) -> dict[str, Any]:
        """What `backup vmware://... --json` prints."""
        reads = self.reads
        disks = [{**s.__dict__, "read_whole": reads[s.name][0], "files_read": reads[s.name][1]}
                 for s in self.stats]  # fmt: skip
        doc = {**self.point.summary(), **self.point.stats, "source": url, "transport": self.transport,
               "bytes_received": self.received, "disks": disks}  # fmt: skip
        if self.transport == "HTTP":
            doc["http_bytes_received"] = self.received
        return doc


def back_up_vm(
    repo: Repository, hv: Hypervisor, password: str, vm_ref: str, *, url: str, name: str | None = None,
    quiesce: bool = False, memory: bool = False, mode: str | None = None, full: bool = False,
    wait: float | None = None, progress: Progress = lambda n: None, progress_total: Progress = lambda n: None,
) -> VmBackup:  # fmt: skip
    """Back up VM *vm_ref* of *hv* (``url`` names it: ``SCHEME://HYPERVISOR/VM``) as a restore point of
    *name* (default: the VM's own name).  vSphere takes *quiesce* and *memory*, XenServer *mode*; the
    other platform's options are refused before connecting."""
    run = _xen_backup if hv.scheme == "xen" else _vmware_backup
    return run(repo, hv, password, vm_ref, url=url, name=name, quiesce=quiesce, memory=memory, mode=mode,
               full=full, wait=wait, advance=progress, total=progress_total)  # fmt: skip


def _vmware_backup(repo: Repository, hv: Hypervisor, password: str, vm_ref: str, *, url: str,
                   name: str | None, quiesce: bool, memory: bool, mode: str | None, full: bool,
                   wait: float | None, advance: Progress, total: Progress) -> VmBackup:  # fmt: skip
    from ..hypervisors.vmware.backup import Options, back_up

    if mode:
        raise BadInput("--mode is for xen:// backups", hint="vSphere takes --quiesce and --memory")
    from ..hypervisors.vmware.session import session

    with session(hv, password) as vs:
        point, stats, plans, received = back_up(
            repo, vs, vm_ref, name=name, source_url=url, progress=advance, progress_total=total,
            options=Options(quiesce=quiesce, memory=memory, full=full, wait=wait),
        )  # fmt: skip
    return VmBackup(point, stats, {p.disk.name: (p.why_full, [p.disk.file]) for p in plans}, received, "HTTP")


def _xen_backup(repo: Repository, hv: Hypervisor, password: str, vm_ref: str, *, url: str,
                name: str | None, quiesce: bool, memory: bool, mode: str | None, full: bool,
                wait: float | None, advance: Progress, total: Progress) -> VmBackup:  # fmt: skip
    from ..hypervisors.xen.backup import Options, back_up
    from ..hypervisors.xen.session import session

    if quiesce or memory:
        raise BadInput(
            "--quiesce and --memory are vSphere's", hint="for xen:// give --mode quiesced or memory"
        )
    with session(hv, password) as xs:
        point, stats, plans, received, used = back_up(
            repo, xs, vm_ref, name=name, source_url=url, progress=advance, progress_total=total,
            options=Options(mode=mode or "normal", full=full, wait=wait),
        )  # fmt: skip
    reads = {p.disk.name: (p.why_full, [f"VDI {p.disk.vdi_uuid}"]) for p in plans}
    return VmBackup(point, stats, reads, received, used)


def _backup_vm(args: argparse.Namespace) -> int:
    if len(args.images) != 1 or args.disk_name or args.changed_extents or args.format or args.untrusted:
        raise BadInput("a hypervisor backup takes one SCHEME://HYPERVISOR/VM and no image options")
    url = args.images[0]
    with open_repo(args) as repo:
        registry = Registry(repo.root)
        hv, vm_ref = registry.target(url, vm=True)
        assert vm_ref is not None
        with progress(f"backup {url}", enabled=not args.json) as (total, advance):
            done = back_up_vm(
                repo, hv, registry.password(hv), vm_ref, url=url, name=args.vm, quiesce=args.quiesce,
                memory=args.memory, mode=args.mode, full=args.full, wait=_wait(args), progress=advance,
                progress_total=total,
            )  # fmt: skip
    point, stats, received, transport = done.point, done.stats, done.received, done.transport
    doc = done.doc(url)
    disks = doc["disks"]
    if args.json:
        emit_json(doc)
    else:
        stdout.print(
            f"{point.vm}@{point.id}: {point.kind} backup of {url} ({len(stats)} disk(s)) in "
            f"{doc['duration_s']} s; "
            f"read {human_bytes(doc['bytes_read'])} ({human_bytes(received)} over {transport}), "
            f"new {human_bytes(doc['new_bytes'])}, stored {human_bytes(doc['stored_bytes'])}",
            markup=False,
        )
        for d in disks:
            if d["read_whole"]:
                stdout.print(f"  disk {d['name']} read whole: {d['read_whole']}", markup=False)
    return ExitCode.OK


def _vmware_restore(repo: Any, hv: Any, password: str, point: Any, args: argparse.Namespace, advance: Any,
                    total: Any) -> dict[str, Any]:  # fmt: skip
    from ..hypervisors.vmware.restore import restore
    from ..hypervisors.vmware.session import session

    if args.sr:
        raise BadInput("--sr is for xen:// restores", hint="vSphere takes --datastore and --host")
    with session(hv, password) as vs:
        return restore(
            repo, vs, point, name=args.name, datastore=args.datastore, host=args.host,
            no_network=args.no_network, new_identity=args.new_identity, power_on=args.power_on,
            progress=advance, progress_total=total,
        )  # fmt: skip


def _xen_restore(repo: Any, hv: Any, password: str, point: Any, args: argparse.Namespace, advance: Any,
                 total: Any) -> dict[str, Any]:  # fmt: skip
    from ..hypervisors.xen.restore import check_point, restore
    from ..hypervisors.xen.session import session

    if args.datastore or args.host:
        raise BadInput("--datastore and --host are vSphere's", hint="for xen:// give --sr SR (default: the "
                       "pool's default SR); XenServer picks the host when the VM starts")  # fmt: skip
    check_point(point)  # before connecting: a point of another platform is refused offline
    with session(hv, password) as xs:
        return restore(
            repo, xs, point, name=args.name, sr=args.sr, no_network=args.no_network,
            new_identity=args.new_identity, power_on=args.power_on, progress=advance, progress_total=total,
        )  # fmt: skip


def _restore_vm(args: argparse.Namespace) -> int:
    if args.disk or args.overwrite or args.format != "raw":
        raise BadInput("--disk, --format and --overwrite are for restores to a file")
    with open_repo(args) as repo:
        point = repo.catalog.resolve(args.target)
        registry = Registry(repo.root)
        hv, _ = registry.target(args.to, vm=False)
        require(hv, "restore to a hypervisor", "vmware", "xen")
        run = _xen_restore if hv.scheme == "xen" else _vmware_restore
        what = f"restore {point.vm}@{point.id} to {hv.name}"
        with progress(what, enabled=not args.json) as (total, advance):
            doc = run(repo, hv, registry.password(hv), point, args, advance, total)
    doc = {**point.summary(), "hypervisor": hv.name, **doc}
    if args.json:
        emit_json(doc)
    elif hv.scheme == "xen":
        stdout.print(
            f"restored {point.vm}@{point.id} to {hv.name} as VM {doc['name']} ({doc['vm']}) on SR {doc['sr']}"
            + ("; powered on" if doc["powered_on"] else ""),
            markup=False,
        )
        stdout.print(f"  {doc['uuid_note']}", markup=False)
        for stored, used in doc["networks"].items():
            if args.no_network:
                stdout.print(f"  NICs on network {stored!r} left out (--no-network)", markup=False)
            elif used != stored:
                where = f"put on {used!r}" if used else "left out: the pool has no network for them"
                stdout.print(f"  network {stored!r} is not in the pool: its NICs were {where}", markup=False)
    else:
        stdout.print(
            f"restored {point.vm}@{point.id} to {hv.name} as VM {doc['name']} ({doc['vm']}) on host "
            f"{doc['host']}, datastore {doc['datastore']}" + ("; powered on" if doc["powered_on"] else ""),
            markup=False,
        )
    return ExitCode.OK


def _files_doc(src: DiskSource) -> dict[str, Any]:
    """Which host files a disk was read from (the image, then its backing chain, extents or data
    file), and the backing file an untrusted image names but was not read."""
    return {"files_read": src.files_read, "backing_not_read": src.backing_not_read}


def cmd_restore(args: argparse.Namespace) -> int:
    vm_options = (args.datastore, args.host, args.sr, args.name, args.no_network, args.new_identity,
                  args.power_on)  # fmt: skip
    if "://" in args.to:
        return _restore_vm(args)
    if any(vm_options):
        raise BadInput("--datastore, --host, --sr, --name, --no-network, --new-identity and --power-on go "
                       "with --to vmware://HYPERVISOR or xen://POOL")  # fmt: skip
    args.to = Path(args.to)
    with open_repo(args) as repo:
        point = repo.catalog.resolve(args.target)
        disk = pick_disk(repo, point, args.disk)
        with progress(f"restore {point.vm}@{point.id} {disk.name}", enabled=not args.json) as (
            total,
            advance,
        ):
            total(disk.size)
            res = restore_disk(
                repo, point, disk, args.to, fmt=args.format, overwrite=args.overwrite, progress=advance
            )
    if args.json:
        emit_json(res.__dict__)
    else:
        stdout.print(
            f"restored {res.vm}@{res.point} disk {res.disk} ({human_bytes(res.size)}, "
            f"{human_bytes(res.data_bytes)} data) to {res.path} as {res.format}",
            markup=False,
        )
    return ExitCode.OK
