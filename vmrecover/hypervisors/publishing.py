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

from ..recovery import exports, sessions
from ..repo.catalog import Session
from ..repo.repository import Repository

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
