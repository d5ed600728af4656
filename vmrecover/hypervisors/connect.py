"""From a configured hypervisor to a live connection, by platform (the URL scheme)."""

from __future__ import annotations

from typing import Any

from . import Hypervisor


def check(hv: Hypervisor, password: str) -> dict[str, Any]:
    """Log in and describe the hypervisor; the classified error (unreachable, certificate, login)."""
    if hv.scheme == "vmware":
        from pyVmomi import vim

        from .vmware.session import session

        with session(hv, password) as vs:
            about = vs.about
            return {
                "product": str(about.fullName), "api": str(about.apiVersion), "type": str(about.apiType),
                "hosts": len(vs.all_of(vim.HostSystem, ["name"])),
            }  # fmt: skip
    if hv.scheme == "xen":
        from .xen.session import session as xen_session

        with xen_session(hv, password) as xs:
            return xs.about()
    raise AssertionError(f"no platform for scheme {hv.scheme}")
