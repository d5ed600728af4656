"""Running one job of the service's configuration: a blocking function, called by the scheduler in a
worker thread (and by ``vmrecover job run``), that does what the matching commands do.

- **backup** of a hypervisor's VMs: the hypervisor (a name of ``vmrecover hypervisor add``) is asked
  once where each VM runs and where its disks are (:class:`Placement`: vSphere's ``runtime.host`` and
  the VM's datastores; XenServer's ``resident_on``, or the pool master for a halted VM, and the SRs of
  its VDIs), and which VMs a ``folder:`` or ``tag:`` entry means.  Each VM is then backed up by the code
  ``vmrecover backup SCHEME://HYPERVISOR/VM`` runs (cli/backup_cmds.back_up_vm), in threads of their
  own, each once the scheduler's caps let it (:meth:`RunControl.hold`: streams, per host, per
  datastore).  A VM that fails (the hypervisor unreachable, the VM gone, a snapshot refused) is a
  failed VM of the run with its reason; the other VMs go on.
- **backup** of images: ``vmrecover backup IMAGE... --vm NAME`` (cli/backup_cmds.back_up_images).
- **hooks**: the job's ``pre_hook`` before any snapshot (failing, nothing is backed up), its
  ``post_hook`` after the backups, whatever became of them (service/hooks.py).
- **retention** after the backups: ``prune`` of the VMs that got a new point in this run, with the job's
  policy, under the exclusive writer lock (waiting for running backups, as long as they take).  VMs
  whose backup failed keep all their points.
- **gc** and **verify**: as ``vmrecover gc`` and ``vmrecover verify`` (every point); gc waits for the
  writer lock rather than failing.

Each thread uses a repository handle of its own (its own catalog connection and lock state); the run's
progress, log lines and per-VM results live in a :class:`RunControl`, which the scheduler reads while
the run goes on.  :meth:`RunControl.abort` makes the run stop at its next chunk with :class:`Aborted`,
which abandons a backup as an interrupt does (the pipeline commits a point whole or not at all).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ..cli.backup_cmds import back_up_images, back_up_vm, image_disk_names
from ..errors import BadInput, ExitCode, LockedError, VmrecoverError
from ..hypervisors import Hypervisor, Registry
from ..ingest.throttle import Throttle
from ..repo import lock
from ..repo.catalog import Catalog, now_iso
from ..repo.gc import gc
from ..repo.prune import Policy, prune
from ..repo.repository import Repository, parse_size
from ..repo.verify import verify
from .config import Job, parse_duration
from .hooks import HookFailed, HookResult, hook_env, run_hook

log = logging.getLogger("vmrecover.jobs")
LOG_LINES = 300  # a run keeps its latest log lines
BACKGROUND_NICE = 10  # how much nicer a job's threads are than the service's API and NFS thread
LOCK_POLL = 1.0  # seconds between looks at the writer lock (and at an abort) while waiting for it


class Aborted(BaseException):  # like KeyboardInterrupt: nothing may take it for an error
    """The run was told to stop (the service stops, ^C on ``job run``): what it was doing is abandoned
    the way an interrupt abandons it, so no partial point is left."""


@dataclass(frozen=True)
class Resource:
    """A physical host or a datastore/SR, as the caps count it."""

    key: str  # unique: "vmware:vc.example:443/host-12", "xen:host:<uuid>", "xen:sr:<uuid>"
    label: str  # what a person reads: "esx1.example (vc1)"


@dataclass(frozen=True)
class Placement:
    """Where a VM's backup loads: the host it runs on and the datastores its disks are on (local images:
    neither)."""

    host: Resource | None = None
    datastores: tuple[Resource, ...] = ()


Hold = Callable[["RunControl", str, Placement], AbstractContextManager[None]]


@contextlib.contextmanager
def no_caps(control: RunControl, target: str, placement: Placement) -> Iterator[None]:
    yield


class _Capture(logging.Handler):
    """Log records of the threads working for a run go into that run's log lines too."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.runs: dict[int, RunControl] = {}
        self.mutex = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "run_noted", False):
            return
        with self.mutex:
            control = self.runs.get(threading.get_ident())
        if control is not None:
            control.add_line(record.levelname.lower(), record.getMessage(), record.created)


_capture = _Capture()
_capture_installed = threading.Lock()


