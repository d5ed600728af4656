"""Hypervisors: hypervisor add | list | test | remove (the registry is vmrecover.hypervisors)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ExitCode
from ..hypervisors import Hypervisor, Registry, parse_url
from ..hypervisors.connect import check
from .common import read_secret, repo_path
from .output import emit_json, stdout, table


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    hp = sub.add_parser("hypervisor", help="the hypervisors backups come from and recoveries go to")
    hsub = hp.add_subparsers(dest="hypervisor_command", required=True, metavar="ACTION")

    p = hsub.add_parser(
        "add", parents=[common], help="add a hypervisor (asks for its password; checks the login)",
        description="The password is read from the terminal, or from standard input with --password-stdin; "
        "it is stored in the repository's hypervisors.toml (0600) unless --no-store-password, in which case "
        "it must be in $VMRECOVER_HYPERVISOR_<NAME>_PASSWORD whenever the hypervisor is used.",
    )  # fmt: skip
    p.add_argument("name", help="a short name, used in vmware://NAME/VM or xen://NAME/VM")
    p.add_argument(
        "url", metavar="URL", help="vmware://[user@]host[:port] or xen://[user@]pool-master[:port]"
    )
    p.add_argument(
        "--insecure", action="store_true", help="do not verify the TLS certificate (warns every time)"
    )
    p.add_argument("--ca-file", type=Path, metavar="PEM", help="also trust this CA certificate (e.g. VMCA's)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument(
        "--no-store-password", action="store_true", help="keep the password in the environment only"
    )
    p.add_argument("--no-check", action="store_true", help="do not log in to check")
    p.add_argument("--replace", action="store_true", help="replace a hypervisor of that name")
    p.set_defaults(func=cmd_add)

    p = hsub.add_parser("list", parents=[common], help="list the hypervisors")
    p.set_defaults(func=cmd_list)

    p = hsub.add_parser("test", parents=[common], help="log in and say what is wrong, if anything")
    p.add_argument("name")
    p.set_defaults(func=cmd_test)

    p = hsub.add_parser("remove", parents=[common], help="forget a hypervisor and its password")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)


def _read_password(args: argparse.Namespace, hv: Hypervisor) -> str:
    return read_secret(f"Password of {hv.user} on {hv.host}: ", from_stdin=args.password_stdin, env=None,
                       what=f"hypervisor {hv.name}", flag="--password-stdin")  # fmt: skip


def cmd_add(args: argparse.Namespace) -> int:
    registry = Registry(repo_path(args))
    scheme, user, host, port = parse_url(args.url)
    ca = str(args.ca_file.resolve()) if args.ca_file else None
    hv = Hypervisor(args.name, scheme, user, host, port, args.insecure, ca)
    secret = _read_password(args, hv)
    about = None if args.no_check else check(hv, secret)
    registry.add(hv, None if args.no_store_password else secret, replace=args.replace)
    doc = {"name": hv.name, "url": hv.url, "insecure": hv.insecure, "ca_file": ca,
           "password": "environment" if args.no_store_password else "stored", "about": about}  # fmt: skip
    if args.json:
        emit_json(doc)
    else:
        what = f": {about['product']}" if about else ""
        stdout.print(f"added hypervisor {hv.name} ({hv.url}){what}", markup=False)
    return ExitCode.OK


def cmd_list(args: argparse.Namespace) -> int:
    registry = Registry(repo_path(args))
    rows = [
        {"name": hv.name, "url": hv.url, "insecure": hv.insecure, "ca_file": hv.ca_file,
         "password": registry.has_password(hv)}
        for hv in registry.all()
    ]  # fmt: skip
    if args.json:
        emit_json({"hypervisors": rows})
    else:
        table(None, ["name", "url", "tls", "password"], [
            [r["name"], r["url"],
             "NOT VERIFIED" if r["insecure"] else (f"+ {r['ca_file']}" if r["ca_file"] else "verified"),
             r["password"] or "missing"] for r in rows
        ])  # fmt: skip
    return ExitCode.OK


def cmd_test(args: argparse.Namespace) -> int:
    registry = Registry(repo_path(args))
    hv = registry.get(args.name)
    about = check(hv, registry.password(hv))
    if args.json:
        emit_json({"name": hv.name, "ok": True, **about})
    else:
        stdout.print(
            f"{hv.name}: ok, {about['product']} ({about['api']}), {about['hosts']} host(s)", markup=False
        )
    return ExitCode.OK


def cmd_remove(args: argparse.Namespace) -> int:
    hv = Registry(repo_path(args)).remove(args.name)
    if args.json:
        emit_json({"name": hv.name, "removed": True})
    else:
        stdout.print(f"removed hypervisor {hv.name} and its stored password", markup=False)
    return ExitCode.OK
