"""Push ingest over the HTTP API: disks streamed by an external agent or proxy become restore points.

::

    PUT    /api/v1/vms/{vm}/disks/{disk}          one request, one disk, one point (committed at its end)
    POST   /api/v1/vms/{vm}/uploads               a point of several disks: {"upload": ID}
    PUT    /api/v1/uploads/{id}/disks/{disk}      ... each disk's stream, one after the other
    POST   /api/v1/uploads/{id}/commit            ... the point exists from here
    DELETE /api/v1/uploads/{id}                   ... or nothing of it stays

A body is a raw disk (``application/octet-stream``, its Content-Length the disk's size) or a sparse
stream (``application/vnd.vmrecover.sparse``: a header of extents, then their bytes; ``"changed":
true`` for an incremental against the VM's latest point): see ingest/push.py.  The stream feeds a
:class:`~vmrecover.ingest.pipeline.PointWriter` exactly as a local backup's source does (same
chunking, dedup, commit protocol), so nothing is visible until the point commits, and a cut upload, a
stream longer than it declared or an abandoned upload (``UPLOAD_IDLE`` seconds without a request)
leaves nothing.  An upload holds its VM's backup lock: a second one of the same VM is refused (409)
while backups of other VMs go on.  No image format is parsed here: a raw or sparse stream has no
backing file to follow.

Threads: the disk is stored in a worker thread (the pipeline blocks); the request's body is handed to
it by the trio side in pieces of at least what the pipeline asked for (one hop per chunk, not per
network read).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from ..errors import BadInput, NotFound, VmrecoverError
from ..ingest import push
from ..ingest.pipeline import DiskJob, PointWriter
from ..repo.catalog import Catalog, check_name
from ..repo.repository import Repository
from .auth import TOKEN_SCOPE_KEY

log = logging.getLogger("vmrecover.api.push")
UPLOAD_IDLE = 600.0  # seconds an upload may wait for its next request before it is dropped
MAX_UPLOADS = 8


class Busy(VmrecoverError):
    http_status = 409


@dataclass
class Upload:
    """A point being pushed: its own repository handle (catalog connection, backup lock), its writer."""

    id: str
    vm: str
    repo: Repository
    writer: PointWriter
    stack: contextlib.ExitStack
    client: str
    token: str | None
    used: float = field(default_factory=time.monotonic)
    busy: bool = False

    def close(self) -> None:
        self.stack.close()


def _open(base: Repository, vm: str) -> tuple[Repository, PointWriter, contextlib.ExitStack]:
    """(blocking) A repository handle of its own holding *vm*'s backup lock, and a PointWriter."""
    stack = contextlib.ExitStack()
    try:
        repo = copy.copy(base)
        repo.catalog = Catalog(base.root / "catalog.sqlite")
        stack.callback(repo.catalog.close)
        try:
            stack.enter_context(repo.backing_up(vm, wait=0))
        except VmrecoverError as exc:
            raise Busy(exc.message, hint="wait for that backup to finish, then push again") from None
        writer = stack.enter_context(PointWriter(repo, vm))
    except BaseException:
        stack.close()
        raise
    return repo, writer, stack


class _Body:
    """The request body as ``read(n)`` for a worker thread: the trio side gathers network pieces until
    it has *n* bytes (or the body ends)."""

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self.stream = stream
        self.left = b""
        self.ended = False

    async def _gather(self, n: int) -> bytes:
        parts, have = [self.left], len(self.left)
        while have < n and not self.ended:
            try:
                piece = await self.stream.__anext__()
            except StopAsyncIteration:
                self.ended = True
                break
            except ClientDisconnect:
                raise push.StreamError("the client went away in the middle of the upload") from None
            parts.append(piece)
            have += len(piece)
        data = b"".join(parts)
        self.left = data[n:]
        return data[:n]

    def read(self, n: int) -> bytes:
        return trio.from_thread.run(self._gather, n)


def _declared(request: Request, body: _Body) -> push.Declared:
    kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if kind == push.SPARSE:
        return push.read_header(body.read)
    if kind == push.RAW:
        size = request.headers.get("content-length")
        if size is None or not size.isdigit() or int(size) <= 0:
            raise BadInput(
                "a raw disk is sent with its size as Content-Length",
                hint=f"or send a sparse stream ({push.SPARSE}) that declares it",
            )
        return push.Declared(int(size), [(0, int(size))], False)
    raise BadInput(
        f"Content-Type {kind or '(none)'} is not a disk stream",
        hint=f"send {push.RAW} (the raw disk) or {push.SPARSE} (see the API's documentation)",
    )


async def _store(st: Any, up: Upload, disk: str, request: Request) -> dict[str, Any]:
    """Stream one disk of *request* into the upload's point (in a worker thread)."""
    stream = request.stream()
    body = _Body(stream)
    name = check_name("disk", disk)

    def run() -> dict[str, Any]:
        d = _declared(request, body)
        w = up.writer
        base = push.parent_reader(up.repo, w.parent.id, name) if d.changed and w.parent else None
        if d.changed and base is None:
            raise BadInput(
                f"an incremental stream of disk {name} needs an earlier point of {up.vm} with that disk",
                hint="send the whole disk first",
            )
        src = push.StreamSource(name, d.size, d.extents, body.read, base=base, path=f"push from {up.client}")
        stats = w.add(DiskJob(name, src, d.extents if d.changed else None))
        src.finish()
        return {**stats.__dict__, "received": src.received}

    try:
        return await trio.to_thread.run_sync(run, limiter=st.service.limiter)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()  # type: ignore[attr-defined]


