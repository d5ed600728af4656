"""The service's shared state: what ``vmrecover serve`` holds once and every part uses.

One :class:`Service` per process: the repository (one catalog connection per thread, see repo/),
the configuration in force (replaced as a whole by a reload), the one datastore model (vfs/tree.py) and chunk
cache that the FUSE mount, the NFS export and the API's file views all read through, and the
scheduler.  The parts (service/api.py, service/scheduler.py, the datastores) get this object, never
globals, so that tests build a Service of their own.

Concurrency: the API and the scheduler run in the service's trio loop; anything that blocks (catalog,
chunks, hypervisors) goes to a worker thread with ``trio.to_thread.run_sync(..., limiter=service.limiter)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from nfs_export.rpc import AllowList

from ..errors import VmrecoverError
from ..repo.repository import Repository
from ..vfs.cache import ChunkCache
from ..vfs.tree import Vfs
from .config import Config


class Unavailable(VmrecoverError):
    """A part of the service that a request needs is not running, or is stopping (HTTP 503)."""

    http_status = 503


class JobScheduler(Protocol):
    """What the API and the CLI ask of the scheduler (service/scheduler.py implements it)."""

    def jobs(self) -> list[dict[str, Any]]:
        """Every configured job: name, kind, schedule, enabled, next_run (ISO UTC), state ("idle",
        "queued", "running", "waiting" for a host), and the latest run's summary (or None)."""
        ...

    async def run_now(self, name: str) -> int:
        """Queue a run of job *name* at once (KeyError if there is no such job); its run id."""
        ...

    def history(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The latest runs (of one job), newest first: id, job, state, scheduled_for, started, ended,
        attempt, error, and per VM / per disk figures."""
        ...

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as in :meth:`history`, with its progress while it runs (bytes done / total) and its
        log lines; KeyError if unknown."""
        ...

    def reload(self, config: Config) -> None:
        """Take a new configuration: new schedules apply from now; running jobs finish as they were."""
        ...

    def abort(self, reason: str) -> None:
        """Tell the running runs to stop (the service stops): they end as "interrupted"."""
        ...


@dataclass
class Service:
    repo: Repository
    config: Config
    config_path: Path
    cache: ChunkCache
    vfs: Vfs
    scheduler: JobScheduler | None = None
    limiter: trio.CapacityLimiter = field(default_factory=lambda: trio.CapacityLimiter(16))
    started: float = 0.0  # time.time() at start, for health and metrics
    passphrase: str | None = None  # an encrypted repository's, read from config.repository.passphrase_file
    nfs_allow: AllowList | None = None  # the NFS export's allow list (grown by recoveries on hypervisors)
