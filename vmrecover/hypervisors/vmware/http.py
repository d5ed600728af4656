"""The datastore HTTP interface of vCenter and ESXi: ``/folder/<path>?dcPath=<dc>&dsName=<ds>``.

GET with a ``Range`` header reads any part of a datastore file (Proxmox's ESXi importer reads disks
this way); PUT writes a whole file.  The session cookie of the SOAP login authorizes both.

This is the disk transport of VMware backups, kept behind :class:`DatastoreFiles` so that an NBD
(VDDK-style) transport can take its place later.  It keeps connections alive (one pool), lets
several ranges be in flight (the disk source reads ahead), retries a failed request with backoff,
checks that every range came back whole, and counts the bytes it received.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import urllib3

from ...errors import NotFound, Unreachable
from .session import VSphere

log = logging.getLogger("vmrecover.vmware.http")
RETRIES = 5
BACKOFF = 0.5  # seconds, doubled on each retry


@dataclass(frozen=True)
class DsPath:
    """A datastore path: ``[datastore] folder/file.vmdk``."""

    datastore: str
    path: str

    @classmethod
    def parse(cls, text: str) -> DsPath:
        m = re.fullmatch(r"\[([^\]]+)\]\s*(.*)", text)
        if not m:
            raise ValueError(f"not a datastore path: {text!r}")
        return cls(m.group(1), m.group(2))

    def sibling(self, name: str) -> DsPath:
        folder = self.path.rpartition("/")[0]
        return DsPath(self.datastore, f"{folder}/{name}" if folder else name)

    def __str__(self) -> str:
        return f"[{self.datastore}] {self.path}"


class DatastoreFiles:
    """Files of the datastores of one datacenter, over HTTPS (see the module doc).  Thread-safe."""

    def __init__(self, vs: VSphere, datacenter: str, *, connections: int = 4) -> None:
        self.vs = vs
        self.datacenter = datacenter
        self.pool = urllib3.HTTPSConnectionPool(
            vs.hv.host, vs.hv.port, maxsize=connections, block=True, ssl_context=vs.ssl,
            assert_hostname=False if vs.hv.insecure else None,
            timeout=urllib3.Timeout(connect=30, read=120), retries=False,
        )  # fmt: skip
        self._lock = threading.Lock()
        self.received = 0  # bytes of response bodies, for the benchmark's "bytes read" figure
        self.sent = 0

    def close(self) -> None:
        self.pool.close()

    def _url(self, p: DsPath) -> str:
        return f"/folder/{quote(p.path)}?" + urlencode({"dcPath": self.datacenter, "dsName": p.datastore})

    def _request(
        self, method: str, p: DsPath, *, headers: dict[str, str] | None = None, body: bytes | None = None,
        accept: Callable[[urllib3.BaseHTTPResponse], str | None] = lambda r: None,
    ) -> urllib3.BaseHTTPResponse:  # fmt: skip
        """One request, retried with backoff (the only retry loop) on a network error, a 5xx, or an
        answer *accept* finds wanting (it says why; None: good).  Any other 4xx is the caller's."""
        hdrs = {"Cookie": self.vs.cookie, **(headers or {})}
        delay = BACKOFF
        for attempt in range(RETRIES + 1):
            try:
                r = self.pool.request(method, self._url(p), headers=hdrs, body=body, preload_content=True)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                err: str | None = str(exc)
            else:
                with self._lock:
                    self.received += len(r.data)  # every byte that came in, retries too
                    self.sent += len(body or b"")
                err = f"HTTP {r.status}" if r.status >= 500 else accept(r) if r.status < 300 else None
                if err is None:
                    return r
            if attempt == RETRIES:
                raise Unreachable(
                    f"{method} {p} on {self.vs.hv.name} failed {RETRIES + 1} times, last: {err}",
                    hint="check the network and the host; the backup left nothing behind",
                )
            log.warning("%s %s failed (%s): retry %d in %.1f s", method, p, err, attempt + 1, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _refused(self, method: str, p: DsPath, r: urllib3.BaseHTTPResponse) -> Exception:
        if r.status == 404:
            return NotFound(f"{p} does not exist on {self.vs.hv.name}")
        return Unreachable(f"{method} {p} on {self.vs.hv.name}: HTTP {r.status} {r.data[:200]!r}")

    def get(self, p: DsPath, limit: int = 1 << 20) -> bytes:
        """A whole small file (a descriptor, a .vmx)."""
        r = self._request("GET", p)
        if r.status != 200:
            raise self._refused("GET", p, r)
        if len(r.data) > limit:
            raise Unreachable(f"{p} on {self.vs.hv.name} has {len(r.data)} bytes, over {limit}")
        return r.data

    def read(self, p: DsPath, offset: int, length: int) -> bytes:
        """Exactly *length* bytes at *offset*: a 206 whose Content-Range and body are that range (or a
        200 from a server ignoring Range at offset 0); anything else is retried."""
        end = offset + length - 1
        want = f"bytes {offset}-{end}/"

        def whole(r: urllib3.BaseHTTPResponse) -> str | None:
            got = r.headers.get("Content-Range", "")
            if r.status == 206 and len(r.data) == length and got.startswith(want):
                return None
            if r.status == 200 and offset == 0 and len(r.data) >= length:
                return None
            return f"bytes {offset}-{end} came back as HTTP {r.status}, {len(r.data)} bytes, range {got!r}"

        r = self._request("GET", p, headers={"Range": f"bytes={offset}-{end}"}, accept=whole)
        if r.status >= 300:
            raise self._refused("GET", p, r)
        return r.data if r.status == 206 else r.data[:length]

    def put(self, p: DsPath, body: bytes | Iterable[bytes], length: int) -> None:
        """Write a whole file (replacing it)."""
        data = body if isinstance(body, bytes) else b"".join(body)
        assert len(data) == length
        r = self._request("PUT", p, headers={"Content-Type": "application/octet-stream"}, body=data)
        if r.status not in (200, 201, 204):
            raise self._refused("PUT", p, r)
