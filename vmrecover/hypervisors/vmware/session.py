"""A logged-in connection to vCenter or a standalone ESXi host (pyvmomi), and the few helpers every
VMware operation uses.

- **TLS** and the classification of connection errors are the ones of every platform (``net.py``).
- **Properties are read through the PropertyCollector**, never as Python attributes of managed
  objects: one round trip for many objects and paths, an unset property is simply absent (reading
  one as an attribute makes pyvmomi fetch it, and some servers fail that request), and nothing is
  fetched that was not asked for.
- **Tasks** are waited for by polling ``info.state`` and ``info.error`` through the PropertyCollector
  (reading a snapshot task's ``info`` as an attribute fails to deserialize in pyvmomi).
- Errors are translated at this boundary: unreachable (exit 10), certificate (11), login (8).
"""

from __future__ import annotations

import logging
import ssl
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from ...errors import NotFound, Unreachable, VmrecoverError
from .. import Hypervisor, net
from ..net import ssl_context

log = logging.getLogger("vmrecover.vmware")
TIMEOUT = 60.0  # seconds for one SOAP call


def classify(hv: Hypervisor, exc: BaseException) -> VmrecoverError:
    """The user's view of a failure to reach or log in to *hv*."""
    return net.classify(
        hv, exc, login_refused=isinstance(exc, vim.fault.InvalidLogin), console="vCenter",
        ca_example=", e.g. VMCA's root",
    )  # fmt: skip


