"""The XAPI simulator (tests/xapi/) driven as the product drives a XenServer: the unmodified XenAPI client
over HTTPS, http.client for the VDI handlers, libnbd with TLS for NBD."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import random
import socket
import ssl
import struct
import time
import tomllib
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import XenAPI

from tests import nfsclient as nc
from tests.conftest import Cli, NfsServer, random_image
from tests.xapi.api import BLOCK, XapiError
from vmrecover.vfs import srlayout

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------- helpers
def image(path: Path, size: int, seed: int) -> Path:
    """A disk image: random 64 KiB blocks here and there, holes elsewhere."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for b in rnd.sample(range(size // BLOCK), size // BLOCK // 4):
            f.seek(b * BLOCK)
            f.write(rnd.randbytes(BLOCK))
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str:
    return sha256(path.read_bytes())


def wait_task(x: Any, task: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (status := x.task.get_status(task)) == "pending":
        assert time.monotonic() < deadline, "task still pending"
        time.sleep(0.01)
    return status


def bits(b64: str) -> set[int]:
    """The blocks set in a list_changed_blocks bitmap (most significant bit of byte 0 = block 0)."""
    raw = base64.b64decode(b64)
    return {i for i in range(len(raw) * 8) if raw[i // 8] & (0x80 >> (i % 8))}


def https(xapi: Any) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context(cafile=str(xapi.ca_file))
    return http.client.HTTPSConnection(xapi.host, xapi.port, context=ctx, timeout=60)


def export(xapi: Any, session: str, vdi: str) -> tuple[int, bytes]:
    conn = https(xapi)
    try:
        conn.request("GET", f"/export_raw_vdi?session_id={session}&vdi={vdi}&format=raw")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def write_blocks(path: Path, blocks: list[int], seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK + 100)
            f.write(rnd.randbytes(300))


def snapshot_disks(xapi: Any, x: Any, snap: str) -> list[str]:
    vbds = [x.VBD.get_record(v) for v in x.VM.get_VBDs(snap)]
    return [v["VDI"] for v in sorted(vbds, key=lambda v: int(v["userdevice"])) if v["type"] == "Disk"]


def nbd_read_all(info: dict[str, Any], tmp_path: Path, *, trust: str | None = None) -> bytes:
    import nbd

    certs = tmp_path / f"nbd-ca-{time.monotonic_ns()}"
    certs.mkdir()
    (certs / "ca-cert.pem").write_text(trust if trust is not None else info["cert"])
    h = nbd.NBD()
    try:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certs))
        h.set_tls_verify_peer(True)
        h.set_export_name(info["exportname"])
        h.connect_tcp(info["address"], info["port"])
        assert h.get_tls_negotiated()
        size = h.get_size()
        out = bytearray()
        while len(out) < size:
            out += h.pread(min(4 * MiB, size - len(out)), len(out))
        h.shutdown()
        return bytes(out)
    finally:
        del h


# ---------------------------------------------------------------------------------------------- protocol
def test_login_wire_format_and_errors(xapi: Any) -> None:
    with pytest.raises(XenAPI.Failure) as e:
        xapi.session(password="wrong")
    assert e.value.details == ["SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure"]

    # the raw answers: always a struct with Status, int64 as strings, refs as OpaqueRef:<uuid>
    ctx = ssl.create_default_context(cafile=str(xapi.ca_file))
    with xmlrpc.client.ServerProxy(xapi.url, context=ctx) as raw:
        login = raw.session.login_with_password(xapi.user, xapi.password, "2.21", "raw")
        assert login["Status"] == "Success"
        sid = login["Value"]
        assert sid.startswith("OpaqueRef:") and len(sid) == len("OpaqueRef:") + 36
        vms = raw.VM.get_all_records(sid)["Value"]
        dom0 = [r for r in vms.values() if r["is_control_domain"]]
        assert len(dom0) == 2 and {d["power_state"] for d in dom0} == {"Running"}  # one per host
        assert isinstance(dom0[0]["memory_static_max"], str) and int(dom0[0]["memory_static_max"]) > 0
        assert raw.VM.get_record(sid, "OpaqueRef:bogus") == {
            "Status": "Failure",
            "ErrorDescription": ["HANDLE_INVALID", "VM", "OpaqueRef:bogus"],
        }
        assert raw.VM.get_by_uuid(sid, "nope")["ErrorDescription"] == ["UUID_INVALID", "VM", "nope"]
        assert raw.VM.frobnicate(sid)["ErrorDescription"] == ["MESSAGE_METHOD_UNKNOWN", "VM.frobnicate"]
        assert raw.VM.get_record(sid)["ErrorDescription"][0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
        assert raw.session.logout(sid)["Status"] == "Success"
        assert raw.VM.get_all(sid)["ErrorDescription"] == ["SESSION_INVALID", sid]

    # the certificate: verified against ca_file; without it the TLS handshake fails
    bad = XenAPI.Session(xapi.url)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            bad.xenapi.login_with_password(xapi.user, xapi.password, "2.21", "t")
    finally:
        bad("close")()


def test_inventory(xapi: Any) -> None:
    with xapi.session() as s:
        x = s.xenapi
        (pool,) = x.pool.get_all()
        host = x.pool.get_master(pool)
        assert x.host.get_record(host)["address"] == "127.0.0.1"
        assert x.host.get_enabled(host) is True
        assert x.session.get_this_host(s.handle) == host
        assert s.API_version == "2.21"
        sr = x.pool.get_default_SR(pool)
        assert x.SR.get_type(sr) == "ext" and x.SR.get_name_label(sr) == "Local storage"
        assert x.SR.get_by_name_label("Local storage") == [sr]
        nets = {r["name_label"]: r for r in x.network.get_all_records().values()}
        assert nets["Pool-wide network associated with eth1"]["purpose"] == ["nbd"]
        assert nets["Pool-wide network associated with eth0"]["bridge"] == "xenbr0"
        templates = [r for r in x.VM.get_all_records().values() if r["is_a_template"]]
        assert any(t["name_label"] == "Other install media" for t in templates)
        assert "BEGIN CERTIFICATE" in x.host.get_server_certificate(host)


def test_make_vm_records(xapi: Any, tmp_path: Path) -> None:
    img = image(tmp_path / "d0.raw", 8 * MiB, 1)
    vm = xapi.make_vm("inv-vm", [img, 16 * MiB], nics=["Pool-wide network associated with eth0"], cd=True)
    with xapi.session() as s:
        x = s.xenapi
        r = x.VM.get_record(vm)
        assert r["power_state"] == "Running" and r["resident_on"] == x.pool.get_master(x.pool.get_all()[0])
        assert x.VM.get_by_name_label("inv-vm") == [vm] and x.VM.get_by_uuid(r["uuid"]) == vm
        vbds = sorted((x.VBD.get_record(v) for v in r["VBDs"]), key=lambda v: int(v["userdevice"]))
        assert [(v["userdevice"], v["type"], v["bootable"], v["empty"]) for v in vbds] == [
            ("0", "Disk", True, False),
            ("1", "Disk", False, False),
            ("3", "CD", False, True),
        ]
        assert vbds[0]["device"] == "xvda" and vbds[2]["VDI"] == "OpaqueRef:NULL"
        vdis = [x.VDI.get_record(v["VDI"]) for v in vbds[:2]]
        assert [v["virtual_size"] for v in vdis] == [str(8 * MiB), str(16 * MiB)]
        by_device = {x.VBD.get_userdevice(v): v for v in r["VBDs"]}
        assert vdis[0]["VBDs"] == [by_device["0"]] and x.VBD.get_VM(by_device["0"]) == vm
        (vif,) = r["VIFs"]
        vr = x.VIF.get_record(vif)
        assert vr["MAC_autogenerated"] is True and len(vr["MAC"].split(":")) == 6
        assert x.network.get_bridge(vr["network"]) == "xenbr0"
        assert file_sha(xapi.vdi_file(xapi.vm_disks(vm)[0])) == file_sha(img)
        # setters and maps
        x.VM.set_name_description(vm, "described")
        x.VM.add_to_other_config(vm, "k", "v")
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.add_to_other_config(vm, "k", "w")
        assert e.value.details == ["MAP_DUPLICATE_KEY", "VM", "other_config", vm, "k"]
        x.VM.remove_from_other_config(vm, "k")
        assert x.VM.get_name_description(vm) == "described" and "k" not in x.VM.get_other_config(vm)
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.set_memory_dynamic_max(vm, str(1 << 40))
        assert e.value.details[0] == "MEMORY_CONSTRAINT_VIOLATION"


def test_expired_sessions_log_in_again(xapi: Any) -> None:
    with xapi.session() as s:
        before = len(xapi.calls("session.login_with_password", ok=True))
        old = s.handle
        xapi.expire_sessions()
        assert s.xenapi.pool.get_all()  # XenAPI gets SESSION_INVALID, logs in again, retries
        assert s.handle != old
        assert len(xapi.calls("session.login_with_password", ok=True)) == before + 1
        assert xapi.calls("pool.get_all", ok=False, error=["SESSION_INVALID", old])


# ---------------------------------------------------------------------------------------------- the pool
def test_two_hosts_and_a_member_that_names_its_master(xapi: Any) -> None:
    """The master and a member, each with its dom0 and its certificate (one CA, each naming its own
    address); the member answers XML-RPC on the same port, and a login there with HOST_IS_SLAVE and the
    master's address, as XAPI does."""
    h1, h2 = xapi.hosts
    with xapi.session() as s:
        x = s.xenapi
        (pool,) = x.pool.get_all()
        assert x.pool.get_master(pool) == h1 == xapi.host_ref and h2 == xapi.member_ref
        hosts = x.host.get_all_records()
        assert sorted(hosts) == sorted(xapi.hosts)
        assert [(hosts[h]["name_label"], hosts[h]["address"]) for h in (h1, h2)] == [
            ("xcp-sim-host", "127.0.0.1"),
            ("xcp-sim-host2", "127.0.0.2"),
        ]
        dom0s = {r["resident_on"]: v for v, r in x.VM.get_all_records().items() if r["is_control_domain"]}
        assert set(dom0s) == {h1, h2} and all(dom0s[h] in hosts[h]["resident_VMs"] for h in (h1, h2))
        assert x.VM.get_name_label(dom0s[h2]) == "Control domain on host: xcp-sim-host2"
        pems = [x.host.get_server_certificate(h) for h in (h1, h2)]
    ctx = ssl.create_default_context(cafile=str(xapi.ca_file))
    for address, pem in zip(("127.0.0.1", "127.0.0.2"), pems, strict=True):
        with (
            socket.create_connection((address, xapi.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=address) as tls,  # verified, under its own address
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None and ssl.DER_cert_to_PEM_cert(der).split() == pem.split()
    with (
        socket.create_connection(("127.0.0.1", xapi.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),  # the master's certificate does not name .2
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.2")

    with pytest.raises(XenAPI.Failure) as e:
        xapi.session(url=xapi.member_url)
    assert e.value.details == ["HOST_IS_SLAVE", "127.0.0.1"]
    refused = [c for c in xapi.calls("session.login_with_password", ok=False) if c.get("at") == "127.0.0.2"]
    assert refused[-1]["error"] == ["HOST_IS_SLAVE", "127.0.0.1"]
    with xapi.session() as s, xmlrpc.client.ServerProxy(xapi.member_url, context=ctx) as member:
        assert xapi.calls("session.login_with_password", ok=True)[-1]["at"] == "127.0.0.1"
        # a member answers a session of the pool (XAPI forwards the call to the master)
        assert member.pool.get_all(s.handle) == {"Status": "Success", "Value": [pool]}
        assert xapi.calls("pool.get_all", session=s.handle)[-1]["at"] == "127.0.0.2"
        local = member.session.slave_local_login_with_password(xapi.user, xapi.password)
        assert local["Status"] == "Success"
        assert member.session.logout(local["Value"])["Status"] == "Success"


def test_vm_placement_pool_migrate_and_failover(xapi: Any) -> None:
    h1, h2 = xapi.hosts
    vm = xapi.make_vm("pool-mig-vm", [4 * MiB])
    halted = xapi.make_vm("pool-halted-vm", [MiB], power_state="Halted")
    with xapi.session() as s:
        x = s.xenapi

        def where(v: str) -> tuple[str, bool, bool]:
            return x.VM.get_resident_on(v), v in x.host.get_resident_VMs(h1), v in x.host.get_resident_VMs(h2)

        assert where(vm) == (h1, True, False)
        domid = x.VM.get_domid(vm)
        x.VM.pool_migrate(vm, h2, {"live": "true"})
        assert where(vm) == (h2, False, True) and x.VM.get_power_state(vm) == "Running"
        assert x.VM.get_domid(vm) != domid
        x.VM.pool_migrate(vm, h2, {})  # where it runs already: nothing to do
        task = x.Async.VM.pool_migrate(vm, h1, {})
        assert wait_task(x, task) == "success", x.task.get_error_info(task)
        assert where(vm) == (h1, True, False)

        dom0 = next(v for v, r in x.VM.get_all_records().items() if r["is_control_domain"])
        for args, error in [
            ((halted, h2, {}), ["VM_BAD_POWER_STATE", halted, "running", "halted"]),
            ((dom0, h2, {}), ["OPERATION_NOT_ALLOWED", "Operations on the control domain are not allowed"]),
            ((vm, "OpaqueRef:NULL", {}), ["HANDLE_INVALID", "host", "OpaqueRef:NULL"]),
        ]:
            with pytest.raises(XenAPI.Failure) as e:
                x.VM.pool_migrate(*args)
            assert e.value.details == error
        x.host.disable(h2)
        assert x.host.get_enabled(h2) is False
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.pool_migrate(vm, h2, {})
        assert e.value.details == ["HOST_DISABLED", h2]
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.start_on(halted, h2, False, False)
        assert e.value.details == ["HOST_DISABLED", h2]
        x.VM.set_affinity(halted, h2)
        x.VM.start(halted, False, False)  # its affinity host is disabled: the master
        assert where(halted) == (h1, True, False)
        x.VM.hard_shutdown(halted)
        x.host.enable(h2)
        x.VM.start(halted, False, False)  # on its affinity host
        assert where(halted) == (h2, False, True)
        x.VM.clean_shutdown(halted)
        assert where(halted) == ("OpaqueRef:NULL", False, False)
        x.VM.start_on(halted, h2, True, False)
        assert where(halted) == (h2, False, True) and x.VM.get_power_state(halted) == "Paused"
        x.VM.hard_shutdown(halted)

        # HA restarts the VM on the other host: no API call, a new domain there
        domid = x.VM.get_domid(vm)
        xapi.move_vm(vm, h2)
        assert where(vm) == (h2, False, True) and xapi.resident_on(vm) == h2
        assert x.VM.get_domid(vm) != domid and x.VM.get_power_state(vm) == "Running"
        assert xapi.calls("ha-restart", vm=vm, host=h2, previous=h1)
        with pytest.raises(ValueError):
            xapi.move_vm(halted, h1)
        x.VM.clean_shutdown(vm)
        assert where(vm) == ("OpaqueRef:NULL", False, False)


# ---------------------------------------------------------------------------------------------- VM calls
def test_snapshot_and_export_raw(xapi: Any, tmp_path: Path) -> None:
    img = image(tmp_path / "d.raw", 8 * MiB, 2)
    vm = xapi.make_vm("snap-vm", [img])
    live = xapi.vm_disks(vm)[0]
    with xapi.session() as s:
        x = s.xenapi
        snap = x.VM.snapshot(vm, "snap-vm backup")
        r = x.VM.get_record(snap)
        assert (r["is_a_snapshot"], r["is_a_template"], r["snapshot_of"]) == (True, True, vm)
        assert r["power_state"] == "Halted" and x.VM.get_snapshots(vm) == [snap]
        (svdi,) = snapshot_disks(xapi, x, snap)
        vr = x.VDI.get_record(svdi)
        assert vr["is_a_snapshot"] and vr["snapshot_of"] == live and x.VDI.get_snapshots(live) == [svdi]
        # the live disk moves on; the snapshot keeps the bytes of its moment
        write_blocks(xapi.vdi_file(live), [0, 7, 100], 3)
        status, body = export(xapi, s.handle, svdi)
        assert status == 200 and sha256(body) == file_sha(img)
        status, body = export(xapi, s.handle, x.VDI.get_uuid(live))  # by uuid too
        assert status == 200 and sha256(body) == file_sha(xapi.vdi_file(live)) != file_sha(img)
        assert xapi.calls("GET /export_raw_vdi", vdi=svdi, bytes=8 * MiB)
        assert export(xapi, "OpaqueRef:nobody", svdi)[0] == 401
        assert export(xapi, s.handle, "OpaqueRef:none")[0] == 404
        # the snapshot VM goes; its VDIs stay (as XAPI)
        x.VM.destroy(snap)
        assert x.VM.get_snapshots(vm) == [] and x.VDI.get_is_a_snapshot(svdi) is True


def test_async_tasks(xapi: Any) -> None:
    vm = xapi.make_vm("async-vm", [4 * MiB])
    with xapi.session() as s:
        x = s.xenapi
        task = x.Async.VM.snapshot(vm, "async snap")
        assert task.startswith("OpaqueRef:")
        assert wait_task(x, task) == "success"
        result = x.task.get_result(task)
        assert result.startswith("<value>OpaqueRef:") and result.endswith("</value>")
        snap = result[len("<value>") : -len("</value>")]
        assert x.VM.get_snapshot_of(snap) == vm
        rec = x.task.get_record(task)
        assert rec["progress"] == 1.0 and rec["name_label"] == "Async.VM.snapshot" and rec["error_info"] == []
        x.task.destroy(task)
        with pytest.raises(XenAPI.Failure) as e:
            x.task.get_status(task)
        assert e.value.details == ["HANDLE_INVALID", "task", task]
        # a failing call fails its task
        task = x.Async.VM.start(vm, False, False)
        assert wait_task(x, task) == "failure"
        assert x.task.get_error_info(task) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
        assert x.task.get_result(task) == ""
        x.task.destroy(task)


def test_power_and_lifecycle(xapi: Any) -> None:
    vm = xapi.make_vm("life-vm", [4 * MiB], other_config={})
    with xapi.session() as s:
        x = s.xenapi
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.snapshot_with_quiesce(vm, "q")
        assert e.value.details == ["VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm]
        cp = x.VM.checkpoint(vm, "cp")
        assert x.VM.get_power_state(cp) == "Suspended" and x.VM.get_power_state(vm) == "Running"
        suspend = x.VM.get_suspend_VDI(cp)
        assert x.VDI.get_type(suspend) == "suspend"
        assert x.VDI.get_virtual_size(suspend) == x.VM.get_memory_static_max(vm)
        x.VM.destroy(cp)
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.get_type(suspend)
        assert e.value.details[0] == "HANDLE_INVALID"
        disk = xapi.vm_disks(vm)[0]
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.destroy(disk)
        assert e.value.details == ["VDI_IN_USE", disk, "destroy"]
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.destroy(vm)
        assert e.value.details == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
        x.VM.clean_shutdown(vm)
        assert x.VM.get_power_state(vm) == "Halted" and x.VM.get_resident_on(vm) == "OpaqueRef:NULL"
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.clean_shutdown(vm)
        assert e.value.details == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
        x.VM.start(vm, True, False)
        assert x.VM.get_power_state(vm) == "Paused"
        x.VM.hard_shutdown(vm)
        x.VDI.resize(disk, str(8 * MiB))
        assert os.path.getsize(xapi.vdi_file(disk)) == 8 * MiB
        assert x.VDI.get_virtual_size(disk) == str(8 * MiB)
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.resize(disk, str(MiB))
        assert e.value.details[0] == "SR_BACKEND_FAILURE_79"
        dom0 = next(v for v, r in x.VM.get_all_records().items() if r["is_control_domain"])
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.clean_shutdown(dom0)
        assert e.value.details[0] == "OPERATION_NOT_ALLOWED"
        x.VM.destroy(vm)
        assert not xapi.exists("VM", vm) and xapi.exists("VDI", disk)  # VM.destroy keeps the VDIs


def test_create_vm_as_a_restore_does(xapi: Any, tmp_path: Path) -> None:
    img = image(tmp_path / "r.raw", 4 * MiB, 4)
    with xapi.session() as s:
        x = s.xenapi
        sr = x.pool.get_default_SR(x.pool.get_all()[0])
        vm = x.VM.create(
            {
                "name_label": "restored-vm",
                "memory_static_max": str(512 * MiB),
                "memory_dynamic_max": str(512 * MiB),
                "memory_dynamic_min": str(256 * MiB),
                "memory_static_min": str(128 * MiB),
                "VCPUs_max": "2",
                "VCPUs_at_startup": "2",
                "HVM_boot_policy": "BIOS order",
                "HVM_boot_params": {"order": "dc"},
                "platform": {"viridian": "true"},
                "other_config": {},
                "PV_bootloader": "",
            }
        )
        r = x.VM.get_record(vm)
        assert r["power_state"] == "Halted" and r["memory_dynamic_min"] == str(256 * MiB)
        assert r["platform"] == {"viridian": "true"} and r["VCPUs_max"] == "2"
        vdi = x.VDI.create(
            {
                "name_label": "restored disk",
                "SR": sr,
                "virtual_size": str(4 * MiB),
                "type": "user",
                "sharable": False,
                "read_only": False,
                "other_config": {},
            }
        )
        assert xapi.vdi_file(vdi).stat().st_blocks == 0  # a new, empty, sparse file
        # the bytes in: PUT /import_raw_vdi (zero blocks stay holes), chunked as urllib3 streams it
        conn = https(xapi)
        try:
            conn.request(
                "PUT",
                f"/import_raw_vdi?session_id={s.handle}&vdi={vdi}&format=raw",
                body=iter([img.read_bytes()[i : i + 300_000] for i in range(0, 4 * MiB, 300_000)]),
                encode_chunked=True,
            )
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        finally:
            conn.close()
        assert file_sha(xapi.vdi_file(vdi)) == file_sha(img)
        assert xapi.vdi_file(vdi).stat().st_blocks * 512 <= img.stat().st_blocks * 512 + BLOCK
        assert xapi.calls("PUT /import_raw_vdi", vdi=vdi, bytes=4 * MiB)
        vbd = x.VBD.create(
            {
                "VM": vm,
                "VDI": vdi,
                "userdevice": "0",
                "bootable": True,
                "mode": "RW",
                "type": "Disk",
                "empty": False,
                "other_config": {},
                "qos_algorithm_type": "",
                "qos_algorithm_params": {},
            }
        )
        with pytest.raises(XenAPI.Failure) as e:
            x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "type": "Disk", "mode": "RW"})
        assert e.value.details == ["DEVICE_ALREADY_EXISTS", "0"]
        net = x.network.get_by_name_label("Pool-wide network associated with eth0")[0]
        mac = "aa:bb:cc:00:11:22"
        vif = x.VIF.create({"VM": vm, "network": net, "device": "0", "MAC": mac, "MTU": "1500"})
        assert x.VIF.get_MAC_autogenerated(vif) is False and x.VIF.get_MAC(vif) == "aa:bb:cc:00:11:22"
        with pytest.raises(XenAPI.Failure) as e:
            x.VIF.create({"VM": vm, "network": net, "device": "1", "MAC": "zz"})
        assert e.value.details == ["MAC_INVALID", "zz"]
        x.VM.start(vm, False, False)
        assert x.VBD.get_currently_attached(vbd) is True
        x.VM.hard_shutdown(vm)
        x.VBD.destroy(vbd)
        file = xapi.vdi_file(vdi)
        x.VDI.destroy(vdi)
        assert not file.exists() and x.VM.get_VBDs(vm) == []
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.create({"SR": sr, "virtual_size": "1", "type": "cbt_metadata"})
        assert e.value.details == ["VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata"]


# ---------------------------------------------------------------------------------------------- CBT
def test_changed_blocks_are_what_was_written(xapi: Any, tmp_path: Path) -> None:
    size = 32 * MiB
    vm = xapi.make_vm("cbt-vm", [image(tmp_path / "c.raw", size, 5)], cbt=True)
    live = xapi.vm_disks(vm)[0]
    with xapi.session() as s:
        x = s.xenapi
        assert x.VDI.get_cbt_enabled(live) is True
        (v1,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "b1"))
        assert x.VDI.get_cbt_enabled(v1) is True
        written = [0, 9, 10, 255, 511]
        write_blocks(xapi.vdi_file(live), written, 6)
        snap2 = x.VM.snapshot(vm, "b2")
        (v2,) = snapshot_disks(xapi, x, snap2)
        bitmap = x.VDI.list_changed_blocks(v1, v2)
        assert len(base64.b64decode(bitmap)) == size // BLOCK // 8
        assert bits(bitmap) == set(written)
        assert base64.b64decode(bitmap)[0] & 0x80  # block 0 is the first byte's most significant bit
        # later writes: v2 -> v3 has only them; v1 -> v3 has both
        write_blocks(xapi.vdi_file(live), [300], 7)
        (v3,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "b3"))
        assert bits(x.VDI.list_changed_blocks(v2, v3)) == {300}
        assert bits(x.VDI.list_changed_blocks(v1, v3)) == {*written, 300}
        # backwards or same VDI: SM's CBTChangedBlocksError
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.list_changed_blocks(v3, v1)
        assert e.value.details[0] == "SR_BACKEND_FAILURE_460" and "unrelated" in e.value.details[2]
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.list_changed_blocks(v1, v1)
        assert "same" in e.value.details[2]
        # against the live VDI: refused while the VM runs, the changes since v3 once it is halted
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.list_changed_blocks(v3, live)
        assert e.value.details == ["VDI_IN_USE", live, "list_changed_blocks"]
        write_blocks(xapi.vdi_file(live), [42], 8)
        x.VM.clean_shutdown(vm)
        assert bits(x.VDI.list_changed_blocks(v3, live)) == {42}
        # the data of a snapshot goes, its CBT metadata stays usable
        x.VDI.data_destroy(v2)
        assert x.VDI.get_type(v2) == "cbt_metadata" and not xapi.vdi_file(v2).exists()
        assert bits(x.VDI.list_changed_blocks(v2, v3)) == {300}
        assert x.VM.get_VBDs(snap2) == [] and x.VDI.get_VBDs(v2) == []  # as XAPI: its VBDs went
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.get_nbd_info(v2)
        assert e.value.details == ["VDI_INCOMPATIBLE_TYPE", v2, "cbt_metadata"]
        assert export(xapi, s.handle, v2)[0] == 400
        x.VM.start(vm, False, False)


def test_cbt_errors(xapi: Any) -> None:
    vm = xapi.make_vm("nocbt-vm", [4 * MiB], power_state="Halted")
    live = xapi.vm_disks(vm)[0]
    with xapi.session() as s:
        x = s.xenapi
        (a,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "n1"))
        (b,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "n2"))
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.list_changed_blocks(a, b)  # CBT was off: no CBT logs
        assert e.value.details[0] == "SR_BACKEND_FAILURE_460"
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.data_destroy(a)
        assert e.value.details == ["VDI_NO_CBT_METADATA", a]
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.data_destroy(live)
        assert e.value.details == ["OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {live}"]
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.enable_cbt(a)
        assert e.value.details == ["OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {a}"]
        x.VDI.enable_cbt(live)
        (c,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "n3"))
        write_blocks(xapi.vdi_file(live), [5], 9)
        (d,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "n4"))
        assert bits(x.VDI.list_changed_blocks(c, d)) == {5}
        # CBT turned off behind our back: what was tracked before stays; the new chain is unrelated
        xapi.disable_cbt_behind_back(live)
        assert x.VDI.get_cbt_enabled(live) is False
        x.VDI.enable_cbt(live)
        (f,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "n5"))
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.list_changed_blocks(d, f)
        assert e.value.details[0] == "SR_BACKEND_FAILURE_460" and "unrelated" in e.value.details[2]
        assert bits(x.VDI.list_changed_blocks(c, d)) == {5}
        x.VDI.disable_cbt(live)
        assert x.VDI.get_cbt_enabled(live) is False and x.VDI.get_cbt_enabled(f) is True


