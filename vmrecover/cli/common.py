"""Options and helpers every command shares."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from ..errors import AuthError
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


def read_secret(prompt: str, *, from_stdin: bool, env: str | None, what: str, flag: str) -> str:
    """A password, never from a command line: standard input (*from_stdin*), else the environment
    variable *env*, else a prompt on the terminal; an AuthError saying how to give it otherwise."""
    if from_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    elif env and os.environ.get(env):
        secret = os.environ[env]
    elif sys.stdin.isatty():
        secret = getpass.getpass(prompt)
    else:
        where = f", ${env}" if env else ""
        raise AuthError(
            f"no password given for {what}",
            hint=f"run on a terminal, or use {flag}{where} (never the command line)",
        )
    if not secret:
        raise AuthError(f"an empty password for {what} is not allowed")
    return secret
