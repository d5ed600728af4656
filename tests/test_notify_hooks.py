"""Job results told to real peers (syslog over UDP, TCP and a local socket, an SMTP server, an HTTPS
webhook), and jobs' pre/post hooks run as real processes.

What must hold: every channel says the job, the outcome, the VMs and the failure reason; a channel
that fails or hangs is logged with its name and never raises into (or holds up) the scheduler;
secrets (the SMTP password, the webhook's token and its path) never reach a log; a hook runs without
a shell, with its variables and none of the service's secrets, and a hook past its timeout is killed
with everything it started.
"""

from __future__ import annotations

import datetime
import http.server
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email import policy as email_policy
from pathlib import Path
from typing import Any, cast

import pytest

from tests.testkit.tls import ServerCerts, server_certs
from vmrecover.service import config, hooks, notify

PASSWORD = "pw-Zq8vXk3LmN0pR"
TOKEN = "tok-9fG2hJ7kL1mN4pQ6"
HOOK_PATH = "/hooks/T0123456789ABCDEFGHIJ"  # a chat webhook: its path is its secret

FAILED = {  # a run record as service/runner.py and the catalog's job_runs keep it
    "id": 42,
    "job": "web-nightly",
    "kind": "backup",
    "trigger": "schedule",
    "state": "failed",
    "attempt": 1,
    "started": "2026-03-01T02:00:00.000000Z",
    "ended": "2026-03-01T02:03:05.500000Z",
    "error": "web02: hypervisor vcenter1 unreachable: connection refused (1 of 2 VMs failed)",
    "stats": json.dumps({"vms": [
        {"target": "web01", "vm": "web01", "state": "succeeded", "point": "0123456789ab", "kind": "full",
         "bytes_read": 10 << 30, "stored_bytes": 1 << 30, "duration_s": 120.0},
        {"target": "web02", "state": "failed",
         "error": "hypervisor vcenter1 unreachable: connection refused"},
    ]}),
}  # fmt: skip
SUCCEEDED = {**FAILED, "id": 43, "state": "succeeded", "error": None, "stats": {"vms": {  # (by name, as well)
    "web01": {"state": "succeeded", "point": "0123456789ab"},
    "web02": {"state": "succeeded", "point": "ba9876543210"},
}}}  # fmt: skip


def make_config(**notify_section: Any) -> config.Config:
    return config.Config.model_validate({"repository": {"path": "/nonexistent"}, "notify": notify_section})


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) vmrecover (?P<procid>\d+) job - \ufeff(?P<msg>.*)$", re.S
)


def parse_syslog(data: bytes) -> re.Match[str]:
    m = RFC5424.match(data.decode())
    assert m, data
    ts = datetime.datetime.fromisoformat(m["ts"])
    assert ts.tzinfo is not None and abs((datetime.datetime.now(datetime.UTC) - ts).total_seconds()) < 60
    assert m["host"] == socket.gethostname() and int(m["procid"]) == os.getpid()
    return m


def ours(caplog: pytest.LogCaptureFixture) -> str:
    """What the appliance logged (not the test's SMTP server, whose debug log shows its AUTH lines)."""
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("mail."))


def says_the_failure(text: str) -> None:
    for what in ("web-nightly", "failed", "web01", "web02", "vcenter1 unreachable: connection refused"):
        assert what in text, (what, text)


# --- syslog -----------------------------------------------------------------------------------------
def test_syslog_over_udp_a_failure_at_severity_err() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        notify.run_ended(make_config(syslog=f"udp://127.0.0.1:{s.getsockname()[1]}"), FAILED)
        m = parse_syslog(s.recv(65536))
    assert int(m["pri"]) == 3 * 8 + 3  # daemon.err
    says_the_failure(m["msg"])
    assert "run 42" in m["msg"] and "after 3 min 6 s" in m["msg"]


