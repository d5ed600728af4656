"""The XenAPI object model and calls of the XAPI simulator (what server.py's XML-RPC layer dispatches to).

One :class:`Xapi` holds the pool's database (records as XAPI names their fields), the sessions, the tasks
and the fault switches.  Every API call runs under one lock, so calls are atomic (XAPI has finer locking;
a test cannot tell), except that VDI.copy and VDI.pool_migrate let it go while they copy bytes.  Values
go out as XAPI's XML-RPC writes them: 64-bit integers as strings (``virtual_size`` is ``"1073741824"``),
references as ``OpaqueRef:<uuid4>`` (``OpaqueRef:NULL`` for none), no nil anywhere.

Storage: an SR is either a folder of the workdir (local storage, ``add_sr``'s SRs, an SR.introduce'd SR
of a type other than "nfs"), its VDIs sparse ``<uuid>.raw`` files there, or remote: an SR.introduce'd
"nfs" SR, whose PBD.plug mounts ``serverpath/<SR uuid>`` of a real NFS server as sm's NFSSR does
(nfssr.py); SR.scan then makes its VDIs from the files there, VM.start opens them over NFS (and with
the ``boot_guests`` knob boots the VM in qemu from nfs:// URLs), VDI.copy / VDI.pool_migrate read them
over NFS into local VDIs, VDI.destroy (and a migration's source) removes the file over NFS.  Other VDI
operations (snapshot, resize, CBT, NBD, the HTTP handlers) are for local VDIs only.

The pool has two hosts: the master ``xcp-sim-host`` (127.0.0.1) and a member ``xcp-sim-host2``
(127.0.0.2), each with its control domain and its own certificate.  A VM runs on one of them
(``resident_on``, the host's ``resident_VMs``): VM.start places it on its ``affinity`` host if that one is
enabled, else on the master; VM.start_on on the host named; VM.pool_migrate moves a running VM; the
harness's ``move_vm`` is HA restarting it on another host.  PBD.plug of an NFS SR mounts it on the PBD's
host, its connections coming from that host's address; a VM reaches its NFS VDIs through the PBD of the
host it runs on.  SIMPLIFIED: the simulator's local-file SRs (local storage, ``add_sr``'s) have no PBDs
and are reachable from both hosts (as if shared), served over NBD and HTTP by the master; no host
metrics (a host is live as long as the simulator runs; ``enabled`` is what host.disable/enable set).

Simplifications are marked "SIMPLIFIED" where they are made.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import hashlib
import inspect
import os
import posixpath
import random
import shutil
import signal
import threading
import time
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from tests import nfsclient
from tests.vsphere import cbt
from tests.xapi import nfssr
from tests.xapi.nfssr import NfsMount

NULL = "OpaqueRef:NULL"
BLOCK = cbt.BLOCK  # 64 KiB: XAPI's CBT block and the import's hole granularity
PIECE = 1 << 20
MAP_FIELDS = {
    "other_config",
    "platform",
    "HVM_boot_params",
    "xenstore_data",
    "sm_config",
    "VCPUs_params",
    "blocked_operations",
    "qos_algorithm_params",
}


class XapiError(Exception):
    """A XenAPI failure: ``ErrorDescription`` is ``[CODE, *params]`` (all strings)."""

    def __init__(self, code: str, *params: Any) -> None:
        super().__init__(code, *params)
        self.description = [code, *(str(p) for p in params)]


def new_ref() -> str:
    return f"OpaqueRef:{uuid.uuid4()}"


def now() -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime(datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H:%M:%SZ"))


def never() -> xmlrpc.client.DateTime:
    return xmlrpc.client.DateTime("19700101T00:00:00Z")


def marshal(v: Any) -> Any:
    """A value as XAPI's XML-RPC sends it: int64 as a decimal string, None as ''."""
    if isinstance(v, bool | float | xmlrpc.client.DateTime):
        return v
    if isinstance(v, int):
        return str(v)
    if v is None:
        return ""
    if isinstance(v, dict):
        return {str(k): marshal(x) for k, x in v.items()}
    if isinstance(v, list | tuple | set):
        return [marshal(x) for x in v]
    return v


def as_int(v: Any, field: str = "value") -> int:
    """An int64 parameter: XAPI takes it as an XML-RPC int or a decimal string."""
    if isinstance(v, bool):
        raise XapiError("FIELD_TYPE_ERROR", field)
    try:
        return int(v)
    except (TypeError, ValueError):
        raise XapiError("FIELD_TYPE_ERROR", field) from None


def task_result_xml(v: Any) -> str:
    """A task's ``result`` as XAPI writes it: the XML-RPC value (``<value>OpaqueRef:…</value>``)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return f"<value>{escape(v)}</value>"
    out = xmlrpc.client.dumps((marshal(v),))
    return out[out.index("<value>") : out.rindex("</value>") + len("</value>")]


# ---------------------------------------------------------------------------------------------- schema
def _vm_defaults() -> dict[str, Any]:
    return {
        "uuid": "",
        "allowed_operations": [],
        "current_operations": {},
        "name_label": "",
        "name_description": "",
        "power_state": "Halted",
        "user_version": 1,
        "is_a_template": False,
        "is_default_template": False,
        "suspend_VDI": NULL,
        "resident_on": NULL,
        "scheduled_to_be_resident_on": NULL,
        "affinity": NULL,
        "memory_overhead": 0,
        "memory_target": 0,
        "memory_static_max": 256 << 20,
        "memory_dynamic_max": 256 << 20,
        "memory_dynamic_min": 256 << 20,
        "memory_static_min": 256 << 20,
        "VCPUs_params": {},
        "VCPUs_max": 1,
        "VCPUs_at_startup": 1,
        "actions_after_shutdown": "destroy",
        "actions_after_reboot": "restart",
        "actions_after_crash": "restart",
        "consoles": [],
        "VIFs": [],
        "VBDs": [],
        "VUSBs": [],
        "crash_dumps": [],
        "VTPMs": [],
        "PV_bootloader": "",
        "PV_kernel": "",
        "PV_ramdisk": "",
        "PV_args": "",
        "PV_bootloader_args": "",
        "PV_legacy_args": "",
        "HVM_boot_policy": "BIOS order",
        "HVM_boot_params": {"order": "cd"},
        "HVM_shadow_multiplier": 1.0,
        "platform": {},
        "PCI_bus": "",
        "other_config": {},
        "domid": -1,
        "domarch": "",
        "last_boot_CPU_flags": {},
        "is_control_domain": False,
        "metrics": NULL,
        "guest_metrics": NULL,
        "last_booted_record": "",
        "recommendations": "",
        "xenstore_data": {},
        "ha_always_run": False,
        "ha_restart_priority": "",
        "is_a_snapshot": False,
        "snapshot_of": NULL,
        "snapshots": [],
        "snapshot_time": never(),
        "transportable_snapshot_id": "",
        "blobs": {},
        "tags": [],
        "blocked_operations": {},
        "snapshot_info": {},
        "snapshot_metadata": "",
        "parent": NULL,
        "children": [],
        "bios_strings": {},
        "appliance": NULL,
        "start_delay": 0,
        "shutdown_delay": 0,
        "order": 0,
        "VGPUs": [],
        "attached_PCIs": [],
        "suspend_SR": NULL,
        "version": 0,
        "generation_id": "",
        "hardware_platform_version": 0,
        "has_vendor_device": False,
        "requires_reboot": False,
        "reference_label": "",
        "domain_type": "hvm",
        "NVRAM": {},
    }


DEFAULTS: dict[str, Callable[[], dict[str, Any]]] = {
    "pool": lambda: {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "master": NULL,
        "default_SR": NULL,
        "suspend_image_SR": NULL,
        "crash_dump_SR": NULL,
        "ha_enabled": False,
        "other_config": {},
        "restrictions": {},
        "tags": [],
    },
    "host": lambda: {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "enabled": True,
        "address": "127.0.0.1",
        "hostname": "",
        "API_version_major": 2,
        "API_version_minor": 21,
        "API_version_vendor": "XenSource",
        "software_version": {},
        "other_config": {},
        "resident_VMs": [],
        "PBDs": [],
        "PIFs": [],
        "memory_overhead": 0,
        "cpu_info": {"cpu_count": "2"},
        "tags": [],
    },
    "SR": lambda: {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "allowed_operations": [],
        "current_operations": {},
        "VDIs": [],
        "PBDs": [],
        "virtual_allocation": 0,
        "physical_utilisation": 0,
        "physical_size": 1 << 40,
        "type": "ext",
        "content_type": "user",
        "shared": False,
        "other_config": {},
        "tags": [],
        "sm_config": {},
        "blobs": {},
        "local_cache_enabled": False,
        "introduced_by": NULL,
        "clustered": False,
        "is_tools_sr": False,
    },
    "VDI": lambda: {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "allowed_operations": [],
        "current_operations": {},
        "SR": NULL,
        "VBDs": [],
        "crash_dumps": [],
        "virtual_size": 0,
        "physical_utilisation": 0,
        "type": "user",
        "sharable": False,
        "read_only": False,
        "other_config": {},
        "storage_lock": False,
        "location": "",
        "managed": True,
        "missing": False,
        "parent": NULL,
        "xenstore_data": {},
        "sm_config": {},
        "is_a_snapshot": False,
        "snapshot_of": NULL,
        "snapshots": [],
        "snapshot_time": never(),
        "tags": [],
        "allow_caching": False,
        "on_boot": "persist",
        "metadata_of_pool": NULL,
        "metadata_latest": False,
        "is_tools_iso": False,
        "cbt_enabled": False,
    },
    "VBD": lambda: {
        "uuid": "",
        "allowed_operations": [],
        "current_operations": {},
        "VM": NULL,
        "VDI": NULL,
        "device": "",
        "userdevice": "0",
        "bootable": False,
        "mode": "RW",
        "type": "Disk",
        "unpluggable": True,
        "storage_lock": False,
        "empty": False,
        "other_config": {},
        "currently_attached": False,
        "status_code": 0,
        "status_detail": "",
        "runtime_properties": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "qos_supported_algorithms": [],
        "metrics": NULL,
    },
    "VM": _vm_defaults,
    "VIF": lambda: {
        "uuid": "",
        "allowed_operations": [],
        "current_operations": {},
        "device": "0",
        "network": NULL,
        "VM": NULL,
        "MAC": "",
        "MTU": 1500,
        "other_config": {},
        "currently_attached": False,
        "status_code": 0,
        "status_detail": "",
        "runtime_properties": {},
        "qos_algorithm_type": "",
        "qos_algorithm_params": {},
        "qos_supported_algorithms": [],
        "metrics": NULL,
        "MAC_autogenerated": False,
        "locking_mode": "network_default",
        "ipv4_allowed": [],
        "ipv6_allowed": [],
    },
    "network": lambda: {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "allowed_operations": [],
        "current_operations": {},
        "VIFs": [],
        "PIFs": [],
        "MTU": 1500,
        "other_config": {},
        "bridge": "",
        "managed": True,
        "blobs": {},
        "tags": [],
        "default_locking_mode": "unlocked",
        "assigned_ips": {},
        "purpose": [],
    },
    "PBD": lambda: {
        "uuid": "",
        "host": NULL,
        "SR": NULL,
        "device_config": {},
        "currently_attached": False,
        "other_config": {},
    },
    "task": lambda: {
        "uuid": "",
        "name_label": "",
        "name_description": "",
        "allowed_operations": [],
        "current_operations": {},
        "created": now(),
        "finished": never(),
        "status": "pending",
        "resident_on": NULL,
        "progress": 0.0,
        "type": "",
        "result": "",
        "error_info": [],
        "other_config": {},
        "subtask_of": NULL,
        "subtasks": [],
        "backtrace": "()",
    },
}
CLASSES = tuple(DEFAULTS)
HAS_NAME = {"host", "SR", "VDI", "VM", "network", "task"}  # classes with get_by_name_label
SETTABLE: dict[str, set[str]] = {
    "pool": {"name_label", "name_description", "other_config", "default_SR", "tags"},
    "host": {"name_label", "name_description", "other_config", "tags"},
    "SR": {"name_label", "name_description", "other_config", "sm_config", "tags"},
    "VDI": {
        "name_label",
        "name_description",
        "other_config",
        "sm_config",
        "xenstore_data",
        "tags",
        "read_only",
        "sharable",
    },
    "VBD": {"other_config", "userdevice", "bootable", "mode", "type", "qos_algorithm_params"},
    "VIF": {"other_config", "locking_mode", "qos_algorithm_params"},
    "network": {"name_label", "name_description", "other_config", "tags"},
    "PBD": {"other_config", "device_config"},
    "VM": {
        "name_label",
        "name_description",
        "other_config",
        "memory_static_max",
        "memory_static_min",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "VCPUs_max",
        "VCPUs_at_startup",
        "VCPUs_params",
        "platform",
        "HVM_boot_policy",
        "HVM_boot_params",
        "HVM_shadow_multiplier",
        "PV_bootloader",
        "PV_kernel",
        "PV_ramdisk",
        "PV_args",
        "PV_bootloader_args",
        "PV_legacy_args",
        "affinity",
        "is_a_template",
        "actions_after_shutdown",
        "actions_after_reboot",
        "actions_after_crash",
        "xenstore_data",
        "tags",
        "blocked_operations",
        "suspend_SR",
        "domain_type",
        "ha_always_run",
        "start_delay",
        "shutdown_delay",
        "order",
    },
    "task": {"other_config"},
}
SET_FIELDS = {"tags": "tags", "purpose": "purpose"}  # add_tags/remove_tags, add_purpose/remove_purpose
REF_FIELD_CLASS = {
    "VM": "VM",
    "VDI": "VDI",
    "SR": "SR",
    "network": "network",
    "host": "host",
    "resident_on": "host",
    "affinity": "host",
    "master": "host",
    "default_SR": "SR",
    "suspend_SR": "SR",
}


# ---------------------------------------------------------------------------------------------- files
def _punch_hole(fd: int, off: int, length: int) -> None:
    """Deallocate [off, off+length) keeping the size; zeros written where the filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fallocate(fd, 0x01 | 0x02, ctypes.c_long(off), ctypes.c_long(length)) != 0:  # KEEP_SIZE|PUNCH
        os.pwrite(fd, bytes(length), off)


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a file keeping holes (a hole of the source, or an all-zero 64 KiB block, stays a hole)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = os.fstat(fi).st_size
        zero = bytes(BLOCK)
        for off, length in cbt.data_extents(fi, size):
            first = off - off % BLOCK
            for pos in range(first, off + length, BLOCK):
                data = os.pread(fi, BLOCK, pos)
                if data and data != zero[: len(data)]:
                    os.pwrite(fo, data, pos)
        os.ftruncate(fo, size)
    finally:
        os.close(fi)
        os.close(fo)


