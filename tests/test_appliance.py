"""The appliance, end to end (the slow tier): the image this checkout builds boots under qemu (TCG) and
does a backup administrator's day from the host, through its API, its NFS export and SSH.

The image is appliance/build.sh's (built once per commit, 4-5 min, in the background from the start
of the run: the tier runs last; re-used from dist/ when its ``.source`` stamp names this clean HEAD,
or taken from $VMRECOVER_APPLIANCE_IMAGE; tests/testkit/appliance_build.py).  It boots with a
cloud-init NoCloud seed (root's SSH key, the admin token's SHA-256), a blank repository disk and user
networking: the API on a free host port, SSH on another, and host ports 111 and 2049 on the
appliance's portmapper and NFS server (qemu's nfs:// driver asks the portmapper on 111; the port111
lock is held).  Then:

1. offline, the image has no usable password, no SSH host keys and no configuration baked in;
2. power-on to an answering API (target 90 s, printed), calls without the token are refused;
3. a backup of the test guest's disk pushed through the API (sparse stream), listed as a point;
4. a recovery session started through the API, the export opened to the host, and the test guest
   booted by qemu on the host from ``nfs://127.0.0.1/vmrecover/recover/...`` (instant recovery): its
   boot marker on the console, its writes in the session, not in the backup;
5. at the same time a file of the guest restored through the API (the appliance's libguestfs, with
   KVM in the appliance: its vCPU has TCG's emulated AMD-V, boot_test.Appliance) and a second backup
   pushed: no swapping, no OOM killer, the service's memory peak (cgroup, children included) printed;
   then a folder of the same point listed, with libguestfs' appliance already up;
6. (also meanwhile) vmrecover-upgrade refuses a damaged wheel and, while a session runs, a good one,
   without changing anything;
7. vmrecover-upgrade --force installs a newer wheel (built here with a bumped version) over SSH and
   keeps the repository, configuration and token;
8. an ACPI shutdown is clean, and after a second boot the point, the session, the upgraded version,
   the token and the SSH host key are all still there.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance import boot_test
from tests.conftest import MEASURED, PORTMAP_LOCK, random_image
from tests.testkit import appliance_build, guest
from vmrecover.ingest import push

TOP = Path(__file__).resolve().parent.parent
API_BOOT_TARGET_S = 90
# The first file restore builds libguestfs' supermin appliance (about 90 s here) and starts it with
# KVM inside the appliance (about 30 s; 236-300 s in all beside the other work); TCG inside TCG took
# over 20 minutes.  The wait outlasts supermin's build (about 150 s here) plus libguestfs' own limit for
# its appliance to come up (APPLIANCE_TIMEOUT, 20 minutes), so a start that never ends fails with
# libguestfs' error and its console, not with this side's time-out.
FILE_RESTORE_WAIT_S = 1500
MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the appliance build and boot need root")


# --------------------------------------------------------------------------------------------- image


@pytest.fixture(scope="session")
def appliance_image() -> Path:
    """The appliance's qcow2 of this checkout (tests.testkit.appliance_build: built in the background
    while the other tests ran, unless dist/ has it)."""
    image, build_log = appliance_build.image()
    if build_log:
        print(f"\nappliance build:\n{build_log}", file=sys.stderr)
    return image


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class Session:
    """A booted appliance and what the host holds to talk to it."""

    box: boot_test.Appliance
    token: str
    key: Path
    ssh_port: int
    timings: dict[str, float]

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             content_type: str = "application/json", timeout: float = 600) -> tuple[int, Any]:  # fmt: skip
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        status, payload = boot_test.request(method, self.box.url + path, self.token, data=data,
                                            content_type=content_type, timeout=timeout)  # fmt: skip
        if payload[:1] in (b"{", b"["):
            return status, json.loads(payload)
        return status, payload

    def ssh(
        self, *command: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ssh", *self.ssh_options(), "-p", str(self.ssh_port), "root@127.0.0.1", *command],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
        )  # fmt: skip
        if check:
            assert proc.returncode == 0, f"ssh {' '.join(command)}: exit {proc.returncode}: {proc.stderr}"
        return proc

    def scp(self, local: Path, remote: str) -> None:
        where = f"root@127.0.0.1:{remote}"
        subprocess.run(["scp", *self.ssh_options(), "-P", str(self.ssh_port), str(local), where],
                       check=True, capture_output=True, timeout=300)  # fmt: skip

    def ssh_options(self) -> list[str]:
        known = self.key.with_name("known_hosts")
        return ["-i", str(self.key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=accept-new",
                "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR"]  # fmt: skip

    def wait_for(self, what: str, command: str, timeout: float) -> str:
        """The output of *command* (run over SSH every 5 s) once it succeeds; on time-out, an error
        with what the appliance was doing."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.ssh(command, check=False)
            if got.returncode == 0:
                return got.stdout
            if time.monotonic() > deadline:
                ps = self.ssh("ps -eo pid,etimes,pcpu,args | cut -c1-200", check=False).stdout
                log = self.ssh("journalctl -u vmrecover -n 30 --no-pager | cut -c1-300", check=False).stdout
                raise AssertionError(f"{what}: not within {timeout:.0f} s\n{ps}\n{log}")
            time.sleep(5)

    def boot(self, what: str) -> None:
        self.box.power_on()
        seconds, _ = self.box.wait_api(timeout=400)
        self.timings[what] = seconds


