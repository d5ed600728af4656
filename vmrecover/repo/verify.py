"""Verify restore points: every index is intact and every chunk they use decodes to its digest.

Each distinct chunk is read and checked once, in parallel, however many points share it.  For every
bad chunk the report names each restore point, disk and byte range that uses it, so an operator
knows exactly what is damaged.  A point pruned while verify runs is not damage: its index and chunks
may go (prune, gc) while it is checked; the report lists it as pruned instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptChunk, IntegrityError
from .catalog import Point
from .index import FixedIndex
from .reader import ordered_map, read_pool
from .repository import Repository


@dataclass
class VerifyReport:
    points: int = 0
    disks: int = 0
    chunks: int = 0
    bytes: int = 0
    bad_indexes: list[dict[str, Any]] = field(default_factory=list)
    bad_chunks: list[dict[str, Any]] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)  # points pruned while verify ran ("vm@id")

    @property
    def ok(self) -> bool:
        return not self.bad_indexes and not self.bad_chunks

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **self.__dict__}


def verify(
    repo: Repository,
    points: list[Point],
    *,
    progress_total: Callable[[int], None] = lambda n: None,
    progress: Callable[[int], None] = lambda n: None,
    workers: int | None = None,
) -> VerifyReport:
    report = VerifyReport(points=len(points))
    indexes: list[tuple[Point, str, FixedIndex]] = []
    for p in points:
        for d in repo.catalog.disks(p.id):
            report.disks += 1
            path = repo.index_path(p.id, d.name)
            try:
                idx = FixedIndex.read(path)
                # encode() reproduces the file byte for byte (it parsed, so its checksum held)
                if hashlib.sha256(idx.encode()).hexdigest() != d.index_sha256:
                    raise IntegrityError(f"index file {path} differs from the checksum in the catalog")
            except IntegrityError as exc:
                report.bad_indexes.append({"vm": p.vm, "point": p.id, "disk": d.name, "error": exc.message})
                continue
            indexes.append((p, d.name, idx))
    digests: set[bytes] = set()
    for _, _, idx in indexes:
        digests |= idx.digests()
    report.chunks = len(digests)
    progress_total(len(digests))
    bad: dict[bytes, str] = {}

    def check(d: bytes) -> tuple[bytes, int, str | None]:
        try:
            return d, len(repo.chunks.get(d, check_crc=True)), None
        except CorruptChunk as exc:
            return d, 0, exc.reason

    with read_pool("verify", workers) as pool:
        for d, n, err in ordered_map(pool, check, digests):
            report.bytes += n
            if err is not None:
                bad[d] = err
            progress(1)
    listed = {p.id for p in repo.catalog.points()}
    report.pruned = [f"{p.vm}@{p.id}" for p in points if p.id not in listed]
    report.bad_indexes = [b for b in report.bad_indexes if b["point"] in listed]
    for d, reason in sorted(bad.items()):
        users = []
        for p, disk, idx in indexes:
            if p.id not in listed:
                continue
            pos = idx.positions(d)
            if pos:
                users.append(
                    {"vm": p.vm, "point": p.id, "disk": disk, "ranges": [list(idx.extent(i)) for i in pos]}
                )
        if users:  # else only pruned points used it, and gc freed it: not damage
            report.bad_chunks.append({"digest": d.hex(), "reason": reason, "used_by": users})
    return report
