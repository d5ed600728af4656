"""VMware vSphere end to end, against VMware's vCenter simulator behind the tests' proxy (tests/vsphere):
the production code talks HTTPS/SOAP through pyvmomi exactly as to a vCenter.  The proxy answers
itself what vcsim lacks (QueryChangedDiskAreas from the real disk files, RemoveDatastore, guest file
transfer, relocation that moves files, NFC uploads); every test says which of those it relies on."""

from __future__ import annotations

import json
import signal
import socket
import stat
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, assert_clean_error, sha256_file
from tests.test_service import ServedApi
from tests.testkit.vmdisks import disk_image, restored_sha
from vmrecover.errors import ExitCode
from vmrecover.recovery import exports

MiB = 1 << 20
HV = "vc1"


@pytest.fixture
def vc(cli: Cli, vsphere: Any) -> Iterator[Cli]:
    """The `cli` repository (64 KiB chunks) with the simulator added as hypervisor vc1 (TLS verified
    against the test CA; the password through stdin).  A test that leaves the repository's NFS export
    daemon running fails (it would hold ports 2049 and 111 for the rest of the run)."""
    cli.run("hypervisor", "add", HV, vsphere.vmware_url, "--ca-file", vsphere.ca_file, "--password-stdin",
            input=vsphere.password + "\n")  # fmt: skip
    yield cli
    left = exports.running(cli.repo)
    if left is not None:
        exports.stop(cli.repo)
        pytest.fail(f"the test left the NFS export (pid {left.pid}) running")


def test_full_then_incremental_backup_with_cbt(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """Relies on the proxy's QueryChangedDiskAreas and changeIds."""
    img = disk_image(tmp_path / "d0.raw", 16 * MiB, seed=1)
    vm = vsphere.make_vm("web-cbt", [img])
    doc = vc.json("backup", f"vmware://{HV}/web-cbt")
    assert doc["kind"] == "full" and doc["vm"] == "web-cbt"
    assert doc["disks"][0]["read_whole"] == "changed block tracking was just enabled"
    assert restored_sha(vc, "web-cbt", "scsi0-0", tmp_path) == sha256_file(img)
    (point,) = vc.json("list", "web-cbt")["points"]
    assert point["config"]["platform"] == "vmware" and point["disks"][0]["change_token"]
    flat = vsphere.disk_file(vm, 0)
    with open(flat, "r+b") as f:  # the guest writes 3 small pieces
        for off in (0, 5 * MiB + 12345, 15 * MiB):
            f.seek(off)
            f.write(b"X" * 4096)
    doc = vc.json("backup", f"vmware://{HV}/web-cbt")
    assert doc["kind"] == "incremental", doc
    assert doc["bytes_read"] == 3 * 64 * 1024  # three 64 KiB chunks of the repository
    assert restored_sha(vc, "web-cbt", "scsi0-0", tmp_path) == sha256_file(flat)
    assert vsphere.props(vsphere.obj("VirtualMachine", vm), "snapshot").get("snapshot") is None  # removed


def _nic_networks(vsphere: Any, vm: Any) -> list[str]:
    """What each NIC of *vm* is connected to: a port group's name, a distributed port group's key."""
    from pyVmomi import vim

    devices = vsphere.props(vm, "config.hardware.device")["config.hardware.device"]
    nics = sorted(
        (d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard)), key=lambda d: d.key
    )
    return [getattr(n.backing, "deviceName", None) or n.backing.port.portgroupKey for n in nics]


def test_restored_nics_stay_on_their_networks(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """Found in review: without a network mapping the host puts every NIC on its first network (a
    NIC of a distributed port group came back on "VM Network")."""
    from pyVmomi import vim

    vm = vsphere.obj("VirtualMachine", vsphere.make_vm("nets", [disk_image(tmp_path / "n.raw", MiB, seed=4)]))
    pg = vsphere.find("DistributedVirtualPortgroup", "DC0_DVPG0")
    dvs = vsphere.props(pg, "config.distributedVirtualSwitch")["config.distributedVirtualSwitch"]
    port = vim.dvs.PortConnection(portgroupKey=pg._moId, switchUuid=vsphere.props(dvs, "uuid")["uuid"])
    backings = [
        vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port),
    ]
    vsphere.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="add", device=vim.vm.device.VirtualVmxnet3(key=-10 - i,
                                        backing=b)) for i, b in enumerate(backings)])))  # fmt: skip
    before = _nic_networks(vsphere, vm)
    assert sorted(before) == sorted(["VM Network", pg._moId])
    vc.json("backup", f"vmware://{HV}/nets")
    doc = vc.json("restore", "nets", "--to", f"vmware://{HV}", "--name", "nets-copy", "--new-identity")
    assert sorted(_nic_networks(vsphere, vsphere.obj("VirtualMachine", doc["vm"]))) == sorted(before)
    assert doc["networks"] == {"VM Network": "VM Network", pg._moId: "DC0_DVPG0"}


