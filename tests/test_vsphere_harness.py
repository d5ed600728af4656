"""The vSphere test peer itself (tests/vsphere/): vcsim behind our HTTPS/SOAP proxy, driven with pyvmomi
exactly as the product drives a vCenter.

Calls the proxy answers itself (vcsim 0.24 lacks them), each checked here against the real files:
QueryChangedDiskAreas and the changeIds in disk backings, RemoveDatastore/DestroyDatastore,
CreateNasDatastore (with a real ``vmrecover mount`` + ``nfs serve`` behind it), guest file transfer and
the other guest operations, RelocateVM_Task's file copy, RegisterVM_Task's .vmx disks.  Everything
else (inventory, CreateVM, snapshots, power, /folder) is vcsim's own answer, passed through.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cli, MiB, make_sparse_image, sha256_file
from tests.vsphere.harness import pyvmomi_connect

pyVmomi = pytest.importorskip("pyVmomi", reason="needs pyvmomi (make setup)")
from pyVmomi import vim, vmodl  # noqa: E402

KiB = 1024


def https(
    vs: Any, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict, bytes]:
    """One request to the proxy, certificate verified against the harness's CA."""
    ctx = ssl.create_default_context(cafile=str(vs.ca_file))
    conn = http.client.HTTPSConnection(vs.host, vs.port, context=ctx, timeout=60)
    try:
        conn.request(method, path, body, headers)
        with conn.getresponse() as r:
            return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def folder_url(path: str, ds: str = "LocalDS_0") -> str:
    return f"/folder/{urllib.parse.quote(path)}?" + urllib.parse.urlencode({"dcPath": "DC0", "dsName": ds})


def disk_device(vs: Any, obj: Any, key: int | None = None) -> Any:
    devices = vs.props(obj, "config")["config"].hardware.device
    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    return next(d for d in disks if key is None or d.key == key)


def changed_areas(vm: Any, snap: Any, key: int, change_id: str, capacity: int) -> list[tuple[int, int]]:
    """The client loop ESXi expects: until startOffset + length reaches the capacity."""
    areas, start, calls = [], 0, 0
    while start < capacity:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=start, changeId=change_id)
        assert info.startOffset == start
        areas += [(a.start, a.length) for a in info.changedArea]
        start, calls = info.startOffset + info.length, calls + 1
    return areas


def allocated(path: Path) -> list[tuple[int, int]]:
    from tests.vsphere.cbt import data_extents

    fd = os.open(path, os.O_RDONLY)
    try:
        return data_extents(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- connection and inventory
def failed_connect(connect: Any) -> Exception:
    """The exception a pyvmomi connection raises."""
    try:
        pyvmomi_connect(connect)
    except Exception as e:
        return e
    raise AssertionError("connected")


def test_connects_over_verified_https_with_its_own_ca_and_login(vsphere: Any) -> None:
    from pyVim.connect import Disconnect, SmartConnect

    ctx = ssl.create_default_context(cafile=str(vsphere.ca_file))
    si = pyvmomi_connect(
        lambda: SmartConnect(
            host=vsphere.host, port=vsphere.port, user=vsphere.user, pwd=vsphere.password, sslContext=ctx
        )
    )
    content = si.RetrieveContent()
    assert content.about.apiType == "VirtualCenter"
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.HostSystem], True)
    assert {h.name for h in view.view} >= {"DC0_H0", "DC0_C0_H0", "DC0_C0_H1"}
    assert {"LocalDS_0", "LocalDS_1"} <= {
        vsphere.props(d, "name")["name"] for d in content.rootFolder.childEntity[0].datastore
    }

    view.DestroyView()
    pyvmomi_connect(lambda: Disconnect(si))

    system_cas = ssl.create_default_context(cafile=ssl.get_default_verify_paths().cafile)
    err = failed_connect(
        lambda: SmartConnect(
            host=vsphere.host,
            port=vsphere.port,
            user=vsphere.user,
            pwd=vsphere.password,
            sslContext=system_cas,
        )
    )
    assert isinstance(err, ssl.SSLCertVerificationError)  # the system's CAs do not know ours
    assert isinstance(
        failed_connect(lambda: vsphere.connect(password=vsphere.password + "x")), vim.fault.InvalidLogin
    )
    # a call the proxy answers itself still needs a session, as everywhere
    status, _, body = https(
        vsphere,
        "POST",
        "/sdk",
        b'<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
        b'<soapenv:Body><QueryChangedDiskAreas xmlns="urn:vim25"><_this type="VirtualMachine">vm-1</_this>'
        b"<deviceKey>2000</deviceKey><startOffset>0</startOffset><changeId>*</changeId></QueryChangedDiskAreas>"
        b"</soapenv:Body></soapenv:Envelope>",
        **{"Content-Type": "text/xml"},
    )
    assert status == 500 and b"NotAuthenticated" in body


