"""`vmrecover job` against a running service: the real `vmrecover serve` (a subprocess, as systemd runs
it) serves its API on the local socket REPO/run/api.sock as well, and the real CLI (subprocesses) finds
it through run/service.json and goes through it.  Without a service the CLI runs its own scheduler; a
recorded service that does not answer is a clear error, never a second scheduler beside it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3

from tests.conftest import Cli, assert_clean_error, random_image
from tests.test_service import Served
from vmrecover.errors import ExitCode
from vmrecover.service import auth
from vmrecover.service.client import ServiceClient

MiB = 1 << 20


def write_config(root: Path, cli: Cli, *, api: str, jobs: dict[str, str]) -> Path:
    """A configuration of *cli*'s repository (no NFS, no FUSE, no syslog) with *api* as its [api]
    table and a job of a 1 MiB image per name in *jobs* (the value: the job's extra TOML lines)."""
    image = random_image(root / "job.raw", 1 * MiB, seed=7)
    tables = "".join(
        f'\n[[jobs]]\nname = "{name}"\nschedule = "0 2 * * *"\nimages = ["{image}"]\nvm = "{name}"\n{extra}\n'
        for name, extra in jobs.items()
    )
    path = root / "vmrecover.toml"
    path.write_text(f'[repository]\npath = "{cli.repo}"\n\n[api]\n{api}\n\n[nfs]\nenabled = false\n\n'
                    f'[notify]\nsyslog = "none"\n{tables}')  # fmt: skip
    return path


@contextlib.contextmanager
def serving(cli: Cli, config: Path, log: Path) -> Iterator[Served]:
    """`vmrecover serve` of *config*, ready (systemd's READY=1), logging to *log*; SIGTERM at the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(log.with_name("notify.sock")))
        s = Served(cli, config, notify, "--log-file", str(log))
        try:
            yield s
        finally:
            err = s.stop()
            assert s.proc.returncode == 0, err


def run_dir(cli: Cli) -> Path:
    """The repository's run/ (a new repository has none until something runs)."""
    (cli.repo / "run").mkdir(mode=0o700, exist_ok=True)
    return cli.repo / "run"


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)
    return got


