"""Credentials of ``vmrecover serve``: ``token new NAME [--role admin|read-only]`` and the web
console's local users, ``user new NAME [--role ...] [--password-stdin]``.

The token is printed once, with the ``[[api.tokens]]`` lines to paste into the service's configuration:
only its SHA-256 is stored there (service/auth.py), so a lost token is replaced, not recovered.  A
user's password is asked for (twice on a terminal) or read from standard input, never from the
command line, and only its scrypt hash is printed, in ``[[api.users]]`` lines.  A reload of the
service (SIGHUP, ``systemctl reload vmrecover``) takes the new lines at once; changing a password or
removing a token ends the console sessions that signed in with it.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import AuthError, ExitCode
from ..repo.catalog import check_name
from ..service import DEFAULT_PATH
from .common import read_secret
from .output import emit_json, stderr, stdout

MIN_PASSWORD = 12  # characters (NIST SP 800-63B asks at least 8; a backup appliance's admins, more)


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

    up = sub.add_parser("user", help="local users of the web console: make one (only a hash is stored)")
    usub = up.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    p = usub.add_parser(
        "new", parents=[common], help="hash a user's password and print the lines for the configuration"
    )
    p.add_argument("name", help="the user's sign-in name (named in the service's log of every change)")
    p.add_argument("--role", choices=["admin", "read-only"], default="read-only",
                   help="admin: everything; read-only (default): no change")  # fmt: skip
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input's first line (else: asked twice)")  # fmt: skip
    p.set_defaults(func=cmd_user_new)


def cmd_new(args: argparse.Namespace) -> int:
    from ..service import auth  # (the service's modules load only for the commands that need them)

    name = check_name("token", args.name)
    token = auth.new_token()
    sha256 = auth.digest(token)
    block = auth.config_block(name, args.role, sha256)
    if args.json:
        emit_json({"name": name, "role": args.role, "token": token, "sha256": sha256, "config": block})
        return ExitCode.OK
    stdout.print(f"token {name} ({args.role}), shown only now: {token}", markup=False)
    return _paste(block, "clients send 'Authorization: Bearer TOKEN'")


def _paste(block: str, then: str) -> int:
    """Tell where *block* goes, then print it (on stdout: ``> file`` keeps only what to paste)."""
    stderr.print(
        f"Add these lines to the service's configuration ({DEFAULT_PATH}), then reload it "
        f"(systemctl reload vmrecover); {then}:",
        markup=False,
    )
    stdout.print(f"\n{block}", markup=False, end="")
    return ExitCode.OK


def cmd_user_new(args: argparse.Namespace) -> int:
    from ..service import auth

    name = check_name("user", args.name)
    what = f"user {name}"
    password = read_secret(f"Password for {name}: ", from_stdin=args.password_stdin, env=None, what=what,
                           flag="--password-stdin")  # fmt: skip
    if len(password) < MIN_PASSWORD:
        raise AuthError(
            f"the password for {what} is too short",
            hint=f"use {MIN_PASSWORD} characters or more",
        )
    if not args.password_stdin and read_secret("Again: ", from_stdin=False, env=None, what=what,
                                               flag="--password-stdin") != password:  # fmt: skip
        raise AuthError(f"the two passwords for {what} differ", hint="type the same password twice")
    password_hash = auth.hash_password(password)
    block = auth.user_block(name, args.role, password_hash)
    if args.json:
        emit_json({"name": name, "role": args.role, "password_hash": password_hash, "config": block})
        return ExitCode.OK
    return _paste(block, "the user signs in to the web console with this password")