class RunControl:
    """What one running job shares with whoever runs it, from any thread: the caps (*hold*, given by
    the scheduler; blocking until the VM may start, telling :meth:`waiting` meanwhile), progress (bytes
    or chunks done and total), log lines, each VM's state and result, and abort.  *on_change* is called
    (in the run's threads) when the run's state changes or a VM ends, so the scheduler can record it.
    *streams*: how many VMs of the run may be worked on at once (the caps decide which really run)."""

    def __init__(
        self, *, hold: Hold = no_caps, streams: int = 1, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self._hold = hold
        self.streams = max(1, streams)
        self.on_change = on_change
        self._mutex = threading.Lock()
        self.done = 0
        self.total = 0
        self.unit = "bytes"
        self.vms: dict[str, dict[str, Any]] = {}  # target -> {"state", "waiting_for"} then its result
        self._job_wait: str | None = None  # gc/prune waiting for the writer lock
        self.lines: deque[dict[str, Any]] = deque(maxlen=LOG_LINES)
        self.aborted: str | None = None
        self.run_id: int | None = None  # the catalog's, for the hooks' environment
        self.throttle: Throttle | None = None  # the job's bandwidth cap, over all its streams
        self._state = "running"

    # --- progress ---------------------------------------------------------------------------------
    def add_total(self, n: int) -> None:
        with self._mutex:
            self.total += n

    def advance(self, n: int) -> None:
        """*n* more bytes read (by any of the run's threads); held back here by the bandwidth cap."""
        self.check()
        with self._mutex:
            self.done += n
        if self.throttle is not None:
            self.throttle.take(n, self.check)

    def progress(self) -> dict[str, Any]:
        with self._mutex:
            return {"done": self.done, "total": self.total, "unit": self.unit}

    def meter(self) -> AbstractContextManager[tuple[Callable[[int], None], Callable[[int], None]]]:
        return contextlib.nullcontext((self.add_total, self.advance))

    # --- abort ------------------------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        if self.aborted is None:  # the first reason stays
            self.aborted = reason

    def check(self) -> None:
        if self.aborted is not None:
            raise Aborted(self.aborted)

    # --- log --------------------------------------------------------------------------------------
    def add_line(self, level: str, msg: str, at: float | None = None) -> None:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at or time.time()))
        with self._mutex:
            self.lines.append({"ts": ts + "Z", "level": level, "msg": msg})

    def note(self, msg: str, level: int = logging.INFO) -> None:
        """A line of the run's log (also in the service's log)."""
        self.add_line(logging.getLevelName(level).lower(), msg)
        log.log(level, "%s", msg, extra={"run_noted": True})

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """What this thread logs meanwhile goes into the run's lines."""
        with _capture_installed:
            root = logging.getLogger("vmrecover")
            if _capture not in root.handlers:
                root.addHandler(_capture)
        me = threading.get_ident()
        with _capture.mutex:
            _capture.runs[me] = self
        try:
            yield
        finally:
            with _capture.mutex:
                _capture.runs.pop(me, None)

    # --- state ------------------------------------------------------------------------------------
    def hold(self, target: str, placement: Placement) -> AbstractContextManager[None]:
        return self._hold(self, target, placement)

    def vm_state(self, target: str, state: str, waiting_for: str | None = None) -> None:
        with self._mutex:
            self.vms[target] = {"target": target, "state": state, "waiting_for": waiting_for}
        self._changed()

    def waiting(self, target: str | None, reason: str) -> None:
        """*target* (None: the job itself, for the writer lock) waits for *reason* ("host esx1 (vc1)")."""
        if target is None:
            with self._mutex:
                self._job_wait = reason
            self._changed()
        else:
            self.vm_state(target, "waiting", reason)

    def job_waited(self) -> None:
        with self._mutex:
            self._job_wait = None
        self._changed()

    def vm_done(self, target: str, result: dict[str, Any]) -> None:
        with self._mutex:
            self.vms[target] = result
        self._changed(force=True)

    def state(self) -> str:
        """'running', or 'waiting' when nothing of the run goes on but something waits."""
        with self._mutex:
            return self._compute()

    def waiting_for(self) -> list[str]:
        with self._mutex:
            out = [v["waiting_for"] for v in self.vms.values() if v.get("state") == "waiting"]
            return ([self._job_wait] if self._job_wait else []) + out

    def results(self) -> list[dict[str, Any]]:
        with self._mutex:
            return [dict(v) for v in self.vms.values()]

    def _compute(self) -> str:
        states = {v.get("state") for v in self.vms.values()}
        if "running" in states:
            return "running"
        if self._job_wait or "waiting" in states:
            return "waiting"
        return "running"

    def _changed(self, *, force: bool = False) -> None:
        with self._mutex:
            new = self._compute()
            moved, self._state = new != self._state, new
        if moved or force:
            self.on_change()


