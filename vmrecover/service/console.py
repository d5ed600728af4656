"""The web console: a page and its assets served at ``/`` by the API's own app (same origin, same TLS),
the sign-in that gives a browser its session cookie, and the few API routes only the console needs
(an overview for the dashboard, a run's progress as server-sent events, file search and history).

The page (``web/``: index.html, console.js, console.css) is static and holds no data: everything it
shows comes from ``/api/v1`` with the session's cookie, so a page loaded without a sign-in shows the
sign-in form and nothing else, and every API call without one is a 401 (auth.py has the rules:
cookies, CSRF, revocation).  No asset comes from elsewhere: the Content-Security-Policy allows this
origin only (no inline script or style, no framing).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
import zipfile
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from importlib import resources
from tarfile import TarFile
from typing import TYPE_CHECKING, Any, Literal

import trio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from ..errors import ExitCode
from . import auth
from .auth import Message, Scope

if TYPE_CHECKING:
    from ..repo.repository import Repository
    from .api import ApiState

log = logging.getLogger("vmrecover.api")

API = "/api/v1"
LOGIN = f"{API}/console/login"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
PUBLIC = frozenset({"/", LOGIN, *(f"/console/{name}" for name in ASSETS)})
FINISHED = ("succeeded", "failed", "interrupted")  # scheduler.FINISHED (not imported: the scheduler is heavy)
EVENT_POLL = 0.5  # seconds between looks at a running job's progress
HEARTBEAT = 15.0  # seconds: an SSE comment keeps proxies from closing a quiet stream
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"strict-transport-security", b"max-age=31536000"),
    (b"content-security-policy", CSP.encode()),
]


class SignIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    token: SecretStr | None = Field(None, max_length=512, description="an API token")
    user: str | None = Field(None, max_length=64, description="a local user ([[api.users]])")
    password: SecretStr | None = Field(None, max_length=1024, description="the user's password")

    @model_validator(mode="after")
    def _one_way(self) -> SignIn:
        if (self.token is None) == (self.user is None or self.password is None):
            raise ValueError("give a token, or a user and a password")
        return self


class SecurityHeaders(auth.OnResponseStart):
    """Every HTTP answer of the app gets the headers a browser needs to keep the console safe
    (no sniffing, no framing, this origin only); API answers are not cached."""

    def started(self, scope: Scope, message: Message) -> None:
        message["headers"] = [*message.get("headers", []), *HEADERS]
        if scope["path"].startswith(API):
            message["headers"].append((b"cache-control", b"no-store"))


def _asset(name: str) -> bytes:
    return (resources.files("vmrecover.service") / "web" / name).read_bytes()


def console_routes(app: FastAPI, st: ApiState, json_response: Callable[..., Response]) -> None:
    """The page, its assets, sign-in/out and the console's own API routes on *app*."""
    page = _asset("index.html")
    assets = {name: _asset(name) for name in ASSETS}
    service = st.service

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/console/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:  # a fixed set: no path reaches the filesystem
            doc = auth.error_doc("NotFound", f"no asset {name!r}", exit_code=ExitCode.NOT_FOUND)
            return json_response(doc, 404)
        return Response(assets[name], media_type=ASSETS[name], headers={"cache-control": "no-cache"})

    @app.post(LOGIN, tags=["console"])
    async def login(request: Request, body: SignIn) -> Response:
        """Sign in to the console with a token, or a local user's password: sets the session cookie
        and answers the CSRF token the console's mutations must carry (X-CSRF-Token)."""
        client = request.client.host if request.client else "unknown"
        wait = st.failures.retry_after(client)
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            doc = auth.error_doc("AuthError", f"too many failed sign-ins from {client}",
                                 hint=f"try again in {seconds} s", exit_code=ExitCode.AUTH)  # fmt: skip
            return json_response(doc, 429, {"retry-after": str(seconds)})
        if not auth.same_origin(request.scope):
            doc = auth.error_doc("AuthError", "a sign-in from another site is refused",
                                 exit_code=ExitCode.AUTH)  # fmt: skip
            return json_response(doc, 403)
        api = service.config.api
        kind: Literal["token", "user"]
        if body.token is not None:
            presented = auth.digest(body.token.get_secret_value())
            kind, who = "token", auth.authenticate_digest(presented, api.tokens)
            name, credential = (who.name, who.sha256) if who else ("", "")
            role = who.role if who else ""
        else:
            assert body.user is not None and body.password is not None
            password = body.password.get_secret_value()
            user = await trio.to_thread.run_sync(
                auth.sign_in_user, body.user, password, api.users, limiter=service.limiter
            )  # (64 MiB each: bounded)
            kind, name = "user", body.user
            credential, role = (user.password_hash, user.role) if user else ("", "")
            who = user  # type: ignore[assignment]
        if who is None:
            st.failures.failed(client)
            log.warning("refused a console sign-in from %s: wrong %s", client,
                        "token" if kind == "token" else f"password for user {json.dumps(name)}")  # fmt: skip
            message = "the token is not valid" if kind == "token" else "wrong user name or password"
            doc = auth.error_doc("AuthError", message, hint="check it, or ask an administrator",
                                 exit_code=ExitCode.AUTH)  # fmt: skip
            return json_response(doc, 401)
        cookie, web = st.web.new(kind, name, credential)
        auth.audit.info("sign-in %s=%s role=%s client=%s", kind, json.dumps(name), role, client)
        response = json_response({"kind": kind, "name": name, "role": role, "csrf": web.csrf})
        response.set_cookie(auth.COOKIE, cookie, path="/", secure=True, httponly=True, samesite="strict")
        return response

    @app.post(f"{API}/console/logout", tags=["console"])
    async def logout(request: Request) -> Response:
        """End the console session of this cookie (a bearer caller has none: nothing happens)."""
        cookie = auth.cookie_value(request.scope)
        if cookie is not None and request.scope.get(auth.WEB_SCOPE_KEY) is not None:
            st.web.end(cookie)
        response = json_response({"signed_out": True})
        response.delete_cookie(auth.COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response

    @app.get(f"{API}/console/session", tags=["console"])
    async def whoami(request: Request) -> Response:
        """Who this caller is: name, role, how it signed in, and (a console session) its CSRF token."""
        token = request.scope[auth.TOKEN_SCOPE_KEY]
        web = request.scope.get(auth.WEB_SCOPE_KEY)
        kind = web.kind if web is not None else ("local" if token is auth.LOCAL else "bearer")
        name = web.name if web is not None else token.name
        return json_response({"kind": kind, "name": name, "role": token.role,
                              "csrf": web.csrf if web is not None else None})  # fmt: skip

    @app.get(f"{API}/dashboard", tags=["console"])
    async def dashboard() -> Response:
        """The console's overview in one call: every job (state, next run, last run), every VM (points,
        newest point, its boot check), sessions, the repository's usage now and over time."""
        sched = service.scheduler
        jobs = sched.jobs() if sched is not None else []

        def run(repo: Repository) -> dict[str, Any]:
            doc = overview(repo)
            fs = os.statvfs(repo.root)
            doc["repository"] = {"chunks": st.chunk_usage.get(repo.chunks),
                                 "filesystem": {"size": fs.f_blocks * fs.f_frsize,
                                                "available": fs.f_bavail * fs.f_frsize}}  # fmt: skip
            return doc

        return json_response({"jobs": jobs, **await st.blocking(run)})

    @app.get(f"{API}/verify/latest", tags=["console"])
    async def latest_verify() -> Response:
        """The newest verify job run's verdict: when, and which points it found damaged (null: none ran)."""
        return json_response(await st.blocking(last_verify))

    @app.get(f"{API}/runs/{{run_id}}/events", tags=["jobs"])
    async def run_events(run_id: int) -> Response:
        """A run's state and progress as server-sent events (``event: run``, its JSON as /runs/{id}
        shows it) whenever it changes, until it ends."""
        from .api import _Streaming

        sched = st.scheduler()
        try:
            first = sched.run(run_id)
        except KeyError:
            from ..errors import NotFound

            raise NotFound(f"no run {run_id}", hint="see /api/v1/runs") from None

        async def events() -> AsyncIterator[bytes]:
            doc, sent, quiet = first, "", time.monotonic()
            while True:
                text = json.dumps(doc, default=str)
                if text != sent:
                    yield f"event: run\ndata: {text}\n\n".encode()
                    sent, quiet = text, time.monotonic()
                elif time.monotonic() - quiet > HEARTBEAT:
                    yield b": still running\n\n"
                    quiet = time.monotonic()
                if doc.get("state") in FINISHED:
                    yield b"event: end\ndata: {}\n\n"
                    return
                await trio.sleep(EVENT_POLL)
                doc = sched.run(run_id)

        return _Streaming(events(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})


def last_verify(repo: Repository) -> dict[str, Any] | None:
    """The newest verify job run that ended with a report: when it started and ended, and the points it
    found damaged (by id).  A point made before it started was verified by it; a later one not yet."""
    for run in repo.catalog.job_runs(limit=200, states=("succeeded", "failed")):
        report = run.stats.get("verify") if run.kind == "verify" else None
        if not report or "ok" not in report:
            continue
        damaged = {b["point"] for b in report.get("bad_indexes", [])}
        damaged |= {u["point"] for c in report.get("bad_chunks", []) for u in c.get("used_by", [])}
        return {"run": run.id, "job": run.job, "started": run.started, "ended": run.ended, "ok": report["ok"],
                "damaged_points": sorted(damaged)}  # fmt: skip
    return None


def overview(repo: Repository) -> dict[str, Any]:
    """VMs, sessions and the contents' growth from the catalog in a few queries (10,000 points in
    tens of milliseconds): the dashboard's share of the repository."""
    cat = repo.catalog
    points = cat.points()  # in time order
    sizes = cat.point_sizes()
    checks = cat.latest_boot_checks()
    vms: dict[str, dict[str, Any]] = {}
    daily: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for p in points:
        v = vms.setdefault(p.vm, {"name": p.vm, "points": 0, "bytes": 0, "stored_bytes": 0})
        v["points"] += 1
        v["latest"], v["latest_kind"], v["latest_size"] = p.id, p.kind, sizes.get(p.id, 0)
        v["latest_created"] = p.created
        stored = int(p.stats.get("stored_bytes") or 0)
        v["stored_bytes"] += stored
        v["boot_check"] = checks.get(p.id)
        day = daily[p.created[:10]]
        day[0] += sizes.get(p.id, 0)
        day[1] += stored
        day[2] += 1
    growth, protected, stored_total = [], 0, 0
    for day, (virtual, stored, n) in sorted(daily.items()):
        protected, stored_total = protected + virtual, stored_total + stored
        growth.append({"day": day, "points": n, "virtual_bytes": protected, "stored_bytes": stored_total})
    return {
        "vms": sorted(vms.values(), key=lambda v: v["name"]),
        "points": len(points),
        "sessions": [{"name": s.name, "point": s.point, "created": s.created} for s in cat.sessions()],
        "growth": growth,  # cumulative over the points kept: what they protect against what they stored
        "verify": last_verify(repo),
    }


# ------------------------------------------------------------------------------------------ zip
class _Sink:
    """A write-only file for ZipFile (it writes data descriptors to an unseekable one) whose bytes
    are taken away as they come."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def tar_to_zip(tar: TarFile, block: int = 1 << 20) -> Iterator[bytes]:
    """The folders, files and symbolic links of *tar* as a zip (stored, ZIP64 where needed, modes and
    times kept), block by block without the whole in memory.  Times before 1980 (zip's epoch) become
    1980-01-01."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:  # type: ignore[arg-type]
        for m in tar:
            when = time.gmtime(max(m.mtime, 315532800))[:6]
            if m.isdir():
                info = zipfile.ZipInfo(m.name.rstrip("/") + "/", when)
                info.external_attr = ((stat.S_IFDIR | (m.mode & 0o7777)) << 16) | 0x10
                z.writestr(info, b"")
            elif m.issym():
                info = zipfile.ZipInfo(m.name, when)
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                info.create_system = 3  # unix: the mode bits above are read
                z.writestr(info, m.linkname.encode())
            elif m.isfile():
                info = zipfile.ZipInfo(m.name, when)
                info.external_attr = (stat.S_IFREG | (m.mode & 0o7777)) << 16
                info.create_system = 3
                info.file_size = m.size
                src = tar.extractfile(m)
                assert src is not None
                with z.open(info, "w", force_zip64=m.size >= 1 << 31) as w:
                    while data := src.read(block):
                        w.write(data)
                        yield sink.take()
            yield sink.take()
    yield sink.take()


def check_pattern(pattern: str) -> str:
    """A file-name pattern for search (fnmatch: *, ?, [...]): printable, no NUL, short."""
    if not pattern or len(pattern) > 255 or not pattern.isprintable():
        from ..errors import BadInput

        raise BadInput(f"invalid search pattern {pattern!r}", hint="a file name or a pattern like '*.conf'")
    return pattern
