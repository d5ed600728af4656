"""`vmrecover serve`: one process serving the FUSE datastore and the NFS export over one model, with
systemd's notify protocol, SIGHUP reloads (a bad file keeps the running configuration) and a clean
SIGTERM.  Real parts: kernel FUSE, libnfs' tools, a real unix datagram socket as systemd's."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, assert_clean_error, needs_fuse, random_image, sha256_file
from vmrecover.errors import ExitCode

MiB = 1 << 20


def _config(tmp_path: Path, cli: Cli, **extra: str) -> Path:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    text = f"""
[repository]
path = "{cli.repo}"
cache_size = "64M"

[api]
enabled = false

[nfs]
listen = "127.0.0.1"
port = 0
portmapper = false
allow = ["127.0.0.1/32"]

[fuse]
mountpoint = "{mnt}"
{extra.get("tail", "")}
"""
    path = tmp_path / "vmrecover.toml"
    path.write_text(text)
    return path


class Served:
    def __init__(self, cli: Cli, config: Path, notify: socket.socket, *extra: str) -> None:
        self.cli, self.notify = cli, notify
        env = {**cli.env, "NOTIFY_SOCKET": notify.getsockname()}
        self.proc = subprocess.Popen(
            [*_python(), "-m", "vmrecover", "serve", "--config", str(config), "--log-level", "info", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.said(timeout=60) == "READY=1", self.stop()
        self.record = json.loads((cli.repo / "run" / "service.json").read_text())

    def said(self, timeout: float = 30) -> str:
        self.notify.settimeout(timeout)
        try:
            return self.notify.recv(4096).decode()
        except TimeoutError:
            return f"(nothing within {timeout} s; exit {self.proc.poll()})"

    def nfs_url(self, path: str) -> str:
        n = self.record["nfs"]
        return (
            f"nfs://127.0.0.1/vmrecover/{path}?version=3&nfsport={n['nfs_port']}&mountport={n['mount_port']}"
        )

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def _python() -> list[str]:
    import sys

    return [sys.executable]


def _nfs(tool: str, url: str) -> bytes:
    return subprocess.run([tool, url], check=True, capture_output=True, timeout=60).stdout


@needs_fuse
def test_one_process_serves_fuse_and_nfs_reloads_and_stops_cleanly(
    cli: Cli, tmp_path: Path, notify: socket.socket
) -> None:
    image = random_image(tmp_path / "disk.img", 4 * MiB, seed=3)
    point = cli.json("backup", "--vm", "vm1", image, "--format", "raw")["point"]
    config = _config(tmp_path, cli)
    s = Served(cli, config, notify)
    try:
        mnt = Path(s.record["fuse"])
        assert s.record["pid"] == s.proc.pid and s.record["repository"] == str(cli.repo)
        assert sha256_file(mnt / "vms" / "vm1" / point / "disk.raw") == sha256_file(image)
        assert _nfs("nfs-cat", s.nfs_url(f"vms/vm1/{point}/disk.raw")) == image.read_bytes()

        # a session started by the CLI is the same object on both: a write over NFS reads back via FUSE
        cli.run("recover", "start", "vm1", "--name", "s1")
        src = tmp_path / "note.txt"
        src.write_bytes(b"written over NFS")
        subprocess.run(
            ["nfs-cp", str(src), s.nfs_url("recover/s1/note.txt")], check=True, capture_output=True
        )
        assert (mnt / "recover" / "s1" / "note.txt").read_bytes() == b"written over NFS"

        # SIGHUP: a bad file is refused and the running configuration stays; a good one is taken
        good = config.read_text()
        config.write_text(good + "\n[scheduler]\nmax_streams = 0\n")
        s.proc.send_signal(signal.SIGHUP)
        assert s.said() == "RELOADING=1" and s.said() == "READY=1"
        config.write_text(good.replace('cache_size = "64M"', 'cache_size = "128M"'))
        s.proc.send_signal(signal.SIGHUP)
        assert s.said() == "RELOADING=1" and s.said() == "READY=1"
        assert sha256_file(mnt / "vms" / "vm1" / point / "disk.raw") == sha256_file(image)  # still serving
    finally:
        err = s.stop()
    assert s.proc.returncode == 0, err
    assert "reload refused, the running configuration stays" in err and "scheduler.max_streams" in err
    assert "repository changed; that takes effect at the next restart" in err
    assert "configuration" in err and "reloaded" in err
    assert not os.path.ismount(tmp_path / "mnt")  # unmounted on SIGTERM
    assert not (cli.repo / "run" / "service.json").exists()
    assert s.said(timeout=1) == "STOPPING=1"


def test_check_config_says_good_or_names_the_line(cli: Cli, tmp_path: Path) -> None:
    config = _config(tmp_path, cli)
    doc = cli.json("serve", "--config", config, "--check-config")
    assert doc == {"config": str(config), "ok": True, "jobs": []}
    config.write_text(config.read_text().replace("portmapper = false", "portmaper = false"))
    res = cli.run("serve", "--config", config, "--check-config", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, rf"{config}:\d+: nfs\.portmaper: unknown key")


def test_a_missing_repository_or_passphrase_file_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    config = _config(tmp_path, cli)
    config.write_text(config.read_text().replace(str(cli.repo), str(tmp_path / "nowhere")))
    res = cli.run("serve", "--config", config, check=False)
    assert_clean_error(res, ExitCode.NOT_FOUND, "no repository at", "vmrecover init")


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    """systemd-analyze checks the unit the appliance installs (with the binary where it is here)."""
    import shutil
    import sys

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd)")
    unit = (Path(__file__).parents[1] / "appliance" / "systemd" / "vmrecover.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    here = tmp_path / "vmrecover.service"
    here.write_text(
        unit.replace("/usr/local/bin/vmrecover", str(Path(sys.executable).with_name("vmrecover")))
    )
    res = subprocess.run(["systemd-analyze", "verify", str(here)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_a_log_file_moved_away_by_logrotate_is_reopened(
    cli: Cli, tmp_path: Path, notify: socket.socket
) -> None:
    config = _config(tmp_path, cli)
    config.write_text(config.read_text().replace('mountpoint = "', '# mountpoint = "'))
    log = tmp_path / "service.log"
    s = Served(cli, config, notify, "--log-file", str(log))
    try:
        assert "service ready" in log.read_text()
        log.rename(tmp_path / "service.log.1")  # what logrotate does
        s.proc.send_signal(signal.SIGHUP)
        assert s.said() == "RELOADING=1" and s.said() == "READY=1"
    finally:
        s.stop()
    assert "reloaded" in log.read_text() and "reloaded" not in (tmp_path / "service.log.1").read_text()


@needs_fuse
def test_the_api_runs_in_the_same_process_over_the_same_model(
    cli: Cli, tmp_path: Path, notify: socket.socket
) -> None:
    """With [api] on, the service answers HTTPS with its generated certificate; a session started
    through the API is at once a folder of the FUSE mount of the same process."""
    import hashlib
    import secrets

    import urllib3

    image = random_image(tmp_path / "disk.img", 2 * MiB, seed=4)
    cli.json("backup", "--vm", "vm1", image, "--format", "raw")
    token = secrets.token_hex(16)
    config = _config(tmp_path, cli)
    config.write_text(
        config.read_text().replace(
            "[api]\nenabled = false",
            f'[api]\nlisten = ["127.0.0.1:0"]\n[[api.tokens]]\nname = "ops"\nrole = "admin"\n'
            f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"',
        )
    )
    s = Served(cli, config, notify)
    try:
        (host, port), *_ = s.record["api"]
        pool = urllib3.HTTPSConnectionPool(
            host, port, ca_certs=str(tmp_path / "tls" / "cert.pem"), cert_reqs="CERT_REQUIRED", retries=False
        )
        with pool:
            assert pool.request("GET", "/api/v1/health").json()["status"] == "ok"
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            r = pool.request(
                "POST", "/api/v1/sessions", body=json.dumps({"vm": "vm1", "name": "api-s"}), headers=auth
            )
            assert r.status == 201, r.data
            mnt = Path(s.record["fuse"])
            assert sha256_file(mnt / "recover" / "api-s" / "disk.raw") == sha256_file(image)
            assert [x["name"] for x in cli.json("recover", "list")] == ["api-s"]
            # the export of the same process answers, and /metrics counts its calls by procedure
            assert _nfs("nfs-cat", s.nfs_url("recover/api-s/disk.raw")) == image.read_bytes()
            text = pool.request("GET", "/metrics", headers=auth).data.decode()
            reads = re.search(r'^vmrecover_nfs_call_seconds_count\{procedure="READ"\} (\S+)$', text, re.M)
            assert reads is not None and float(reads.group(1)) >= 2, text  # 2 MiB in reads of 1 MiB at most
            assert 'vmrecover_nfs_call_seconds_count{procedure="mount3:MNT"}' in text
    finally:
        err = s.stop()
    assert s.proc.returncode == 0, err
    assert 'token="ops"' in err and "POST" in err  # the mutation is audited with the token's name


class ServedApi(Served):
    """`vmrecover serve` of *cli*'s repository with its API on a free port and an admin token;
    ``call(method, path, body)`` -> (status, JSON) over verified TLS.  *nfs*: the [nfs] table's lines
    (default: no NFS); *tail*: more of the configuration (a [fuse] table)."""

    def __init__(
        self, cli: Cli, tmp_path: Path, notify: socket.socket, nfs: str = "enabled = false", tail: str = ""
    ) -> None:
        import urllib3

        from vmrecover.service import auth, tls

        token = auth.new_token()
        cfg = tmp_path / "etc" / "vmrecover.toml"
        cfg.parent.mkdir(exist_ok=True)
        cfg.write_text(
            f'[repository]\npath = "{cli.repo}"\ncache_size = "64M"\n\n[api]\nlisten = ["127.0.0.1:0"]\n'
            f'tokens = [{{ name = "ops", role = "admin", sha256 = "{auth.digest(token)}" }}]\n\n'
            f"[nfs]\n{nfs}\n{tail}"
        )
        super().__init__(cli, cfg, notify)
        [(_, port)] = self.record["api"]
        self.pool = urllib3.HTTPSConnectionPool(
            "127.0.0.1", port, ca_certs=str(tls.default_paths(cfg)[0]), cert_reqs="CERT_REQUIRED",
            retries=False, timeout=300,
        )  # fmt: skip
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        raw = None if body is None else json.dumps(body).encode()
        r = self.pool.urlopen(method, path, body=raw, headers=self.headers)
        return r.status, json.loads(r.data)

    def stop(self) -> str:
        self.pool.close()
        return super().stop()


@needs_fuse
def test_a_session_runs_under_qemu_on_the_appliance_and_stops_with_it(
    cli: Cli, tmp_path: Path, notify: socket.socket, guest_image: Path
) -> None:
    """POST /sessions with run "qemu": the test guest boots on the appliance from the service's own NFS
    export (its write lands in the session, not the backup), its console is served, and stopping the
    session stops qemu; a qemu still running when the service stops is stopped with it."""
    import time

    cli.json("backup", "--vm", "g", guest_image, "--format", "raw")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    s = ServedApi(cli, tmp_path, notify, tail=f'[fuse]\nmountpoint = "{mnt}"\n')
    try:
        for bad in ({"vm": "g", "run": "qemu", "memory": "1T"}, {"vm": "g", "run": "qemu", "to": "xen://p"}):
            status, doc = s.call("POST", "/api/v1/sessions", bad)
            assert status == 422, doc
        status, doc = s.call(
            "POST", "/api/v1/sessions", {"vm": "g", "name": "q1", "run": "qemu", "memory": "512M"}
        )
        assert status == 201 and doc["published"]["platform"] == "qemu", doc
        pid = doc["published"]["pid"]
        # its screen, now (QMP screendump): the firmware's first lines
        shot = s.pool.urlopen("GET", "/api/v1/sessions/q1/screenshot", headers=s.headers)
        assert shot.status == 200 and shot.headers["content-type"] == "image/png", shot.data[:200]
        assert shot.data[:8] == b"\x89PNG\r\n\x1a\n" and len(shot.data) > 1000
        status, err = s.call("GET", "/api/v1/sessions/nope/screenshot")
        assert status == 404, err
        deadline = time.monotonic() + 240
        text = ""
        while "VMRECOVER-GUEST-BOOT n=1" not in text and time.monotonic() < deadline:
            time.sleep(1)
            text = s.pool.urlopen("GET", "/api/v1/sessions/q1/console", headers=s.headers).data.decode()
        assert "VMRECOVER-GUEST-BOOT n=1" in text, text[-2000:]
        written = next(x for x in cli.json("recover", "list") if x["name"] == "q1")["written"]
        assert sum(written.values()) > 0  # the guest's boot log went to the session's overlay
        status, doc = s.call("DELETE", "/api/v1/sessions/q1")
        assert status == 200 and doc["stopped"], doc
        assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert not list((cli.repo / "run" / "qmp").iterdir())  # its QMP socket went with it
        status, doc = s.call(
            "POST", "/api/v1/sessions", {"vm": "g", "name": "q2", "run": "qemu", "memory": "512M"}
        )
        assert status == 201, doc
        pid = doc["published"]["pid"]
    finally:
        err = s.stop()
    assert s.proc.returncode == 0, err
    assert "session q2: its qemu" in err  # stopped with the service (its disks went with the export)
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert cli.json("verify")["ok"]  # and the backup is as it was


@needs_fuse
def test_a_boot_health_check_proves_a_point_boots_and_keeps_its_evidence(
    cli: Cli, tmp_path: Path, notify: socket.socket, guest_image: Path
) -> None:
    """verify --boot: the test guest's point boots in a throw-away session under qemu (no network), its
    serial console and a screenshot are kept with the verdict in the catalog, and the session is gone
    after; a guest that powers off without a login prompt, and a disk with nothing to boot, fail with
    exit 12 and say why.  The same through the API (a check asked for, the list, the screenshot and
    serial console of one) and as a scheduled job kind; `list` shows each point's latest check; prune
    takes a point's checks with it."""
    import struct
    import time
    import zlib

    from vmrecover.recovery import qemu_run
    from vmrecover.repo.repository import Repository

    cli.json("backup", "--vm", "g", guest_image, "--format", "raw")
    cli.json("backup", "--vm", "nb", random_image(tmp_path / "nb.raw", 4 * MiB, seed=81), "--format", "raw")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    job = ('[[jobs]]\nname = "bc"\nkind = "boot-check"\nschedule = "0 7 * * 6"\nvms = ["g"]\n'
           'expect = "VMRECOVER-GUEST-BOOT n=1"\n'
           '[[jobs]]\nname = "bc-never"\nkind = "boot-check"\nschedule = "0 7 * * 6"\nvms = ["g"]\n'
           'expect = "NEVER-SHOWN"\nboot_timeout = "10m"\n')  # fmt: skip
    s = ServedApi(cli, tmp_path, notify, tail=f'[fuse]\nmountpoint = "{mnt}"\n\n{job}')
    try:
        shot = tmp_path / "g.png"
        doc = cli.json("verify", "--boot", "g", "--expect", r"VMRECOVER-GUEST-BOOT n=1\b", "--timeout", "300",
                       "--screenshot", shot)  # fmt: skip
        assert doc["ok"] and doc["verdict"] == "expect" and doc["vm"] == "g", doc
        assert doc["accel"] in ("kvm", "tcg") and 0 < doc["seconds"] < 300 and doc["screenshot_bytes"] > 0
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) == doc["screenshot_bytes"]
        width, height = struct.unpack(">II", png[16:24])
        idat = png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8]
        rows = zlib.decompress(idat)
        assert width >= 320 and height >= 200 and len(rows) == height * (1 + 3 * width)
        assert len(set(rows[1 : 1 + 3 * width * 8])) > 1  # the firmware's text: not one colour

        # The same point again, now waiting for a login prompt: the test guest has none (it powers off),
        # and it counts boot 1 again: the first check's write went with its session.
        res = cli.run("verify", "--boot", "g", "--json", check=False)
        assert res.returncode == ExitCode.BOOT_FAILED, res.stderr
        stopped = json.loads(res.stdout)
        assert not stopped["ok"] and stopped["verdict"] == "stopped" and "powered" in stopped["detail"], (
            stopped
        )

        # nothing to boot (asked through the API): the firmware gives up and resets, which ends it at once
        status, reset = s.call("POST", "/api/v1/vms/nb/points/latest/boot-checks", {"timeout": 120})
        assert status == 201 and not reset["ok"], reset
        assert reset["verdict"] == "reset" and "nothing to boot" in reset["detail"], reset
        assert reset["seconds"] < 120, reset
        status, err = s.call("POST", "/api/v1/vms/nb/points/latest/boot-checks", {"timeout": 1})
        assert status == 422 and "timeout" in err["message"], err

        # the scheduled kind, run now: the job's VMs' latest points
        status, doc = s.call("POST", "/api/v1/jobs/bc/run")
        assert status == 202, doc
        run = doc["run"]
        deadline = time.monotonic() + 300
        while (r := s.call("GET", f"/api/v1/runs/{run}")[1])["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, r
            time.sleep(1)
        assert r["state"] == "succeeded", r
        [by_job] = r["stats"]["boot_checks"]
        assert by_job["vm"] == "g" and by_job["ok"] and by_job["verdict"] == "expect", by_job

        status, listed = s.call("GET", "/api/v1/vms/g/points/latest/boot-checks")
        assert status == 200 and [c["verdict"] for c in listed["checks"]] == ["expect", "stopped", "expect"]
        first = listed["checks"][-1]["id"]
        r2 = s.pool.urlopen("GET", f"/api/v1/vms/g/points/latest/boot-checks/{first}/screenshot",
                            headers=s.headers)  # fmt: skip
        assert r2.status == 200 and r2.headers["content-type"] == "image/png" and r2.data == png
        r2 = s.pool.urlopen(
            "GET", f"/api/v1/vms/g/points/latest/boot-checks/{first}/serial", headers=s.headers
        )
        assert r2.status == 200 and b"VMRECOVER-GUEST-BOOT n=1" in r2.data
        status, err = s.call("GET", "/api/v1/vms/g/points/latest/boot-checks/999/screenshot")
        assert status == 404 and "no boot check 999" in err["message"], err
        assert cli.json("list", "g")["points"][0]["boot_check"]["verdict"] == "expect"
        res = cli.run("verify", "--boot", "nb", "--expect", "(unclosed", check=False)
        assert_clean_error(res, ExitCode.BAD_INPUT, "not a regular expression")
        assert cli.json("recover", "list") == []  # every check's session is gone

        # a check that would wait 10 minutes is abandoned at once when the service stops
        status, doc = s.call("POST", "/api/v1/jobs/bc-never/run")
        assert status == 202, doc
        deadline = time.monotonic() + 120
        while not [x for x in cli.json("recover", "list") if x["name"].startswith("boot-check-")]:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        looking = Repository.open(cli.repo)
        try:
            [(_, qemu)] = qemu_run.running(looking)
        finally:
            looking.close()
        stopping = time.monotonic()
    finally:
        err = s.stop()
    assert s.proc.returncode == 0, err
    assert time.monotonic() - stopping < 60, err[-2000:]
    assert not qemu_run._ours(qemu) and cli.json("recover", "list") == []
    # without the service there is nothing to boot from: an error that says so, and no verdict kept
    res = cli.run("verify", "--boot", "g", check=False)
    assert_clean_error(res, ExitCode.INTERNAL, "needs the service's FUSE mount")
    assert cli.json("recover", "list") == []

    repo = Repository.open(cli.repo)
    try:
        [never] = repo.catalog.job_runs("bc-never")
        assert never.state == "interrupted", never  # (and resumed at the next start, as any run)
        checks = repo.catalog.boot_checks(screenshots=True)
        assert [c.verdict for c in checks] == ["expect", "reset", "stopped", "expect"]
        assert "VMRECOVER-GUEST-BOOT n=1" in checks[2].serial and "n=2" not in checks[2].serial
        assert checks[3].screenshot == png and checks[2].point == cli.json("list", "g")["points"][0]["id"]
    finally:
        repo.close()
    cli.json("backup", "--vm", "nb", tmp_path / "nb.raw", "--format", "raw")
    cli.json("prune", "--keep-last", "1", "--vm", "nb")  # the checked point goes, and its check with it
    repo = Repository.open(cli.repo)
    try:
        assert [c.verdict for c in repo.catalog.boot_checks()] == ["expect", "stopped", "expect"]
    finally:
        repo.close()
    assert cli.json("verify")["ok"]  # the backups are as they were
