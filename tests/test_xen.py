"""XenServer / XCP-ng backups against the XAPI simulator (tests/xapi: XenAPI's real XML-RPC over HTTPS,
real TLS NBD servers, CBT bitmaps from the bytes a test writes).  The product runs unchanged, with the
unmodified XenAPI client and libnbd."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, assert_clean_error, sha256_file
from tests.testkit.vmdisks import disk_image, restored_sha
from vmrecover.errors import ExitCode
from vmrecover.repo.repository import Repository

MiB = 1 << 20
POOL = "pool1"


@pytest.fixture
def xc(cli: Cli, xapi: Any) -> Iterator[Cli]:
    """The `cli` repository (64 KiB chunks, as CBT's blocks) with the simulator added as pool1 (TLS
    verified against the test CA; the password through stdin)."""
    cli.run("hypervisor", "add", POOL, f"xen://root@127.0.0.1:{xapi.port}", "--ca-file", xapi.ca_file,
            "--password-stdin", input=xapi.password + "\n")  # fmt: skip
    yield cli


class Since:
    """What the simulator logged from now on (its log spans the whole run, other tests included)."""

    def __init__(self, xapi: Any) -> None:
        self.xapi, self.start = xapi, len(xapi.log)

    def calls(self, method: str, **match: Any) -> list[dict[str, Any]]:
        new = self.xapi.log[self.start :]
        return [e for e in new if e.get("method") == method and all(e.get(k) == v for k, v in match.items())]


def snapshots_of(xapi: Any, vm: str) -> list[str]:
    return sorted(xapi.record("VM", s)["name_label"] for s in xapi.record("VM", vm)["snapshots"])


def test_full_then_incremental_backup_over_nbd(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "a.raw", 8 * MiB, seed=1)
    vm = xapi.make_vm("xweb", [img, 4 * MiB])
    doc = xc.json("backup", f"xen://{POOL}/xweb")
    assert doc["kind"] == "full" and doc["transport"] == "NBD"
    assert [d["name"] for d in doc["disks"]] == ["xvda", "xvdb"]
    assert {d["read_whole"] for d in doc["disks"]} == {"changed block tracking was just enabled"}
    vdis = xapi.vm_disks(vm)
    assert restored_sha(xc, "xweb", "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdis[0]))
    assert restored_sha(xc, "xweb", "xvdb", tmp_path) == sha256_file(xapi.vdi_file(vdis[1]))
    (first,) = xc.json("list", "xweb")["points"]
    assert snapshots_of(xapi, vm) == [f"vmrecover-base-{first['id']}"]  # kept as the next CBT base
    assert first["config"]["record"]["vifs"][0]["network"].startswith("Pool-wide network")
    with open(xapi.vdi_file(vdis[0]), "r+b") as f:  # the guest writes into three 64 KiB blocks
        for off in (0, 3 * MiB + 12345, 7 * MiB):
            f.seek(off)
            f.write(b"X" * 4096)
    doc = xc.json("backup", f"xen://{POOL}/xweb")
    assert doc["kind"] == "incremental" and all(d["read_whole"] is None for d in doc["disks"]), doc
    assert doc["bytes_read"] == 3 * 64 * 1024
    assert restored_sha(xc, "xweb", "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdis[0]))
    points = xc.json("list", "xweb")["points"]
    assert snapshots_of(xapi, vm) == [f"vmrecover-base-{points[-1]['id']}"]
    # the previous base keeps only its CBT metadata
    old = [d["change_token"] for d in points[0]["disks"]]
    with xapi.session() as s:
        assert {s.xenapi.VDI.get_type(s.xenapi.VDI.get_by_uuid(u)) for u in old} == {"cbt_metadata"}


def test_a_broken_chain_reads_the_disk_whole_and_says_why(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "b.raw", 4 * MiB, seed=2)
    vm = xapi.make_vm("xchain", [img], cbt=True, power_state="Halted")  # halted: its disk can be resized
    xc.json("backup", f"xen://{POOL}/xchain")
    (vdi,) = xapi.vm_disks(vm)
    xapi.disable_cbt_behind_back(vdi)
    doc = xc.json("backup", f"xen://{POOL}/xchain")
    assert doc["disks"][0]["read_whole"] == "changed block tracking was just enabled"  # found off: on again
    assert restored_sha(xc, "xchain", "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdi))
    base = xc.json("list", "xchain")["points"][-1]["disks"][0]["change_token"]
    with xapi.session() as s:  # someone deletes our base snapshot's disk
        s.xenapi.VDI.destroy(s.xenapi.VDI.get_by_uuid(base))
    doc = xc.json("backup", f"xen://{POOL}/xchain")
    assert "cannot be listed (UUID_INVALID" in doc["disks"][0]["read_whole"], doc["disks"][0]
    with xapi.session() as s:
        s.xenapi.VDI.resize(vdi, str(6 * MiB))
    doc = xc.json("backup", f"xen://{POOL}/xchain")
    assert doc["disks"][0]["read_whole"] == "the disk's size changed"
    assert restored_sha(xc, "xchain", "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdi))
    doc = xc.json("backup", f"xen://{POOL}/xchain", "--full")
    assert doc["disks"][0]["read_whole"] == "--full"


def test_modes_quiesced_offline_memory(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """Must survive: the VM's state.  A quiesced snapshot the guest cannot do is refused (no snapshot
    left); an offline backup starts the VM again; a checkpoint adds the memory image."""
    vm = xapi.make_vm("xmodes", [disk_image(tmp_path / "m.raw", 2 * MiB, seed=3)])
    res = xc.run("backup", f"xen://{POOL}/xmodes", "--mode", "quiesced", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", "--mode normal")
    assert snapshots_of(xapi, vm) == []
    since = Since(xapi)
    doc = xc.json("backup", f"xen://{POOL}/xmodes", "--mode", "offline")
    assert xapi.record("VM", vm)["power_state"] == "Running"
    assert since.calls("VM.clean_shutdown", ok=True) and since.calls("VM.start", ok=True)
    assert doc["kind"] == "full"  # the first point of the VM
    doc = xc.json("backup", f"xen://{POOL}/xmodes", "--mode", "memory")
    assert [d["name"] for d in doc["disks"]] == ["xvda", "memory"]
    assert xc.json("list", "xmodes")["points"][-1]["config"]["mode"] == "memory"


def test_http_export_when_no_network_serves_nbd(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "h.raw", 4 * MiB, seed=4)
    vm = xapi.make_vm("xhttp", [img])
    net = xapi.network("Pool-wide network associated with eth1")
    with xapi.session() as s:
        s.xenapi.network.remove_purpose(net, "nbd")
    since = Since(xapi)
    try:
        doc = xc.json("backup", f"xen://{POOL}/xhttp")
    finally:
        with xapi.session() as s:
            s.xenapi.network.add_purpose(net, "nbd")
    assert doc["transport"] == "HTTP" and since.calls("GET /export_raw_vdi")
    (point,) = xc.json("list", "xhttp")["points"]
    assert point["config"]["transport"] == {"xvda": "http"}
    assert restored_sha(xc, "xhttp", "xvda", tmp_path) == sha256_file(xapi.vdi_file(xapi.vm_disks(vm)[0]))


def test_nbd_drops_are_retried_then_fail_cleanly(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """Must survive: the previous point and base.  A dropped NBD connection is reconnected; one that
    keeps dropping fails the backup: exit 10, no point, our new snapshot destroyed, the base kept."""
    img = disk_image(tmp_path / "n.raw", 8 * MiB, seed=5)
    vm = xapi.make_vm("xflaky", [img])
    xapi.nbd_drop_after(300_000, times=2)
    since = Since(xapi)
    res = xc.run("backup", f"xen://{POOL}/xflaky")
    assert since.calls("nbd-drop") and "NBD read of disk xvda failed" in res.stderr
    (vdi,) = xapi.vm_disks(vm)
    assert restored_sha(xc, "xflaky", "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdi))
    base = snapshots_of(xapi, vm)
    xapi.nbd_drop_after(1000, times=1000)
    res = xc.run("backup", f"xen://{POOL}/xflaky", "--full", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "failed 6 times")
    assert len(xc.json("list", "xflaky")["points"]) == 1 and snapshots_of(xapi, vm) == base


def test_leftovers_of_ours_are_removed_others_untouched(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    vm = xapi.make_vm("xleft", [disk_image(tmp_path / "l.raw", 2 * MiB, seed=6)])
    repo_id = Repository.open(xc.repo).config.id
    with xapi.session() as s:
        dead = s.xenapi.VM.snapshot(vm, "vmrecover-0dead")
        owner = {"repo": repo_id, "host": os.uname().nodename, "pid": 2**22 + 7, "boot": _boot_id()}
        s.xenapi.VM.set_name_description(dead, f"made by vmrecover; owner={json.dumps(owner)}")
        s.xenapi.VM.snapshot(vm, "nightly")
    xc.json("backup", f"xen://{POOL}/xleft")
    names = snapshots_of(xapi, vm)
    assert "nightly" in names and "vmrecover-0dead" not in names
    assert len([n for n in names if n.startswith("vmrecover-base-")]) == 1


def test_wrong_password_and_unknown_vm(xc: Cli, xapi: Any) -> None:
    res = xc.run("hypervisor", "add", "bad", f"xen://root@127.0.0.1:{xapi.port}", "--ca-file", xapi.ca_file,
                 "--password-stdin", input="wrong\n", check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.AUTH, "refused the login of user root")
    res = xc.run("hypervisor", "add", "nocert", f"xen://root@127.0.0.1:{xapi.port}", "--password-stdin",
                 input=xapi.password + "\n", check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.CERTIFICATE, "not trusted", "fingerprint", "--ca-file")
    res = xc.run("backup", f"xen://{POOL}/no-such-vm", check=False)
    assert_clean_error(res, ExitCode.NOT_FOUND, "no VM 'no-such-vm'")
    about = xc.json("hypervisor", "test", POOL)
    with xapi.session() as s:
        hosts = len(s.xenapi.host.get_all())
    assert about["ok"] and about["hosts"] == hosts


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _wait_for(what: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_in_the_middle_destroys_the_snapshot_and_keeps_the_base(
    xc: Cli, xapi: Any, tmp_path: Path
) -> None:
    """Must survive: the previous point and its base snapshot; no point and no new snapshot."""
    vm = xapi.make_vm("xterm", [disk_image(tmp_path / "t.raw", 8 * MiB, seed=7)])
    xc.json("backup", f"xen://{POOL}/xterm")
    base = snapshots_of(xapi, vm)
    xapi.nbd_slow(0.3)  # reads are slow: the backup is caught reading
    connects = len(xapi.calls("nbd-connect"))
    proc = xc.popen("backup", f"xen://{POOL}/xterm", "--full", "--json")
    _wait_for(lambda: len(xapi.calls("nbd-connect")) > connects)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert snapshots_of(xapi, vm) == base and len(xc.json("list", "xterm")["points"]) == 1


def test_an_offline_backup_that_fails_starts_the_vm_again(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """Must survive: the VM running.  The snapshot of an offline backup is refused by the pool."""
    vm = xapi.make_vm("xoff", [disk_image(tmp_path / "o.raw", 2 * MiB, seed=8)])
    xapi.refuse["VM.snapshot"] = 1
    since = Since(xapi)
    res = xc.run("backup", f"xen://{POOL}/xoff", "--mode", "offline", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "cannot snapshot the VM", "OTHER_OPERATION_IN_PROGRESS")
    assert since.calls("VM.clean_shutdown", ok=True) and xapi.record("VM", vm)["power_state"] == "Running"
    assert (snapshots_of(xapi, vm) == [] and xc.json("list")["vms"] == []) or "xoff" not in str(
        xc.json("list")
    )


def test_a_session_that_expires_mid_backup_is_renewed(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """The pool ends every session while the backup reads, then the NBD connection drops: the XenAPI
    client logs in again, the reader asks where the disk is served again (the old export refuses new
    connections), and the backup completes."""
    img = disk_image(tmp_path / "e.raw", 8 * MiB, seed=9)
    vm = xapi.make_vm("xexp", [img])
    xapi.nbd_slow(0.3)  # 256 KiB per 0.3 s: the first connection is cut after about 1.2 s
    xapi.nbd_drop_after(1 * MiB, times=1)
    since = Since(xapi)
    proc = xc.popen("backup", f"xen://{POOL}/xexp", "--json")
    _wait_for(lambda: since.calls("nbd-connect"))
    xapi.expire_sessions()  # before the cut: the reconnect needs a new session and a new export
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert since.calls("nbd-drop") and len(since.calls("session.login_with_password", ok=True)) == 2
    assert not since.calls("nbd-refused"), "the reader reconnected to the expired session's export"
    (vdi,) = xapi.vm_disks(vm)
    assert restored_sha(xc, "xexp", "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdi))


def test_passwords_and_session_refs_never_reach_logs(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """Debug logs of a whole backup (JSON and text) hold neither the pool's password nor the session
    reference (it authorizes as much as the password, and NBD export names carry it)."""
    xapi.make_vm("xsecret", [disk_image(tmp_path / "s.raw", 2 * MiB, seed=10)])
    for fmt in ("json", "text"):
        since = Since(xapi)
        logged = Cli(xc.repo, env={"VMRECOVER_LOG_FORMAT": fmt})
        res = logged.run("backup", f"xen://{POOL}/xsecret", "--log-level", "debug")
        sessions = [c["result"] for c in since.calls("session.login_with_password", ok=True)]
        assert sessions and "logged in to pool1" in res.stderr  # the debug log did run
        for secret in (xapi.password, *sessions):
            assert secret not in res.stderr + res.stdout
    assert oct((xc.repo / "hypervisors.toml").stat().st_mode & 0o777) == "0o600"