# ---------------------------------------------------------------------------------------------- NBD
def test_nbd_with_tls(xapi: Any, tmp_path: Path) -> None:
    pytest.importorskip("nbd")
    img = image(tmp_path / "n.raw", 8 * MiB, 10)
    vm = xapi.make_vm("nbd-vm", [img], cbt=True)
    with xapi.session() as s:
        x = s.xenapi
        (v,) = snapshot_disks(xapi, x, x.VM.snapshot(vm, "nbd"))
        write_blocks(xapi.vdi_file(xapi.vm_disks(vm)[0]), [1, 2], 11)  # after the snapshot: not in it
        (info,) = x.VDI.get_nbd_info(v)
        assert info["address"] == "127.0.0.1" and info["subject"] == "localhost"
        assert info["exportname"] == f"/{x.VDI.get_uuid(v)}?session_id={s.handle}"
        assert sha256(nbd_read_all(info, tmp_path)) == file_sha(img)
        assert xapi.calls("nbd-connect", vdi=v)
        # a certificate that is not the host's: verification fails
        import nbd

        with pytest.raises(nbd.Error):
            nbd_read_all(info, tmp_path, trust=_unrelated_cert(tmp_path / "other"))
        # without an NBD network on the host: no NBD
        net = xapi.network("Pool-wide network associated with eth1")
        x.network.remove_purpose(net, "nbd")
        try:
            assert x.VDI.get_nbd_info(v) == []
        finally:
            x.network.add_purpose(net, "nbd")


