"""A logged-in XenAPI session on a XenServer / XCP-ng pool.

- **Transport**: XML-RPC over HTTPS to the pool master, with the TLS rules of every platform
  (``hypervisors/net.py``: system CAs plus the hypervisor's CA file, or ``--insecure`` with a warning
  each time) and a timeout per call.  A pool member answers a login with ``HOST_IS_SLAVE`` and the
  master's address: the session follows it once, to the master.
- **Sessions**: the XenAPI client logs in again by itself when a long operation meets
  ``SESSION_INVALID`` (an expired session); the password it keeps for that lives only in this
  process's memory.
- **Errors** are translated at this boundary: unreachable (exit 10), certificate (11), login refused
  (8); a XenAPI failure nobody handled becomes exit 10 naming the pool and the error code.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import ssl
import time
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from xml.etree import ElementTree

import XenAPI

from ...errors import Unreachable, VmrecoverError
from .. import Hypervisor, net

log = logging.getLogger("vmrecover.xen")
TIMEOUT = 60.0  # seconds for one XML-RPC call
ORIGINATOR = "vmrecover"
TASK_TIMEOUT = 6 * 3600.0  # an Async call (a storage migration of a big disk) may take hours


class _Transport(xmlrpc.client.SafeTransport):
    """HTTPS with our TLS context and a timeout (xmlrpc's own has neither knob together)."""

    def __init__(self, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(context=context)
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


def failure_text(exc: BaseException) -> str:
    """A XenAPI failure as its error code and parameters ("VM_BAD_POWER_STATE: ..., running")."""
    if isinstance(exc, XenAPI.Failure) and exc.details:
        code, *params = (str(d) for d in exc.details)
        return code + (f": {', '.join(params)}" if params else "")
    return str(exc)


def classify(hv: Hypervisor, exc: BaseException) -> VmrecoverError:
    refused = isinstance(exc, XenAPI.Failure) and bool(exc.details) and exc.details[0] in (
        "SESSION_AUTHENTICATION_FAILED", "RBAC_PERMISSION_DENIED",
    )  # fmt: skip
    if isinstance(exc, XenAPI.Failure):
        exc = RuntimeError(failure_text(exc))
    elif isinstance(exc, xmlrpc.client.ProtocolError):
        exc = RuntimeError(f"HTTP {exc.errcode} {exc.errmsg} (is this a XenServer / XCP-ng pool master?)")
    return net.classify(hv, exc, login_refused=refused, console="XenCenter or the host's console")


@dataclass
class Xen:
    """A logged-in session on a pool (see the module doc).  Use as a context manager: it logs out."""

    hv: Hypervisor  # the master's address, if the configured host turned out to be a member
    api: XenAPI.Session
    ssl: ssl.SSLContext

    @property
    def x(self) -> Any:
        """The XenAPI classes: ``xen.x.VM.get_all_records()``."""
        return self.api.xenapi

    @property
    def ref(self) -> str:
        """The session reference, for the HTTP handlers (``/export_raw_vdi?session_id=``)."""
        return str(self.api.handle)

    def about(self) -> dict[str, Any]:
        """What ``hypervisor test`` shows: the master's product and version, the pool's hosts."""
        master = self.x.pool.get_master(self.x.pool.get_all()[0])
        version = self.x.host.get_software_version(master)
        product = f"{version.get('product_brand', 'XenServer')} {version.get('product_version', '?')}"
        api = f"{self.x.host.get_API_version_major(master)}.{self.x.host.get_API_version_minor(master)}"
        return {"product": product, "api": api, "type": "pool", "hosts": len(self.x.host.get_all())}

    def wait(self, task: str, what: str, *, timeout: float = TASK_TIMEOUT) -> str:
        """The result of the ``Async.*`` call's *task* (a ref, or ""), once it ends; its failure is raised
        as the ``XenAPI.Failure`` the synchronous call would raise.  The task is destroyed either way."""
        x, deadline, pause = self.x, time.monotonic() + timeout, 0.1
        try:
            while (status := x.task.get_status(task)) == "pending":
                if time.monotonic() > deadline:
                    with contextlib.suppress(XenAPI.Failure):
                        x.task.cancel(task)
                    raise Unreachable(f"{what} on {self.hv.name} did not finish within {timeout:.0f} s")
                time.sleep(pause)
                pause = min(pause * 1.5, 2.0)
            if status != "success":
                raise XenAPI.Failure(x.task.get_error_info(task) or [f"task {status}"])
            result = str(x.task.get_result(task) or "")
        finally:
            with contextlib.suppress(XenAPI.Failure):
                x.task.destroy(task)
        return (ElementTree.fromstring(result).text or "") if result.startswith("<value>") else result

    def close(self) -> None:
        try:
            self.api.xenapi.session.logout()
        except Exception as exc:  # a dead connection logs out by itself
            log.debug("logout from %s failed: %s", self.hv.name, exc)
        if self.api.transport is not None:
            self.api.transport.close()

    def __enter__(self) -> Xen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _login(hv: Hypervisor, password: str, ctx: ssl.SSLContext) -> XenAPI.Session:
    host = f"[{hv.host}]" if ":" in hv.host else hv.host
    api = XenAPI.Session(f"https://{host}:{hv.port}/", transport=_Transport(ctx, TIMEOUT))
    try:
        api.xenapi.login_with_password(hv.user, password, "2.0", ORIGINATOR)
    except BaseException:
        api.transport.close()
        raise
    return api


def connect(hv: Hypervisor, password: str) -> Xen:
    """Log in to *hv*'s pool master; the classified error (unreachable, certificate, login) otherwise."""
    ctx = net.ssl_context(hv)
    try:
        try:
            api = _login(hv, password, ctx)
        except XenAPI.Failure as exc:
            if not (exc.details and exc.details[0] == "HOST_IS_SLAVE" and len(exc.details) > 1):
                raise
            log.info("%s is a pool member; logging in to the master at %s", hv.host, exc.details[1])
            hv = replace(hv, host=str(exc.details[1]))
            api = _login(hv, password, ctx)
    except Exception as exc:
        raise classify(hv, exc) from None
    log.info("logged in to %s as %s", hv.name, hv.user)
    return Xen(hv, api, ctx)


@contextmanager
def session(hv: Hypervisor, password: str) -> Iterator[Xen]:
    """A logged-in session for the block; a XenAPI failure nothing handled becomes an Unreachable
    naming the pool and the error (no traceback for a server's refusal)."""
    s = connect(hv, password)
    try:
        yield s
    except XenAPI.Failure as exc:
        raise Unreachable(f"{hv.name} refused an operation: {failure_text(exc)}") from exc
    finally:
        s.close()
