"""Files back into a running guest, through VMware Tools' guest operations (no network path to the
guest is needed, only the vSphere API).

``InitiateFileTransferToGuest`` returns a URL (its host is ``*`` when the client must use the one it
talks to) to which the file is PUT; folders are made with ``MakeDirectoryInGuest``.  POSIX guests keep
each file's mode and modification time; Windows guests keep the time.  Symlinks cannot be created
this way: they are reported as skipped.  The guest's credentials are a guest account's (never the
hypervisor's), and like every secret they come from the terminal, standard input or the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from pyVmomi import vim

from ...errors import AuthError, BadInput, NotFound, Unreachable
from .session import VSphere, fault_text

log = logging.getLogger("vmrecover.vmware")


@dataclass
class Item:
    local: Path  # the copied-out file or folder on this machine
    guest_path: str  # where it goes in the guest


class GuestFiles:
    """Guest file operations on one VM with one guest account."""

    def __init__(self, vs: VSphere, vm: Any, user: str, password: str) -> None:
        self.vs = vs
        self.vm = vm
        self.auth = vim.vm.guest.NamePasswordAuthentication(
            username=user, password=password, interactiveSession=False
        )
        self.fm = vs.content.guestOperationsManager.fileManager
        family = vs.prop(vm, "guest.guestFamily")
        self.windows = family == "windowsGuest"
        self.pool = urllib3.PoolManager(ssl_context=vs.ssl, assert_hostname=False if vs.hv.insecure else None)

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(self.vm, self.auth, *args, **kw)
        except vim.fault.InvalidGuestLogin:
            raise AuthError(
                f"the guest of VM {self.vm._moId} refused the login",
                hint="check --guest-user and its password",
            ) from None
        except (vim.fault.GuestOperationsUnavailable, vim.fault.ToolsUnavailable):
            raise Unreachable(
                f"guest operations are unavailable on VM {self.vm._moId}",
                hint="the VM must be running with VMware Tools (or open-vm-tools) started",
            ) from None
        except vim.fault.FileAlreadyExists:
            raise BadInput(f"{what} exists in the guest", hint="add --overwrite to replace it") from None
        except vim.fault.FileFault as exc:
            raise BadInput(f"{what} in the guest: {fault_text(exc)}") from None

    def mkdir(self, guest_path: str) -> None:
        with contextlib.suppress(BadInput):  # it exists: files go into it
            self._call(guest_path, self.fm.MakeDirectoryInGuest, directoryPath=guest_path,
                       createParentDirectories=True)  # fmt: skip

    def put(self, local: Path, guest_path: str, *, overwrite: bool) -> None:
        st = local.stat()
        attrs: Any
        if self.windows:
            attrs = vim.vm.guest.FileManager.WindowsFileAttributes(modificationTime=_when(st.st_mtime))
        else:
            attrs = vim.vm.guest.FileManager.PosixFileAttributes(
                permissions=stat.S_IMODE(st.st_mode), modificationTime=_when(st.st_mtime)
            )
        url = self._call(
            guest_path, self.fm.InitiateFileTransferToGuest, guestFilePath=guest_path, fileAttributes=attrs,
            fileSize=st.st_size, overwrite=overwrite,
        )  # fmt: skip
        url = self.vs.transfer_url(url)
        with open(local, "rb") as f:
            try:
                r = self.pool.request("PUT", url, body=f, headers={"Content-Length": str(st.st_size)},
                                      timeout=urllib3.Timeout(connect=30, read=600))  # fmt: skip
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise Unreachable(f"sending {guest_path} into the guest failed: {exc}") from None
        if r.status not in (200, 201, 204):
            raise Unreachable(f"sending {guest_path} into the guest: HTTP {r.status} {r.data[:200]!r}")

    def send(self, items: list[Item], *, overwrite: bool) -> list[dict[str, Any]]:
        """Every file and folder of *items* into the guest (folders recursively)."""
        sep = "\\" if self.windows else "/"
        out: list[dict[str, Any]] = []
        for item in items:
            parent = item.guest_path.rstrip(sep).rpartition(sep)[0]
            if parent and not parent.endswith(":"):  # "C:" is a drive, not a folder to make
                self.mkdir(parent)
            todo = [(item.local, item.guest_path)]
            while todo:
                local, guest = todo.pop(0)
                if local.is_symlink():
                    out.append(
                        {
                            "guest_path": guest,
                            "kind": "symlink",
                            "sent": False,
                            "why": "symlinks cannot be sent",
                        }
                    )
                elif local.is_dir():
                    self.mkdir(guest)
                    out.append({"guest_path": guest, "kind": "dir", "sent": True})
                    todo.extend((p, guest.rstrip(sep) + sep + p.name) for p in sorted(local.iterdir()))
                else:
                    self.put(local, guest, overwrite=overwrite)
                    out.append(
                        {"guest_path": guest, "kind": "file", "sent": True, "size": local.stat().st_size}
                    )
        self.pool.clear()
        return out


def _when(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def restore_into_vm(
    root: Path, url: str, target: str, paths: list[str], *, user: str, password: str,
    guest_dir: str | None, overwrite: bool, fetch: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """Copy *paths* of point *target* (VM@POINT) out through the file-restore service (*fetch*: a
    request to it, as the CLI or the API makes it) into private scratch space of the repository *root*,
    then into the running guest of *url* (``vmware://HYPERVISOR/VM``) with the guest account *user*
    (into *guest_dir* if given, else where they were).  What was sent, per item."""
    import posixpath
    import shutil
    import tempfile

    from .. import Registry, require
    from .session import session

    if not (root / "repo.toml").is_file():
        raise NotFound(f"no vmrecover repository at {root}", hint="give the repository with --repo")
    registry = Registry(root)
    hv, vm_ref = registry.target(url, vm=True)
    require(hv, "putting files into a guest", "vmware")
    run = root / "run"  # private scratch space on the repository's disk
    run.mkdir(mode=0o700, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="into-vm-", dir=run))
    try:
        doc = fetch({"op": "get", "target": target, "paths": paths, "to": str(work), "tar": False,
                     "overwrite": False})  # fmt: skip
        items = []
        for w in doc["written"]:
            guest = w["guest_path"]
            if guest_dir:
                guest = posixpath.join(guest_dir, posixpath.basename(guest.rstrip("/")) or "root")
            items.append(Item(Path(w["to"]), guest))
        with session(hv, registry.password(hv)) as vs:
            sent = GuestFiles(vs, vs.vm(vm_ref), user, password).send(items, overwrite=overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"vm": doc["vm"], "point": doc["point"], "into": url, "sent": sent}