def _unrelated_cert(folder: Path) -> str:
    from tests.testkit.tls import server_certs

    return server_certs(folder).cert_pem


def test_nbd_drop_and_ended_session(xapi: Any, tmp_path: Path) -> None:
    nbd = pytest.importorskip("nbd")
    img = image(tmp_path / "drop.raw", 16 * MiB, 12)
    vm = xapi.make_vm("nbd-drop-vm", [img], power_state="Halted")
    disk = xapi.vm_disks(vm)[0]
    with xapi.session() as s:
        (info,) = s.xenapi.VDI.get_nbd_info(disk)
        xapi.nbd_drop_after(2 * MiB)
        with pytest.raises(nbd.Error):
            nbd_read_all(info, tmp_path)
        assert xapi.calls("nbd-drop", vdi=disk, after=2 * MiB)
        assert sha256(nbd_read_all(info, tmp_path)) == file_sha(img)  # the next connection is whole
        handle = s.handle
    # logged out: the export of that session takes no new connection
    with pytest.raises(nbd.Error):
        nbd_read_all(info, tmp_path)
    assert xapi.calls("nbd-refused", vdi=disk, session=handle)


# ---------------------------------------------------------------------------------------------- faults
def test_refuse(xapi: Any) -> None:
    vm = xapi.make_vm("refuse-vm", [4 * MiB])
    with xapi.session() as s:
        x = s.xenapi
        xapi.refuse["VM.snapshot"] = 2
        for _ in range(2):
            with pytest.raises(XenAPI.Failure) as e:
                x.VM.snapshot(vm, "r")
            assert e.value.details == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm]
        assert x.VM.get_is_a_snapshot(x.VM.snapshot(vm, "r"))
        xapi.refuse["VM.checkpoint"] = (1, ["SR_BACKEND_FAILURE_44", "", "There is insufficient space", ""])
        task = x.Async.VM.checkpoint(vm, "c")
        assert wait_task(x, task) == "failure"
        assert x.task.get_error_info(task)[0] == "SR_BACKEND_FAILURE_44"
        assert len(xapi.calls("refused")) >= 3


