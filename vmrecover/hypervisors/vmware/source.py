"""A vSphere disk as a :class:`~vmrecover.ingest.sources.DiskSource`: the frozen disk of a snapshot,
read over the datastore HTTP interface.

The descriptor (``name.vmdk``, a few hundred bytes of text) names the extent holding the bytes
(``name-flat.vmdk``); only flat extents can be read this way (``VMFS``/``FLAT``: thick and thin disks
on VMFS and NFS datastores).  A delta (someone else's snapshot under ours), a vSAN or VVol disk, or a
descriptor with several extents is refused with an explanation.

The pipeline reads whole chunks in disk order; while it hashes and compresses one, this source has
the next ones (of the extents it was told to read) in flight: ``window`` HTTP ranges at once, each of
up to REQUEST_BYTES of adjacent chunks (fewer, larger requests cost the host and the client less per
byte: about a third less CPU on the simulator between 1 MiB and 4 MiB ranges).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ...errors import BadInput
from ...vfs.formats import vmdk_extents
from .hardware import DiskInfo
from .http import DatastoreFiles, DsPath

log = logging.getLogger("vmrecover.vmware")
FLAT_TYPES = {"VMFS", "FLAT"}
REQUEST_BYTES = 4 << 20  # adjacent chunks are asked for together, up to this much in one GET


class VmdkSource:
    format = "vmdk"
    backing_not_read: str | None = None

    def __init__(
        self, files: DatastoreFiles, disk: DiskInfo, areas: list[tuple[int, int]], *, chunk_size: int,
        incremental: bool, window: int = 4,
    ) -> None:  # fmt: skip
        self.files = files
        self.disk = disk
        self.path = disk.file
        self.size = disk.capacity
        self.areas = areas  # what will be read (allocated or changed areas), ascending
        self.incremental = incremental  # *areas* are the changes since the parent point, not the data
        self.chunk_size = chunk_size
        descriptor = DsPath.parse(disk.file)
        if disk.chained:
            raise BadInput(
                f"disk {disk.name} ({disk.file}) is a delta of a snapshot vmrecover did not make: its bytes "
                "are spread over a chain that the datastore HTTP interface cannot read as one disk",
                hint="delete or consolidate the VM's other snapshots, then back it up again",
            )
        try:
            extents = vmdk_extents(files.get(descriptor, limit=64 * 1024))
        except ValueError as exc:
            raise BadInput(f"disk {disk.name} ({disk.file}): {exc}") from None
        if len(extents) != 1 or extents[0][2] not in FLAT_TYPES:
            kinds = ", ".join(f"{e[2]} {e[3]}" for e in extents) or "none"
            raise BadInput(
                f"disk {disk.name} ({disk.file}) is not one flat extent (it has: {kinds}); vmrecover reads "
                "flat disks of VMFS and NFS datastores over HTTP",
                hint="vSAN, VVol and hosted sparse disks need another transport (not yet available)",
            )
        self.flat = descriptor.sibling(extents[0][3])
        self.files_read = [str(self.flat)]
        self._area_ends = [a + n for a, n in areas]
        self._pool = ThreadPoolExecutor(window, thread_name_prefix=f"vmdk-{disk.name}")
        # chunk (offset, length) -> the request that fetches it, and where in that request's bytes
        self._ahead: dict[tuple[int, int], tuple[Future[bytes], int]] = {}
        self.window = window
        self.span = max(1, REQUEST_BYTES // chunk_size)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """Where the disk holds data: the allocated areas; for an incremental plan the whole disk (its
        areas are only the changes: should the pipeline read it whole after all, a disk of the changes
        alone would silently lose everything else)."""
        if self.incremental:
            yield (0, self.size)
        else:
            yield from self.areas

    def _chunks_after(self, offset: int) -> Iterator[tuple[int, int]]:
        """The (offset, length) of the chunks the pipeline will read after the one at *offset*:
        every chunk touching an area, in order."""
        cs = self.chunk_size
        last = offset // cs
        for a, n in self.areas[bisect.bisect_right(self._area_ends, offset) :]:
            for i in range(max(a // cs, last + 1), (a + n - 1) // cs + 1):
                last = i
                yield i * cs, min(cs, self.size - i * cs)

    def _requests_after(self, offset: int) -> Iterator[list[tuple[int, int]]]:
        """The chunks after *offset*, grouped into requests of up to ``span`` adjacent chunks."""
        group: list[tuple[int, int]] = []
        for o, n in self._chunks_after(offset):
            if group and (group[-1][0] + group[-1][1] != o or len(group) == self.span):
                yield group
                group = []
            group.append((o, n))
        if group:
            yield group

    def _fetch(self, group: list[tuple[int, int]]) -> bytes:
        start, end = group[0][0], group[-1][0] + group[-1][1]
        return self.files.read(self.flat, start, end - start)

    def _fill(self, offset: int) -> None:
        """Keep ``window`` requests in flight over the chunks after *offset* (and after those already
        asked for)."""
        inflight = {id(f) for f, _ in self._ahead.values()}
        if len(inflight) >= self.window:
            return
        for group in self._requests_after(max([offset, *(o for o, _ in self._ahead)])):
            fut = self._pool.submit(self._fetch, group)
            for o, n in group:
                self._ahead[(o, n)] = (fut, o - group[0][0])
            inflight.add(id(fut))
            if len(inflight) >= self.window:
                break

    def read(self, offset: int, length: int) -> bytes:
        got = self._ahead.pop((offset, length), None)
        if got is None:  # reads went elsewhere: drop what was asked for ahead
            for fut, _ in self._ahead.values():
                fut.cancel()
            self._ahead.clear()
        self._fill(offset)
        if got is None:
            return self.files.read(self.flat, offset, length)
        fut, pos = got
        data = fut.result()
        return data if pos == 0 and len(data) == length else data[pos : pos + length]

    def close(self) -> None:
        for fut, _ in self._ahead.values():
            fut.cancel()
        self._pool.shutdown(wait=True)
