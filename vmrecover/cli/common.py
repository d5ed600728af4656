"""Options and helpers every command shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..repo.keys import ask_passphrase
from ..repo.repository import Repository, default_repo_path


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--repo",
        type=Path,
        default=None,
        help="repository directory (default: $VMRECOVER_REPO, else ~/.local/share/vmrecover/repo)",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def repo_path(args: argparse.Namespace) -> Path:
    return args.repo or default_repo_path()


def open_repo(args: argparse.Namespace) -> Repository:
    path = repo_path(args)
    return Repository.open(path, passphrase=lambda: ask_passphrase(str(path)))