def test_syslog_over_tcp_a_success_at_notice_with_octet_counting() -> None:
    got: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(5)

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                got.append(data)

        t = threading.Thread(target=serve)
        t.start()
        notify.run_ended(make_config(syslog=f"tcp://127.0.0.1:{srv.getsockname()[1]}"), SUCCEEDED)
        t.join(5)
    length, _, msg = got[0].partition(b" ")
    assert int(length) == len(msg)  # RFC 6587: MSG-LEN SP SYSLOG-MSG, one frame
    m = parse_syslog(msg)
    assert int(m["pri"]) == 3 * 8 + 5  # daemon.notice
    assert "job web-nightly (backup, run 43) succeeded" in m["msg"]
    assert "web01 succeeded, web02 succeeded" in m["msg"] and "error" not in m["msg"]


def test_syslog_to_a_local_socket_and_only_the_outcomes_configured(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(0.3)
        only_failures = make_config(syslog=f"unix://{path}", syslog_on=["failure"])
        notify.run_ended(only_failures, SUCCEEDED)
        with pytest.raises(TimeoutError):
            s.recv(65536)
        notify.run_ended(only_failures, {**FAILED, "state": "interrupted"})  # an interrupted run failed
        m = parse_syslog(s.recv(65536))
    assert int(m["pri"]) == 27 and "web-nightly (backup, run 42) interrupted" in m["msg"]


def test_a_syslog_datagram_is_cut_to_fit() -> None:
    long = {**FAILED, "error": "é" * 5000}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        notify.run_ended(make_config(syslog=f"udp://127.0.0.1:{s.getsockname()[1]}"), long)
        data = s.recv(65536)
    assert len(data) <= notify.UDP_MAX
    assert parse_syslog(data)["msg"].endswith("é")  # cut between characters


# --- email ------------------------------------------------------------------------------------------
class Mailbox:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult

        self.logins.append((data.login, data.password))
        ok = data.login == b"backup" and data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False)  # (not handled: the server answers 535 itself)


@pytest.fixture
def certs(tmp_path: Path) -> ServerCerts:
    return server_certs(tmp_path / "tls")


@pytest.fixture
def smtp_server(certs: ServerCerts) -> Iterator[tuple[Mailbox, int]]:
    from aiosmtpd.controller import Controller

    box = Mailbox()
    port = free_port()
    ctl = Controller(
        box,
        hostname="127.0.0.1",
        port=port,
        tls_context=certs.server_context(),
        require_starttls=True,
        authenticator=box.authenticate,
        auth_require_tls=True,
    )
    ctl.start()
    try:
        yield box, port
    finally:
        ctl.stop()


