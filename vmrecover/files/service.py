"""The single-file-restore service: keeps libguestfs appliances open between commands.

An appliance costs about 20 s to start under TCG, so ``vmrecover files ...`` commands do not start
their own: they ask this service (one per repository, started by the first command, listening on
``REPO/run/files/files.sock``), which

- reads disks through its own datastore mount (``REPO/run/files/mnt``, the FUSE views, so restore
  points are read exactly as the datastore serves them, and sessions running meanwhile don't matter);
- keeps **one appliance per open restore point**, at most ``max_open`` at once (the least recently
  used idle one is closed to make room; a request that finds every appliance busy waits, and says so);
- closes an appliance idle for ``idle`` seconds, and exits (unmounting) once none is left open and no
  request came for that long;
- answers one JSON request per connection with JSON lines: ``{"progress": text}`` while it works,
  ``{"entries": [...]}`` batches for listings, then ``{"ok": result}`` or ``{"error": {...}}``.

It runs with its starter's rights (root on an appliance) and writes where a request says (``get
--to``), so only its own account and root may talk to it: the socket is created 0600 inside a 0700
folder (mode set before ``bind``, so there is no moment at which others can connect), and every
connection's peer credentials (``SO_PEERCRED``) are checked; anyone else is answered with a refusal
and nothing more.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import AuthError, BadInput, NotFound, VmrecoverError
from ..repo.catalog import Point
from ..repo.repository import Repository
from .copyout import copy_out
from .guest import GuestImage

log = logging.getLogger("vmrecover.files")
Progress = Callable[[str], None]
MAX_OPEN = 2
IDLE_SECONDS = 300.0
LIST_BATCH = 500


def run_dir(repo_root: Path) -> Path:
    return repo_root / "run" / "files"


def socket_path(repo_root: Path) -> Path:
    return run_dir(repo_root) / "files.sock"


def private_run_dir(repo_root: Path) -> Path:
    """``REPO/run/files``, created 0700 (and made 0700 if it exists): it holds the socket, the log
    and the service's datastore mount, none of them anyone else's business."""
    d = run_dir(repo_root)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(d)
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        raise AuthError(f"{d} belongs to uid {st.st_uid}, not to you", hint="use the repository's account")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(d, 0o700)
    return d


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED: the kernel's word,
    taken when it connected)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class _Slot:
    def __init__(self) -> None:
        self.image: GuestImage | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.users = 0


class Service:
    def __init__(self, repo: Repository, *, max_open: int = MAX_OPEN, idle: float = IDLE_SECONDS) -> None:
        self.repo = repo
        self.max_open = max_open
        self.idle = idle
        self.mnt = run_dir(repo.root) / "mnt"
        self._lock = threading.Condition()
        self._mount_lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}
        self.stopping = threading.Event()  # 'files stop'
        self.local_mounts: dict[str, GuestImage] = {}  # 'files mount': mount point -> its own appliance
        self.last_request = time.monotonic()

    # ---------------------------------------------------------------------------- datastore
    def _ensure_mount(self) -> None:
        from ..fuse.mount import _mounted_repo

        with self._mount_lock:  # two requests opening appliances at once mount it once
            if _mounted_repo(self.mnt) is not None:
                return
            self.mnt.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "vmrecover", "mount", str(self.mnt), "--repo", str(self.repo.root),
                   "--cache-size", "256M", "--json"]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
            if proc.returncode != 0:
                raise VmrecoverError(f"cannot mount the datastore for libguestfs: {proc.stdout}{proc.stderr}")

    def _unmount(self) -> None:
        subprocess.run([sys.executable, "-m", "vmrecover", "umount", "--lazy", str(self.mnt), "--repo",
                        str(self.repo.root)], capture_output=True, check=False)  # fmt: skip

    # ---------------------------------------------------------------------------- appliances
    @contextlib.contextmanager
    def image(self, point: Point, progress: Progress) -> Iterator[GuestImage]:
        """The appliance of *point*, opened if needed; held (not evictable) while in the block."""
        with self._lock:
            slot = self._slots.get(point.id)
            opener = slot is None
            while opener and len(self._slots) >= self.max_open and not self._evict_one():
                progress(f"waiting: all {self.max_open} libguestfs appliances are busy")
                self._lock.wait(5)
            if opener:
                slot = self._slots[point.id] = _Slot()
            assert slot is not None
            slot.users += 1
        try:
            if opener:
                try:
                    self._ensure_mount()
                    what = f"{point.vm}@{point.id}"
                    slot.image = GuestImage(self._disk_paths(point), what=what, progress=progress)
                except BaseException as exc:
                    slot.error = exc
                    with self._lock:
                        self._slots.pop(point.id, None)
                        self._lock.notify_all()
                    raise
                finally:
                    slot.ready.set()
            else:
                if not slot.ready.is_set():
                    progress(f"waiting for the appliance of {point.vm}@{point.id} to start")
                slot.ready.wait()
                if slot.error is not None:
                    raise slot.error
            assert slot.image is not None
            yield slot.image
        finally:
            with self._lock:
                slot.users -= 1
                self._lock.notify_all()

    def _evict_one(self) -> bool:
        idle = [(s.image.last_used, pid) for pid, s in self._slots.items() if s.users == 0 and s.image]
        if not idle:
            return False
        _, pid = min(idle)
        self._close(pid)
        return True

    def _close(self, point_id: str) -> None:
        slot = self._slots.pop(point_id)
        if slot.image is not None:
            log.info("closing the appliance of %s", slot.image.what)
            slot.image.close()

    def reap(self) -> bool:
        """Close appliances idle too long; True when the service itself should exit."""
        now = time.monotonic()
        with self._lock:
            for pid, s in list(self._slots.items()):
                if s.users == 0 and s.image is not None and now - s.image.last_used > self.idle:
                    self._close(pid)
            return not self._slots and not self.local_mounts and now - self.last_request > self.idle

    def close(self) -> None:
        with self._lock:
            for pid in list(self._slots):
                self._close(pid)
            mounts = list(self.local_mounts)
        for mp in mounts:
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
        self._unmount()

    # ---------------------------------------------------------------------------- operations
    def handle(self, req: dict[str, Any], send: Callable[[dict[str, Any]], None]) -> Any:
        self.last_request = time.monotonic()

        def progress(text: str) -> None:
            send({"progress": text})

        op = req.get("op")
        if op == "inspect":
            point = self.repo.catalog.resolve(req["target"])
            with self.image(point, progress) as img:
                return {"vm": point.vm, "point": point.id, "created": point.created, **img.info()}
        if op == "ls":
            point = self.repo.catalog.resolve(req["target"])
            with self.image(point, progress) as img:
                path = img.resolve(req.get("path") or "/")
                batch, count = [], 0
                for e in img.listdir(path):
                    batch.append(e.to_json())
                    if len(batch) >= LIST_BATCH:
                        send({"entries": batch})
                        count, batch = count + len(batch), []
                send({"entries": batch})
                return {"vm": point.vm, "point": point.id, "path": path, "count": count + len(batch)}
        if op == "get":
            point = self.repo.catalog.resolve(req["target"])
            with self.image(point, progress) as img:
                as_tar = f"{point.vm}-{point.id}.tar" if req.get("tar") else None
                written = copy_out(img, req["paths"], Path(req["to"]), as_tar=as_tar,
                                   overwrite=bool(req.get("overwrite")), progress=progress)  # fmt: skip
                return {"vm": point.vm, "point": point.id, "written": written}
        if op == "find":
            return self._find(req["vm"], req["pattern"], req.get("points", "all"), progress, send)
        if op == "history":
            return self._history(req["vm"], req["path"], progress)
        if op == "mount":
            point = self.repo.catalog.resolve(req["target"])
            return self._mount_local(point, req["mountpoint"], bool(req.get("allow_other")), progress)
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "stop":
            self.stopping.set()
            return {"pid": os.getpid(), "stopping": True}
        raise BadInput(f"unknown request {op!r}")

    def _mount_local(self, point: Point, mountpoint: str, allow_other: bool, progress: Progress) -> Any:
        """A separate appliance serving the guest's filesystems at *mountpoint* through FUSE until
        it is unmounted; the service stays up meanwhile.  Read-only, ``nosuid,nodev``, and only for
        the account that mounted it unless *allow_other* (then with ``default_permissions``: the
        kernel checks the guest's modes and owners, as numbers, for other host accounts)."""
        self._ensure_mount()
        img = GuestImage(self._disk_paths(point), what=f"{point.vm}@{point.id}", progress=progress)
        try:
            img.g.mount_local(mountpoint, readonly=True, options=mount_options(allow_other))
        except RuntimeError as exc:
            img.close()
            raise BadInput(f"cannot mount at {mountpoint}: {exc}", hint="an empty folder is needed") from None
        with self._lock:
            self.local_mounts[mountpoint] = img

        def run() -> None:
            try:
                img.g.mount_local_run()  # returns when unmounted
            finally:
                img.close()
                with self._lock:
                    self.local_mounts.pop(mountpoint, None)
                    self.last_request = time.monotonic()

        threading.Thread(target=run, name=f"mount-local {mountpoint}", daemon=True).start()
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint) and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"vm": point.vm, "point": point.id, "mountpoint": mountpoint, **img.info()}

    def _disk_paths(self, point: Point) -> list[Path]:
        disks = self.repo.catalog.disks(point.id)
        return [self.mnt / "vms" / point.vm / point.id / f"{d.name}.raw" for d in disks]

    def _points(self, vm: str, which: str = "all") -> list[Point]:
        self.repo.catalog.resolve(vm)  # NotFound for an unknown VM, with the known ones
        points = self.repo.catalog.points(vm)
        return points if which == "all" else [self.repo.catalog.resolve(f"{vm}@{which}")]

    def _each_point(self, points: list[Point], doing: str, progress: Progress,
                    fn: Callable[[GuestImage], Any]) -> dict[str, Any]:  # fmt: skip
        """fn(appliance) for every point, the points whose appliance is open first (so that a
        search over many points does not close an appliance it will need again); by point id."""
        with self._lock:
            order = sorted(points, key=lambda p: p.id not in self._slots)
        out = {}
        for i, point in enumerate(order, 1):
            progress(f"{doing} {point.vm}@{point.id} ({i} of {len(points)})")
            with self.image(point, progress) as img:
                out[point.id] = fn(img)
        return out

    def _find(self, vm: str, pattern: str, which: str, progress: Progress,
              send: Callable[[dict[str, Any]], None]) -> Any:  # fmt: skip
        def match(path: str) -> bool:
            return fnmatch.fnmatchcase(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern)

        points = self._points(vm, which)
        found = self._each_point(
            points, "searching", progress, lambda img: [p for p in img.find("/") if match(p)]
        )
        for point in points:  # in time order
            send(
                {
                    "entries": [
                        {"point": point.id, "created": point.created, "path": p} for p in found[point.id]
                    ]
                }
            )
        return {"vm": vm, "pattern": pattern, "points": len(points), "matches": sum(map(len, found.values()))}

    def _history(self, vm: str, guest_path: str, progress: Progress) -> Any:
        def look(img: GuestImage) -> dict[str, Any] | None:
            path = img.resolve(guest_path)
            try:
                e = img.stat(path)
            except NotFound:
                return None
            doc = e.to_json()
            now = {k: doc[k] for k in ("kind", "size", "mode", "mtime")}
            now["sha256"] = img.sha256(path) if e.kind == "file" else None
            return now

        points = self._points(vm)
        seen = self._each_point(points, "looking at", progress, look)
        rows: list[dict[str, Any]] = []
        before: dict[str, Any] | None = None
        for point in points:  # in time order
            now = seen[point.id]
            if now is None:
                change = "deleted" if before is not None else "absent"
            elif before is None:
                change = "added" if rows else "present"
            else:
                changed = [k for k in ("kind", "size", "mode", "mtime", "sha256") if now[k] != before[k]]
                change = "changed: " + ", ".join(changed) if changed else "unchanged"
            rows.append({"point": point.id, "created": point.created, "change": change, **(now or {})})
            before = now
        return {"vm": vm, "path": guest_path, "points": rows}