# ---------------------------------------------------------------------------------------------- NFS SRs
# A recovery session of a real vmrecover repository served by `vmrecover nfs serve` (portmapper on 111),
# attached as XenServer attaches an NFS SR: the simulator's PBD.plug mounts and checks it over the
# network as sm's NFSSR does, SR.scan lists it, VM.start opens its VDIs, pool_migrate reads them.
@dataclass
class Published:
    """A recovery session "s1" of vm1's one disk ("disk"), its SR folder made (as the product does)."""

    img: Path
    session: dict[str, Any]
    sr_uuid: str
    vdi_uuid: str
    srv: NfsServer

    @property
    def device_config(self) -> dict[str, str]:
        return {"server": "127.0.0.1", "serverpath": "/vmrecover/recover/s1", "nfsversion": "3"}

    def folder(self, c: nc.NfsClient) -> bytes:
        return c.walk(c.root(), f"recover/s1/{self.sr_uuid}")

    def expected(self, writes: list[tuple[int, bytes]]) -> str:
        data = bytearray(self.img.read_bytes())
        for off, piece in writes:
            data[off : off + len(piece)] = piece
        return sha256(bytes(data))


def _publish(cli: Cli, nfs_server: Any, tmp_path: Path, *args: str) -> Published:
    img = random_image(tmp_path / "disk.raw", 6 * MiB + 3 * 4096, seed=31)
    cli.json("backup", "--vm", "vm1", img)
    session = cli.json("recover", "start", "vm1", "--name", "s1")
    repo_id = tomllib.loads((cli.repo / "repo.toml").read_text())["repository"]["id"]
    srv: NfsServer = nfs_server(*args, portmapper=True)
    sr_uuid = srlayout.sr_uuid(repo_id, session["id"])
    with nc.NfsClient(srv.port) as c:
        assert c.mkdir(c.walk(c.root(), "recover/s1"), sr_uuid)[0] == nc.OK
    return Published(img, session, sr_uuid, srlayout.vdi_uuid(repo_id, session["id"], "disk"), srv)


