"""The ``vmrecover`` command: argument parsing, error handling and exit codes.

Each command group lives in its own module and registers its subcommands on the parser; commands
return an exit code.  User errors (VmrecoverError) print one clear message and no traceback; with
``--json`` they print ``{"error": ..., "message": ..., "exit_code": ...}`` on stdout instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from rich.markup import escape

from .. import __version__
from ..errors import ExitCode, VmrecoverError
from . import (
    backup_cmds,
    files_cmds,
    hypervisor_cmds,
    job_cmds,
    mount_cmds,
    nfs_cmds,
    recover_cmds,
    repo_cmds,
    serve_cmds,
    token_cmds,
)
from .common import common_options
from .output import emit_json, setup_logging, stderr


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmrecover",
        description="Back up VM disk images into a deduplicating repository and restore them.",
        epilog="exit codes: 0 ok, 1 internal error, 2 usage, 3 data integrity, 4 locked, 5 not found, "
        "6 bad input, 7 incompatible repository, 8 passphrase or login, 9 no space, 10 hypervisor "
        "unreachable or failing, 11 certificate not trusted, 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"vmrecover {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()
    repo_cmds.register(sub, common)
    backup_cmds.register(sub, common)
    mount_cmds.register(sub, common)
    recover_cmds.register(sub, common)
    nfs_cmds.register(sub, common)
    files_cmds.register(sub, common)
    hypervisor_cmds.register(sub, common)
    job_cmds.register(sub, common)
    serve_cmds.register(sub, common)
    token_cmds.register(sub, common)
    return parser


class Interrupted(BaseException):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.umask(0o077)  # what vmrecover creates is private (repository, logs, restores), as borg does
    setup_logging(args.log_level)
    from ..vfs.cache import tune_malloc

    tune_malloc()  # every command moves chunk-sized buffers: backup, restore, the daemons
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except VmrecoverError as exc:
        if args.json:
            emit_json(exc.to_json())
        else:
            stderr.print(f"[bold red]error:[/] {escape(exc.message)}")
            if exc.hint:
                stderr.print(f"  hint: {exc.hint}", markup=False)
        return exc.exit_code
    except (KeyboardInterrupt, Interrupted):
        stderr.print("interrupted: nothing that was not yet committed was kept", markup=False)
        return ExitCode.INTERRUPTED


def entry() -> None:
    sys.exit(main())
