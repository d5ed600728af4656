"""Builds vcsim (tests/vcsim/main.go against Debian's golang-github-vmware-govmomi-dev) into a cache.

The binary is ``build/vcsim/vcsim`` in the checkout (``/build/`` is git-ignored), rebuilt only when
main.go, the govmomi package's version or the Go compiler's version changes (``build/vcsim/stamp``).
A build takes ~30 s on two cores with an empty Go cache (``build/vcsim/gocache``), a second or two with
it.  Several test runs may build at once: a lock serialises them and the binary is renamed into place.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "tests" / "vcsim" / "main.go"
CACHE = ROOT / "build" / "vcsim"
BINARY = CACHE / "vcsim"
GOPATH_SYSTEM = "/usr/share/gocode"
PACKAGE = "golang-github-vmware-govmomi-dev"


class BuildUnavailable(Exception):
    """Go or the govmomi sources are missing (``make setup`` installs them)."""


def _stamp() -> str:
    try:
        pkg = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True, check=True
        ).stdout
        go = subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildUnavailable(f"needs golang-go and {PACKAGE} (make setup): {e}") from e
    if not Path(GOPATH_SYSTEM, "src/github.com/vmware/govmomi/simulator").is_dir():
        raise BuildUnavailable(f"{PACKAGE} is not installed (make setup)")
    digest = hashlib.sha256(MAIN.read_bytes()).hexdigest()
    return f"main.go {digest}\n{PACKAGE} {pkg}\n{go}\n"


def vcsim_binary() -> Path:
    """The built simulator, building it first if the cache is missing or stale."""
    stamp = _stamp()
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp_file = CACHE / "stamp"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if BINARY.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            return BINARY
        # A GOPATH of our own first (Go needs one to write into), then Debian's sources.
        gopath = CACHE / "gopath"
        gopath.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "GO111MODULE": "off",
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOPATH": f"{gopath}:{GOPATH_SYSTEM}",
            "GOCACHE": str(CACHE / "gocache"),
        }
        tmp = CACHE / f"vcsim.tmp{os.getpid()}"
        proc = subprocess.run(
            ["go", "build", "-o", str(tmp), "."], cwd=MAIN.parent, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"building vcsim failed:\n{proc.stderr}")
        os.replace(tmp, BINARY)
        stamp_file.write_text(stamp)
        return BINARY


def clean() -> None:
    shutil.rmtree(CACHE, ignore_errors=True)