def mount_options(allow_other: bool) -> str:
    """FUSE options of 'files mount' (libfuse 2 through libguestfs' mount_local)."""
    return "ro,nosuid,nodev" + (",allow_other,default_permissions" if allow_other else "")


# ------------------------------------------------------------------------------------ the daemon
def serve(repo: Repository, *, ready: Callable[[], None], idle: float = IDLE_SECONDS) -> None:
    """Listen on the repository's files socket until idle; one thread per connection."""
    service = Service(repo, idle=idle)
    sock = socket_path(repo.root)
    private_run_dir(repo.root)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    allowed = {0, os.geteuid()}

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            lock = threading.Lock()

            def send(doc: dict[str, Any]) -> None:
                with lock:
                    self.wfile.write(json.dumps(doc, default=str).encode() + b"\n")
                    self.wfile.flush()

            try:
                uid = peer_uid(self.request)
                if uid not in allowed:
                    log.warning("refused a connection from uid %d", uid)
                    err = AuthError(
                        f"the file-restore service of {repo.root} serves uid {os.geteuid()} and root only, "
                        f"not uid {uid}",
                        hint="run the command as the repository's owner (or root)",
                    )
                    send({"error": err.to_json()})
                    return
                req = json.loads(self.rfile.readline() or b"{}")
                send({"ok": service.handle(req, send)})
            except VmrecoverError as exc:
                send({"error": exc.to_json() | {"hint": exc.hint}})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away (^C): the appliance stays for the next command
            except Exception as exc:
                log.exception("files request failed")
                with contextlib.suppress(OSError):
                    send({"error": {"error": "VmrecoverError", "message": f"internal error: {exc}",
                                    "exit_code": 1}})  # fmt: skip

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def server_bind(self) -> None:
            # bind() creates the socket file with the socket inode's mode less the umask: both are
            # made private first, so it never exists with wider rights (and its folder is 0700).
            os.fchmod(self.socket.fileno(), 0o600)
            old = os.umask(0o077)  # the service is one thread still
            try:
                super().server_bind()
            finally:
                os.umask(old)

    server = Server(str(sock), Handler)

    def reaper() -> None:
        while not service.stopping.wait(min(5.0, idle / 4)):
            if service.reap():
                break
        server.shutdown()

    threading.Thread(target=reaper, daemon=True).start()
    ready()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        service.close()  # appliances, then the datastore mount; the socket goes last
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