def test_email_through_a_real_smtp_server_with_starttls_and_login(
    tmp_path: Path, certs: ServerCerts, smtp_server: tuple[Mailbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    box, port = smtp_server
    email = {
        "smtp": f"127.0.0.1:{port}", "ca_file": str(certs.ca_file), "user": "backup",
        "password_file": str(private(tmp_path / "smtp-password", PASSWORD)), "from": "vmrecover@example.com",
        "to": ["ops@example.com", "dba@example.com"], "timeout": "5s",
    }  # fmt: skip
    notify.run_ended(make_config(syslog="none", email=email), FAILED)
    assert box.logins == [(b"backup", PASSWORD.encode())]
    (env,) = box.envelopes
    assert env.mail_from == "vmrecover@example.com" and env.rcpt_tos == ["ops@example.com", "dba@example.com"]
    mail = message_from_bytes(env.content, policy=email_policy.default)
    assert re.fullmatch(r"vmrecover on \S+: job web-nightly failed", mail["Subject"])
    text = mail.get_content()
    says_the_failure(text)
    assert "web01: succeeded, point 0123456789ab (read 10.0 GiB, stored 1.0 GiB, in 2 min 0 s)" in text

    notify.run_ended(make_config(syslog="none", email=email), SUCCEEDED)  # on = ["failure"]: not mailed
    notify.run_ended(make_config(syslog="none", email={**email, "on": ["success"]}), SUCCEEDED)
    assert len(box.envelopes) == 2 and b"job web-nightly succeeded" in box.envelopes[1].content

    # a wrong password: the server says no, the log says which channel, and not the password
    private(tmp_path / "smtp-password", "not-" + PASSWORD)
    notify.run_ended(make_config(syslog="none", email=email), FAILED)
    assert len(box.envelopes) == 2
    assert re.search(
        rf"notify: email 127\.0\.0\.1:{port} failed for job web-nightly run 42: SMTPAuth", caplog.text
    )
    assert PASSWORD not in ours(caplog)


def test_an_smtp_password_file_others_can_read_is_refused_at_load(tmp_path: Path) -> None:
    secret = private(tmp_path / "smtp-password", PASSWORD, 0o644)
    example = config.EXAMPLE.read_text()
    uncomment = lambda m: re.sub(r"^# ", "", m[0], flags=re.M)  # noqa: E731
    text = re.sub(r"^# \[notify\.email\]\n(?:# .*\n)*", uncomment, example, flags=re.M)
    text = text.replace('"/etc/vmrecover/smtp-password"', f'"{secret}"').replace(
        'ca_file = "/etc/vmrecover/mail-ca.pem"', ""
    )
    path = tmp_path / "vmrecover.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    m = re.fullmatch(
        rf"{re.escape(str(path))}:(\d+): notify\.email\.password_file: .* is readable by others",
        e.value.message,
    )
    assert m, e.value.message
    assert text.splitlines()[int(m[1]) - 1].startswith("password_file =")
    secret.chmod(0o600)
    email = config.load(path).notify.email
    assert email is not None and email.password_file == secret and email.from_ == "vmrecover@example.com"
    assert PASSWORD not in repr(config.load(path))  # the password is read when a mail goes, not kept

    path.write_text(text.replace("starttls = true", "starttls = false"))
    with pytest.raises(config.ConfigError, match=r"notify\.email: a password is only sent over TLS"):
        config.load(path)


def test_an_unreachable_smtp_server_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    email = {"smtp": f"127.0.0.1:{port}", "from": "a@example.com", "to": ["b@example.com"], "timeout": "2s",
             "user": "backup", "password_file": str(private(tmp_path / "pw", PASSWORD))}  # fmt: skip
    syslog = f"tcp://127.0.0.1:{free_port()}"  # nor there
    t0 = time.monotonic()
    notify.run_ended(make_config(syslog=syslog, email=email), FAILED)
    assert time.monotonic() - t0 < 5
    assert re.search(
        rf"notify: email 127\.0\.0\.1:{port} failed for job web-nightly run 42: Connection", caplog.text
    )
    assert re.search(rf"notify: syslog {syslog} failed for job web-nightly run 42: Connection", caplog.text)
    assert PASSWORD not in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "vmrecover.notify")


