"""Single-file restore: files inspect | ls | get | find | history | mount | umount.

The work happens in the repository's file-restore service (vmrecover/files/service.py), which keeps
libguestfs appliances open between commands; these commands send it one request each and print
what comes back.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import BadInput, ExitCode
from ..repo.keys import PASSPHRASE_ENV, ask_passphrase
from .common import open_repo, read_secret, repo_path
from .output import emit_json, human_bytes, stderr, stdout, table


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    fp = sub.add_parser("files", help="single-file restore: browse and copy files out of a restore point")
    fsub = fp.add_subparsers(dest="files_command", required=True, metavar="ACTION")

    p = fsub.add_parser("inspect", parents=[common], help="operating system, filesystems, guest mount points")
    p.add_argument("target", metavar="VM[@POINT]")
    p.set_defaults(func=cmd_inspect)

    p = fsub.add_parser("ls", parents=[common], help="list a guest folder (default /)")
    p.add_argument("target", metavar="VM[@POINT]")
    p.add_argument("path", nargs="?", default="/", metavar="GUEST_PATH")
    p.set_defaults(func=cmd_ls)

    p = fsub.add_parser("get", parents=[common], help="copy guest files and folders out")
    p.add_argument("target", metavar="VM[@POINT]")
    p.add_argument("paths", nargs="+", metavar="GUEST_PATH")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", type=Path, metavar="DIR", help="an existing folder")
    where.add_argument(
        "--into-vm", metavar="vmware://HYPERVISOR/VM",
        help="into a running VM's guest, through VMware Tools (each at its guest path, or under --guest-dir)",
    )  # fmt: skip
    p.add_argument("--tar", action="store_true", help="write one archive DIR/<vm>-<point>.tar instead")
    p.add_argument("--overwrite", action="store_true", help="replace what exists at the destination")
    p.add_argument("--guest-user", help="--into-vm: a guest account (its password: terminal, stdin or env)")
    p.add_argument("--guest-dir", help="--into-vm: put the copies in this guest folder instead")
    p.add_argument(
        "--guest-password-stdin", action="store_true", help="--into-vm: read the password from stdin"
    )
    p.set_defaults(func=cmd_get)

    p = fsub.add_parser("find", parents=[common], help="where files matching PATTERN exist across points")
    p.add_argument("vm", metavar="VM")
    p.add_argument("pattern", metavar="PATTERN", help="a glob on the name, or on the path if it has a '/'")
    p.add_argument("--points", default="all", help="all (default), latest, or one point")
    p.set_defaults(func=cmd_find)

    p = fsub.add_parser("history", parents=[common], help="the points that hold a file, and how it changed")
    p.add_argument("vm", metavar="VM")
    p.add_argument("path", metavar="GUEST_PATH")
    p.set_defaults(func=cmd_history)

    p = fsub.add_parser("mount", parents=[common], help="the guest's filesystems, read-only, at MOUNTPOINT")
    p.add_argument("target", metavar="VM[@POINT]")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other host accounts in too (the kernel checks the guest's modes and owners, as numbers)",
    )
    p.set_defaults(func=cmd_mount)

    p = fsub.add_parser("umount", parents=[common], help="unmount what 'files mount' mounted")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.set_defaults(func=cmd_umount)

    p = fsub.add_parser(
        "stop", parents=[common], help="close the appliances and stop the file-restore service"
    )
    p.set_defaults(func=cmd_stop)

    p = fsub.add_parser("serve", parents=[common], help=argparse.SUPPRESS)
    p.add_argument("--idle", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


def _call(args: argparse.Namespace, req: dict[str, Any], on_entries: Any = None) -> Any:
    from ..files.service import request

    root = repo_path(args).resolve()
    if not (root / "repo.toml").exists():
        with open_repo(args):  # the repository's own "not found" error, with its hint
            pass
    env = dict(os.environ)
    if PASSPHRASE_ENV not in env:
        with open_repo(args) as repo:
            if repo.encrypted:
                env[PASSPHRASE_ENV] = ask_passphrase(str(root))

    def progress(text: str) -> None:
        stderr.print(f"[dim]… {text}[/]")

    return request(root, req, progress=progress, on_entries=on_entries or (lambda e: None), env=env)


def cmd_inspect(args: argparse.Namespace) -> int:
    doc = _call(args, {"op": "inspect", "target": args.target})
    if args.json:
        emit_json(doc)
        return ExitCode.OK
    stdout.print(f"{doc['vm']}@{doc['point']} ({doc['created']})", markup=False)
    for o in doc["operating_systems"]:
        what = f"{o['type']} {o['distro']} {o['version']}: {o['product']}"
        stdout.print(f"  {what} (host name {o['hostname']})", markup=False)
    if not doc["operating_systems"]:
        stdout.print("  no operating system recognised: filesystems mounted by device", markup=False)
    rows = [
        [f["device"], f["type"], f["label"], f["mountpoint"] or "-", f["note"]] for f in doc["filesystems"]
    ]
    table(None, ["device", "type", "label", "guest path", "note"], rows)
    return ExitCode.OK


def cmd_ls(args: argparse.Namespace) -> int:
    entries: list[dict[str, Any]] = []

    def show(batch: list[dict[str, Any]]) -> None:
        if args.json:
            entries.extend(batch)
            return
        for e in batch:
            link = f" -> {e['target']}" if e["kind"] == "symlink" else ""
            suffix = "/" if e["kind"] == "dir" else ""
            stdout.print(f"{e['mode']} {e['size']:>12} {e['mtime']}  {e['path']}{suffix}{link}", markup=False)

    doc = _call(args, {"op": "ls", "target": args.target, "path": args.path}, show)
    if args.json:
        emit_json(doc | {"entries": entries})
    return ExitCode.OK


def cmd_get(args: argparse.Namespace) -> int:
    if args.into_vm:
        return _get_into_vm(args)
    to = args.to.resolve()
    req = {"op": "get", "target": args.target, "paths": args.paths, "to": str(to), "tar": args.tar,
           "overwrite": args.overwrite}  # fmt: skip
    doc = _call(args, req)
    if args.json:
        emit_json(doc)
    else:
        for w in doc["written"]:
            stdout.print(
                f"{w['guest_path']} ({w['kind']}, {human_bytes(w['size'])}) -> {w['to']}", markup=False
            )
    return ExitCode.OK


GUEST_PASSWORD_ENV = "VMRECOVER_GUEST_PASSWORD"


def _guest_password(args: argparse.Namespace) -> str:
    return read_secret(f"Password of {args.guest_user} in the guest: ", from_stdin=args.guest_password_stdin,
                       env=GUEST_PASSWORD_ENV, what=f"guest user {args.guest_user}",
                       flag="--guest-password-stdin")  # fmt: skip


def _get_into_vm(args: argparse.Namespace) -> int:
    from ..hypervisors.vmware.guest import restore_into_vm

    if args.tar or not args.guest_user:
        raise BadInput("--into-vm needs --guest-user and cannot be used with --tar")
    with open_repo(args):  # the repository's own "not found" error, with its hint
        pass
    out = restore_into_vm(
        repo_path(args).resolve(), args.into_vm, args.target, args.paths, user=args.guest_user,
        password=_guest_password(args), guest_dir=args.guest_dir, overwrite=args.overwrite,
        fetch=lambda req: _call(args, req),
    )  # fmt: skip
    if args.json:
        emit_json(out)
    else:
        for s in out["sent"]:
            note = "" if s["sent"] else f" (skipped: {s['why']})"
            stdout.print(f"{s['guest_path']} ({s['kind']}) -> {args.into_vm}{note}", markup=False)
    return ExitCode.OK


def cmd_find(args: argparse.Namespace) -> int:
    hits: list[dict[str, Any]] = []

    def show(batch: list[dict[str, Any]]) -> None:
        hits.extend(batch)
        if not args.json:
            for h in batch:
                stdout.print(f"{h['point']}  {h['created']}  {h['path']}", markup=False)

    doc = _call(args, {"op": "find", "vm": args.vm, "pattern": args.pattern, "points": args.points}, show)
    if args.json:
        emit_json(doc | {"entries": hits})
    return ExitCode.OK


def cmd_history(args: argparse.Namespace) -> int:
    doc = _call(args, {"op": "history", "vm": args.vm, "path": args.path})
    if args.json:
        emit_json(doc)
        return ExitCode.OK
    rows = [[r["point"], r["created"], r["change"], r.get("size", "-"), r.get("mtime", "-"),
             (r.get("sha256") or "-")[:16]] for r in doc["points"]]  # fmt: skip
    table(f"{doc['vm']}:{doc['path']}", ["point", "created", "change", "size", "mtime", "sha256"], rows)
    return ExitCode.OK


def cmd_mount(args: argparse.Namespace) -> int:
    mp = args.mountpoint.resolve()
    if not mp.is_dir():
        raise BadInput(f"mount point {mp} is not a folder", hint="create it first")
    req = {"op": "mount", "target": args.target, "mountpoint": str(mp), "allow_other": args.allow_other}
    doc = _call(args, req)
    if args.json:
        emit_json(doc)
    else:
        stdout.print(f"mounted {doc['vm']}@{doc['point']} read-only at {mp}; 'vmrecover files umount {mp}' "
                     "ends it", markup=False)  # fmt: skip
    return ExitCode.OK


def cmd_umount(args: argparse.Namespace) -> int:
    mp = args.mountpoint.resolve()
    proc = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BadInput(f"cannot unmount {mp}: {proc.stderr.strip()}", hint="close files open there first")
    deadline = time.monotonic() + 10
    while os.path.ismount(mp) and time.monotonic() < deadline:
        time.sleep(0.1)
    if args.json:
        emit_json({"mountpoint": str(mp), "unmounted": True})
    else:
        stdout.print(f"unmounted {mp}", markup=False)
    return ExitCode.OK


def cmd_stop(args: argparse.Namespace) -> int:
    from ..files.service import run_dir, socket_path

    root = repo_path(args).resolve()
    if not socket_path(root).exists():
        doc: dict[str, Any] = {"stopping": False, "running": False}
    else:
        doc = _call(args, {"op": "stop"})
        deadline = time.monotonic() + 60
        while socket_path(root).exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # until its appliances are closed and its datastore unmounted
        if socket_path(root).exists():
            raise BadInput("the file-restore service did not stop", hint=f"see {run_dir(root) / 'files.log'}")
    if args.json:
        emit_json(doc)
    else:
        stdout.print("file-restore service stopped" if doc.get("stopping") else "not running", markup=False)
    return ExitCode.OK


def cmd_serve(args: argparse.Namespace) -> int:
    from ..files.service import IDLE_SECONDS, serve

    with open_repo(args) as repo:
        serve(repo, ready=lambda: None, idle=args.idle or float(os.environ.get("VMRECOVER_FILES_IDLE",
                                                                                 IDLE_SECONDS)))  # fmt: skip
    return ExitCode.OK
