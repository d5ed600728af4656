"""An HTTPS server in front of vcsim that makes it a vCenter the product can be tested against.

Everything is forwarded to vcsim byte for byte (SOAP on /sdk with its cookies, /folder GET with Range
and PUT, streamed, keep-alive), except what vcsim 0.24 cannot do, which the proxy answers itself from
the real files on the datastores' folders and records in :attr:`Proxy.log`:

- ``QueryChangedDiskAreas``: from the disk's flat file (tests/vsphere/cbt.py): ``*`` is its allocated
  areas (SEEK_DATA/SEEK_HOLE), a changeId the 64 KiB blocks whose content differs since the id was
  handed out; answered in pieces of at most :attr:`Proxy.cbt_piece` bytes as ESXi does.  And in every
  response, a VM with changeTrackingEnabled gets a ``changeId`` in each disk backing (VM and snapshot
  configs alike), since vcsim has none.  Turning CBT off resets a disk's ids, as ESXi does.
- ``RemoveDatastore`` / ``DestroyDatastore``: refused with ResourceInUse while VMs are registered
  there, else vcsim is told to drop the datastore from its inventory (a test-only endpoint of
  tests/vcsim/main.go), so it disappears from every later answer and from /folder.
- ``CreateNasDatastore``: checked as an ESXi NFS client would (``nfs-ls`` of nfs://remoteHost/remotePath
  as root, from a privileged port), then forwarded with ``localPath`` made a symlink, named as the
  datastore, to the local folder a test registered for that export (:meth:`Proxy.add_nfs_export`).
- Guest operations (``InitiateFileTransferToGuest`` / ``FromGuest``, ``MakeDirectoryInGuest``,
  ``ListFilesInGuest``): against a per-VM folder standing for the guest's filesystem, with the
  credentials a test set per VM; transfers go through ``https://*:443/guestFile?...`` URLs, as ESXi
  answers them (the client puts its own host:port in place of ``*:443``).
- ``RelocateVM_Task`` naming a datastore: the VM's files (its configuration files and every disk's
  descriptor and extents) are copied to the target, the VM is reconfigured in vcsim so its files and
  disk backings name the new place, then the call is forwarded (vcsim moves no files).
- Uploads to an ``ImportVApp`` lease (``/nfc/...``): written to the VM's disk files (vcsim throws
  them away), streamOptimized ones converted with qemu-img.
- ``RegisterVM_Task``: forwarded after creating the ``<name>.nvram`` and ``vmware.log`` vcsim insists
  on (ESXi creates them too); afterwards the disks the .vmx names are attached to the VM in vcsim,
  which otherwise ignores the .vmx.

Test switches: :meth:`Proxy.drop_folder_gets`, :attr:`Proxy.delays`, ``tracker.reject_all``.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from tests.vsphere import cbt, soap
from tests.vsphere.soap import Request, child, local, text

PIECE = 1 << 20
GRAIN = 64 * 1024  # a copy leaves holes where a whole grain is zeros (ESXi thin disks: 1 MiB blocks)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ADD = '<deviceChange xsi:type="VirtualDeviceConfigSpec"><operation>add</operation>'
VM_FILES = re.compile(r"\.(vmx|vmxf|vmsd|nvram|log|vmsn|vmss|vmem)$")


class Answer(Exception):
    """Raised by a handler to answer at once with (status, SOAP body)."""

    def __init__(self, body: bytes, status: int = 500) -> None:
        super().__init__()
        self.body, self.status = body, status


def _fault(fault_type: str, message: str, fields: str = "") -> Answer:
    return Answer(soap.fault(fault_type, message, fields))


@dataclass
class NfsExport:
    host: str
    path: str  # the export path a client mounts, e.g. /vmrecover
    folder: Path  # what it serves, locally (e.g. the `vmrecover mount` of the same repository)
    nfs_port: int | None = None
    mount_port: int | None = None

    def url(self, remote_path: str) -> str:
        q = "?version=3"
        if self.nfs_port:
            q += f"&nfsport={self.nfs_port}"
        if self.mount_port:
            q += f"&mountport={self.mount_port}"
        return f"nfs://{self.host}{remote_path}{q}"


@dataclass
class GuestTransfer:
    vm: str
    path: Path
    guest_path: str
    upload: bool
    overwrite: bool = False
    size: int = 0
    attrs: ET.Element | None = None


class Proxy(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        vcsim: tuple[str, int],
        user: str,
        password: str,
        tls: ssl.SSLContext,
        workdir: Path,
        listen: tuple[str, int] = ("127.0.0.1", 0),
    ) -> None:
        super().__init__(listen, Handler)
        self.vcsim = vcsim
        self.tls = tls
        self.vim = soap.Vim(vcsim[0], vcsim[1], user, password)
        self.tracker = cbt.ChangeTracker()
        self.lock = threading.Lock()
        self.log: list[dict[str, Any]] = []
        self.cbt_piece = 16 << 20
        self.delays: dict[str, float] = {}  # method name (or "/folder", or "*") -> seconds
        self.refuse: dict[str, int] = {}  # SOAP method -> how many more calls are refused (InvalidState)
        self._drops: list[int] = []
        self._misranges = 0  # the next ranged /folder GETs answered for a range 4 KiB further on
        self.folder_bytes: dict[str, int] = {}  # "GET path" / "PUT path" -> body bytes
        self.guest_dir = workdir / "guests"
        self.nas_dir = workdir / "nas"
        self.guest_dir.mkdir(parents=True, exist_ok=True)
        self.nas_dir.mkdir(parents=True, exist_ok=True)
        self.guest_credentials: dict[str, tuple[str, str]] = {}
        self._transfers: dict[str, GuestTransfer] = {}
        self.nfs_exports: list[NfsExport] = []
        self._snapshot_vm: dict[str, str] = {}
        self._file_vm: dict[str, str] = {}
        self._thread = threading.Thread(target=self.serve_forever, name="vsphere-proxy", daemon=True)

    # ------------------------------------------------------------------ life
    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS per connection, in the connection's own thread (a slow handshake blocks nobody else)
        # small replies go out at once (headers and body are separate writes: Nagle's algorithm
        # against the client's delayed ACK would add 40 ms to every call)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that goes away mid-transfer (a killed backup) is normal; anything else is a bug of
        the harness: in the log (``proxy-error``) and on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | ssl.SSLError | TimeoutError):
            return
        self.record("proxy-error", error=repr(exc))
        super().handle_error(request, client_address)

    # ------------------------------------------------------------------ test API
    def record(self, method: str, **kw: Any) -> None:
        with self.lock:
            self.log.append({"method": method, "time": time.time(), **kw})

    def calls(self, method: str, **match: Any) -> list[dict[str, Any]]:
        """The log entries of the calls the proxy answered (or completed) itself, filtered."""
        with self.lock:
            return [
                e for e in self.log if e["method"] == method and all(e.get(k) == v for k, v in match.items())
            ]

    def drop_folder_gets(self, after_bytes: int, times: int = 1) -> None:
        """The next *times* /folder GETs send *after_bytes* of their body, then the connection drops."""
        with self.lock:
            self._drops += [after_bytes] * times

    def misrange_folder_gets(self, times: int = 1) -> None:
        """The next *times* ranged /folder GETs are answered for the range 4 KiB further on: a whole
        206 of the asked length whose Content-Range (rightly) names the other range."""
        with self.lock:
            self._misranges += times

    def reset_faults(self) -> None:
        with self.lock:
            self._drops.clear()
            self._misranges = 0
            self.delays.clear()
            self.refuse.clear()
        self.tracker.reject_all = False

    def add_nfs_export(self, export: NfsExport) -> None:
        with self.lock:  # a later wiring of the same export replaces the earlier one (a new test's)
            self.nfs_exports = [e for e in self.nfs_exports if (e.host, e.path) != (export.host, export.path)]
            self.nfs_exports.append(export)

    def guest_root(self, vm: str) -> Path:
        return self.guest_dir / vm

    # ------------------------------------------------------------------ vcsim look-ups
    def datastores(self) -> dict[str, tuple[str, str]]:
        """name -> (moref, local folder) of every datastore vcsim has now."""
        out = {}
        root = self.vim.props("Folder", "group-d1", "childEntity").get("childEntity")
        for dc in root if root is not None else []:
            if dc.get("type") != "Datacenter":
                continue
            dss = self.vim.props("Datacenter", dc.text or "", "datastore").get("datastore")
            for ds in dss if dss is not None else []:
                p = self.vim.props("Datastore", ds.text or "", "name", "summary.url")
                url = p.get("summary.url")
                out[p["name"].text or ""] = (ds.text or "", url.text or "" if url is not None else "")
        return out

    def local_path(self, ds_path: str) -> Path:
        """'[LocalDS_0] vm/vm.vmdk' -> the file on the datastore's local folder."""
        m = re.match(r"^\[([^\]]+)\]\s*(.*)$", ds_path)
        if not m:
            raise _fault("InvalidDatastorePath", f"Invalid datastore path '{ds_path}'.")
        dss = self.datastores()
        if m[1] not in dss:
            raise _fault("InvalidDatastore", f"Datastore '{m[1]}' not found", f"<name>{escape(m[1])}</name>")
        return Path(dss[m[1]][1]) / m[2]

    def flat_file(self, descriptor: Path) -> Path:
        """The flat extent a vmdk descriptor names (ESXi layout), or the file itself."""
        extents = descriptor_extents(descriptor)
        return extents[0] if extents else descriptor

    def vm_of(self, obj: tuple[str, str] | None, file_name: str) -> str | None:
        if obj and obj[0] == "VirtualMachine":
            self._file_vm[file_name] = obj[1]
            return obj[1]
        if obj and obj[0] == "VirtualMachineSnapshot":
            if obj[1] not in self._snapshot_vm:
                vm = self.vim.props("VirtualMachineSnapshot", obj[1], "vm").get("vm")
                if vm is None:
                    return None
                self._snapshot_vm[obj[1]] = vm.text or ""
            return self._snapshot_vm[obj[1]]
        return self._file_vm.get(file_name)

    def disks(self, obj_type: str, obj: str) -> list[ET.Element]:
        devs = self.vim.props(obj_type, obj, "config.hardware.device").get("config.hardware.device")
        return [d for d in (devs if devs is not None else []) if soap.xsi_type(d) == "VirtualDisk"]

    def cbt_enabled(self, vm: str) -> bool:
        v = self.vim.props("VirtualMachine", vm, "config.changeTrackingEnabled").get(
            "config.changeTrackingEnabled"
        )
        return v is not None and v.text == "true"

    # ------------------------------------------------------------------ response rewriting
    def add_change_ids(self, body: bytes) -> bytes:
        backings = soap.find_backings(body)
        if not backings:
            return body
        ids, cbt_on = [], {}
        for b in backings:
            try:
                vm = self.vm_of(b.obj, b.file_name)
                if vm is None:
                    continue
                if vm not in cbt_on:
                    cbt_on[vm] = self.cbt_enabled(vm)
                if not cbt_on[vm]:
                    continue
                flat = self.flat_file(self.local_path(b.file_name))
                ids.append((b.insert_at, self.tracker.change_id(str(flat))))
            except (Answer, soap.VimError, OSError):
                continue
        return soap.insert_change_ids(body, ids)