def test_a_step_after_the_import_fails_and_names_the_restored_vm(
    vc: Cli, vsphere: Any, tmp_path: Path
) -> None:
    """Must survive: the imported VM and the user's knowledge of it.  Restoring the identity is refused
    by the host after the disks went up: the error names the VM, which is there with its disks."""
    img = disk_image(tmp_path / "i.raw", 2 * MiB, seed=5)
    vsphere.make_vm("late", [img])
    vc.json("backup", f"vmware://{HV}/late")
    vsphere.proxy.refuse["ReconfigVM_Task"] = 1
    res = vc.run("restore", "late", "--to", f"vmware://{HV}", "--name", "late-copy", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, r"VM late-copy \(vm-\d+\) was restored",
                       "not allowed in the current state", "remove the VM and restore again")  # fmt: skip
    assert vsphere.answered("refused", call="ReconfigVM_Task")
    copy = vsphere.find("VirtualMachine", "late-copy")
    assert sha256_file(vsphere.disk_file(copy._moId, 0)) == sha256_file(img)


def test_full_restore_to_vsphere_keeps_identity_or_makes_a_new_one(
    vc: Cli, vsphere: Any, tmp_path: Path
) -> None:
    """Relies on the proxy's NFC upload (vcsim discards the bytes of an ImportVApp upload)."""
    img0 = disk_image(tmp_path / "a.raw", 8 * MiB, seed=2)
    img1 = disk_image(tmp_path / "b.raw", 4 * MiB, seed=3)
    vm = vsphere.make_vm("db-restore", [img0, img1], cpus=2, memory_mb=512)
    vc.json("backup", f"vmware://{HV}/{vm}")
    res = vc.run("restore", "db-restore", "--to", f"vmware://{HV}", "--json", check=False)
    assert res.returncode == 6 and "exists" in res.stdout  # the original is still there: a clash
    doc = vc.json("restore", "db-restore", "--to", f"vmware://{HV}", "--name", "db-copy", "--new-identity",
                  "--no-network", "--datastore", "LocalDS_0")  # fmt: skip
    copy = vsphere.obj("VirtualMachine", doc["vm"])
    props = vsphere.props(copy, "name", "config.hardware.numCPU", "config.hardware.memoryMB", "config.uuid")
    assert props["name"] == "db-copy" and props["config.hardware.numCPU"] == 2
    assert props["config.hardware.memoryMB"] == 512
    assert (
        props["config.uuid"] != vsphere.props(vsphere.obj("VirtualMachine", vm), "config.uuid")["config.uuid"]
    )
    uploads = vsphere.answered("nfc upload", vm=doc["vm"])
    assert len(uploads) == 2 and all(u["stream_optimized"] for u in uploads)
    # disks go as ovftool and govmomi send them: POST, streamVmdk (PUT is for files the lease creates)
    stream = "application/x-vnd.vmware-streamVmdk"
    assert {(u["http_method"], u["content_type"]) for u in uploads} == {("POST", stream)}
    assert sha256_file(vsphere.disk_file(doc["vm"], 0)) == sha256_file(img0)
    assert sha256_file(vsphere.disk_file(doc["vm"], 1)) == sha256_file(img1)
    assert (
        sum(u["bytes"] for u in uploads) < (img0.stat().st_size + img1.stat().st_size) // 2
    )  # holes never sent


def _datastores_of(vsphere: Any, host: str = "DC0_C0_H0") -> list[str]:
    h = vsphere.find("HostSystem", host)
    return [
        vsphere.props(d, "summary.name")["summary.name"] for d in vsphere.props(h, "datastore")["datastore"]
    ]


