"""The snapshots vmrecover makes on a hypervisor for a backup, whatever the platform: their names, the
owner written into their description, when one is a leftover that a later backup may remove, and when
a disk's change-tracking chain from the previous point is broken (:func:`why_full`).

Ours, and only ours, are named ``vmrecover-…``.  The description names the owner: repository, host,
pid and boot id.  A later backup of the same repository removes one only once its maker is gone (its
pid on its boot, or another boot of the machine), or when it is older than any backup runs: another
backup of the VM may be reading it right now.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

from ..repo.catalog import Point
from ..repo.repository import Repository

PREFIX = "vmrecover-"  # our snapshots, and only ours, carry this name
STALE_AFTER = timedelta(days=1)  # a vmrecover snapshot older than this is a leftover, whoever made it


def new_name() -> str:
    return f"{PREFIX}{secrets.token_hex(4)}"


def owner(repo: Repository) -> dict[str, Any]:
    """Who makes a snapshot: written into its description, so that a later backup can tell a crash's
    leftover (its process is gone) from a snapshot another backup is reading right now."""
    return {"repo": repo.config.id, "host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id()}


def description(who: dict[str, Any]) -> str:
    return f"made by vmrecover for a backup; removed when it ends; owner={json.dumps(who)}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def stale(text: str, created: datetime | None, me: dict[str, Any]) -> str | None:
    """Why our snapshot with description *text*, made at *created*, is a leftover that may be removed,
    or None while it may be in use."""
    try:
        who = json.loads(str(text or "").split("owner=", 1)[1])
    except (IndexError, ValueError):
        who = {}
    if created is not None and datetime.now(UTC) - created > STALE_AFTER:
        return f"made {created:%Y-%m-%d %H:%M} UTC, longer ago than any backup runs"
    if who.get("host") == me["host"] and who.get("repo") == me["repo"]:
        if who.get("boot") != me["boot"]:
            return "its maker ran before this machine last started"
        if not os.path.exists(f"/proc/{who.get('pid')}"):
            return f"its maker (pid {who.get('pid')}) is gone"
    return None


def why_full(
    *, full: bool, fresh: bool, latest: Point | None, same_vm: bool, prev: Any, size: int, token: str
) -> str | None:
    """Why a disk must be read whole rather than by its changes since the VM's *latest* point (None:
    the chain holds, as far as the repository can tell; the hypervisor may still refuse it).  *prev* is
    the latest point's disk of that name (None if it has none); *token* names the platform's change
    token for the message ("changeId", "base snapshot")."""
    return (
        "--full" if full
        else "changed block tracking was just enabled" if fresh
        else "the VM has no earlier point" if latest is None
        else "the latest point is not of this VM" if not same_vm
        else "the latest point has no such disk" if prev is None
        else "the disk's size changed" if prev.size != size
        else f"the latest point has no {token} for it" if not prev.change_token
        else None
    )  # fmt: skip
