"""``vmrecover serve``: the appliance's service, in the foreground (systemd runs it)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import ExitCode
from .output import emit_json, stdout


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve", parents=[common],
        help="run the appliance's service: datastores, NFS export, API and scheduler in one process",
    )  # fmt: skip
    p.add_argument(
        "--config", type=Path, default=None,
        help="configuration file (default: $VMRECOVER_CONFIG, else /etc/vmrecover/vmrecover.toml)",
    )  # fmt: skip
    p.add_argument(
        "--check-config", action="store_true", help="check the configuration file and exit (0: good)"
    )
    p.add_argument(
        "--log-file", type=Path,
        help="log here instead of stderr (reopened after logrotate moves it; default: stderr, the journal)",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)


def config_path(args: argparse.Namespace) -> Path:
    from ..service import DEFAULT_PATH

    return args.config or Path(os.environ.get("VMRECOVER_CONFIG") or DEFAULT_PATH)


def cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from ..service import config, daemon
    from .output import setup_logging

    if args.log_file:
        setup_logging(args.log_level, path=args.log_file)
    path = config_path(args)
    if args.check_config:
        cfg = config.load(path)
        doc = {"config": str(path), "ok": True, "jobs": [j.name for j in cfg.jobs]}
        if args.json:
            emit_json(doc)
        else:
            stdout.print(f"{path}: good ({len(cfg.jobs)} jobs)", markup=False)
        return ExitCode.OK
    service = daemon.open_service(path)
    try:
        trio.run(daemon.run, service)
    finally:
        daemon.close_service(service)
    return ExitCode.OK