def test_instant_recovery_on_esxi_then_stop_and_migrate(
    vc: Cli, vsphere: Any, mounted: Any, port111: Any, tmp_path: Path
) -> None:
    """recover start --to: the product's own NFS export (checked by the proxy with nfs-ls over the
    portmapper) becomes an NFS datastore; the VM is registered from the session folder and powered on.
    stop: the VM is unregistered, the datastore unmounted; migrate: the proxy's relocation copies the
    VM's files, the session ends, the VM runs on.  Relies on the proxy for RemoveDatastore and for a
    relocation that moves files."""
    img = disk_image(tmp_path / "r.raw", 8 * MiB, seed=4)
    vsphere.make_vm("app-ir", [img])
    vc.json("backup", f"vmware://{HV}/app-ir")
    vsphere.add_nfs_export(mounted.path)  # what the export at 127.0.0.1:/vmrecover serves, for vcsim
    start = ["--to", f"vmware://{HV}", "--host", "DC0_C0_H0", "--datastore-name", "vmrecover-test"]

    doc = vc.json("recover", "start", "app-ir", "--name", "ir2", *start)
    vm2 = doc["published"]["vm"]
    assert "vmrecover-test" in _datastores_of(vsphere)
    vc.json("recover", "stop", "ir2")
    with pytest.raises(Exception, match=r"ManagedObjectNotFound|has already been deleted"):
        vsphere.props(vsphere.obj("VirtualMachine", vm2), "name")
    assert "vmrecover-test" not in _datastores_of(vsphere)

    doc = vc.json("recover", "start", "app-ir", "--name", "ir1", "--power-on", *start)
    pub = doc["published"]
    assert pub["datastore"] == "vmrecover-test" and pub["appliance"] == "127.0.0.1"
    vm = vsphere.obj("VirtualMachine", pub["vm"])
    assert vsphere.props(vm, "runtime.powerState")["runtime.powerState"] == "poweredOn"
    folder = mounted.session_dir("ir1")
    vmx = (folder / "ir1.vmx").read_text()
    assert 'scsi0:0.fileName = "scsi0-0.vmdk"' in vmx and 'displayName = "ir1"' in vmx
    # the VM's disk, as the host reads it from the datastore, is the backup
    assert sha256_file(folder / "scsi0-0-flat.vmdk") == sha256_file(img)
    res = vc.json("recover", "migrate", "ir1", "--to-datastore", "LocalDS_0")
    assert res["datastore"] == "LocalDS_0"
    assert vsphere.props(vm, "runtime.powerState")["runtime.powerState"] == "poweredOn"  # still running
    assert vc.json("recover", "list") == []
    assert "vmrecover-test" not in _datastores_of(vsphere)  # nothing of the appliance is left


def test_files_back_into_the_running_guest(
    vc: Cli, vsphere: Any, guest_image: Path, tmp_path: Path, notify: Any
) -> None:
    """files get --into-vm, and the service's API: a file restored from a point lands in the guest with
    its mode; a wrong guest password and an existing file are clear errors (the password never
    echoed).  Relies on the proxy's guest operations."""
    vm = vsphere.make_vm("guest-files", [guest_image], power_on=True)
    vsphere.set_guest_credentials(vm, "root", "guest-secret")
    vc.json("backup", f"vmware://{HV}/guest-files")
    args = ["files", "get", "guest-files", "/sda2/etc/hostname", "--into-vm", f"vmware://{HV}/guest-files",
            "--guest-user", "root", "--guest-password-stdin", "--guest-dir", "/restored"]  # fmt: skip
    try:
        res = vc.run(*args, "--json", input="wrong\n", check=False)
        assert res.returncode == 8 and "refused the login" in res.stdout
        doc = json.loads(vc.run(*args, "--json", input="guest-secret\n").stdout)
        assert doc["sent"] == [{"guest_path": "/restored/hostname", "kind": "file", "sent": True, "size": 16}]
        landed = vsphere.guest_root(vm) / "restored" / "hostname"
        assert landed.read_text() == "vmrecover-guest\n" and stat.S_IMODE(landed.stat().st_mode) == 0o644
        res = vc.run(*args, "--json", input="guest-secret\n", check=False)
        assert res.returncode == 6 and "--overwrite" in res.stdout
        vc.run(*args, "--overwrite", input="guest-secret\n")

        served = ServedApi(vc, tmp_path, notify)
        try:
            url = "/api/v1/vms/guest-files/points/latest/files/into-vm"
            body = {"paths": ["/sda2/etc/hostname"], "into": f"vmware://{HV}/guest-files",
                    "guest_user": "root", "guest_password": "wrong-secret", "guest_dir": "/api"}  # fmt: skip
            status, doc = served.call("POST", url, body)
            assert status == 403 and "refused the login" in doc["message"], doc
            assert "wrong-secret" not in json.dumps(doc)
            status, doc = served.call("POST", url, body | {"guest_password": "guest-secret"})
            assert status == 200 and doc["sent"][0]["guest_path"] == "/api/hostname", doc
            assert (vsphere.guest_root(vm) / "api" / "hostname").read_text() == "vmrecover-guest\n"
            status, doc = served.call("POST", url, body | {"paths": ["/sda2/../etc/shadow"]})
            assert status == 400 and "invalid guest path" in doc["message"], doc
        finally:
            err = served.stop()
        assert "guest-secret" not in err and "wrong-secret" not in err  # never in the service's log
    finally:
        vc.run("files", "stop", check=False)


