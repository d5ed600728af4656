"""The XAPI simulator's HTTPS server: XML-RPC at ``/`` and the VDI transfer handlers.

XML-RPC: ``session.login_with_password(user, password[, version, originator])`` gives a session ref; every
other call is ``Class.method(session_ref, *args)``; the answer is always a struct, ``{"Status": "Success",
"Value": v}`` or ``{"Status": "Failure", "ErrorDescription": [CODE, ...]}`` (never an XML-RPC fault, as
XAPI).  ``Async.Class.method`` answers a task ref (see api.py).

Every host of the pool listens (one server per host address, the same port on each): the master answers
everything; a member refuses ``session.login_with_password`` with ``HOST_IS_SLAVE [<master address>]``
as XAPI does (a client logs in to the master instead).  SIMPLIFIED: a member answers the other calls
itself from the pool's database (XAPI on a member forwards them to the master: the same answers), and
``session.slave_local_login_with_password`` gives an ordinary session.  Log entries say which host
answered (``at``: its address).

HTTP: ``GET /export_raw_vdi?session_id=&vdi=<ref or uuid>&format=raw[&task_id=]`` streams the VDI's
bytes with a Content-Length; ``PUT /import_raw_vdi?...`` writes the body (Content-Length or chunked) from
offset 0, all-zero 64 KiB blocks left (or punched) holes.  No or a bad session: 401, as XAPI.
SIMPLIFIED: only ``format=raw`` (XAPI also does vhd, and tar for import); no Range requests (XAPI has
none either on these handlers); an unknown VDI is a 404 (XAPI answers 500 with its error).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
import threading
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.xapi.api import PIECE, Xapi, XapiError, write_sparse


class XapiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, xapi: Xapi, tls: ssl.SSLContext, *, host: str | None = None, port: int = 0) -> None:
        """The server of *host* (a host ref; default: the master) on its address and *port* (0: any)."""
        self.xapi = xapi
        self.host_ref = host or xapi.host
        with xapi.lock:
            self.address = xapi.address(self.host_ref)
        super().__init__((self.address, port), Handler)
        self.tls = tls
        self.conns: set[Any] = set()
        self.conn_lock = threading.Lock()
        name = f"xapi-sim {self.address}"
        self._thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with self.conn_lock:  # keep-alive connections waiting for a next request: end them
            conns = list(self.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS in the connection's own thread; replies go out at once (no Nagle against delayed ACKs)
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.conn_lock:
            self.conns.add(conn)
        try:
            self.RequestHandlerClass(conn, client_address, self)
        finally:
            with self.conn_lock:
                self.conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | ssl.SSLError | TimeoutError):
            return
        self.xapi.record("sim-error", error=repr(exc), at=self.address)
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: XapiServer
    timeout = 120

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "text/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return b"".join(self._body_pieces())

    def _body_pieces(self) -> Any:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    piece = self.rfile.read(min(PIECE, left))
                    if not piece:
                        raise ConnectionError("client closed the request body early")
                    left -= len(piece)
                    yield piece
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                piece = self.rfile.read(min(PIECE, left))
                if not piece:
                    raise ConnectionError("client closed the request body early")
                left -= len(piece)
                yield piece

    # ------------------------------------------------------------------ XML-RPC
    def do_POST(self) -> None:
        if urlsplit(self.path).path not in ("/", "/RPC2"):
            self._body()
            self._send(404, b"")
            return
        body = self._body()
        try:
            params, method = xmlrpc.client.loads(body)
        except Exception:
            self._send(400, b"bad XML-RPC request")
            return
        answer = self._answer(method or "", list(params))
        out = xmlrpc.client.dumps((answer,), methodresponse=True, allow_none=False)
        self._send(200, out.encode())

    def _answer(self, method: str, params: list[Any]) -> dict[str, Any]:
        x = self.server.xapi
        at = self.server.address
        session = params[0] if params else None
        entry: dict[str, Any] = {"args": params[1:], "session": session, "at": at}
        try:
            if method in ("session.login_with_password", "session.slave_local_login_with_password"):
                # no password in the log
                entry = {"args": [params[0] if params else None], "session": None, "at": at}
                if method == "session.login_with_password" and self.server.host_ref != x.host:
                    with x.lock:
                        master = x.address(x.host)
                    raise XapiError("HOST_IS_SLAVE", master)
                value: Any = x.login(params, originator=self.headers.get("originator", ""))
            elif method == "session.logout":
                x.logout(session)
                value = ""
            elif method.startswith("Async."):
                inner = method[len("Async.") :]
                x.resolve(inner)
                x.check_session(session)
                value = x.run_async(inner, params[1:], session)
                entry["task"] = value
            else:
                x.resolve(method)
                x.check_session(session)
                value = x.call(method, params[1:], session=session)
        except XapiError as e:
            x.record(method, ok=False, error=e.description, **entry)
            return {"Status": "Failure", "ErrorDescription": e.description}
        except Exception as e:  # a harness bug: XAPI's INTERNAL_ERROR, and logged for the fixture
            x.record("sim-error", call=method, error=repr(e), at=at)
            return {"Status": "Failure", "ErrorDescription": ["INTERNAL_ERROR", repr(e)]}
        x.record(method, ok=True, result=value, **entry)
        return {"Status": "Success", "Value": value}

    # ------------------------------------------------------------------ HTTP handlers
    def _http_args(self) -> tuple[str, dict[str, str]]:
        u = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        return u.path, q

    def _authorised(self, q: dict[str, str]) -> bool:
        session = q.get("session_id")
        if session is None:
            for part in self.headers.get("Cookie", "").split(";"):
                k, _, v = part.strip().partition("=")
                if k == "session_id":
                    session = v
        try:
            self.server.xapi.check_session(session)
        except XapiError:
            return False
        return True

    def _transfer_target(self, q: dict[str, str], verb: str) -> tuple[str, Any] | None:
        x = self.server.xapi
        if not self._authorised(q):
            x.record(verb, ok=False, status=401, vdi=q.get("vdi"), at=self.server.address)
            self._send(401, b"Unauthorized")
            return None
        if q.get("format", "raw") != "raw":
            self._send(400, b"only format=raw is simulated")
            return None
        try:
            vdi = x.vdi_for_http(q.get("vdi", ""))
        except XapiError:
            x.record(verb, ok=False, status=404, vdi=q.get("vdi"), at=self.server.address)
            self._send(404, b"VDI not found")
            return None
        with x.lock:
            r = x.rec("VDI", vdi)
            kind = r["type"]
            path = x.vdi_path(vdi)
            size = r["virtual_size"]
        if kind == "cbt_metadata":
            x.record(verb, ok=False, status=400, vdi=vdi, at=self.server.address)
            self._send(400, b"VDI_INCOMPATIBLE_TYPE: the VDI has no data (cbt_metadata)")
            return None
        return vdi, (path, size)

    def _finish_task(self, q: dict[str, str], ok: bool, error: str = "") -> None:
        task = q.get("task_id")
        if task:
            self.server.xapi._finish(
                task, "success" if ok else "failure", error=None if ok else ["VDI_IO_ERROR", error]
            )

    def do_GET(self) -> None:
        path, q = self._http_args()
        if path != "/export_raw_vdi":
            self._send(404, b"")
            return
        target = self._transfer_target(q, "GET /export_raw_vdi")
        if target is None:
            return
        vdi, (file, size) = target
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        with open(file, "rb") as f:
            while sent < size:
                piece = f.read(min(PIECE, size - sent))
                if not piece:  # the file is shorter than the VDI: zeros (never happens for our files)
                    piece = bytes(min(PIECE, size - sent))
                self.wfile.write(piece)
                sent += len(piece)
        self._finish_task(q, True)
        self.server.xapi.record(
            "GET /export_raw_vdi", ok=True, vdi=vdi, bytes=sent, session=q.get("session_id"),
            at=self.server.address,
        )  # fmt: skip

    def do_PUT(self) -> None:
        path, q = self._http_args()
        if path != "/import_raw_vdi":
            self._body()
            self._send(404, b"")
            return
        target = self._transfer_target(q, "PUT /import_raw_vdi")
        if target is None:
            self.close_connection = True
            return
        vdi, (file, size) = target
        length = self.headers.get("Content-Length")
        if length is not None and int(length) > size:
            self.close_connection = True
            self._send(400, b"more bytes than the VDI holds")
            return
        fd = os.open(file, os.O_WRONLY)
        try:
            written = write_sparse(fd, self._body_pieces(), size)
        except ValueError as e:
            self.close_connection = True
            self._finish_task(q, False, str(e))
            self._send(400, str(e).encode())
            return
        finally:
            os.close(fd)
        self._finish_task(q, True)
        self.server.xapi.record(
            "PUT /import_raw_vdi", ok=True, vdi=vdi, bytes=written, session=q.get("session_id"),
            at=self.server.address,
        )  # fmt: skip
        self._send(200, b"", "text/plain")
