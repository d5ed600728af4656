"""The NBD side of the XAPI simulator: what ``VDI.get_nbd_info`` points at.

XAPI's xapi-nbd serves every VDI on port 10809 of the host, TLS required on an ``nbd`` network, the export
name being ``/<vdi uuid>?session_id=<session ref>`` (the session is checked when a client connects).
Here each (VDI, session) pair gets its own qemu-nbd (read-only, raw, TLS with the host's certificate,
exporting that very name) on a Unix socket, behind a small TCP relay of ours on a port of its own: the
relay is where a connection can be cut mid-transfer (:meth:`NbdExports.drop_after`) and where a connection
with an ended session is refused.

SIMPLIFIED: one port per (VDI, session) instead of 10809 for all; the session is checked when the client
connects to the relay (xapi-nbd checks it at NBD_OPT_GO: either way the connection fails); exports are
read-only (xapi-nbd can write too); TLS is end to end between the client and qemu-nbd, the relay sees
only ciphertext.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.testkit.tls import ServerCerts

PIECE = 256 * 1024


@dataclass
class Export:
    vdi: str
    session: str
    name: str
    sock_path: Path
    proc: subprocess.Popen[bytes]
    log: Any
    listener: socket.socket
    open: bool = True  # False once the session ended: new connections are refused
    conns: set[socket.socket] = field(default_factory=set)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])


class NbdExports:
    def __init__(self, workdir: Path, certs: ServerCerts, record: Callable[..., None]) -> None:
        self.dir = workdir / "nbd"
        self.creds = self.dir / "creds"
        self.creds.mkdir(parents=True, exist_ok=True)
        # qemu-nbd's layout: the CA (it checks its own certificate against it), the certificate, the key
        shutil.copy(certs.ca_file, self.creds / "ca-cert.pem")
        shutil.copy(certs.cert_file, self.creds / "server-cert.pem")
        shutil.copy(certs.key_file, self.creds / "server-key.pem")
        self.record = record
        self.lock = threading.Lock()
        self.exports: dict[tuple[str, str, bool], Export] = {}
        self._drops: list[int] = []
        self.delay = 0.0  # seconds to wait before relaying each piece (a slow host: tests catch reads)
        self._n = 0

    # ------------------------------------------------------------------ what the API uses
    def export(self, vdi: str, path: Path, vdi_uuid: str, session: str, *, tls: bool) -> tuple[str, str]:
        """(port, export name) of the export of *path* for *session* (started on first use)."""
        name = f"/{vdi_uuid}?session_id={session}"
        key = (vdi, session, tls)
        with self.lock:
            e = self.exports.get(key)
            if e is None:
                e = self.exports[key] = self._start(vdi, session, name, path, tls)
        return str(e.port), name

    def session_ended(self, session: str) -> None:
        with self.lock:
            for e in self.exports.values():
                if e.session == session:
                    e.open = False

    def vdi_gone(self, vdi: str) -> None:
        with self.lock:
            gone = [k for k, e in self.exports.items() if e.vdi == vdi]
            exports = [self.exports.pop(k) for k in gone]
        for e in exports:
            self._stop(e)

    # ------------------------------------------------------------------ faults
    def drop_after(self, after_bytes: int, times: int = 1) -> None:
        """The next *times* NBD connections are cut once *after_bytes* went from server to client."""
        with self.lock:
            self._drops += [after_bytes] * times

    def reset_faults(self) -> None:
        with self.lock:
            self._drops.clear()
            self.delay = 0.0

    # ------------------------------------------------------------------ processes
    def _start(self, vdi: str, session: str, name: str, path: Path, tls: bool) -> Export:
        self._n += 1
        sock_path = self.dir / f"{self._n}.sock"
        log = open(self.dir / f"{self._n}.log", "wb")  # noqa: SIM115 (lives as long as the export)
        argv = ["qemu-nbd", "--read-only", "--format=raw", f"--export-name={name}", f"--socket={sock_path}"]
        argv += ["--persistent", "--shared=0"]
        if tls:
            argv += [
                "--object",
                f"tls-creds-x509,id=tls0,dir={self.creds},endpoint=server,verify-peer=off",
                "--tls-creds=tls0",
            ]
        proc = subprocess.Popen(
            [*argv, str(path)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                log.close()
                raise RuntimeError(f"qemu-nbd failed: {(self.dir / f'{self._n}.log').read_text()}")
            if sock_path.exists():
                with socket.socket(socket.AF_UNIX) as probe:
                    try:
                        probe.connect(str(sock_path))
                        break
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                log.close()
                raise RuntimeError("qemu-nbd did not start listening")
            time.sleep(0.01)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        e = Export(vdi, session, name, sock_path, proc, log, listener)
        t = threading.Thread(target=self._accept, args=(e,), name=f"nbd-relay {e.port}", daemon=True)
        e.threads.append(t)
        t.start()
        self.record("nbd-export", vdi=vdi, session=session, port=e.port, tls=tls)
        return e

    def _accept(self, e: Export) -> None:
        while True:
            try:
                client, _ = e.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._relay, args=(e, client), name="nbd-relay conn", daemon=True)
            with self.lock:
                e.threads = [x for x in e.threads if x.is_alive()]
                e.threads.append(t)
            t.start()

    def _relay(self, e: Export, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX)
        with self.lock:
            e.conns.update((client, upstream))
            drop = self._drops.pop(0) if self._drops and e.open else None
        try:
            if not e.open:
                self.record("nbd-refused", vdi=e.vdi, session=e.session, why="session ended")
                return
            upstream.connect(str(e.sock_path))
            self.record("nbd-connect", vdi=e.vdi, session=e.session, port=e.port)
            back = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            back.start()
            sent = 0
            while True:
                try:
                    data = upstream.recv(PIECE)
                except OSError:
                    break
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                if drop is not None and sent + len(data) >= drop:
                    with contextlib.suppress(OSError):
                        client.sendall(data[: drop - sent])
                    self.record("nbd-drop", vdi=e.vdi, after=drop)
                    break
                try:
                    client.sendall(data)
                except OSError:
                    break
                sent += len(data)
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            back.join(10)
        except OSError:
            pass
        finally:
            with self.lock:
                e.conns.discard(client)
                e.conns.discard(upstream)
            client.close()
            upstream.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(PIECE)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _stop(self, e: Export) -> None:
        with contextlib.suppress(OSError):
            e.listener.shutdown(socket.SHUT_RDWR)
        e.listener.close()
        with self.lock:
            conns = list(e.conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(e.threads):
            t.join(10)
        if e.proc.poll() is None:
            e.proc.terminate()
            try:
                e.proc.wait(10)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait()
        e.log.close()

    def close(self) -> None:
        with self.lock:
            exports = list(self.exports.values())
            self.exports.clear()
        for e in exports:
            self._stop(e)
