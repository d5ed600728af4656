"""Job commands: ``vmrecover job list | run JOB | history [JOB]`` over the service's configured jobs.

They ask a core.JobScheduler, which :func:`connect` gives:

- When a service runs on the configuration's repository (its ``run/service.json``, daemon.running),
  its scheduler, through the service's local socket ``REPO/run/api.sock`` (service/client.py: the
  API, as the built-in admin "local").  ``run`` queues the run there and follows it; ^C or SIGTERM
  stop the following only: the run goes on in the service (the command says its id, ends as
  interrupted).  A service that is recorded but does not answer there is an error naming the socket:
  a second scheduler is never run beside a live service.
- Else a scheduler of this process over the repository (:func:`local_scheduler`): ``list`` and
  ``history`` read the catalog, ``run`` runs the job in the foreground, once (no retries), recorded
  in the catalog as the service records its runs; ^C or SIGTERM stop it, recorded as interrupted.

Everything here goes through the JobScheduler interface (``run`` queues the run with ``run_now`` and
follows it with ``run(id)``), so the two are told apart only by the local scheduler's ``abort``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..errors import ExitCode, NotFound
from ..repo.repository import Repository
from ..service import DEFAULT_PATH
from .output import emit_json, human_bytes, progress, stderr, stdout, table

if TYPE_CHECKING:  # the service's modules (pydantic) load only when a job command runs
    from ..service import config as configuration
    from ..service.client import ServiceClient
    from ..service.core import JobScheduler

FOLLOW = 0.2  # seconds between looks at a running job


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument(
        "--config", type=Path, default=DEFAULT_PATH,
        help=f"the service's configuration (default {DEFAULT_PATH})",
    )  # fmt: skip
    opts.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    opts.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("job", help="the service's jobs: list them, run one now, their history")
    jobs = p.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    q = jobs.add_parser("list", parents=[opts], help="the configured jobs, their next run and last result")
    q.set_defaults(func=cmd_list)
    q = jobs.add_parser(
        "run", parents=[opts],
        help="run a job now and follow it: in the running service, else in the foreground (once: no retries)",
    )  # fmt: skip
    q.add_argument("job", metavar="JOB")
    q.set_defaults(func=cmd_run)
    q = jobs.add_parser("history", parents=[opts], help="the latest runs (of one job), newest first")
    q.add_argument("job", nargs="?", metavar="JOB")
    q.add_argument("--limit", type=int, default=20, metavar="N", help="at most N runs (default 20)")
    q.set_defaults(func=cmd_history)


@contextlib.asynccontextmanager
async def connect(args: argparse.Namespace) -> AsyncIterator[JobScheduler]:
    """What the commands ask: the scheduler of the service running on the configuration's repository
    (a client of its local socket), else :func:`local_scheduler`."""
    from ..service import config as configuration

    cfg = configuration.load(args.config)
    client = service_client(cfg)
    if client is not None:
        yield client
        return
    async with local_scheduler(cfg) as sched:
        yield sched


def service_client(cfg: configuration.Config) -> ServiceClient | None:
    """A client of the service running on *cfg*'s repository, or None if none runs (or one that
    predates the local socket: the CLI ran its own scheduler beside those)."""
    from ..service.client import ServiceClient
    from ..service.daemon import RECORD, running

    root = cfg.repository.path
    record = running(root)
    if record is None or "api_socket" not in record:
        return None
    where = root / "run" / RECORD
    hint = (
        f"the service (pid {record['pid']}, recorded in {where}) should answer on it: see its log and "
        f"restart it (systemctl restart vmrecover); if no service runs, remove {where}"
    )
    return ServiceClient(Path(record["api_socket"]), hint=hint)


@contextlib.asynccontextmanager
async def local_scheduler(cfg: configuration.Config) -> AsyncIterator[JobScheduler]:
    """A scheduler in this process over the configuration's repository: it runs what ``run_now`` asks
    (no schedules, no retries, no crash handling: those are the service's) until the block ends, when a
    job still running is aborted and recorded as interrupted."""
    from ..service.daemon import read_passphrase
    from ..service.scheduler import Scheduler

    passphrase = read_passphrase(cfg)
    repo = Repository.open(cfg.repository.path, passphrase=(lambda: passphrase) if passphrase else None)
    try:
        sched = Scheduler(repo, cfg, retries=False)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: sched.serve(schedule=False, task_status=task_status))
                yield sched
                nursery.cancel_scope.cancel()
        finally:
            sched.close()
    finally:
        repo.close()


def _when(text: str | None) -> str:
    return "-" if not text else text.replace("T", " ")[:19]


def cmd_list(args: argparse.Namespace) -> int:
    async def ask() -> list[dict[str, Any]]:
        async with connect(args) as sched:
            return sched.jobs()

    jobs = trio.run(ask)
    if args.json:
        emit_json({"jobs": jobs})
        return ExitCode.OK
    rows = []
    for j in jobs:
        last = j.get("last_run")
        result = "-" if last is None else f"{last['state']} {_when(last.get('ended') or last.get('started'))}"
        if last is not None and last.get("error"):
            result += f": {last['error']}"
        state = j["state"] + (f" for {', '.join(j['waiting_for'])}" if j.get("waiting_for") else "")
        nxt = _when(j["next_run"]) if j["enabled"] else "disabled"
        rows.append([j["name"], j["kind"], j["schedule"], nxt, state, result])
    table(None, ["job", "kind", "schedule", "next run (UTC)", "state", "last run (UTC)"], rows)
    return ExitCode.OK


def cmd_history(args: argparse.Namespace) -> int:
    async def ask() -> list[dict[str, Any]]:
        async with connect(args) as sched:  # (locally, a job no longer configured still has its history)
            return sched.history(args.job, args.limit)

    runs = trio.run(ask)
    if args.json:
        emit_json({"job": args.job, "runs": runs})
        return ExitCode.OK
    rows = [[r["id"], r["job"], r["trigger"], r["attempt"], r["state"], _when(r["scheduled_for"]),
             _when(r["started"]), _when(r["ended"]), _figures(r), r.get("error") or ""]
            for r in runs]  # fmt: skip
    columns = [
        "run",
        "job",
        "trigger",
        "try",
        "state",
        "scheduled (UTC)",
        "started",
        "ended",
        "figures",
        "error",
    ]
    table(f"runs of {args.job}" if args.job else "job runs", columns, rows)
    return ExitCode.OK


def _figures(run: dict[str, Any]) -> str:
    stats = run.get("stats") or {}
    vms = stats.get("vms") or []
    if vms:
        ok = [v for v in vms if v.get("state") == "succeeded"]
        read = sum(v.get("bytes_read", 0) for v in ok)
        stored = sum(v.get("stored_bytes", 0) for v in ok)
        return f"{len(ok)}/{len(vms)} VMs, read {human_bytes(read)}, stored {human_bytes(stored)}"
    if "gc" in stats and "removed_bytes" in stats["gc"]:
        return f"freed {human_bytes(stats['gc']['removed_bytes'])}"
    if "verify" in stats and "chunks" in stats["verify"]:
        return f"{stats['verify']['points']} points, {stats['verify']['chunks']} chunks"
    return ""


def cmd_run(args: argparse.Namespace) -> int:
    doc, followed = trio.run(_run_and_follow, args)
    if args.json:
        emit_json(doc)
    elif followed:
        for v in (doc.get("stats") or {}).get("vms") or []:
            if v.get("state") == "succeeded":
                stdout.print(
                    f"{v['target']}: {v['vm']}@{v['point']} {v['kind']} backup in {v.get('duration_s')} s; "
                    f"read {human_bytes(v.get('bytes_read', 0))}, new {human_bytes(v.get('new_bytes', 0))}, "
                    f"stored {human_bytes(v.get('stored_bytes', 0))}",
                    markup=False,
                )
            else:
                stdout.print(f"{v['target']}: {v.get('state')}: {v.get('error')}", markup=False)
        for vm, ids in ((doc.get("stats") or {}).get("retention") or {}).get("removed", {}).items():
            if ids:
                stdout.print(f"retention removed {len(ids)} point(s) of {vm}: {', '.join(ids)}", markup=False)
        stdout.print(
            f"run {doc['id']} of job {doc['job']}: {doc['state']}"
            + (f": {doc['error']}" if doc.get("error") else ""),
            markup=False,
        )
    if not followed or doc["state"] == "interrupted":
        return ExitCode.INTERRUPTED
    if doc["state"] == "succeeded":
        return ExitCode.OK
    return int((doc.get("stats") or {}).get("exit_code") or ExitCode.INTERNAL)


async def _run_and_follow(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """Queue a run of the job and follow it to its end (a progress bar on a terminal): the run, and
    whether it was followed to its end.  SIGTERM or ^C: a run of this process's scheduler is stopped,
    recorded as interrupted, and the command ends as an interrupt (KeyboardInterrupt); the service's
    goes on there, and only the following stops (the run as it is then, False)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with connect(args) as sched:
            try:
                run_id = await sched.run_now(args.job)
            except KeyError:
                names = ", ".join(j["name"] for j in sched.jobs()) or "none"
                raise NotFound(f"no job named {args.job!r} in {args.config}", hint=f"jobs: {names}") from None
            abort = getattr(sched, "abort", None)  # a local scheduler: the run stops with us
            stopped: list[int] = []
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    async for sig in signals:
                        stopped.append(sig)
                        if abort is None:
                            stderr.print(
                                f"stopped following run {run_id} of job {args.job}; it goes on in the "
                                f"service: see 'vmrecover job history {args.job}'",
                                markup=False,
                            )
                        else:
                            stderr.print("stopping the job ...", markup=False)
                            abort(f"{signal.Signals(sig).name} to vmrecover job run", resume=False)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await _follow(sched, run_id, not args.json)
                nursery.cancel_scope.cancel()
            if not stopped or abort is None:
                return sched.run(run_id), not stopped
    raise KeyboardInterrupt  # the end of connect's block aborted the run, recorded as interrupted


async def _follow(sched: JobScheduler, run_id: int, show: bool) -> None:
    done = 0
    doc = sched.run(run_id)
    unit = (doc.get("progress") or {}).get("unit", "bytes")
    with progress(f"job {doc['job']}", enabled=show, unit=unit) as (total, advance):
        while doc["state"] not in ("succeeded", "failed", "interrupted"):
            p = doc.get("progress") or {}
            if p.get("total"):
                total(p["total"])
            if p.get("done", 0) > done:
                advance(p["done"] - done)
                done = p["done"]
            await trio.sleep(FOLLOW)
            doc = sched.run(run_id)