@dataclass
class Outcome:
    """How a run ended: *state* 'succeeded' or 'failed', the *error* (None if it succeeded), *stats*
    (per VM, retention, gc or verify report), what a retry should do again (*retry*: the VMs that
    failed; None: the whole job; []: nothing, a retry would not help) and the *exit_code* a command
    would end with."""

    state: str
    error: str | None
    stats: dict[str, Any]
    retry: list[str] | None = None
    exit_code: int = ExitCode.OK


def handle(repo: Repository, job: Job | None = None) -> Repository:
    """A handle on *repo* for one thread: its own catalog connection and lock state, and the
    compression level of *job* if it sets one; close its catalog."""
    h = copy.copy(repo)
    h.catalog = Catalog(repo.root / "catalog.sqlite")
    if job is not None and job.compression_level is not None:
        h.compress_at(job.compression_level)
    return h


@contextlib.contextmanager
def background_priority(nice: int = BACKGROUND_NICE) -> Iterator[None]:
    """This thread, and the threads it starts meanwhile (they inherit it), at *nice* more than now.

    A job's threads run in the service's process, beside the trio thread that answers the API and
    serves NFS; the kernel shares the CPUs between threads, so two backups (a reader, compressors,
    read-ahead each) would leave that one thread a fraction of a CPU, and every API call would wait
    for it.  Linux sets a nice value per thread: the job's threads yield to the interactive one."""
    tid = threading.get_native_id()
    try:
        old = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, old + nice))
    except OSError as exc:
        log.debug("cannot lower the priority of a job's thread: %s", exc)
        yield
        return
    try:
        yield
    finally:
        try:  # the thread goes back to the pool it came from (raising one's priority needs root)
            os.setpriority(os.PRIO_PROCESS, tid, old)
        except OSError as exc:
            log.warning("a worker thread keeps nice %+d after a job: %s", min(19, old + nice), exc)


def run_job(repo: Repository, job: Job, control: RunControl, *, vms: list[str] | None = None) -> Outcome:
    """Run *job* once (for a backup job, only the VMs *vms* if given: a retry of those that failed).
    Blocking; raises only Aborted (and bugs): every failure of the work is in the Outcome.  Its threads
    run at a lower CPU priority than the service's (:func:`background_priority`)."""
    with control.capture(), background_priority():
        if job.kind == "gc":
            return _gc(repo, job, control)
        if job.kind == "verify":
            return _verify(repo, control)
        if job.kind == "boot-check":
            return _boot_checks(repo, job, control, vms)
        return _backup(repo, job, control, vms)


# ------------------------------------------------------------------------------------ backups
@dataclass
class _Task:
    target: str  # the job's name for the VM (its vms entry, or what a folder:/tag: entry found)
    placement: Placement = field(default_factory=Placement)
    error: VmrecoverError | None = None  # found before the backup (the hypervisor unreachable ...)


def _error_doc(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, VmrecoverError):
        doc: dict[str, Any] = {"error": exc.message, "exit_code": exc.exit_code}
        if exc.hint:
            doc["hint"] = exc.hint
        return doc
    return {"error": f"{type(exc).__name__}: {exc}", "exit_code": ExitCode.INTERNAL}