def test_make_vm_lays_disks_out_as_esxi_and_folder_serves_them(vsphere: Any, tmp_path: Path) -> None:
    img = make_sparse_image(tmp_path / "d0.raw", 8 * MiB, [(MiB, os.urandom(300 * KiB)), (7 * MiB, b"end")])
    vm = vsphere.make_vm("layout-vm", [img, 2 * MiB], datastore="LocalDS_1")
    assert vm.startswith("vm-")
    desc = vsphere.disk_descriptor(vm, 0)
    assert desc == vsphere.datastore_dir("LocalDS_1") / "layout-vm" / "layout-vm.vmdk"
    assert 'RW 16384 VMFS "layout-vm-flat.vmdk"' in desc.read_text()
    flat = vsphere.disk_file(vm, 0)
    assert flat.name == "layout-vm-flat.vmdk" and sha256_file(flat) == sha256_file(img)
    assert os.stat(flat).st_blocks * 512 < 2 * MiB  # sparse where the image is
    assert vsphere.disk_file(vm, 1).name == "layout-vm_1-flat.vmdk"
    assert os.path.getsize(vsphere.disk_file(vm, 1)) == 2 * MiB
    dev = disk_device(vsphere, vsphere.obj("VirtualMachine", vm))
    assert dev.capacityInBytes == 8 * MiB and dev.backing.fileName == "[LocalDS_1] layout-vm/layout-vm.vmdk"
    assert dev.backing.changeId is None  # CBT off: no changeId, as on ESXi

    # /folder: Range GET answered 206 with exactly those bytes, PUT writes into the datastore folder
    status, headers, body = https(
        vsphere,
        "GET",
        folder_url("layout-vm/layout-vm-flat.vmdk", "LocalDS_1"),
        Range=f"bytes={MiB}-{MiB + 99}",
    )
    assert status == 206 and body == img.read_bytes()[MiB : MiB + 100]
    assert headers["Content-Range"] == f"bytes {MiB}-{MiB + 99}/{8 * MiB}"
    status, _, _ = https(vsphere, "PUT", folder_url("layout-vm/note.txt", "LocalDS_1"), b"hello")
    assert (
        status == 200 and (vsphere.datastore_dir("LocalDS_1") / "layout-vm/note.txt").read_bytes() == b"hello"
    )
    assert vsphere.proxy.folder_bytes["GET /folder/layout-vm/layout-vm-flat.vmdk"] >= 100


