"""Full restore of XenServer points to a pool (``vmrecover restore VM --to xen://POOL``) against the XAPI
simulator (tests/xapi): VDIs created and filled over ``PUT /import_raw_vdi``, the VM created from the
stored record, VBDs and VIFs as they were; nothing left behind when it fails."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from tests import test_xen
from tests.conftest import Cli, assert_clean_error, sha256_file
from tests.testkit.vmdisks import disk_image
from vmrecover.errors import ExitCode

MiB = 1 << 20
POOL = test_xen.POOL
xc = test_xen.xc  # the fixture: the `cli` repository with the simulator added as pool1
ETH0 = "Pool-wide network associated with eth0"
ETH1 = "Pool-wide network associated with eth1"


def _backed_up(xc: Cli, xapi: Any, tmp_path: Path, name: str, seed: int, **kw: Any) -> str:
    """A VM with two disks (data and holes) and, by default, two NICs, backed up once; its ref."""
    disks = [disk_image(tmp_path / f"{name}-0.raw", 6 * MiB, seed=seed),
             disk_image(tmp_path / f"{name}-1.raw", 3 * MiB, seed=seed + 100)]  # fmt: skip
    vm = xapi.make_vm(name, disks, **{"nics": [ETH0, ETH1], "memory": 512 * MiB, "vcpus": 2, **kw})
    xc.json("backup", f"xen://{POOL}/{name}")
    return vm


def _by_name(xapi: Any, name: str) -> str:
    with xapi.session() as s:
        (vm,) = s.xenapi.VM.get_by_name_label(name)
        return str(vm)


def _vbds(xapi: Any, vm: str) -> list[dict[str, Any]]:
    out = [xapi.record("VBD", b) for b in xapi.record("VM", vm)["VBDs"]]
    return sorted(out, key=lambda b: int(b["userdevice"]))


def _vifs(xapi: Any, vm: str) -> list[tuple[str, str, str]]:
    """(device, MAC, network name) of each VIF."""
    out = []
    for ref in xapi.record("VM", vm)["VIFs"]:
        v = xapi.record("VIF", ref)
        out.append((v["device"], v["MAC"], xapi.record("network", v["network"])["name_label"]))
    return sorted(out)


def _counts(xapi: Any) -> tuple[int, int, int, int]:
    with xapi.session() as s:
        x = s.xenapi
        return len(x.VM.get_all()), len(x.VDI.get_all()), len(x.VBD.get_all()), len(x.VIF.get_all())


def test_restore_under_a_new_name_is_the_vm_again(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    vm = _backed_up(xc, xapi, tmp_path, "xr1", seed=11)
    doc = xc.json("restore", "xr1", "--to", f"xen://{POOL}", "--name", "xr1-copy")
    new = _by_name(xapi, "xr1-copy")
    rec, orig = xapi.record("VM", new), xapi.record("VM", vm)
    assert doc["vm"] == rec["uuid"] != orig["uuid"] and doc["original_uuid"] == orig["uuid"]
    assert doc["uuid_kept"] is False and "new UUID" in doc["uuid_note"]
    assert doc["sr"] == "Local storage" and not doc["powered_on"] and rec["power_state"] == "Halted"
    assert doc["networks"] == {ETH0: ETH0, ETH1: ETH1} and doc["network_connected"]
    # the disks: byte-identical, in the same order, bootable as they were, sent over the raw import
    new_vdis, old_vdis = xapi.vm_disks(new), xapi.vm_disks(vm)
    assert [sha256_file(xapi.vdi_file(v)) for v in new_vdis] == [
        sha256_file(xapi.vdi_file(v)) for v in old_vdis
    ]
    assert [(b["userdevice"], b["bootable"], b["mode"]) for b in _vbds(xapi, new)] == [
        (b["userdevice"], b["bootable"], b["mode"]) for b in _vbds(xapi, vm)
    ]
    assert [xapi.record("VDI", v)["name_label"] for v in new_vdis] == ["xr1-copy-xvda", "xr1-copy-xvdb"]
    assert [d["name"] for d in doc["disks"]] == ["xvda", "xvdb"]
    assert {c["vdi"] for c in xapi.calls("PUT /import_raw_vdi", ok=True)} >= set(new_vdis)
    for k in ("memory_static_max", "memory_dynamic_max", "memory_dynamic_min", "memory_static_min",
              "VCPUs_max", "VCPUs_at_startup", "platform", "HVM_boot_policy", "HVM_boot_params"):  # fmt: skip
        assert rec[k] == orig[k], k
    assert rec["is_a_template"] is False
    # the NICs: the original's MACs, on the same networks
    assert _vifs(xapi, new) == _vifs(xapi, vm)
    assert sorted(doc["macs"]) == sorted(m for _, m, _ in _vifs(xapi, vm))


def test_new_identity_no_network_and_power_on(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    vm = _backed_up(xc, xapi, tmp_path, "xr2", seed=12)
    old = _vifs(xapi, vm)
    doc = xc.json("restore", "xr2", "--to", f"xen://{POOL}", "--name", "xr2-new", "--new-identity")
    new = _vifs(xapi, _by_name(xapi, "xr2-new"))
    assert [(d, n) for d, _, n in new] == [(d, n) for d, _, n in old]  # same devices and networks
    assert not {m for _, m, _ in new} & {m for _, m, _ in old}  # new MACs
    assert doc["new_identity"]
    doc = xc.json("restore", "xr2", "--to", f"xen://{POOL}", "--name", "xr2-alone", "--no-network")
    assert _vifs(xapi, _by_name(xapi, "xr2-alone")) == []
    assert doc["networks"] == {ETH0: None, ETH1: None} and not doc["network_connected"]
    doc = xc.json("restore", "xr2", "--to", f"xen://{POOL}", "--name", "xr2-on", "--power-on",
                  "--new-identity")  # fmt: skip
    assert doc["powered_on"] and xapi.record("VM", _by_name(xapi, "xr2-on"))["power_state"] == "Running"
    assert xapi.calls("VM.start", ok=True)


def test_a_name_clash_is_refused_and_nothing_is_created(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    _backed_up(xc, xapi, tmp_path, "xr3", seed=13)
    xapi.make_vm("xr3-other", [MiB])
    before, creates = _counts(xapi), len(xapi.calls("VDI.create"))
    res = xc.run("restore", "xr3", "--to", f"xen://{POOL}", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "a VM named 'xr3' exists", "--name NEW")
    res = xc.run("restore", "xr3", "--to", f"xen://{POOL}", "--name", "xr3-other", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "a VM named 'xr3-other' exists", "another free name")
    assert _counts(xapi) == before and len(xapi.calls("VDI.create")) == creates


def test_a_failure_in_the_middle_leaves_nothing_behind(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """Must survive: the pool as it was.  The disks are uploaded and the VM created when its second
    VBD is refused: the VBD, the VM and both VDIs are destroyed, and the error is clean."""
    _backed_up(xc, xapi, tmp_path, "xr4", seed=14)
    before, puts = _counts(xapi), len(xapi.calls("PUT /import_raw_vdi", ok=True))
    xapi.refuse["VBD.create"] = 1
    res = xc.run("restore", "xr4", "--to", f"xen://{POOL}", "--name", "xr4-copy", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "refused an operation", "OTHER_OPERATION_IN_PROGRESS")
    assert len(xapi.calls("PUT /import_raw_vdi", ok=True)) == puts + 2 and xapi.calls("VM.create", ok=True)
    assert [c["ok"] for c in xapi.calls("VM.destroy")][-1] and len(xapi.calls("VDI.destroy", ok=True)) >= 2
    assert _counts(xapi) == before
    with xapi.session() as s:
        assert s.xenapi.VM.get_by_name_label("xr4-copy") == []
    xapi.refuse["VIF.create"] = (1, ["MAC_INVALID", "xx"])  # later: after the VBDs
    res = xc.run("restore", "xr4", "--to", f"xen://{POOL}", "--name", "xr4-copy", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "MAC_INVALID")
    assert _counts(xapi) == before


def test_a_vm_that_does_not_start_is_kept_and_said(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    _backed_up(xc, xapi, tmp_path, "xr5", seed=15, nics=[])
    xapi.refuse["VM.start"] = (1, ["HOST_NOT_ENOUGH_FREE_MEMORY", "536870912", "100"])
    res = xc.run("restore", "xr5", "--to", f"xen://{POOL}", "--name", "xr5-copy", "--power-on", check=False)
    assert_clean_error(
        res, ExitCode.UNREACHABLE, "was restored .* with all its disks", "HOST_NOT_ENOUGH_FREE"
    )
    assert xapi.record("VM", _by_name(xapi, "xr5-copy"))["power_state"] == "Halted"


def test_the_sr_and_the_networks(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """--sr by name or UUID; one that holds no disks or does not exist is refused; a network the pool
    lacks puts its NICs on the pool's first usable network, and the result says so."""
    net = xapi.add_network("xr6 lab network", "xenbr9")
    vm = _backed_up(xc, xapi, tmp_path, "xr6", seed=16, nics=[ETH1, "xr6 lab network"])
    with xapi.session() as s:
        s.xenapi.network.set_name_label(net, "xr6 renamed")
    nfs = xapi.add_sr("xr6 nfs", "nfs")
    iso = xapi.add_sr("xr6 ISOs", "iso")
    before = _counts(xapi)
    res = xc.run(
        "restore", "xr6", "--to", f"xen://{POOL}", "--name", "xr6-a", "--sr", "xr6 ISOs", check=False
    )
    assert_clean_error(res, ExitCode.BAD_INPUT, "holds iso images, not virtual disks", "xr6 nfs")
    res = xc.run("restore", "xr6", "--to", f"xen://{POOL}", "--name", "xr6-a", "--sr", "nope", check=False)
    assert_clean_error(res, ExitCode.NOT_FOUND, "has no SR 'nope'")
    assert _counts(xapi) == before and iso
    sr_uuid = xapi.record("SR", nfs)["uuid"]
    res = xc.run("restore", "xr6", "--to", f"xen://{POOL}", "--name", "xr6-a", "--sr", sr_uuid)
    assert "is not in the pool: its NICs were put on" in res.stdout, res.stdout
    new = _by_name(xapi, "xr6-a")
    assert {xapi.record("VDI", v)["SR"] for v in xapi.vm_disks(new)} == {nfs}
    assert [n for _, _, n in _vifs(xapi, new)] == [ETH1, ETH0]
    assert [m for _, m, _ in _vifs(xapi, new)] == [m for _, m, _ in _vifs(xapi, vm)]
    doc = xc.json("restore", "xr6", "--to", f"xen://{POOL}", "--name", "xr6-b", "--sr", "xr6 nfs")
    assert doc["networks"] == {ETH1: ETH1, "xr6 lab network": ETH0} and doc["sr"] == "xr6 nfs"