def test_an_smtp_server_that_never_answers_times_out(caplog: pytest.LogCaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel takes the connection; no banner
        port = silent.getsockname()[1]
        email = {
            "smtp": f"127.0.0.1:{port}",
            "from": "a@example.com",
            "to": ["b@example.com"],
            "timeout": 0.3,
        }
        t0 = time.monotonic()
        notify.run_ended(make_config(syslog="none", email=email), FAILED)
    assert time.monotonic() - t0 < 3
    assert re.search(
        rf"notify: email 127\.0\.0\.1:{port} failed for job web-nightly run 42: .*timed out", caplog.text
    )


def test_a_run_record_it_cannot_read_is_told_as_well_as_it_can(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        c = make_config(syslog=f"udp://127.0.0.1:{s.getsockname()[1]}")
        notify.run_ended(c, {"job": "odd", "state": "failed", "stats": "{not json", "vms": 5, "started": "?"})
        assert "job odd (backup, run None) failed" in parse_syslog(s.recv(65536))["msg"]
        notify.run_ended(c, cast(Any, None))  # not even a mapping: logged, not raised
    assert "notify: cannot report a run that ended: AttributeError" in caplog.text


# --- webhook ----------------------------------------------------------------------------------------
class Hook(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, dict[str, str], Any]]
    behaviour: str  # "ok", "slow", "fail"
    release: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), json.loads(body)))
        if self.behaviour == "slow":
            self.release.wait(10)
        if self.behaviour == "fail":  # a server that echoes what it got, token included
            reply = f"no such hook {self.path} for {self.headers['Authorization']}".encode()
            self.send_response(500)
        else:
            reply = b"ok"
            self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook(certs: ServerCerts, request: pytest.FixtureRequest) -> Iterator[tuple[type[Hook], int]]:
    handler = type("H", (Hook,), {"received": [], "behaviour": request.param, "release": threading.Event()})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    srv.socket = certs.server_context().wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        yield handler, srv.server_address[1]
    finally:
        handler.release.set()
        srv.shutdown()
        srv.server_close()
        t.join(5)


def hook_config(tmp_path: Path, certs: ServerCerts, port: int, **kw: Any) -> config.Config:
    token = str(private(tmp_path / "token", TOKEN))
    hook = {"url": f"https://127.0.0.1:{port}{HOOK_PATH}?key=QueryKey12345", "ca_file": str(certs.ca_file),
            "token_file": token, "on": ["failure", "success"], **kw}  # fmt: skip
    return make_config(syslog="none", webhook=hook)


def no_secrets(text: str) -> None:
    for secret in (TOKEN, HOOK_PATH, HOOK_PATH.rsplit("/", 1)[1], "QueryKey12345"):
        assert secret not in text, secret