# --------------------------------------------------------------------------- changed block tracking
def test_cbt_change_ids_and_query_changed_disk_areas_follow_the_disk_file(
    vsphere: Any, tmp_path: Path
) -> None:
    img = make_sparse_image(
        tmp_path / "d.raw", 16 * MiB, [(0, os.urandom(100 * KiB)), (9 * MiB, os.urandom(MiB))]
    )
    vm_id = vsphere.make_vm("cbt-vm", [img])
    vm = vsphere.obj("VirtualMachine", vm_id)
    vsphere.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    assert vsphere.props(vm, "config.changeTrackingEnabled")["config.changeTrackingEnabled"] is True
    snap1 = vsphere.wait(vm.CreateSnapshot_Task(name="b1", description="", memory=False, quiesce=False))
    dev = disk_device(vsphere, snap1)
    cid1, key = dev.backing.changeId, dev.key
    assert cid1 and "/" in cid1
    assert disk_device(vsphere, vm, key).backing.changeId == cid1  # same content, same id
    flat = vsphere.disk_file(vm_id, 0)

    # '*': the allocated areas of the flat file, in pieces of cbt_piece bytes
    vsphere.proxy.cbt_piece = 4 * MiB
    assert changed_areas(vm, snap1, key, "*", 16 * MiB) == allocated(flat)
    pieces = vsphere.answered("QueryChangedDiskAreas", vm=vm_id, change_id="*")
    assert [e["start"] for e in pieces][-4:] == [0, 4 * MiB, 8 * MiB, 12 * MiB] and pieces[-1]["disk"] == str(
        flat
    )
    vsphere.wait(snap1.RemoveSnapshot_Task(removeChildren=False))

    # write into the disk between two backups: exactly the touched 64 KiB blocks come back
    with open(flat, "r+b") as f:
        f.seek(3 * MiB + 10)
        f.write(b"x" * 100)
        f.seek(9 * MiB + 64 * KiB)
        f.write(os.urandom(128 * KiB))
        f.seek(15 * MiB + 60 * KiB)  # across a block boundary: two blocks
        f.write(b"y" * 8 * KiB)
    snap2 = vsphere.wait(vm.CreateSnapshot_Task(name="b2", description="", memory=False, quiesce=False))
    cid2 = disk_device(vsphere, snap2, key).backing.changeId
    assert cid2 != cid1
    expected = [(3 * MiB, 64 * KiB), (9 * MiB + 64 * KiB, 128 * KiB), (15 * MiB, 128 * KiB)]
    assert changed_areas(vm, snap2, key, cid1, 16 * MiB) == expected
    assert changed_areas(vm, snap2, key, cid2, 16 * MiB) == []

    # ESXi's faults: startOffset at the end, a malformed id, an unknown one, every id rejected
    with pytest.raises(vmodl.fault.InvalidArgument) as e:
        vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=key, startOffset=16 * MiB, changeId=cid1)
    assert e.value.invalidProperty == "startOffset"
    with pytest.raises(vmodl.fault.InvalidArgument) as e:
        vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=key, startOffset=0, changeId="bogus")
    assert e.value.invalidProperty == "changeId"
    with pytest.raises(vim.fault.FileFault) as ef:
        vm.QueryChangedDiskAreas(
            snapshot=snap2, deviceKey=key, startOffset=0, changeId=cid1.split("/")[0] + "/99"
        )
    assert ef.value.file == "[LocalDS_0] cbt-vm/cbt-vm.vmdk"
    vsphere.proxy.tracker.reject_all = True
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap2, deviceKey=key, startOffset=0, changeId=cid2)
    assert changed_areas(vm, snap2, key, "*", 16 * MiB)  # '*' still answers
    vsphere.proxy.tracker.reject_all = False
    assert vsphere.answered("QueryChangedDiskAreas", vm=vm_id, change_id=cid2, fault="FileFault")

    # turning CBT off drops the ids (ESXi starts a new epoch) and the backings lose their changeId
    vsphere.wait(snap2.RemoveSnapshot_Task(removeChildren=False))
    vsphere.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=False)))
    assert disk_device(vsphere, vm, key).backing.changeId is None
    vsphere.wait(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(deviceKey=key, startOffset=0, changeId=cid2)
    assert disk_device(vsphere, vm, key).backing.changeId.split("/")[0] != cid2.split("/")[0]


def test_folder_get_can_be_dropped_midway_and_calls_delayed(vsphere: Any, tmp_path: Path) -> None:
    vm = vsphere.make_vm(
        "drop-vm", [make_sparse_image(tmp_path / "d.raw", 4 * MiB, [(0, os.urandom(3 * MiB))])]
    )
    path = folder_url("drop-vm/drop-vm-flat.vmdk")
    vsphere.proxy.drop_folder_gets(100_000)
    with pytest.raises(http.client.IncompleteRead) as e:
        https(vsphere, "GET", path)
    assert len(e.value.partial) == 100_000
    assert vsphere.answered("folder-drop", after=100_000)
    status, _, body = https(vsphere, "GET", path)  # only the next one was dropped
    assert status == 200 and hashlib.sha256(body).hexdigest() == sha256_file(vsphere.disk_file(vm, 0))

    import time

    vsphere.proxy.delays["CurrentTime"] = 0.5
    t = time.monotonic()
    vsphere.si.CurrentTime()
    assert time.monotonic() - t >= 0.5


# --------------------------------------------------------------------------- datastores
def test_remove_datastore_hides_it_everywhere_and_refuses_while_in_use(vsphere: Any, tmp_path: Path) -> None:
    folder = tmp_path / "Scratch_rm"
    folder.mkdir()
    host = vsphere.find("HostSystem", "DC0_H0")
    dss = vsphere.props(host, "configManager.datastoreSystem")["configManager.datastoreSystem"]
    ds = dss.CreateLocalDatastore(name="Scratch_rm", path=str(folder))
    assert ds in vsphere.props(host, "datastore")["datastore"]
    vm = vsphere.make_vm("on-scratch", [MiB], datastore="Scratch_rm", host="DC0_H0")
    with pytest.raises(vim.fault.ResourceInUse):
        dss.RemoveDatastore(datastore=ds)
    vsphere.obj("VirtualMachine", vm).UnregisterVM()

    dss.RemoveDatastore(datastore=ds)
    assert vsphere.answered("RemoveDatastore", name="Scratch_rm")
    assert ds not in vsphere.props(host, "datastore")["datastore"]
    dc = vsphere.find("Datacenter", "DC0")
    assert "Scratch_rm" not in {
        vsphere.props(d, "name")["name"] for d in vsphere.props(dc, "datastore")["datastore"]
    }
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):
        vsphere.props(ds, "name")
    assert https(vsphere, "GET", folder_url("on-scratch/on-scratch.vmx", "Scratch_rm"))[0] == 404
    assert (folder / "on-scratch" / "on-scratch-flat.vmdk").exists()  # the files stay, as on ESXi
    # the name is free again
    ds2 = dss.CreateLocalDatastore(name="Scratch_rm", path=str(folder))
    ds2.DestroyDatastore()
    assert vsphere.answered("DestroyDatastore", name="Scratch_rm")
    assert ds2 not in vsphere.props(host, "datastore")["datastore"]


