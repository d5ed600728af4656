"""Fault injection: deliver a signal to this process at a named moment, so that tests can hit the
windows a real SIGTERM or ^C could hit only by luck (the instant after a catalog commit, say).

``VMRECOVER_FAULT="backup.after-commit=SIGTERM"`` (several separated by commas) makes the process
signal itself when it reaches that moment; Python then runs the signal's handler before the next
statement, exactly as if the signal had arrived there.  Unset (always, in production), a moment costs
one dictionary lookup.  The moments, where the code names them with :func:`moment`:

- ``<transaction>.in-commit``: inside a catalog transaction, its rows written, before COMMIT;
- ``<transaction>.after-commit``: right after COMMIT returned, before the caller learns of it;
  ``<transaction>`` is the name given to :meth:`Catalog.transaction` (``backup``, ``session``, ...);
- ``backup.before-commit``: a backup's chunks and indexes are durable, the catalog not yet touched.
"""

from __future__ import annotations

import os
import signal

ENV = "VMRECOVER_FAULT"


def moment(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        where, _, sig = item.strip().partition("=")
        if where == name:
            os.kill(os.getpid(), signal.Signals[sig or "SIGTERM"])
