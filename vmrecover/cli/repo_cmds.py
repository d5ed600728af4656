"""Repository commands: init, list, verify, prune, gc."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from ..errors import ExitCode, NotFound, UsageError
from ..fsutil import write_file
from ..repo.gc import gc
from ..repo.keys import ask_passphrase
from ..repo.prune import Policy, prune
from ..repo.repository import DEFAULT_COMPRESSION_LEVEL, FORMAT_VERSION, FORMATS, Repository, parse_size
from ..repo.verify import verify
from .common import open_repo, repo_path
from .output import emit_json, human_bytes, progress, stderr, stdout, table


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="create a repository")
    p.add_argument(
        "--chunk-size", default="1M", help="chunk size, a power of two from 64K to 64M (default 1M)"
    )
    p.add_argument("--encryption", default="none", choices=["none", "aes-256-gcm"])
    p.add_argument(
        "--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL,
        help=f"zstd level of new chunks, 1 (fastest) to 22 (default {DEFAULT_COMPRESSION_LEVEL})",
    )  # fmt: skip
    p.add_argument(
        "--format", type=int, default=FORMAT_VERSION, choices=FORMATS,
        help="repository format: 2 (default) stores chunks in 64 KiB pieces each readable alone; 1 is "
        "what vmrecover wrote before, for a repository older releases must still open",
    )  # fmt: skip
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "upgrade", parents=[common],
        help="make a format 1 repository format 2 (new chunks in pieces; old ones stay and stay readable), "
        "and write the piece tables of restore points written without them",
    )  # fmt: skip
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("list", parents=[common], help="list VMs, or the restore points of one VM")
    p.add_argument("vm", nargs="?", metavar="VM")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("verify", parents=[common], help="check that restore points read back intact")
    p.add_argument("target", nargs="?", metavar="VM[@POINT]", help="default: every restore point")
    boot = p.add_argument_group("boot health check (--boot: the point booted under qemu, isolated)")
    boot.add_argument("--boot", action="store_true",
                      help="boot VM[@POINT] (default: latest) in a throw-away session, judge it")  # fmt: skip
    boot.add_argument("--timeout", type=float, default=300, help="seconds to wait for the boot (300)")
    boot.add_argument("--expect", metavar="REGEX",
                      help="serial console text that means booted (default: a login prompt)")  # fmt: skip
    boot.add_argument("--memory", default="1G", help="the VM's memory (1G)")
    boot.add_argument("--screenshot", type=Path, metavar="FILE.png",
                      help="also write the screen at the verdict here")  # fmt: skip
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("prune", parents=[common], help="delete restore points outside a retention policy")
    for rule in ("last", "daily", "weekly", "monthly"):
        p.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    p.add_argument("--vm", help="only this VM (default: every VM, each on its own)")
    p.add_argument("--dry-run", action="store_true", help="show what would be deleted")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("gc", parents=[common], help="free the space of chunks no restore point uses")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_gc)


def cmd_init(args: argparse.Namespace) -> int:
    path = repo_path(args)
    repo = Repository.init(
        path,
        chunk_size=parse_size(args.chunk_size),
        encryption=args.encryption,
        passphrase=lambda: ask_passphrase(str(path), confirm=True),
        compression_level=args.compression_level,
        format=args.format,
    )
    doc = {
        "repo": str(path),
        "id": repo.config.id,
        "format": repo.config.format,
        "chunk_size": repo.config.chunk_size,
        "encryption": args.encryption,
        "compression": f"zstd,{repo.config.compression_level}",
    }
    repo.close()
    if args.json:
        emit_json(doc)
    else:
        stdout.print(
            f"created repository {path} (chunk size {human_bytes(doc['chunk_size'])}, "
            f"encryption {args.encryption})",
            markup=False,
        )
    return ExitCode.OK


def cmd_upgrade(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        changed = repo.upgrade()
        with progress("writing piece tables", enabled=not args.json, unit="chunks") as (total, advance):
            tables = repo.add_piece_tables(progress_total=total, progress=advance)
        doc = {
            "repo": str(repo.root), "format": repo.config.format, "upgraded": changed, "piece_tables": tables,
        }  # fmt: skip
    if args.json:
        emit_json(doc)
        return ExitCode.OK
    if changed:
        stdout.print(
            f"repository {doc['repo']} is now format {doc['format']}: new chunks are stored in pieces; "
            "the chunks already there are read as they are",
            markup=False,
        )
    else:
        stdout.print(f"repository {doc['repo']} is format {doc['format']} already", markup=False)
    if tables:
        stdout.print(
            f"piece tables written for {tables} disks of earlier restore points: their cold random reads "
            "now read one part of a chunk file, not two",
            markup=False,
        )
    return ExitCode.OK


def _point_doc(repo: Repository, p: Any) -> dict[str, Any]:
    return {
        "id": p.id,
        "vm": p.vm,
        "created": p.created,
        "kind": p.kind,
        "parent": p.parent,
        "stats": p.stats,
        "config": p.config,
        "disks": [
            {
                "name": d.name,
                "size": d.size,
                "source": d.source,
                "format": d.source_format,
                "change_token": d.change_token,
            }
            for d in repo.catalog.disks(p.id)
        ],
        "boot_check": next((c.summary() for c in repo.catalog.boot_checks(p.id, limit=1)), None),
    }


def cmd_list(args: argparse.Namespace) -> int:
    with open_repo(args) as repo:
        if args.vm is None:
            vms = repo.catalog.vms()
            if args.json:
                emit_json({"vms": vms})
            else:
                table(
                    None,
                    ["VM", "points", "latest", "first"],
                    [[v["name"], v["points"], v["latest"], v["created"]] for v in vms],
                )
            return ExitCode.OK
        if not repo.catalog.has_vm(args.vm):
            raise NotFound(f"no VM named {args.vm!r} in the repository")
        docs = [_point_doc(repo, p) for p in repo.catalog.points(args.vm)]
        if args.json:
            emit_json({"vm": args.vm, "points": docs})
        else:
            rows = [
                [
                    d["id"],
                    d["created"],
                    d["kind"],
                    ", ".join(f"{x['name']} ({human_bytes(x['size'])})" for x in d["disks"]),
                    human_bytes(d["stats"].get("bytes_read", 0)),
                    human_bytes(d["stats"].get("stored_bytes", 0)),
                ]
                for d in docs
            ]
            table(
                f"restore points of {args.vm}",
                ["point", "created (UTC)", "kind", "disks", "read", "stored"],
                rows,
            )
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    if args.boot:
        return _boot_check(args)
    with open_repo(args) as repo:
        if args.target is None:
            points = repo.catalog.points()
        elif "@" in args.target:
            points = [repo.catalog.resolve(args.target)]
        else:
            repo.catalog.resolve(args.target)  # clear error for an unknown VM
            points = repo.catalog.points(args.target)
        with progress("verifying chunks", enabled=not args.json, unit="chunks") as (total, advance):
            report = verify(repo, points, progress_total=total, progress=advance)
    if args.json:
        emit_json(report.to_json())
    else:
        stdout.print(
            f"checked {report.points} restore points, {report.disks} disks, {report.chunks} chunks "
            f"({human_bytes(report.bytes)})",
            markup=False,
        )
        for name in report.pruned:
            stdout.print(f"{name} was pruned while verify ran: not checked", markup=False)
        for b in report.bad_indexes:
            stdout.print(f"BAD INDEX {b['vm']}@{b['point']} disk {b['disk']}: {b['error']}", markup=False)
        for b in report.bad_chunks:
            stdout.print(f"BAD CHUNK {b['digest']}: {b['reason']}", markup=False)
            for u in b["used_by"]:
                ranges = ", ".join(f"{o}..{o + n}" for o, n in u["ranges"][:8])
                more = f" (+{len(u['ranges']) - 8} more)" if len(u["ranges"]) > 8 else ""
                stdout.print(
                    f"  used by {u['vm']}@{u['point']} disk {u['disk']} bytes {ranges}{more}", markup=False
                )
        stdout.print(
            "OK" if report.ok else "DAMAGED: the restore points above cannot be fully restored", markup=False
        )
    return ExitCode.OK if report.ok else ExitCode.INTEGRITY


def _boot_check(args: argparse.Namespace) -> int:
    from ..recovery.healthcheck import boot_check

    if args.target is None:
        raise UsageError("verify --boot needs a VM[@POINT]")
    with open_repo(args) as repo:
        point = repo.catalog.resolve(args.target)
        label = f"boot check of {point.vm}@{point.id}"
        shown = not args.json and sys.stderr.isatty()
        with stderr.status(label) if shown else contextlib.nullcontext() as st:
            check = boot_check(repo, point, timeout=args.timeout, expect=args.expect, memory=args.memory,
                               progress=st.update if st is not None else lambda text: None)  # fmt: skip
    if args.screenshot is not None and check.screenshot is not None:
        write_file(args.screenshot, check.screenshot, what="the screenshot")
    if args.json:
        emit_json({"vm": point.vm, **check.summary()})
    else:
        state = "BOOTS" if check.ok else "DOES NOT BOOT"
        stdout.print(f"{point.vm}@{point.id} {state}: {check.verdict}: {check.detail} "
                     f"({check.seconds:.0f} s, {check.accel})", markup=False)  # fmt: skip
        if not check.ok:
            for line in check.serial.rstrip().splitlines()[-10:]:
                stdout.print(f"  | {line}", markup=False)
    return ExitCode.OK if check.ok else ExitCode.BOOT_FAILED


def cmd_prune(args: argparse.Namespace) -> int:
    policy = Policy(args.keep_last, args.keep_daily, args.keep_weekly, args.keep_monthly)
    with open_repo(args) as repo, repo.writer("prune"):
        if args.vm and not repo.catalog.has_vm(args.vm):
            raise NotFound(f"no VM named {args.vm!r} in the repository")
        removed = prune(repo, policy, vm=args.vm, dry_run=args.dry_run)
    if args.json:
        emit_json(
            {
                "dry_run": args.dry_run,
                "removed": {
                    vm: [{"id": p.id, "created": p.created} for p in pts] for vm, pts in removed.items()
                },
            }
        )
    else:
        verb = "would remove" if args.dry_run else "removed"
        for vm, pts in removed.items():
            for p in pts:
                stdout.print(f"{verb} {vm}@{p.id} ({p.created})", markup=False)
        n = sum(len(v) for v in removed.values())
        stdout.print(
            f"{verb} {n} restore points"
            + ("" if args.dry_run or not n else "; run 'vmrecover gc' to free space"),
            markup=False,
        )
    return ExitCode.OK


def cmd_gc(args: argparse.Namespace) -> int:
    with open_repo(args) as repo, repo.writer("gc"):
        rep = gc(repo, dry_run=args.dry_run)
    if args.json:
        emit_json({"dry_run": args.dry_run, **rep.__dict__})
    else:
        verb = "would free" if args.dry_run else "freed"
        stdout.print(
            f"{verb} {human_bytes(rep.removed_bytes)} in {rep.removed_chunks} chunks "
            f"({rep.removed_temp_files} temp files, {rep.removed_index_dirs} orphan index dirs, "
            f"{rep.removed_session_dirs} orphan session dirs); "
            f"{rep.referenced_chunks} chunks ({human_bytes(rep.kept_bytes)}) in use",
            markup=False,
        )
        if rep.kept_recent_chunks:
            stdout.print(f"kept {rep.kept_recent_chunks} unused chunks newer than this gc", markup=False)
        if not rep.sessions_checked:
            stdout.print("session folders were busy (recover start): left for the next gc", markup=False)
    return ExitCode.OK