def test_options_and_points_of_other_platforms(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "i.raw", MiB, seed=17)
    xc.run("backup", img, "--vm", "xr7-images")
    res = xc.run("restore", "xr7-images", "--to", f"xen://{POOL}", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "backed up from disk images, not from XenServer")
    res = xc.run("restore", "xr7-images", "--to", f"xen://{POOL}", "--datastore", "ds1", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "--datastore and --host are vSphere's", "--sr")
    res = xc.run("restore", "xr7-images", "--to", tmp_path / "out.raw", "--sr", "x", check=False)
    assert_clean_error(
        res, ExitCode.BAD_INPUT, "--sr, --name.* go with --to vmware://HYPERVISOR or xen://POOL"
    )


def test_sigterm_during_the_upload_leaves_nothing_behind(xc: Cli, xapi: Any, tmp_path: Path) -> None:
    """Must survive: the pool as it was.  SIGTERM once the first VDI is created (its upload under way):
    exit 130, the VDI destroyed, no VM."""
    xapi.make_vm("xr8", [disk_image(tmp_path / "s.raw", 64 * MiB, seed=18)], nics=[])
    xc.json("backup", f"xen://{POOL}/xr8")
    before, creates = _counts(xapi), len(xapi.calls("VDI.create"))
    proc = xc.popen("restore", "xr8", "--to", f"xen://{POOL}", "--name", "xr8-copy", "--json")
    deadline = time.monotonic() + 60
    while len(xapi.calls("VDI.create")) == creates:
        assert time.monotonic() < deadline and proc.poll() is None, "the restore did not create a VDI"
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert _counts(xapi) == before