@pytest.fixture
def published(cli: Cli, nfs_server: Any, tmp_path: Path) -> Published:
    """Served to this machine only (127.0.0.1: the master's address, not the member's)."""
    return _publish(cli, nfs_server, tmp_path)


@pytest.fixture
def published_to_pool(cli: Cli, nfs_server: Any, tmp_path: Path) -> Published:
    """Served to both hosts of the pool (127.0.0.1 and 127.0.0.2)."""
    return _publish(cli, nfs_server, tmp_path, "--allow", "127.0.0.1", "--allow", "127.0.0.2")


def attach(xapi: Any, x: Any, p: Published, name: str) -> tuple[str, str]:
    """SR.introduce + PBD.create + PBD.plug, as the product attaches a session: (SR, PBD)."""
    sr = x.SR.introduce(p.sr_uuid, name, "vmrecover", "nfs", "user", True, {})
    pbd = x.PBD.create(
        {"host": xapi.host_ref, "SR": sr, "device_config": p.device_config, "other_config": {}}
    )
    x.PBD.plug(pbd)
    return sr, pbd


def vm_on(x: Any, name: str, vdi: str) -> tuple[str, str]:
    vm = x.VM.create({"name_label": name})
    vbd = x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW",
                        "type": "Disk", "empty": False, "other_config": {}})  # fmt: skip
    return vm, vbd