def write_sparse(fd: int, pieces: Any, limit: int) -> int:
    """Write a stream at offset 0: all-zero 64 KiB blocks become holes (punched, so old data goes)."""
    pos = 0
    buf = b""
    zero = bytes(BLOCK)
    for piece in pieces:
        buf += piece
        while len(buf) >= BLOCK:
            block, buf = buf[:BLOCK], buf[BLOCK:]
            if pos + BLOCK > limit:
                raise ValueError("more bytes than the VDI holds")
            if block == zero:
                _punch_hole(fd, pos, BLOCK)
            else:
                os.pwrite(fd, block, pos)
            pos += BLOCK
    if buf:
        if pos + len(buf) > limit:
            raise ValueError("more bytes than the VDI holds")
        os.pwrite(fd, buf, pos)
        pos += len(buf)
    return pos


@dataclass
class GuestRun:
    """One qemu run of a VM booted for real (boot_guests)."""

    vm: str
    domid: int
    serial: Path
    pidfile: Path
    drives: list[str]
    thread: threading.Thread | None = None
    outcome: dict[str, Any] = field(default_factory=dict)  # what qemu did, once it ended


# ---------------------------------------------------------------------------------------------- the API
class Xapi:
    """The pool: database, sessions, tasks, API calls, fault switches."""

    def __init__(
        self, workdir: Path, user: str, password: str, server_cert_pem: str, member_cert_pem: str = ""
    ) -> None:
        """*server_cert_pem*: the master's certificate (its NBD servers' too); *member_cert_pem*: the
        member's (default: the master's)."""
        self.workdir = workdir
        self.user = user
        self.password = password
        self.server_cert_pem = server_cert_pem
        self.member_cert_pem = member_cert_pem or server_cert_pem
        self.lock = threading.RLock()
        self.db: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in CLASSES}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.log: list[dict[str, Any]] = []
        self.refuse: dict[str, Any] = {}  # method -> n, or (n, [CODE, params...])
        self.nbd: Any = None  # tests.xapi.nbd.NbdExports, set by the harness
        self._cbt_seq = 0
        self._current_session: str | None = None
        self._current_task: str | None = None
        self._domid = 0
        self.boot_guests = False  # VM.start really boots (qemu) a VM whose first disk is on an NFS SR
        self.guest_timeout = 300.0
        self.guests: dict[str, GuestRun] = {}  # VM ref -> its last qemu run
        self._threads: list[threading.Thread] = []
        self.methods: dict[str, Callable[..., Any]] = {}
        for name, fn in inspect.getmembers(self, inspect.ismethod):
            if name.startswith("x_"):
                self.methods[name[2:].replace("__", ".")] = fn
        self._inventory()

    # ------------------------------------------------------------------ database helpers
    def add(self, cls: str, **fields: Any) -> str:
        ref = new_ref()
        rec = DEFAULTS[cls]()
        rec.update(fields)
        rec["uuid"] = rec.get("uuid") or str(uuid.uuid4())
        if cls == "VDI" and not rec["location"]:
            rec["location"] = rec["uuid"]
        self.db[cls][ref] = rec
        return ref

    def rec(self, cls: str, ref: Any) -> dict[str, Any]:
        r = self.db[cls].get(ref) if isinstance(ref, str) else None
        if r is None:
            raise XapiError("HANDLE_INVALID", cls, ref)
        return r

    def find(self, cls: str, **match: Any) -> list[str]:
        return [ref for ref, r in self.db[cls].items() if all(r.get(k) == v for k, v in match.items())]

    def record(self, method: str, **kw: Any) -> None:
        with self.lock:
            self.log.append({"method": method, "time": time.time(), **kw})

    def calls(self, method: str, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [
                e for e in self.log if e["method"] == method and all(e.get(k) == v for k, v in match.items())
            ]

    def _inventory(self) -> None:
        """What a fresh pool has: two hosts (the master first) with their dom0s, local storage, two
        networks, a template."""
        version = {"product_brand": "XCP-ng", "product_version": "8.3.0", "xapi": "24.19"}
        self.host = self.add(
            "host",
            name_label="xcp-sim-host",
            hostname="xcp-sim-host",
            address="127.0.0.1",
            software_version=dict(version),
            _cert=self.server_cert_pem,
        )
        self.member = self.add(
            "host",
            name_label="xcp-sim-host2",
            hostname="xcp-sim-host2",
            address="127.0.0.2",
            software_version=dict(version),
            _cert=self.member_cert_pem,
        )
        self.hosts = [self.host, self.member]
        self.local_sr = self.add_sr("Local storage", "ext")
        self.pool = self.add(
            "pool",
            master=self.host,
            default_SR=self.local_sr,
            suspend_image_SR=self.local_sr,
            crash_dump_SR=self.local_sr,
        )
        # SIMPLIFIED: no PIF objects; a network "on the host" (what VDI.get_nbd_info looks for) is one
        # with the internal _pif flag, its PIF's IP being 127.0.0.1
        self.add_network("Pool-wide network associated with eth0", "xenbr0")
        self.add_network("Pool-wide network associated with eth1", "xenbr1", purpose=["nbd"])
        self.add_network("Host internal management network", "xenapi", pif=False)
        self.dom0, self.member_dom0 = (self._add_dom0(h) for h in self.hosts)
        self.add(
            "VM",
            name_label="Other install media",
            name_description="Template for an HVM guest",
            is_a_template=True,
            is_default_template=True,
            other_config={"default_template": "true"},
        )

    def _add_dom0(self, host: str) -> str:
        dom0 = self.add(
            "VM",
            name_label=f"Control domain on host: {self.rec('host', host)['name_label']}",
            name_description="The domain which manages physical devices and manages other domains",
            power_state="Running",
            is_control_domain=True,
            resident_on=host,
            domid=0,
            domain_type="pv",
            memory_static_max=4 << 30,
            memory_dynamic_max=4 << 30,
            memory_dynamic_min=4 << 30,
            memory_static_min=4 << 30,
            VCPUs_max=2,
            VCPUs_at_startup=2,
        )
        self.rec("host", host)["resident_VMs"].append(dom0)
        return dom0

    def address(self, host: str) -> str:
        return str(self.rec("host", host)["address"])

    def add_sr(self, name: str, type_: str = "ext", *, shared: bool = False) -> str:
        ref = self.add("SR", name_label=name, type=type_, shared=shared or type_ == "nfs")
        r = self.rec("SR", ref)
        r["_dir"] = self.workdir / "sr-mount" / r["uuid"]
        r["_dir"].mkdir(parents=True, exist_ok=True)
        return ref

    def add_network(
        self, name: str, bridge: str, *, purpose: list[str] | None = None, pif: bool = True
    ) -> str:
        return self.add("network", name_label=name, bridge=bridge, purpose=list(purpose or []), _pif=pif)

    def vdi_path(self, vdi: str) -> Path:
        r = self.rec("VDI", vdi)
        sr = self.rec("SR", r["SR"])
        if self.remote(sr):
            # SIMPLIFIED: a VDI of an NFS SR is reached over NFS only by what nfssr.py does (scan,
            # VM.start, copy, pool_migrate, destroy, the harness's guest I/O); snapshot, resize, CBT,
            # NBD and the HTTP handlers are for the simulator's local-file SRs
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", r["SR"])
        return sr["_dir"] / f"{r['uuid']}.raw"

    @staticmethod
    def remote(sr: dict[str, Any]) -> bool:
        """An SR whose storage is really remote (an introduced "nfs" SR): its VDIs are files on an NFS
        server, reached through the mount its plugged PBD holds.  Other SRs are folders of the workdir."""
        return "_dir" not in sr

    def mount_of(self, sr: str, host: str | None = None) -> NfsMount | None:
        """The NFS mount of the SR's plugged PBD on *host*; without a host, that of the master's PBD, or
        of any plugged PBD (SIMPLIFIED: XAPI runs SR operations on the SR master, the pool master for a
        shared SR).  None when no such PBD is plugged."""
        mounts = {}
        for pbd in self.rec("SR", sr)["PBDs"]:
            p = self.db["PBD"].get(pbd)
            if p is not None and p["currently_attached"] and p.get("_mount") is not None:
                mounts[p["host"]] = p["_mount"]
        if host is not None:
            return mounts.get(host)
        return mounts.get(self.host) or next(iter(mounts.values()), None)

    def _remote_file(self, vdi: str, host: str | None = None) -> tuple[NfsMount, str] | None:
        """(mount, file name) of a VDI of a remote SR as *host* reaches it (see mount_of), None for a
        local one; SR_HAS_NO_PBDS if its SR is not plugged there (as XAPI finds no host to run the SM
        on)."""
        v = self.rec("VDI", vdi)
        if not self.remote(self.rec("SR", v["SR"])):
            return None
        mount = self.mount_of(v["SR"], host)
        if mount is None:
            raise XapiError("SR_HAS_NO_PBDS", v["SR"])
        return mount, v["location"] + v.get("_ext", ".raw")

    def guest_host(self, vdi: str) -> str | None:
        """The host a running VM with *vdi* attached runs on (None if no running VM has it)."""
        for vbd in self.rec("VDI", vdi)["VBDs"]:
            b = self.db["VBD"].get(vbd)
            if b is not None and b["currently_attached"]:
                host = self.db["VM"].get(b["VM"], {}).get("resident_on", NULL)
                if host in self.db["host"]:
                    return str(host)
        return None

    @contextlib.contextmanager
    def _unlocked(self) -> Iterator[None]:
        """The API lock let go for a long data copy (a call holds it once); taken back after."""
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()

    def attached_to_running(self, vdi: str) -> bool:
        for vbd in self.rec("VDI", vdi)["VBDs"]:
            if self.db["VBD"].get(vbd, {}).get("currently_attached"):
                return True
        return False

    # ------------------------------------------------------------------ sessions and dispatch
    def login(self, params: list[Any], originator: str = "") -> str:
        if len(params) < 2:
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", "session.login_with_password", 2, len(params))
        user, password = params[0], params[1]
        if user != self.user or password != self.password:
            raise XapiError("SESSION_AUTHENTICATION_FAILED", user, "Authentication failure")
        ref = new_ref()
        with self.lock:
            self.sessions[ref] = {
                "uuid": str(uuid.uuid4()),
                "this_host": self.host,
                "this_user": NULL,
                "last_active": now(),
                "originator": params[3] if len(params) > 3 else originator,
                "api_version": params[2] if len(params) > 2 else "",
            }
        return ref

    def check_session(self, ref: Any) -> None:
        with self.lock:
            if not isinstance(ref, str) or ref not in self.sessions:
                raise XapiError("SESSION_INVALID", ref)

    def logout(self, ref: Any) -> None:
        self.check_session(ref)
        with self.lock:
            self.sessions.pop(ref, None)
        if self.nbd is not None:
            self.nbd.session_ended(ref)

    def expire_sessions(self) -> None:
        """Fault: every current session becomes invalid (SESSION_INVALID), as after a xapi restart."""
        with self.lock:
            gone = list(self.sessions)
            self.sessions.clear()
        if self.nbd is not None:
            for s in gone:
                self.nbd.session_ended(s)
        self.record("sessions-expired", sessions=gone)

    def resolve(self, method: str) -> Callable[..., Any]:
        """The function answering *method* (its first parameter is the session), or MESSAGE_METHOD_UNKNOWN."""
        fn = self.methods.get(method)
        if fn is not None:
            return fn
        cls, _, op = method.partition(".")
        if cls not in DEFAULTS or not op:
            raise XapiError("MESSAGE_METHOD_UNKNOWN", method)
        fields = DEFAULTS[cls]()
        if op == "get_all":
            return lambda s: [r for r in self.db[cls] if not self._hidden(cls, r)]
        if op == "get_all_records":
            return lambda s: {r: self.public(cls, r) for r in self.db[cls] if not self._hidden(cls, r)}
        if op == "get_record":
            return lambda s, ref: self.public(cls, ref)
        if op == "get_by_uuid":
            return lambda s, u: self._by_uuid(cls, u)
        if op == "get_by_name_label" and cls in HAS_NAME:
            return lambda s, name: [r for r in self.find(cls, name_label=name) if not self._hidden(cls, r)]
        if op.startswith("get_") and op[4:] in fields:
            field = op[4:]
            return lambda s, ref: marshal(self.rec(cls, ref)[field])
        if op.startswith("set_") and op[4:] in SETTABLE.get(cls, ()):
            field = op[4:]
            return lambda s, ref, value: self._set(cls, ref, field, value)
        if op.startswith("add_to_") and op[7:] in fields and op[7:] in MAP_FIELDS:
            field = op[7:]
            return lambda s, ref, key, value: self._map_add(cls, ref, field, key, value)
        if op.startswith("remove_from_") and op[12:] in fields and op[12:] in MAP_FIELDS:
            field = op[12:]
            return lambda s, ref, key: self._map_remove(cls, ref, field, key)
        for verb in ("add_", "remove_"):
            if op.startswith(verb) and op[len(verb) :] in SET_FIELDS and op[len(verb) :] in fields:
                field = op[len(verb) :]
                return lambda s, ref, value: self._set_member(cls, ref, field, value, verb == "add_")
        raise XapiError("MESSAGE_METHOD_UNKNOWN", method)

    def _hidden(self, cls: str, ref: str) -> bool:
        return cls == "task" and self.db["task"][ref].get("_destroyed", False)

    def call(
        self, method: str, params: list[Any], *, session: str | None = None, task: str | None = None
    ) -> Any:
        """Run one API call (the session already checked); its value, marshalled, or XapiError."""
        fn = self.resolve(method)
        ps = list(inspect.signature(fn).parameters.values())
        fixed = len([p for p in ps if p.kind is p.POSITIONAL_OR_KEYWORD]) - 1  # less the session
        # optional trailing parameters (XAPI takes a call without the newest ones): *args, one unless
        # the function says how many (its "optional" attribute)
        optional = getattr(fn, "optional", 1) if any(p.kind is p.VAR_POSITIONAL for p in ps) else 0
        if len(params) < fixed or len(params) > fixed + optional:
            raise XapiError("MESSAGE_PARAMETER_COUNT_MISMATCH", method, fixed, len(params))
        with self.lock:
            self._refused(method, params)
            self._current_session = session
            self._current_task = task
            return marshal(fn(session, *params))

    def _refused(self, method: str, params: list[Any]) -> None:
        spec = self.refuse.get(method)
        if not spec:
            return
        n, error = spec if isinstance(spec, tuple) else (spec, None)
        if n <= 0:
            return
        self.refuse[method] = (n - 1, error) if error else n - 1
        if error is None:  # what XAPI says while another operation holds the object: the usual transient
            cls = method.split(".")[0]
            error = ["OTHER_OPERATION_IN_PROGRESS", cls, params[0] if params else ""]
        self.record("refused", call=method, error=list(error))
        raise XapiError(*error)

    def run_async(self, method: str, params: list[Any], session: str) -> str:
        """``Async.<method>``: a task ref at once; the call runs in a thread and completes the task."""
        self.resolve(method)  # an unknown method fails the Async call itself, as XAPI does
        with self.lock:
            task = self.add("task", name_label=f"Async.{method}", resident_on=self.host)
            self.rec("task", task)["_session"] = session

        def work() -> None:
            try:
                value = self.call(method, params, session=session, task=task)
            except XapiError as e:
                self._finish(task, "failure", error=e.description)
                self.record(method, args=params, session=session, task=task, ok=False, error=e.description)
            except Exception as e:  # a harness bug: as XAPI's INTERNAL_ERROR
                self._finish(task, "failure", error=["INTERNAL_ERROR", repr(e)])
                self.record("sim-error", call=method, error=repr(e))
            else:
                self._finish(task, "success", result=task_result_xml(value))
                self.record(method, args=params, session=session, task=task, ok=True, result=value)

        t = threading.Thread(target=work, name=f"xapi-task {method}", daemon=True)
        with self.lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return task

    def _finish(self, task: str, status: str, *, result: str = "", error: list[str] | None = None) -> None:
        with self.lock:
            r = self.db["task"].get(task)
            if r is None:
                return
            r.update(status=status, progress=1.0, finished=now(), result=result, error_info=error or [])

    def wait_tasks(self, timeout: float = 30) -> None:
        with self.lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout)

    # ------------------------------------------------------------------ generic accessors
    def public(self, cls: str, ref: Any) -> dict[str, Any]:
        r = self.rec(cls, ref)
        return marshal({k: v for k, v in r.items() if not k.startswith("_")})

    def _by_uuid(self, cls: str, u: Any) -> str:
        for ref, r in self.db[cls].items():
            if r["uuid"] == u and not self._hidden(cls, ref):
                return ref
        raise XapiError("UUID_INVALID", cls, u)

    def _typed(self, cls: str, field: str, value: Any) -> Any:
        old = DEFAULTS[cls]()[field]
        if isinstance(old, bool):
            if not isinstance(value, bool):
                raise XapiError("FIELD_TYPE_ERROR", field)
            return value
        if isinstance(old, int):
            return as_int(value, field)
        if isinstance(old, float):
            if not isinstance(value, int | float):
                raise XapiError("FIELD_TYPE_ERROR", field)
            return float(value)
        if isinstance(old, dict):
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise XapiError("FIELD_TYPE_ERROR", field)
            return dict(value)
        if isinstance(old, list):
            if not isinstance(value, list):
                raise XapiError("FIELD_TYPE_ERROR", field)
            return list(value)
        if not isinstance(value, str):
            raise XapiError("FIELD_TYPE_ERROR", field)
        if field in REF_FIELD_CLASS and value != NULL:
            self.rec(REF_FIELD_CLASS[field], value)
        return value

    def _set(self, cls: str, ref: str, field: str, value: Any) -> None:
        # SIMPLIFIED: setters do not check power state (XAPI refuses some on a running VM)
        r = self.rec(cls, ref)
        value = self._typed(cls, field, value)
        if cls == "VM" and field.startswith("memory_"):
            m = {k: r[k] for k in ("memory_static_min", "memory_dynamic_min", "memory_dynamic_max")}
            m["memory_static_max"] = r["memory_static_max"]
            m[field] = value
            self._check_memory(m)
        if cls == "VM" and field in ("VCPUs_max", "VCPUs_at_startup"):
            vmax = value if field == "VCPUs_max" else r["VCPUs_max"]
            start = value if field == "VCPUs_at_startup" else r["VCPUs_at_startup"]
            if not 0 < start <= vmax:
                raise XapiError(
                    "VALUE_NOT_SUPPORTED", field, str(value), "VCPUs_at_startup must be <= VCPUs_max"
                )
        r[field] = value

    def _map_add(self, cls: str, ref: str, field: str, key: Any, value: Any) -> None:
        r = self.rec(cls, ref)
        if not isinstance(key, str) or not isinstance(value, str):
            raise XapiError("FIELD_TYPE_ERROR", field)
        if key in r[field]:
            raise XapiError("MAP_DUPLICATE_KEY", cls, field, ref, key)
        r[field][key] = value

    def _map_remove(self, cls: str, ref: str, field: str, key: Any) -> None:
        self.rec(cls, ref)[field].pop(key, None)

    def _set_member(self, cls: str, ref: str, field: str, value: Any, add: bool) -> None:
        r = self.rec(cls, ref)
        if field == "purpose" and value not in ("nbd", "insecure_nbd"):
            raise XapiError("FIELD_TYPE_ERROR", "purpose")
        if add and value not in r[field]:
            r[field].append(value)
        elif not add and value in r[field]:
            r[field].remove(value)

    @staticmethod
    def _check_memory(m: dict[str, int]) -> None:
        if not (
            m["memory_static_min"]
            <= m["memory_dynamic_min"]
            <= m["memory_dynamic_max"]
            <= m["memory_static_max"]
        ):
            raise XapiError(
                "MEMORY_CONSTRAINT_VIOLATION",
                "Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max",
            )

    # ------------------------------------------------------------------ session, host, task
    def x_session__get_this_host(self, s: str, self_: str) -> str:
        self.check_session(self_)
        return self.sessions[self_]["this_host"]

    def x_session__get_uuid(self, s: str, self_: str) -> str:
        self.check_session(self_)
        return self.sessions[self_]["uuid"]

    def x_host__get_server_certificate(self, s: str, host: str) -> str:
        return str(self.rec("host", host)["_cert"])

    def x_host__disable(self, s: str, host: str) -> None:
        """No new VM is placed on the host (VM.start, start_on, pool_migrate: HOST_DISABLED)."""
        self.rec("host", host)["enabled"] = False

    def x_host__enable(self, s: str, host: str) -> None:
        self.rec("host", host)["enabled"] = True

    def x_task__destroy(self, s: str, task: str) -> None:
        self.rec("task", task)
        del self.db["task"][task]

    def x_task__cancel(self, s: str, task: str) -> None:
        # SIMPLIFIED: tasks run to completion at once; cancelling a finished task is what XAPI refuses
        r = self.rec("task", task)
        if r["status"] != "pending":
            raise XapiError("OPERATION_NOT_ALLOWED", f"task {task} is {r['status']}")

    # ------------------------------------------------------------------ SR, PBD
    def x_SR__introduce(
        self,
        s: str,
        uuid_: Any,
        name_label: Any,
        name_description: Any,
        type_: Any,
        content_type: Any,
        shared: Any,
        sm_config: Any,
    ) -> str:
        """An SR record with no PBDs (XAPI's SR.introduce is a database operation only)."""
        for field_name, v in (("uuid", uuid_), ("name_label", name_label), ("type", type_)):
            if not isinstance(v, str):
                raise XapiError("FIELD_TYPE_ERROR", field_name)
        u = uuid_ or str(uuid.uuid4())
        if any(r["uuid"] == u for r in self.db["SR"].values()):
            raise XapiError("SR_UUID_EXISTS", u)
        ref = self.add(
            "SR",
            uuid=u,
            name_label=name_label,
            name_description=self._typed("SR", "name_description", name_description),
            type=type_.lower(),
            content_type=self._typed("SR", "content_type", content_type),
            shared=self._typed("SR", "shared", shared),
            sm_config=self._typed("SR", "sm_config", sm_config),
            physical_size=-1,
            physical_utilisation=-1,
        )
        if type_.lower() != "nfs":
            # SIMPLIFIED: only "nfs" has a storage backend of its own (nfssr.py); an SR of another type
            # is a folder of the workdir, as add_sr makes, and PBD.plug of it just says attached
            self.rec("SR", ref)["_dir"] = self.workdir / "sr-mount" / u
            self.rec("SR", ref)["_dir"].mkdir(parents=True, exist_ok=True)
        return ref

    def x_SR__forget(self, s: str, sr: str) -> None:
        """The SR's records gone (PBDs, VDIs, the SR), never its storage; refused while a PBD is plugged.
        As XAPI's Db.VDI.destroy, VBDs of its VDIs are left pointing at them."""
        r = self.rec("SR", sr)
        if any(self.db["PBD"][p]["currently_attached"] for p in r["PBDs"] if p in self.db["PBD"]):
            raise XapiError("SR_HAS_PBD", sr)
        for pbd in list(r["PBDs"]):
            self._drop_pbd(pbd)
        for vdi in list(r["VDIs"]):
            if vdi in self.db["VDI"]:
                self._drop_vdi(vdi, files=False, vbds=False)
        del self.db["SR"][sr]

    def x_SR__scan(self, s: str, sr: str) -> None:
        r = self.rec("SR", sr)
        if not self.remote(r):
            return  # the simulator's local-file SRs: the database already is what their folders hold
        mount = self.mount_of(sr)
        if mount is None:
            raise XapiError("SR_HAS_NO_PBDS", sr)
        try:
            found = nfssr.scan(mount)
        except nfssr.SmError as e:
            raise XapiError(*e.description) from None
        by_location = {self.db["VDI"][v]["location"]: v for v in r["VDIs"] if v in self.db["VDI"]}
        seen = set()
        for f in found:
            seen.add(f.uuid)
            sizes = {"virtual_size": f.virtual_size, "physical_utilisation": f.physical_utilisation}
            ref = by_location.get(f.uuid)
            if ref is not None:
                self.db["VDI"][ref].update(sizes, _ext=f.ext)
                continue
            if any(v["uuid"] == f.uuid for v in self.db["VDI"].values()):
                # SIMPLIFIED: the SM's VDI.db_introduce fails on the database's uniqueness; its scan
                # then fails with that error (here it reaches the caller as it is)
                raise XapiError("DB_UNIQUENESS_CONSTRAINT_VIOLATION", "VDI", "uuid", f.uuid)
            ref = self.add(
                "VDI",
                uuid=f.uuid,
                SR=sr,
                location=f.uuid,
                sm_config={"type": "raw"} if f.ext == ".raw" else {},  # FileVDI's sm_config_override
                _ext=f.ext,
                **sizes,
            )
            r["VDIs"].append(ref)
        for location, ref in by_location.items():
            # SIMPLIFIED: the SM forgets a VDI whose file is gone even if a running VM has it (leaving
            # the VBD pointing at nothing); here such a VDI stays until it is detached
            if location not in seen and not self.attached_to_running(ref):
                self._drop_vdi(ref, files=False)
        r["virtual_allocation"] = sum(f.virtual_size for f in found)
        with contextlib.suppress(nfssr.NfsError):
            total, free = mount.fsstat()
            r.update(physical_size=total, physical_utilisation=total - free)
        self.record("sm", op="sr_scan", sr=sr, files=sorted(f.uuid + f.ext for f in found))

    def x_PBD__create(self, s: str, record: Any) -> str:
        if not isinstance(record, dict):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        host = record.get("host", NULL)
        self.rec("host", host)
        sr = record.get("SR", NULL)
        srr = self.rec("SR", sr)
        config = self._typed("PBD", "device_config", record.get("device_config", {}))
        for p in srr["PBDs"]:
            if self.db["PBD"][p]["host"] == host:
                raise XapiError("PBD_EXISTS", sr, host, p)
        if "SRmaster" in config:
            raise XapiError(
                "VALUE_NOT_SUPPORTED", "SRmaster", config["SRmaster"], "This key is for internal use only"
            )
        # as XAPI's PBD.create: the record's other_config is not kept
        pbd = self.add(
            "PBD", host=host, SR=sr, device_config=config, currently_attached=False, other_config={}
        )
        srr["PBDs"].append(pbd)
        self.rec("host", host)["PBDs"].append(pbd)
        return pbd

    def x_PBD__plug(self, s: str, pbd: str) -> None:
        """SR.attach on the PBD's host: for an NFS SR, what sm's NFSSR.attach does, over the network
        from the host's address (nfssr.attach); a failure is its SR_BACKEND_FAILURE and the PBD stays
        unplugged."""
        p = self.rec("PBD", pbd)
        if p["currently_attached"]:
            return
        srr = self.rec("SR", p["SR"])
        if self.remote(srr):

            def message(name: str, body: str) -> None:
                self.record("message", name=name, cls="SR", obj_uuid=srr["uuid"], body=body)

            host, source = p["host"], self.address(p["host"])
            try:
                p["_mount"] = nfssr.attach(p["device_config"], srr["uuid"], message, source=source)
            except nfssr.SmError as e:
                self.record("sm", op="sr_attach", sr=p["SR"], host=host, ok=False, error=e.description)
                raise XapiError(*e.description) from None
            self.record(
                "sm", op="sr_attach", sr=p["SR"], host=host, source=source, ok=True,
                hardlinks=p["_mount"].hardlinks,
            )  # fmt: skip
        p["currently_attached"] = True

    def x_PBD__unplug(self, s: str, pbd: str) -> None:
        p = self.rec("PBD", pbd)
        if not p["currently_attached"]:
            return
        # as XAPI: refused while a VM on the PBD's host has a VDI of the SR attached
        active = []
        for vm in self.rec("host", p["host"])["resident_VMs"]:
            for vbd in self.db["VM"].get(vm, {}).get("VBDs", []):
                b = self.db["VBD"].get(vbd)
                if b is None or not b["currently_attached"] or b["empty"]:
                    continue
                if self.db["VDI"].get(b["VDI"], {}).get("SR") == p["SR"]:
                    active.append(b["VDI"])
        if active:
            raise XapiError("VDI_IN_USE", *active)
        mount = p.pop("_mount", None)
        if mount is not None:
            mount.umount()
            self.record("sm", op="sr_detach", sr=p["SR"], host=p["host"])
        p["currently_attached"] = False

    def x_PBD__destroy(self, s: str, pbd: str) -> None:
        if self.rec("PBD", pbd)["currently_attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "PBD is currently attached")
        self._drop_pbd(pbd)

    def _drop_pbd(self, pbd: str) -> None:
        p = self.db["PBD"].pop(pbd)
        with contextlib.suppress(KeyError, ValueError):
            self.db["SR"][p["SR"]]["PBDs"].remove(pbd)
        with contextlib.suppress(KeyError, ValueError):
            self.db["host"][p["host"]]["PBDs"].remove(pbd)

    # ------------------------------------------------------------------ VM
    def _vm(self, vm: str) -> dict[str, Any]:
        return self.rec("VM", vm)

    def _bad_power(self, vm: str, expected: str) -> XapiError:
        return XapiError("VM_BAD_POWER_STATE", vm, expected, self._vm(vm)["power_state"].lower())

    def _not_dom0(self, vm: str) -> dict[str, Any]:
        r = self._vm(vm)
        if r["is_control_domain"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "Operations on the control domain are not allowed")
        return r

    def x_VM__create(self, s: str, record: Any) -> str:
        # SIMPLIFIED: fields missing from the record take XAPI's defaults (XAPI wants most of them)
        if not isinstance(record, dict):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        fields = _vm_defaults()
        vals: dict[str, Any] = {}
        for k, v in record.items():
            if k in fields and k not in ("uuid", "VBDs", "VIFs", "snapshots", "power_state", "resident_on"):
                vals[k] = self._typed("VM", k, v)
        m = {k: vals.get(k, fields[k]) for k in fields if k.startswith("memory_") and k != "memory_overhead"}
        self._check_memory(m)
        vals.update(is_a_snapshot=False, snapshot_of=NULL, is_control_domain=False, power_state="Halted")
        return self.add("VM", **vals)

    def x_VM__destroy(self, s: str, vm: str) -> None:
        r = self._not_dom0(vm)
        if r["power_state"] not in ("Halted", "Suspended") or (
            r["power_state"] == "Suspended" and not r["is_a_snapshot"]
        ):
            raise self._bad_power(vm, "halted")
        for vbd in list(r["VBDs"]):
            self._drop_vbd(vbd)
        for vif in list(r["VIFs"]):
            self._drop_vif(vif)
        if r["suspend_VDI"] != NULL and r["suspend_VDI"] in self.db["VDI"]:
            self._drop_vdi(r["suspend_VDI"])
        parent = self.db["VM"].get(r["snapshot_of"])
        if parent is not None and vm in parent["snapshots"]:
            parent["snapshots"].remove(vm)
        del self.db["VM"][vm]

    def x_VM__start(self, s: str, vm: str, paused: bool, force: bool) -> None:
        """Start the VM on its ``affinity`` host if that one is enabled, else on the master.  SIMPLIFIED:
        XAPI places a VM without affinity on any host that has what it needs (memory, SRs, networks)."""
        self._startable(vm)
        affinity = self._vm(vm)["affinity"]
        host = affinity if self.db["host"].get(affinity, {}).get("enabled") else self.host
        self._start(vm, host, paused)

    def x_VM__start_on(self, s: str, vm: str, host: str, paused: bool, force: bool) -> None:
        self._startable(vm)
        self._start(vm, host, paused)

    def _startable(self, vm: str) -> None:
        r = self._not_dom0(vm)
        if r["is_a_template"] or r["is_a_snapshot"]:
            raise XapiError("VM_IS_TEMPLATE", vm)
        if r["power_state"] != "Halted":
            raise self._bad_power(vm, "halted")

    def _start(self, vm: str, host: str, paused: bool) -> None:
        self._can_run_on(vm, host)
        self._open_disks(vm, host)
        boot = self._boot_drives(vm, host) if self.boot_guests and not paused else None
        self._power_on(vm, "Paused" if paused else "Running", host)
        if boot is not None:
            self._boot(vm, boot)

    def _can_run_on(self, vm: str, host: str) -> None:
        """XAPI's assert_can_boot_here, as far as the simulator knows: the host is enabled, and every NFS
        SR of the VM's disks is plugged there (VM_REQUIRES_SR).  SIMPLIFIED: no memory or network
        checks; every host is live."""
        if not self.rec("host", host)["enabled"]:
            raise XapiError("HOST_DISABLED", host)
        for vbd in self._vm(vm)["VBDs"]:
            b = self.db["VBD"][vbd]
            if b["empty"] or b["VDI"] == NULL:
                continue
            sr = self.rec("VDI", b["VDI"])["SR"]
            if self.remote(self.rec("SR", sr)) and self.mount_of(sr, host) is None:
                raise XapiError("VM_REQUIRES_SR", vm, sr)

    def _open_disks(self, vm: str, host: str) -> None:
        """What attaching the VM's disks does on *host*: each VDI of an NFS SR needs its SR plugged there
        (VM_REQUIRES_SR otherwise) and is opened as tapdisk does, reading its first 4 KiB over NFS (the
        SM's VDIUnavailable if the file is gone, TapdiskFailed if it cannot be read)."""
        for vbd in self._vm(vm)["VBDs"]:
            b = self.db["VBD"][vbd]
            if b["empty"] or b["VDI"] == NULL:
                continue
            v = self.rec("VDI", b["VDI"])
            if not self.remote(self.rec("SR", v["SR"])):
                continue
            if self.mount_of(v["SR"], host) is None:
                raise XapiError("VM_REQUIRES_SR", vm, v["SR"])
            remote = self._remote_file(b["VDI"], host)
            assert remote is not None
            mount, name = remote
            try:
                mount.read(name, 0, 4096)
            except nfssr.NfsError as e:
                err = (
                    nfssr.SmError("VDIUnavailable", f"VDI {v['uuid']} not found")
                    if e.status == nfsclient.NOENT
                    else nfssr.SmError("TapdiskFailed", f"{mount.remotepath}/{name}: {e}")
                )
                raise XapiError(*err.description) from None

    def _boot_drives(self, vm: str, host: str) -> list[str] | None:
        """The qemu ``-drive`` values of a VM to boot for real (boot_guests): its disks in userdevice
        order, those of an NFS SR as qemu's nfs:// URLs of their files (what tapdisk opens), others as
        their local files; None if its first disk is not on an NFS SR (such a VM is only simulated).
        SIMPLIFIED: qemu's NFS client connects from the address the kernel picks (127.0.0.1), not from
        the address of the host the VM runs on."""
        vbds = sorted(
            (self.db["VBD"][b] for b in self._vm(vm)["VBDs"]),
            key=lambda b: int(b["userdevice"]) if b["userdevice"].isdigit() else 99,
        )
        drives = []
        for b in vbds:
            if b["type"] != "Disk" or b["empty"] or b["VDI"] == NULL:
                continue
            remote = self._remote_file(b["VDI"], host)
            if remote is None:
                if not drives:
                    return None
                drives.append(f"file={self.vdi_path(b['VDI'])},format=raw,if=virtio")
                continue
            if remote[1].endswith(".vhd"):
                raise XapiError("INTERNAL_ERROR", "the simulator boots raw VDIs only (boot_guests)")
            mount = remote[0]
            url = f"nfs://{mount.server}{posixpath.join(mount.remotepath, remote[1])}"
            drives.append(f"file={url},format=raw,if=virtio,cache=none")
        if not drives:
            return None
        if shutil.which("qemu-system-x86_64") is None:
            raise XapiError("INTERNAL_ERROR", "qemu-system-x86_64 is not installed (boot_guests)")
        return drives

    def _boot(self, vm: str, drives: list[str]) -> None:
        """Run the VM in qemu (tests/testkit/guest.py's boot) in a thread; when qemu ends, the VM is
        Halted, as a guest that powered itself off.  SIMPLIFIED: memory, vCPUs and NICs of the VM are
        not used (the test guest's own 512 MiB, one vCPU, no network)."""
        r = self._vm(vm)
        folder = self.workdir / "guests"
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{r['uuid']}-{r['domid']}"
        run = GuestRun(vm, r["domid"], folder / f"{stem}.serial.log", folder / f"{stem}.pid", drives)
        run.serial.write_bytes(b"")
        self.guests[vm] = run
        run.thread = threading.Thread(target=self._guest_main, args=(run,), name=f"guest {stem}", daemon=True)
        self.record("guest-start", vm=vm, drives=drives, serial=str(run.serial))
        run.thread.start()

    def _guest_main(self, run: GuestRun) -> None:
        from tests.testkit import guest

        outcome: dict[str, Any]
        try:
            res = guest.boot(
                None,
                serial_log=run.serial,
                timeout=self.guest_timeout,
                drive_args=run.drives[0],
                extra_args=[
                    *(a for d in run.drives[1:] for a in ("-drive", d)),
                    "-pidfile",
                    str(run.pidfile),
                ],
            )
            outcome = {"returncode": res.returncode, "boots_seen": res.boots_seen, "seconds": res.seconds}
            outcome["powered_off"] = res.powered_off
            if res.returncode != 0:
                outcome["qemu_output"] = res.qemu_output[-2000:]
        except guest.GuestBootTimeout as e:
            outcome = {"timeout": True, "boots_seen": e.result.boots_seen}
        except Exception as e:  # qemu could not start
            outcome = {"error": repr(e)}
        with self.lock:
            run.outcome = outcome
            r = self.db["VM"].get(run.vm)
            if r is not None and r["domid"] == run.domid and r["power_state"] != "Halted":
                self._power_off(run.vm)
        self.record("guest-exit", vm=run.vm, **outcome)

    def _stop_guest(self, vm: str) -> None:
        """Kill the VM's qemu if it runs (a hard shutdown); only the process this simulator started."""
        run = self.guests.get(vm)
        if run is None or run.thread is None or not run.thread.is_alive():
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and run.thread.is_alive():
            with contextlib.suppress(OSError, ValueError):
                pid = int(run.pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(run.pidfile).encode() in cmdline:
                    os.kill(pid, signal.SIGKILL)
                    return
            time.sleep(0.05)

    def stop_guests(self) -> None:
        """Kill every qemu still running (between tests, at the end) and wait for their threads."""
        with self.lock:
            runs = list(self.guests.values())
            for run in runs:
                self._stop_guest(run.vm)
        for run in runs:
            if run.thread is not None:
                run.thread.join(30)

    def _power_on(self, vm: str, state: str, host: str | None = None) -> None:
        r = self._vm(vm)
        host = host or self.host
        self._domid += 1
        r.update(power_state=state, resident_on=host, domid=self._domid)
        self.rec("host", host)["resident_VMs"].append(vm)
        for vbd in r["VBDs"]:
            self.db["VBD"][vbd]["currently_attached"] = True
        for vif in r["VIFs"]:
            self.db["VIF"][vif]["currently_attached"] = True

    def _power_off(self, vm: str) -> None:
        r = self._vm(vm)
        with contextlib.suppress(KeyError, ValueError):
            self.db["host"][r["resident_on"]]["resident_VMs"].remove(vm)
        r.update(power_state="Halted", resident_on=NULL, domid=-1)
        for vbd in r["VBDs"]:
            self.db["VBD"][vbd]["currently_attached"] = False
        for vif in r["VIFs"]:
            self.db["VIF"][vif]["currently_attached"] = False

    def _reside(self, vm: str, host: str) -> str:
        """The running VM now runs on *host*, with a new domain id (the previous host returned).  A guest
        booted for real keeps its qemu: the new domain is that run (it halts the VM when it ends)."""
        r = self._vm(vm)
        old = r["resident_on"]
        with contextlib.suppress(KeyError, ValueError):
            self.db["host"][old]["resident_VMs"].remove(vm)
        r["resident_on"] = host
        self.rec("host", host)["resident_VMs"].append(vm)
        run = self.guests.get(vm)
        self._domid += 1
        if run is not None and run.domid == r["domid"]:
            run.domid = self._domid
        r["domid"] = self._domid
        return str(old)

    def x_VM__pool_migrate(self, s: str, vm: str, host: str, options: Any) -> None:
        """Live migration of a running VM to another host of the pool: ``resident_on`` and both hosts'
        ``resident_VMs`` change, its disks stay where they are (they must be reachable from *host*: an
        NFS SR plugged there).  Errors as XAPI's: VM_BAD_POWER_STATE unless running, OPERATION_NOT_ALLOWED
        for a control domain, HANDLE_INVALID for an unknown host, HOST_DISABLED, VM_REQUIRES_SR.
        SIMPLIFIED: *options* ("live", "force", ...) are not used; a migration to the host the VM runs on
        does nothing (XAPI does a localhost migration); memory is not checked; a guest really booted
        (boot_guests) keeps its qemu, which is where it was."""
        r = self._vm(vm)
        if r["power_state"] != "Running":
            raise self._bad_power(vm, "running")
        self._not_dom0(vm)
        self.rec("host", host)
        if not isinstance(options, dict):
            raise XapiError("FIELD_TYPE_ERROR", "options")
        self._can_run_on(vm, host)
        if r["resident_on"] == host:
            return
        self._open_disks(vm, host)
        self._reside(vm, host)  # a migrated domain gets a new id on its new host

    def move_vm(self, vm: str, host: str) -> None:
        """HA restarting a VM on *host* (its host failed): it runs there now, with a new domain.  Refused
        (ValueError) for a VM that is not running, or a control domain; XapiError as VM.start_on for a
        host it cannot run on.  SIMPLIFIED: a guest booted for real (boot_guests) keeps its qemu (HA
        boots the VM again)."""
        with self.lock:
            r = self._vm(vm)
            if r["power_state"] not in ("Running", "Paused") or r["is_control_domain"]:
                raise ValueError(f"VM {vm} is {r['power_state']}: only a running VM fails over")
            self._can_run_on(vm, host)
            self._open_disks(vm, host)
            old = self._reside(vm, host)
        self.record("ha-restart", vm=vm, host=host, previous=old)

    def x_VM__clean_shutdown(self, s: str, vm: str) -> None:
        if self._not_dom0(vm)["power_state"] != "Running":
            raise self._bad_power(vm, "running")
        self._stop_guest(vm)  # SIMPLIFIED: a booted guest is not asked to shut down: its qemu is killed
        self._power_off(vm)

    def x_VM__hard_shutdown(self, s: str, vm: str) -> None:
        r = self._not_dom0(vm)
        if r["power_state"] == "Halted" or r["is_a_snapshot"]:
            raise self._bad_power(vm, "running")
        if r["power_state"] == "Suspended" and r["suspend_VDI"] != NULL:
            self._drop_vdi(r["suspend_VDI"])
            r["suspend_VDI"] = NULL
        self._stop_guest(vm)
        self._power_off(vm)

    def x_VM__snapshot(self, s: str, vm: str, new_name: str, *ignore_vdis: Any) -> str:
        return self._snapshot(vm, new_name, list(ignore_vdis[0]) if ignore_vdis else [], checkpoint=False)

    def x_VM__checkpoint(self, s: str, vm: str, new_name: str) -> str:
        if self._vm(vm)["power_state"] != "Running":
            raise self._bad_power(vm, "running")
        return self._snapshot(vm, new_name, [], checkpoint=True)

    def x_VM__snapshot_with_quiesce(self, s: str, vm: str, new_name: str) -> str:
        # SIMPLIFIED: XAPI needs the guest's VSS provider; here the VM's other_config says it has one
        # ("feature-quiesce": "1"); without it, the error current XAPI gives for every VM
        r = self._not_dom0(vm)
        if r["other_config"].get("feature-quiesce") != "1":
            raise XapiError("VM_SNAPSHOT_WITH_QUIESCE_NOT_SUPPORTED", vm)
        if r["power_state"] != "Running":
            raise self._bad_power(vm, "running")
        return self._snapshot(vm, new_name, [], checkpoint=False)

    def _snapshot(self, vm: str, name: Any, ignore: list[str], *, checkpoint: bool) -> str:
        r = self._not_dom0(vm)
        if not isinstance(name, str):
            raise XapiError("FIELD_TYPE_ERROR", "new_name")
        if r["is_a_snapshot"] or r["is_a_template"]:
            # SIMPLIFIED: XAPI's allowed_operations of a snapshot/template lack "snapshot"
            raise XapiError("OPERATION_NOT_ALLOWED", "VM is a snapshot or a template")
        for vbd in r["VBDs"]:  # before anything is made
            b = self.db["VBD"][vbd]
            if b["type"] == "Disk" and not b["empty"] and b["VDI"] != NULL and b["VDI"] not in ignore:
                self._snapshottable(b["VDI"])
        when = now()
        copy = {
            k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in r.items()
            if not k.startswith("_")
        }
        copy.update(
            uuid="",
            name_label=name,
            is_a_snapshot=True,
            is_a_template=True,  # as XAPI: a snapshot is a template
            snapshot_of=vm,
            snapshot_time=when,
            snapshots=[],
            VBDs=[],
            VIFs=[],
            power_state="Suspended" if checkpoint else "Halted",
            resident_on=NULL,
            domid=-1,
            suspend_VDI=NULL,
            allowed_operations=[],
            current_operations={},
        )
        snap = self.add("VM", **copy)
        srec = self.rec("VM", snap)
        for vbd in r["VBDs"]:
            b = self.db["VBD"][vbd]
            vdi = b["VDI"]
            if b["type"] == "Disk" and not b["empty"] and vdi != NULL and vdi not in ignore:
                vdi = self._snapshot_vdi(vdi, when)
            elif b["type"] == "Disk" and vdi in ignore:
                continue
            nb = self.add(
                "VBD",
                **{
                    k: v
                    for k, v in b.items()
                    if k not in ("uuid", "currently_attached") and not k.startswith("_")
                },
            )
            self.db["VBD"][nb].update(VM=snap, VDI=vdi, currently_attached=False)
            srec["VBDs"].append(nb)
            if vdi != NULL:
                self.rec("VDI", vdi)["VBDs"].append(nb)
        for vif in r["VIFs"]:
            v = self.db["VIF"][vif]
            nv = self.add(
                "VIF",
                **{
                    k: x
                    for k, x in v.items()
                    if k not in ("uuid", "currently_attached") and not k.startswith("_")
                },
            )
            self.db["VIF"][nv]["VM"] = snap
            srec["VIFs"].append(nv)
        if checkpoint:
            # SIMPLIFIED: the memory image is a sparse file of memory_static_max bytes (no real RAM
            # contents), a VDI of type "suspend" as XAPI makes; the VM itself keeps running
            sv = self.add(
                "VDI",
                name_label=f"Suspend image for {r['name_label']}",
                SR=self.local_sr,
                type="suspend",
                virtual_size=r["memory_static_max"],
            )
            self.rec("SR", self.local_sr)["VDIs"].append(sv)
            with open(self.vdi_path(sv), "wb") as f:
                f.truncate(r["memory_static_max"])
            srec["suspend_VDI"] = sv
        r["snapshots"].append(snap)
        return snap

    def _snapshot_vdi(self, vdi: str, when: Any) -> str:
        v = self.rec("VDI", vdi)
        if v["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        keep = {k: x for k, x in v.items() if not k.startswith("_") and k not in ("uuid", "location")}
        keep.update(
            VBDs=[],
            snapshots=[],
            is_a_snapshot=True,
            snapshot_of=vdi,
            snapshot_time=when,
            other_config=dict(v["other_config"]),
            sm_config=dict(v["sm_config"]),
            cbt_enabled=v["cbt_enabled"],
        )
        snap = self.add("VDI", **keep)
        sparse_copy(self.vdi_path(vdi), self.vdi_path(snap))
        srec = self.rec("VDI", snap)
        if v["cbt_enabled"] and v.get("_cbt_epoch"):
            # the snapshot keeps the CBT state of this moment: the block map of its (identical) copy
            self._cbt_seq += 1
            size, digests = cbt.block_map(str(self.vdi_path(snap)))
            srec["_cbt"] = {"epoch": v["_cbt_epoch"], "seq": self._cbt_seq, "size": size, "digests": digests}
        srec["physical_utilisation"] = self._allocated(snap)
        v["snapshots"].append(snap)
        self.rec("SR", v["SR"])["VDIs"].append(snap)
        return snap

    def _allocated(self, vdi: str) -> int:
        try:
            return os.stat(self.vdi_path(vdi)).st_blocks * 512
        except FileNotFoundError:
            return 0

    # ------------------------------------------------------------------ VBD, VIF
    def x_VBD__create(self, s: str, record: Any) -> str:
        if not isinstance(record, dict):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        vm = record.get("VM", NULL)
        vmr = self._vm(vm)
        vdi = record.get("VDI", NULL) or NULL
        if vdi != NULL:
            self.rec("VDI", vdi)
        vals = {
            k: self._typed("VBD", k, v) for k, v in record.items() if k in DEFAULTS["VBD"]() and k != "uuid"
        }
        used = {self.db["VBD"][b]["userdevice"] for b in vmr["VBDs"]}
        dev = vals.get("userdevice", "0")
        if dev == "autodetect":
            dev = next(str(i) for i in range(64) if str(i) not in used)
        if dev in used:
            raise XapiError("DEVICE_ALREADY_EXISTS", dev)
        vals.update(
            VM=vm,
            VDI=vdi,
            userdevice=dev,
            # SIMPLIFIED: the device name is derived at once (XAPI fills it when the VBD is plugged)
            device="xvd" + chr(ord("a") + int(dev)) if dev.isdigit() and int(dev) < 26 else "",
            currently_attached=False,
            empty=vdi == NULL or bool(vals.get("empty", False)),
        )
        vbd = self.add("VBD", **vals)
        vmr["VBDs"].append(vbd)
        if vdi != NULL:
            self.rec("VDI", vdi)["VBDs"].append(vbd)
        return vbd

    def _drop_vbd(self, vbd: str) -> None:
        b = self.db["VBD"].pop(vbd)
        with contextlib.suppress(KeyError, ValueError):
            self.db["VM"][b["VM"]]["VBDs"].remove(vbd)
        with contextlib.suppress(KeyError, ValueError):
            self.db["VDI"][b["VDI"]]["VBDs"].remove(vbd)

    def x_VBD__destroy(self, s: str, vbd: str) -> None:
        if self.rec("VBD", vbd)["currently_attached"]:
            # SIMPLIFIED: the check only (XAPI also refuses while an operation is in progress)
            raise XapiError("OPERATION_NOT_ALLOWED", "VBD is currently attached")
        self._drop_vbd(vbd)

    def x_VIF__create(self, s: str, record: Any) -> str:
        if not isinstance(record, dict):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        vmr = self._vm(record.get("VM", NULL))
        self.rec("network", record.get("network", NULL))
        vals = {
            k: self._typed("VIF", k, v) for k, v in record.items() if k in DEFAULTS["VIF"]() and k != "uuid"
        }
        if vals.get("device", "0") in {self.db["VIF"][v]["device"] for v in vmr["VIFs"]}:
            raise XapiError("DEVICE_ALREADY_EXISTS", vals.get("device", "0"))
        mac = vals.get("MAC", "")
        if not mac:
            vals["MAC"] = "da:" + ":".join(f"{random.randrange(256):02x}" for _ in range(5))
            vals["MAC_autogenerated"] = True
        else:
            parts = mac.split(":")
            if len(parts) != 6 or not all(
                len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
            ):
                raise XapiError("MAC_INVALID", mac)
            vals["MAC_autogenerated"] = False
        vals["currently_attached"] = False
        vif = self.add("VIF", **vals)
        vmr["VIFs"].append(vif)
        self.rec("network", vals["network"])["VIFs"].append(vif)
        return vif

    def _drop_vif(self, vif: str) -> None:
        v = self.db["VIF"].pop(vif)
        with contextlib.suppress(KeyError, ValueError):
            self.db["VM"][v["VM"]]["VIFs"].remove(vif)
        with contextlib.suppress(KeyError, ValueError):
            self.db["network"][v["network"]]["VIFs"].remove(vif)

    def x_VIF__destroy(self, s: str, vif: str) -> None:
        if self.rec("VIF", vif)["currently_attached"]:
            raise XapiError("OPERATION_NOT_ALLOWED", "VIF is currently attached")
        self._drop_vif(vif)

    # ------------------------------------------------------------------ VDI
    def x_VDI__create(self, s: str, record: Any) -> str:
        if not isinstance(record, dict):
            raise XapiError("FIELD_TYPE_ERROR", "args")
        if record.get("type") == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", "", "cbt_metadata")
        sr = record.get("SR", NULL)
        self.rec("SR", sr)
        size = as_int(record.get("virtual_size", 0), "virtual_size")
        if size < 0:
            raise XapiError("FIELD_TYPE_ERROR", "virtual_size")
        keep = ("name_label", "name_description", "type", "sharable", "read_only", "other_config")
        keep += ("xenstore_data", "sm_config", "tags")
        vals = {k: self._typed("VDI", k, record[k]) for k in keep if k in record}
        return self.new_vdi(sr, size, **vals)

    def new_vdi(self, sr: str, size: int, **vals: Any) -> str:
        if self.remote(self.rec("SR", sr)):
            # SIMPLIFIED: no VDI.create on an NFS SR (the SM would create <uuid>.vhd over NFS)
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)
        vdi = self.add("VDI", SR=sr, virtual_size=size, **vals)
        self.rec("SR", sr)["VDIs"].append(vdi)
        with open(self.vdi_path(vdi), "wb") as f:
            f.truncate(size)
        return vdi

    def _drop_vdi(self, vdi: str, *, files: bool = True, vbds: bool = True) -> None:
        """The VDI's record gone; with *files*, a local VDI's file too; with *vbds*, its VBDs too (else
        they are left pointing at it, as XAPI's Db.VDI.destroy leaves them)."""
        v = self.db["VDI"].pop(vdi)
        if self.nbd is not None:
            self.nbd.vdi_gone(vdi)
        sr = self.db["SR"].get(v["SR"], {})
        if files and "_dir" in sr:
            with contextlib.suppress(FileNotFoundError):
                (sr["_dir"] / f"{v['uuid']}.raw").unlink()
        with contextlib.suppress(KeyError, ValueError):
            self.db["SR"][v["SR"]]["VDIs"].remove(vdi)
        with contextlib.suppress(KeyError, ValueError):
            self.db["VDI"][v["snapshot_of"]]["snapshots"].remove(vdi)
        for vbd in list(v["VBDs"]) if vbds else []:
            if vbd in self.db["VBD"]:
                self._drop_vbd(vbd)

    def x_VDI__destroy(self, s: str, vdi: str) -> None:
        self.rec("VDI", vdi)
        if self.attached_to_running(vdi):
            raise XapiError("VDI_IN_USE", vdi, "destroy")
        self._delete_vdi(vdi)  # as XAPI: the VDI's (unplugged) VBDs go with it

    def _delete_vdi(self, vdi: str) -> None:
        """The SM's vdi_delete, then the record: an NFS SR's VDI file is removed over NFS (a file already
        gone is no error, as FileVDI.delete)."""
        remote = self._remote_file(vdi)
        if remote is not None:
            mount, name = remote
            try:
                mount.remove(name)
            except nfssr.NfsError as e:
                if e.status != nfsclient.NOENT:
                    err = nfssr.SmError("VDIDelete", f"Failed to unlink file during deleting VDI: {e}")
                    raise XapiError(*err.description) from None
            self.record("sm", op="vdi_delete", sr=self.rec("VDI", vdi)["SR"], file=name)
        self._drop_vdi(vdi)

    def x_VDI__copy(self, s: str, vdi: str, sr: str, *rest: Any) -> str:
        """VDI.copy(vdi, sr[, base_vdi, into_vdi]) (the last two are XAPI's newer, optional parameters):
        the VDI's bytes into a new VDI on *sr*, or into *into_vdi*.  SIMPLIFIED: with base_vdi the whole
        VDI is copied (XAPI copies only the blocks that differ from base_vdi: the same result when
        into_vdi holds base_vdi's bytes, which is what base_vdi is for)."""
        base_vdi = rest[0] if rest else NULL
        into_vdi = rest[1] if len(rest) > 1 else NULL
        src = self._not_cbt_metadata(vdi)
        if not src["managed"]:
            raise XapiError("VDI_NOT_MANAGED", vdi)
        if any(
            self.db["VBD"][b]["currently_attached"] and self.db["VBD"][b]["mode"] == "RW"
            for b in src["VBDs"]
            if b in self.db["VBD"]
        ):
            raise XapiError("VDI_IN_USE", vdi, "copy")
        if base_vdi != NULL:
            self.rec("VDI", base_vdi)
        if into_vdi != NULL:
            dst = self.rec("VDI", into_vdi)
            if dst["read_only"]:
                raise XapiError("VDI_READONLY", into_vdi)
            if dst["virtual_size"] < src["virtual_size"]:
                raise XapiError("VDI_TOO_SMALL", into_vdi, str(src["virtual_size"]))
            self.vdi_path(into_vdi)  # a VDI of a local-file SR (see vdi_path)
            self._copy_bytes(vdi, into_vdi, lambda e: XapiError("VDI_COPY_FAILED", str(e)))
            return into_vdi
        self.rec("SR", sr)
        new = self.new_vdi(
            sr,
            src["virtual_size"],
            name_label=src["name_label"],
            name_description=src["name_description"],
            type=src["type"],
            sharable=src["sharable"],
            read_only=False,  # as XAPI: the copy is writable even if the source is not
            other_config=dict(src["other_config"]),
            xenstore_data=dict(src["xenstore_data"]),
            tags=list(src["tags"]),
        )
        try:
            self._copy_bytes(vdi, new, lambda e: XapiError("VDI_COPY_FAILED", str(e)))
        except BaseException:
            if new in self.db["VDI"]:
                self._drop_vdi(new)
            raise
        return new

    x_VDI__copy.optional = 2  # type: ignore[attr-defined]

    def x_VDI__pool_migrate(self, s: str, vdi: str, sr: str, options: Any) -> str:
        """Live storage migration of a VDI of a VM (running or not, as current XAPI): its bytes into a
        new VDI on *sr*, the VM's VBD moved to it, the source deleted as the SM deletes (for an NFS SR:
        REMOVE of its file).  The new VDI's ref is the result.  SIMPLIFIED: the bytes are copied once,
        the VBD then moved (XAPI mirrors the guest's writes meanwhile); a guest really booted
        (boot_guests) keeps the drive it started with until it powers off."""
        v = self.rec("VDI", vdi)
        self.rec("SR", sr)
        if not isinstance(options, dict):
            raise XapiError("FIELD_TYPE_ERROR", "options")
        vbds = [b for b in v["VBDs"] if b in self.db["VBD"]]
        if not vbds:
            raise XapiError("VDI_NEEDS_VM_FOR_MIGRATE", vdi)
        if v["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        if v["cbt_enabled"]:
            raise XapiError("VDI_CBT_ENABLED", vdi)
        vm = self.db["VBD"][vbds[0]]["VM"]
        if self._vm(vm)["power_state"] == "Paused":
            raise self._bad_power(vm, "running")
        if v["SR"] == sr:
            return vdi  # nothing to move
        if self.remote(self.rec("SR", sr)):
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", sr)  # SIMPLIFIED: see new_vdi
        new = self.new_vdi(
            sr,
            v["virtual_size"],
            name_label=v["name_label"],
            name_description=v["name_description"],
            type=v["type"],
            sharable=v["sharable"],
            read_only=v["read_only"],
            other_config=dict(v["other_config"]),
            xenstore_data=dict(v["xenstore_data"]),
            tags=list(v["tags"]),
        )
        try:
            self._copy_bytes(vdi, new, lambda e: XapiError("MIRROR_FAILED", vdi))
            if vdi not in self.db["VDI"]:
                raise XapiError("HANDLE_INVALID", "VDI", vdi)  # destroyed while it was being copied
        except BaseException:
            if new in self.db["VDI"]:
                self._drop_vdi(new)
            raise
        for b in list(v["VBDs"]):
            rb = self.db["VBD"].get(b)
            if rb is not None and rb["VM"] == vm:
                rb["VDI"] = new
                v["VBDs"].remove(b)
                self.rec("VDI", new)["VBDs"].append(b)
        self.rec("VDI", new)["physical_utilisation"] = self._allocated(new)
        self._delete_vdi(vdi)
        return new

    def _copy_bytes(self, vdi: str, dst: str, failure: Callable[[Exception], XapiError]) -> None:
        """The bytes of *vdi* (over NFS for a VDI of an NFS SR, READ by READ; else its file) into the
        local file of *dst*, all-zero 64 KiB blocks left as holes.  The API lock is let go meanwhile
        (the task's progress moves); *failure* makes the error of a failed read."""
        size = self.rec("VDI", vdi)["virtual_size"]
        task = self._current_task
        remote = self._remote_file(vdi)
        if remote is not None and not remote[1].endswith(".raw"):
            raise XapiError("VDI_COPY_FAILED", "the simulator copies raw VDIs only")  # SIMPLIFIED
        dst_path = self.vdi_path(dst)
        limit = self.rec("VDI", dst)["virtual_size"]

        def progress(done: int) -> None:
            with self.lock:
                t = self.db["task"].get(task) if task else None
                if t is not None and size:
                    t["progress"] = round(0.95 * done / size, 3)

        def local_pieces(path: Path) -> Iterator[bytes]:
            with open(path, "rb") as f:
                pos = 0
                while pos < size:
                    piece = f.read(min(PIECE, size - pos)) or bytes(min(PIECE, size - pos))
                    pos += len(piece)
                    progress(pos)
                    yield piece

        pieces = (
            remote[0].pieces(remote[1], size, progress)
            if remote is not None
            else local_pieces(self.vdi_path(vdi))
        )  # generators: nothing is read before the lock is let go
        with self._unlocked():
            fd = os.open(dst_path, os.O_WRONLY)
            try:
                copied = write_sparse(fd, pieces, limit)
            except (nfssr.NfsError, OSError, ValueError) as e:
                raise failure(e) from None
            finally:
                os.close(fd)
        self.record("vdi-copy", vdi=vdi, dst=dst, bytes=copied, nfs=remote is not None)

    def _not_cbt_metadata(self, vdi: str) -> dict[str, Any]:
        v = self.rec("VDI", vdi)
        if v["type"] == "cbt_metadata":
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, "cbt_metadata")
        return v

    def x_VDI__resize(self, s: str, vdi: str, size: Any) -> None:
        v = self._not_cbt_metadata(vdi)
        new = as_int(size, "size")
        if self.attached_to_running(vdi):
            raise XapiError("VDI_IN_USE", vdi, "resize")
        if new < v["virtual_size"]:
            # SIMPLIFIED: the SM backend's refusal to shrink (FileSR: error 79, "VDI Invalid size")
            raise XapiError(
                "SR_BACKEND_FAILURE_79", "", "VDI Invalid size [opterr=shrinking not allowed]", ""
            )
        os.truncate(self.vdi_path(vdi), new)
        v["virtual_size"] = new

    def x_VDI__snapshot(self, s: str, vdi: str, driver_params: Any) -> str:
        self._not_cbt_metadata(vdi)
        self._snapshottable(vdi)
        return self._snapshot_vdi(vdi, now())

    def _snapshottable(self, vdi: str) -> None:
        """FileVDI._do_snapshot refuses a raw VDI (an NFS SR's VDI the simulator has is raw, or a VHD it
        does not snapshot: see vdi_path)."""
        remote = self._remote_file(vdi)
        if remote is not None and remote[1].endswith(".raw"):
            raise XapiError(*nfssr.SmError("Unimplemented").description)

    def x_VDI__enable_cbt(self, s: str, vdi: str) -> None:
        v = self._cbt_switchable(vdi)
        if not v["cbt_enabled"]:
            v["cbt_enabled"] = True
            v["_cbt_epoch"] = str(uuid.uuid4())  # a new CBT log: earlier snapshots are unrelated to it

    def x_VDI__disable_cbt(self, s: str, vdi: str) -> None:
        v = self._cbt_switchable(vdi)
        v["cbt_enabled"] = False
        v["_cbt_epoch"] = None

    def _cbt_switchable(self, vdi: str) -> dict[str, Any]:
        v = self._not_cbt_metadata(vdi)
        if self.rec("SR", v["SR"])["type"] not in ("ext", "nfs", "lvm", "lvmoiscsi", "lvmohba"):
            raise XapiError("SR_OPERATION_NOT_SUPPORTED", v["SR"])
        if v["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is a snapshot: {vdi}")
        if v["type"] not in ("user", "system"):
            raise XapiError("VDI_INCOMPATIBLE_TYPE", vdi, v["type"])
        return v

    def disable_cbt_behind_back(self, vdi: str) -> None:
        """Fault: XAPI/SM turned CBT off on its own (as after a failed CBT log write): the log is gone."""
        with self.lock:
            v = self.rec("VDI", vdi)
            v["cbt_enabled"] = False
            v["_cbt_epoch"] = None
        self.record("cbt-disabled-behind-back", vdi=vdi)

    def _cbt_state(self, vdi: str) -> dict[str, Any] | None:
        v = self.rec("VDI", vdi)
        if v["is_a_snapshot"] or v["type"] == "cbt_metadata":
            return v.get("_cbt") if v["cbt_enabled"] else None
        if not v["cbt_enabled"] or not v.get("_cbt_epoch"):
            return None
        size, digests = cbt.block_map(str(self.vdi_path(vdi)))
        return {"epoch": v["_cbt_epoch"], "seq": float("inf"), "size": size, "digests": digests}

    def x_VDI__list_changed_blocks(self, s: str, vdi_from: str, vdi_to: str) -> str:
        self.rec("VDI", vdi_from)
        to = self.rec("VDI", vdi_to)
        if self.attached_to_running(vdi_to):
            raise XapiError("VDI_IN_USE", vdi_to, "list_changed_blocks")

        def sm_error(why: str) -> XapiError:  # SM's CBTChangedBlocksError (code 460)
            return XapiError(
                "SR_BACKEND_FAILURE_460",
                "",
                f"Failed to calculate changed blocks for given VDIs. [opterr={why}]",
                "",
            )

        if to["uuid"] == self.rec("VDI", vdi_from)["uuid"]:
            raise sm_error("Source and target VDI are same")
        a, b = self._cbt_state(vdi_from), self._cbt_state(vdi_to)
        # as SM: walk the CBT log chain from vdi_from forward; vdi_to must be on it
        if a is None or b is None or a["epoch"] != b["epoch"] or a["seq"] >= b["seq"]:
            raise sm_error("Source and target VDI are unrelated")
        # SIMPLIFIED: a block is "changed" when its content differs (real CBT marks every write, even
        # one that put back the same bytes)
        d = cbt._DIGEST
        nblocks = (b["size"] + BLOCK - 1) // BLOCK
        bits = bytearray((nblocks + 7) // 8)
        for i in range(nblocks):
            if a["digests"][i * d : (i + 1) * d] != b["digests"][i * d : (i + 1) * d]:
                bits[i // 8] |= 0x80 >> (i % 8)  # block i is bit i, most significant bit first
        return base64.b64encode(bytes(bits)).decode()

    def x_VDI__data_destroy(self, s: str, vdi: str) -> None:
        v = self.rec("VDI", vdi)
        if not v["is_a_snapshot"]:
            raise XapiError("OPERATION_NOT_ALLOWED", f"VDI is not a snapshot: {vdi}")
        if not v["cbt_enabled"]:
            raise XapiError("VDI_NO_CBT_METADATA", vdi)
        if self.attached_to_running(vdi):
            raise XapiError("VDI_IN_USE", vdi, "data_destroy")
        if v["type"] == "cbt_metadata":
            return
        for vbd in list(v["VBDs"]):  # as XAPI: the VDI's VBDs (of the snapshot VM) are destroyed
            self._drop_vbd(vbd)
        if self.nbd is not None:
            self.nbd.vdi_gone(vdi)
        with contextlib.suppress(FileNotFoundError):
            self.vdi_path(vdi).unlink()
        v.update(type="cbt_metadata", physical_utilisation=0)

    def x_VDI__get_nbd_info(self, s: str, vdi: str) -> list[dict[str, Any]]:
        self._not_cbt_metadata(vdi)
        nets = [n for n in self.db["network"].values() if n.get("_pif")]
        secure = any("nbd" in n["purpose"] for n in nets)
        insecure = any("insecure_nbd" in n["purpose"] for n in nets)
        if not (secure or insecure) or self.nbd is None:
            return []
        session = self._current_session or ""
        port, exportname = self.nbd.export(
            vdi, self.vdi_path(vdi), self.rec("VDI", vdi)["uuid"], session, tls=secure
        )
        return [
            {
                "address": self.address(self.host),  # SIMPLIFIED: the master serves local-file SRs
                "port": port,
                "exportname": exportname,
                "cert": self.server_cert_pem,
                "subject": "localhost",
            }
        ]

    # ------------------------------------------------------------------ HTTP handlers' helpers
    def vdi_for_http(self, ident: str) -> str:
        with self.lock:
            if ident in self.db["VDI"]:
                return ident
            for ref, r in self.db["VDI"].items():
                if r["uuid"] == ident:
                    return ref
        raise XapiError("HANDLE_INVALID", "VDI", ident)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(PIECE):
            h.update(piece)
    return h.hexdigest()
