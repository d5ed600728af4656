"""A vSphere disk as a :class:`~vmrecover.ingest.sources.DiskSource`: the frozen disk of a snapshot,
read over the datastore HTTP interface.

The descriptor (``name.vmdk``, a few hundred bytes of text) names the extent holding the bytes
(``name-flat.vmdk``); only flat extents can be read this way (``VMFS``/``FLAT``: thick and thin disks
on VMFS and NFS datastores).  A delta (someone else's snapshot under ours), a vSAN or VVol disk, or a
descriptor with several extents is refused with an explanation.

The pipeline reads whole chunks in disk order; while it hashes and compresses one, this source has
the next ones (of the extents it was told to read) in flight: ``window`` HTTP ranges at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ...errors import BadInput
from ...vfs.formats import vmdk_extents
from .hardware import DiskInfo
from .http import DatastoreFiles, DsPath

log = logging.getLogger("vmrecover.vmware")
FLAT_TYPES = {"VMFS", "FLAT"}


class VmdkSource:
    format = "vmdk"
    backing_not_read: str | None = None

    def __init__(
        self, files: DatastoreFiles, disk: DiskInfo, areas: list[tuple[int, int]], *, chunk_size: int,
        window: int = 4,
    ) -> None:  # fmt: skip
        self.files = files
        self.disk = disk
        self.path = disk.file
        self.size = disk.capacity
        self.areas = areas  # what will be read (allocated or changed areas), ascending
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
        self._pool = ThreadPoolExecutor(window, thread_name_prefix=f"vmdk-{disk.name}")
        self._ahead: dict[tuple[int, int], Future[bytes]] = {}
        self.window = window

    def data_extents(self) -> Iterator[tuple[int, int]]:
        yield from self.areas

    def _chunks_after(self, offset: int) -> Iterator[tuple[int, int]]:
        """The (offset, length) of the chunks the pipeline will read after the one at *offset*:
        every chunk touching an area, in order."""
        cs = self.chunk_size
        last = offset // cs
        for a, n in self.areas:
            for i in range(max(a // cs, last + 1), (a + n - 1) // cs + 1):
                last = i
                yield i * cs, min(cs, self.size - i * cs)

    def read(self, offset: int, length: int) -> bytes:
        key = (offset, length)
        fut = self._ahead.pop(key, None)
        if fut is None:
            for stale in self._ahead.values():  # reads went elsewhere: drop what was fetched ahead
                stale.cancel()
            self._ahead.clear()
        if len(self._ahead) < self.window:
            have = set(self._ahead)
            for nxt in self._chunks_after(offset):
                if len(self._ahead) >= self.window:
                    break
                if nxt not in have:
                    self._ahead[nxt] = self._pool.submit(self.files.read, self.flat, *nxt)
        return fut.result() if fut is not None else self.files.read(self.flat, offset, length)

    def close(self) -> None:
        for fut in self._ahead.values():
            fut.cancel()
        self._pool.shutdown(wait=True)