def _backup(repo: Repository, job: Job, control: RunControl, vms: list[str] | None) -> Outcome:
    if job.bandwidth:
        control.throttle = Throttle(parse_size(job.bandwidth))
    hv, password = None, None
    if job.images:
        assert job.vm is not None
        tasks = [_Task(job.vm)]
    else:
        hv, password, tasks = _plan(repo, job, vms if vms is not None else list(job.vms), control)
    tasks = list({t.target: t for t in tasks}.values())  # a VM named twice is backed up once
    if not tasks:
        err = BadInput(f"job {job.name} selected no VM", hint="see its vms: the folders and tags are empty")
        return Outcome("failed", err.message, {"vms": []}, [], err.exit_code)
    targets = [t.target for t in tasks]
    stats: dict[str, Any] = {"vms": []}
    if job.pre_hook:  # before any snapshot; failing, nothing is backed up (and a retry runs it again)
        try:
            stats["hooks"] = {"pre": _hook(job, "pre", targets, control).to_json()}
        except HookFailed as exc:
            stats["hooks"] = {"pre": exc.result.to_json()}
            return Outcome("failed", exc.message, stats, None, exc.exit_code)
    post_failed: HookFailed | None = None
    outcome = "interrupted"
    try:
        for t in tasks:
            control.vm_state(t.target, "queued")
        _back_up_all(repo, job, hv, password, tasks, control)
        outcome = "failed" if any(r["state"] != "succeeded" for r in control.results()) else "succeeded"
    finally:
        if job.post_hook:  # after the backups, whatever became of them (an abort too: thaw what was frozen)
            try:
                post = _hook(job, "post", targets, control, outcome).to_json()
            except HookFailed as exc:
                post, post_failed = exc.result.to_json(), exc
            stats.setdefault("hooks", {})["post"] = post
    results = control.results()
    failed = [r for r in results if r["state"] != "succeeded"]
    stats["vms"] = results
    error, code = None, ExitCode.OK
    if failed:
        first = failed[0]
        error = f"{first['target']}: {first.get('error')}"
        if len(failed) > 1:
            error = f"{len(failed)} of {len(results)} VMs failed; {error}"
        code = first.get("exit_code", ExitCode.INTERNAL)
    if post_failed is not None:  # the points made stay: they are whole
        error = post_failed.message + (f"; {error}" if error else "")
        code = code or post_failed.exit_code
    done = [r["vm"] for r in results if r["state"] == "succeeded"]
    if job.retention is not None and done:
        try:
            stats["retention"] = _retain(repo, job, done, control)
        except Aborted:
            raise
        except Exception as exc:
            if not isinstance(exc, VmrecoverError):
                log.exception("retention of job %s failed", job.name)
            doc = _error_doc(exc)
            stats["retention"] = {"error": doc["error"]}
            error = f"retention: {doc['error']}" + (f"; {error}" if error else "")
            code = code or doc["exit_code"]
    if error is None:
        return Outcome("succeeded", None, stats)
    return Outcome("failed", error, stats, [r["target"] for r in failed], code)


def _back_up_all(
    repo: Repository, job: Job, hv: Hypervisor | None, password: str | None, tasks: list[_Task],
    control: RunControl,
) -> None:  # fmt: skip
    """Each VM in a thread of a pool as large as the streams allow (the caps decide which run)."""
    workers = max(1, min(len(tasks), control.streams))
    with ThreadPoolExecutor(workers, thread_name_prefix=f"job-{job.name}") as pool:
        futures = [pool.submit(_one_vm, repo, job, hv, password, t, control) for t in tasks]
        try:
            for f in futures:
                f.result()
        except Aborted as exc:
            control.abort(str(exc))
            for f in futures:
                with contextlib.suppress(BaseException):
                    f.result()
            raise


def _hook(
    job: Job, phase: str, targets: list[str], control: RunControl, result: str | None = None
) -> HookResult:
    """The job's pre- or post-hook (service/hooks.py), said in the run's log; HookFailed if it fails."""
    argv = job.pre_hook if phase == "pre" else job.post_hook
    assert argv
    env = hook_env(job.name, targets, phase, result, run_id=control.run_id)
    res = run_hook(argv, timeout=parse_duration(job.hook_timeout), env=env, what=f"{phase}-hook")
    control.note(f"{phase}-hook {argv[0]} ran in {res.duration:.1f} s")
    return res


def _plan(
    repo: Repository, job: Job, targets: list[str], control: RunControl
) -> tuple[Hypervisor | None, str | None, list[_Task]]:
    """The hypervisor, its password, and each VM to back up with its placement (or why it cannot be)."""
    assert job.hypervisor is not None
    try:
        registry = Registry(repo.root)
        hv = registry.get(job.hypervisor)
        password = registry.password(hv)
        plan = _xen_plan if hv.scheme == "xen" else _vmware_plan
        tasks = plan(hv, password, targets, control)
    except VmrecoverError as exc:  # unreachable, login refused, not registered ...: every VM fails so
        return None, None, [_Task(t, error=exc) for t in targets]
    return hv, password, tasks


