"""A snapshot VDI read over XAPI's HTTP handler ``GET /export_raw_vdi?vdi=&format=raw``, where the pool
has no NBD-enabled network that serves it.

The handler streams the whole disk from its start (no ranges), so reads must come in ascending order
(the pipeline reads chunks in disk order) and whatever lies between them is received and dropped: an
incremental backup over this transport reads the whole disk from the host, and stores only what
changed.  A dropped stream is reopened and skipped to where it was, with backoff; what keeps failing
is a clean ``Unreachable``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import urllib3

from ...errors import Unreachable
from .nbd import BACKOFF, RETRIES
from .session import Xen

log = logging.getLogger("vmrecover.xen")
PIECE = 1 << 20


class ExportSource:
    format = "raw"
    backing_not_read: str | None = None

    def __init__(self, xs: Xen, *, vdi: str, name: str, vdi_uuid: str, size: int, incremental: bool) -> None:
        self.xs = xs
        self.vdi = vdi
        self.name = name
        self.size = size
        self.incremental = incremental
        self.received = 0
        self.path = f"VDI {vdi_uuid} over HTTP /export_raw_vdi from {xs.hv.host}"
        self.files_read = [self.path]
        self.pool = urllib3.HTTPSConnectionPool(
            xs.hv.host, xs.hv.port, maxsize=1, ssl_context=xs.ssl, retries=False,
            assert_hostname=False if xs.hv.insecure else None, timeout=urllib3.Timeout(connect=30, read=300),
        )  # fmt: skip
        self._resp: Any = None
        self._pos = 0  # the offset of the next byte the stream gives

    def data_extents(self) -> Iterator[tuple[int, int]]:
        yield (0, self.size)  # the handler says nothing of holes; zero chunks are found by the pipeline

    def _open(self) -> None:
        query = urlencode({"session_id": self.xs.ref, "vdi": self.vdi, "format": "raw"})
        r = self.pool.request("GET", f"/export_raw_vdi?{query}", preload_content=False)
        if r.status != 200:
            body = r.read(300)
            r.release_conn()
            raise Unreachable(
                f"/export_raw_vdi of disk {self.name} on {self.xs.hv.name}: HTTP {r.status} {body!r}"
            )
        self._resp, self._pos = r, 0

    def _take(self, n: int) -> bytes:
        """The next *n* bytes of the stream, exactly."""
        out = bytearray()
        while len(out) < n:
            piece = self._resp.read(min(PIECE, n - len(out)))
            if not piece:
                raise urllib3.exceptions.ProtocolError(f"the stream ended at byte {self._pos + len(out)}")
            out += piece
        self.received += n
        self._pos += n
        return bytes(out)

    def read(self, offset: int, length: int) -> bytes:
        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            try:
                if self._resp is None or offset < self._pos:
                    self._close_stream()
                    self._open()
                while self._pos < offset:
                    self._take(min(PIECE, offset - self._pos))
                return self._take(length)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                self._close_stream()
                if attempt == RETRIES:
                    raise Unreachable(
                        f"/export_raw_vdi of disk {self.name} failed {RETRIES + 1} times, last: {exc}",
                        hint="check the network and the host; the backup left nothing behind",
                    ) from None
                log.warning(
                    "export of disk %s broke (%s): retry %d in %.1f s", self.name, exc, attempt + 1, delay
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _close_stream(self) -> None:
        if self._resp is not None:  # mid-stream: the connection cannot be reused, it is closed
            self._resp.close()
            self._resp = None

    def close(self) -> None:
        self._close_stream()
        self.pool.close()
