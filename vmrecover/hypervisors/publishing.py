"""What every platform's instant recovery shares: a session published on a hypervisor.

A platform module (``vmware/recovery.py``, ``xen/recovery.py``) publishes a recovery session by
making the repository's NFS export reachable (recovery/exports.py), attaching it to its hypervisor
and creating the VM there.  What it did is the session's *target* (``sessions.set_target``: a JSON
record with a ``platform`` key, kept beside the session and never shown over NFS); this module holds
the rules that do not depend on the platform:

- the address of this appliance a host mounts the export from (the route towards that host);
- undo on failure: steps register their undo, which run in reverse, each attempted;
- release: a session's target is forgotten, and the export stops when no session of *any* platform
  is published any more.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import BadInput, VmrecoverError
from ..recovery import exports, sessions
from ..repo.catalog import Point, Session
from ..repo.repository import Repository
from . import Hypervisor, Registry, require

log = logging.getLogger("vmrecover.recovery")


def route_address(to: str) -> str:
    """The address of this machine that *to* is reached from (what the host will mount)."""
    with socket.socket(socket.AF_INET6 if ":" in to else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((to, exports.NFS_PORT))
        return str(s.getsockname()[0])


def targets(repo: Repository, platform: str | None = None) -> list[tuple[Session, dict[str, Any]]]:
    """Every published session with its target (of *platform* only, if given)."""
    out = []
    for s in repo.catalog.sessions():
        doc = sessions.target(repo, s)
        if doc is not None and (platform is None or doc.get("platform") == platform):
            out.append((s, doc))
    return out


@contextlib.contextmanager
def undo_on_failure() -> Iterator[list[tuple[str, Callable[[], None]]]]:
    """Steps register their undo; if the block fails, the undos run in reverse, each attempted."""
    undo: list[tuple[str, Callable[[], None]]] = []
    try:
        yield undo
    except BaseException:
        for what, fn in reversed(undo):
            try:
                fn()
            except Exception as exc:
                log.error("could not undo %s: %s", what, exc)
        raise


def forget(repo: Repository, session: Session) -> None:
    """Forget where *session* is published; stop the NFS export when no other session (of any
    platform) needs it, also when the hypervisor side could not be undone (``recover stop --force``)."""
    if not any(s.id != session.id for s, _ in targets(repo)):
        exports.stop(repo.root)
    sessions.set_target(repo, session, None)


# ------------------------------------------------------------------ what the CLI and the API both do
# ``recover start --to``, ``recover stop`` and ``recover migrate --to-datastore|--to-sr`` of the CLI and
# the API's sessions routes are these functions: one implementation, whoever asks.
def platform(scheme: str) -> Any:
    """The instant recovery module of a platform (vmware, xen; qemu on the appliance): published,
    publish, unpublish, migrate (not qemu's)."""
    if scheme == "qemu":
        from ..recovery import qemu_run

        return qemu_run
    if scheme == "xen":
        from .xen import recovery
    else:
        from .vmware import recovery  # type: ignore[no-redef]
    return recovery


def hypervisor(repo: Repository, url: str) -> Hypervisor:
    """The registered hypervisor of *url* (``vmware://NAME`` or ``xen://NAME``)."""
    hv, _ = Registry(repo.root).target(url, vm=False)
    require(hv, "instant recovery on a hypervisor", "vmware", "xen")
    return hv


@contextlib.contextmanager
def connect(repo: Repository, hv: Hypervisor) -> Iterator[Any]:
    """A logged-in session on *hv* (its password from the registry)."""
    if hv.scheme == "xen":
        from .xen.session import session
    else:
        from .vmware.session import session  # type: ignore[assignment]

    with session(hv, Registry(repo.root).password(hv)) as conn:
        yield conn


def published(repo: Repository, session: Session) -> tuple[Any, Any] | None:
    """(platform module, target) of a session published on a hypervisor, else None."""
    doc = sessions.target(repo, session)
    if doc is None:
        return None
    recovery = platform(str(doc.get("platform")))
    return recovery, recovery.published(repo, session)


def left_behind(doc: dict[str, Any]) -> str:
    """What a session published on a hypervisor may have left there (what --force leaves to the admin)."""
    if doc.get("platform") == "qemu":
        return f"its qemu process (pid {doc.get('pid')}) on this appliance"
    if doc.get("platform") == "xen":
        return (f"VM {doc.get('vm_name') or '-'} ({doc.get('vm') or 'not created'}) and SR "
                f"{doc.get('sr_name')} ({doc.get('sr')}) on {doc.get('hypervisor')}")  # fmt: skip
    return (f"VM {doc.get('vm')} ({doc.get('vm_name')}) on host {doc.get('host')} of "
            f"{doc.get('hypervisor')}, datastore {doc.get('datastore')}")  # fmt: skip


def start_on(
    repo: Repository, point: Point, url: str, *, name: str | None = None, host: str | None = None,
    datastore_name: str | None = None, power_on: bool = False, passphrase: str | None = None,
) -> Session:  # fmt: skip
    """A new recovery session of *point* published on the hypervisor of *url*; nothing of it stays
    (here or there) if that fails or is interrupted."""
    hv = hypervisor(repo, url)
    if hv.scheme == "xen":
        if host or datastore_name:
            raise BadInput("--host and --datastore-name are vSphere's", hint="a pool needs neither")
        from .xen.restore import check_point

        check_point(point)  # before anything is made
    session = sessions.start(repo, point, name)
    recovery = platform(hv.scheme)
    try:
        with connect(repo, hv) as conn:
            extra = {} if hv.scheme == "xen" else {"host": host, "datastore_name": datastore_name}
            recovery.publish(repo, conn, session, point, power_on=power_on, passphrase=passphrase, **extra)
    except BaseException:
        with contextlib.suppress(Exception):
            unpublish(repo, session)  # (published, then interrupted: undone as by stop)
        sessions.stop(repo, session.name)
        raise
    return session


def unpublish(repo: Repository, session: Session) -> None:
    """Undo what :func:`start_on` did on the hypervisor, if it did anything."""
    found = published(repo, session)
    if found is None:
        return
    recovery, target = found
    if target.platform == "qemu":  # on the appliance: no hypervisor to log in to
        recovery.unpublish(repo, None, session, target)
        return
    with connect(repo, Registry(repo.root).get(target.hypervisor)) as conn:
        recovery.unpublish(repo, conn, session, target)


def stop(repo: Repository, name: str, *, force: bool = False) -> Session:
    """End session *name*: undone on its hypervisor first (if published); with *force*, dropped here
    even if that fails (what is left there is logged)."""
    session = repo.catalog.session(name)
    try:
        unpublish(repo, session)
    except VmrecoverError as exc:
        left = left_behind(sessions.target(repo, session) or {})
        if not force:
            err = VmrecoverError(
                f"cannot undo session {session.name} on its hypervisor: {exc.message}",
                hint=f"fix that and stop it again, or force it (recover stop {name} --force): drop the "
                f"session here and remove {left} yourself",
            )
            err.exit_code = exc.exit_code
            raise err from None
        log.warning("dropping session %s anyway (forced); left on the hypervisor: %s", session.name, left)
        forget(repo, session)
    return sessions.stop(repo, name)


def migrate_off(
    repo: Repository, name: str, *, datastore: str | None = None, sr: str | None = None
) -> dict[str, Any]:
    """Move the VM of session *name* off the appliance (vSphere: to *datastore*; XenServer: to *sr*),
    then end the session; what was done."""
    plat, option, dest = ("xen", "--to-sr", sr) if sr else ("vmware", "--to-datastore", datastore)
    assert dest
    session = repo.catalog.session(name)
    found = published(repo, session)
    if found is None or found[1].platform != plat:
        scheme = {"xen": "xen://POOL", "vmware": "vmware://HYPERVISOR"}[plat]
        where = "XenServer pool" if plat == "xen" else "vSphere host"
        raise BadInput(
            f"session {session.name} does not run on a {where}",
            hint=f"{option} is for sessions started with --to {scheme}; use --to PATH for a disk image",
        )
    recovery, target = found
    with connect(repo, Registry(repo.root).get(target.hypervisor)) as conn:
        moved = recovery.migrate(repo, conn, session, target, dest)
    sessions.stop(repo, session.name)
    where = "datastore" if plat == "vmware" else "sr"
    return {"session": session.name, "platform": plat, "hypervisor": target.hypervisor, "vm": target.vm,
            "vm_name": target.vm_name, where: dest, **(moved or {})}  # fmt: skip