def vmdk_descriptor(flat_name: str, size: int) -> str:
    """The text descriptor ESXi writes beside a thin/thick flat disk on VMFS."""
    sectors = size // 512
    cylinders = max(1, sectors // (255 * 63))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        'encoding="UTF-8"\n'
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="vmfs"\n'
        "\n"
        "# Extent description\n"
        f'RW {sectors} VMFS "{flat_name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
        f'ddb.longContentID = "{secrets.token_hex(16)}"\n'
        'ddb.thinProvisioned = "1"\n'
        f'ddb.uuid = "{" ".join(secrets.token_hex(8)[i : i + 2] for i in range(0, 16, 2))}-'
        f'{" ".join(secrets.token_hex(8)[i : i + 2] for i in range(0, 16, 2))}"\n'
        'ddb.virtualHWVersion = "13"\n'
    )


def descriptor_extents(descriptor: Path) -> list[Path]:
    """The extent files of a text vmdk descriptor (FLAT/VMFS/... lines), [] if it is not one."""
    try:
        with open(descriptor, "rb") as f:
            head = f.read(65536)
    except OSError:
        return []
    if b"RW " not in head and b"RDONLY " not in head:
        flat = descriptor.with_name(descriptor.name.replace(".vmdk", "-flat.vmdk"))
        return [flat] if flat != descriptor and flat.exists() else []
    out = []
    for m in re.finditer(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]+)"', head, re.M):
        out.append(descriptor.parent / m[1].decode())
    return out


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a file keeping holes: holes of the source are skipped, and all-zero 64 KiB grains left holes."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(fi).st_size
        try:
            extents = cbt.data_extents(fi, size)
        except OSError:
            extents = [(0, size)]
        zero = bytes(GRAIN)
        for off, length in extents:
            pos = off
            while pos < off + length:
                data = os.pread(fi, min(PIECE, off + length - pos), pos)
                if not data:
                    break
                for sub in range(0, len(data), GRAIN):  # zero grains stay holes
                    grain = data[sub : sub + GRAIN]
                    if grain != zero[: len(grain)]:
                        os.pwrite(fo, grain, pos + sub)
                pos += len(data)
        os.ftruncate(fo, size)
        shutil.copymode(src, dst)
    finally:
        os.close(fi)
        os.close(fo)


