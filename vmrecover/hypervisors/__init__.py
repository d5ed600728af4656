"""Hypervisors: where backups come from and where recoveries go (VMware vSphere, XenServer / XCP-ng).

This package holds what every platform shares; each platform has one module of its own
(``vmware/``, ``xen/``), which ``connect()`` reaches through the URL scheme.

**The registry** is ``REPO/hypervisors.toml`` (0600, in the 0700 repository), one table per name::

    [hypervisors.vc1]
    url = "vmware://administrator@vsphere.local@vc.example:443"
    insecure = false          # true: TLS is not verified (a warning on every connection)
    ca_file = "/etc/vmrecover/vc1-ca.pem"   # optional: trust this CA (e.g. VMware's VMCA) too
    password = "..."          # optional: else $VMRECOVER_HYPERVISOR_VC1_PASSWORD

**Secrets** never reach a command line, a log or another user: ``hypervisor add`` reads the password
from the terminal or standard input; at run time it comes from the environment variable (preferred
by services with their own secret store) or from the registry file.  ``Hypervisor`` objects don't
carry it; only ``password()`` hands it to a connection.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import AuthError, BadInput, NotFound
from ..fsutil import write_file

SCHEMES = {"vmware": 443, "xen": 443}  # scheme -> default port
PLATFORMS = {"vmware": "VMware vSphere", "xen": "XenServer / XCP-ng"}
FILE = "hypervisors.toml"


@dataclass(frozen=True)
class Hypervisor:
    name: str
    scheme: str
    user: str
    host: str
    port: int
    insecure: bool = False
    ca_file: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{self.user}@{host}:{self.port}"

    @property
    def password_env(self) -> str:
        return "VMRECOVER_HYPERVISOR_" + re.sub(r"[^A-Z0-9]", "_", self.name.upper()) + "_PASSWORD"


def parse_target(url: str, *, vm: bool) -> tuple[str, str | None]:
    """``SCHEME://HYPERVISOR`` (*vm* False) or ``SCHEME://HYPERVISOR/VM_NAME_OR_ID`` (*vm* True), as
    commands name what they act on -> (hypervisor name, VM or None).  :meth:`Registry.target` also
    checks that the scheme is the hypervisor's."""
    scheme, sep, rest = url.partition("://")
    name, _, ref = rest.strip("/").partition("/") if vm else (rest.strip("/"), "", "")
    if not sep or scheme not in SCHEMES or not name or (vm and not ref) or (not vm and "/" in name):
        shape = f"{scheme if scheme in SCHEMES else 'vmware|xen'}://HYPERVISOR" + ("/VM" if vm else "")
        raise BadInput(
            f"{url!r} is not {shape}",
            hint="e.g. vmware://vc1" + ("/web01 or xen://pool1/web01" if vm else " or xen://pool1"),
        )
    return name, (ref or None)


def require(hv: Hypervisor, what: str, *platforms: str) -> None:
    """Refuse *what* on a hypervisor whose platform cannot do it (yet), saying which can."""
    if hv.scheme not in platforms:
        can = " and ".join(PLATFORMS[p] for p in platforms)
        raise BadInput(
            f"{what} is not available for {PLATFORMS[hv.scheme]} (hypervisor {hv.name}) yet",
            hint=f"it is for {can}",
        )