def test_relocate_copies_the_vm_files_and_backings_follow(vsphere: Any, tmp_path: Path) -> None:
    img = make_sparse_image(tmp_path / "d.raw", 4 * MiB, [(MiB, os.urandom(64 * KiB))])
    vm_id = vsphere.make_vm("move-vm", [img, MiB], cbt=True, power_on=True)
    vm = vsphere.obj("VirtualMachine", vm_id)
    target = vsphere.find("Datastore", "LocalDS_1")
    vsphere.wait(vm.RelocateVM_Task(spec=vim.vm.RelocateSpec(datastore=target)))

    new = vsphere.datastore_dir("LocalDS_1") / "move-vm"
    assert {"move-vm.vmx", "move-vm.nvram", "vmware.log", "move-vm.vmdk", "move-vm-flat.vmdk"} <= {
        p.name for p in new.iterdir()
    }
    assert sha256_file(new / "move-vm-flat.vmdk") == sha256_file(img)
    assert os.stat(new / "move-vm-flat.vmdk").st_blocks * 512 <= 256 * KiB  # still sparse
    assert vsphere.disk_file(vm_id, 0) == new / "move-vm-flat.vmdk"
    assert vsphere.disk_path(vm_id, 1) == "[LocalDS_1] move-vm/move-vm_1.vmdk"
    p = vsphere.props(vm, "config.files.vmPathName", "datastore", "runtime.powerState")
    assert p["config.files.vmPathName"] == "[LocalDS_1] move-vm/move-vm.vmx"
    assert p["datastore"] == [target] and p["runtime.powerState"] == "poweredOn"
    assert disk_device(vsphere, vm).backing.datastore == target
    assert disk_device(vsphere, vm).backing.changeId  # CBT goes on, on the new file
    assert vsphere.answered("RelocateVM_Task", vm=vm_id)


