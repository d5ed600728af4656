"""How a recovery session is laid out for a XenServer / XCP-ng NFS storage repository.

XenServer's NFS SR driver (xapi-project/sm, ``NFSSR`` on ``FileSR``) mounts ``<serverpath>/<SR uuid>``
and takes every ``<uuid>.raw`` file there as a raw VDI (type ``aio``) and every ``<uuid>.vhd`` as a
VHD one, the VDI's UUID being the file name.  It also writes a few files of its own there (a
writability probe, ``sm-hardlink.conf``).  So a session published on a pool gets, inside its folder,

::

    recover/<session>/<SR uuid>/                  a real folder (the driver's own files go there)
    recover/<session>/<SR uuid>/<VDI uuid>.raw    each disk of the session: the same file as
                                                  recover/<session>/<disk>.raw (one overlay)

with ``serverpath`` = ``/vmrecover/recover/<session>``.  Raw, not VHD: the driver sizes a raw VDI by
its file, and tapdisk then reads and writes it as the plain disk, so nothing but the disk's own bytes
crosses the wire.  The UUIDs are derived from the repository's and the session's ids, so the vfs
(FUSE and NFS alike) and the code that attaches the SR agree without storing anything, and a retried
``recover start`` finds the same SR and VDIs again.  A VDI file the driver removes (what it does to
the source of a storage migration) is only hidden from the SR folder: the session keeps its disk.
"""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("5b0f2f62-3c55-4c49-9d4e-766d7265636f")  # fixed: changing it renames every SR
RAW = ".raw"
HIDDEN = ".vmrecover-removed-"  # + "<VDI uuid>": a VDI file the SR driver removed


def sr_uuid(repo_id: str, session_id: str) -> str:
    """The UUID of the SR that shows recovery session *session_id* of repository *repo_id*."""
    return str(uuid.uuid5(_NAMESPACE, f"sr/{repo_id}/{session_id}"))


def vdi_uuid(repo_id: str, session_id: str, disk: str) -> str:
    """The UUID of the VDI that is disk *disk* of that session."""
    return str(uuid.uuid5(_NAMESPACE, f"vdi/{repo_id}/{session_id}/{disk}"))


def vdi_file(repo_id: str, session_id: str, disk: str) -> str:
    return vdi_uuid(repo_id, session_id, disk) + RAW
