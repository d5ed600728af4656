"""The service's HTTP API: JSON under ``/api/v1`` over HTTPS (FastAPI, served by Hypercorn's trio
worker), and ``/metrics`` for Prometheus.

The endpoints are thin: each validates its names, then calls what the CLI calls (the catalog,
recovery/sessions.py, the file-restore service, the scheduler) and answers what the matching CLI
command prints with ``--json``, so a script may use either.  Blocking work runs in worker threads
(``trio.to_thread.run_sync(..., limiter=service.limiter)``), each with a repository handle of its own
from :class:`RepoViews` (its own catalog connection: one SQLite connection is not shared by threads,
and the datastores see the API's commits as another connection's, see ``Vfs._refresh``).

- Auth, roles, the rate limit of wrong tokens and the audit log of mutations: service/auth.py.
  ``/api/v1/health`` and ``/api/v1/openapi.json`` need no token; everything else does.
- Errors are JSON with the CLI's shape (``{"error", "message", "hint", "exit_code"}``): a
  VmrecoverError by its exit code (not found 404, bad input 400, locked 409, no space 507, hypervisor
  502, anything else 500), a malformed body 400 (not JSON) or 422 (wrong fields or types), a body over
  :data:`MAX_BODY` 413, an unknown path 404.
- Every name a path or body carries (VM, point, session, job, disk, guest path) is checked before it
  is used: ``check_name`` for VM, session, job and disk names (no ``/``, ``\\``, ``..``, NUL...), a
  plain pattern for point selectors, no ``..`` component in guest paths and migrate destinations.
- Single-file restore goes through the repository's file-restore service (files/service.py, the
  appliances the CLI's ``files`` commands use): a download is copied out by it into a private folder
  under ``REPO/run/api-downloads/`` as a tar (its safety rules: no device nodes, no setuid bits),
  opened, the folder removed, and then streamed: a file as itself, a folder as the tar.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Annotated, Any, Literal, TypeVar

import trio
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import BadInput, ExitCode, Incompatible, LockedError, NotFound, VmrecoverError
from ..hypervisors import publishing
from ..recovery import qemu_run, sessions
from ..repo.catalog import Catalog, check_name
from ..repo.keys import PASSPHRASE_ENV
from ..repo.repository import Repository
from . import config, console, metrics, tls
from .auth import (
    LOCAL_SCOPE_KEY,
    ASGIApp,
    AuthMiddleware,
    FailureLimiter,
    Message,
    OnResponseStart,
    Receive,
    Scope,
    Send,
    WebSessions,
    error_doc,
    send_json,
)
from .client import local_socket, unix_address
from .core import JobScheduler, Service, Unavailable
from .push_api import push_routes

log = logging.getLogger("vmrecover.api")
T = TypeVar("T")

API = "/api/v1"
MAX_BODY = 64 * 1024  # bytes of a request body (push ingest's routes will set their own limit)
DRAIN_MAX = 1 << 20  # bytes of a refused body read (and dropped) so that its 413 reaches the client
STREAM_BLOCK = 1 << 20
CONSOLE_TAIL = 64 * 1024  # bytes of a qemu session's serial console the API returns
PUBLIC = frozenset({f"{API}/health", f"{API}/openapi.json"})
STATUS = {
    ExitCode.AUTH: 403,  # credentials given for something else (a guest account) refused: not our token
    ExitCode.NOT_FOUND: 404, ExitCode.BAD_INPUT: 400, ExitCode.USAGE: 400, ExitCode.LOCKED: 409,
    ExitCode.INCOMPATIBLE: 409, ExitCode.NO_SPACE: 507, ExitCode.UNREACHABLE: 502, ExitCode.CERTIFICATE: 502,
}  # fmt: skip
_POINT = re.compile(r"[0-9A-Za-z][0-9A-Za-z:.\-]{0,63}")
MigrateFormat = Literal["raw", "qcow2", "vmdk", "vmdk-stream", "vhd", "vhdx"]  # restore.RESTORE_FORMATS


# ------------------------------------------------------------------------------------------ state
class RepoViews:
    """Handles on the service's repository for worker threads: each a shallow copy of it with a
    catalog connection of its own, lent to one call at a time and kept for the next (at most as many
    as calls ran at once, i.e. the service's limiter)."""

    def __init__(self, repo: Repository) -> None:
        self.base = repo
        self._lock = threading.Lock()
        self._free: list[Repository] = []
        self._all: list[Repository] = []

    @contextlib.contextmanager
    def view(self) -> Iterator[Repository]:
        with self._lock:
            repo = self._free.pop() if self._free else None
        if repo is None:
            repo = copy.copy(self.base)
            repo.catalog = Catalog(self.base.root / "catalog.sqlite")
            with self._lock:
                self._all.append(repo)
        try:
            yield repo
        finally:
            with self._lock:
                self._free.append(repo)

    def close(self) -> None:
        with self._lock:
            for repo in self._all:
                repo.catalog.close()
            self._all.clear()
            self._free.clear()


@dataclass
class ApiState:
    """What the routes of one app share (``app.state.vmrecover``)."""

    service: Service
    repos: RepoViews
    failures: FailureLimiter = field(default_factory=FailureLimiter)
    web: WebSessions = field(default_factory=WebSessions)  # the console's sign-ins
    config_lock: trio.Lock = field(default_factory=trio.Lock)  # one change of jobs.d/ at a time
    chunk_usage: metrics.ChunkUsage = field(default_factory=metrics.ChunkUsage)
    # (method, path pattern, limit or None for none) of routes that take larger bodies than MAX_BODY
    # (push ingest's disk streams); the first that matches a request applies
    body_limits: list[tuple[str, re.Pattern[str], int | None]] = field(default_factory=list)
    reaper: Callable[[], Awaitable[None]] | None = None  # push ingest's: drops abandoned uploads

    def body_limit(self, scope: Scope) -> int | None:
        for method, pattern, limit in self.body_limits:
            if scope["method"] == method and pattern.fullmatch(scope["path"]):
                return limit
        return MAX_BODY

    async def blocking(self, fn: Callable[[Repository], T]) -> T:
        """fn(a repository handle) in a worker thread, within the service's limiter."""

        def run() -> T:
            with self.repos.view() as repo:
                return fn(repo)

        return await trio.to_thread.run_sync(run, limiter=self.service.limiter)

    async def thread(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self.service.limiter)

    def scheduler(self) -> JobScheduler:
        if self.service.scheduler is None:
            raise Unavailable(
                "the scheduler is not running", hint="jobs need 'vmrecover serve' with its scheduler"
            )
        return self.service.scheduler

    def downloads(self) -> Path:
        """``REPO/run/api-downloads/``: private scratch space of file downloads (blocking)."""
        d = self.service.repo.run_dir() / "api-downloads"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def files_env(self) -> dict[str, str]:
        """The environment the file-restore service starts with (an encrypted repository's passphrase)."""
        env = dict(os.environ)
        if self.service.passphrase is not None:
            env.setdefault(PASSPHRASE_ENV, self.service.passphrase)
        return env

    def close(self) -> None:
        self.repos.close()


# ------------------------------------------------------------------------------------------ names
def _vm(name: str) -> str:
    return check_name("VM", name)


def _point(selector: str) -> str:
    if not _POINT.fullmatch(selector) or ".." in selector:
        raise BadInput(
            f"invalid restore point {selector!r}",
            hint="use 'latest', a point id (or a prefix of it), or a prefix of its time",
        )
    return selector


def _target(vm: str, point: str) -> str:
    return f"{_vm(vm)}@{_point(point)}"


def _guest_path(path: str) -> str:
    bad = (
        not path or len(path) > 4096 or not path.isprintable()
        or ".." in re.split(r"[/\\]", path)
    )  # fmt: skip
    if bad:
        raise BadInput(
            f"invalid guest path {path!r}",
            hint="an absolute path in the guest (/etc/hosts, C:\\Users), without '..' components",
        )
    return path


def _destination(to: str) -> Path:
    if not to.startswith("/") or "\0" in to or ".." in to.split("/") or not to.isprintable():
        raise BadInput(f"invalid destination {to!r}", hint="an absolute path on the appliance, without '..'")
    return Path(to)


# ------------------------------------------------------------------------------------------ responses
def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(doc, default=str), status_code=status, headers=headers, media_type="application/json"
    )


