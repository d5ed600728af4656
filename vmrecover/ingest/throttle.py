"""A bandwidth cap shared by the threads of one job: ``bandwidth = "200M"`` in a job of the service.

The readers call :meth:`Throttle.take` with what they have just read; it sleeps until the bytes taken
so far fit the rate.  A quiet spell earns at most one second's worth of burst, so a job that waited for
a host does not then read at full speed for minutes.  The reads of a backup are sequential per disk
and their read-ahead is bounded (ingest/readahead.py), so holding back the reader holds back the
source: the hypervisor's datastore or NBD server sees the cap, not just our CPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

SLICE = 0.25  # seconds: a sleeping reader looks at *check* (an abort) at least this often
BURST = 1.0  # seconds of the rate a quiet spell may save up


class Throttle:
    def __init__(
        self, rate: int, *, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        if rate <= 0:
            raise ValueError(f"a bandwidth cap must be positive, not {rate}")
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._paid_until = clock()  # the moment at which everything taken so far fits the rate

    def delay(self, n: int) -> float:
        """Take *n* bytes: how long the caller must wait before its next read."""
        with self._lock:
            now = self._clock()
            self._paid_until = max(self._paid_until, now - BURST) + n / self.rate
            return max(0.0, self._paid_until - now)

    def take(self, n: int, check: Callable[[], None] = lambda: None) -> None:
        """Take *n* bytes, sleeping as long as the rate asks; *check* is called between slices of the
        sleep (it raises to stop: an aborted job does not sleep out its debt)."""
        wait = self.delay(n)
        end = self._clock() + wait
        while wait > 0:
            check()
            self._sleep(min(wait, SLICE))
            wait = end - self._clock()
