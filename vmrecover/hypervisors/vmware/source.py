"""A vSphere disk as a :class:`~vmrecover.ingest.sources.DiskSource`: the frozen disk of a snapshot,
read over the datastore HTTP interface.

The descriptor (``name.vmdk``, a few hundred bytes of text) names the extent holding the bytes
(``name-flat.vmdk``); only flat extents can be read this way (``VMFS``/``FLAT``: thick and thin disks
on VMFS and NFS datastores).  A delta (someone else's snapshot under ours), a vSAN or VVol disk, or a
descriptor with several extents is refused with an explanation.

The pipeline reads whole chunks in disk order; while it hashes and compresses one, this source has
the next ones (of the extents it was told to read) in flight (ingest/readahead.py): ``window`` HTTP
ranges at once, each of up to 4 MiB of adjacent chunks (fewer, larger requests cost the host and the
client less per byte: about a third less CPU on the simulator between 1 MiB and 4 MiB ranges).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ...errors import BadInput
from ...ingest.readahead import ReadAhead
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
        self._pool = ThreadPoolExecutor(window, thread_name_prefix=f"vmdk-{disk.name}")
        self._ahead: ReadAhead[Future[bytes]] = ReadAhead(
            areas, chunk_size=chunk_size, size=self.size, window=window,
            issue=lambda off, n: self._pool.submit(self.files.read, self.flat, off, n),
            collect=lambda fut: fut.result(), drop=lambda fut: fut.cancel(),
        )  # fmt: skip

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """Where the disk holds data: the allocated areas; for an incremental plan the whole disk (its
        areas are only the changes: should the pipeline read it whole after all, a disk of the changes
        alone would silently lose everything else)."""
        if self.incremental:
            yield (0, self.size)
        else:
            yield from self.areas

    def read(self, offset: int, length: int) -> bytes:
        return self._ahead.read(offset, length, lambda o, n: self.files.read(self.flat, o, n))

    def close(self) -> None:
        self._ahead.clear()
        self._pool.shutdown(wait=True)
