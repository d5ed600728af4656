"""Boot health checks: evidence that a restore point really boots (``vmrecover verify --boot``).

A throw-away recovery session of the point is run under qemu on the appliance (recovery/qemu_run.py:
the service's datastores, no network device: the VM never meets the production one), and watched:

- **serial console**: a login prompt (``login:`` at the end of a line), or the caller's ``--expect``
  pattern, is a boot (``login`` / ``expect``);
- **screen**, for guests that write nothing to the serial console: QMP ``screendump`` every few
  seconds; a picture that is not blank and has not changed for :data:`SCREEN_STABLE_S`, no earlier
  than :data:`SCREEN_MIN_S` after power-on, is a boot (``screen``).  Weaker evidence than a login
  prompt (a firmware's error screen is stable too), so the screenshot is kept for a person to see;
- **what ends it early**: qemu's events say why the VM stopped: a guest panic (``pvpanic``;
  ``panic``), the firmware finding nothing to boot (it resets after :data:`REBOOT_TIMEOUT_MS`, and
  ``-no-reboot`` turns a reset into the end: ``reset``), or the guest powering off (``stopped``).
  Nothing within the time-out is ``timeout``.

The result, with the serial console's tail and the last screenshot (PNG), is kept in the catalog
(``boot_checks``), then the session is discarded, whatever happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import select
import shutil
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import BadInput, NotFound, VmrecoverError
from ..qemu import accelerator
from ..repo.catalog import BootCheck, Point, now_iso
from ..repo.repository import Repository
from . import qemu_run, sessions

log = logging.getLogger("vmrecover.healthcheck")

LOGIN = re.compile(r"\blogin:[ \t]*$", re.MULTILINE)
SERIAL_KEEP = 64 << 10  # bytes of the serial console kept with the result
POLL_S = 2.0  # between looks at the consoles
SCREEN_MIN_S = 20.0  # the screen is not judged earlier (firmware and boot loader screens)
SCREEN_STABLE_S = 10.0  # unchanged this long, and not blank: booted
REBOOT_TIMEOUT_MS = 1000  # the firmware resets this long after finding nothing to boot
QEMU_EXTRA = [
    "-boot", f"strict=on,reboot-timeout={REBOOT_TIMEOUT_MS}",
    "-device", "pvpanic", "-action", "panic=exit-failure",
]  # fmt: skip
VERDICTS_OK = ("login", "expect", "screen")


# ------------------------------------------------------------------------------------------ QMP
class Qmp:
    """A QMP connection to one qemu: commands, and the events qemu sent meanwhile (kept in order)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise VmrecoverError(
                        f"qemu's QMP socket {path} did not open in {timeout:.0f} s"
                    ) from None
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self, *, wait: bool = True) -> dict[str, Any] | None:
        """The next message; None if none has arrived (*wait* false); EOFError once qemu has ended."""
        while b"\n" not in self.buf:
            if not wait and not select.select([self.sock], [], [], 0)[0]:
                return None
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("qemu closed its QMP socket")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def command(self, name: str, **arguments: Any) -> Any:
        msg = {"execute": name} | ({"arguments": arguments} if arguments else {})
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            doc = self._read()
            assert doc is not None
            if "event" in doc:
                self.events.append(doc)
            elif "error" in doc:
                raise VmrecoverError(f"QMP {name}: {doc['error'].get('desc', doc['error'])}")
            elif "return" in doc:
                return doc["return"]

    def drain(self) -> None:
        """Keep the events qemu sent since the last call (without waiting)."""
        while (doc := self._read(wait=False)) is not None:
            if "event" in doc:
                self.events.append(doc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --------------------------------------------------------------------------------------- screen
def read_ppm(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM (P6, maxval 255) as qemu's screendump writes it."""
    m = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
    if m is None:
        raise BadInput("not a P6 PPM with maxval 255")
    w, h = int(m[1]), int(m[2])
    pixels = data[m.end() : m.end() + 3 * w * h]
    if len(pixels) != 3 * w * h:
        raise BadInput(f"PPM of {w}x{h} is truncated")
    return w, h, pixels


def blank(rgb: bytes) -> bool:
    """One colour everywhere (a screen that shows nothing)."""
    return not rgb or rgb == rgb[:3] * (len(rgb) // 3)


def png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of *rgb* (rows top to bottom; each row unfiltered)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    stride = 3 * width
    raw = b"".join(b"\0" + rgb[y * stride : (y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def screendump(qmp: Qmp, scratch: Path) -> tuple[int, int, bytes]:
    """(width, height, RGB) of the screen now, through a PPM qemu writes into the folder *scratch*."""
    shot = scratch / "screen.ppm"
    qmp.command("screendump", filename=str(shot))
    try:
        return read_ppm(shot.read_bytes())
    finally:
        shot.unlink(missing_ok=True)


def session_screenshot(target: qemu_run.Published) -> bytes:
    """The screen of a session's running qemu, as a PNG (blocking: a QMP connection of its own)."""
    if not target.qmp or not qemu_run.alive(target):
        raise NotFound(f"session {target.vm_name} has no running qemu to take a screenshot of")
    scratch = Path(tempfile.mkdtemp(prefix="vmr-screen-"))
    qmp = Qmp(Path(target.qmp), timeout=10)
    try:
        return png(*screendump(qmp, scratch))
    finally:
        qmp.close()
        shutil.rmtree(scratch, ignore_errors=True)


class Screen:
    """The screen as seen so far: judged stable once unchanged and not blank for *stable_s*."""

    def __init__(self, stable_s: float = SCREEN_STABLE_S) -> None:
        self.stable_s = stable_s
        self.digest = b""
        self.since = 0.0
        self.last: tuple[int, int, bytes] | None = None

    def see(self, t: float, width: int, height: int, rgb: bytes) -> None:
        digest = hashlib.sha256(struct.pack(">II", width, height) + rgb).digest()
        if digest != self.digest:
            self.digest, self.since = digest, t
        self.last = (width, height, rgb)

    def stable(self, t: float) -> bool:
        return self.last is not None and not blank(self.last[2]) and t - self.since >= self.stable_s

    def png(self) -> bytes | None:
        return None if self.last is None else png(*self.last)


# ----------------------------------------------------------------------------------------- check
def _tail(path: Path, size: int = SERIAL_KEEP) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _why_ended(events: list[dict[str, Any]], code: int | None) -> tuple[str, str]:
    for e in events:
        if e.get("event") == "GUEST_PANICKED":
            return "panic", "the guest's kernel panicked"
    reasons = [e.get("data", {}).get("reason") for e in events if e.get("event") == "SHUTDOWN"]
    if "guest-reset" in reasons:
        return "reset", (
            "the VM reset before it showed a login prompt: the firmware found nothing to boot, or the guest "
            "rebooted"
        )
    if "guest-panic" in reasons:
        return "panic", "the guest's kernel panicked"
    if "guest-shutdown" in reasons:
        return "stopped", "the guest powered itself off before it showed a login prompt"
    return "stopped", f"qemu ended (exit {code}) before the guest showed a login prompt"


def boot_check(
    repo: Repository,
    point: Point,
    *,
    timeout: float = 300.0,
    expect: str | None = None,
    memory: str = "1G",
    cpus: int = 1,
    progress: Callable[[str], None] = lambda text: None,
    stop: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.monotonic,
) -> BootCheck:
    """Boot *point* in a throw-away session and judge it; the result is kept in the catalog and returned.
    *stop* is called between looks and may raise to abandon the check (a job's abort): the session
    goes, and no verdict is kept."""
    pattern = None
    if expect is not None:
        try:
            pattern = re.compile(expect, re.MULTILINE)
        except re.error as exc:
            raise BadInput(f"--expect {expect!r} is not a regular expression: {exc}") from None
    accel = accelerator()
    session = sessions.start(repo, point, name=f"boot-check-{point.id}-{int(time.time())}")
    scratch = Path(tempfile.mkdtemp(prefix="vmr-boot-check-"))  # qemu's screendumps
    started = clock()
    screen = Screen()
    verdict, detail, serial = "error", "", ""
    qmp: Qmp | None = None
    target = None
    try:
        target = qemu_run.publish(repo, session, point, memory=memory, cpus=cpus, accel=accel,
                                  extra=QEMU_EXTRA)  # fmt: skip
        console = Path(target.console)
        qmp = Qmp(Path(target.qmp))
        progress(f"booting {point.vm}@{point.id} ({accel}, time-out {timeout:.0f} s)")
        ended = False
        while True:
            t = clock() - started
            serial = _tail(console)
            if pattern is not None and pattern.search(serial):
                verdict, detail = "expect", f"the serial console showed {expect!r}"
            elif pattern is None and LOGIN.search(serial):
                verdict, detail = "login", "a login prompt on the serial console"
            if verdict != "error":
                break
            try:
                qmp.drain()
                if not ended:
                    screen.see(t, *screendump(qmp, scratch))
            except (EOFError, OSError, VmrecoverError):
                ended = True
            if ended or not qemu_run.alive(target):
                code = qemu_run.exit_code(target)
                serial = _tail(console)
                verdict, detail = _why_ended(qmp.events, code)
                break
            if not serial.strip() and t >= SCREEN_MIN_S and screen.stable(t):
                verdict, detail = (
                    "screen",
                    (
                        f"nothing on the serial console; the screen was unchanged and not blank for "
                        f"{screen.stable_s:.0f} s"
                    ),
                )
                break
            if t >= timeout:
                what = f"{expect!r}" if pattern is not None else "a login prompt"
                verdict, detail = "timeout", f"no {what} on the serial console within {timeout:.0f} s"
                break
            progress(f"waiting for {point.vm}@{point.id} to boot ({t:.0f} s)")
            stop()
            time.sleep(POLL_S)
        stop()  # (told to stop meanwhile: qemu may have been ended by that, which is no verdict)
    except VmrecoverError as exc:
        if target is None:  # qemu never started (no datastore to boot from...): not a verdict on the point
            raise
        verdict, detail = "error", exc.message
    finally:
        seconds = clock() - started
        if qmp is not None:
            qmp.close()
        if target is not None:
            qemu_run.unpublish(repo, None, session, target)
        sessions.stop(repo, session.name)
        shutil.rmtree(scratch, ignore_errors=True)
    check = BootCheck(
        point=point.id, checked=now_iso(), ok=verdict in VERDICTS_OK, verdict=verdict, detail=detail,
        seconds=round(seconds, 1), accel=accel, serial=serial[-SERIAL_KEEP:], screenshot=screen.png(),
    )  # fmt: skip
    check_id = repo.catalog.add_boot_check(check)
    log.info("boot check of %s@%s: %s (%s) in %.0f s", point.vm, point.id, verdict, detail, seconds)
    return BootCheck(**{**check.__dict__, "id": check_id})
