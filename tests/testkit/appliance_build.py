"""The appliance image of this checkout, for the slow tier (tests/test_appliance.py).

appliance/build.sh takes 4-5 minutes, much of it downloads and disk work.  When a run selects the
tier, conftest starts the build in the background as the run begins (:func:`start`, at the lowest CPU
priority: the other tests come first) and moves the tier to the end; the tier's fixture then waits
for it (:func:`image`).  An image in dist/ whose ``.source`` stamp names this clean HEAD is used as
it is, and ``$VMRECOVER_APPLIANCE_IMAGE`` names one to use instead of building.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from appliance import boot_test

TOP = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 1800  # from the moment the tier waits for it

_build: subprocess.Popen[bytes] | None = None
_log: Path | None = None


def _source_stamp() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=TOP, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=TOP,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _built_already(image: Path) -> bool:
    stamp = image.with_name(image.name + ".source")
    wanted = _source_stamp()
    if "-dirty" in wanted or not (image.exists() and stamp.exists()):
        return False
    return stamp.read_text().strip() == wanted


def start() -> None:
    """Start building the image in the background, unless one is given, already built, or cannot be
    built here (not root: the tier then skips)."""
    global _build, _log
    if _build is not None or os.environ.get("VMRECOVER_APPLIANCE_IMAGE") or os.geteuid() != 0:
        return
    if _built_already(boot_test.default_image()):
        return
    _log = Path(tempfile.mkdtemp(prefix="vmrecover-appliance-build-")) / "build.log"
    with open(_log, "wb") as out:
        _build = subprocess.Popen(["nice", "-n", "19", str(TOP / "appliance" / "build.sh")], cwd=TOP,
                                  stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)  # fmt: skip


def stop() -> None:
    """End a build still running when the run ends (interrupted, or the tier was never reached): its
    whole process group, mmdebstrap and apt included; build.sh leaves its work folder for the next."""
    if _build is not None and _build.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_build.pid, signal.SIGTERM)
        try:
            _build.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(_build.pid, signal.SIGKILL)
            _build.wait()


def image() -> tuple[Path, str]:
    """The image (built now if :func:`start` did not run), and the build log's last lines ('' when
    nothing was built)."""
    given = os.environ.get("VMRECOVER_APPLIANCE_IMAGE")
    if given:
        return Path(given).resolve(), ""
    path = boot_test.default_image()
    if _build is None:
        start()
    if _build is None:
        return path, ""
    assert _log is not None
    try:
        rc = _build.wait(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _build.kill()
        rc = _build.wait()
    tail = "\n".join(_log.read_text(errors="replace").splitlines()[-25:])
    assert rc == 0, f"appliance/build.sh failed (exit {rc}); log {_log}:\n{tail}"
    return path, tail