# --------------------------------------------------------------------------- guest operations
def test_guest_file_transfer_through_star_urls_with_guest_credentials(vsphere: Any) -> None:
    vm_id = vsphere.make_vm("guest-vm", [MiB], power_on=True)
    vm = vsphere.obj("VirtualMachine", vm_id)
    gom = vsphere.si.content.guestOperationsManager
    fm = gom.fileManager
    vsphere.set_guest_credentials(vm_id, "root", "guest-secret")
    bad = vim.vm.guest.NamePasswordAuthentication(username="root", password="nope")
    auth = vim.vm.guest.NamePasswordAuthentication(username="root", password="guest-secret")
    attrs = vim.vm.guest.FileManager.PosixFileAttributes(permissions=0o640)
    with pytest.raises(vim.fault.InvalidGuestLogin):
        fm.InitiateFileTransferToGuest(vm, bad, "/etc/motd", attrs, 5, True)

    fm.MakeDirectoryInGuest(vm, auth, "/etc/app", createParentDirectories=True)
    url = fm.InitiateFileTransferToGuest(vm, auth, "/etc/app/conf", attrs, 5, False)
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "https" and parts.hostname == "*" and parts.path == "/guestFile"
    assert parts.port == 443  # as ESXi says it: the client puts the host:port it talks to in place of '*:443'
    status, _, _ = https(vsphere, "PUT", f"{parts.path}?{parts.query}", b"hello")
    assert status == 200
    f = vsphere.guest_root(vm_id) / "etc/app/conf"
    assert f.read_bytes() == b"hello" and f.stat().st_mode & 0o7777 == 0o640
    assert https(vsphere, "PUT", f"{parts.path}?{parts.query}", b"again")[0] == 403  # one use per URL

    with pytest.raises(vim.fault.FileAlreadyExists):
        fm.InitiateFileTransferToGuest(vm, auth, "/etc/app/conf", attrs, 5, False)
    with pytest.raises(vim.fault.FileNotFound):
        fm.InitiateFileTransferToGuest(vm, auth, "/no/such/dir/x", attrs, 5, True)
    listing = fm.ListFilesInGuest(vm, auth, "/etc/app")
    assert [(x.path, x.type, x.size) for x in listing.files] == [("conf", "file", 5)]
    assert listing.files[0].attributes.permissions == 0o640
    assert [e["path"] for e in vsphere.answered("guestFile PUT", vm=vm_id)] == ["/etc/app/conf"]

    vsphere.wait(vm.PowerOffVM_Task())
    with pytest.raises(vim.fault.GuestOperationsUnavailable):
        fm.InitiateFileTransferToGuest(vm, auth, "/etc/x", attrs, 1, True)