VHD_UUID = "0b5c3c2e-8a55-4d7e-9a0c-5d0a3b1f7e21"


def vhd_footer(size: int) -> bytes:
    f = bytearray(512)
    f[:8] = b"conectix"
    struct.pack_into(">QQ", f, 40, size, size)  # original size, current size
    return bytes(f)


def test_nfs_sr_plug_scan_forget(xapi: Any, published: Published) -> None:
    """SR.introduce, PBD.create/plug (the SM's checks, seen in the SR folder), SR.scan (raw and VHD
    VDIs with their sizes; a removed file's VDI goes), SR.forget (refused while plugged; the files stay)."""
    p = published
    with xapi.session() as s:
        x = s.xenapi
        sr = x.SR.introduce(p.sr_uuid, "nfs-scan", "d", "nfs", "user", True, {})
        rec = x.SR.get_record(sr)
        assert (rec["PBDs"], rec["VDIs"], rec["type"], rec["shared"], rec["physical_size"]) == (
            [],
            [],
            "nfs",
            True,
            "-1",
        )
        assert x.SR.get_by_uuid(p.sr_uuid) == sr and x.SR.get_by_name_label("nfs-scan") == [sr]
        with pytest.raises(XenAPI.Failure) as e:
            x.SR.introduce(p.sr_uuid, "again", "", "nfs", "user", True, {})
        assert e.value.details == ["SR_UUID_EXISTS", p.sr_uuid]
        pbd = x.PBD.create(
            {"host": xapi.host_ref, "SR": sr, "device_config": p.device_config, "other_config": {}}
        )
        with pytest.raises(XenAPI.Failure) as e:
            x.PBD.create({"host": xapi.host_ref, "SR": sr, "device_config": p.device_config})
        assert e.value.details == ["PBD_EXISTS", sr, xapi.host_ref, pbd]
        with pytest.raises(XenAPI.Failure) as e:
            x.SR.scan(sr)
        assert e.value.details == ["SR_HAS_NO_PBDS", sr]
        assert x.SR.get_PBDs(sr) == [pbd] and x.PBD.get_currently_attached(pbd) is False
        x.PBD.plug(pbd)
        x.PBD.plug(pbd)  # plugged already: nothing to do
        assert x.PBD.get_record(pbd)["currently_attached"] is True
        assert x.PBD.get_device_config(pbd) == p.device_config
        # the SM's checks left their mark: no LINK on this server, so sm-hardlink.conf says 0
        (attached,) = [c for c in xapi.calls("sm", op="sr_attach", sr=sr)]
        assert attached["ok"] is True and attached["hardlinks"] is False
        assert xapi.calls("message", name="sr_does_not_support_hardlinks", obj_uuid=p.sr_uuid)
        with nc.NfsClient(p.srv.port) as c:
            folder = p.folder(c)
            status, conf = c.lookup(folder, "sm-hardlink.conf")
            assert status == nc.OK and c.read(conf, 0, 10)[1] == b"0"
            # a VHD file and a file that is no VDI, as another writer could leave them
            status, fh = c.create(folder, f"{VHD_UUID}.vhd")
            assert status == nc.OK
            assert c.write(fh, 0, vhd_footer(3 * MiB) * 2, nc.FILE_SYNC)[0] == nc.OK
            assert c.create(folder, "notes.txt")[0] == nc.OK

        x.SR.scan(sr)
        vdis = {x.VDI.get_uuid(v): x.VDI.get_record(v) for v in x.SR.get_VDIs(sr)}
        assert set(vdis) == {p.vdi_uuid, VHD_UUID}
        raw = vdis[p.vdi_uuid]
        assert raw["virtual_size"] == raw["physical_utilisation"] == str(p.img.stat().st_size)
        assert (raw["location"], raw["type"], raw["managed"], raw["SR"]) == (p.vdi_uuid, "user", True, sr)
        assert raw["sm_config"] == {"type": "raw"}
        vhd = vdis[VHD_UUID]
        assert (vhd["virtual_size"], vhd["physical_utilisation"], vhd["sm_config"]) == (
            str(3 * MiB),
            "1024",
            {},
        )
        assert x.SR.get_virtual_allocation(sr) == str(p.img.stat().st_size + 3 * MiB)
        assert int(x.SR.get_physical_size(sr)) > 0
        raw_ref = x.VDI.get_by_uuid(p.vdi_uuid)
        x.SR.scan(sr)  # again: the same records
        assert x.VDI.get_by_uuid(p.vdi_uuid) == raw_ref
        with nc.NfsClient(p.srv.port) as c:
            assert c.remove(p.folder(c), f"{VHD_UUID}.vhd") == nc.OK
        x.SR.scan(sr)
        assert x.SR.get_VDIs(sr) == [raw_ref]

        with pytest.raises(XenAPI.Failure) as e:
            x.SR.forget(sr)
        assert e.value.details == ["SR_HAS_PBD", sr]
        with pytest.raises(XenAPI.Failure) as e:
            x.PBD.destroy(pbd)
        assert e.value.details == ["OPERATION_NOT_ALLOWED", "PBD is currently attached"]
        x.PBD.unplug(pbd)
        x.PBD.unplug(pbd)  # unplugged already: nothing to do
        assert x.PBD.get_currently_attached(pbd) is False
        x.PBD.plug(pbd)  # sm-hardlink.conf answers now: no second LINK test, no second message
        assert len(xapi.calls("message", obj_uuid=p.sr_uuid)) == 1
        x.PBD.unplug(pbd)
        x.SR.forget(sr)
        for cls, ref in (("SR", sr), ("PBD", pbd), ("VDI", raw_ref)):
            assert not xapi.exists(cls, ref)
        with pytest.raises(XenAPI.Failure) as e:
            x.SR.get_by_uuid(p.sr_uuid)
        assert e.value.details == ["UUID_INVALID", "SR", p.sr_uuid]
    with nc.NfsClient(p.srv.port) as c:  # forgetting touched no file
        assert c.lookup(p.folder(c), f"{p.vdi_uuid}.raw")[0] == nc.OK