# --------------------------------------------------------------------------- bad input and faults
def _snapshots(vsphere: Any, vm: str) -> list[str]:
    info = vsphere.props(vsphere.obj("VirtualMachine", vm), "snapshot").get("snapshot")
    todo, out = list(getattr(info, "rootSnapshotList", None) or []), []
    while todo:
        node = todo.pop()
        out.append(node.name)
        todo.extend(node.childSnapshotList or [])
    return out


def _point_count(cli: Cli, vm: str) -> int:
    res = cli.run("list", vm, "--json", check=False)
    return len(res.json()["points"]) if res.returncode == 0 else 0


def test_wrong_password_and_untrusted_certificate(cli: Cli, vsphere: Any) -> None:
    """Must survive: nothing is stored for a hypervisor whose login or certificate failed."""
    res = cli.run("hypervisor", "add", HV, vsphere.vmware_url, "--ca-file", vsphere.ca_file,
                  "--password-stdin", input="not-the-password\n", check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.AUTH, "refused the login of user administrator@vsphere.local")
    assert "not-the-password" not in res.stdout + res.stderr
    res = cli.run("hypervisor", "add", HV, vsphere.vmware_url, "--password-stdin",
                  input=vsphere.password + "\n", check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.CERTIFICATE, "not trusted", "fingerprint")
    assert cli.json("hypervisor", "list")["hypervisors"] == []


def test_unknown_vm_is_not_found_and_touches_nothing(vc: Cli, vsphere: Any) -> None:
    res = vc.run("backup", f"vmware://{HV}/no-such-vm", check=False)
    assert_clean_error(res, ExitCode.NOT_FOUND, "no VM named 'no-such-vm' on hypervisor vc1")


def test_someone_elses_snapshot_is_never_touched_and_ours_are_cleaned_up(
    vc: Cli, vsphere: Any, tmp_path: Path
) -> None:
    """Must survive: the VM's own snapshot, and a vmrecover snapshot whose maker may still run (another
    appliance's); one an interrupted backup of this repository left (its process gone) is removed."""
    img = disk_image(tmp_path / "s.raw", 4 * MiB, seed=5)
    vm = vsphere.make_vm("snappy", [img])
    obj = vsphere.obj("VirtualMachine", vm)
    repo_id = tomllib.loads((vc.repo / "repo.toml").read_text())["repository"]["id"]
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    def snap(name: str, owner: dict[str, Any]) -> None:
        desc = f"made by vmrecover; owner={json.dumps(owner)}"
        vsphere.wait(obj.CreateSnapshot_Task(name=name, description=desc, memory=False, quiesce=False))

    vsphere.wait(obj.CreateSnapshot_Task(name="before-upgrade", memory=False, quiesce=False))
    crashed = {"repo": repo_id, "host": socket.gethostname(), "pid": 2**22 + 7, "boot": boot}
    snap("vmrecover-deadbeef", crashed)  # ours, its process gone
    snap("vmrecover-0ther001", {**crashed, "host": "other-appliance"})  # another appliance's, maybe running
    vc.json("backup", f"vmware://{HV}/snappy")
    assert sorted(_snapshots(vsphere, vm)) == ["before-upgrade", "vmrecover-0ther001"]
    assert restored_sha(vc, "snappy", "scsi0-0", tmp_path) == sha256_file(img)


