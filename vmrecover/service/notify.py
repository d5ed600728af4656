"""Job results, told: syslog, mail and a webhook (the ``[notify]`` section of the configuration).

The scheduler calls :func:`run_ended` once for every run that ends (succeeded, failed or interrupted),
from a worker thread (it blocks for at most the longest channel's timeout plus :data:`GRACE`).  Each
configured channel whose ``on`` list holds the run's outcome ("success" for a succeeded run, "failure"
for any other end) gets one message naming the job, the outcome, the VMs and the failure reason:

- **syslog**: one RFC 5424 message (facility daemon, app-name ``vmrecover``, MSGID ``job``; a failure
  at severity err, a success at notice) to ``/dev/log`` or another local socket (a datagram), to a
  server over UDP (RFC 5426: one datagram, at most :data:`UDP_MAX` bytes) or over TCP (RFC 6587 octet
  counting: ``LEN SP MSG``);
- **email**: over SMTP (``smtplib``), STARTTLS verified against the system's or the configured CAs
  before a password is sent, the password read from its private file when the mail goes;
- **webhook**: a JSON document (:meth:`Report.document`) POSTed with urllib3, the bearer token read
  from its private file.

Nothing here raises into the scheduler: a channel that fails is logged (``vmrecover.notify``, warning)
with the channel named, and never blocks it for long: every network operation has a timeout, and the
channels run side by side in threads that :func:`run_ended` stops waiting for at its deadline.
Secrets never reach a log: the password, the token and the webhook's path and query (which services
such as chat webhooks use as the secret) are replaced by ``***`` in every message logged here, and
urllib3's own debug lines about the webhook's request are scrubbed the same way.
"""

from __future__ import annotations

import base64
import datetime
import errno
import json
import logging
import os
import smtplib
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import urllib3

from .. import __version__
from ..cli.output import human_bytes
from .config import Config, Email, Notify, Webhook, parse_duration, parse_smtp, parse_syslog

log = logging.getLogger("vmrecover.notify")

FACILITY = 3  # daemon
SEVERITY = {"failure": 3, "success": 5}  # err, notice
SYSLOG_TIMEOUT = 5.0  # connecting to a TCP syslog server, sending to any
UDP_MAX = 2048  # bytes of a syslog datagram sent over the network (RFC 5426 asks receivers for 2048)
STREAM_MAX = 16384  # ... of a message sent to a local socket or over TCP
GRACE = 5.0  # run_ended waits this much longer than the longest channel's timeout, then returns
BOM = b"\xef\xbb\xbf"  # RFC 5424: a UTF-8 MSG starts with it

Outcome = Literal["failure", "success"]


# --- what is said --------------------------------------------------------------------------------
@dataclass(frozen=True)
class VmResult:
    name: str
    state: str  # succeeded, failed, ... (as the run record has it; "" when it does not say)
    error: str | None = None
    point: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # the VM's record as the run gave it

    def line(self) -> str:
        text = f"{self.name}: {self.state or 'unknown'}"
        if self.point:
            text += f", point {self.point}"
        f = self.figures
        parts = [
            f"{label} {human_bytes(f[k])}"
            for k, label in (("bytes_read", "read"), ("stored_bytes", "stored"))
            if isinstance(f.get(k), int | float)
        ]
        if isinstance(f.get("duration_s"), int | float):
            parts.append(f"in {_duration(f['duration_s'])}")
        if parts:
            text += f" ({', '.join(parts)})"
        if self.error:
            text += f": {self.error}"
        return text