@pytest.mark.parametrize("webhook", ["ok"], indirect=True)
def test_a_webhook_gets_the_json_over_https(
    tmp_path: Path, certs: ServerCerts, webhook: tuple[type[Hook], int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3's debug lines name the request's path: scrubbed
    handler, port = webhook
    notify.run_ended(hook_config(tmp_path, certs, port), FAILED)
    ((path, headers, doc),) = handler.received
    assert path == f"{HOOK_PATH}?key=QueryKey12345"
    assert headers["Authorization"] == f"Bearer {TOKEN}" and headers["Content-Type"] == "application/json"
    assert doc["event"] == "vmrecover.run_ended" and doc["appliance"] == socket.gethostname()
    assert (doc["job"], doc["kind"], doc["run"], doc["state"], doc["outcome"]) == (
        "web-nightly", "backup", 42, "failed", "failure"
    )  # fmt: skip
    assert doc["duration_s"] == 185.5 and doc["error"] == FAILED["error"]
    assert [(v["name"], v["state"], v["point"], v["error"]) for v in doc["vms"]] == [
        ("web01", "succeeded", "0123456789ab", None),
        ("web02", "failed", None, "hypervisor vcenter1 unreachable: connection refused"),
    ]
    assert doc["vms"][0]["bytes_read"] == 10 << 30
    says_the_failure(doc["message"])
    assert "urllib3" in caplog.text and "***" in caplog.text  # its lines are there, without the path
    no_secrets(caplog.text)


@pytest.mark.parametrize("webhook", ["slow"], indirect=True)
def test_a_slow_webhook_times_out_and_is_logged(
    tmp_path: Path, certs: ServerCerts, webhook: tuple[type[Hook], int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    handler, port = webhook
    t0 = time.monotonic()
    notify.run_ended(hook_config(tmp_path, certs, port, timeout="0.3s"), SUCCEEDED)
    assert time.monotonic() - t0 < 3 and len(handler.received) == 1
    assert re.search(
        rf"notify: webhook https://127\.0\.0\.1:{port} failed for job web-nightly run 43: .*timed out",
        caplog.text,
    )
    no_secrets(caplog.text)


@pytest.mark.parametrize("webhook", ["fail"], indirect=True)
def test_a_failing_webhook_is_logged_without_its_secrets(
    tmp_path: Path, certs: ServerCerts, webhook: tuple[type[Hook], int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    handler, port = webhook
    notify.run_ended(hook_config(tmp_path, certs, port), FAILED)
    assert len(handler.received) == 1
    assert re.search(
        rf"notify: webhook https://127\.0\.0\.1:{port} failed .* HTTP 500: no such hook \*\*\*", caplog.text
    )
    no_secrets(caplog.text)


@pytest.mark.parametrize("webhook", ["ok"], indirect=True)
def test_a_webhook_with_an_untrusted_certificate_is_refused(
    tmp_path: Path, certs: ServerCerts, webhook: tuple[type[Hook], int], caplog: pytest.LogCaptureFixture
) -> None:
    handler, port = webhook
    other = server_certs(tmp_path / "other", ca_name="another CA")
    notify.run_ended(hook_config(tmp_path, certs, port, ca_file=str(other.ca_file)), FAILED)
    assert handler.received == [] and "CERTIFICATE_VERIFY_FAILED" in caplog.text
    no_secrets(caplog.text)


def test_notify_configuration_mistakes(tmp_path: Path) -> None:
    bad = [
        ({"syslog": "udp://logs:70000"}, "syslog destination 'udp://logs:70000' is not one of"),
        ({"syslog_on": ["failure", "failure"]}, "an outcome is listed twice"),
        ({"webhook": {"url": "http://hooks.example.com/x"}}, r"https:// \(http:// only to this machine\)"),
        ({"webhook": {"url": "https://u:p@hooks.example.com/x"}}, "holds no credentials"),
        ({"email": {"smtp": "mail:25", "from": "a@b", "to": ["c@d"], "user": "u"}}, "user and password_file"),
        ({"email": {"smtp": "mail:25", "from": "a@b", "to": []}}, "at least 1 item"),
        ({"email": {"smtp": "mail:25", "from": "a@b", "to": ["c@d\nBcc: e@f"]}}, "is not a mail address"),
    ]
    for section, error in bad:
        with pytest.raises(config.ValidationError, match=error):
            make_config(**section)
    c = make_config(syslog="udp://[::1]", email={"smtp": "[::1]:587", "from": "a@b", "to": ["c@d"]})
    assert config.parse_syslog(c.notify.syslog) == ("udp", "::1", 514)
    assert c.notify.email is not None and config.parse_smtp(c.notify.email.smtp) == ("::1", 587)


# --- hooks ------------------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # (a zombie waits for a reaper: it is gone)


def wait_gone(pid: int, within: float = 5) -> bool:
    end = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_a_hook_runs_with_its_variables_and_none_of_the_services_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMRECOVER_PASSPHRASE", "repo-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-secret")
    env = hooks.hook_env("web-nightly", ["web 01", "web02"], "post", "failed", run_id=42)
    res = hooks.run_hook(["/usr/bin/env"], timeout=10, env=env, what="post-hook")
    assert res.exit_code == 0 and not res.timed_out and res.duration < 10
    got = dict(line.split("=", 1) for line in res.output if "=" in line)
    assert got["VMRECOVER_JOB"] == "web-nightly" and got["VMRECOVER_PHASE"] == "post"
    assert got["VMRECOVER_RESULT"] == "failed" and got["VMRECOVER_RUN"] == "42"
    i = res.output.index("VMRECOVER_VM=web 01")  # one VM a line: a name may hold spaces, never a newline
    assert res.output[i + 1] == "web02"
    assert "PATH" in got and "VMRECOVER_PASSPHRASE" not in got and "AWS_SECRET_ACCESS_KEY" not in got
    assert res.to_json()["argv"] == ["/usr/bin/env"]
    pre = hooks.hook_env("web-nightly", ["web01"], "pre")
    assert pre == {"VMRECOVER_JOB": "web-nightly", "VMRECOVER_VM": "web01", "VMRECOVER_PHASE": "pre"}


def test_a_hook_that_exits_non_zero_fails_with_its_last_line() -> None:
    argv = ["/bin/sh", "-c", "echo freezing; echo 'database busy' >&2; exit 3"]
    with pytest.raises(hooks.HookFailed) as e:
        hooks.run_hook(argv, timeout=10, env={}, what="pre-hook")
    assert re.fullmatch(r"pre-hook /bin/sh exited 3 after \d+\.\d s: database busy", e.value.message)
    assert e.value.result.exit_code == 3 and e.value.result.output == ("freezing", "database busy")
    assert e.value.to_json()["details"]["hook"]["exit_code"] == 3


def test_a_hook_past_its_timeout_is_killed_with_its_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "KILL_GRACE", 0.3)
    pids = tmp_path / "pids"
    # a child that sleeps, and one that ignores SIGTERM (SIGKILL after the grace takes it)
    script = f"sleep 60 & echo $! > {pids}; (trap '' TERM; sleep 60) & echo $! >> {pids}; echo waiting; wait"
    t0 = time.monotonic()
    with pytest.raises(hooks.HookFailed) as e:
        hooks.run_hook(["/bin/sh", "-c", script], timeout=0.5, env={}, what="pre-hook")
    assert time.monotonic() - t0 < 5
    assert re.fullmatch(
        r"pre-hook /bin/sh did not finish within 0\.5 s: it and its process group were killed: waiting",
        e.value.message,
    )
    assert e.value.result.timed_out and e.value.result.exit_code == -15
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2 and all(wait_gone(p) for p in children)

    # a hook that ignores SIGTERM itself: SIGKILL after the grace
    with pytest.raises(hooks.HookFailed, match=r"did not finish within 0\.3 s.*: stubborn\n") as e:
        hooks.run_hook(["/bin/sh", "-c", "trap '' TERM; echo stubborn; sleep 60"], timeout=0.3, env={},
                       what="post-hook")  # fmt: skip
    assert e.value.result.exit_code == -9


def test_what_a_hook_leaves_running_is_killed_when_it_exits(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()  # the sleep holds the output pipe: the hook is not waited for past its exit
    res = hooks.run_hook(["/bin/sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo done"], timeout=30, env={},
                         what="post-hook")  # fmt: skip
    assert res.exit_code == 0 and res.output == ("done",) and time.monotonic() - t0 < 5
    assert wait_gone(int(pid_file.read_text()))


def test_a_hook_is_not_run_through_a_shell(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    argv = [sys.executable, "-c", "import sys; print(sys.argv[1:])", f"x; touch {mark}", "$HOME", "`id`"]
    res = hooks.run_hook(argv, timeout=10, env={}, what="pre-hook")
    assert res.output == (repr([f"x; touch {mark}", "$HOME", "`id`"]),) and not mark.exists()
    with pytest.raises(hooks.HookFailed, match=r"pre-hook /bin/true; cannot be run: No such file"):
        hooks.run_hook(["/bin/true;"], timeout=10, env={}, what="pre-hook")


def test_a_hook_killed_by_a_signal_or_missing_fails() -> None:
    with pytest.raises(hooks.HookFailed, match=r"^post-hook /bin/sh was killed by SIGKILL after \d+\.\d s$"):
        hooks.run_hook(["/bin/sh", "-c", "kill -9 $$"], timeout=10, env={}, what="post-hook")
    with pytest.raises(hooks.HookFailed, match=r"^pre-hook /nonexistent/freeze cannot be run: No such file"):
        hooks.run_hook(["/nonexistent/freeze", "db"], timeout=10, env={}, what="pre-hook")