def test_nfs_sr_plug_failures(xapi: Any, published: Published) -> None:
    """A plug that fails answers the SM's SR_BACKEND_FAILURE and leaves the PBD unplugged."""
    p = published
    with xapi.session() as s:
        x = s.xenapi
        sr = x.SR.introduce(p.sr_uuid, "nfs-fail", "", "nfs", "user", True, {})
        cases = [
            ({"server": "127.0.0.9", "serverpath": "/vmrecover/recover/s1"},  # nothing listens there
             ["SR_BACKEND_FAILURE_108", "", "Unable to detect an NFS service on this target.", ""]),
            ({"server": "127.0.0.1"},
             ["SR_BACKEND_FAILURE_101", "", "The request is missing the serverpath parameter", ""]),
            ({"server": "127.0.0.1", "serverpath": "/vmrecover/recover/nosuch"},
             ["SR_BACKEND_FAILURE_73", "", "NFS mount error [opterr=mount failed on server `127.0.0.1` with "
              "return code 32]", ""]),
            ({"server": "127.0.0.1", "serverpath": "/vmrecover/recover/s1", "nfsversion": "2"},
             ["SR_BACKEND_FAILURE_72", "", "Required NFS server version unsupported [opterr=Invalid "
              "nfsversion.]", ""]),
            ({"server": "127.0.0.1", "serverpath": "/vmrecover/recover/s1", "nfsversion": "4.1"},
             ["SR_BACKEND_FAILURE_72", "", "Required NFS server version unsupported [opterr=Unsupported "
              "NFS version: 4.1]", ""]),
        ]  # fmt: skip
        for config, error in cases:
            pbd = x.PBD.create({"host": xapi.host_ref, "SR": sr, "device_config": config, "other_config": {}})
            t0 = time.monotonic()
            with pytest.raises(XenAPI.Failure) as e:
                x.PBD.plug(pbd)
            assert e.value.details == error, config
            assert time.monotonic() - t0 < 5
            assert x.PBD.get_currently_attached(pbd) is False
            x.PBD.destroy(pbd)
        # a session whose folder has no SR folder (the product did not make it): a mount error
        sr2 = x.SR.introduce("", "nfs-nofolder", "", "nfs", "user", True, {})
        pbd = x.PBD.create({"host": xapi.host_ref, "SR": sr2, "device_config": p.device_config})
        with pytest.raises(XenAPI.Failure) as e:
            x.PBD.plug(pbd)
        assert e.value.details[0] == "SR_BACKEND_FAILURE_73"
        x.PBD.destroy(pbd)
        x.SR.forget(sr2)
        x.SR.forget(sr)


def test_nfs_sr_vm_guest_writes_and_pool_migrate(xapi: Any, published: Published, cli: Cli) -> None:
    """A VM on the session's VDI: its writes land in the session; unplug refused while it runs;
    VDI.pool_migrate to local storage copies the disk's bytes, moves the VBD and removes the source file
    (the session keeps its disk)."""
    p = published
    writes = [(4096 + 17, b"\xab" * 10000), (5 * MiB, os.urandom(MiB))]
    with xapi.session() as s:
        x = s.xenapi
        sr, pbd = attach(xapi, x, p, "nfs-migrate")
        x.SR.scan(sr)
        vdi = x.VDI.get_by_uuid(p.vdi_uuid)
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.pool_migrate(vdi, xapi.local_sr, {})
        assert e.value.details == ["VDI_NEEDS_VM_FOR_MIGRATE", vdi]
        vm, vbd = vm_on(x, "nfs-migrate-vm", vdi)
        x.VM.start(vm, False, False)
        for off, data in writes:
            xapi.guest_write(vdi, off, data)
        assert xapi.guest_read(vdi, 4096, 10100)[17:10017] == b"\xab" * 10000
        with nc.NfsClient(p.srv.port) as c:  # the writes are the session's: its disk.raw has them
            disk = c.walk(c.root(), "recover/s1/disk.raw")
            assert c.read(disk, 5 * MiB, MiB)[1] == writes[1][1]
        assert cli.json("recover", "list")[0]["written"]["disk"] >= MiB
        with pytest.raises(XenAPI.Failure) as e:
            x.PBD.unplug(pbd)
        assert e.value.details == ["VDI_IN_USE", vdi]
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.copy(vdi, xapi.local_sr)
        assert e.value.details == ["VDI_IN_USE", vdi, "copy"]

        task = x.Async.VDI.pool_migrate(vdi, xapi.local_sr, {})
        assert wait_task(x, task) == "success", x.task.get_error_info(task)
        new = x.task.get_result(task).removeprefix("<value>").removesuffix("</value>")
        x.task.destroy(task)
        assert new != vdi and x.VDI.get_SR(new) == xapi.local_sr
        assert x.VBD.get_VDI(vbd) == new and x.VDI.get_VBDs(new) == [vbd]
        assert not xapi.exists("VDI", vdi)
        assert x.VDI.get_virtual_size(new) == str(p.img.stat().st_size)
        assert file_sha(xapi.vdi_file(new)) == p.expected(writes)
        assert xapi.vdi_file(new).stat().st_blocks * 512 < p.img.stat().st_size  # holes stayed holes
        assert xapi.calls("sm", op="vdi_delete", file=f"{p.vdi_uuid}.raw")
        with nc.NfsClient(p.srv.port) as c:
            assert c.lookup(p.folder(c), f"{p.vdi_uuid}.raw")[0] == nc.NOENT  # the SM removed it
            disk = c.walk(c.root(), "recover/s1/disk.raw")  # the session still has its disk
            assert c.read(disk, 5 * MiB, MiB)[1] == writes[1][1]
        x.SR.scan(sr)
        assert x.SR.get_VDIs(sr) == []
        x.PBD.unplug(pbd)  # the VM runs on, from local storage
        assert x.VM.get_power_state(vm) == "Running"
        x.VM.hard_shutdown(vm)
        x.VM.destroy(vm)
        x.PBD.destroy(pbd)
        x.SR.forget(sr)