def _status(exc: VmrecoverError) -> int:
    return int(getattr(exc, "http_status", 0)) or STATUS.get(exc.exit_code, 500)


def _error(exc: VmrecoverError) -> Response:
    doc = exc.to_json()
    doc.setdefault("hint", None)
    return _json(doc, _status(exc))


def _disposition(name: str) -> str:
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


class _Streaming(StreamingResponse):
    """A StreamingResponse that only streams.  Starlette's also listens for the client's disconnect in
    an anyio task group that it cancels with ``CancelScope.cancel(reason)``, which this system's trio
    (0.22; anyio wants 0.32) does not take.  A client gone mid-stream makes Hypercorn drop the rest."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream_response(send)


class ErrorDoc(BaseModel):
    error: str = Field(description="the error's class, as the CLI's --json names it (NotFound, BadInput...)")
    message: str
    hint: str | None
    exit_code: int = Field(description="the CLI's exit code for this error")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BootCheckStart(_Body):
    timeout: float = Field(300, ge=10, le=3600, description="seconds to wait for the boot")
    expect: str | None = Field(
        None, max_length=200, description="serial console text (a regular expression) that means booted; "
        "default: a login prompt"
    )  # fmt: skip
    memory: str = Field("1G", pattern=r"^[1-9][0-9]{0,5}[MG]$", description="the VM's memory")


class SessionStart(_Body):
    vm: str = Field(description="the VM's name in the repository")
    point: str = Field("latest", description="'latest', a point id or prefix, or a prefix of its time")
    name: str | None = Field(None, description="the session's name (default: <vm>-<6 hex>)")
    to: str | None = Field(
        None, pattern=r"^(vmware|xen)://[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="run the VM on a registered hypervisor: vmware://NAME (an NFS datastore on a host) or "
        "xen://NAME (an NFS SR on the pool); none: the session is served by the datastores only",
    )  # fmt: skip
    host: str | None = Field(None, max_length=255, description="vmware: the host (default: the first one)")
    datastore_name: str | None = Field(None, max_length=80, description="vmware: the NFS datastore's name")
    power_on: bool = Field(False, description="with `to`: power the VM on")
    run: Literal["qemu"] | None = Field(
        None, description="run the VM here, under qemu from the service's NFS export (no network device)"
    )
    memory: str = Field("1G", pattern=r"^[1-9][0-9]{0,5}[MG]$", description="with run: the VM's memory")
    cpus: int = Field(1, ge=1, le=8, description="with run: its vCPUs")

    @model_validator(mode="after")
    def _one_place(self) -> SessionStart:
        if self.run is not None and self.to is not None:
            raise ValueError("give run (here) or to (a hypervisor), not both")
        return self


class SessionMigrate(_Body):
    to: str | None = Field(
        None, description="write the disk as an image here, an absolute path on the appliance"
    )
    to_datastore: str | None = Field(
        None, max_length=80, description="a session on vSphere: Storage vMotion to this datastore, then end"
    )  # fmt: skip
    to_sr: str | None = Field(
        None, max_length=80, description="a session on a XenServer pool: move its disks to this SR, then end"
    )  # fmt: skip
    disk: str | None = Field(None, description="the disk (needed when the VM has several)")
    format: MigrateFormat = "qcow2"
    overwrite: bool = False

    @model_validator(mode="after")
    def _one_destination(self) -> SessionMigrate:
        if sum(x is not None for x in (self.to, self.to_datastore, self.to_sr)) != 1:
            raise ValueError("give exactly one of to, to_datastore, to_sr")
        return self


class IntoVm(_Body):
    paths: list[Annotated[str, Field(max_length=4096)]] = Field(
        min_length=1, max_length=256, description="guest paths in the point"
    )
    into: str = Field(
        pattern=r"^vmware://[A-Za-z0-9][A-Za-z0-9._-]{0,63}/[^/\x00-\x1f]{1,255}$",
        description="the running VM: vmware://HYPERVISOR/VM (name or moref)",
    )
    guest_user: str = Field(min_length=1, max_length=255, description="a guest account")
    guest_password: SecretStr = Field(description="its password (never logged or echoed)")
    guest_dir: str | None = Field(None, max_length=4096, description="put the copies in this guest folder")
    overwrite: bool = False


class NfsAllow(_Body):
    allow: list[Annotated[str, Field(max_length=64)]] = Field(
        max_length=64, description="addresses or networks (CIDR) the NFS export must serve from now on"
    )


# ------------------------------------------------------------------------------------------ the app
def build_app(service: Service) -> FastAPI:
    """The API of *service* as an ASGI application (serve_api serves it; tests may too)."""
    state = ApiState(service, RepoViews(service.repo))
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorDoc, "description": what}
        for code, what in [(400, "bad input"), (401, "no token, or a wrong one"), (403, "a read-only token"),
                           (404, "not found"), (422, "wrong fields or types"), (429, "too many wrong tokens")]
    }  # fmt: skip
    app = FastAPI(
        title="vmrecover", version=__version__, openapi_url=f"{API}/openapi.json", docs_url=None,
        redoc_url=None, responses=errors,
        description="Restore points, jobs, recovery sessions and single-file restore of a vmrecover "
        "appliance. Every endpoint but health and the console's sign-in takes 'Authorization: Bearer "
        "TOKEN', or the console's session cookie (with X-CSRF-Token on every change).",
    )  # fmt: skip
    app.state.vmrecover = state
    app.add_middleware(_BodyLimit, limit_for=state.body_limit)
    app.add_middleware(
        AuthMiddleware,
        api=lambda: service.config.api,
        limiter=state.failures,
        public=PUBLIC | console.PUBLIC,
        sessions=state.web,
    )
    app.add_middleware(_Count)
    app.add_middleware(console.SecurityHeaders)
    _handlers(app)
    _openapi(app)
    _repository_routes(app, state)
    _session_routes(app, state)
    _boot_check_routes(app, state)
    _job_routes(app, state)
    _file_routes(app, state)
    state.reaper = push_routes(app, state, API, _json)
    console.console_routes(app, state, _json)
    return app


class _BodyLimit:
    """Request bodies larger than their route's limit (ApiState.body_limit) are refused with a JSON
    413: at once when Content-Length says so, else when the reading passes the limit."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Any], *, limit_for: Callable[[Scope], int | None]
                 ) -> None:  # fmt: skip
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = next((bytes(v).decode("latin-1") for k, v in scope.get("headers") or ()
                         if k.lower() == b"content-length"), None)  # fmt: skip
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            too_large = declared.isdigit()
            doc = error_doc("BadInput", f"the request body is larger than {limit} bytes" if too_large
                            else f"Content-Length {declared!r} is not a number", exit_code=ExitCode.BAD_INPUT,
                            hint="send less" if too_large else None)  # fmt: skip
            if too_large and int(declared) <= DRAIN_MAX:
                # read the rest first: a client still sending would see the connection reset instead
                while (await receive()).get("more_body"):
                    pass
            await send_json(send, 413 if too_large else 400, doc, [(b"connection", b"close")])
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


