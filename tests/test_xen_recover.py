"""Instant recovery on a XenServer / XCP-ng pool (the XAPI simulator, tests/xapi), end to end.

The product publishes a session as an NFS SR served by its real `nfs serve` (ports 2049 and 111, hence
the `port111` lock); the simulator attaches it as sm's NFSSR driver does, over the network (MOUNT of
serverpath/<SR uuid>, the writability and hardlink probes, READDIR at SR.scan), boots the test guest with
qemu reading and writing its VDI over nfs:// (`boot_guests`), and moves VDIs off it with READs and a
REMOVE (VDI.pool_migrate / VDI.copy)."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, assert_clean_error, sha256_file
from tests.test_service import ServedApi
from tests.testkit.guest import read_boot_log
from tests.testkit.vmdisks import disk_image, restored_sha
from vmrecover.errors import ExitCode, VmrecoverError
from vmrecover.recovery import exports
from vmrecover.vfs import srlayout

MiB = 1 << 20
POOL = "pool1"
BOOT_TIMEOUT = 240


@pytest.fixture
def xc(cli: Cli, xapi: Any, port111: Any) -> Iterator[Cli]:
    cli.run("hypervisor", "add", POOL, f"xen://root@127.0.0.1:{xapi.port}", "--ca-file", xapi.ca_file,
            "--password-stdin", input=xapi.password + "\n")  # fmt: skip
    try:
        yield cli
    finally:
        exports.stop(cli.repo)


def _ids(cli: Cli, session: str) -> tuple[str, str]:
    repo_id = tomllib.loads((cli.repo / "repo.toml").read_text())["repository"]["id"]
    sid = next(s["id"] for s in cli.json("recover", "list") if s["name"] == session)
    return repo_id, sid


def _vm(xapi: Any, name: str) -> str | None:
    with xapi.session() as s:
        refs = s.xenapi.VM.get_by_name_label(name)
    return refs[0] if refs else None


def _sr_of(xapi: Any, uuid: str) -> str | None:
    with xapi.session() as s:
        try:
            return str(s.xenapi.SR.get_by_uuid(uuid))
        except Exception:
            return None


def _vbd_vdis(xapi: Any, vm: str) -> list[dict[str, Any]]:
    out = []
    for vbd in xapi.record("VM", vm)["VBDs"]:
        r = xapi.record("VBD", vbd)
        if r["type"] == "Disk":
            out.append(xapi.record("VDI", r["VDI"]) | {"ref": r["VDI"]})
    return out


def _assert_released(cli: Cli, xapi: Any, sr_uuid: str, session: str) -> None:
    assert _sr_of(xapi, sr_uuid) is None  # SR.forget: records gone
    assert not [s for s in cli.json("recover", "list") if s["name"] == session]
    assert exports.running(cli.repo) is None  # nothing else published: the export stopped


def test_the_guest_boots_from_the_nfs_sr_then_moves_to_local_storage(
    xc: Cli, xapi: Any, guest_image: Path, tmp_path: Path
) -> None:
    """A backed-up VM boots on the pool from the appliance (qemu reads and writes its VDI over NFS, the
    SR attached as NFSSR does); its write lands in the session, never in the backup; migrating the halted
    VM copies its disk, boot included, to local storage and releases everything."""
    vm = xapi.make_vm("xguest", [guest_image], power_state="Halted")
    xc.json("backup", f"xen://{POOL}/xguest")
    xapi.boot_guests(True)
    started = xc.json("recover", "start", "xguest", "--to", f"xen://{POOL}", "--name", "xg-ir", "--power-on")
    repo_id, sid = _ids(xc, "xg-ir")
    sr_uuid = srlayout.sr_uuid(repo_id, sid)
    assert started["name"] == "xg-ir"
    sr = _sr_of(xapi, sr_uuid)
    assert sr is not None
    r = xapi.record("SR", sr)
    assert (r["type"], r["shared"], r["name_label"]) == ("nfs", True, "vmrecover-xg-ir")
    pbds = [xapi.record("PBD", pbd) for pbd in r["PBDs"]]
    assert sorted(p["host"] for p in pbds) == sorted(xapi.hosts)  # one per host of the pool
    for p in pbds:
        assert p["currently_attached"] and p["device_config"] == {
            "server": "127.0.0.1", "serverpath": "/vmrecover/recover/xg-ir", "nfsversion": "3"
        }  # fmt: skip
    new_vm = _vm(xapi, "xg-ir")
    assert new_vm is not None and new_vm != vm
    (disk,) = _vbd_vdis(xapi, new_vm)
    assert disk["uuid"] == srlayout.vdi_uuid(repo_id, sid, "xvda") and disk["SR"] == sr
    assert int(disk["virtual_size"]) == guest_image.stat().st_size

    xapi.wait_halted(new_vm, BOOT_TIMEOUT)  # the guest powers itself off after booting
    assert "VMRECOVER-GUEST-BOOT n=1" in xapi.serial(new_vm)
    written = next(s for s in xc.json("recover", "list") if s["name"] == "xg-ir")["written"]
    assert written["xvda"] > 0
    assert restored_sha(xc, "xguest", "xvda", tmp_path) == sha256_file(guest_image)  # backup untouched

    moved = xc.json("recover", "migrate", "xg-ir", "--to-sr", "Local storage")
    assert moved["live"] is False and len(moved["disks"]) == 1
    (disk,) = _vbd_vdis(xapi, new_vm)
    assert disk["SR"] == xapi.local_sr and xapi.record("VM", new_vm)["name_label"] == "xg-ir"
    assert len(read_boot_log(xapi.vdi_file(disk["ref"]))) == 1  # the boot's write came along
    _assert_released(xc, xapi, sr_uuid, "xg-ir")


def test_live_migration_carries_the_guests_writes_and_stop_undoes_everything(
    xc: Cli, xapi: Any, tmp_path: Path
) -> None:
    img = disk_image(tmp_path / "l.raw", 8 * MiB, seed=21)
    xapi.make_vm("xlive", [img, 2 * MiB])
    xc.json("backup", f"xen://{POOL}/xlive")

    # stop: the VM destroyed, the PBD unplugged and destroyed, the SR forgotten, the export stopped
    xc.json("recover", "start", "xlive", "--to", f"xen://{POOL}", "--name", "xl-stop", "--power-on")
    sr_stop = srlayout.sr_uuid(*_ids(xc, "xl-stop"))
    vm = _vm(xapi, "xl-stop")
    assert vm is not None and xapi.record("VM", vm)["power_state"] == "Running"
    assert exports.running(xc.repo) is not None
    xc.run("recover", "stop", "xl-stop")
    assert _vm(xapi, "xl-stop") is None
    _assert_released(xc, xapi, sr_stop, "xl-stop")

    # migrate while running: VDI.pool_migrate per disk, the guest's write included
    xc.json("recover", "start", "xlive", "--to", f"xen://{POOL}", "--name", "xl-mig", "--power-on")
    repo_id, sid = _ids(xc, "xl-mig")
    vm = _vm(xapi, "xl-mig")
    assert vm is not None
    xvda = next(d for d in _vbd_vdis(xapi, vm) if d["uuid"] == srlayout.vdi_uuid(repo_id, sid, "xvda"))
    xapi.guest_write(xvda["ref"], 3 * MiB + 4096, b"written by the recovered guest")
    assert xapi.guest_read(xvda["ref"], 3 * MiB + 4096, 30) == b"written by the recovered guest"
    moved = xc.json("recover", "migrate", "xl-mig", "--to-sr", "Local storage")
    assert moved["live"] is True and len(moved["disks"]) == 2
    disks = _vbd_vdis(xapi, vm)
    assert len(disks) == 2 and all(d["SR"] == xapi.local_sr for d in disks)
    assert xapi.record("VM", vm)["power_state"] == "Running"
    expect = bytearray(img.read_bytes())
    expect[3 * MiB + 4096 : 3 * MiB + 4096 + 30] = b"written by the recovered guest"
    got = {hashlib.sha256(xapi.vdi_file(d["ref"]).read_bytes()).hexdigest() for d in disks}
    assert hashlib.sha256(bytes(expect)).hexdigest() in got
    assert restored_sha(xc, "xlive", "xvda", tmp_path) == sha256_file(img)  # the backup never changed
    _assert_released(xc, xapi, srlayout.sr_uuid(repo_id, sid), "xl-mig")


def test_an_sr_name_clash_is_refused_and_leaves_nothing(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "c.raw", 2 * MiB, seed=22)
    xapi.make_vm("xclash", [img])
    xc.json("backup", f"xen://{POOL}/xclash")
    other = xapi.add_sr("vmrecover-xc-ir", "nfs")
    res = xc.run("recover", "start", "xclash", "--to", f"xen://{POOL}", "--name", "xc-ir", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "already has an SR named 'vmrecover-xc-ir'", "--name")
    assert xapi.exists("SR", other) and _vm(xapi, "xc-ir") is None
    assert xc.json("recover", "list") == [] and exports.running(xc.repo) is None


def test_a_host_that_cannot_mount_the_export_undoes_every_step(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """PBD.plug fails as the SM does when the NFS mount fails: a clean error naming the host, the export
    and the fix; the introduced SR forgotten, the PBD destroyed, the session and the export gone."""
    img = disk_image(tmp_path / "u.raw", 2 * MiB, seed=23)
    xapi.make_vm("xunplug", [img])
    xc.json("backup", f"xen://{POOL}/xunplug")
    xapi.refuse["PBD.plug"] = (1, ["SR_BACKEND_FAILURE_73", "", "NFS mount error [opterr=timed out]", ""])
    res = xc.run("recover", "start", "xunplug", "--to", f"xen://{POOL}", "--name", "xu-ir", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "cannot attach the session's SR", "SR_BACKEND_FAILURE_73",
                       "TCP 111 and 2049")  # fmt: skip
    with xapi.session() as s:
        names = [s.xenapi.SR.get_name_label(r) for r in s.xenapi.SR.get_all()]
        configs = [r["device_config"] for r in s.xenapi.PBD.get_all_records().values()]
    assert "vmrecover-xu-ir" not in names
    assert not [c for c in configs if c.get("serverpath") == "/vmrecover/recover/xu-ir"]
    assert xc.json("recover", "list") == [] and exports.running(xc.repo) is None


def test_points_not_from_xenserver_are_refused_before_anything_is_made(
    xc: Cli, xapi: Any, tmp_path: Path
) -> None:
    img = disk_image(tmp_path / "local.raw", 2 * MiB, seed=24)
    xc.json("backup", "--vm", "localvm", img, "--format", "raw")
    res = xc.run("recover", "start", "localvm", "--to", f"xen://{POOL}", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "not from XenServer")
    assert xc.json("recover", "list") == []


def test_stop_that_the_pool_refuses_keeps_the_session_and_force_names_what_is_left(
    xc: Cli, xapi: Any, tmp_path: Path
) -> None:
    img = disk_image(tmp_path / "f.raw", 2 * MiB, seed=25)
    xapi.make_vm("xforce", [img])
    xc.json("backup", f"xen://{POOL}/xforce")
    xc.json("recover", "start", "xforce", "--to", f"xen://{POOL}", "--name", "xf-ir")
    sr_uuid = srlayout.sr_uuid(*_ids(xc, "xf-ir"))
    xapi.refuse["VM.destroy"] = (2, ["OTHER_OPERATION_IN_PROGRESS", "VM", "OpaqueRef:x"])
    res = xc.run("recover", "stop", "xf-ir", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "cannot undo session xf-ir", "OTHER_OPERATION_IN_PROGRESS",
                       "--force")  # fmt: skip
    assert [s["name"] for s in xc.json("recover", "list")] == ["xf-ir"]  # nothing lost
    assert _sr_of(xapi, sr_uuid) is not None and exports.running(xc.repo) is not None
    res = xc.run("recover", "stop", "xf-ir", "--force")
    assert "VM xf-ir" in res.stderr and "SR vmrecover-xf-ir" in res.stderr
    assert xc.json("recover", "list") == [] and exports.running(xc.repo) is None
    xapi.refuse.pop("VM.destroy", None)
    with xapi.session() as s:  # what --force named is there for the administrator to remove
        vm = s.xenapi.VM.get_by_name_label("xf-ir")[0]
        s.xenapi.VM.destroy(vm)
        sr = s.xenapi.SR.get_by_uuid(sr_uuid)
        for pbd in s.xenapi.SR.get_PBDs(sr):
            s.xenapi.PBD.unplug(pbd)
        s.xenapi.SR.forget(sr)


def test_under_the_service_recoveries_use_its_export_and_grow_its_allow_list(
    xc: Cli,
    xapi: Any,
    notify: Any,
    tmp_path: Path,
) -> None:
    """With `vmrecover serve` serving NFS on 2049/111, a recovery started through its API publishes the
    session from the service's own export (no second server; its allow list, which did not hold the
    pool's hosts, grows while it runs); so does one started with the CLI beside the running service;
    stopping them leaves the service's export serving."""
    img = disk_image(tmp_path / "s.raw", 2 * MiB, seed=26)
    xapi.make_vm("xsvc", [img])
    xc.json("backup", f"xen://{POOL}/xsvc")
    # allow: not the pool's hosts (127.0.0.1), which the recoveries must add
    nfs = 'listen = "127.0.0.1"\nport = 2049\nportmapper = true\nallow = ["10.99.0.0/16"]'
    served = ServedApi(xc, tmp_path, notify, nfs=nfs)
    call = served.call
    try:
        assert exports.running(xc.repo).by_service  # type: ignore[union-attr]
        status, doc = call(
            "POST", "/api/v1/sessions", {"vm": "xsvc", "to": f"xen://{POOL}", "name": "api-ir"}
        )
        assert status == 201, doc
        assert doc["published"]["platform"] == "xen" and _vm(xapi, "api-ir") is not None
        sr = _sr_of(xapi, srlayout.sr_uuid(*_ids(xc, "api-ir")))
        assert sr is not None and all(xapi.record("PBD", p)["currently_attached"]
                                      for p in xapi.record("SR", sr)["PBDs"])  # fmt: skip
        assert not exports.record_path(xc.repo).exists()  # no `nfs serve` of our own was started

        # the CLI beside the running service: the same export, asked through the service's socket
        xc.json("recover", "start", "xsvc", "--to", f"xen://{POOL}", "--name", "cli-ir")
        assert _vm(xapi, "cli-ir") is not None and not exports.record_path(xc.repo).exists()
        status, doc = call("GET", "/api/v1/sessions")
        assert {s["name"] for s in doc} == {"api-ir", "cli-ir"}  # one set of sessions

        sr_api, sr_cli = (srlayout.sr_uuid(*_ids(xc, s)) for s in ("api-ir", "cli-ir"))
        status, doc = call("POST", "/api/v1/sessions/api-ir/migrate", {"to_sr": "Local storage"})
        assert status == 200 and doc["sr"] == "Local storage", doc
        status, doc = call("DELETE", "/api/v1/sessions/cli-ir")
        assert status == 200 and doc["stopped"], doc
        assert _vm(xapi, "cli-ir") is None and _sr_of(xapi, sr_api) is None is _sr_of(xapi, sr_cli)
        assert _vm(xapi, "api-ir") is not None  # migrated: it runs on local storage now
        status, doc = call("GET", "/api/v1/sessions")
        assert doc == []
        ex = exports.running(xc.repo)  # still serving: the service's export is never stopped from here
        assert ex is not None and ex.by_service and served.proc.poll() is None
        status, doc = call("POST", "/api/v1/nfs/allow", {"allow": ["not-an-address"]})
        assert status == 400 and "not an address" in doc["message"], doc
        # a host the service's loopback-only export cannot serve is refused before anything is made
        with pytest.raises(
            VmrecoverError, match=r"listens on 127\.0\.0\.1 only: 10\.5\.5\.5 cannot reach it"
        ):
            exports.ensure(xc.repo, ["10.5.5.5"])
    finally:
        err = served.stop()
    assert served.proc.returncode == 0, err
    assert "the service's NFS export now allows 127.0.0.1/32" in err, err  # the growth is logged
    assert 'token="local" role=admin client=local method=POST path="/api/v1/nfs/allow" status=200' in err