@dataclass(frozen=True)
class Report:
    """One run's end, as every channel tells it."""

    job: str
    kind: str
    run_id: Any
    state: str
    outcome: Outcome
    started: str | None
    ended: str | None
    error: str | None
    vms: list[VmResult]
    host: str
    attempt: Any = None
    trigger: str | None = None

    @property
    def duration(self) -> float | None:
        try:
            start = datetime.datetime.fromisoformat(str(self.started))
            end = datetime.datetime.fromisoformat(str(self.ended))
        except ValueError:
            return None
        return max(0.0, (end - start).total_seconds())

    def reason(self) -> str | None:
        """Why the run failed: its error, else the first failed VM's."""
        if self.error:
            return self.error
        return next((f"{v.name}: {v.error}" for v in self.vms if v.error), None)

    def subject(self) -> str:
        return f"vmrecover on {self.host}: job {self.job} {self.state}"

    def summary(self) -> str:
        """One line: job, outcome, VMs, reason."""
        text = f"job {self.job} ({self.kind}, run {self.run_id}) {self.state}"
        if self.duration is not None:
            text += f" after {_duration(self.duration)}"
        if self.vms:
            text += ": " + ", ".join(f"{v.name} {v.state or 'unknown'}" for v in self.vms)
        reason = self.reason()
        if self.outcome == "failure" and reason:
            text += f"; error: {reason}"
        return text

    def body(self) -> str:
        rows = [
            ("Job", f"{self.job} ({self.kind})"),
            ("Outcome", self.state),
            (
                "Run",
                f"{self.run_id}" + (f" (attempt {self.attempt})" if self.attempt not in (None, 1) else ""),
            ),
            ("Trigger", self.trigger),
            ("Started", self.started),
            ("Ended", self.ended),
            ("Duration", _duration(self.duration) if self.duration is not None else None),
            ("Error", self.reason() if self.outcome == "failure" else None),
            ("Appliance", self.host),
        ]
        text = "".join(f"{k + ':':<11}{v}\n" for k, v in rows if v not in (None, ""))
        if self.vms:
            text += "\nVMs:\n" + "".join(f"  {v.line()}\n" for v in self.vms)
        return text

    def document(self) -> dict[str, Any]:
        """The webhook's JSON document."""
        return {
            "event": "vmrecover.run_ended",
            "appliance": self.host,
            "job": self.job,
            "kind": self.kind,
            "run": self.run_id,
            "attempt": self.attempt,
            "trigger": self.trigger,
            "state": self.state,
            "outcome": self.outcome,
            "started": self.started,
            "ended": self.ended,
            "duration_s": self.duration,
            "error": self.reason() if self.outcome == "failure" else None,
            "vms": [
                {**v.figures, "name": v.name, "state": v.state, "point": v.point, "error": v.error}
                for v in self.vms
            ],
            "message": self.summary(),
        }


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else f"{m} min {s} s"


def _json(value: Any) -> Any:
    if isinstance(value, str | bytes):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value


def _vm_results(run: Mapping[str, Any]) -> list[VmResult]:
    """Per VM: from ``stats["vms"]`` (a list of records with "vm" or "target", as service/runner.py
    keeps them, or a mapping name -> record), else ``run["vms"]`` (the same, or just names)."""
    stats = _json(run.get("stats"))
    per = stats.get("vms") if isinstance(stats, dict) else None
    if per is None:
        per = _json(run.get("vms"))
    if isinstance(per, dict):
        items = [(str(k), v) for k, v in per.items()]
    elif isinstance(per, list):
        items = []
        for v in per:
            if isinstance(v, dict):
                items.append((str(v.get("vm") or v.get("target") or v.get("name") or "?"), v))
            else:
                items.append((str(v), {}))
    else:
        return []
    out = []
    for name, rec in items:
        rec = rec if isinstance(rec, dict) else {"state": str(rec)}
        point = rec.get("point")
        if isinstance(point, dict):
            point = point.get("id")
        out.append(
            VmResult(
                name=name,
                state=str(rec.get("state") or ""),
                error=str(rec["error"]) if rec.get("error") else None,
                point=str(point) if point else None,
                figures={k: v for k, v in rec.items() if k not in ("vm", "name", "state", "error", "point")},
            )
        )
    return out


def report(run: Mapping[str, Any]) -> Report:
    """A run record (service/scheduler.py, catalog ``job_runs``) as the channels tell it."""
    state = str(run.get("state") or "unknown")
    return Report(
        job=str(run.get("job") or "?"),
        kind=str(run.get("kind") or "backup"),
        run_id=run.get("id"),
        state=state,
        outcome="success" if state == "succeeded" else "failure",
        started=run.get("started"),
        ended=run.get("ended"),
        error=str(run["error"]) if run.get("error") else None,
        vms=_vm_results(run),
        host=_hostname(),
        attempt=run.get("attempt"),
        trigger=run.get("trigger"),
    )


def _hostname() -> str:
    """This machine's name as RFC 5424's HOSTNAME field takes it (printable ASCII, no space)."""
    name = "".join(c for c in socket.gethostname() if 33 <= ord(c) <= 126)[:255]
    return name or "-"


# --- secrets -------------------------------------------------------------------------------------
def _scrub(text: str, secrets: Iterable[str]) -> str:
    for s in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        text = text.replace(s, "***")
    return text