# The services this process started (request()), kept to be reaped: by stop_running(), or by the next
# start once they have left on their own (idle).
_started: dict[int, subprocess.Popen[bytes]] = {}


def _gone(pid: int) -> bool:
    """Has process *pid* ended (and, if this process started it, been reaped)?"""
    from ..repo.lock import pid_alive

    proc = _started.get(pid)
    if proc is None:
        return not pid_alive(pid)
    if proc.poll() is None:
        return False
    del _started[pid]
    return True


def stop_running(repo_root: Path, *, grace: float = 10.0) -> int | None:
    """(blocking) Stop the repository's file-restore service if one runs (for `vmrecover serve`'s stop,
    whose unit would otherwise wait for it).  Asked first ('stop': it closes its appliances and
    unmounts its datastore); one still there after *grace* seconds (a request under way, an appliance
    still starting) is terminated with its process group (its session: it and libguestfs' qemu), and
    its datastore mount lazily unmounted, which ends that mount's daemon.  Returns its pid, or None
    if none runs."""
    s = _connect(repo_root)
    if s is None:
        return None
    with s:
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]  # the kernel's word: the process that listens
        try:
            s.settimeout(min(grace, 10.0))
            s.sendall(json.dumps({"op": "stop"}).encode() + b"\n")
            s.makefile("rb").readline()
        except (OSError, ValueError) as exc:  # one that does not answer is stopped below all the same
            log.warning("the file-restore service (pid %d) did not take 'stop': %s", pid, exc)
    for sig, wait in ((None, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if sig is not None:
            log.warning("the file-restore service (pid %d) is still there: %s to it", pid, sig.name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # started by request(): its own session, with its qemu
                    os.killpg(pid, sig)
                else:  # started by hand in someone's shell: that group is not ours to signal
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _gone(pid):
            break
    if sig is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(run_dir(repo_root) / "mnt")], capture_output=True,
                       check=False)  # fmt: skip
    return pid


# ------------------------------------------------------------------------------------ the client
def _connect(repo_root: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(socket_path(repo_root)))
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        return None
    except PermissionError:
        s.close()
        raise AuthError(
            f"the file-restore service of {repo_root} is not yours to use (permission denied)",
            hint="run the command as the repository's owner (or root)",
        ) from None
    return s


def _start_service(repo_root: Path, env: dict[str, str]) -> None:
    logfile = private_run_dir(repo_root) / "files.log"
    fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    for pid in list(_started):
        _gone(pid)  # reaps the ones that left on their own
    with open(fd, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmrecover", "files", "serve", "--repo", str(repo_root),
             "--log-level", "info"],  # a line per file copied (how it was read), appliances closed
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            env=dict(env, VMRECOVER_LOG_FORMAT="json"),
        )  # fmt: skip
    _started[proc.pid] = proc


