"""No quiet skips in CI: with ``CI=true`` a skipped test fails the run, unless its reason says that
nothing installable could make it run (it starts with :data:`UNFIXABLE`).

A missing tool (fio, /dev/fuse, libnfs, libguestfs, qemu) is fixed by ``make setup``, which installs
everything the tests use; on a developer's machine such a skip is only reported, in CI it is an error.
Loaded by pytest with ``-p tests.skip_policy`` (pyproject.toml).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

UNFIXABLE = "cannot run here:"  # e.g. "cannot run here: mounting a tmpfs needs root (CAP_SYS_ADMIN)"

_quiet: list[tuple[str, str]] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if not reason.startswith(UNFIXABLE):
            _quiet.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _quiet:
        return
    verdict = "FAILED (CI)" if _in_ci() else "skipped"
    terminalreporter.section(f"skips that `make setup` should have prevented: {verdict}")
    for nodeid, reason in _quiet:
        terminalreporter.line(f"{nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _quiet and _in_ci() and session.exitstatus == 0:
        session.exitstatus = 1