def guest_path(root: Path, guest: str) -> Path:
    """A guest path ('/etc/hosts', 'C:\\Users\\Bob') as a file under the VM's guest folder."""
    m = re.match(r"^([A-Za-z]):[\\/](.*)$", guest)
    parts = [m[1].upper() + ":", *re.split(r"[\\/]+", m[2])] if m else guest.split("/")
    parts = [p for p in parts if p not in ("", ".")]
    if ".." in parts or not (m or guest.startswith("/")):
        raise _fault("InvalidArgument", f"A specified parameter was not correct: {guest}")
    return root.joinpath(*parts)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def finish(self) -> None:
        super().finish()
        if self.upstream is not None:
            self.upstream.close()
        self.server.vim.close_thread_connection()

    # ------------------------------------------------------------------ plumbing
    def _upstream(self) -> http.client.HTTPConnection:
        if self.upstream is None:
            self.upstream = http.client.HTTPConnection(*self.server.vcsim, timeout=600)
        return self.upstream

    def _body_pieces(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                piece = self.rfile.read(min(PIECE, left))
                if not piece:
                    raise ConnectionError("client closed the request body early")
                left -= len(piece)
                yield piece

    def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
        self.send_response_only(status)
        sent = set()
        for k, v in headers or [("Content-Type", "text/xml; charset=utf-8")]:
            if k.lower() in HOP_BY_HOP or k.lower() == "content-length":
                continue
            sent.add(k.lower())
            self.send_header(k, v)
        if "date" not in sent:
            self.send_header("Date", self.date_time_string())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _delay(self, name: str) -> None:
        d = self.server.delays.get(name, self.server.delays.get("*", 0.0))
        if d:
            time.sleep(d)

    def _forward(self, body: bytes | None = None) -> tuple[int, bytes, list[tuple[str, str]]]:
        """Send this request upstream (with *body*, or streaming the client's) and read the whole reply."""
        resp = self._forward_streaming(body)
        return resp.status, resp.read(), resp.getheaders()

    def _forward_streaming(self, body: bytes | None = None) -> http.client.HTTPResponse:
        streamed = False
        for attempt in (0, 1):
            conn = self._upstream()
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("host", "content-length"):
                        conn.putheader(k, v)
                conn.putheader("Host", f"{self.server.vcsim[0]}:{self.server.vcsim[1]}")
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                elif "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                    chunked = "Content-Length" not in self.headers
                    if chunked:
                        conn.putheader("Transfer-Encoding", "chunked")
                    else:
                        conn.putheader("Content-Length", self.headers["Content-Length"])
                    conn.endheaders()
                    streamed, n = True, 0
                    for piece in self._body_pieces():
                        n += len(piece)
                        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                    if chunked:
                        conn.send(b"0\r\n\r\n")
                    self._count("PUT" if self.command == "PUT" else self.command, n)
                else:
                    conn.endheaders()
                return conn.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                self.upstream = None
                if attempt or streamed:  # a streamed body cannot be sent twice (vcsim may close idle ones)
                    raise
        raise AssertionError("unreachable")

    def _count(self, what: str, n: int) -> None:
        if not self.path.startswith("/folder"):
            return
        key = f"{what} {urllib.parse.urlsplit(self.path).path}"
        with self.server.lock:
            self.server.folder_bytes[key] = self.server.folder_bytes.get(key, 0) + n

    def _misrange(self) -> None:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if self.command != "GET" or not self.path.startswith("/folder") or m is None:
            return
        with self.server.lock:
            if not self.server._misranges:
                return
            self.server._misranges -= 1
        start, end = int(m.group(1)) + 4096, int(m.group(2)) + 4096
        del self.headers["Range"]
        self.headers["Range"] = f"bytes={start}-{end}"
        self.server.record("folder-misrange", path=self.path, start=start, end=end)

    def _relay(self) -> None:
        """Forward this request and stream the reply back (the /folder path), with the drop fault."""
        self._delay("/folder" if self.path.startswith("/folder") else self.path)
        self._misrange()
        resp = self._forward_streaming()
        length = resp.getheader("Content-Length")
        if length is None and self.command != "HEAD":
            data = resp.read()
            self._send(resp.status, data, resp.getheaders())
            return
        self.send_response_only(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            resp.read()
            return
        drop = None
        if self.command == "GET" and self.path.startswith("/folder"):
            with self.server.lock:
                drop = self.server._drops.pop(0) if self.server._drops else None
        sent = 0
        while piece := resp.read(PIECE):
            if drop is not None and sent + len(piece) > drop:
                self.wfile.write(piece[: drop - sent])
                self.wfile.flush()
                self._count("GET", drop - sent)
                self.server.record("folder-drop", path=self.path, after=drop)
                self.close_connection = True
                resp.close()
                self._upstream().close()  # the rest of the reply is still coming: drop that connection too
                self.upstream = None
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(piece)
            sent += len(piece)
        self._count(self.command, sent)

    # ------------------------------------------------------------------ HTTP verbs
    def do_GET(self) -> None:
        if self.path.startswith("/guestFile"):
            self._guest_download()
        else:
            self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def do_PUT(self) -> None:
        if self.path.startswith("/guestFile"):
            self._guest_upload()
        elif self.path.startswith("/nfc/"):
            self._nfc_upload()
        else:
            self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        if self.path.startswith("/nfc/"):
            self._nfc_upload()
            return
        if not self.path.startswith("/sdk"):
            self._relay()
            return
        body = b"".join(self._body_pieces())
        req = soap.parse_request(body)
        self._delay(req.method if req else "")
        handler = getattr(self, f"_answer_{req.method}", None) if req else None
        hook = getattr(self, f"_before_{req.method}", None) if req else None
        try:
            self._refuse(req.method if req else "")
            if req and (handler or hook):
                self._check_session()
            if req and handler:
                status, out = 200, soap.response(req.method, handler(req))
                headers = None
            else:
                if req and hook:
                    body = hook(req, body)
                status, out, headers = self._forward(body)
                if req and status == 200:
                    after = getattr(self, f"_after_{req.method}", None)
                    if after:
                        after(req, out)
                if status == 200:
                    out = self.server.add_change_ids(out)
        except Answer as a:
            status, out, headers = a.status, a.body, None
        except soap.VimError as e:  # vcsim's own fault for a look-up (e.g. ManagedObjectNotFound)
            status, out, headers = 500, e.body, None
        self._send(status, out, headers)

    def _refuse(self, method: str) -> None:
        with self.server.lock:
            left = self.server.refuse.get(method, 0)
            if left:
                self.server.refuse[method] = left - 1
        if left:
            self.server.record("refused", call=method)
            raise _fault("InvalidState", f"The operation is not allowed in the current state ({method}).")

    def _check_session(self) -> None:
        """Calls answered here need a logged-in session, as everywhere: ask vcsim about the cookie."""
        this = '<_this type="ServiceInstance">ServiceInstance</_this>'
        probe = (
            f'{soap.ENVELOPE_OPEN}<CurrentTime xmlns="{soap.VIM}">{this}</CurrentTime>{soap.ENVELOPE_CLOSE}'
        )
        cookie = {"Cookie": self.headers.get("Cookie") or ""}
        status, data, _ = self.server.vim.raw(probe.encode(), cookie)
        if status != 200:
            raise Answer(data)

    # ------------------------------------------------------------------ changed block tracking
    def _answer_QueryChangedDiskAreas(self, req: Request) -> str:
        s = self.server
        vm, snapshot = req.this, req.arg_text("snapshot")
        key, start, change_id = (
            int(req.arg_text("deviceKey")),
            int(req.arg_text("startOffset")),
            req.arg_text("changeId"),
        )
        disks = s.disks("VirtualMachineSnapshot", snapshot) if snapshot else s.disks("VirtualMachine", vm)
        disk = next((d for d in disks if text(d, "key") == str(key)), None)
        if disk is None:
            raise _fault(
                "InvalidArgument",
                "A specified parameter was not correct: deviceKey",
                "<invalidProperty>deviceKey</invalidProperty>",
            )
        backing = child(disk, "backing")
        file_name = text(backing, "fileName") if backing is not None else ""
        capacity = int(text(disk, "capacityInBytes") or int(text(disk, "capacityInKB", "0")) * 1024)
        flat = s.flat_file(s.local_path(file_name))
        entry = {
            "vm": vm,
            "snapshot": snapshot,
            "device_key": key,
            "disk": str(flat),
            "change_id": change_id,
            "start": start,
        }
        if not s.cbt_enabled(vm):
            s.record("QueryChangedDiskAreas", **entry, fault="FileFault")
            raise _fault(
                "FileFault",
                f"Error caused by file {file_name}",
                f"{soap.fault_message('vim.hostd.vmsvc.cbt.noTrack', 'Change tracking is not enabled')}"
                f"<file>{escape(file_name)}</file>",
            )
        if not 0 <= start < capacity:
            s.record("QueryChangedDiskAreas", **entry, fault="InvalidArgument")
            raise _fault(
                "InvalidArgument",
                "A specified parameter was not correct: startOffset",
                "<invalidProperty>startOffset</invalidProperty>",
            )
        end = min(capacity, start + s.cbt_piece)
        try:
            if change_id == "*":
                areas = cbt.allocated(str(flat), start, end)
            else:
                areas = s.tracker.changed(str(flat), change_id, start, end)
        except cbt.BadChangeId:
            s.record("QueryChangedDiskAreas", **entry, fault="InvalidArgument")
            raise _fault(
                "InvalidArgument",
                "A specified parameter was not correct: changeId",
                "<invalidProperty>changeId</invalidProperty>",
            ) from None
        except cbt.UnknownChangeId:
            s.record("QueryChangedDiskAreas", **entry, fault="FileFault")
            raise _fault(
                "FileFault",
                f"Error caused by file {file_name}",
                f"{soap.fault_message('vim.hostd.vmsvc.cbt.cannotGetChanges', 'Cannot compute changes')}"
                f"<file>{escape(file_name)}</file>",
            ) from None
        s.record("QueryChangedDiskAreas", **entry, length=end - start, areas=areas)
        extents = "".join(
            f"<changedArea><start>{o}</start><length>{n}</length></changedArea>" for o, n in areas
        )
        return f"<startOffset>{start}</startOffset><length>{end - start}</length>{extents}"

    def _after_ReconfigVM_Task(self, req: Request, out: bytes) -> None:
        spec = req.arg("spec")
        if spec is None or text(spec, "changeTrackingEnabled") != "false":
            return
        for d in self.server.disks("VirtualMachine", req.this):
            b = child(d, "backing")
            if b is not None:
                with contextlib.suppress(Answer):
                    flat = self.server.flat_file(self.server.local_path(text(b, "fileName")))
                    self.server.tracker.reset(str(flat))
        self.server.record("cbt-reset", vm=req.this)

    # ------------------------------------------------------------------ datastores
    def _harness(self, endpoint: str, **query: str) -> None:
        """Ask vcsim's test-only endpoint (tests/vcsim/main.go) to change its inventory."""
        conn = http.client.HTTPConnection(*self.server.vcsim, timeout=30)
        try:
            conn.request("POST", f"/_harness/{endpoint}?" + urllib.parse.urlencode(query))
            with conn.getresponse() as r:
                status, detail = r.status, r.read().decode(errors="replace")
        finally:
            conn.close()
        if status != 204:
            raise _fault("HostConfigFault", f"harness: vcsim {endpoint} {query} failed: {status} {detail}")

    def _remove_datastore(self, method: str, ref: str, dss: str | None) -> None:
        s = self.server
        p = s.vim.props("Datastore", ref, "name", "vm", "summary.url")
        name = p["name"].text or ""
        if any(self._vm_uses(vm.text or "", name) for vm in (p.get("vm") or [])):
            raise _fault(
                "ResourceInUse",
                f"The resource '{name}' is in use.",
                f"<type>Datastore</type><name>{escape(name)}</name>",
            )
        self._harness("forget-datastore", ref=ref, **({"dss": dss} if dss else {}))
        try:
            s.vim.props("Datastore", ref, "name")
            gone = False  # still mounted by another host
        except soap.VimError:
            gone = True
        url = p.get("summary.url")
        link = Path(url.text or "") if url is not None else None
        if gone and link is not None and link.parent == s.nas_dir and link.is_symlink():
            link.unlink()
        s.record(method, datastore=ref, name=name, gone=gone)

    def _vm_uses(self, vm: str, ds_name: str) -> bool:
        """Whether the VM's files are on the datastore (vcsim's datastore "vm" list still names VMs
        relocated away, unlike vCenter's)."""
        try:
            p = self.server.vim.props("VirtualMachine", vm, "config.files.vmPathName")
        except soap.VimError:
            return False
        names = [p["config.files.vmPathName"].text or ""] if "config.files.vmPathName" in p else []
        for d in self.server.disks("VirtualMachine", vm):
            b = child(d, "backing")
            if b is not None:
                names.append(text(b, "fileName"))
        return any(n.startswith(f"[{ds_name}]") for n in names)

    def _answer_RemoveDatastore(self, req: Request) -> None:
        self._remove_datastore("RemoveDatastore", req.arg_text("datastore"), req.this)

    def _answer_DestroyDatastore(self, req: Request) -> None:
        self._remove_datastore("DestroyDatastore", req.this, None)

    def _answer_CreateNasDatastore(self, req: Request) -> soap.Mor:
        s = self.server
        spec = req.arg("spec")
        assert spec is not None
        host, path, name = text(spec, "remoteHost"), text(spec, "remotePath"), text(spec, "localPath")
        if not name or "/" in name:
            raise _fault(
                "InvalidArgument",
                "A specified parameter was not correct: spec.localPath",
                "<invalidProperty>spec.localPath</invalidProperty>",
            )
        with s.lock:
            exports = [
                e
                for e in s.nfs_exports
                if e.host == host and (path + "/").startswith(e.path.rstrip("/") + "/")
            ]
        export = max(exports, key=lambda e: len(e.path), default=None)
        url = export.url(path) if export else f"nfs://{host}{path}?version=3"
        check = subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=60)
        entry = {"dss": req.this, "host": host, "path": path, "name": name}
        if check.returncode != 0:
            s.record("CreateNasDatastore", **entry, mounted=False, error=check.stderr.strip())
            msg = f"NFS mount {host}:{path} failed: Unable to connect to NFS server."
            raise _fault(
                "PlatformConfigFault",
                "An error occurred during host configuration.",
                f"{soap.fault_message('vob.vmfs.nfs.mount.error.perform.failed', msg)}"
                f"<text>{escape(msg)}</text>",
            )
        if export is None:
            raise _fault(
                "HostConfigFault",
                f"harness: no local folder registered for nfs://{host}{path} (VSphere.add_nfs_export)",
            )
        folder = export.folder / path[len(export.path.rstrip("/")) :].lstrip("/")
        existing = s.datastores().get(name)
        link = s.nas_dir / name
        if existing:
            # vCenter: the same export under the same name, asked by another host, is the same datastore
            ref = existing[0]
            info = s.vim.props("Datastore", ref, "info").get("info")
            nas = child(info, "nas") if info is not None else None
            on_host = s.vim.props("HostDatastoreSystem", req.this, "datastore").get("datastore")
            same = nas is not None and (text(nas, "remoteHost"), text(nas, "remotePath")) == (host, path)
            if not same or (on_host is not None and ref in [r.text for r in on_host]):
                raise _fault(
                    "DuplicateName",
                    f"The name '{name}' already exists.",
                    f'<name>{escape(name)}</name><object type="Datastore">{escape(ref)}</object>',
                )
        else:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(folder)
            nas_spec = re.sub(
                r"(<(?:\w+:)?localPath>)(.*?)(</(?:\w+:)?localPath>)",
                lambda m: m[1] + escape(str(link)) + m[3],
                ET.tostring(spec, encoding="unicode"),
                count=1,
                flags=re.S,
            )
            ret = s.vim.call("CreateNasDatastore", "HostDatastoreSystem", req.this, nas_spec)
            assert ret is not None
            ref = ret.text or ""
        self._harness("mount-datastore", ref=ref, dss=req.this)
        s.record("CreateNasDatastore", **entry, mounted=True, folder=str(folder), datastore=ref)
        return soap.Mor("Datastore", ref)

    # ------------------------------------------------------------------ register and relocate
    def _before_RegisterVM_Task(self, req: Request, body: bytes) -> bytes:
        s = self.server
        vmx_path = req.arg_text("path")
        try:
            vmx = s.local_path(vmx_path)
        except Answer:
            return body  # vcsim answers that itself
        rel = re.sub(r"^\[[^\]]+\]\s*", "", vmx_path)
        name = req.arg_text("name") or os.path.dirname(rel)
        created = []
        for f in (vmx.parent / f"{name}.nvram", vmx.parent / "vmware.log"):
            if vmx.exists() and not f.exists():
                f.touch()
                created.append(f.name)
        s.record("RegisterVM_Task", path=vmx_path, created=created)
        return body

    def _after_RegisterVM_Task(self, req: Request, out: bytes) -> None:
        s = self.server
        ret = next((e for e in ET.fromstring(out).iter() if local(e.tag) == "returnval"), None)
        if ret is None:
            return
        info = s.vim.props("Task", ret.text or "", "info.state", "info.result")
        if "info.result" not in info or info["info.state"].text != "success":
            return
        vm = info["info.result"].text or ""
        vmx_path = req.arg_text("path")
        attached = attach_vmx_disks(s, vm, vmx_path)
        s.record("RegisterVM_Task", vm=vm, path=vmx_path, disks=attached)

    def _before_RelocateVM_Task(self, req: Request, body: bytes) -> bytes:
        s = self.server
        spec = req.arg("spec")
        if spec is None:
            return body
        target = text(spec, "datastore")
        per_disk = {text(d, "diskId"): text(d, "datastore") for d in spec if local(d.tag) == "disk"}
        if not target and not per_disk:
            return body
        relocate_files(s, req.this, target, per_disk)
        return body

    # ------------------------------------------------------------------ NFC (ImportVApp uploads)
    def _nfc_upload(self) -> None:
        """A disk uploaded to an ImportVApp lease: vcsim throws the bytes away, ESXi writes the disk.
        Written here as ESXi lays it out (descriptor + thin flat file); a streamOptimized upload is
        converted with qemu-img, anything else is taken as the raw disk."""
        s = self.server
        parts = urllib.parse.urlsplit(self.path).path.split("/")
        lease, name = urllib.parse.unquote(parts[-2]), urllib.parse.unquote(parts[-1])
        try:
            info = s.vim.props("HttpNfcLease", lease, "info.entity", cookie=self.headers.get("Cookie") or "")
            vm = info["info.entity"].text or ""
            files = {}
            for d in s.disks("VirtualMachine", vm):
                b = child(d, "backing")
                if b is not None:
                    files[os.path.basename(text(b, "fileName"))] = text(b, "fileName")
            desc = s.local_path(files[name])
        except (soap.VimError, Answer, KeyError):
            for _ in self._body_pieces():
                pass
            self._send(404, b"", [("Content-Type", "text/plain")])
            return
        tmp = desc.with_name(f".{name}.upload-{secrets.token_hex(4)}")
        n = 0
        with open(tmp, "wb") as f:
            for piece in self._body_pieces():
                f.write(piece)
                n += len(piece)
        flat = desc.with_name(desc.name.replace(".vmdk", "-flat.vmdk"))
        with open(tmp, "rb") as f:
            magic = f.read(4)
        if magic == b"KDMV":
            subprocess.run(
                ["qemu-img", "convert", "-q", "-f", "vmdk", "-O", "raw", str(tmp), str(flat)],
                check=True,
                capture_output=True,
            )
            tmp.unlink()
        else:
            os.replace(tmp, flat)
        desc.write_text(vmdk_descriptor(flat.name, os.path.getsize(flat)))
        s.record(
            "nfc upload",
            lease=lease,
            vm=vm,
            disk=str(flat),
            bytes=n,
            stream_optimized=magic == b"KDMV",
            http_method=self.command,
            content_type=self.headers.get("Content-Type"),
        )
        self._send(200, b"", [("Content-Type", "text/plain")])

    # ------------------------------------------------------------------ guest operations
    def _guest_vm(self, req: Request) -> tuple[str, Path]:
        s = self.server
        vm = req.arg_text("vm")
        state = s.vim.props("VirtualMachine", vm, "runtime.powerState").get("runtime.powerState")
        if state is None or state.text != "poweredOn":
            raise _fault("GuestOperationsUnavailable", "The guest operations agent could not be contacted.")
        auth = req.arg("auth")
        creds = s.guest_credentials.get(vm)
        given = (text(auth, "username"), text(auth, "password")) if auth is not None else None
        if creds is None or given != creds:
            raise _fault(
                "InvalidGuestLogin",
                "Failed to authenticate with the guest operating system using the supplied credentials.",
            )
        root = s.guest_root(vm)
        root.mkdir(parents=True, exist_ok=True)
        return vm, root

    def _transfer_url(self, t: GuestTransfer) -> str:
        token = secrets.token_hex(16)
        with self.server.lock:
            self.server._transfers[token] = t
        # as ESXi: "https://*:443/guestFile?id=..&token=..", whatever port the client talks to; a client
        # replaces the whole host:port when the host is "*" (govmomi's rule: port forwarding works too)
        return f"https://*:443/guestFile?id={urllib.parse.quote(t.vm)}&token={token}"

    def _answer_InitiateFileTransferToGuest(self, req: Request) -> str:
        vm, root = self._guest_vm(req)
        gp = req.arg_text("guestFilePath")
        path = guest_path(root, gp)
        overwrite = req.arg_text("overwrite") == "true"
        if not path.parent.is_dir():
            raise _fault("FileNotFound", f"File {gp} was not found", f"<file>{escape(gp)}</file>")
        if path.exists() and (path.is_dir() or not overwrite):
            raise _fault("FileAlreadyExists", f"The file {gp} already exists", f"<file>{escape(gp)}</file>")
        t = GuestTransfer(
            vm, path, gp, True, overwrite, int(req.arg_text("fileSize", "0")), req.arg("fileAttributes")
        )
        url = self._transfer_url(t)
        self.server.record("InitiateFileTransferToGuest", vm=vm, path=gp, overwrite=overwrite, url=url)
        return escape(url)

    def _answer_InitiateFileTransferFromGuest(self, req: Request) -> str:
        vm, root = self._guest_vm(req)
        gp = req.arg_text("guestFilePath")
        path = guest_path(root, gp)
        if not path.is_file():
            raise _fault("FileNotFound", f"File {gp} was not found", f"<file>{escape(gp)}</file>")
        st = path.stat()
        url = self._transfer_url(GuestTransfer(vm, path, gp, False))
        self.server.record("InitiateFileTransferFromGuest", vm=vm, path=gp)
        return (
            f'<attributes xsi:type="GuestPosixFileAttributes"><modificationTime>{_iso(st.st_mtime)}'
            f"</modificationTime><accessTime>{_iso(st.st_atime)}</accessTime><ownerId>{st.st_uid}</ownerId>"
            f"<groupId>{st.st_gid}</groupId><permissions>{st.st_mode & 0o7777}</permissions></attributes>"
            f"<size>{st.st_size}</size><url>{escape(url)}</url>"
        )

    def _answer_MakeDirectoryInGuest(self, req: Request) -> None:
        vm, root = self._guest_vm(req)
        gp = req.arg_text("directoryPath")
        path = guest_path(root, gp)
        if path.exists():
            raise _fault("FileAlreadyExists", f"The file {gp} already exists", f"<file>{escape(gp)}</file>")
        if not path.parent.is_dir() and req.arg_text("createParentDirectories") != "true":
            raise _fault("FileNotFound", f"File {gp} was not found", f"<file>{escape(gp)}</file>")
        path.mkdir(parents=True)
        self.server.record("MakeDirectoryInGuest", vm=vm, path=gp)

    def _answer_ListFilesInGuest(self, req: Request) -> str:
        vm, root = self._guest_vm(req)
        gp = req.arg_text("filePath")
        path = guest_path(root, gp)
        if not path.exists() and not path.is_symlink():
            raise _fault("FileNotFound", f"File {gp} was not found", f"<file>{escape(gp)}</file>")
        entries = sorted(path.iterdir(), key=lambda p: p.name) if path.is_dir() else [path]
        pattern = re.compile(req.arg_text("matchPattern") or ".*")
        entries = [e for e in entries if pattern.fullmatch(e.name)]
        index = int(req.arg_text("index", "0") or 0)
        limit = int(req.arg_text("maxResults", "0") or 0) or len(entries)
        page = entries[index : index + limit]
        files = []
        for e in page:
            st = e.lstat()
            kind = "symlink" if e.is_symlink() else "directory" if e.is_dir() else "file"
            target = f"<symlinkTarget>{escape(os.readlink(e))}</symlinkTarget>" if kind == "symlink" else ""
            files.append(
                f"<files><path>{escape(e.name)}</path><type>{kind}</type><size>{st.st_size}</size>"
                f'<attributes xsi:type="GuestPosixFileAttributes"><modificationTime>{_iso(st.st_mtime)}'
                f"</modificationTime><accessTime>{_iso(st.st_atime)}</accessTime>{target}<ownerId>{st.st_uid}"
                f"</ownerId><groupId>{st.st_gid}</groupId><permissions>{st.st_mode & 0o7777}</permissions>"
                f"</attributes></files>"
            )
        self.server.record("ListFilesInGuest", vm=vm, path=gp)
        return "".join(files) + f"<remaining>{max(0, len(entries) - index - len(page))}</remaining>"

    def _take_transfer(self, upload: bool) -> GuestTransfer | None:
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        with self.server.lock:
            t = self.server._transfers.get((q.get("token") or [""])[0])
            if t is None or t.upload != upload or (q.get("id") or [""])[0] != t.vm:
                return None
            del self.server._transfers[q["token"][0]]
        return t

    def _guest_upload(self) -> None:
        t = self._take_transfer(upload=True)
        if t is None:
            for _ in self._body_pieces():
                pass
            self._send(403, b"", [("Content-Type", "text/plain")])
            return
        tmp = t.path.with_name(f".{t.path.name}.upload-{secrets.token_hex(4)}")
        n = 0
        with open(tmp, "wb") as f:
            for piece in self._body_pieces():
                f.write(piece)
                n += len(piece)
        mode = 0o644
        a = t.attrs
        if a is not None and soap.xsi_type(a) == "GuestPosixFileAttributes":
            if text(a, "permissions"):
                mode = int(text(a, "permissions")) & 0o7777
            uid, gid = text(a, "ownerId"), text(a, "groupId")
            if (uid or gid) and os.geteuid() == 0:
                os.chown(tmp, int(uid) if uid else -1, int(gid) if gid else -1)
        os.chmod(tmp, mode)
        if a is not None and text(a, "modificationTime"):
            mtime = _parse_time(text(a, "modificationTime"))
            atime = _parse_time(text(a, "accessTime")) if text(a, "accessTime") else mtime
            os.utime(tmp, (atime, mtime))
        if t.path.exists() and not t.overwrite:
            tmp.unlink()
            self._send(409, b"", [("Content-Type", "text/plain")])
            return
        os.replace(tmp, t.path)
        self.server.record(
            "guestFile PUT", vm=t.vm, path=t.guest_path, size=n, mode=mode, declared_size=t.size
        )
        self._send(200, b"", [("Content-Type", "text/plain")])

    def _guest_download(self) -> None:
        t = self._take_transfer(upload=False)
        if t is None:
            self._send(403, b"", [("Content-Type", "text/plain")])
            return
        self._send(200, t.path.read_bytes(), [("Content-Type", "application/octet-stream")])


# --------------------------------------------------------------------------- relocate / register helpers
def _device_slices(s: Proxy, vm: str) -> list[bytes]:
    """The raw XML of each VirtualDisk in the VM's config (as vcsim wrote it), for edits."""
    body = (
        f'{soap.ENVELOPE_OPEN}<RetrievePropertiesEx xmlns="{soap.VIM}"><_this type="PropertyCollector">'
        f"propertyCollector</_this><specSet><propSet><type>VirtualMachine</type><pathSet>config.hardware.device"
        f'</pathSet></propSet><objectSet><obj type="VirtualMachine">{escape(vm)}</obj></objectSet></specSet>'
        f"<options></options></RetrievePropertiesEx>{soap.ENVELOPE_CLOSE}"
    ).encode()
    status, data, _ = s.vim.raw(body)
    if status != 200:
        raise Answer(data)
    spans = soap.element_spans(
        data,
        lambda name, attrs, depth: (
            name == "VirtualDevice" and attrs.get(f"{soap.XSI}}}type") == "VirtualDisk"
        ),
    )
    return [data[a:b] for a, b in spans]


def relocate_files(s: Proxy, vm: str, target: str, per_disk: dict[str, str]) -> None:
    """Copy the VM's files to the target datastore(s) and make vcsim name them there."""
    dss = s.datastores()
    by_ref = {ref: (name, folder) for name, (ref, folder) in dss.items()}
    vmx_ds_path = (
        s.vim.props("VirtualMachine", vm, "config.files.vmPathName")["config.files.vmPathName"].text or ""
    )
    m = re.match(r"^\[([^\]]+)\]\s*(.*)$", vmx_ds_path)
    assert m, vmx_ds_path
    src_name, vmx_rel = m[1], m[2]
    vm_dir_rel = os.path.dirname(vmx_rel)
    src_dir = Path(dss[src_name][1]) / vm_dir_rel
    copied: list[str] = []
    changes = []
    if target and target in by_ref and by_ref[target][0] != src_name:
        tgt_name, tgt_folder = by_ref[target]
        dst_dir = Path(tgt_folder) / vm_dir_rel
        dst_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(src_dir.iterdir()) if src_dir.is_dir() else []:
            if f.is_file() and VM_FILES.search(f.name):
                sparse_copy(f, dst_dir / f.name)
                copied.append(str(dst_dir / f.name))
        new_dir = f"[{tgt_name}] {vm_dir_rel}"
        changes.append(
            f"<files><vmPathName>[{escape(tgt_name)}] {escape(vmx_rel)}</vmPathName>"
            f"<snapshotDirectory>{escape(new_dir)}</snapshotDirectory>"
            f"<suspendDirectory>{escape(new_dir)}</suspendDirectory>"
            f"<logDirectory>{escape(new_dir)}</logDirectory></files>"
        )
    for raw in _device_slices(s, vm):
        # the slice uses prefixes declared by its ancestors in the response: declare them for parsing
        decl = f'<VirtualDevice xmlns="{soap.VIM}" xmlns:XMLSchema-instance="{soap.XSI}" '.encode()
        dev = ET.fromstring(raw.replace(b"<VirtualDevice ", decl, 1))
        key = text(dev, "key")
        dest = per_disk.get(key) or target
        backing = child(dev, "backing")
        if not dest or dest not in by_ref or backing is None:
            continue
        file_name = text(backing, "fileName")
        dm = re.match(r"^\[([^\]]+)\]\s*(.*)$", file_name)
        if not dm or dm[1] == by_ref[dest][0]:
            continue
        tgt_name, tgt_folder = by_ref[dest]
        src_desc = Path(dss[dm[1]][1]) / dm[2]
        dst_desc = Path(tgt_folder) / dm[2]
        for f in [src_desc, *descriptor_extents(src_desc)]:
            rel = f.relative_to(src_desc.parent)
            sparse_copy(f, dst_desc.parent / rel)
            copied.append(str(dst_desc.parent / rel))
        new_name = f"[{tgt_name}] {dm[2]}"
        edited = re.sub(
            rb"<fileName>.*?</fileName>", f"<fileName>{escape(new_name)}</fileName>".encode(), raw, count=1
        )
        edited = re.sub(
            rb'<datastore type="Datastore">.*?</datastore>',
            f'<datastore type="Datastore">{escape(dest)}</datastore>'.encode(),
            edited,
            count=1,
        )
        edited = b"<device" + edited[len(b"<VirtualDevice") : -len(b"</VirtualDevice>")] + b"</device>"
        changes.append(
            f'<deviceChange xmlns:XMLSchema-instance="{soap.XSI}" xsi:type="VirtualDeviceConfigSpec">'
            "<operation>edit</operation>" + edited.decode() + "</deviceChange>"
        )
    if changes:
        ret = s.vim.call("ReconfigVM_Task", "VirtualMachine", vm, "<spec>" + "".join(changes) + "</spec>")
        assert ret is not None
        s.vim.wait_task(ret.text or "")
    s.record("RelocateVM_Task", vm=vm, target=target, disks=per_disk, copied=copied)


def vmx_settings(vmx: Path) -> dict[str, str]:
    out = {}
    try:
        lines = vmx.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = re.match(r'^\s*([\w:.]+)\s*=\s*"(.*)"\s*$', line)
        if m:
            out[m[1].lower()] = m[2]
    return out


def attach_vmx_disks(s: Proxy, vm: str, vmx_ds_path: str) -> list[str]:
    """Give a registered VM (vcsim ignores the .vmx) the SCSI disks its .vmx names, and its memory,
    CPUs and guest OS; returns the disks' datastore paths."""
    vmx = s.local_path(vmx_ds_path)
    conf = vmx_settings(vmx)
    ds_prefix = re.match(r"^(\[[^\]]+\]\s*)(.*)$", vmx_ds_path)
    assert ds_prefix
    vm_dir_rel = os.path.dirname(ds_prefix[2])
    controllers, disks, attached = {}, [], []
    for k, v in conf.items():
        m = re.match(r"^scsi(\d+):(\d+)\.filename$", k)
        if (
            not m
            or conf.get(f"scsi{m[1]}:{m[2]}.present", "true").lower() != "true"
            or not v.endswith(".vmdk")
        ):
            continue
        bus, unit = int(m[1]), int(m[2])
        rel = v if v.startswith("/") else os.path.normpath(os.path.join(vm_dir_rel, v))
        desc = vmx.parent / v if not v.startswith("/") else Path(v)
        sectors = 0
        try:
            for mm in re.finditer(r"^\s*RW\s+(\d+)\s", desc.read_text(errors="replace"), re.M):
                sectors += int(mm[1])
        except OSError:
            continue
        name = f"{ds_prefix[1]}{rel}"
        controllers.setdefault(bus, conf.get(f"scsi{bus}.virtualdev", "pvscsi"))
        disks.append((bus, unit, name, sectors * 512))
        attached.append(name)
    specs = []
    for bus, dev in sorted(controllers.items()):
        kind = {
            "lsilogic": "VirtualLsiLogicController",
            "lsisas1068": "VirtualLsiLogicSASController",
            "buslogic": "VirtualBusLogicController",
        }.get(dev, "ParaVirtualSCSIController")
        specs.append(
            f'{ADD}<device xsi:type="{kind}"><key>{-100 - bus}</key>'
            f"<busNumber>{bus}</busNumber><sharedBus>noSharing</sharedBus></device></deviceChange>"
        )
    for i, (bus, unit, name, size) in enumerate(disks):
        specs.append(
            f'{ADD}<device xsi:type="VirtualDisk"><key>{-1 - i}</key>'
            f'<backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>{escape(name)}</fileName>'
            f"<diskMode>persistent</diskMode><thinProvisioned>true</thinProvisioned></backing>"
            f"<controllerKey>{-100 - bus}</controllerKey><unitNumber>{unit}</unitNumber>"
            f"<capacityInKB>{size // 1024}</capacityInKB><capacityInBytes>{size}</capacityInBytes>"
            f"</device></deviceChange>"
        )
    extra = ""
    if conf.get("memsize", "").isdigit():
        extra += f"<memoryMB>{int(conf['memsize'])}</memoryMB>"
    if conf.get("numvcpus", "").isdigit():
        extra += f"<numCPUs>{int(conf['numvcpus'])}</numCPUs>"
    if conf.get("guestos", "").endswith("Guest"):  # a vSphere guestId; .vmx files mostly have others
        extra += f"<guestId>{escape(conf['guestos'])}</guestId>"
    if not specs and not extra:
        return attached
    ret = s.vim.call("ReconfigVM_Task", "VirtualMachine", vm, f"<spec>{extra}{''.join(specs)}</spec>")
    assert ret is not None
    s.vim.wait_task(ret.text or "")
    return attached
