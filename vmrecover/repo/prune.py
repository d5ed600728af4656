"""Retention: which restore points to keep (borg-style keep-last/daily/weekly/monthly, per VM).

A point is kept if any rule keeps it.  keep-daily N keeps the newest point of each of the N most
recent days that have points (weekly: ISO weeks, monthly: calendar months), in the host's local
time, as an administrator reads the calendar.  Deleting a point removes its catalog rows (one
transaction) and then its index directory; the chunks it alone used are freed by ``gc``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ..errors import UsageError
from .catalog import Point
from .repository import Repository


@dataclass(frozen=True)
class Policy:
    last: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def empty(self) -> bool:
        return not (self.last or self.daily or self.weekly or self.monthly)


def _periodic(points: list[Point], n: int, key: Callable[[datetime], object]) -> set[str]:
    kept: set[str] = set()
    seen: set[object] = set()
    for p in points:  # newest first
        k = key(p.created_dt.astimezone())
        if k in seen:
            continue
        if len(seen) >= n:
            break
        seen.add(k)
        kept.add(p.id)
    return kept


def select(points: list[Point], policy: Policy) -> tuple[list[Point], list[Point]]:
    """Split one VM's points into (keep, remove), newest first."""
    if policy.empty():
        raise UsageError("refusing to prune every restore point", hint="give at least one --keep-* option")
    newest = sorted(points, key=lambda p: p.created, reverse=True)
    keep = {p.id for p in newest[: policy.last]}
    keep |= _periodic(newest, policy.daily, lambda t: t.date())
    keep |= _periodic(newest, policy.weekly, lambda t: t.isocalendar()[:2])
    keep |= _periodic(newest, policy.monthly, lambda t: (t.year, t.month))
    return [p for p in newest if p.id in keep], [p for p in newest if p.id not in keep]


def prune(
    repo: Repository, policy: Policy, *, vm: str | None = None, dry_run: bool = False
) -> dict[str, list[Point]]:
    """Apply *policy* to every VM (or one); returns {vm: removed points}.  Caller holds the writer lock.

    Points that a recovery session uses are kept until the session stops."""
    vms = [vm] if vm else [v["name"] for v in repo.catalog.vms()]
    removed: dict[str, list[Point]] = {}
    in_use = {s.point for s in repo.catalog.sessions()}  # a recovery session still reads these
    for name in vms:
        _, drop = select(repo.catalog.points(name), policy)
        drop = [p for p in drop if p.id not in in_use]
        if drop and not dry_run:
            deleted = set(repo.catalog.delete_points([p.id for p in drop]))
            drop = [p for p in drop if p.id in deleted]  # a session may have started meanwhile
            for p in drop:
                shutil.rmtree(repo.index_dir(p.id), ignore_errors=True)
        removed[name] = drop
    return removed