# --------------------------------------------------------------------------- NFS datastore from the appliance
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_nas_datastore_is_the_appliance_export_and_registers_a_recovered_vm(
    vsphere: Any, cli: Cli, mounted: Any, nfs_server: Any, tmp_path: Path
) -> None:
    img = make_sparse_image(
        tmp_path / "disk0.raw", 4 * MiB, [(0, b"boot" * 1000), (2 * MiB, os.urandom(4096))]
    )
    cli.run("backup", img, "--vm", "nasvm")
    cli.run("recover", "start", "nasvm", "--name", "s1")
    server = nfs_server()
    vsphere.add_nfs_export(mounted.path, nfs_port=server.port, mount_port=server.mount_port)
    host = vsphere.find("HostSystem", "DC0_C0_H1")
    dss = vsphere.props(host, "configManager.datastoreSystem")["configManager.datastoreSystem"]

    # an export nobody serves fails like an ESXi NFS mount does
    spec = vim.host.NasVolume.Specification(
        remoteHost="127.0.0.1",
        remotePath="/nothing-here",
        localPath="vmrecover-bad",
        accessMode="readWrite",
        type="NFS",
    )
    with pytest.raises(vim.fault.PlatformConfigFault):
        dss.CreateNasDatastore(spec)

    spec.remotePath, spec.localPath = "/vmrecover", "vmrecover-nas"
    ds = dss.CreateNasDatastore(spec)
    assert vsphere.props(ds, "name")["name"] == "vmrecover-nas"
    assert [m.key for m in vsphere.props(ds, "host")["host"]] == [host]
    assert ds in vsphere.props(host, "datastore")["datastore"]
    # the same export under the same name from a second host is the same datastore, as in vCenter
    host2 = vsphere.find("HostSystem", "DC0_C0_H0")
    dss2 = vsphere.props(host2, "configManager.datastoreSystem")["configManager.datastoreSystem"]
    assert dss2.CreateNasDatastore(spec) == ds
    assert {m.key for m in vsphere.props(ds, "host")["host"]} == {host, host2}
    with pytest.raises(vim.fault.DuplicateName):
        dss2.CreateNasDatastore(spec)
    assert vsphere.answered("CreateNasDatastore", name="vmrecover-nas", mounted=True)
    session = vsphere.datastore_dir("vmrecover-nas") / "recover" / "s1"
    assert sha256_file(session / "disk0.raw") == sha256_file(img)

    # the product writes a .vmx into the session folder over /folder, then registers it
    vmx = (
        '.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "13"\n'
        'displayName = "nasvm-recovered"\n'
        'memsize = "512"\nnumvcpus = "2"\nscsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\n'
        'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "disk0.vmdk"\n'
    )
    status, _, _ = https(vsphere, "PUT", folder_url("recover/s1/nasvm.vmx", "vmrecover-nas"), vmx.encode())
    assert status == 200 and (mounted.session_dir("s1") / "nasvm.vmx").read_text() == vmx
    dc = vsphere.find("Datacenter", "DC0")
    folder = vsphere.props(dc, "vmFolder")["vmFolder"]
    pool = vsphere.props(vsphere.props(host, "parent")["parent"], "resourcePool")["resourcePool"]
    vm = vsphere.wait(
        folder.RegisterVM_Task(
            path="[vmrecover-nas] recover/s1/nasvm.vmx",
            name="nasvm-recovered",
            asTemplate=False,
            pool=pool,
            host=host,
        )
    )
    assert vsphere.disk_path(vm._moId, 0) == "[vmrecover-nas] recover/s1/disk0.vmdk"
    assert vsphere.disk_file(vm._moId, 0) == session / "disk0-flat.vmdk"
    assert vsphere.props(vm, "config.hardware.memoryMB")["config.hardware.memoryMB"] == 512
    vsphere.wait(vm.PowerOnVM_Task())
    with pytest.raises(vim.fault.ResourceInUse):
        dss.RemoveDatastore(datastore=ds)

    # migrate: the running VM moves off the appliance, the datastore is free again
    vsphere.wait(
        vm.RelocateVM_Task(spec=vim.vm.RelocateSpec(datastore=vsphere.find("Datastore", "LocalDS_1")))
    )
    moved = vsphere.datastore_dir("LocalDS_1") / "recover" / "s1"
    assert vsphere.disk_file(vm._moId, 0) == moved / "disk0-flat.vmdk"
    assert sha256_file(moved / "disk0-flat.vmdk") == sha256_file(img)
    assert os.stat(moved / "disk0-flat.vmdk").st_blocks * 512 < MiB  # zeros read over FUSE stay holes
    assert (moved / "nasvm.vmx").read_text() == vmx
    dss2.RemoveDatastore(datastore=ds)  # unmounted from that host only (the VM has left it)
    assert [m.key for m in vsphere.props(ds, "host")["host"]] == [host]
    assert ds not in vsphere.props(host2, "datastore")["datastore"]
    dss.RemoveDatastore(datastore=ds)  # the last host: the datastore is gone
    assert vsphere.answered("RemoveDatastore", name="vmrecover-nas", gone=True)
    assert not (vsphere.proxy.nas_dir / "vmrecover-nas").exists()  # the symlink into the mount is gone
    assert {"nasvm.vmx", "nasvm-recovered.nvram", "vmware.log"} <= {
        p.name for p in mounted.session_dir("s1").iterdir()
    }


