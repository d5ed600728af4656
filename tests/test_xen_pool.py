"""XenServer / XCP-ng pools: the XAPI simulator's pool has two hosts (the master xcp-sim-host at 127.0.0.1
and the member xcp-sim-host2 at 127.0.0.2, each answering XenAPI on the same port).

The issue: a VM is found wherever it runs in the pool (it may have moved to another host, or failed
over, between backups) and its change-tracking chain continues; a pool member given to ``hypervisor
add`` is followed to the master; instant recovery attaches the session's SR on every host."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, sha256_file
from tests.test_xen import Since
from tests.testkit.vmdisks import disk_image, restored_sha
from vmrecover.recovery import exports
from vmrecover.vfs import srlayout

MiB = 1 << 20
BLOCK = 64 * 1024
POOL = "pool1"


def _add(cli: Cli, xapi: Any, name: str, address: str, *args: str) -> Any:
    return cli.run("hypervisor", "add", name, f"xen://root@{address}:{xapi.port}", "--ca-file", xapi.ca_file,
                   "--password-stdin", *args, input=xapi.password + "\n")  # fmt: skip


@pytest.fixture
def xc(cli: Cli, xapi: Any) -> Iterator[Cli]:
    """The `cli` repository with the simulator's pool added as pool1 (its master's address)."""
    _add(cli, xapi, POOL, "127.0.0.1")
    yield cli


@pytest.fixture
def xr(xc: Cli, port111: Any) -> Iterator[Cli]:
    """xc for instant recovery: the product's export takes ports 2049 and 111; stopped after the test."""
    try:
        yield xc
    finally:
        exports.stop(xc.repo)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_a_member_given_to_hypervisor_add_is_followed_to_the_master(
    cli: Cli, xapi: Any, tmp_path: Path
) -> None:
    """The member refuses the login with HOST_IS_SLAVE naming the master; the product logs in there, says
    so, and a backup through the hypervisor added by the member's address works (each time following)."""
    img = disk_image(tmp_path / "f.raw", 4 * MiB, seed=41)
    vm = xapi.make_vm("xfollow", [img])
    since = Since(xapi)
    res = _add(cli, xapi, "member", "127.0.0.2", "--json", "--log-level", "info")
    doc = json.loads(res.stdout)
    assert doc["url"] == f"xen://root@127.0.0.2:{xapi.port}" and doc["about"]["hosts"] == 2, doc
    assert "127.0.0.2 is a pool member; logging in to the master at 127.0.0.1" in _one_line(res.stderr)
    assert [(c["at"], c["ok"]) for c in since.calls("session.login_with_password")] == [
        ("127.0.0.2", False),
        ("127.0.0.1", True),
    ]
    assert since.calls("session.login_with_password", ok=False)[0]["error"] == ["HOST_IS_SLAVE", "127.0.0.1"]

    since = Since(xapi)
    res = cli.run("backup", "xen://member/xfollow", "--json", "--log-level", "info")
    assert json.loads(res.stdout)["kind"] == "full"
    assert "logging in to the master at 127.0.0.1" in _one_line(res.stderr)
    assert {c["at"] for c in since.calls("VM.snapshot")} == {"127.0.0.1"}  # the calls went to the master
    assert restored_sha(cli, "xfollow", "xvda", tmp_path) == sha256_file(xapi.vdi_file(xapi.vm_disks(vm)[0]))


