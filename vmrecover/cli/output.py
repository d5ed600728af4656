"""Console output shared by all commands: JSON for scripts, tables and progress bars for people,
structured logs on stderr."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

# Not a terminal (pipes, logs): wide lines rather than folded table cells, and messages unfolded.  No
# emoji codes ever: names and fingerprints are printed as they are (":cd:" in "6E:CD:A0" is not a disc).
stdout = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, emoji=False, soft_wrap=not sys.stderr.isatty())


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, *, path: Path | None = None) -> None:
    """Logs go to stderr, or to *path* (reopened when logrotate moves it away: WatchedFileHandler);
    ``VMRECOVER_LOG_FORMAT=json`` makes them one JSON object per line.  nfs_export's logs go the same
    way."""
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if path is None else logging.handlers.WatchedFileHandler(path)
    )
    if os.environ.get("VMRECOVER_LOG_FORMAT") == "json":
        handler.setFormatter(_JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("vmrecover", "nfs_export"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
    logging.getLogger("nfs_export").propagate = False


def emit_json(doc: Any, *, indent: int | None = 2) -> None:
    """One JSON document on stdout; ``indent=None`` puts it on one line (a line-oriented event)."""
    sys.stdout.write(json.dumps(doc, indent=indent, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(str(v) for v in r))
    stdout.print(t)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextlib.contextmanager
def progress(
    label: str, *, enabled: bool, unit: str = "bytes"
) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """Yields (set_total, advance).  A bar on stderr when it is a terminal and --json is off."""
    if not enabled or not sys.stderr.isatty():
        yield (lambda n: None), (lambda n: None)
        return
    cols = (
        [BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn()]
        if unit == "bytes"
        else [BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    )
    with Progress("[progress.description]{task.description}", *cols, console=stderr, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield (lambda n: bar.update(task, total=n)), (lambda n: bar.advance(task, n))