def parse_url(url: str) -> tuple[str, str, str, int]:
    """``vmware://[user@]host[:port]`` -> (scheme, user, host, port).  The user may contain '@'
    (``administrator@vsphere.local``): the host is what follows the last one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise BadInput(
            f"{url!r} is not a hypervisor URL", hint=f"write {'|'.join(SCHEMES)}://[user@]host[:port]"
        )
    rest = rest.rstrip("/")
    user, _, hostport = rest.rpartition("@")
    if ":" in user:
        raise BadInput(
            "a password does not belong in the URL (command lines show in ps and shell history)",
            hint="give the URL without it; the password is asked for, or read with --password-stdin",
        )
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d{1,5}))?", hostport)
    if not m or "/" in user:
        raise BadInput(f"cannot read host and port in {url!r}", hint=f"write {scheme}://[user@]host[:port]")
    port = int(m.group(2) or SCHEMES[scheme])
    if not 0 < port < 65536:
        raise BadInput(f"port {port} in {url!r} is out of range")
    return scheme, user or "root", m.group(1).strip("[]"), port


class Registry:
    """The hypervisors configured for a repository (see the module doc)."""

    def __init__(self, repo_root: Path) -> None:
        self.path = repo_root / FILE

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            return tomllib.loads(self.path.read_text()).get("hypervisors", {})
        except FileNotFoundError:
            return {}
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"{self.path} is damaged: {exc}", hint="fix or remove the file") from None

    def _save(self, table: dict[str, dict[str, Any]]) -> None:
        write_file(self.path, tomli_w.dumps({"hypervisors": table}).encode(), what=FILE)

    def all(self) -> list[Hypervisor]:
        return [self._make(name, doc) for name, doc in sorted(self._load().items())]

    @staticmethod
    def _make(name: str, doc: dict[str, Any]) -> Hypervisor:
        scheme, user, host, port = parse_url(doc["url"])
        return Hypervisor(name, scheme, user, host, port, bool(doc.get("insecure")), doc.get("ca_file"))

    def get(self, name: str) -> Hypervisor:
        doc = self._load().get(name)
        if doc is None:
            known = ", ".join(sorted(self._load())) or "none"
            raise NotFound(
                f"no hypervisor named {name!r}",
                hint=f"known: {known}; add one with 'vmrecover hypervisor add'",
            )
        return self._make(name, doc)

    def target(self, url: str, *, vm: bool) -> tuple[Hypervisor, str | None]:
        """The hypervisor and VM (*vm*) a ``SCHEME://HYPERVISOR[/VM]`` names; its scheme must be the
        hypervisor's (``xen://vc1`` for a vCenter is a mistake worth saying)."""
        name, ref = parse_target(url, vm=vm)
        hv = self.get(name)
        scheme = url.partition("://")[0]
        if scheme != hv.scheme:
            raise BadInput(
                f"hypervisor {name} is {PLATFORMS[hv.scheme]}, not {PLATFORMS[scheme]}",
                hint=f"write {hv.scheme}://{name}" + ("/VM" if vm else ""),
            )
        return hv, ref

    def add(self, hv: Hypervisor, password: str | None, *, replace: bool = False) -> None:
        """Store *hv* (and its password unless None: then it must come from the environment)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", hv.name):
            raise BadInput(f"invalid hypervisor name {hv.name!r}", hint="letters, digits, '_', '.', '-'")
        table = self._load()
        for other in self.all():
            if other.name != hv.name and other.password_env == hv.password_env:
                raise BadInput(
                    f"hypervisor {hv.name!r} would share ${hv.password_env} with {other.name!r}",
                    hint="choose a name that differs in more than punctuation",
                )
        if hv.name in table and not replace:
            raise BadInput(
                f"a hypervisor named {hv.name!r} exists", hint="remove it first, or choose another name"
            )
        doc: dict[str, Any] = {"url": hv.url, "insecure": hv.insecure}
        if hv.ca_file:
            doc["ca_file"] = hv.ca_file
        if password is not None:
            doc["password"] = password
        table[hv.name] = doc
        self._save(table)

    def remove(self, name: str) -> Hypervisor:
        table = self._load()
        hv = self.get(name)
        del table[name]
        self._save(table)
        return hv

    def has_password(self, hv: Hypervisor) -> str | None:
        """Where the password comes from: 'environment', 'registry' or None."""
        if os.environ.get(hv.password_env):
            return "environment"
        return "registry" if self._load().get(hv.name, {}).get("password") else None

    def password(self, hv: Hypervisor) -> str:
        secret = os.environ.get(hv.password_env) or self._load().get(hv.name, {}).get("password")
        if not secret:
            raise AuthError(
                f"no password for hypervisor {hv.name}",
                hint=f"set ${hv.password_env}, or store it: vmrecover hypervisor add {hv.name} URL --replace",
            )
        return str(secret)
