"""Datastore commands: mount and umount (the FUSE datastore)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import ExitCode, VmrecoverError
from ..repo.keys import PASSPHRASE_ENV, ask_passphrase
from ..repo.repository import parse_size
from .common import open_repo
from .output import emit_json, stdout


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "mount", parents=[common], help="show the repository as files: vms/<vm>/<point>/<disk>.raw|.vmdk|.vhd"
    )
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--cache-size", default="512M", help="decoded chunk cache (default 512M)")
    p.add_argument("--allow-other", action="store_true", help="let other users (e.g. a qemu user) read it")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("umount", parents=[common], help="unmount a datastore mounted with 'vmrecover mount'")
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    p.add_argument(
        "--lazy", action="store_true", help="detach now even if files are open (serve them until closed)"
    )
    p.set_defaults(func=cmd_umount)


def _tell_parent(fd: int | None, doc: dict[str, Any]) -> None:
    if fd is not None:
        os.write(fd, json.dumps(doc).encode())
        os.close(fd)


def cmd_mount(args: argparse.Namespace) -> int:
    from ..fuse.mount import log_path, serve

    cache_size = parse_size(args.cache_size)
    if args.foreground:
        try:
            with open_repo(args) as repo:
                serve(
                    repo, args.mountpoint, cache_size=cache_size, allow_other=args.allow_other,
                    ready=lambda: _tell_parent(args.ready_fd, {"ready": True, "pid": os.getpid()}),
                )  # fmt: skip
        except VmrecoverError as exc:
            _tell_parent(args.ready_fd, exc.to_json() | {"hint": exc.hint})
            raise
        return ExitCode.OK
    # Background: check what can be checked here (repository, passphrase), then start the daemon and
    # return once it says the mount is ready, or with its error.
    env = dict(os.environ, VMRECOVER_LOG_FORMAT="json")
    with open_repo(args) as repo:
        root = repo.root
        if repo.encrypted:
            env[PASSPHRASE_ENV] = ask_passphrase(str(root))
    r, w = os.pipe()
    logfile = log_path(root, args.mountpoint)
    logfile.parent.mkdir(exist_ok=True)
    argv = [
        sys.executable, "-m", "vmrecover", "mount", str(args.mountpoint), "--foreground", "--repo", str(root),
        "--cache-size", args.cache_size, "--log-level", args.log_level, "--ready-fd", str(w),
        *(["--allow-other"] if args.allow_other else []),
    ]  # fmt: skip
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(w,),
            start_new_session=True,
            env=env,
        )
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        msg = pipe.read()
    doc = json.loads(msg) if msg else {}
    if not doc.get("ready"):
        proc.wait()
        if doc.get("message"):  # the daemon's own error, as the same class
            raise VmrecoverError.from_json(doc)
        raise VmrecoverError(f"the mount daemon exited with status {proc.returncode}", hint=f"see {logfile}")
    out = {"mountpoint": str(args.mountpoint), "pid": doc["pid"], "repo": str(root), "log": str(logfile)}
    if args.json:
        emit_json(out)
    else:
        stdout.print(f"mounted {root} at {args.mountpoint} (pid {doc['pid']}, log {logfile})", markup=False)
    return ExitCode.OK


def cmd_umount(args: argparse.Namespace) -> int:
    from ..fuse.mount import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    if args.json:
        emit_json({"mountpoint": str(args.mountpoint), "unmounted": True, "lazy": args.lazy})
    else:
        stdout.print(f"unmounted {args.mountpoint}" + (" (lazily)" if args.lazy else ""), markup=False)
    return ExitCode.OK
