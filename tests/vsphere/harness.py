"""The vSphere test peer: vcsim (built from tests/vcsim/main.go) behind the HTTPS proxy
(tests/vsphere/proxy.py), plus helpers that lay VMs and disks out on its datastores as ESXi does."""

from __future__ import annotations

import gc
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.testkit.tls import server_certs
from tests.vsphere import build
from tests.vsphere.proxy import NfsExport, Proxy, descriptor_extents, sparse_copy, vmdk_descriptor

USER = "administrator@vsphere.local"
MiB = 1 << 20


def _tls(workdir: Path) -> tuple[ssl.SSLContext, Path]:
    """A test CA and a server certificate it signed (127.0.0.1, ::1, localhost); returns the server's
    TLS context and the CA's PEM file (what a client that verifies is given)."""
    certs = server_certs(workdir, ca_name="vmrecover test vCenter CA")
    return certs.server_context(), certs.ca_file


def pyvmomi_connect(connect: Callable[[], Any]) -> Any:
    """Run a pyvmomi connect: its result, or its exception without the traceback.

    pyvmomi leaves the response of its vimServiceVersions.xml request unclosed, and on a failed login
    its whole connection, referenced from the traceback's frames; they are released here with their
    ResourceWarning silenced, instead of surfacing in whichever test runs the garbage collector."""
    err: Exception | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return connect()
        except Exception as e:
            err = e.with_traceback(None)
        finally:
            gc.collect()
    raise err