@pytest.mark.parametrize("how", ["pool_migrate", "ha_restart"])
def test_a_vm_that_moved_to_another_host_is_found_and_its_chain_continues(
    xc: Cli, xapi: Any, tmp_path: Path, how: str
) -> None:
    """Backed up on the master, then live-migrated (VM.pool_migrate) or failed over by HA to the member:
    found by its name, and the next backup is incremental (only the changed blocks read)."""
    name = f"xmoves-{how.replace('_', '-')}"
    img = disk_image(tmp_path / "m.raw", 8 * MiB, seed=42)
    vm = xapi.make_vm(name, [img])
    master, member = xapi.hosts
    assert xapi.resident_on(vm) == master
    assert xc.json("backup", f"xen://{POOL}/{name}")["kind"] == "full"
    if how == "pool_migrate":
        with xapi.session() as s:
            s.xenapi.VM.pool_migrate(vm, member, {"live": "true"})
    else:
        xapi.move_vm(vm, member)
    assert xapi.resident_on(vm) == member
    (vdi,) = xapi.vm_disks(vm)
    with open(xapi.vdi_file(vdi), "r+b") as f:  # the guest, on its new host, writes into two blocks
        for off in (MiB + 100, 6 * MiB):
            f.seek(off)
            f.write(b"moved" * 100)
    since = Since(xapi)
    doc = xc.json("backup", f"xen://{POOL}/{name}")
    assert doc["kind"] == "incremental" and [d["read_whole"] for d in doc["disks"]] == [None], doc
    assert doc["bytes_read"] == 2 * BLOCK
    assert since.calls("VDI.list_changed_blocks", ok=True)
    assert restored_sha(xc, name, "xvda", tmp_path) == sha256_file(xapi.vdi_file(vdi))
    points = xc.json("list", name)["points"]
    assert len(points) == 2 and points[0]["config"]["record"]["uuid"] == points[1]["config"]["record"]["uuid"]


def _session_id(cli: Cli, name: str) -> tuple[str, str]:
    repo_id = tomllib.loads((cli.repo / "repo.toml").read_text())["repository"]["id"]
    return repo_id, next(s["id"] for s in cli.json("recover", "list") if s["name"] == name)


def test_instant_recovery_attaches_the_sr_on_every_host_and_stop_detaches_both(
    xr: Cli, xapi: Any, tmp_path: Path
) -> None:
    """recover start: one PBD per host, both plugged with the same device_config, each host mounting the
    export from its own address (the export allows every host); the recovered VM can move to the member;
    recover stop unplugs and destroys both PBDs and forgets the SR."""
    img = disk_image(tmp_path / "r.raw", 4 * MiB, seed=43)
    xapi.make_vm("xpoolir", [img])
    xr.json("backup", f"xen://{POOL}/xpoolir")
    since = Since(xapi)
    xr.json("recover", "start", "xpoolir", "--to", f"xen://{POOL}", "--name", "xp-ir", "--power-on")
    repo_id, sid = _session_id(xr, "xp-ir")
    sr_uuid = srlayout.sr_uuid(repo_id, sid)
    with xapi.session() as s:
        sr = s.xenapi.SR.get_by_uuid(sr_uuid)
        (vm,) = s.xenapi.VM.get_by_name_label("xp-ir")
    refs = xapi.record("SR", sr)["PBDs"]
    pbds = {xapi.record("PBD", p)["host"]: xapi.record("PBD", p) for p in refs}
    assert sorted(pbds) == sorted(xapi.hosts)
    assert all(p["currently_attached"] for p in pbds.values())
    configs = [p["device_config"] for p in pbds.values()]
    assert configs[0] == configs[1] == {
        "server": "127.0.0.1", "serverpath": "/vmrecover/recover/xp-ir", "nfsversion": "3"
    }  # fmt: skip
    attached = {c["host"]: c["source"] for c in since.calls("sm", op="sr_attach", sr=sr, ok=True)}
    assert attached == {xapi.host_ref: "127.0.0.1", xapi.member_ref: "127.0.0.2"}
    export = exports.running(xr.repo)
    assert export is not None and {"127.0.0.1", "127.0.0.2"} <= {a.split("/")[0] for a in export.allow}

    # the recovered VM moves to the member: its disk is reached through the member's mount there
    assert xapi.resident_on(vm) == xapi.host_ref
    with xapi.session() as s:
        s.xenapi.VM.pool_migrate(vm, xapi.member_ref, {})
    (disk,) = xapi.vm_disks(vm)
    xapi.guest_write(disk, 2 * MiB, b"written on the member")
    assert xapi.guest_read(disk, 2 * MiB, 21) == b"written on the member"

    xr.run("recover", "stop", "xp-ir")
    assert not [ref for ref in refs if xapi.exists("PBD", ref)]
    assert not xapi.exists("SR", sr) and not xapi.exists("VM", vm)
    assert sorted(c["host"] for c in since.calls("sm", op="sr_detach", sr=sr)) == sorted(xapi.hosts)
    assert len(since.calls("PBD.destroy", ok=True)) == 2 and since.calls("SR.forget", ok=True)
    assert xr.json("recover", "list") == [] and exports.running(xr.repo) is None
