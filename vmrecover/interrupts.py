"""Holding SIGTERM and ^C back while something must not be cut in half (removing a hypervisor's
snapshot, registering a recovered VM): they are recorded, and delivered again when the block ends.

Blocking with ``pthread_sigmask`` is not enough in Python: it blocks the calling thread only, and the
kernel hands a process signal to any thread that does not block it (a progress bar's refresh thread,
say), after which Python runs the handler in the main thread anyway.  Swapping the handlers works for
every thread, since Python runs handlers in the main thread only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be changed in the main thread, which is the only one they run in
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous: dict[int, Any] = {s: signal.signal(s, hold) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):  # each held signal once, in order: now its own handler runs
            os.kill(os.getpid(), s)