def _read_secret(path: Path) -> str:
    """The first line of a private file (a password, a token)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"{path} is readable by others (chmod 600 {path})")
        data = f.read(65536).decode()
    secret = data.splitlines()[0] if data else ""
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


class _Urllib3Scrub(logging.Filter):
    """urllib3 logs its requests' paths at debug: in a thread sending a webhook, scrub its secrets."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = getattr(self.local, "secrets", None)
        if secrets:
            record.msg, record.args = _scrub(record.getMessage(), secrets), ()
        return True


_URLLIB3_SCRUB = _Urllib3Scrub()
for _name in ("connectionpool", "connection", "poolmanager", "response", "util.retry"):
    logging.getLogger(f"urllib3.{_name}").addFilter(_URLLIB3_SCRUB)


# --- syslog --------------------------------------------------------------------------------------
def rfc5424(
    severity: int, msg: str, *, when: datetime.datetime | None = None, host: str | None = None,
    msgid: str = "job", limit: int = STREAM_MAX,
) -> bytes:  # fmt: skip
    """``<PRI>1 TIMESTAMP HOSTNAME vmrecover PROCID MSGID - BOM MSG``, at most *limit* bytes (the MSG
    is cut at a character boundary)."""
    when = when or datetime.datetime.now(datetime.UTC)
    ts = when.astimezone(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    head = f"<{FACILITY * 8 + severity}>1 {ts} {host or _hostname()} vmrecover {os.getpid()} {msgid} - "
    data = head.encode("ascii") + BOM
    body = msg.encode()[: max(0, limit - len(data))].decode(errors="ignore").encode()
    return data + body


def _send_syslog(target: str, outcome: Outcome, text: str) -> None:
    kind, address, port = parse_syslog(target)
    sev = SEVERITY[outcome]
    if kind == "unix":
        msg = rfc5424(sev, text)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SYSLOG_TIMEOUT)
            try:
                s.sendto(msg, address)
                return
            except OSError as exc:
                if exc.errno != errno.EPROTOTYPE:  # a stream socket, as some syslog daemons have
                    raise
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SYSLOG_TIMEOUT)
            s.connect(address)
            s.sendall(msg + b"\0")
    elif kind == "udp":
        msg = rfc5424(sev, text, limit=UDP_MAX)
        family, type_, proto, _, addr = socket.getaddrinfo(address, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, type_ | socket.SOCK_CLOEXEC, proto) as s:
            s.settimeout(SYSLOG_TIMEOUT)
            s.sendto(msg, addr)
    elif kind == "tcp":
        msg = rfc5424(sev, text)
        with socket.create_connection((address, port), timeout=SYSLOG_TIMEOUT) as s:
            s.sendall(b"%d %s" % (len(msg), msg))  # RFC 6587 octet counting


# --- email ---------------------------------------------------------------------------------------
def _secrets_of_login(user: str, password: str) -> list[str]:
    """The password and the forms AUTH PLAIN and LOGIN send it in (a server may echo them)."""
    b64 = [base64.b64encode(s.encode()).decode() for s in (password, f"\0{user}\0{password}")]
    return [password, *b64]


def _send_mail(email: Email, rep: Report, secrets: list[str]) -> None:
    host, port = parse_smtp(email.smtp)
    timeout = parse_duration(email.timeout)
    password = None
    if email.password_file is not None:
        password = _read_secret(email.password_file)
        secrets.extend(_secrets_of_login(email.user or "", password))
    msg = EmailMessage()
    msg["Subject"] = rep.subject()
    msg["From"] = email.from_
    msg["To"] = ", ".join(email.to)
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("vmrecover", domain=rep.host)  # (its default asks DNS: slow)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(rep.body())
    with smtplib.SMTP(host, port, timeout=timeout, local_hostname=rep.host) as smtp:
        smtp.ehlo()
        if email.starttls:
            ctx = ssl.create_default_context(cafile=str(email.ca_file) if email.ca_file else None)
            smtp.starttls(context=ctx)
            smtp.ehlo()
        if email.user is not None and password is not None:
            smtp.login(email.user, password)
        refused = smtp.send_message(msg)
    if refused:
        log.warning("notify: email via %s: recipients refused: %s", email.smtp, ", ".join(sorted(refused)))