class _Count(OnResponseStart):
    """Counts answered requests (metrics.api_requests), refusals included."""

    def started(self, scope: Scope, message: Message) -> None:
        metrics.api_requests.labels(scope["method"], str(message["status"])).inc()


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(VmrecoverError)
    async def vmrecover_error(request: Request, exc: VmrecoverError) -> Response:
        if _status(exc) >= 500 and not isinstance(exc, Unavailable):
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        errs = list(exc.errors())
        first = errs[0] if errs else {"loc": (), "msg": "invalid request", "type": "?"}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            pos = first["loc"][-1] if first.get("loc") else "?"
            doc = error_doc("BadInput", f"the body is not valid JSON: {ctx.get('error', '?')} (at character "
                            f"{pos})", hint="send a JSON object", exit_code=ExitCode.BAD_INPUT)  # fmt: skip
            return _json(doc, 400)
        where = ".".join(str(p) for p in first.get("loc", ()))
        doc = error_doc("BadInput", f"{where}: {first.get('msg')}", exit_code=ExitCode.BAD_INPUT,
                        hint=f"see {API}/openapi.json for what this endpoint takes")  # fmt: skip
        doc["details"] = {"errors": [{k: e.get(k) for k in ("loc", "msg", "type")} for e in errs]}
        return _json(doc, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = exc.status_code
        if code == 404:
            doc = error_doc("NotFound", f"no such endpoint: {request.method} {request.url.path}",
                            hint=f"see {API}/openapi.json", exit_code=ExitCode.NOT_FOUND)  # fmt: skip
        elif code == 405:
            doc = error_doc("UsageError", f"{request.method} is not allowed on {request.url.path}",
                            hint=f"see {API}/openapi.json", exit_code=ExitCode.USAGE)  # fmt: skip
        elif code == 413:
            doc = error_doc("BadInput", f"the request body is larger than {MAX_BODY} bytes",
                            hint="send less", exit_code=ExitCode.BAD_INPUT)  # fmt: skip
        elif code < 500:
            doc = error_doc("BadInput", str(exc.detail), exit_code=ExitCode.BAD_INPUT)
        else:
            doc = error_doc("VmrecoverError", str(exc.detail))
        return _json(doc, code, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _json(error_doc("VmrecoverError", f"internal error ({type(exc).__name__})",
                               hint="see the service's log"), 500)  # fmt: skip


def _openapi(app: FastAPI) -> None:
    """The document says how to authenticate: a bearer token everywhere but health."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)  # fmt: skip
            doc.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "vmrecover token new NAME"}
            }
            doc["security"] = [{"bearer": []}]
            for path, ops in doc.get("paths", {}).items():
                if path in PUBLIC:
                    for op in ops.values():
                        op["security"] = []
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------ routes
def _point_doc(repo: Repository, point: Any) -> dict[str, Any]:
    from ..cli.repo_cmds import _point_doc as doc  # what `vmrecover list VM --json` shows of a point

    return doc(repo, point)


def _repository_routes(app: FastAPI, st: ApiState) -> None:
    service = st.service

    @app.get(f"{API}/health", tags=["service"])
    async def health() -> Response:
        """Whether the service answers (no token needed)."""
        uptime = round(time.time() - service.started, 3) if service.started else None
        return _json({"status": "ok", "version": __version__, "uptime_s": uptime})

    @app.get(f"{API}/repository", tags=["service"])
    async def repository(fresh: bool = False) -> Response:
        """Usage: contents (from the catalog), stored chunks (a walk of chunks/, reused for 5 minutes
        unless fresh=true) and the filesystem."""
        return _json(await st.blocking(lambda repo: metrics.usage(repo, st.chunk_usage, fresh=fresh)))

    @app.get("/metrics", tags=["service"], include_in_schema=True)
    async def prometheus() -> Response:
        """Prometheus text exposition (a token is needed, of either role)."""
        sched = service.scheduler
        jobs = sched.jobs() if sched is not None else None
        runs = sched.history(None, 500) if sched is not None else None
        known = {"uptime": time.time() - service.started if service.started else 0.0, "cache": service.cache,
                 "jobs": jobs, "runs": runs}  # fmt: skip
        facts = await st.blocking(lambda repo: metrics.gather(repo, st.chunk_usage, **known))
        body = await st.thread(lambda: metrics.exposition(facts))
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get(f"{API}/hypervisors", tags=["service"])
    async def hypervisors() -> Response:
        """The registered hypervisors (`vmrecover hypervisor add`): where sessions may run (no secret)."""
        from ..hypervisors import PLATFORMS, Registry

        found = await st.thread(lambda: Registry(service.repo.root).all())
        return _json([{"name": h.name, "scheme": h.scheme, "platform": PLATFORMS[h.scheme], "host": h.host}
                      for h in found])  # fmt: skip

    @app.get(f"{API}/vms", tags=["restore points"])
    async def vms() -> Response:
        """The VMs (as `vmrecover list --json`)."""
        return _json({"vms": await st.blocking(lambda repo: repo.catalog.vms())})

    @app.get(f"{API}/vms/{{vm}}/points", tags=["restore points"])
    async def points(vm: str) -> Response:
        """A VM's restore points with their disks (as `vmrecover list VM --json`)."""
        name = _vm(vm)

        def run(repo: Repository) -> dict[str, Any]:
            if not repo.catalog.has_vm(name):
                raise NotFound(f"no VM named {name!r} in the repository")
            return {"vm": name, "points": [_point_doc(repo, p) for p in repo.catalog.points(name)]}

        return _json(await st.blocking(run))

    @app.get(f"{API}/vms/{{vm}}/points/{{point}}", tags=["restore points"])
    async def point(vm: str, point: str) -> Response:
        """One restore point ('latest', an id or prefix, a time prefix) with its disks."""
        target = _target(vm, point)
        return _json(await st.blocking(lambda repo: _point_doc(repo, repo.catalog.resolve(target))))


def _boot_check_routes(app: FastAPI, st: ApiState) -> None:
    checks = f"{API}/vms/{{vm}}/points/{{point}}/boot-checks"

    @app.get(checks, tags=["boot health checks"])
    async def list_boot_checks(vm: str, point: str, limit: int = Query(20, ge=1, le=1000)) -> Response:
        """A point's boot health checks, newest first (verdict, detail, seconds, accelerator)."""
        target = _target(vm, point)

        def run(repo: Repository) -> dict[str, Any]:
            p = repo.catalog.resolve(target)
            return {"vm": p.vm, "point": p.id,
                    "checks": [c.summary() for c in repo.catalog.boot_checks(p.id, limit=limit)]}  # fmt: skip

        return _json(await st.blocking(run))

    def one(repo: Repository, target: str, check_id: int) -> Any:
        p = repo.catalog.resolve(target)
        found = [c for c in repo.catalog.boot_checks(p.id, limit=1000, screenshots=True) if c.id == check_id]
        if not found:
            raise NotFound(f"no boot check {check_id} of {p.vm}@{p.id}", hint=f"see {checks}")
        return found[0]

    @app.get(f"{checks}/{{check_id}}/screenshot", tags=["boot health checks"])
    async def boot_check_screenshot(vm: str, point: str, check_id: int) -> Response:
        """The screen at the check's verdict (PNG)."""
        target = _target(vm, point)
        check = await st.blocking(lambda repo: one(repo, target, check_id))
        if check.screenshot is None:
            raise NotFound(f"boot check {check_id} has no screenshot (qemu had ended before it was taken)")
        return Response(check.screenshot, media_type="image/png")

    @app.get(f"{checks}/{{check_id}}/serial", tags=["boot health checks"])
    async def boot_check_serial(vm: str, point: str, check_id: int) -> Response:
        """The serial console's last 64 KiB at the check's verdict (text)."""
        target = _target(vm, point)
        check = await st.blocking(lambda repo: one(repo, target, check_id))
        return Response(check.serial, media_type="text/plain; charset=utf-8")

    @app.post(checks, tags=["boot health checks"], status_code=201)
    async def run_boot_check(vm: str, point: str, body: BootCheckStart) -> Response:
        """Boot the point in a throw-away session under qemu here (no network) and judge it (as
        `vmrecover verify --boot`); answers with the result when it is decided (up to `timeout`)."""
        from ..recovery.healthcheck import boot_check

        target = _target(vm, point)

        def run(repo: Repository) -> dict[str, Any]:
            p = repo.catalog.resolve(target)
            check = boot_check(repo, p, timeout=body.timeout, expect=body.expect, memory=body.memory)
            return {"vm": p.vm, **check.summary()}

        return _json(await st.blocking(run), 201)


def _under_qemu(repo: Repository, name: str) -> qemu_run.Published:
    target = qemu_run.published(repo, repo.catalog.session(name))
    if target is None:
        raise NotFound(f"session {name} does not run under qemu here", hint="start it with run: qemu")
    return target


def _session_routes(app: FastAPI, st: ApiState) -> None:
    @app.get(f"{API}/sessions", tags=["recovery sessions"])
    async def list_sessions() -> Response:
        """Recovery sessions, however started (as `vmrecover recover list --json`)."""
        return _json(await st.blocking(lambda repo: [sessions.info(repo, s).__dict__
                                                     for s in repo.catalog.sessions()]))  # fmt: skip

    @app.post(f"{API}/sessions", tags=["recovery sessions"], status_code=201)
    async def start_session(body: SessionStart) -> Response:
        """Start a recovery session of a restore point, served by the datastores (FUSE, NFS); with `to`,
        also run its VM on a hypervisor from the service's NFS export (as `vmrecover recover start
        --to`); answers once the VM is there."""
        target = _target(body.vm, body.point)
        name = None if body.name is None else check_name("session", body.name)

        def run(repo: Repository) -> dict[str, Any]:
            point = repo.catalog.resolve(target)
            if body.to is None:
                if body.host or body.datastore_name or body.power_on:
                    raise BadInput("host, datastore_name and power_on go with to", hint="give to as well")
                session = sessions.start(repo, point, name)
                if body.run == "qemu":
                    try:
                        qemu_run.publish(repo, session, point, memory=body.memory, cpus=body.cpus)
                    except BaseException:
                        sessions.stop(repo, session.name)
                        raise
            else:
                session = publishing.start_on(
                    repo, point, body.to, name=name, host=body.host, datastore_name=body.datastore_name,
                    power_on=body.power_on, passphrase=st.service.passphrase,
                )  # fmt: skip
            return sessions.info(repo, session).__dict__

        return _json(await st.blocking(run), 201)

    @app.delete(f"{API}/sessions/{{name}}", tags=["recovery sessions"])
    async def stop_session(name: str, force: bool = False) -> Response:
        """Stop a session: its writes are discarded; one running on a hypervisor is undone there first
        (`force`: dropped here even if that fails)."""
        check_name("session", name)

        def run(repo: Repository) -> dict[str, Any]:
            s = publishing.stop(repo, name, force=force)
            return {"name": s.name, "id": s.id, "stopped": True}

        return _json(await st.blocking(run))

    @app.post(f"{API}/sessions/{{name}}/migrate", tags=["recovery sessions"])
    async def migrate_session(name: str, body: SessionMigrate) -> Response:
        """Move a session off the appliance: its current disk as a standalone image here (`to`), or its
        VM to production storage on its hypervisor (`to_datastore`, `to_sr`), which ends the session;
        answers when done."""
        check_name("session", name)
        disk = None if body.disk is None else check_name("disk", body.disk)
        dest = None if body.to is None else _destination(body.to)

        def run(repo: Repository) -> dict[str, Any]:
            if dest is None:
                return publishing.migrate_off(repo, name, datastore=body.to_datastore, sr=body.to_sr)
            session = repo.catalog.session(name)
            res = sessions.migrate(repo, session, disk, dest, fmt=body.format, overwrite=body.overwrite)
            return dict(res.__dict__)

        return _json(await st.blocking(run))

    @app.get(f"{API}/sessions/{{name}}/console", tags=["recovery sessions"])
    async def console(name: str) -> Response:
        """The end (at most 64 KiB) of the serial console of a session run under qemu here."""
        check_name("session", name)

        def run(repo: Repository) -> bytes:
            with open(_under_qemu(repo, name).console, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - CONSOLE_TAIL))
                return f.read()

        return Response(await st.blocking(run), media_type="text/plain; charset=utf-8")

    @app.get(f"{API}/sessions/{{name}}/screenshot", tags=["recovery sessions"])
    async def screenshot(name: str) -> Response:
        """The screen now (PNG) of a session run under qemu here."""
        from ..recovery.healthcheck import session_screenshot

        check_name("session", name)
        png = await st.blocking(lambda repo: session_screenshot(_under_qemu(repo, name)))
        return Response(png, media_type="image/png")

    @app.post(f"{API}/nfs/allow", tags=["recovery sessions"])
    async def nfs_allow(body: NfsAllow) -> Response:
        """Let more clients (a hypervisor's hosts) mount the service's NFS export, at once and until the
        service stops (`vmrecover recover start --to` asks this when the service serves the export)."""
        allow = st.service.nfs_allow
        if allow is None:
            raise Unavailable(
                "the service does not serve NFS", hint="set [nfs] enabled = true and restart it"
            )
        try:
            added = allow.grow(body.allow)
        except ValueError as exc:
            raise BadInput(f"not an address or network: {exc}") from None
        if added:
            log.info("the NFS export allows %s from now", ", ".join(added))
        return _json({"added": added, "allow": allow.strings()})


def _job_routes(app: FastAPI, st: ApiState) -> None:
    def known(name: str) -> str:
        check_name("job", name)
        names = [j.name for j in st.service.config.jobs]
        if name not in names:
            raise NotFound(f"no job named {name!r}", hint=f"jobs: {', '.join(names) or 'none'}")
        return name

    @app.get(f"{API}/jobs", tags=["jobs"])
    async def jobs() -> Response:
        """Every configured job: schedule, next run, state, its latest run, and whether the console
        may edit it (`managed`: it lives in jobs.d/)."""
        jobs = st.scheduler().jobs()
        ours = await st.thread(lambda: config.managed_jobs(st.service.config_path))
        return _json([j | {"managed": j["name"] in ours} for j in jobs])

    @app.post(f"{API}/jobs/{{name}}/run", tags=["jobs"], status_code=202)
    async def run_job(name: str) -> Response:
        """Queue a run of the job now; answers its run id at once (see /runs/{id})."""
        sched = st.scheduler()
        known(name)
        try:
            run_id = await sched.run_now(name)
        except KeyError:
            raise NotFound(f"no job named {name!r}") from None
        return _json({"job": name, "run": run_id}, 202)

    @app.get(f"{API}/jobs/{{name}}/definition", tags=["jobs"])
    async def definition(name: str) -> Response:
        """The job as configured, and whether the console may edit it (`managed`: it lives in
        jobs.d/; jobs of the configuration file are edited there)."""
        job = st.service.config.job(known(name))
        managed = name in await st.thread(lambda: config.managed_jobs(st.service.config_path))
        return _json({"job": job.model_dump(mode="json"), "managed": managed})

    @app.put(f"{API}/jobs/{{name}}", tags=["jobs"])
    async def put_job(name: str, body: Annotated[dict[str, Any], Body()]) -> Response:
        """Create or replace a job of jobs.d/ (the job's keys as in the configuration, without its
        name), then apply the configuration as a reload does.  Hooks are refused: they run commands
        on the appliance, and are set in the configuration file only."""
        check_name("job", name)
        if {"pre_hook", "post_hook", "hook_timeout"} & set(body):
            raise BadInput("hooks cannot be set from the API: they run commands on the appliance",
                           hint=f"set pre_hook/post_hook in {st.service.config_path}")  # fmt: skip
        async with st.config_lock:
            path = st.service.config_path
            ours = await st.thread(lambda: config.managed_jobs(path))
            if name not in ours and any(j.name == name for j in st.service.config.jobs):
                raise Incompatible(f"job {name!r} is defined in {path}", hint="edit it there (then reload)")
            try:
                job = config.Job.model_validate({**body, "name": name})
            except ValidationError as exc:
                e = exc.errors()[0]
                where = ".".join(str(x) for x in e["loc"]) or "job"
                raise BadInput(f"job {name!r}: {where}: {e['msg'].removeprefix('Value error, ')}") from None
            await st.thread(lambda: config.save_job(path, job))
            await _apply_configuration(st)
        return _json({"job": job.model_dump(mode="json"), "managed": True, "created": name not in ours})

    @app.delete(f"{API}/jobs/{{name}}", tags=["jobs"])
    async def delete_job(name: str) -> Response:
        """Delete a job of jobs.d/ (its runs' history stays)."""
        known(name)
        async with st.config_lock:
            path = st.service.config_path
            if name not in await st.thread(lambda: config.managed_jobs(path)):
                raise Incompatible(f"job {name!r} is defined in {path}", hint="delete it there (then reload)")
            await st.thread(lambda: config.delete_job(path, name))
            await _apply_configuration(st)
        return _json({"deleted": name})

    @app.get(f"{API}/jobs/{{name}}/history", tags=["jobs"])
    async def history(name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:
        """The job's latest runs, newest first."""
        sched = st.scheduler()
        return _json(sched.history(check_name("job", name), limit))  # (a job no longer configured too)

    @app.get(f"{API}/runs", tags=["jobs"])
    async def runs(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:
        """The latest runs of every job (also of jobs no longer configured), newest first."""
        return _json(st.scheduler().history(None, limit))

    @app.get(f"{API}/runs/{{run_id}}", tags=["jobs"])
    async def run(run_id: int) -> Response:
        """One run: state, progress while it runs, figures, error and log lines."""
        try:
            return _json(st.scheduler().run(run_id))
        except KeyError:
            raise NotFound(f"no run {run_id}", hint="see /api/v1/jobs/{name}/history") from None


async def _apply_configuration(st: ApiState) -> None:
    """Take the configuration file (and jobs.d/) as it is now, as SIGHUP does."""
    from .daemon import reload

    if not await reload(st.service):
        raise VmrecoverError("the configuration could not be read again", hint="see the service's log")


def _file_routes(app: FastAPI, st: ApiState) -> None:
    files = f"{API}/vms/{{vm}}/points/{{point}}/files"

    def call(req: dict[str, Any], on_entries: Callable[[list[dict[str, Any]]], None] = lambda e: None) -> Any:
        from ..files.service import request

        return request(st.service.repo.root, req, progress=lambda text: log.debug("files: %s", text),
                       on_entries=on_entries, env=st.files_env())  # fmt: skip

    @app.post(f"{files}/into-vm", tags=["single-file restore"])
    async def into_vm(vm: str, point: str, body: IntoVm) -> Response:
        """Restore guest files of a point into a running guest through the hypervisor's guest
        operations (VMware Tools; as `vmrecover files get VM@POINT PATH... --into-vm`): each item sent,
        or skipped with why (an existing file without `overwrite`)."""
        from ..hypervisors.vmware.guest import restore_into_vm

        target = _target(vm, point)
        paths = [_guest_path(p) for p in body.paths]
        guest_dir = None if body.guest_dir is None else _guest_path(body.guest_dir)
        doc = await st.thread(lambda: restore_into_vm(
            st.service.repo.root, body.into, target, paths, user=body.guest_user,
            password=body.guest_password.get_secret_value(), guest_dir=guest_dir, overwrite=body.overwrite,
            fetch=call,
        ))  # fmt: skip
        return _json(doc)

    @app.get(files, tags=["single-file restore"])
    async def list_folder(vm: str, point: str, path: str = "/") -> Response:
        """List a guest folder (as `vmrecover files ls VM@POINT PATH --json`); the first request of a
        point starts its libguestfs appliance (about 20 s under TCG)."""
        target, guest = _target(vm, point), _guest_path(path)
        entries: list[dict[str, Any]] = []
        doc = await st.thread(lambda: call({"op": "ls", "target": target, "path": guest}, entries.extend))
        return _json(doc | {"entries": entries})

    @app.get(f"{API}/vms/{{vm}}/files/find", tags=["single-file restore"])
    async def find(vm: str, pattern: str, points: Literal["all", "latest"] = "all") -> Response:
        """Guest paths whose name matches *pattern* (``*.conf``; with a ``/``: the whole path) in each
        of the VM's points (as `vmrecover files find`): one appliance per point, started in turn."""
        name, pat = _vm(vm), console.check_pattern(pattern)
        found: list[dict[str, Any]] = []
        req = {"op": "find", "vm": name, "pattern": pat, "points": points}
        doc = await st.thread(lambda: call(req, found.extend))
        return _json(doc | {"entries": found})

    @app.get(f"{API}/vms/{{vm}}/files/history", tags=["single-file restore"])
    async def file_history(vm: str, path: str) -> Response:
        """One guest path across the VM's points, oldest first: which points hold which version
        (kind, size, mode, time, SHA-256) and what changed from the point before (as `vmrecover files
        history`)."""
        name, guest = _vm(vm), _guest_path(path)
        return _json(await st.thread(lambda: call({"op": "history", "vm": name, "path": guest})))

    @app.get(f"{files}/content", tags=["single-file restore"])
    async def download(vm: str, point: str, path: str, format: Literal["tar", "zip"] = "tar") -> Response:
        """Download a guest file, or a folder as a tar or a zip (modes, times and numeric owners kept;
        no device nodes, no setuid/setgid bits), streamed."""
        target, guest = _target(vm, point), _guest_path(path)

        def fetch() -> tuple[IO[bytes], int, str, str, list[IO[bytes]]]:
            work = Path(tempfile.mkdtemp(prefix="get-", dir=st.downloads()))
            try:
                doc = call({"op": "get", "target": target, "paths": [guest], "to": str(work), "tar": True,
                            "overwrite": False})  # fmt: skip
                w = doc["written"][0]
                f = open(w["to"], "rb")  # noqa: SIM115 (streamed, closed by the response)
            finally:
                shutil.rmtree(work, ignore_errors=True)  # the open file stays readable
            try:
                name = os.path.basename(w["guest_path"].rstrip("/")) or "root"
                if w["kind"] != "file":
                    return f, os.fstat(f.fileno()).st_size, f"{name}.tar", "application/x-tar", [f]
                tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115
                member = next(m for m in tar if m.isfile())
                inner = tar.extractfile(member)
                assert inner is not None
                return inner, member.size, name, "application/octet-stream", [inner, f]
            except BaseException:
                f.close()
                raise

        src, size, name, kind, opened = await st.thread(fetch)
        if kind == "application/x-tar" and format == "zip":
            blocks = console.tar_to_zip(tarfile.open(fileobj=src, mode="r:"))  # noqa: SIM115 (closed below)

            async def zipped() -> AsyncIterator[bytes]:
                try:
                    while (block := await st.thread(partial(next, blocks, None))) is not None:
                        if block:
                            yield block
                finally:
                    blocks.close()
                    for f in opened:
                        f.close()

            headers = {"content-disposition": _disposition(name.removesuffix(".tar") + ".zip")}
            return _Streaming(zipped(), media_type="application/zip", headers=headers)

        async def body() -> AsyncIterator[bytes]:
            try:
                while block := await st.thread(partial(src.read, STREAM_BLOCK)):
                    yield block
            finally:
                for f in opened:
                    f.close()

        headers = {"content-disposition": _disposition(name), "content-length": str(size)}
        return _Streaming(body(), media_type=kind, headers=headers)


# ------------------------------------------------------------------------------------------ serving
def _address(bind: str) -> tuple[str, int]:
    host, _, port = bind.split("://", 1)[-1].rpartition(":")
    return host.strip("[]"), int(port)


class _Local:
    """The app as the local socket serves it: each request is marked as having come through it
    (auth.LOCAL_SCOPE_KEY: AuthMiddleware takes it as the built-in admin "local").  Nothing a client
    sends can set a key of the scope, so only this wrapper marks a request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[LOCAL_SCOPE_KEY] = True
        await self.app(scope, receive, send)


def _bind_local(path: Path) -> socket.socket:
    """A Unix socket bound at *path*, 0600 before it listens (blocking).  A stale socket there (of a
    service that was killed) is replaced; one that answers is another service's, refused."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise Incompatible(f"{path} exists and is not a socket", hint="remove it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            try:
                with unix_address(path) as address:
                    probe.connect(address)
            except OSError:
                path.unlink()
            else:
                raise LockedError(f"another service answers on {path}",
                                  hint="stop it first: one service per repository")  # fmt: skip
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with unix_address(path) as address:
            sock.bind(address)
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


def _hypercorn_config(bind: list[str]) -> Any:
    from hypercorn.config import Config as HypercornConfig

    config = HypercornConfig()
    config.bind = bind
    config.errorlog = logging.getLogger("vmrecover.api.http")
    config.accesslog = None
    config.include_server_header = False
    return config


async def serve_api(service: Service, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API until cancelled: on ``service.config.api.listen`` over HTTPS (the certificate:
    see service/tls.py), and on the local control socket ``REPO/run/api.sock`` (client.local_socket)
    over plain HTTP.  A request through the socket needs no token: it is the built-in admin "local"
    (auth.py), since the socket is 0600 in the 0700 ``run/`` folder and so open to the service's user
    only, as docker.sock is; the CLI's job commands talk to the service there (service/client.py).
    With ``api.enabled = false`` only the socket is served (the CLI needs it).  The socket is removed
    at the end.  Started (for ``nursery.start``) once listening, with the bound (host, port) of each
    listen address (port 0 in the configuration: a free one; none when the API is disabled)."""
    from hypercorn.trio import serve

    api = service.config.api
    app = build_app(service)
    state: ApiState = app.state.vmrecover
    path = local_socket(service.repo.root)
    bound: os.stat_result | None = None
    try:
        downloads = await trio.to_thread.run_sync(state.downloads, limiter=service.limiter)
        for leftover in downloads.iterdir():  # of a service killed while copying out
            shutil.rmtree(leftover, ignore_errors=True)
        local = await trio.to_thread.run_sync(_bind_local, path, limiter=service.limiter)
        bound = path.lstat()
        async with trio.open_nursery() as nursery:
            if state.reaper is not None:
                nursery.start_soon(state.reaper)
            # Hypercorn listens on the socket it is given (fd://): made 0600 before anyone can connect
            local_config = _hypercorn_config([f"fd://{local.detach()}"])
            await nursery.start(partial(serve, _Local(app), local_config, mode="asgi"))
            addresses: list[tuple[str, int]] = []
            if api.enabled:
                cert = await trio.to_thread.run_sync(tls.ensure, api, service.config_path,
                                                     limiter=service.limiter)  # fmt: skip
                config = _hypercorn_config(list(api.listen))
                config.certfile, config.keyfile = str(cert.cert), str(cert.key)
                binds: list[str] = await nursery.start(partial(serve, app, config, mode="asgi"))
                addresses = [_address(b) for b in binds]
                log.info("HTTP API on %s (TLS certificate SHA-256 %s)", ", ".join(binds), cert.fingerprint)
            else:
                log.info("the HTTP API is disabled (api.enabled = false): only its local socket serves")
            log.info("HTTP API on the local socket %s", path)
            task_status.started(addresses)
    finally:
        state.close()
        with contextlib.suppress(OSError):
            if bound is not None and os.path.samestat(path.lstat(), bound):  # not a successor's
                path.unlink()