def request(repo_root: Path, req: dict[str, Any], *, progress: Progress,
            on_entries: Callable[[list[dict[str, Any]]], None], env: dict[str, str]) -> Any:  # fmt: skip
    """Send *req* to the repository's files service (starting it if needed) and return its result."""
    s = _connect(repo_root)
    if s is None:
        progress("starting the file-restore service")
        _start_service(repo_root, env)
        deadline = time.monotonic() + 60
        while s is None and time.monotonic() < deadline:
            time.sleep(0.1)
            s = _connect(repo_root)
        if s is None:
            raise VmrecoverError("the file-restore service did not start",
                                 hint=f"see {run_dir(repo_root) / 'files.log'}")  # fmt: skip
    with s, s.makefile("rwb") as f:
        f.write(json.dumps(req).encode() + b"\n")
        f.flush()
        for line in f:
            doc = json.loads(line)
            if "progress" in doc:
                progress(doc["progress"])
            elif "entries" in doc:
                on_entries(doc["entries"])
            elif "ok" in doc:
                return doc["ok"]
            elif "error" in doc:
                raise VmrecoverError.from_json(doc["error"])
    raise VmrecoverError("the file-restore service closed the connection",
                         hint=f"see {run_dir(repo_root) / 'files.log'}")  # fmt: skip
