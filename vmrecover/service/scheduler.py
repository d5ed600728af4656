"""The scheduler: runs the configured jobs on their cron schedules, within the backup caps, and keeps
every run in the catalog (``job_runs``).  It implements core.JobScheduler (what the API and the CLI
ask); developer-notes/service.md ("Scheduler") states its rules.

- **Slots**: a job's schedule is cron (croniter), in the host's local time.  Per job the catalog keeps
  the latest slot handled (``job_slots``); when the next slot after it has passed, the job runs once
  for the latest passed slot, however many passed (the service was down, a run took longer than the
  period).  A job first seen, or whose schedule changed, starts from that moment.  A slot that comes
  while a run of the job is queued or going on is merged into it.  Disabled jobs skip their slots.
- **One run of a job at a time**; runs of different jobs go side by side.
- **Caps** (:class:`Caps`, config ``[scheduler]``): a VM's backup starts when fewer than
  ``max_streams`` backups run in all, fewer than ``per_host`` on its physical host and fewer than
  ``per_datastore`` on each of its datastores/SRs (runner.Placement).  Until then it waits, and its
  run's state says for what ("waiting for host esx1 (vc1)").  gc and verify take no stream; gc and
  retention wait for the writer lock.
- **Retries**: a failed run is run again ``retries`` times, after ``retry_backoff``, doubled each
  time; a backup's retry does only the VMs that failed.  A verify that found damage is not retried.
- **Crashes**: at start, runs still queued/running/waiting whose process is gone become
  ``interrupted``; a job whose latest run was interrupted (a crash, or a stop that aborted it) runs
  once again at start ("resume": only its VMs without a new point), and not again if that resume is
  interrupted too, nor if it was stopped on purpose (^C on ``job run``).  The backup pipeline leaves
  no partial point, whenever it is cut.
- **Stopping**: when :meth:`Scheduler.serve` is cancelled, running jobs are aborted at their next
  chunk (runner.Aborted), recorded ``interrupted``, and resumed at the next start.

Threads: the loop, the caps and the run tasks live in trio; each run's work is one worker thread
(``runner.run_job``) with a pool for its VMs, which ask the caps through ``trio.from_thread``.  The
catalog is read through one connection and written through another, each behind a lock (reads are
the API's, on the trio thread: short; writes come from worker threads).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import trio
from croniter import croniter

from ..repo import lock
from ..repo.catalog import UNFINISHED, Catalog, JobRun, parse_iso
from ..repo.repository import Repository
from . import config as configuration
from . import notify
from .config import Config, Job, parse_duration
from .core import Service, Unavailable
from .runner import Aborted, Outcome, Placement, RunControl, run_job

log = logging.getLogger("vmrecover.scheduler")
T = TypeVar("T")
TICK = 60.0  # seconds: the loop looks at the clock at least this often (the wall clock may jump)
FINISHED = ("succeeded", "failed", "interrupted")


def local_now() -> datetime:
    return datetime.now().astimezone()


def iso(t: datetime) -> str:
    """The catalog's time format: ISO 8601 UTC with microseconds."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def next_slot(schedule: str, after: datetime) -> datetime:
    """The first slot of *schedule* strictly after *after* (in *after*'s time zone)."""
    return croniter(schedule, after).get_next(datetime)  # type: ignore[no-any-return]


def latest_slot(schedule: str, now: datetime) -> datetime:
    """The latest slot of *schedule* at or before *now*."""
    return croniter(schedule, now + timedelta(microseconds=1)).get_prev(datetime)  # type: ignore[no-any-return]


def _alive(pid: int) -> bool:
    """Does *pid* live, and is it a vmrecover process (not another that got its number since)?"""
    if not lock.pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"vmrecover" in f.read()
    except OSError:
        return True