def push_routes(
    app: FastAPI, st: Any, api: str, json: Callable[[Any, int], Response]
) -> Callable[[], Awaitable[None]]:
    """Add the push routes to *app* (*st*: the API's ApiState, *json* its JSON response).  Returns the
    task that drops idle uploads, for the server to run beside the app."""
    uploads: dict[str, Upload] = {}
    disk_put = re.compile(rf"{re.escape(api)}/(vms/[^/]+/disks|uploads/[^/]+/disks)/[^/]+")
    st.body_limits.insert(0, ("PUT", disk_put, None))  # a disk is as big as it is

    def who(request: Request) -> tuple[str, str | None]:
        client = request.client.host if request.client else "?"
        token = request.scope.get(TOKEN_SCOPE_KEY)
        return client, getattr(token, "name", None)

    async def begin(vm: str, request: Request) -> Upload:
        vm = check_name("VM", vm)
        if len(uploads) >= MAX_UPLOADS:
            raise Busy(f"{MAX_UPLOADS} uploads are open already", hint="commit or delete one first")
        repo, writer, stack = await trio.to_thread.run_sync(
            _open, st.service.repo, vm, limiter=st.service.limiter
        )
        client, token = who(request)
        return Upload(secrets.token_hex(8), vm, repo, writer, stack, client, token)

    async def end(up: Upload, *, commit: bool) -> dict[str, Any] | None:
        uploads.pop(up.id, None)

        def run() -> dict[str, Any] | None:
            try:
                if not commit:
                    return None
                config = {"platform": "push", "client": up.client, "token": up.token}
                point = up.writer.commit(config=config)
                return {**point.summary(), **point.stats, "disks": [s.__dict__ for s in up.writer.stats]}
            finally:
                up.close()

        doc = await trio.to_thread.run_sync(run, limiter=st.service.limiter)
        log.info("upload %s of %s %s", up.id, up.vm, "committed" if commit else "dropped")
        return doc

    def take(upload_id: str) -> Upload:
        up = uploads.get(upload_id) if re.fullmatch(r"[0-9a-f]{16}", upload_id) else None
        if up is None:
            raise NotFound(
                f"no open upload {upload_id!r}", hint="begin one with POST /api/v1/vms/{vm}/uploads"
            )
        if up.busy:
            raise Busy(
                f"upload {upload_id} is busy with another request", hint="send its disks one at a time"
            )
        return up

    async def reap() -> None:
        while True:
            await trio.sleep(30)
            for up in [u for u in uploads.values() if not u.busy and time.monotonic() - u.used > UPLOAD_IDLE]:
                log.warning("upload %s of %s idle for %.0f s: dropped", up.id, up.vm, UPLOAD_IDLE)
                await end(up, commit=False)

    @app.put(f"{api}/vms/{{vm}}/disks/{{disk}}", tags=["push ingest"], status_code=201)
    async def push_one(vm: str, disk: str, request: Request) -> Response:
        """One disk as one new restore point of *vm* (raw or sparse stream; see the module's doc)."""
        up = await begin(vm, request)
        try:
            await _store(st, up, disk, request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await end(up, commit=False)
            raise
        return json(await end(up, commit=True), 201)

    @app.post(f"{api}/vms/{{vm}}/uploads", tags=["push ingest"], status_code=201)
    async def begin_upload(vm: str, request: Request) -> Response:
        """Begin a point of several disks; PUT each, then commit (or DELETE)."""
        up = await begin(vm, request)
        uploads[up.id] = up
        return json({"upload": up.id, "vm": up.vm, "idle_timeout_s": UPLOAD_IDLE}, 201)

    @app.put(f"{api}/uploads/{{upload_id}}/disks/{{disk}}", tags=["push ingest"])
    async def upload_disk(upload_id: str, disk: str, request: Request) -> Response:
        """One disk of an open upload.  A failure drops the whole upload: nothing of it stays."""
        up = take(upload_id)
        up.busy = True
        try:
            doc = await _store(st, up, disk, request)
        except BaseException:
            with trio.CancelScope(shield=True):
                await end(up, commit=False)
            raise
        up.busy, up.used = False, time.monotonic()
        return json(doc, 200)

    @app.post(f"{api}/uploads/{{upload_id}}/commit", tags=["push ingest"], status_code=201)
    async def commit_upload(upload_id: str) -> Response:
        """The upload's point exists from now on."""
        return json(await end(take(upload_id), commit=True), 201)

    @app.delete(f"{api}/uploads/{{upload_id}}", tags=["push ingest"])
    async def drop_upload(upload_id: str) -> Response:
        """Drop the upload: nothing of it stays."""
        await end(take(upload_id), commit=False)
        return json({"upload": upload_id, "dropped": True}, 200)

    return reap
