"""A snapshot VDI read over NBD, as XenServer intends (``VDI.get_nbd_info``), as a
:class:`~vmrecover.ingest.sources.DiskSource`.

``VDI.get_nbd_info`` gives, per host that can serve the VDI, an address, a port, an export name (which
carries a session reference: it is as secret as the session), and the host's TLS certificate with its
subject.  TLS is required; the certificate given is the one trusted (pinned), unless the hypervisor was
added with ``--insecure``.  A dropped connection is reconnected and the read retried with backoff;
what keeps failing is a clean ``Unreachable``.  Bytes received are counted for the benchmark.

Reads are pipelined: while the pipeline stores one chunk, the next ones are NBD read commands in flight
on the same connection (ingest/readahead.py: up to IN_FLIGHT bytes, one command per chunk), so the host
streams instead of waiting for a round trip per chunk.  Each command reads into a buffer of a small
pool that is used again and again: libnbd's Python binding (1.14) never frees a buffer given to
``aio_pread``, so a new one per command would keep every byte read in memory.  A command that fails
drops the connection and what was in flight; the chunk is then read alone, with the retries above.

A full plan reads the allocated areas (NBD ``base:allocation`` block status, where the server offers
it; else the whole disk); an incremental plan reads the changed blocks, and says that the whole disk
holds data, so a fallback to a full read can never store the changes alone.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import Unreachable, VmrecoverError
from ...ingest.extents import merged
from ...ingest.readahead import ReadAhead

log = logging.getLogger("vmrecover.xen")
RETRIES = 5
BACKOFF = 0.5  # seconds, doubled on each retry
STATUS_STEP = 1 << 30  # bytes asked about per NBD block status request
IN_FLIGHT = 16 << 20  # bytes of NBD read commands in flight (4 to 64 commands, one per chunk)


@dataclass(eq=False)
class _Command:
    """An ``aio_pread`` in flight on connection *h*."""

    h: Any
    cookie: int
    buf: Any
    data: bytearray | None = None


class NbdSource:
    format = "raw"
    backing_not_read: str | None = None

    def __init__(
        self, nbd_info: Callable[[], dict[str, Any]], *, name: str, vdi_uuid: str, size: int,
        areas: list[tuple[int, int]] | None, verify: bool, chunk_size: int = 1 << 20,
    ) -> None:  # fmt: skip
        """*nbd_info*: asks the pool where the VDI is served (asked again before a reconnect: an export
        names the session, and a session that expired refuses new connections); *areas*: the changed
        areas of an incremental plan, None for a full one."""
        self._nbd_info = nbd_info
        self.info = nbd_info()
        self.name = name
        self.size = size
        self.verify = verify
        self.changed = areas
        self.received = 0
        self.chunk_size = chunk_size
        self.window = min(64, max(4, IN_FLIGHT // chunk_size))
        self._buffers: dict[int, list[Any]] = {}  # length -> free aio buffers (see the module doc)
        self._allocated_areas: list[tuple[int, int]] | None = None
        self._ahead: ReadAhead[_Command] | None = None
        where = f"{self.info['address']}:{self.info['port']}"
        self.path = f"VDI {vdi_uuid} over NBD from {where}"
        self.files_read = [self.path]
        self._tls = tempfile.TemporaryDirectory(prefix="vmrecover-nbd-tls-")
        self._h: Any = None
        self._lost = False  # a connection was dropped: ask where the disk is served before reconnecting
        try:
            served = self._retrying("connect", lambda h: h.get_size())
        except BaseException:
            self.close()
            raise
        if served < size:
            self.close()
            raise Unreachable(f"NBD export of VDI {vdi_uuid} at {where} has {served} bytes, the VDI {size}")

    def _connect(self) -> None:
        import nbd

        Path(self._tls.name, "ca-cert.pem").write_text(str(self.info.get("cert") or ""))
        h = nbd.NBD()
        h.set_export_name(str(self.info["exportname"]))
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(self._tls.name)
        h.set_tls_verify_peer(self.verify)
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_tcp(str(self.info["address"]), str(self.info["port"]))
        except nbd.Error as exc:
            del h  # libnbd closes a handle when it is collected
            where = f"{self.info['address']}:{self.info['port']}"
            raise Unreachable(
                f"cannot read disk {self.name} over NBD from {where}: {exc}",
                hint="check that the pool's NBD network reaches this appliance and its TLS certificate",
            ) from None
        self._h = h
        self._lost = False

    def _retrying(self, what: str, op: Any) -> Any:
        import nbd

        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            try:
                if self._h is None:
                    if attempt or self._lost:  # where the disk is served now (a new session's export)
                        self.info = self._nbd_info()
                    self._connect()
                return op(self._h)
            except (nbd.Error, Unreachable) as exc:
                err = exc.message if isinstance(exc, VmrecoverError) else str(exc)
                self._drop()
                if attempt == RETRIES:
                    raise Unreachable(
                        f"NBD {what} of disk {self.name} failed {RETRIES + 1} times, last: {err}",
                        hint="check the network and the host; the backup left nothing behind",
                    ) from None
                log.warning("NBD %s of disk %s failed (%s): retry %d in %.1f s", what, self.name, err,
                            attempt + 1, delay)  # fmt: skip
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def data_extents(self) -> Iterator[tuple[int, int]]:
        if self.changed is not None:  # an incremental plan: the changes are not all the data
            yield (0, self.size)
            return
        self._allocated_areas = self._allocated()
        yield from self._allocated_areas

    def _allocated(self) -> list[tuple[int, int]]:
        import nbd

        if not self._retrying("connect", lambda h: h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)):
            return [(0, self.size)]
        out: list[tuple[int, int]] = []
        offset = 0
        while offset < self.size:
            got: list[tuple[int, int]] = []

            def status(h: Any, off: int = offset, into: list[tuple[int, int]] = got) -> None:
                into.clear()

                def cb(meta: str, start: int, entries: list[int], err: Any) -> int:
                    if meta == nbd.CONTEXT_BASE_ALLOCATION:
                        pos = start
                        for length, flags in zip(entries[::2], entries[1::2], strict=True):
                            if not flags & nbd.STATE_HOLE:
                                into.append((pos, length))
                            pos += length
                        into.append((pos, 0))  # where this answer ends
                    return 0

                h.block_status(min(STATUS_STEP, self.size - off), off, cb)

            self._retrying("block status", status)
            end = got[-1][0] if got else offset
            out.extend(a for a in got if a[1])
            if end <= offset:
                return [(0, self.size)]  # a server that says nothing: read it all
            offset = end
        return merged(out, self.size)

    def _issue(self, offset: int, length: int) -> _Command:
        import nbd

        if self._h is None:
            self._retrying("connect", lambda h: None)
        free = self._buffers.setdefault(length, [])
        buf = free.pop() if free else nbd.Buffer(length)
        return _Command(self._h, self._h.aio_pread(buf, offset), buf)

    def _collect(self, c: _Command) -> bytearray:
        import nbd

        if c.data is None:
            if c.h is not self._h:
                raise nbd.Error("the connection this read was sent on is gone", 0)
            while not c.h.aio_command_completed(c.cookie):
                c.h.poll(-1)
            c.data = c.buf.to_bytearray()
            self._buffers[len(c.data)].append(c.buf)  # retired: free to use again
            self.received += len(c.data)
        return c.data

    def _read_alone(self, offset: int, length: int) -> bytes:
        data = self._retrying("read", lambda h: h.pread(length, offset))
        self.received += len(data)
        return bytes(data)

    def read(self, offset: int, length: int) -> bytes:
        import nbd

        if self._ahead is None:
            areas = self.changed if self.changed is not None else self._allocated_areas
            self._ahead = ReadAhead(
                areas or [(0, self.size)], chunk_size=self.chunk_size, size=self.size, window=self.window,
                issue=self._issue, collect=self._collect, request_bytes=self.chunk_size,
            )  # fmt: skip
        try:
            return self._ahead.read(offset, length, self._read_alone)
        except nbd.Error as exc:
            log.warning("NBD read of disk %s failed at %d (%s): reading it alone", self.name, offset, exc)
            self._ahead.clear()
            self._drop()
            return self._read_alone(offset, length)

    def _drop(self) -> None:
        """Disconnect (politely where the connection still works); libnbd frees the handle with it."""
        import nbd

        if self._h is not None:
            with contextlib.suppress(nbd.Error):
                self._h.shutdown()
            self._h = None
            self._lost = True

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.clear()
        self._drop()
        self._tls.cleanup()