def test_grown_disk_and_rejected_change_id_are_read_whole(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """A disk that grew, and a changeId the host no longer accepts (the proxy's FileFault): that disk is
    read whole and the output says why; every point restores byte for byte."""
    a, b = disk_image(tmp_path / "a.raw", 4 * MiB, seed=6), disk_image(tmp_path / "b.raw", 4 * MiB, seed=7)
    vm = vsphere.make_vm("grower", [a, b], cbt=True)
    vc.json("backup", f"vmware://{HV}/grower")
    disk0 = vsphere.obj("VirtualMachine", vm)
    flat1 = vsphere.disk_file(vm, 1)
    with open(flat1, "r+b") as f:  # disk 1 grows to 6 MiB (its descriptor and the VM say so too)
        f.truncate(6 * MiB)
        f.seek(5 * MiB)
        f.write(b"grown" * 1000)
    from pyVmomi import vim

    dev = next(d for d in vsphere.props(disk0, "config.hardware.device")["config.hardware.device"]
               if isinstance(d, vim.vm.device.VirtualDisk) and d.unitNumber == 1)  # fmt: skip
    dev.capacityInKB, dev.capacityInBytes = 6 * 1024, 6 * MiB
    vsphere.wait(disk0.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[
        vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev)])))  # fmt: skip
    desc = vsphere.disk_descriptor(vm, 1)
    desc.write_text(desc.read_text().replace(f"RW {4 * MiB // 512} ", f"RW {6 * MiB // 512} "))
    doc = vc.json("backup", f"vmware://{HV}/grower")
    why = {d["name"]: d["read_whole"] for d in doc["disks"]}
    assert why == {"scsi0-0": None, "scsi0-1": "the disk's size changed"}, why
    assert restored_sha(vc, "grower", "scsi0-1", tmp_path) == sha256_file(flat1)
    vsphere.proxy.tracker.reject_all = True
    doc = vc.json("backup", f"vmware://{HV}/grower")
    assert all("no longer accepts its changeId" in d["read_whole"] for d in doc["disks"]), doc["disks"]
    assert restored_sha(vc, "grower", "scsi0-0", tmp_path) == sha256_file(a)
    assert _snapshots(vsphere, vm) == []