def _wheel(tmp: Path, version: str) -> Path:
    """A wheel of this checkout with another version (what a newer release is to the appliance)."""
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=TOP, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (TOP / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(TOP / name, src / name)
    pyproject = src / "pyproject.toml"
    text = pyproject.read_text()
    old = tomllib.loads(text)["project"]["version"]
    pyproject.write_text(text.replace(f'version = "{old}"', f'version = "{version}"', 1))
    out = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)  # fmt: skip
    [wheel] = out.glob("vmrecover-*.whl")
    return wheel


# --------------------------------------------------------------------------------------------- the day


@pytest.fixture(scope="module")
def booted(appliance_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """The appliance powered on with a seed, NFS and SSH forwarded; powered off (killed) at the end."""
    work = tmp_path_factory.mktemp("appliance")
    iso, token, _pub = boot_test.make_seed(work)
    lock = os.open(PORTMAP_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # host ports 111 and 2049 are the appliance's while it runs
    ssh_port = boot_test.free_port()
    box = boot_test.Appliance(appliance_image, work, seed=iso, forwards={111: 111, 2049: 2049, ssh_port: 22})
    s = Session(box, token, work / "key", ssh_port, {})
    try:
        s.boot("first boot: power-on to API")
        yield s
    finally:
        box.kill()
        os.close(lock)
        # the measured figures, in the run's summary whatever the capture mode
        MEASURED["appliance under TCG (seconds unless said)"] = [
            f"{k:<60} {v:8.1f}" for k, v in s.timings.items()
        ]


@needs_root
def test_the_image_has_no_password_host_keys_or_configuration(appliance_image: Path) -> None:
    try:
        boot_test.offline_image_checks(appliance_image)
    except boot_test.Failed as exc:
        pytest.fail(str(exc))
    size_mib = appliance_image.stat().st_size / 2**20
    assert size_mib <= 1024, f"the qcow2 is {size_mib:.0f} MiB (at most 1 GiB)"


@needs_root
def test_an_administrators_day_on_the_appliance(booted: Session, guest_image: Path, tmp_path: Path) -> None:
    s = booted
    # -- 2. the API answers, and only with the token
    assert s.timings["first boot: power-on to API"] <= 400
    for token in (None, "0" * 64):
        status, _ = boot_test.get(f"{s.box.url}/vms", token=token)
        assert status == 401
    status, vms = s.call("GET", "/vms")
    assert status == 200 and vms == {"vms": []}, vms
    fingerprint = s.ssh("cat", "/etc/issue").stdout
    pem = ssl.get_server_certificate(("127.0.0.1", s.box.port))
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    colons = ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert colons in fingerprint, fingerprint  # the banner's is the one served
    # the web console is served at / (its page only: every figure needs a sign-in)
    assert "Web console:  https://" in fingerprint, fingerprint
    status, page = boot_test.get(f"https://127.0.0.1:{s.box.port}/")
    assert status == 200 and b'src="/console/console.js"' in page, page[:300]
    assert boot_test.get(f"https://127.0.0.1:{s.box.port}/api/v1/dashboard")[0] == 401
    host_key = s.ssh("cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout

    # -- 3. a backup pushed through the API
    t = time.monotonic()
    body = b"".join(push.encode(str(guest_image)))
    status, doc = s.call("PUT", "/vms/g/disks/vda", raw=body, content_type=push.SPARSE)
    assert status == 201 and doc["kind"] == "full", doc
    s.timings[f"push backup (sparse, {len(body) >> 20} MiB of data)"] = time.monotonic() - t
    status, points = s.call("GET", "/vms/g/points")
    assert status == 200 and [p["id"] for p in points["points"]] == [doc["point"]], points

    # -- 4, 5 and 6 at once, with a second backup pushed: what the appliance's 4 GiB are sized for.
    # Single-file restore: the guest's init script as the backup holds it, through the API (libguestfs
    # finds no OS in the busybox guest, so its root filesystem is /sda2; its first start is the
    # slowest step, so it starts first).
    # Instant recovery: the test guest boots on the host from the appliance's NFS export.
    other = random_image(tmp_path / "other.raw", 96 * MiB, seed=14)

    def timed(what: str, fn: Any) -> Any:
        t = time.monotonic()
        try:
            return fn()
        finally:
            s.timings[what] = time.monotonic() - t

    drive = "file=nfs://127.0.0.1/vmrecover/recover/ir/vda.raw,format=raw,if=virtio"
    path = f"/vms/g/points/{doc['point']}/files/content?path=/sda2/sbin/init"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        restoring = pool.submit(timed, "first file restore (libguestfs' first start)", lambda: s.call(
            "GET", path, timeout=FILE_RESTORE_WAIT_S))  # fmt: skip
        status, sess = s.call("POST", "/sessions", {"vm": "g", "name": "ir"})
        assert status == 201, sess
        # the host, as the appliance's user networking shows it
        status, allowed = s.call("POST", "/nfs/allow", {"allow": ["10.0.2.2"]})
        assert status == 200 and "10.0.2.2/32" in allowed["allow"], allowed
        booting = pool.submit(timed, "test guest boot over nfs://", lambda: guest.boot(
            None, serial_log=tmp_path / "guest.log", timeout=600, drive_args=drive))  # fmt: skip
        pushing = pool.submit(timed, "push of a 96 MiB disk (raw)", lambda: s.call(
            "PUT", "/vms/other/disks/sda", raw=other.read_bytes(), content_type=push.RAW))  # fmt: skip
        result = booting.result()
        assert result.returncode == 0 and result.boots_seen, result.serial_tail()
        status, listed = s.call("GET", "/sessions")
        ir = next(x for x in listed if x["name"] == "ir")
        assert sum(ir["written"].values()) > 0, ir  # the guest's boot log went to the session's overlay
        pstatus, pdoc = pushing.result()
        assert pstatus == 201 and pdoc["kind"] == "full", pdoc

        # -- 7. upgrade over SSH: a damaged wheel, or one while sessions run, changes nothing
        wheel = _wheel(tmp_path, "0.1.0.post1")
        damaged = tmp_path / "vmrecover-0.1.0.post2-py3-none-any.whl"
        damaged.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
        s.scp(damaged, "/root/")
        bad = s.ssh("vmrecover-upgrade", "--json", f"/root/{damaged.name}", check=False)
        assert bad.returncode == 2 and json.loads(bad.stdout)["status"] == "refused", bad
        s.scp(wheel, "/root/")
        busy = s.ssh("vmrecover-upgrade", "--json", f"/root/{wheel.name}", check=False)
        assert busy.returncode == 3 and "session ir" in json.loads(busy.stdout)["message"], busy

        try:
            fstatus, content = restoring.result()
        except Exception as exc:  # a time-out: what the appliance was doing says why
            raise AssertionError(f"file restore: {exc!r}\n{_file_restore_state(s)}") from exc
        if not (fstatus == 200 and content == guest.INIT_SCRIPT.encode()):
            raise AssertionError(f"file restore: {fstatus} {str(content)[:4000]}\n{_file_restore_state(s)}")
    # where the first restore's time went, from the file-restore service's log
    files_log = s.ssh('cat "$VMRECOVER_REPO/run/files/files.log"', check=False).stdout
    for what, pattern in (
        ("KVM probe in the file-restore service", r"KVM probe: [^(]*\((\d+\.\d) s\)"),
        ("libguestfs appliance start (KVM inside)", r"started in (\d+\.\d) s"),
    ):
        if m := re.search(pattern, files_log):
            s.timings[what] = float(m.group(1))
    # and what its console showed meanwhile, a line a minute (how the start's time was spent)
    watched = re.findall(r"still starting after (\d+ s); its console's last line: ([^\"]{0,90})", files_log)
    MEASURED["appliance: libguestfs' start, watched"] = [f"{t:>6}  {line}" for t, line in watched]
    # a start that failed and was tried once more (GuestImage._launch): printed whole, the second start
    # being what the restore used
    retried = [line for line in files_log.splitlines() if "failed to start after" in line]
    if retried:
        MEASURED["appliance: libguestfs starts that failed, then tried again"] = retried
    # libguestfs ran with KVM (the appliance's vCPU has AMD-V), and the point's disk is still open in
    # it: a second file comes from the running appliance
    vcpus = s.ssh("ls -l /proc/$(pgrep -o -f 'qemu-system.*serial=vmra')/fd | grep -c kvm-vcpu", check=False)
    assert vcpus.stdout.strip() not in ("", "0"), (vcpus, s.ssh("pgrep -a qemu", check=False).stdout)
    status, listing = timed("list /etc of the point (libguestfs up)", lambda: s.call(
        "GET", f"/vms/g/points/{doc['point']}/files?path=/sda2/etc"))  # fmt: skip
    hostname = [e for e in listing["entries"] if e["path"] == "/sda2/etc/hostname"] if status == 200 else []
    assert hostname and hostname[0]["kind"] == "file" and hostname[0]["size"] == 16, listing

    # no swapping, no OOM killer; the service's peak memory, its children (files service, its
    # libguestfs qemu) included
    kernel = s.ssh("journalctl", "-k", "-q", "--no-pager").stdout
    assert not re.search(r"Out of memory|oom-kill|invoked oom-killer", kernel), kernel[-3000:]
    vmstat = dict(line.split() for line in s.ssh("cat", "/proc/vmstat").stdout.splitlines())
    assert vmstat["pswpout"] == "0", vmstat["pswpout"]
    peak = int(s.ssh("cat", "/sys/fs/cgroup/system.slice/vmrecover.service/memory.peak").stdout)
    s.timings["service memory peak, MiB (all at once)"] = peak / MiB
    assert peak < 3 * 1024 * MiB

    # the upgrade, with --force (the session's NFS I/O pauses for the restart)
    t = time.monotonic()
    up = s.ssh("vmrecover-upgrade", "--json", "--force", f"/root/{wheel.name}", check=False)
    s.timings["vmrecover-upgrade (pip install, restart)"] = time.monotonic() - t
    assert up.returncode == 0, up
    assert json.loads(up.stdout) | {"message": ""} == {"status": "upgraded", "from": "0.1.0",
                                                      "to": "0.1.0.post1", "message": ""}  # fmt: skip
    _check_kept(s, doc["point"], "0.1.0.post1")

    # -- 8. a clean shutdown, a second boot: everything is still there
    s.timings["ACPI power-down"] = s.box.power_down()
    log = s.box.serial.read_text(errors="replace")
    assert "reboot: Power down" in log
    s.boot("second boot: power-on to API")
    _check_kept(s, doc["point"], "0.1.0.post1")
    assert s.ssh("cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout == host_key  # not made again
    assert re.search(r"vmrecover-firstboot: done", s.box.serial.read_text(errors="replace"))
    status, listed = s.call("GET", "/sessions")
    assert status == 200 and [x["name"] for x in listed] == ["ir"], listed


def _file_restore_state(s: Session) -> str:
    """What the appliance shows of a file restore gone wrong: the service's and the file-restore
    service's logs (libguestfs' start, watched: its console's last lines, whole: a failed start's record
    holds them all), the kernel's last words (an OOM kill, a KVM error), memory, processes and load."""
    script = (
        "journalctl -q --no-pager -u vmrecover | tail -30 | cut -c1-400; echo '-- files.log';"
        ' tail -40 "$VMRECOVER_REPO/run/files/files.log" | cut -c1-40000; echo "-- kernel";'
        " journalctl -k -q --no-pager | tail -25 | cut -c1-300; echo '-- memory'; free -m;"
        ' echo "-- load: $(cat /proc/loadavg)";'
        " ps -eo pid,etimes,times,pcpu,rss,args --sort=-pcpu | head -15 | cut -c1-220"
    )
    return s.ssh(script, check=False, timeout=120).stdout


def _check_kept(s: Session, point: str, version: str) -> None:
    status, health = s.call("GET", "/health")
    assert status == 200 and health["version"] == version, health
    status, points = s.call("GET", "/vms/g/points")  # with the same token: the configuration was kept
    assert status == 200 and [p["id"] for p in points["points"]] == [point], points
    status, repo = s.call("GET", "/repository")
    assert status == 200, repo
    verify = s.ssh("vmrecover", "verify", "--json", timeout=900)
    assert json.loads(verify.stdout)["ok"], verify.stdout