@dataclass
class Service:
    cli: Cli
    config: Path
    served: Served
    log: Path
    token: str
    gate: Path  # the job "slow" waits in its pre-hook until this file exists
    started: Path  # ... which it creates first

    @property
    def pid(self) -> int:
        return int(self.served.record["pid"])

    def runs(self, job: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.cli.json("job", "history", job, "--config", self.config)["runs"]
        return runs


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service with the API on a free TCP port (an admin token "ops") and two jobs: "fast", and
    "slow", whose pre-hook waits for a file."""
    root = tmp_path_factory.mktemp("svc")
    cli = Cli(root / "repo")
    cli.run("init", "--chunk-size", "64K")
    token, gate, started = auth.new_token(), root / "go", root / "hook-started"
    hook = ["/bin/sh", "-c", f"touch {started}; while [ ! -e {gate} ]; do sleep 0.05; done"]
    api = (f'listen = ["127.0.0.1:0"]\n[[api.tokens]]\nname = "ops"\nrole = "admin"\n'
           f'sha256 = "{auth.digest(token)}"')  # fmt: skip
    config = write_config(root, cli, api=api, jobs={"fast": "", "slow": f"pre_hook = {json.dumps(hook)}"})
    try:
        with serving(cli, config, root / "service.log") as served:
            yield Service(cli, config, served, root / "service.log", token, gate, started)
    finally:
        gate.touch()  # a run still waiting ends


# ---------------------------------------------------------------------------------------- via the service
def test_job_commands_go_through_the_running_service(service: Service) -> None:
    """list, run and history answer from the service's scheduler: the run is the service's (its pid),
    and the service's audit log names the built-in admin "local"."""
    cli, config = service.cli, service.config
    jobs = cli.json("job", "list", "--config", config)["jobs"]
    assert [(j["name"], j["state"]) for j in jobs] == [("fast", "idle"), ("slow", "idle")]
    done = cli.json("job", "run", "fast", "--config", config)
    assert done["state"] == "succeeded", done
    assert (done["trigger"], done["pid"]) == ("manual", service.pid)  # not a scheduler of the CLI
    assert [r["id"] for r in service.runs("fast")] == [done["id"]]
    everything = cli.json("job", "history", "--config", config)
    assert done["id"] in [r["id"] for r in everything["runs"]]
    (fast,) = [j for j in cli.json("job", "list", "--config", config)["jobs"] if j["name"] == "fast"]
    assert fast["last_run"]["id"] == done["id"]
    text = cli.run("job", "run", "fast", "--config", config).stdout  # the human output, once more
    assert "fast: fast@" in text and "of job fast: succeeded" in text
    audit = [line for line in service.log.read_text().splitlines() if "vmrecover.api.audit" in line]
    assert any('token="local" role=admin client=local method=POST path="/api/v1/jobs/fast/run" '
               "status=202" in line for line in audit), audit  # fmt: skip


def test_unknown_jobs_are_the_same_errors_as_without_a_service(service: Service) -> None:
    res = service.cli.run("job", "run", "nosuch", "--config", service.config, check=False)
    assert_clean_error(
        res, ExitCode.NOT_FOUND, rf"no job named 'nosuch' in {service.config}", "jobs: fast, slow"
    )
    # history of a job not (or no longer) configured: its runs, none here, as without a service
    assert service.cli.json("job", "history", "nosuch", "--config", service.config)["runs"] == []


def test_interrupting_job_run_stops_following_only(service: Service) -> None:
    """^C on `job run` while the service runs the job: the command ends as interrupted and says where
    to look; the run goes on in the service and ends there."""
    proc = service.cli.popen("job", "run", "slow", "--config", service.config)
    try:
        wait_for(service.started.exists, "pre-hook start")
        (running,) = service.runs("slow")
        assert running["state"] == "running" and running["pid"] == service.pid
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == ExitCode.INTERRUPTED, err
    said = " ".join(err.split())
    assert f"stopped following run {running['id']} of job slow" in said, err
    assert (
        "goes on in the service" in said and "vmrecover job history slow" in said and "Traceback" not in err
    )
    assert service.runs("slow")[0]["state"] == "running"
    service.gate.touch()
    (ended,) = wait_for(lambda: [r for r in service.runs("slow") if r["ended"]], "end of the run")
    assert ended["id"] == running["id"] and ended["state"] == "succeeded", ended


def test_the_socket_is_private_and_tcp_still_needs_a_token(service: Service) -> None:
    """The socket is 0600 in the 0700 run/; over TCP, no header makes a request local: without a
    valid token it is a 401 whatever it claims."""
    run = service.cli.repo / "run"
    sock = Path(service.served.record["api_socket"])
    assert sock == run / "api.sock" and stat.S_ISSOCK(sock.lstat().st_mode)
    assert stat.S_IMODE(sock.lstat().st_mode) == 0o600 and stat.S_IMODE(run.stat().st_mode) == 0o700
    assert [j["name"] for j in ServiceClient(sock).jobs()] == ["fast", "slow"]  # no token over the socket
    (host, port), *_ = service.served.record["api"]
    forged = [
        {auth.LOCAL_SCOPE_KEY: "true"},
        {"X-Vmrecover-Local": "1"},
        {"Vmrecover-Local": "True", "X-Forwarded-For": "unix:"},
        {"Authorization": "Local"},
        {"Authorization": "Bearer local"},
    ]
    ca = str(service.config.parent / "tls" / "cert.pem")
    with urllib3.HTTPSConnectionPool(
        host, port, ca_certs=ca, cert_reqs="CERT_REQUIRED", retries=False, timeout=10
    ) as pool:
        for headers in forged:
            r = pool.request("GET", "/api/v1/jobs", headers=headers)
            assert r.status == 401 and r.json()["error"] == "AuthError", (headers, r.status, r.data)
        r = pool.request("GET", "/api/v1/jobs", headers={"Authorization": f"Bearer {service.token}"})
        assert r.status == 200 and [j["name"] for j in r.json()] == ["fast", "slow"]


# ---------------------------------------------------------------------------------------- without one
def test_the_socket_serves_with_the_api_disabled_and_goes_with_the_service(cli: Cli, tmp_path: Path) -> None:
    """api.enabled = false: no TCP listener, but the socket serves the CLI; a stale socket (of a killed
    service) is replaced at start; the socket and the record go at the end."""
    config = write_config(tmp_path, cli, api="enabled = false", jobs={"fast": ""})
    sock = run_dir(cli) / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))  # never listened: what a killed service leaves
    with serving(cli, config, tmp_path / "service.log") as served:
        assert served.record["api"] == [] and served.record["api_socket"] == str(sock)
        assert stat.S_IMODE(sock.lstat().st_mode) == 0o600
        done = cli.json("job", "run", "fast", "--config", config)
        assert done["state"] == "succeeded" and done["pid"] == served.proc.pid
    assert not sock.exists() and not (cli.repo / "run" / "service.json").exists()
    assert 'token="local"' in (tmp_path / "service.log").read_text()


def test_without_a_service_the_commands_run_their_own_scheduler(cli: Cli, tmp_path: Path) -> None:
    """No record, or the record of a service that is gone: `job run` runs the job in the CLI."""
    config = write_config(tmp_path, cli, api="enabled = false", jobs={"fast": ""})
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid no longer lives
    for record in [None, {"pid": dead.pid, "api_socket": str(cli.repo / "run" / "api.sock")}]:
        if record is not None:
            (run_dir(cli) / "service.json").write_text(json.dumps(record))
        done = cli.json("job", "run", "fast", "--config", config)
        assert done["state"] == "succeeded" and done["trigger"] == "manual", done
        assert done["pid"] not in (os.getpid(), dead.pid)  # the CLI's own
    assert len(cli.json("job", "history", "fast", "--config", config)["runs"]) == 2


def test_a_recorded_service_that_does_not_answer_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    """A live pid in run/service.json whose socket refuses (or is missing): every job command fails
    naming the socket and the fix, and nothing runs beside it."""
    config = write_config(tmp_path, cli, api="enabled = false", jobs={"fast": ""})
    sock, record = run_dir(cli) / "api.sock", run_dir(cli) / "service.json"
    record.write_text(json.dumps({"pid": os.getpid(), "api_socket": str(sock)}))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as deaf:
        deaf.bind(str(sock))  # bound, never listening: connections are refused
        for args in [("job", "list"), ("job", "run", "fast"), ("job", "history")]:
            res = cli.run(*args, "--config", config, check=False)
            assert_clean_error(res, ExitCode.UNREACHABLE, f"does not answer on {sock}", "systemctl restart",
                               f"remove {record}")  # fmt: skip
    sock.unlink()
    res = cli.run("job", "run", "fast", "--config", config, check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, f"does not answer on {sock}")
    record.unlink()
    assert cli.json("job", "history", "--config", config)["runs"] == []  # nothing ran
