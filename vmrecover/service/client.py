"""A client of the running service over its local control socket, ``REPO/run/api.sock``.

The service serves its HTTP API on that Unix socket too (service/api.py ``serve_api``): plain HTTP,
every request the built-in admin "local", as the socket's mode (0600, in the 0700 ``run/`` folder) is
the authentication (service/auth.py).  :class:`ServiceClient` speaks to it with http.client over an
AF_UNIX socket, one connection per request (no idle keep-alive connection to lose), and implements
what the CLI's job commands ask of a core.JobScheduler: ``jobs``, ``history``, ``run_now``, ``run``.

- An error the service answers (``{"error", "message", "hint", "exit_code"}``) is raised as the same
  VmrecoverError class with the same exit code (``VmrecoverError.from_json``).
- What the JobScheduler protocol reports as a KeyError (no such job for ``run_now``, no such run for
  ``run``) is a KeyError here too, so the commands say what they say of a local scheduler.
- A socket that is missing, refuses or does not answer within :data:`TIMEOUT` is an
  :class:`~vmrecover.errors.Unreachable` naming it (with the hint the caller gave: how to fix it).

This module is light (no FastAPI): the CLI imports it for every job command.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from ..errors import NotFound, Unreachable, UsageError, VmrecoverError
from .config import Config

LOCAL_SOCKET = "api.sock"  # in the repository's run/
API = "/api/v1"
TIMEOUT = 30.0  # seconds a request may take (a hung service is an error, not a hung command)
MAX_LIMIT = 1000  # of runs per history request (the API's own bound)
_SUN_PATH = 107  # bytes of a socket path that fit in a sockaddr_un (108 with its NUL)


def local_socket(repo_root: Path) -> Path:
    """The local control socket of the service of the repository at *repo_root*."""
    return repo_root / "run" / LOCAL_SOCKET


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """What bind() or connect() takes for *path* while the block runs: the path itself, or, when it is
    longer than a sockaddr_un holds, the same file through ``/proc/self/fd/N`` of its folder."""
    if len(os.fsencode(path)) <= _SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            with unix_address(self.socket_path) as address:
                sock.connect(address)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _segment(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class ServiceClient:
    """The scheduler of the service listening on *path* (see the module's docstring).  *hint*: what the
    error of a socket that does not answer advises."""

    def __init__(self, path: Path, *, hint: str | None = None, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.hint = hint or f"is the service running? ('vmrecover serve' listens on {path})"
        self.timeout = timeout

    @classmethod
    def of_repository(cls, repo_root: Path, **kw: Any) -> ServiceClient:
        """A client of the service of the repository at *repo_root* (its local socket)."""
        return cls(local_socket(repo_root), **kw)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer to *method* ``/api/v1`` *path* (with *body* as JSON, if given); an error
        answer raised as its VmrecoverError."""
        conn = _UnixConnection(self.path, self.timeout)
        headers = {"Accept": "application/json"}
        raw = None
        if body is not None:
            raw, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        try:
            conn.request(method, API + path, body=raw, headers=headers)
            reply = conn.getresponse()
            status, data = reply.status, reply.read()
        except (OSError, http.client.HTTPException) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
            raise Unreachable(
                f"the service does not answer on {self.path}: {reason}", hint=self.hint
            ) from None
        finally:
            conn.close()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if status < 400 and doc is not None:
            return doc
        if isinstance(doc, dict) and isinstance(doc.get("exit_code"), int) and "message" in doc:
            raise VmrecoverError.from_json(doc)
        raise VmrecoverError(f"the service answered {method} {API}{path} with HTTP {status} and no JSON",
                             hint="see the service's log")  # fmt: skip

    # --- core.JobScheduler -------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/jobs")
        return result

    def history(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest runs of job *name*, or of every job (also those no longer configured), newest
        first."""
        query = f"?limit={min(limit, MAX_LIMIT)}"
        path = "/runs" if name is None else f"/jobs/{_segment(name)}/history"
        runs: list[dict[str, Any]] = self.request("GET", path + query)
        return runs

    async def run_now(self, name: str) -> int:
        try:
            doc = await trio.to_thread.run_sync(self.request, "POST", f"/jobs/{_segment(name)}/run")
        except NotFound:
            raise KeyError(name) from None
        return int(doc["run"])

    def run(self, run_id: int) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = self.request("GET", f"/runs/{int(run_id)}")
        except NotFound:
            raise KeyError(run_id) from None
        return doc

    def reload(self, config: Config) -> None:
        raise UsageError(
            "a running service reads its configuration again on SIGHUP, not through this client",
            hint="systemctl reload vmrecover (or kill -HUP the service's pid)",
        )