# --- webhook -------------------------------------------------------------------------------------
def _webhook_name(url: str) -> str:
    """The webhook as logs name it: scheme, host and port, never its path (which may be its secret)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def _webhook_secrets(url: str) -> list[str]:
    u = urlsplit(url)
    out = [u.query]
    if u.path not in ("", "/"):
        out += [u.path, u.path.lstrip("/")]
        out += [p for p in u.path.split("/") if len(p) >= 16]  # a token as a path component
    return out


def _post_webhook(hook: Webhook, rep: Report, secrets: list[str]) -> None:
    timeout = parse_duration(hook.timeout)
    secrets.extend(_webhook_secrets(hook.url))
    headers = {"Content-Type": "application/json", "User-Agent": f"vmrecover/{__version__}"}
    if hook.token_file is not None:
        token = _read_secret(hook.token_file)
        secrets.append(token)
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(rep.document(), default=str).encode()
    kw: dict[str, Any] = {}
    if urlsplit(hook.url).scheme == "https":
        kw["ssl_context"] = ssl.create_default_context(cafile=str(hook.ca_file) if hook.ca_file else None)
    _URLLIB3_SCRUB.local.secrets = secrets
    try:
        with urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False, **kw
        ) as pm:
            resp = pm.request(
                "POST", hook.url, body=body, headers=headers, redirect=False, preload_content=False
            )
            try:
                status = resp.status
                detail = resp.read(512).decode(errors="replace") if not 200 <= status < 300 else ""
            finally:
                resp.release_conn()
    finally:
        _URLLIB3_SCRUB.local.secrets = None
    if not 200 <= status < 300:
        raise RuntimeError(
            f"answered HTTP {status}" + (f": {detail.strip()[:200]}" if detail.strip() else "")
        )


# --- the scheduler's call ------------------------------------------------------------------------
@dataclass
class _Channel:
    name: str  # as logs name it: "syslog udp://logs:514", "email mail.example.com:587", "webhook https://h"
    timeout: float
    send: Callable[[list[str]], None]  # given a list to add the secrets it uses to
    secrets: list[str] = field(default_factory=list)


def channels(notify: Notify, rep: Report) -> list[_Channel]:
    """The channels configured to tell *rep*'s outcome."""
    out = []
    if parse_syslog(notify.syslog)[0] != "none" and rep.outcome in notify.syslog_on:
        target, text = notify.syslog, rep.summary()
        out.append(
            _Channel(f"syslog {target}", SYSLOG_TIMEOUT, lambda s: _send_syslog(target, rep.outcome, text))
        )
    email = notify.email
    if email is not None and rep.outcome in email.on:
        # a few operations each within the timeout: connect, EHLO, STARTTLS, login, the mail, QUIT
        out.append(
            _Channel(
                f"email {email.smtp}", 4 * parse_duration(email.timeout), lambda s: _send_mail(email, rep, s)
            )
        )
    hook = notify.webhook
    if hook is not None and rep.outcome in hook.on:
        out.append(
            _Channel(
                f"webhook {_webhook_name(hook.url)}",
                2 * parse_duration(hook.timeout),
                lambda s: _post_webhook(hook, rep, s),
                secrets=_webhook_secrets(hook.url),
            )
        )
    return out


def _deliver(ch: _Channel, rep: Report) -> None:
    try:
        ch.send(ch.secrets)
    except Exception as exc:
        reason = _scrub(f"{type(exc).__name__}: {exc}", ch.secrets)
        log.warning("notify: %s failed for job %s run %s: %s", ch.name, rep.job, rep.run_id, reason)
    else:
        log.debug("notify: %s told job %s run %s %s", ch.name, rep.job, rep.run_id, rep.state)


def run_ended(config: Config, run: Mapping[str, Any]) -> None:
    """Tell the configured channels that *run* ended.  Never raises; returns within the longest
    channel's timeout plus :data:`GRACE` (a channel still busy then is logged and left to finish)."""
    try:
        _run_ended(config, run)
    except Exception as exc:  # (a run record this module cannot read, no thread to be had): say so, go on
        log.warning("notify: cannot report a run that ended: %s: %s", type(exc).__name__, exc)


def _run_ended(config: Config, run: Mapping[str, Any]) -> None:
    rep = report(run)
    todo = channels(config.notify, rep)
    deadline = time.monotonic() + max((ch.timeout for ch in todo), default=0) + GRACE
    threads = []
    for ch in todo:
        t = threading.Thread(
            target=_deliver, args=(ch, rep), name=f"notify {ch.name.split()[0]}", daemon=True
        )
        t.start()
        threads.append((ch, t))
    for ch, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            log.warning("notify: %s did not finish for job %s run %s in time; not waiting for it",
                        ch.name, rep.job, rep.run_id)  # fmt: skip