def _selected(target: str) -> tuple[str, str] | None:
    """``folder:PATH`` or ``tag:TAG`` -> (kind, value); None for a VM's name or id."""
    for kind in ("folder", "tag"):
        if target.startswith(kind + ":"):
            return kind, target[len(kind) + 1 :]
    return None


def _vmware_plan(hv: Hypervisor, password: str, targets: list[str], control: RunControl) -> list[_Task]:
    from pyVmomi import vim

    where = f"vmware:{hv.host}:{hv.port}"
    tasks: list[_Task] = []
    from ..hypervisors.vmware.session import session

    with session(hv, password) as vs:

        def place(vm: Any) -> Placement:
            d = vs.props([vm], ["runtime.host", "datastore"])[0]
            host = d.get("runtime.host")
            h = None
            if host is not None:
                h = Resource(f"{where}/{host._moId}", f"{vs.prop(host, 'name')} ({hv.name})")
            dss = vs.props(list(d.get("datastore") or []), ["name"])
            return Placement(h, tuple(Resource(f"{where}/{x['obj']._moId}", f"{x.get('name')} ({hv.name})")
                                      for x in dss))  # fmt: skip

        for target in targets:
            try:
                sel = _selected(target)
                if sel is None:
                    tasks.append(_Task(target, place(vs.vm(target))))
                    continue
                kind, value = sel
                if kind == "tag":
                    raise BadInput(
                        f"{target}: vSphere keeps tags in its REST tagging API, not used by vmrecover yet",
                        hint="list the VMs, or use folder:/DC/vm/FOLDER",
                    )
                folder = vs.content.searchIndex.FindByInventoryPath(value.strip("/"))
                if not isinstance(folder, vim.Folder):
                    raise BadInput(f"{target}: no VM folder {value!r} on {hv.name}",
                                   hint="write the inventory path: folder:/DATACENTER/vm/FOLDER")  # fmt: skip
                view = vs.content.viewManager.CreateContainerView(folder, [vim.VirtualMachine], True)
                try:
                    found = sorted(vs.props(list(view.view), ["name", "config.template"]),
                                   key=lambda d: str(d.get("name")))  # fmt: skip
                finally:
                    view.Destroy()
                for d in found:
                    if not d.get("config.template"):
                        tasks.append(_Task(d["obj"]._moId, place(d["obj"])))
                if not found:
                    control.note(f"{target}: folder {value!r} holds no VM", logging.WARNING)
            except VmrecoverError as exc:
                tasks.append(_Task(target, error=exc))
    return tasks


def _xen_plan(hv: Hypervisor, password: str, targets: list[str], control: RunControl) -> list[_Task]:
    from ..hypervisors.xen.inventory import disks, find_vm
    from ..hypervisors.xen.session import session

    tasks: list[_Task] = []
    with session(hv, password) as xs:
        x = xs.x
        master = x.pool.get_master(x.pool.get_all()[0])

        def place(rec: dict[str, Any]) -> Placement:
            host = rec.get("resident_on") or "OpaqueRef:NULL"
            if host == "OpaqueRef:NULL":  # halted: the master reads its disks
                host = master
            h = x.host.get_record(host)
            srs: dict[str, str] = {}
            for d in disks(xs, rec):
                s = x.SR.get_record(x.VDI.get_SR(d.vdi))
                srs[s["uuid"]] = s["name_label"]
            return Placement(
                Resource(f"xen:host:{h['uuid']}", f"{h['name_label']} ({hv.name})"),
                tuple(Resource(f"xen:sr:{u}", f"{n} ({hv.name})") for u, n in sorted(srs.items())),
            )

        for target in targets:
            try:
                sel = _selected(target)
                if sel is None:
                    _, rec = find_vm(xs, target)
                    tasks.append(_Task(target, place(rec)))
                    continue
                kind, value = sel
                found = []
                for rec in x.VM.get_all_records().values():
                    if rec["is_a_template"] or rec["is_a_snapshot"] or rec["is_control_domain"]:
                        continue
                    folder = (rec.get("other_config") or {}).get("folder", "")
                    if (kind == "tag" and value in rec.get("tags", [])) or (
                        kind == "folder" and (folder == value or folder.startswith(value.rstrip("/") + "/"))
                    ):
                        found.append(rec)
                for rec in sorted(found, key=lambda r: r["name_label"]):
                    tasks.append(_Task(rec["uuid"], place(rec)))
                if not found:
                    control.note(f"{target}: no VM of {hv.name} has it", logging.WARNING)
            except VmrecoverError as exc:
                tasks.append(_Task(target, error=exc))
    return tasks