# --------------------------------------------------------------------------- the SOAP splicing, alone
def test_change_ids_are_spliced_in_wsdl_order_leaving_every_other_byte_alone() -> None:
    from tests.vsphere import soap

    # vcsim's own style: namespaces declared locally under odd prefixes; a delta disk with its parent
    body = (
        b'<Envelope xmlns="http://schemas.xmlsoap.org/soap/envelope/"><Body><R xmlns="urn:vim25"><returnval>'
        b'<objects><obj type="VirtualMachine">vm-9</obj><propSet><name>config.hardware.device</name>'
        b'<val xmlns:XI="http://www.w3.org/2001/XMLSchema-instance" XI:type="ArrayOfVirtualDevice">'
        b'<VirtualDevice XI:type="VirtualDisk"><key>2000</key>'
        b'<backing XI:type="VirtualDiskFlatVer2BackingInfo">'
        b"<fileName>[ds] a/a-000001.vmdk</fileName><diskMode>persistent</diskMode><uuid>u</uuid>"
        b'<parent XI:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds] a/a.vmdk</fileName>'
        b"<digestEnabled>false</digestEnabled></parent><digestEnabled>false</digestEnabled></backing>"
        b'</VirtualDevice><VirtualDevice XI:type="VirtualDisk"><key>2001</key>'
        b'<backing XI:type="VirtualDiskSeSparseBackingInfo"><fileName>[ds] a/b.vmdk</fileName></backing>'
        b'</VirtualDevice><VirtualDevice XI:type="VirtualDisk"><key>2002</key>'
        b'<backing XI:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds] a/c.vmdk</fileName>'
        b"<changeId>kept</changeId></backing></VirtualDevice></val></propSet></objects></returnval></R></Body>"
        b"</Envelope>"
    )
    found = soap.find_backings(body)
    assert [(b.file_name, b.obj) for b in found] == [
        ("[ds] a/a-000001.vmdk", ("VirtualMachine", "vm-9")),
        ("[ds] a/b.vmdk", ("VirtualMachine", "vm-9")),
    ]
    out = soap.insert_change_ids(body, [(b.insert_at, f"id{i}/1") for i, b in enumerate(found)])
    assert out.replace(b"<changeId>id0/1</changeId>", b"").replace(b"<changeId>id1/1</changeId>", b"") == body
    assert b"<uuid>u</uuid><changeId>id0/1</changeId><parent " in out  # before parent, as the WSDL orders
    assert b"<fileName>[ds] a/b.vmdk</fileName><changeId>id1/1</changeId></backing>" in out


# --------------------------------------------------------------------------- ImportVApp
def test_import_vapp_upload_lands_in_the_disk_files(vsphere: Any, tmp_path: Path) -> None:
    img = make_sparse_image(
        tmp_path / "d.raw", 8 * MiB, [(0, os.urandom(200 * KiB)), (5 * MiB, b"tail" * 99)]
    )
    stream = tmp_path / "d.vmdk"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            str(img),
            str(stream),
        ],
        check=True,
    )
    host = vsphere.find("HostSystem", "DC0_C0_H0")
    pool = vsphere.props(vsphere.props(host, "parent")["parent"], "resourcePool")["resourcePool"]
    folder = vsphere.props(vsphere.find("Datacenter", "DC0"), "vmFolder")["vmFolder"]
    disk = vim.vm.device.VirtualDisk(
        key=-1,
        controllerKey=-100,
        unitNumber=0,
        capacityInKB=8 * 1024,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[LocalDS_0]", diskMode="persistent", thinProvisioned=True
        ),
    )
    config = vim.vm.ConfigSpec(
        name="imported",
        guestId="otherLinux64Guest",
        files=vim.vm.FileInfo(vmPathName="[LocalDS_0]"),
        deviceChange=[
            vim.vm.device.VirtualDeviceSpec(
                operation="add",
                device=vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing"),
            ),
            vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk),
        ],
    )
    lease = pool.ImportVApp(spec=vim.vm.VmImportSpec(configSpec=config), folder=folder, host=host)
    assert vsphere.props(lease, "state")["state"] == "ready"
    (url,) = [u.url for u in vsphere.props(lease, "info")["info"].deviceUrl if u.disk]
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "*"  # the client puts its own host:port there
    status, _, _ = https(
        vsphere,
        "PUT",
        f"{parts.path}",
        stream.read_bytes(),
        **{"Content-Type": "application/x-vnd.vmware-streamVmdk", "Cookie": vsphere.si._stub.cookie},
    )
    assert status == 200
    lease.HttpNfcLeaseComplete()
    vm = vsphere.find("VirtualMachine", "imported")
    flat = vsphere.disk_file(vm._moId, 0)
    assert sha256_file(flat) == sha256_file(img)
    assert os.stat(flat).st_blocks * 512 < 2 * MiB  # thin: the holes did not travel and are not written
    assert 'RW 16384 VMFS "imported-flat.vmdk"' in vsphere.disk_descriptor(vm._moId, 0).read_text()
    assert vsphere.answered("nfc upload", vm=vm._moId, stream_optimized=True)