class Caps:
    """How many backups run at once: in all, per physical host, per datastore (trio-side state; the
    runs' threads ask through ``trio.from_thread``)."""

    def __init__(self, limits: configuration.Scheduler) -> None:
        self.limits = limits
        self.streams = 0
        self.hosts: Counter[str] = Counter()
        self.datastores: Counter[str] = Counter()
        self._lot = trio.lowlevel.ParkingLot()

    def blocker(self, p: Placement) -> str | None:
        """What *p*'s backup would wait for now, or None."""
        if self.streams >= self.limits.max_streams:
            return f"a stream ({self.limits.max_streams} backups run: max_streams)"
        if p.host is not None and self.hosts[p.host.key] >= self.limits.per_host:
            return f"host {p.host.label}"
        for ds in p.datastores:
            if self.datastores[ds.key] >= self.limits.per_datastore:
                return f"datastore {ds.label}"
        return None

    def try_take(self, p: Placement) -> str | None:
        """Take *p*'s share if free (None), else say what it waits for."""
        why = self.blocker(p)
        if why is None:
            self.streams += 1
            if p.host is not None:
                self.hosts[p.host.key] += 1
            for ds in p.datastores:
                self.datastores[ds.key] += 1
        return why

    async def wait_take(self, p: Placement, control: RunControl) -> str | None:
        """:meth:`try_take`, else wait for a change (a release, a reload, an abort) and try again once;
        what it still waits for ("aborted" once the run is).  Trying first matters: a release may have
        come while the thread that asks was busy saying that it waits."""
        if control.aborted is not None:
            return "aborted"
        if self.try_take(p) is None:
            return None
        await self._lot.park()
        if control.aborted is not None:
            return "aborted"
        return self.try_take(p)

    def release(self, p: Placement) -> None:
        self.streams -= 1
        if p.host is not None:
            self.hosts[p.host.key] -= 1
        for ds in p.datastores:
            self.datastores[ds.key] -= 1
        self._lot.unpark_all()

    def reconfigure(self, limits: configuration.Scheduler) -> None:
        self.limits = limits
        self._lot.unpark_all()

    def wake(self) -> None:
        self._lot.unpark_all()


@dataclass
class _Run:
    """A run this scheduler queued and has not finished."""

    id: int
    job: Job  # its configuration when queued: a reload does not change a run already queued
    trigger: str
    attempt: int
    scheduled_for: datetime
    vms: list[str] | None
    control: RunControl | None = None  # once it runs