def test_nfs_sr_copy_and_start_checks(xapi: Any, published: Published) -> None:
    """VDI.copy of a halted VM's VDI (XAPI's 2 and 4 argument forms), no snapshot of a raw VDI; VM.start
    needs the SR plugged and opens each VDI over NFS: with boot_guests on, a VDI whose file is gone fails
    the start cleanly."""
    p = published
    with xapi.session() as s:
        x = s.xenapi
        sr, pbd = attach(xapi, x, p, "nfs-copy")
        x.SR.scan(sr)
        vdi = x.VDI.get_by_uuid(p.vdi_uuid)
        vm, _ = vm_on(x, "nfs-copy-vm", vdi)
        vms = len(x.VM.get_all())
        with pytest.raises(XenAPI.Failure) as e:  # FileVDI: a raw VDI has no snapshots
            x.VM.snapshot(vm, "nfs-snap")
        assert e.value.details == ["SR_BACKEND_FAILURE_38", "", "The requested method is not "
                                   "supported/implemented", ""]  # fmt: skip
        assert len(x.VM.get_all()) == vms
        task = x.Async.VDI.copy(vdi, xapi.local_sr)
        assert wait_task(x, task) == "success", x.task.get_error_info(task)
        copy = x.task.get_result(task).removeprefix("<value>").removesuffix("</value>")
        assert file_sha(xapi.vdi_file(copy)) == p.expected([]) and x.VDI.get_SR(copy) == xapi.local_sr
        small = x.VDI.create({"SR": xapi.local_sr, "virtual_size": str(MiB), "type": "user"})
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.copy(vdi, xapi.local_sr, "OpaqueRef:NULL", small)
        assert e.value.details == ["VDI_TOO_SMALL", small, str(p.img.stat().st_size)]
        into = x.VDI.create({"SR": xapi.local_sr, "virtual_size": str(8 * MiB), "type": "user"})
        xapi.guest_write(into, 7 * MiB, b"stays")
        assert x.VDI.copy(vdi, xapi.local_sr, "OpaqueRef:NULL", into) == into
        data = xapi.vdi_file(into).read_bytes()
        assert (
            sha256(data[: p.img.stat().st_size]) == p.expected([]) and data[7 * MiB : 7 * MiB + 5] == b"stays"
        )
        with pytest.raises(XenAPI.Failure) as e:
            x.VDI.copy(vdi, xapi.local_sr, "OpaqueRef:NULL", into, "extra")
        assert e.value.details[0] == "MESSAGE_PARAMETER_COUNT_MISMATCH"
        for v in (copy, small, into):
            x.VDI.destroy(v)

        x.PBD.unplug(pbd)
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.start(vm, False, False)
        assert e.value.details == ["VM_REQUIRES_SR", vm, sr]
        x.PBD.plug(pbd)
        with nc.NfsClient(p.srv.port) as c:  # the VDI's file goes (as if the SM had deleted it)
            assert c.remove(p.folder(c), f"{p.vdi_uuid}.raw") == nc.OK
        xapi.boot_guests(True)
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.start(vm, False, False)
        assert e.value.details == ["SR_BACKEND_FAILURE_46", "", f"The VDI is not available [opterr=VDI "
                                   f"{p.vdi_uuid} not found]", ""]  # fmt: skip
        assert x.VM.get_power_state(vm) == "Halted" and not xapi.calls("guest-start", vm=vm)
        assert xapi.guest_serial(vm) == "" and xapi.guest_outcome(vm) == {}
        x.VM.destroy(vm)
        x.PBD.unplug(pbd)
        x.SR.forget(sr)


def test_nfs_sr_on_both_hosts_and_a_vm_that_moves(xapi: Any, published_to_pool: Published) -> None:
    """A PBD per host, each mounting from its host's address; a VM reaches its VDI through the PBD of
    the host it runs on: it cannot move where the SR is not plugged, its writes go through the new
    host's mount, and only that host's PBD is busy."""
    p = published_to_pool
    h1, h2 = xapi.hosts
    with xapi.session() as s:
        x = s.xenapi
        sr, pbd1 = attach(xapi, x, p, "nfs-pool")
        pbd2 = x.PBD.create({"host": h2, "SR": sr, "device_config": p.device_config, "other_config": {}})
        assert sorted(x.SR.get_PBDs(sr)) == sorted([pbd1, pbd2]) and x.host.get_PBDs(h2) == [pbd2]
        x.SR.scan(sr)
        vdi = x.VDI.get_by_uuid(p.vdi_uuid)
        vm, _ = vm_on(x, "nfs-pool-vm", vdi)
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.start_on(vm, h2, False, False)
        assert e.value.details == ["VM_REQUIRES_SR", vm, sr]
        x.VM.start(vm, False, False)
        with pytest.raises(XenAPI.Failure) as e:
            x.VM.pool_migrate(vm, h2, {})
        assert e.value.details == ["VM_REQUIRES_SR", vm, sr]
        assert x.VM.get_resident_on(vm) == h1
        x.PBD.plug(pbd2)
        attached = {c["host"]: c for c in xapi.calls("sm", op="sr_attach", sr=sr, ok=True)}
        assert {h: c["source"] for h, c in attached.items()} == {h1: "127.0.0.1", h2: "127.0.0.2"}
        x.VM.pool_migrate(vm, h2, {})
        assert x.VM.get_resident_on(vm) == h2
        xapi.guest_write(vdi, 3 * MiB, b"from host 2")  # through host 2's mount
        assert xapi.guest_read(vdi, 3 * MiB, 11) == b"from host 2"
        with nc.NfsClient(p.srv.port) as c:
            assert c.read(c.walk(c.root(), "recover/s1/disk.raw"), 3 * MiB, 11)[1] == b"from host 2"
        with pytest.raises(XenAPI.Failure) as e:
            x.PBD.unplug(pbd2)
        assert e.value.details == ["VDI_IN_USE", vdi]
        x.PBD.unplug(pbd1)  # nothing of the SR runs on host 1
        with pytest.raises(XapiError) as f:
            xapi.move_vm(vm, h1)  # HA cannot restart it where its SR is not plugged
        assert f.value.description == ["VM_REQUIRES_SR", vm, sr]
        x.VM.hard_shutdown(vm)
        x.VM.destroy(vm)
        x.PBD.unplug(pbd2)
        assert [c["host"] for c in xapi.calls("sm", op="sr_detach", sr=sr)] == [h1, h2]
        for pbd in (pbd1, pbd2):
            x.PBD.destroy(pbd)
        x.SR.forget(sr)


def test_a_member_the_nfs_server_does_not_allow_cannot_plug(xapi: Any, published: Published) -> None:
    """The member mounts from 127.0.0.2, which a server allowing only 127.0.0.1 refuses: the plug fails
    there as the SM's does, and works on the master."""
    p = published
    h1, h2 = xapi.hosts
    with xapi.session() as s:
        x = s.xenapi
        sr = x.SR.introduce(p.sr_uuid, "nfs-member-refused", "", "nfs", "user", True, {})
        pbds = [
            x.PBD.create({"host": h, "SR": sr, "device_config": p.device_config, "other_config": {}})
            for h in (h1, h2)
        ]
        x.PBD.plug(pbds[0])
        with pytest.raises(XenAPI.Failure) as e:
            x.PBD.plug(pbds[1])
        assert e.value.details[0].startswith("SR_BACKEND_FAILURE_"), e.value.details
        assert x.PBD.get_currently_attached(pbds[1]) is False
        assert xapi.calls("sm", op="sr_attach", sr=sr, host=h2, ok=False)
        x.PBD.unplug(pbds[0])
        for pbd in pbds:
            x.PBD.destroy(pbd)
        x.SR.forget(sr)