class VSphere:
    """A running vcsim behind the HTTPS proxy; what a test (or the product) talks to.

    ``url``, ``host``, ``port``, ``user``, ``password``: what ``vmrecover hypervisor add`` is given
    (the password only through stdin or the environment, never a command line); ``ca_file`` is the
    CA that signed the proxy's certificate (verification fails without it, as against a vCenter with
    its own CA); ``proxy`` has the log of the calls answered by the proxy and the fault switches.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.user = USER
        self.password = secrets.token_urlsafe(12)
        self.host = "127.0.0.1"
        binary = build.vcsim_binary()
        ds_dir = workdir / "datastores"
        ds_dir.mkdir(parents=True, exist_ok=True)
        self._vcsim_log = open(workdir / "vcsim.log", "wb")  # noqa: SIM115 (lives as long as vcsim)
        self.vcsim = subprocess.Popen(
            [str(binary), "-dir", str(ds_dir), "-user", self.user, "-password", self.password],
            stdout=subprocess.PIPE,
            stderr=self._vcsim_log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert self.vcsim.stdout is not None
        line = self.vcsim.stdout.readline()
        if not line:
            self.vcsim.wait()
            raise RuntimeError(f"vcsim did not start: {(workdir / 'vcsim.log').read_text()}")
        info = json.loads(line)
        self.vcsim_url: str = info["url"]
        self.datastore_folders: dict[str, str] = info["datastores"]
        hostport = self.vcsim_url.split("//", 1)[1].split("/", 1)[0]
        vhost, vport = hostport.rsplit(":", 1)
        tls, self.ca_file = _tls(workdir)
        self.proxy = Proxy((vhost, int(vport)), self.user, self.password, tls, workdir)
        self.proxy.start()
        self.port = self.proxy.port
        self.url = f"https://{self.host}:{self.port}/sdk"
        self._si: Any = None

    # ------------------------------------------------------------------ life
    def close(self) -> None:
        if self._si is not None:
            from pyVim.connect import Disconnect

            pyvmomi_connect(lambda: Disconnect(self._si))
        self.proxy.stop()
        self.proxy.vim.close_thread_connection()
        if self.vcsim.poll() is None:
            os.killpg(self.vcsim.pid, signal.SIGTERM)
            try:
                self.vcsim.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.vcsim.pid, signal.SIGKILL)
                self.vcsim.wait()
        if self.vcsim.stdout is not None:
            self.vcsim.stdout.close()
        self._vcsim_log.close()

    @property
    def vmware_url(self) -> str:
        """``vmware://user@host:port`` as ``vmrecover hypervisor add`` takes it."""
        return f"vmware://{self.user}@{self.host}:{self.port}"

    @property
    def log(self) -> list[dict[str, Any]]:
        return self.proxy.log

    # ------------------------------------------------------------------ pyvmomi
    def connect(self, *, user: str | None = None, password: str | None = None) -> Any:
        """A new pyvmomi ServiceInstance through the proxy (certificate not verified)."""
        from pyVim.connect import SmartConnect

        return pyvmomi_connect(
            lambda: SmartConnect(
                host=self.host,
                port=self.port,
                user=user or self.user,
                pwd=password if password is not None else self.password,
                disableSslCertValidation=True,
            )
        )

    @property
    def si(self) -> Any:
        """The harness's own session (through the proxy, so its calls are real SOAP too)."""
        if self._si is None:
            self._si = self.connect()
        return self._si

    def obj(self, kind: str, moref: str) -> Any:
        from pyVmomi import vim

        return getattr(vim, kind)(moref, self.si._stub)

    def props(self, obj: Any, *paths: str) -> dict[str, Any]:
        """Properties read through the PropertyCollector (an unset one is simply missing)."""
        from pyVmomi import vmodl

        pc = self.si.content.propertyCollector
        spec = vmodl.query.PropertyCollector.FilterSpec(
            objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj)],
            propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=list(paths))],
        )
        res = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
        return {p.name: p.val for p in res.objects[0].propSet} if res and res.objects else {}

    def wait(self, task: Any, timeout: float = 60) -> Any:
        """Wait for a task (polling info.state: pyvmomi cannot decode some of vcsim's task infos)."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.props(task, "info.state")
            if p.get("info.state") in ("success", "error"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task} still {p.get('info.state')}")
            time.sleep(0.02)
        info = self.props(task, "info.result", "info.error")
        if p["info.state"] == "error":
            raise RuntimeError(f"task failed: {info.get('info.error')}")
        return info.get("info.result")

    def find(self, kind: str, name: str) -> Any:
        from pyVmomi import vim

        content = self.si.content
        view = content.viewManager.CreateContainerView(content.rootFolder, [getattr(vim, kind)], True)
        try:
            for o in view.view:
                if self.props(o, "name").get("name") == name:
                    return o
        finally:
            view.DestroyView()
        raise KeyError(f"no {kind} named {name}")

    # ------------------------------------------------------------------ inventory helpers
    def datastore_dir(self, name: str) -> Path:
        """The local folder behind a datastore (for an NFS datastore: the symlink to what it serves)."""
        dss = self.proxy.datastores()
        return Path(dss[name][1])

    def make_vm(
        self,
        name: str,
        disks: list[Path | int] | None = None,
        *,
        datastore: str = "LocalDS_0",
        host: str = "DC0_C0_H0",
        cbt: bool = False,
        power_on: bool = False,
        guest_os: str = "otherLinux64Guest",
        memory_mb: int = 256,
        cpus: int = 1,
    ) -> str:
        """Create a VM through the API and lay its disks out as ESXi does; returns its moref ("vm-57").

        Each disk is a raw image (copied, sparse where the image is) or a size in bytes (empty, sparse);
        sizes must be whole KiB.  Disk i is ``[datastore] name/name.vmdk`` (then ``name_1.vmdk`` ...): a
        text descriptor naming ``name-flat.vmdk`` (``RW <sectors> VMFS``), the raw bytes beside it.
        """
        from pyVmomi import vim

        sizes = [d if isinstance(d, int) else os.path.getsize(d) for d in disks or []]
        for s in sizes:
            if s <= 0 or s % 1024:
                raise ValueError(f"disk size {s} is not a positive whole number of KiB")
        h = self.find("HostSystem", host)
        pool = self.props(self.props(h, "parent")["parent"], "resourcePool")["resourcePool"]
        dc = self.find("Datacenter", "DC0")
        folder = self.props(dc, "vmFolder")["vmFolder"]
        changes = [
            vim.vm.device.VirtualDeviceSpec(
                operation="add",
                device=vim.vm.device.ParaVirtualSCSIController(key=-100, busNumber=0, sharedBus="noSharing"),
            )
        ]
        for i, size in enumerate(sizes):
            disk = vim.vm.device.VirtualDisk(
                key=-1 - i,
                controllerKey=-100,
                unitNumber=i if i < 7 else i + 1,  # unit 7 is the controller's own
                capacityInKB=size // 1024,
                capacityInBytes=size,
                backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[{datastore}]", diskMode="persistent", thinProvisioned=True
                ),
            )
            changes.append(
                vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk)
            )
        spec = vim.vm.ConfigSpec(
            name=name,
            guestId=guest_os,
            numCPUs=cpus,
            memoryMB=memory_mb,
            changeTrackingEnabled=cbt,
            files=vim.vm.FileInfo(vmPathName=f"[{datastore}]"),
            deviceChange=changes,
        )
        vm = self.wait(folder.CreateVM_Task(config=spec, pool=pool, host=h))
        for i, src in enumerate(disks or []):
            flat = self.disk_file(vm._moId, i)
            desc = self.disk_descriptor(vm._moId, i)
            desc.write_text(vmdk_descriptor(flat.name, sizes[i]))
            if isinstance(src, int):
                with open(flat, "wb") as f:
                    f.truncate(src)
            else:
                sparse_copy(Path(src), flat)
        if power_on:
            self.wait(vm.PowerOnVM_Task())
        return str(vm._moId)

    def _disk_devices(self, vm: str) -> list[Any]:
        from pyVmomi import vim

        devices = self.props(self.obj("VirtualMachine", vm), "config.hardware.device")[
            "config.hardware.device"
        ]
        disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
        return sorted(disks, key=lambda d: (d.controllerKey, d.unitNumber or 0))

    def disk_path(self, vm: str, i: int) -> str:
        """Disk *i*'s datastore path ('[LocalDS_0] vm/vm.vmdk'), in controller/unit order."""
        return str(self._disk_devices(vm)[i].backing.fileName)

    def disk_descriptor(self, vm: str, i: int) -> Path:
        return self.proxy.local_path(self.disk_path(vm, i))

    def disk_file(self, vm: str, i: int) -> Path:
        """Disk *i*'s flat file (its bytes), e.g. to write into it between two backups."""
        desc = self.disk_descriptor(vm, i)
        extents = descriptor_extents(desc)
        return extents[0] if extents else desc.with_name(desc.name.replace(".vmdk", "-flat.vmdk"))

    def guest_root(self, vm: str) -> Path:
        """The folder standing for the guest's filesystem in guest operations ('/etc/x' is
        ``guest_root(vm) / 'etc/x'``; 'C:\\x' is ``guest_root(vm) / 'C:/x'``)."""
        root = self.proxy.guest_root(vm)
        root.mkdir(parents=True, exist_ok=True)
        return root

    def set_guest_credentials(self, vm: str, user: str, password: str) -> None:
        """What guest operations on *vm* accept (anything else: InvalidGuestLogin; unset: none)."""
        self.proxy.guest_credentials[vm] = (user, password)

    def add_nfs_export(
        self,
        folder: Path,
        *,
        host: str = "127.0.0.1",
        path: str = "/vmrecover",
        nfs_port: int | None = None,
        mount_port: int | None = None,
    ) -> None:
        """Wire an NFS export to the local folder it serves, for CreateNasDatastore: a datastore of
        nfs://host/path[/sub] becomes a symlink to folder[/sub].  The export must really answer NFSv3
        (checked with nfs-ls at CreateNasDatastore); with the ports given, no portmapper is needed."""
        self.proxy.add_nfs_export(NfsExport(host, path, Path(folder), nfs_port, mount_port))

    def answered(self, method: str, **match: Any) -> list[dict[str, Any]]:
        """Log entries of calls the proxy answered or completed itself (see tests/vsphere/proxy.py)."""
        return self.proxy.calls(method, **match)

    def reset(self) -> None:
        """Fault switches off, guest credentials and NFS wiring kept (between tests)."""
        self.proxy.reset_faults()


@contextmanager
def running(workdir: Path) -> Iterator[VSphere]:
    vs = VSphere(workdir)
    try:
        yield vs
    finally:
        vs.close()
        shutil.rmtree(workdir / "nas", ignore_errors=True)  # symlinks into mounts: never walk them later