class Scheduler:
    """The service's scheduler (see the module doc).  *limiter*: for short blocking work (catalog);
    *job_threads*: for the runs' threads (they last as long as the runs); *now*: the wall clock (tests
    give one that follows trio's MockClock); *retries*: False for `job run` (one attempt).  :meth:`serve`
    runs it."""

    def __init__(
        self, repo: Repository, config: Config, *, limiter: trio.CapacityLimiter | None = None,
        job_threads: trio.CapacityLimiter | None = None, now: Callable[[], datetime] = local_now,
        retries: bool = True,
    ) -> None:  # fmt: skip
        self.repo = repo
        self.config = config
        self.limiter = limiter or trio.CapacityLimiter(8)
        self.job_threads = job_threads or trio.CapacityLimiter(256)  # one long-lived thread per run
        self.now = now
        self.retries = retries
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.caps = Caps(config.scheduler)
        self._read_lock, self._write_lock = threading.Lock(), threading.Lock()
        self._reader = Catalog(repo.root / "catalog.sqlite")
        self._writer = Catalog(repo.root / "catalog.sqlite")
        self._runs: dict[int, _Run] = {}
        self._job_locks: dict[str, trio.Lock] = {}
        self._slots: dict[str, tuple[str, datetime]] = {}
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake = trio.Event()
        self._stopping = False
        self._resume = True  # runs this stop interrupts are run again at the next start

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    # --- core.JobScheduler -------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, Any]]:
        with self._read_lock:
            latest = self._reader.latest_job_runs()
            slots = self._reader.job_slots() if not self._slots else {}
        now = self.now()
        out = []
        for job in self.config.jobs:
            mine = [r for r in self._runs.values() if r.job.name == job.name]
            state, waiting = "idle", []
            going = [r for r in mine if r.control is not None]
            if going:
                state = going[0].control.state()  # type: ignore[union-attr]
                waiting = going[0].control.waiting_for()  # type: ignore[union-attr]
            elif mine:
                state = "queued"
            nxt = None
            if job.enabled:
                nxt = self._next_run(job, now, slots)
                if mine and not going:
                    nxt = min(nxt, min(r.scheduled_for for r in mine))
            last = latest.get(job.name)
            out.append({
                "name": job.name, "kind": job.kind, "schedule": job.schedule, "enabled": job.enabled,
                "next_run": None if nxt is None else iso(nxt), "state": state, "waiting_for": waiting,
                "runs": sorted(r.id for r in mine),
                "last_run": None if last is None else self._doc(last, full=False),
            })  # fmt: skip
        return out

    async def run_now(self, name: str) -> int:
        job = self.config.job(name)
        if self._nursery is None or self._stopping:
            raise Unavailable(
                "the scheduler is not running" if self._nursery is None else "the scheduler is stopping",
                hint="no new run starts now: try again once the service runs",
            )
        run = await self._queue(job, "manual", self.now())
        return run.id

    def history(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        with self._read_lock:
            rows = self._reader.job_runs(name, limit=limit)
        return [self._doc(r, full=False) for r in rows]

    def run(self, run_id: int) -> dict[str, Any]:
        with self._read_lock:
            row = self._reader.job_run(run_id)
        if row is None:
            raise KeyError(run_id)
        return self._doc(row, full=True)

    def reload(self, config: Config) -> None:
        self.config = config
        self.caps.reconfigure(config.scheduler)
        self._wake.set()

    # --- more ----------------------------------------------------------------------------------
    def waiting_for(self, run_id: int) -> list[str]:
        run = self._runs.get(run_id)
        return [] if run is None or run.control is None else run.control.waiting_for()

    def abort(self, reason: str, *, resume: bool = True) -> None:
        """Stop every running job at its next chunk (recorded interrupted, and run again at the next
        start unless not *resume*: a user's ^C on `job run`); nothing new starts."""
        self._stopping = True
        self._resume = self._resume and resume
        for run in self._runs.values():
            if run.control is not None:
                run.control.abort(reason)
        self.caps.wake()

    async def serve(
        self,
        *,
        schedule: bool = True,
        task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled: first what a crash left (interrupted runs, their one resume), then the
        slots of the schedules and the retries.  *schedule* False: only what :meth:`run_now` asks
        (``vmrecover job run``): no slots, no crash handling.  Cancelled, it aborts running jobs and
        returns once they are recorded."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                resumes = []
                if schedule:
                    resumes = await self._blocking(self._recover, iso(self.now()))
                    self._slots = await self._blocking(self._load_slots)
                task_status.started({"jobs": len(self.config.jobs)})
                for job, run_id, attempt, vms in resumes:
                    log.warning("job %s: its run %d was interrupted; running it again once", job.name, run_id)
                    await self._queue(job, "resume", self.now(), attempt=attempt, retry_of=run_id, vms=vms)
                if not schedule:
                    await trio.sleep_forever()
                while True:
                    try:
                        wake = await self._tick()
                    except Exception:  # the catalog busy for longer than its timeout ...: next tick
                        log.exception("the scheduler's look at the schedules failed; trying again")
                        wake = TICK
                    with trio.move_on_at(trio.current_time() + min(TICK, wake)):
                        await self._wake.wait()
                    if self._wake.is_set():
                        self._wake = trio.Event()
            finally:
                self.abort("the service stopped")

    # --- the loop --------------------------------------------------------------------------------
    def _load_slots(self) -> dict[str, tuple[str, datetime]]:
        with self._read_lock:
            rows = self._reader.job_slots()
        return {job: (sched, parse_iso(last)) for job, (sched, last) in rows.items()}

    def _next_run(self, job: Job, now: datetime, stored: dict[str, tuple[str, str]]) -> datetime:
        slot = self._slots.get(job.name)
        if slot is None and job.name in stored:
            slot = (stored[job.name][0], parse_iso(stored[job.name][1]))
        if slot is None or slot[0] != job.schedule:
            return next_slot(job.schedule, now)
        return max(next_slot(job.schedule, slot[1].astimezone(now.tzinfo)), now)  # passed: due now

    async def _tick(self) -> float:
        """Handle the slots that came; seconds until the next one."""
        now = self.now()
        soonest = now + timedelta(seconds=TICK)
        for job in list(self.config.jobs):
            slot = self._slots.get(job.name)
            if slot is None or slot[0] != job.schedule:  # first seen, or a new schedule: from now on
                await self._set_slot(job, now)
                slot = self._slots[job.name]
            nxt = next_slot(job.schedule, slot[1].astimezone(now.tzinfo))
            if nxt <= now:
                latest = latest_slot(job.schedule, now)
                if not job.enabled:
                    log.debug("job %s is disabled: slot %s skipped", job.name, iso(latest))
                elif self._busy(job.name):
                    log.info("job %s: slot %s merged into its run under way", job.name, iso(latest))
                else:
                    await self._queue(job, "schedule", latest)
                await self._set_slot(job, latest)
                nxt = next_slot(job.schedule, latest)
            soonest = min(soonest, nxt)
        return max(0.0, (soonest - self.now()).total_seconds())

    async def _set_slot(self, job: Job, slot: datetime) -> None:
        self._slots[job.name] = (job.schedule, slot)
        await self._write(self._writer.set_job_slot, job.name, job.schedule, iso(slot))

    def _busy(self, name: str) -> bool:
        return any(r.job.name == name for r in self._runs.values())

    # --- runs --------------------------------------------------------------------------------------
    async def _queue(
        self, job: Job, trigger: str, when: datetime, *, attempt: int = 1, retry_of: int | None = None,
        vms: list[str] | None = None,
    ) -> _Run:  # fmt: skip
        assert self._nursery is not None
        run_id = await self._write(
            self._writer.add_job_run, job.name, job.kind, trigger=trigger, scheduled_for=iso(when),
            attempt=attempt, retry_of=retry_of, vms=vms, pid=self.pid, host=self.host,
        )  # fmt: skip
        run = _Run(run_id, job, trigger, attempt, when, vms)
        self._runs[run_id] = run
        self._nursery.start_soon(self._drive, run, name=f"job {job.name} run {run_id}")
        return run

    async def _drive(self, run: _Run) -> None:
        """Wait for the run's time and for the job's previous run, run it, and queue its retry.  A
        failure here (the catalog unwritable) is logged: the scheduler and the other runs go on, and
        the run's row, left unfinished, is what a crash leaves (the next start says so)."""
        try:
            await self._sleep_until(run.scheduled_for)
            lock = self._job_locks.setdefault(run.job.name, trio.Lock())
            async with lock:
                outcome = await self._execute(run)
            if outcome is not None and outcome.state == "failed":
                await self._retry(run, outcome)
        except Exception:
            log.exception("job %s: run %d could not be run or recorded", run.job.name, run.id)
        finally:
            self._runs.pop(run.id, None)

    async def _sleep_until(self, when: datetime) -> None:
        while (left := (when - self.now()).total_seconds()) > 0:
            await trio.sleep(min(left, TICK))

    async def _execute(self, run: _Run) -> Outcome | None:
        """Run *run* to its end; its Outcome (None when it was interrupted)."""
        if self._stopping:
            return None
        control = RunControl(
            hold=self._hold, streams=self.config.scheduler.max_streams, on_change=lambda: self._persist(run)
        )
        control.run_id = run.id
        run.control = control
        await self._write(self._writer.update_job_run, run.id, state="running", started=iso(self.now()))
        log.info("job %s: run %d (%s, attempt %d) starts", run.job.name, run.id, run.trigger, run.attempt)
        outcome: Outcome | None = None
        try:
            outcome = await trio.to_thread.run_sync(
                partial(run_job, self.repo, run.job, control, vms=run.vms), limiter=self.job_threads
            )  # (not cancellable: a stop aborts the run, which then ends and is recorded)
            state, error, stats = outcome.state, outcome.error, outcome.stats
            stats["exit_code"] = outcome.exit_code
        except Aborted as exc:
            state, error, stats = "interrupted", f"stopped: {exc}", {"vms": control.results()}
            stats["resume"] = self._resume
        except Exception as exc:  # a bug: the run fails, the scheduler goes on
            log.exception("job %s: run %d failed unexpectedly", run.job.name, run.id)
            state, error, stats = "failed", f"{type(exc).__name__}: {exc}", {"vms": control.results()}
            outcome = Outcome("failed", error, stats, None, 1)
        stats["log"] = list(control.lines)
        with trio.CancelScope(shield=True):
            ended = iso(self.now())
            await self._write(self._writer.update_job_run, run.id, state=state, ended=ended, error=error,
                              stats=stats)  # fmt: skip
            await self._write(self._writer.forget_job_runs, run.job.name, self.config.scheduler.keep_runs)
        log.log(logging.INFO if state == "succeeded" else logging.WARNING, "job %s: run %d %s%s",
                run.job.name, run.id, state, f": {error}" if error else "")  # fmt: skip
        await self._notify(run.id)
        return outcome

    async def _notify(self, run_id: int) -> None:
        """The run's end to the configured channels (syslog, mail, webhook: service/notify.py), which
        bound their own time; not when the service is stopping (the run is resumed at the next start)."""
        config = self.config
        with self._read_lock:
            row = self._reader.job_run(run_id)
        if row is not None:
            await trio.to_thread.run_sync(
                notify.run_ended, config, self._doc(row, full=False), limiter=self.limiter
            )

    async def _retry(self, run: _Run, outcome: Outcome) -> None:
        limits = self.config.scheduler
        if not self.retries or outcome.retry == [] or self._stopping:
            return
        if run.attempt > limits.retries:  # attempts so far: run.attempt; retries allowed: limits.retries
            return
        try:
            job = self.config.job(run.job.name)  # as configured now (a reload may have changed it)
        except KeyError:
            return
        backoff = parse_duration(limits.retry_backoff) * 2 ** (run.attempt - 1)
        when = self.now() + timedelta(seconds=backoff)
        vms = outcome.retry if outcome.retry is not None else run.vms
        log.info("job %s: run %d failed; retry %d at %s", job.name, run.id, run.attempt, iso(when))
        await self._queue(job, "retry", when, attempt=run.attempt + 1, retry_of=run.id, vms=vms)

    def _persist(self, run: _Run) -> None:
        """The run's state and the VMs done so far, into the catalog (from the run's threads)."""
        control = run.control
        assert control is not None
        state = control.state()
        with contextlib.suppress(Exception), self._write_lock:  # busy: the next change or the end says it
            self._writer.update_job_run(run.id, state=state, stats={"vms": control.results()})

    @contextlib.contextmanager
    def _hold(self, control: RunControl, target: str, placement: Placement) -> Iterator[None]:
        """runner.Hold: in a run's thread, wait until the caps let *target*'s backup start."""
        token = self._token
        assert token is not None
        taken = False
        try:
            why = trio.from_thread.run_sync(self.caps.try_take, placement, trio_token=token)
            while why is not None:
                control.check()
                control.waiting(target, why)
                why = trio.from_thread.run(self.caps.wait_take, placement, control, trio_token=token)
            taken = True
            yield
        finally:
            if taken:
                trio.from_thread.run_sync(self.caps.release, placement, trio_token=token)

    # --- crashes -----------------------------------------------------------------------------------
    def _recover(self, now: str) -> list[tuple[Job, int, int, list[str] | None]]:
        """Runs left unfinished by a process that is gone become interrupted; what to run again once:
        (job, the interrupted run, the resume's attempt, its VMs)."""
        with self._read_lock:
            left = self._reader.job_runs(states=UNFINISHED, limit=1_000_000)
        for r in left:
            if r.host != self.host:
                log.warning("run %d of job %s belongs to %s: left as it is", r.id, r.job, r.host)
                continue
            if r.pid != self.pid and _alive(r.pid):
                continue  # another process (a `job run`) has it
            when = "before it started" if r.state == "queued" else "during the run"
            with self._write_lock:
                error = f"the process that ran it (pid {r.pid}) ended {when}"
                self._writer.update_job_run(r.id, state="interrupted", ended=now, error=error)
            log.warning("run %d of job %s was interrupted (pid %d ended %s)", r.id, r.job, r.pid, when)
        with self._read_lock:
            latest = self._reader.latest_job_runs()
            again = []
            for name, r in sorted(latest.items()):
                if r.state != "interrupted" or r.trigger == "resume" or self._reader.retried(r.id):
                    continue
                if r.stats.get("resume") is False:  # stopped on purpose (^C on `job run`)
                    continue
                try:
                    job = self.config.job(name)
                except KeyError:
                    continue
                rest = _remaining(job, r)
                if rest == []:
                    log.info("job %s: its interrupted run %d had backed up every VM", name, r.id)
                elif job.enabled:
                    again.append((job, r.id, r.attempt + 1, rest))
        return again

    # --- helpers -----------------------------------------------------------------------------------
    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _write(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        def locked() -> T:
            with self._write_lock:
                return fn(*args, **kw)

        return await trio.to_thread.run_sync(locked, limiter=self.limiter)

    def _doc(self, r: JobRun, *, full: bool) -> dict[str, Any]:
        """A run as history() and run() give it; with *full*, its log lines and, while it runs, its
        live state, progress and what it waits for."""
        doc = r.to_json()
        stats = dict(doc.pop("stats"))
        lines = stats.pop("log", [])
        doc["stats"] = stats
        doc["progress"], doc["waiting_for"] = None, []
        live = self._runs.get(r.id)
        if live is not None and live.control is not None and not r.finished:
            c = live.control
            doc["state"], doc["progress"], doc["waiting_for"] = c.state(), c.progress(), c.waiting_for()
            stats["vms"] = c.results()
            lines = list(c.lines)
        if full:
            doc["log"] = lines
        return doc


def _remaining(job: Job, r: JobRun) -> list[str] | None:
    """What a resume of the interrupted run *r* does: for a backup, its VMs that got no new point
    (None: all of the job's; []: nothing is left); gc and verify: None, all of it again."""
    if job.kind != "backup":
        return None
    planned = r.vms if r.vms is not None else (list(job.vms) if job.hypervisor else [str(job.vm)])
    done = {v.get("target") for v in r.stats.get("vms", []) if v.get("state") == "succeeded"}
    rest = [t for t in planned if t not in done]
    return None if r.vms is None and rest == planned else rest


async def run_scheduler(
    service: Service, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
) -> None:
    """The scheduler as a part of ``vmrecover serve`` (daemon.run's *parts*): service.scheduler while
    it runs."""
    sched = Scheduler(service.repo, service.config, limiter=service.limiter)
    service.scheduler = sched
    try:
        await sched.serve(task_status=task_status)
    finally:
        service.scheduler = None
        sched.close()