@dataclass
class VSphere:
    """A logged-in session (see the module doc).  Use as a context manager: it logs out."""

    hv: Hypervisor
    si: Any  # vim.ServiceInstance
    ssl: ssl.SSLContext

    @property
    def content(self) -> Any:
        return self.si.RetrieveContent()

    @property
    def about(self) -> Any:
        return self.content.about

    @property
    def cookie(self) -> str:
        """The session cookie, for the datastore HTTP interface (/folder)."""
        return str(self.si._stub.cookie)

    def close(self) -> None:
        """Log out, then close the SOAP connections (pyvmomi leaves its pool to the garbage collector,
        which in a long-running service is never soon enough)."""
        try:
            self.content.sessionManager.Logout()
        except Exception as exc:  # a dead connection logs out by itself
            log.debug("logout from %s failed: %s", self.hv.name, exc)
        finally:
            self.si._stub.DropConnections()

    def __enter__(self) -> VSphere:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading properties
    def props(self, objs: Iterable[Any], paths: list[str]) -> list[dict[str, Any]]:
        """``paths`` of each of ``objs`` (all of one type), one dict per object in their order;
        unset properties are absent.  ``"obj"`` holds the object itself."""
        objs = list(objs)
        if not objs:
            return []
        pcq = vmodl.query.PropertyCollector
        spec = pcq.FilterSpec(
            objectSet=[pcq.ObjectSpec(obj=o, skip=False) for o in objs],
            propSet=[pcq.PropertySpec(type=type(objs[0]), pathSet=paths, all=False)],
        )
        got = {o._moId: {"obj": o} for o in objs}
        for oc in self._retrieve(spec):
            doc = got.setdefault(oc.obj._moId, {"obj": oc.obj})
            for p in oc.propSet or []:
                doc[p.name] = p.val
        return [got[o._moId] for o in objs]

    def prop(self, obj: Any, path: str, default: Any = None) -> Any:
        return self.props([obj], [path])[0].get(path, default)

    def _retrieve(self, spec: Any) -> Iterator[Any]:
        pc = self.content.propertyCollector
        res = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        while res is not None:
            yield from res.objects or []
            res = pc.ContinueRetrievePropertiesEx(res.token) if res.token else None

    def all_of(self, vim_type: Any, paths: list[str]) -> list[dict[str, Any]]:
        """Every inventory object of *vim_type* with *paths*, through a container view."""
        pcq = vmodl.query.PropertyCollector
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [vim_type], True)
        try:
            spec = pcq.FilterSpec(
                objectSet=[pcq.ObjectSpec(
                    obj=view, skip=True,
                    selectSet=[pcq.TraversalSpec(name="view", path="view", skip=False, type=type(view))],
                )],
                propSet=[pcq.PropertySpec(type=vim_type, pathSet=paths, all=False)],
            )  # fmt: skip
            out = []
            for oc in self._retrieve(spec):
                doc = {"obj": oc.obj}
                for p in oc.propSet or []:
                    doc[p.name] = p.val
                out.append(doc)
            return out
        finally:
            view.Destroy()

    # ------------------------------------------------------------------ objects
    def vm(self, name_or_moref: str) -> Any:
        """A VM by its moref (``vm-42``) or its name (which must be unique)."""
        vms = self.all_of(vim.VirtualMachine, ["name"])
        by_ref = [d["obj"] for d in vms if d["obj"]._moId == name_or_moref]
        if by_ref:
            return by_ref[0]
        by_name = [d["obj"] for d in vms if d.get("name") == name_or_moref]
        if len(by_name) == 1:
            return by_name[0]
        if by_name:
            refs = ", ".join(o._moId for o in by_name)
            raise VmrecoverError(
                f"{len(by_name)} VMs on {self.hv.name} are named {name_or_moref!r} ({refs})",
                hint="name the VM by its moref, e.g. vmware://" + f"{self.hv.name}/{by_name[0]._moId}",
            )
        raise NotFound(f"no VM named {name_or_moref!r} on hypervisor {self.hv.name}")

    def transfer_url(self, url: str) -> str:
        """A URL the server handed out for a transfer (NFC lease, guest file): its host is ``*`` (and
        perhaps a port) when the client is to use the host and port it talks to."""
        parts = urllib.parse.urlsplit(url)
        if parts.hostname == "*":
            host = f"[{self.hv.host}]" if ":" in self.hv.host else self.hv.host
            parts = parts._replace(netloc=f"{host}:{self.hv.port}")
        return urllib.parse.urlunsplit(parts)

    def host(self, name: str | None = None) -> Any:
        """The host named *name* (or by moref), else the first connected one."""
        hosts = self.all_of(vim.HostSystem, ["name", "runtime.connectionState"])
        if name is None:
            ok = [h for h in hosts if h.get("runtime.connectionState") == "connected"]
            if not ok:
                raise Unreachable(f"no connected host on {self.hv.name}")
            return ok[0]["obj"]
        for h in hosts:
            if name in (h.get("name"), h["obj"]._moId):
                return h["obj"]
        have = ", ".join(str(h.get("name")) for h in hosts)
        raise NotFound(f"no host {name!r} on {self.hv.name}", hint=f"hosts: {have}")

    def datacenter(self, obj: Any) -> Any:
        """The datacenter holding *obj* (None on a standalone ESXi without one in its path)."""
        cur = self.prop(obj, "parent")
        while cur is not None and not isinstance(cur, vim.Datacenter):
            cur = self.prop(cur, "parent")
        return cur

    def datacenter_path(self, obj: Any) -> str:
        """The inventory path of *obj*'s datacenter: ``dcPath`` of the /folder interface."""
        dc = self.datacenter(obj)
        if dc is None:
            return "ha-datacenter"
        names, cur = [], dc
        while cur is not None and cur != self.content.rootFolder:
            names.append(self.prop(cur, "name"))
            cur = self.prop(cur, "parent")
        return "/".join(reversed(names))

    def ref(self, vim_type: Any, moref: str) -> Any:
        return vim_type(moref, self.si._stub)

    # ------------------------------------------------------------------ tasks
    def wait(self, task: Any, what: str, *, timeout: float = 3600.0) -> None:
        """Wait for *task*; its error is an Unreachable naming *what* (the caller may catch the
        platform fault first via ``task_error``)."""
        err = self.task_error(task, timeout=timeout)
        if err is not None:
            raise Unreachable(f"{what} failed on {self.hv.name}: {fault_text(err)}")

    def task_error(self, task: Any, *, timeout: float = 3600.0) -> Any:
        """Wait for *task* to end; its fault (a vim.fault object) or None."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            doc = self.props([task], ["info.state", "info.error"])[0]
            state = doc.get("info.state")
            if state == "success":
                return None
            if state == "error":
                return doc.get("info.error")
            if time.monotonic() > deadline:
                raise Unreachable(f"a task on {self.hv.name} did not finish in {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)


def fault_text(fault: Any) -> str:
    """A fault's own message (localizedMessage, msg, or its type)."""
    return str(
        getattr(fault, "localizedMessage", None) or getattr(fault, "msg", None) or type(fault).__name__
    )


def connect(hv: Hypervisor, password: str) -> VSphere:
    """Log in to *hv*; the classified error (unreachable, certificate, login) otherwise."""
    from pyVim.connect import SmartConnect

    ctx = ssl_context(hv)
    try:
        si = SmartConnect(
            host=hv.host, port=hv.port, user=hv.user, pwd=password, sslContext=ctx,
            httpConnectionTimeout=TIMEOUT, disableSslCertValidation=hv.insecure,
        )  # fmt: skip
    except Exception as exc:
        raise classify(hv, exc) from None
    log.info("logged in to %s as %s", hv.name, hv.user)
    return VSphere(hv, si, ctx)


@contextmanager
def session(hv: Hypervisor, password: str) -> Iterator[VSphere]:
    """A logged-in session for the block; a vSphere fault nothing handled becomes an Unreachable
    naming the hypervisor and the fault (no traceback for a server's refusal)."""
    s = connect(hv, password)
    try:
        yield s
    except vmodl.MethodFault as exc:
        raise Unreachable(f"{hv.name} refused an operation: {fault_text(exc)}") from exc
    finally:
        s.close()