def test_dropped_connections_are_retried_then_fail_cleanly(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """A /folder read dropped mid-body, or answered with another range than the one asked for (a whole
    206 of the right length: only its Content-Range tells), is retried; one that keeps dropping fails
    the backup cleanly: exit 10, no point, the snapshot removed, nothing left for gc but what gc
    removes."""
    img = disk_image(tmp_path / "c.raw", 8 * MiB, seed=8)
    vm = vsphere.make_vm("flaky", [img])
    vsphere.proxy.drop_folder_gets(10_000, times=2)
    vsphere.proxy.misrange_folder_gets(times=2)
    vc.json("backup", f"vmware://{HV}/flaky")
    assert len(vsphere.answered("folder-misrange")) == 2
    assert restored_sha(vc, "flaky", "scsi0-0", tmp_path) == sha256_file(img)
    with open(vsphere.disk_file(vm, 0), "r+b") as f:
        f.write(b"changed" * 100)
    vsphere.proxy.drop_folder_gets(1000, times=1000)
    res = vc.run("backup", f"vmware://{HV}/flaky", "--full", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "failed 6 times")
    vsphere.proxy.reset_faults()
    assert _point_count(vc, "flaky") == 1 and _snapshots(vsphere, vm) == []
    vc.json("gc")
    assert vc.run("verify", check=False).returncode == 0


def test_sigterm_in_the_middle_removes_the_snapshot_and_keeps_no_point(
    vc: Cli, vsphere: Any, tmp_path: Path
) -> None:
    img = disk_image(tmp_path / "t.raw", 16 * MiB, seed=9)
    vm = vsphere.make_vm("termed", [img])
    vsphere.proxy.delays["/folder"] = 0.2  # every disk read is slow: the backup is caught reading
    proc = vc.popen("backup", f"vmware://{HV}/termed", "--json")
    deadline = time.monotonic() + 60
    while not vsphere.proxy.folder_bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    while "vmrecover-" not in " ".join(_snapshots(vsphere, vm)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert vsphere.proxy.folder_bytes, "the backup was not reading the disk when it was stopped"
    assert _snapshots(vsphere, vm) == [] and _point_count(vc, "termed") == 0


def test_nfs_datastore_name_clash_is_refused_and_leaves_nothing(
    vc: Cli, vsphere: Any, mounted: Any, port111: Any, tmp_path: Path
) -> None:
    vsphere.make_vm("clash", [disk_image(tmp_path / "x.raw", 2 * MiB, seed=10)])
    vc.json("backup", f"vmware://{HV}/clash")
    vsphere.add_nfs_export(mounted.path)
    res = vc.run("recover", "start", "clash", "--to", f"vmware://{HV}", "--host", "DC0_C0_H0",
                 "--datastore-name", "LocalDS_1", check=False)  # fmt: skip
    assert_clean_error(
        res, ExitCode.BAD_INPUT, "already has a datastore named 'LocalDS_1'", "--datastore-name"
    )
    assert vc.json("recover", "list") == [] and list((vc.repo / "sessions").iterdir()) == []


def test_vm_with_disks_on_several_datastores(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """Relies on the proxy's relocation moving one disk's files."""
    a, b = disk_image(tmp_path / "a.raw", 4 * MiB, seed=11), disk_image(tmp_path / "b.raw", 2 * MiB, seed=12)
    vm = vsphere.make_vm("spread", [a, b])
    from pyVmomi import vim

    obj = vsphere.obj("VirtualMachine", vm)
    ds1 = vsphere.find("Datastore", "LocalDS_1")
    disk1 = sorted((d for d in vsphere.props(obj, "config.hardware.device")["config.hardware.device"]
                    if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.unitNumber)[1]  # fmt: skip
    vsphere.wait(obj.RelocateVM_Task(spec=vim.vm.RelocateSpec(
        disk=[vim.vm.RelocateSpec.DiskLocator(diskId=disk1.key, datastore=ds1)])))  # fmt: skip
    assert vsphere.disk_path(vm, 1).startswith("[LocalDS_1]") and vsphere.disk_path(vm, 0).startswith(
        "[LocalDS_0]"
    )
    vc.json("backup", f"vmware://{HV}/spread")
    (point,) = vc.json("list", "spread")["points"]
    assert {d["datastore"] for d in point["config"]["hardware"]["disks"]} == {"LocalDS_0", "LocalDS_1"}
    assert restored_sha(vc, "spread", "scsi0-0", tmp_path) == sha256_file(a)
    assert restored_sha(vc, "spread", "scsi0-1", tmp_path) == sha256_file(b)


def test_passwords_never_reach_logs_argv_or_other_users(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """Debug logs of a whole backup (JSON and text) hold no password; the registry is 0600."""
    vsphere.make_vm("secretive", [disk_image(tmp_path / "p.raw", 2 * MiB, seed=13)])
    for fmt in ("json", "text"):
        logged = Cli(vc.repo, env={"VMRECOVER_LOG_FORMAT": fmt})
        res = logged.run("backup", f"vmware://{HV}/secretive", "--log-level", "debug")
        assert vsphere.password not in res.stderr + res.stdout
        assert "logged in to vc1" in res.stderr  # the debug log did run
    assert oct((vc.repo / "hypervisors.toml").stat().st_mode & 0o777) == "0o600"


def test_a_second_backup_never_removes_the_snapshot_a_running_one_reads(
    vc: Cli, vsphere: Any, tmp_path: Path
) -> None:
    """Found in review: the second backup removed 'stale' snapshots before taking the repository's lock,
    so it deleted the one the first was reading.  Must survive: the first backup's snapshot and point."""
    img = disk_image(tmp_path / "k.raw", 8 * MiB, seed=14)
    vm = vsphere.make_vm("overlap", [img])
    vsphere.proxy.delays["/folder"] = 3.0  # the first backup still reads (few requests) when the second runs
    first = vc.popen("backup", f"vmware://{HV}/overlap", "--json")
    deadline = time.monotonic() + 60
    while (
        not any(n.startswith("vmrecover-") for n in _snapshots(vsphere, vm)) and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    ours = _snapshots(vsphere, vm)
    res = vc.run("backup", f"vmware://{HV}/overlap", "--no-wait", check=False)
    assert_clean_error(res, ExitCode.LOCKED, "locked by backup of overlap")
    assert _snapshots(vsphere, vm) == ours  # untouched
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert restored_sha(vc, "overlap", "scsi0-0", tmp_path) == sha256_file(img)


def test_independent_disks_are_left_out_and_said_so(vc: Cli, vsphere: Any, tmp_path: Path) -> None:
    """A snapshot does not freeze an independent disk: it is not backed up (as VADP products do)."""
    from pyVmomi import vim

    a, b = disk_image(tmp_path / "a.raw", 2 * MiB, seed=15), disk_image(tmp_path / "b.raw", 2 * MiB, seed=16)
    vm = vsphere.make_vm("indep", [a, b])
    obj = vsphere.obj("VirtualMachine", vm)
    dev = sorted((d for d in vsphere.props(obj, "config.hardware.device")["config.hardware.device"]
                  if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.unitNumber)[1]  # fmt: skip
    dev.backing.diskMode = "independent_persistent"
    vsphere.wait(obj.ReconfigVM_Task(spec=vim.vm.ConfigSpec(
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=dev)])))  # fmt: skip
    res = vc.run("backup", f"vmware://{HV}/indep", "--json")
    assert "scsi0-1 of indep is independent_persistent" in res.stderr
    assert [d["name"] for d in res.json()["disks"]] == ["scsi0-0"]
    (point,) = vc.json("list", "indep")["points"]
    assert "scsi0-1" in point["config"]["skipped_disks"]


def test_recover_stop_when_the_vm_is_gone_or_the_hypervisor_unreachable(
    vc: Cli, vsphere: Any, mounted: Any, port111: Any, tmp_path: Path
) -> None:
    """Must survive: the user's way out.  A VM someone already unregistered: stop still cleans up.  A
    hypervisor that cannot be reached: stop says so and names what is left; --force drops the session."""
    vsphere.make_vm("gone", [disk_image(tmp_path / "g.raw", 2 * MiB, seed=17)])
    vc.json("backup", f"vmware://{HV}/gone")
    vsphere.add_nfs_export(mounted.path)
    start = ["--to", f"vmware://{HV}", "--host", "DC0_C0_H0", "--datastore-name", "vmrecover-gone"]
    vm = vc.json("recover", "start", "gone", "--name", "g1", *start)["published"]["vm"]
    vsphere.obj("VirtualMachine", vm).UnregisterVM()  # someone did it in vSphere
    vc.json("recover", "stop", "g1")
    assert vc.json("recover", "list") == [] and "vmrecover-gone" not in _datastores_of(vsphere)
    vc.json("recover", "start", "gone", "--name", "g2", *start)
    vc.run("hypervisor", "remove", HV)  # as good as unreachable
    res = vc.run("recover", "stop", "g2", check=False)
    assert_clean_error(res, ExitCode.NOT_FOUND, "cannot undo session g2", "--force")
    assert [s["name"] for s in vc.json("recover", "list")] == ["g2"]
    res = vc.run("recover", "stop", "g2", "--force")
    assert "left on the hypervisor" in res.stderr and vc.json("recover", "list") == []
    assert exports.running(vc.repo) is None  # the NFS export went with the last session
    # what --force said is left is left; the administrator removes it (as this test must: the datastore
    # of the export would clash with later tests' datastores of the same export)
    assert "vmrecover-gone" in _datastores_of(vsphere)
    vm2 = list(vsphere.props(vsphere.find("Datastore", "vmrecover-gone"), "vm")["vm"])
    assert len(vm2) == 1
    vm2[0].UnregisterVM()
    h = vsphere.find("HostSystem", "DC0_C0_H0")
    dss = vsphere.props(h, "configManager.datastoreSystem")["configManager.datastoreSystem"]
    dss.RemoveDatastore(datastore=vsphere.find("Datastore", "vmrecover-gone"))
    assert "vmrecover-gone" not in _datastores_of(vsphere)
