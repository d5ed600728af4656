"""API tokens of ``vmrecover serve``: token new NAME [--role admin|read-only].

The token is printed once, with the ``[[api.tokens]]`` lines to paste into the service's configuration:
only its SHA-256 is stored there (service/auth.py), so a lost token is replaced, not recovered.  A
reload of the service (SIGHUP, ``systemctl reload vmrecover``) takes the new lines at once.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ExitCode
from ..repo.catalog import check_name
from ..service import auth
from ..service.config import DEFAULT_PATH
from .output import emit_json, stderr, stdout


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    tp = sub.add_parser("token", help="API tokens of the service: make one (only its SHA-256 is stored)")
    tsub = tp.add_subparsers(dest="token_command", required=True, metavar="ACTION")

    p = tsub.add_parser(
        "new", parents=[common],
        help="make a token: printed once, with the lines to paste into the service's configuration",
    )  # fmt: skip
    p.add_argument("name", help="who or what uses it (named in the service's log of every change it makes)")
    p.add_argument(
        "--role", choices=["admin", "read-only"], default="read-only",
        help="admin: everything; read-only (default): no change",
    )  # fmt: skip
    p.set_defaults(func=cmd_new)


def cmd_new(args: argparse.Namespace) -> int:
    name = check_name("token", args.name)
    token = auth.new_token()
    sha256 = auth.digest(token)
    block = auth.config_block(name, args.role, sha256)
    if args.json:
        emit_json({"name": name, "role": args.role, "token": token, "sha256": sha256, "config": block})
        return ExitCode.OK
    stdout.print(f"token {name} ({args.role}), shown only now: {token}", markup=False)
    stderr.print(
        f"Add these lines to the service's configuration ({DEFAULT_PATH}), then reload it "
        "(systemctl reload vmrecover); clients send 'Authorization: Bearer TOKEN':",
        markup=False,
    )
    stdout.print(f"\n{block}", markup=False, end="")
    return ExitCode.OK