def _one_vm(
    repo: Repository, job: Job, hv: Hypervisor | None, password: str | None, task: _Task, control: RunControl
) -> None:
    """Back up one VM of the run (in a thread of the run's pool); its result goes to *control*: its
    figures, ``started`` and ``ended`` (the backup itself, within the caps' grant) and ``waited_s``."""
    with control.capture():
        began = time.monotonic()
        doc: dict[str, Any] = {"target": task.target, "waited_s": 0.0}
        if task.placement.host is not None:
            doc["host"] = task.placement.host.label
        if task.placement.datastores:
            doc["datastores"] = [d.label for d in task.placement.datastores]
        try:
            if task.error is not None:
                raise task.error
            with control.hold(task.target, task.placement):
                doc.update(started=now_iso(), waited_s=round(time.monotonic() - began, 3))
                try:
                    control.check()
                    control.vm_state(task.target, "running")
                    doc.update(_back_up_one(repo, job, hv, password, task.target, control))
                finally:
                    doc["ended"] = now_iso()  # before the caps let the next one start
            doc["state"] = "succeeded"
            control.note(f"{task.target}: {doc['kind']} backup {doc['vm']}@{doc['point']}")
        except Aborted as exc:
            doc.update(state="interrupted", error=f"stopped: {exc}")
            raise
        except Exception as exc:
            doc.update(state="failed", **_error_doc(exc))
            if not isinstance(exc, VmrecoverError):
                log.exception("backup of %s (job %s) failed", task.target, job.name)
            control.note(f"{task.target}: failed: {doc['error']}", logging.WARNING)
        finally:
            doc.setdefault("started", now_iso())
            doc.setdefault("ended", doc["started"])
            control.vm_done(task.target, doc)


def _back_up_one(
    repo: Repository, job: Job, hv: Hypervisor | None, password: str | None, target: str, control: RunControl
) -> dict[str, Any]:
    h = handle(repo, job)
    try:
        if job.images:
            assert job.vm is not None
            images = list(job.images)
            done = back_up_images(h, job.vm, images, image_disk_names(images), wait=None, meter=control.meter)
            return done.doc()
        assert hv is not None and password is not None
        return _vm_backup(h, job, hv, password, target, control)
    finally:
        h.catalog.close()


def _vm_backup(
    repo: Repository, job: Job, hv: Hypervisor, password: str, target: str, control: RunControl
) -> dict[str, Any]:
    url = f"{hv.scheme}://{hv.name}/{target}"
    quiesce = memory = False
    mode = job.mode
    if hv.scheme == "vmware":
        if mode not in (None, "normal", "quiesce", "memory"):
            raise BadInput(f"job {job.name}: mode {mode!r} is not vSphere's", hint="normal|quiesce|memory")
        quiesce, memory, mode = mode == "quiesce", mode == "memory", None
    done = back_up_vm(
        repo, hv, password, target, url=url, quiesce=quiesce, memory=memory, mode=mode, full=job.full,
        wait=None, progress=control.advance, progress_total=control.add_total,
    )  # fmt: skip
    return done.doc(url)


# ------------------------------------------------------------------------------------ the writer lock
@contextlib.contextmanager
def exclusive(repo: Repository, op: str, control: RunControl) -> Iterator[None]:
    """The writer lock, exclusively (as prune and gc take it), waiting for running backups as long as
    they take (the run's state says for whom) and giving up only if the run is aborted."""
    path = repo.root / "locks" / "writer"

    def waiting(who: str) -> None:
        control.waiting(None, f"the repository ({who})")

    with contextlib.ExitStack() as stack:
        while True:
            control.check()
            try:
                stack.enter_context(
                    lock.hold(path, exclusive=True, op=op, repo=repo.root, wait=LOCK_POLL, waiting=waiting)
                )
                break
            except LockedError:
                continue
        control.job_waited()
        yield


def _retain(repo: Repository, job: Job, vms: list[str], control: RunControl) -> dict[str, Any]:
    r = job.retention
    assert r is not None
    policy = Policy(r.keep_last, r.daily, r.weekly, r.monthly)
    if policy.empty():
        control.note("retention keeps nothing (every keep_* is 0): not applied", logging.WARNING)
        return {"skipped": "every keep_* is 0"}
    h = handle(repo)
    try:
        removed: dict[str, list[str]] = {}
        with exclusive(h, f"prune (job {job.name})", control):
            for vm in dict.fromkeys(vms):
                gone = prune(h, policy, vm=vm).get(vm, [])
                removed[vm] = [p.id for p in gone]
                if gone:
                    control.note(f"retention removed {len(gone)} point(s) of {vm}: {', '.join(removed[vm])}")
        return {"removed": removed}
    finally:
        h.catalog.close()


# ------------------------------------------------------------------------------------ gc, verify
def _gc(repo: Repository, job: Job, control: RunControl) -> Outcome:
    h = handle(repo)
    try:
        with exclusive(h, f"gc (job {job.name})", control):
            rep = gc(h)
    except Aborted:
        raise
    except Exception as exc:
        doc = _error_doc(exc)
        return Outcome("failed", doc["error"], {"gc": doc}, None, doc["exit_code"])
    finally:
        h.catalog.close()
    control.note(f"gc freed {rep.removed_bytes} bytes in {rep.removed_chunks} chunks")
    return Outcome("succeeded", None, {"gc": rep.__dict__})


def _verify(repo: Repository, control: RunControl) -> Outcome:
    control.unit = "chunks"
    h = handle(repo)
    try:
        rep = verify(h, h.catalog.points(), progress_total=control.add_total, progress=control.advance)
    except Aborted:
        raise
    except Exception as exc:
        doc = _error_doc(exc)
        return Outcome("failed", doc["error"], {"verify": doc}, None, doc["exit_code"])
    finally:
        h.catalog.close()
    stats = {"verify": rep.to_json()}
    if rep.ok:
        control.note(f"verify: {rep.points} points, {rep.chunks} chunks intact")
        return Outcome("succeeded", None, stats)
    error = (f"verify found damage: {len(rep.bad_chunks)} bad chunk(s), {len(rep.bad_indexes)} bad index(es) "
             "(the report names the restore points, disks and byte ranges)")  # fmt: skip
    return Outcome("failed", error, stats, [], ExitCode.INTEGRITY)  # damage: running it again won't help


def _boot_checks(repo: Repository, job: Job, control: RunControl, vms: list[str] | None) -> Outcome:
    """Boot the latest point of each of the job's VMs (all of the repository's when it names none; on
    a retry only *vms*, those that failed) and judge it; a point that does not boot fails the run."""
    from ..recovery.healthcheck import boot_check

    control.unit = "VMs"
    h = handle(repo)
    try:
        names = vms or job.vms or [v["name"] for v in h.catalog.vms()]
        control.add_total(len(names))
        results: list[dict[str, Any]] = []
        for name in names:
            try:
                point = h.catalog.resolve(name)
                check = boot_check(h, point, timeout=parse_duration(job.boot_timeout), expect=job.expect,
                                   progress=lambda text: control.note(text, logging.DEBUG),
                                   stop=control.check)  # fmt: skip
                results.append({"vm": name, **check.summary()})
                control.note(f"{name}@{point.id}: {'boots' if check.ok else 'DOES NOT BOOT'}: {check.detail}")
            except Exception as exc:
                results.append({"vm": name, "ok": False, "verdict": "error", **_error_doc(exc)})
                control.note(f"{name}: the boot check could not run: {results[-1]['error']}", logging.ERROR)
            control.advance(1)
    finally:
        h.catalog.close()
    failed = [r["vm"] for r in results if not r["ok"]]
    stats = {"boot_checks": results}
    if not failed:
        return Outcome("succeeded", None, stats)
    error = f"{len(failed)} of {len(results)} VM(s) did not boot: {', '.join(failed)}"
    # a retry checks again only those whose check could not run; a point that did not boot won't boot later
    again = [r["vm"] for r in results if r["verdict"] == "error"]
    return Outcome("failed", error, stats, again, ExitCode.BOOT_FAILED)
