"""The XAPI simulator as a test peer: servers, NBD exports, inventory helpers and fault switches."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import secrets
import shutil
import time
import xmlrpc.client
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.testkit.tls import ServerCerts
from tests.xapi.api import NULL, Xapi, sparse_copy
from tests.xapi.nbd import NbdExports
from tests.xapi.server import XapiServer

USER = "root"


def _session_class() -> type:
    import XenAPI

    class Session(XenAPI.Session):
        """XenAPI.Session that is a context manager: logs out and closes its connection."""

        def __enter__(self) -> Session:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.close()

        def close(self) -> None:
            with suppress(Exception):
                if self._session is not None:
                    self.xenapi.session.logout()
            self("close")()

    return Session


def host_certs(workdir: Path, hosts: list[tuple[str, list[str]]]) -> list[ServerCerts]:
    """One test CA (``ca.pem``) and, per host (common name, names and IP addresses), a server certificate
    it signed (``<cn>-cert.pem``, ``<cn>-key.pem``, ``<cn>.pem``): what a pool whose hosts have
    certificates of the user's CA looks like.  One ``ca_file`` verifies every host, each under its own
    address only.  (tests/testkit/tls.py's certificates name 127.0.0.1 only.)"""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmrecover test XenServer CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file = workdir / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out = []
    for cn, names in hosts:
        sans: list[x509.GeneralName] = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        files = [workdir / f"{cn}-cert.pem", workdir / f"{cn}-key.pem", workdir / f"{cn}.pem"]
        files[0].write_bytes(cert_pem)
        for path, data in ((files[1], key_pem), (files[2], cert_pem + key_pem)):
            path.write_bytes(data)
            os.chmod(path, 0o600)
        out.append(ServerCerts(ca_file, *files))
    return out


class XapiSim:
    """A running XAPI simulator (a pool of two hosts); what a test and the product talk to."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.user = USER
        self.password = secrets.token_urlsafe(12)
        self.host = "127.0.0.1"  # the master's address
        self.member_address = "127.0.0.2"
        self.certs, self.member_certs = host_certs(
            workdir,
            [
                ("localhost", ["localhost", "xcp-sim-host", self.host, "::1"]),
                ("xcp-sim-host2", ["xcp-sim-host2", self.member_address]),
            ],
        )
        self.ca_file = self.certs.ca_file
        self.xapi = Xapi(workdir, self.user, self.password, self.certs.cert_pem, self.member_certs.cert_pem)
        self.nbd = NbdExports(workdir, self.certs, self.xapi.record)
        self.xapi.nbd = self.nbd
        self.server, self.member_server = self._listen()
        for srv in (self.server, self.member_server):
            srv.start()
        self.port = self.server.port
        self.url = f"https://{self.host}:{self.port}/"
        self.member_url = f"https://{self.member_address}:{self.port}/"
        self._sessions: list[Any] = []

    def _listen(self) -> tuple[XapiServer, XapiServer]:
        """The master's server on a free port, the member's on the same port of its address (as the
        product follows HOST_IS_SLAVE: same port, the master's address)."""
        for _ in range(50):
            master = XapiServer(self.xapi, self.certs.server_context())
            try:
                member = XapiServer(
                    self.xapi, self.member_certs.server_context(), host=self.xapi.member, port=master.port
                )
            except OSError as e:
                master.server_close()
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            return master, member
        raise OSError(errno.EADDRINUSE, "no port free on both 127.0.0.1 and 127.0.0.2")

    def close(self) -> None:
        self.close_sessions()
        self.member_server.stop()
        self.server.stop()
        self.xapi.wait_tasks()
        self.xapi.stop_guests()
        self.nbd.close()

    # ------------------------------------------------------------------ clients
    def session(
        self, *, user: str | None = None, password: str | None = None, verify: bool = True, url: str = ""
    ) -> Any:
        """A logged-in XenAPI.Session (the unmodified client) to the master (or *url*: ``member_url``
        answers HOST_IS_SLAVE), verifying the server against ``ca_file`` (``verify=False``: XenAPI's
        own ``ignore_ssl=True``).  Use it in a ``with`` (logout and close); the fixture closes what a
        test left open."""
        cls = _session_class()
        if verify:
            transport = xmlrpc.client.SafeTransport(context=self.certs.client_context())
            s = cls(url or self.url, transport=transport)
        else:
            s = cls(url or self.url, ignore_ssl=True)
        self._sessions.append(s)
        try:
            s.xenapi.login_with_password(
                user or self.user, self.password if password is None else password, "2.21", "vmrecover-tests"
            )
        except BaseException:
            s("close")()
            raise
        return s

    def close_sessions(self) -> None:
        for s in self._sessions:
            s.close()
        self._sessions.clear()

    # ------------------------------------------------------------------ inventory
    @property
    def pool(self) -> str:
        return self.xapi.pool

    @property
    def host_ref(self) -> str:
        """The master (xcp-sim-host, 127.0.0.1)."""
        return self.xapi.host

    @property
    def member_ref(self) -> str:
        """The pool member (xcp-sim-host2, 127.0.0.2)."""
        return self.xapi.member

    @property
    def hosts(self) -> list[str]:
        """Every host of the pool, the master first."""
        return list(self.xapi.hosts)

    @property
    def local_sr(self) -> str:
        return self.xapi.local_sr

    def sr(self, name: str) -> str:
        with self.xapi.lock:
            (ref,) = self.xapi.find("SR", name_label=name)
        return ref

    def network(self, name: str) -> str:
        with self.xapi.lock:
            (ref,) = self.xapi.find("network", name_label=name)
        return ref

    def add_sr(self, name: str, type_: str = "nfs") -> str:
        """Another SR (an "nfs" one is shared); its VDI files are in a folder of the workdir too.
        SIMPLIFIED: no NFS server behind an "nfs" SR made here, no PBDs (an SR made as the product
        makes one, SR.introduce + PBD.create + PBD.plug, has a real NFS server behind it)."""
        with self.xapi.lock:
            return self.xapi.add_sr(name, type_)

    def add_network(self, name: str, bridge: str, purpose: list[str] | None = None) -> str:
        with self.xapi.lock:
            return self.xapi.add_network(name, bridge, purpose=purpose)

    def make_vm(
        self,
        name: str,
        disks: list[Path | int] | None = None,
        *,
        sr: str | None = None,
        nics: list[str] | None = None,
        power_state: str = "Running",
        cbt: bool = False,
        memory: int = 256 << 20,
        vcpus: int = 1,
        other_config: dict[str, str] | None = None,
        cd: bool = False,
        host: str | None = None,
    ) -> str:
        """A VM as XAPI has one: disk i is a VDI (``name``-disk-i, userdevice i, bootable if 0) on *sr*
        (default: local storage), a copy of the image (holes kept) or an empty disk of that size; one VIF
        per network name in *nics* (default: the eth0 network); *cbt* enables CBT on every disk;
        ``cd=True`` adds an empty CD drive (userdevice 3); a running or paused VM runs on *host*
        (default: the master).  Returns the VM ref."""
        x = self.xapi
        with x.lock:
            sr = sr or x.local_sr
            vm = x.add(
                "VM",
                name_label=name,
                memory_static_max=memory,
                memory_dynamic_max=memory,
                memory_dynamic_min=memory,
                memory_static_min=memory,
                VCPUs_max=vcpus,
                VCPUs_at_startup=vcpus,
                platform={
                    "acpi": "1",
                    "apic": "true",
                    "pae": "true",
                    "viridian": "false",
                    "device-model": "qemu-upstream-compat",
                },
                other_config=dict(other_config or {}),
            )
            for i, d in enumerate(disks or []):
                size = d if isinstance(d, int) else Path(d).stat().st_size
                if size <= 0:
                    raise ValueError(f"disk size {size} is not positive")
                vdi = x.new_vdi(sr, size, name_label=f"{name}-disk-{i}", name_description="")
                if not isinstance(d, int):
                    sparse_copy(Path(d), x.vdi_path(vdi))
                x.x_VBD__create(
                    "",
                    {
                        "VM": vm,
                        "VDI": vdi,
                        "userdevice": str(i),
                        "bootable": i == 0,
                        "type": "Disk",
                        "mode": "RW",
                    },
                )
                if cbt:
                    x.x_VDI__enable_cbt("", vdi)
                x.rec("VDI", vdi)["physical_utilisation"] = x._allocated(vdi)
            if cd:
                x.x_VBD__create(
                    "", {"VM": vm, "VDI": NULL, "userdevice": "3", "type": "CD", "mode": "RO", "empty": True}
                )
            for i, net in enumerate(nics if nics is not None else ["Pool-wide network associated with eth0"]):
                (nref,) = x.find("network", name_label=net)
                x.x_VIF__create("", {"VM": vm, "network": nref, "device": str(i), "MAC": "", "MTU": 1500})
            if power_state in ("Running", "Paused"):
                x._power_on(vm, power_state, host or x.host)
            elif power_state != "Halted":
                raise ValueError(f"power_state {power_state!r}: Running, Paused or Halted")
        return vm

    def move_vm(self, vm: str, host: str) -> None:
        """Fail the VM over to *host*, as HA restarts a VM whose host died: it runs there with a new
        domain id, ``resident_on`` and both hosts' ``resident_VMs`` say so (no API call; a log entry
        "ha-restart" with ``vm``, ``host``, ``previous``).  A guest booted for real is booted again."""
        self.xapi.move_vm(self.vm_ref(vm), host)

    def resident_on(self, vm: str) -> str:
        """The host ref the VM runs on (``OpaqueRef:NULL`` when halted)."""
        with self.xapi.lock:
            return str(self.xapi.rec("VM", self.vm_ref(vm))["resident_on"])

    def vm_disks(self, vm: str) -> list[str]:
        """The VM's disk VDIs in userdevice order."""
        x = self.xapi
        with x.lock:
            vbds = [x.db["VBD"][b] for b in x.rec("VM", vm)["VBDs"]]
            return [b["VDI"] for b in sorted(vbds, key=lambda b: int(b["userdevice"])) if b["type"] == "Disk"]

    def vdi_file(self, vdi: str) -> Path:
        """The file holding the VDI's bytes (write into it to change the disk between two backups)."""
        with self.xapi.lock:
            return self.xapi.vdi_path(vdi)

    def vm_ref(self, vm: str) -> str:
        """A VM's ref from its ref or uuid."""
        with self.xapi.lock:
            if vm in self.xapi.db["VM"]:
                return vm
            return self.xapi._by_uuid("VM", vm)

    # ------------------------------------------------------------------ guests
    def boot_guests(self, on: bool = True, *, timeout: float = 300) -> None:
        """Knob (off again after each test): VM.start of a VM whose first disk is a VDI of an NFS SR
        boots it for real: qemu (tests/testkit/guest.py) with the VDIs as nfs:// drives in userdevice
        order, its serial console in the workdir (``guest_serial``); when qemu ends (the test guest
        powers itself off) the VM is Halted.  A guest still running after *timeout* seconds is killed."""
        with self.xapi.lock:
            self.xapi.boot_guests = on
            self.xapi.guest_timeout = timeout

    def guest_serial(self, vm: str) -> str:
        """The serial console text of the VM's last real boot (by ref or uuid; "" if it never booted)."""
        with self.xapi.lock:
            run = self.xapi.guests.get(self.vm_ref(vm))
        if run is None or not run.serial.exists():
            return ""
        return run.serial.read_bytes().decode(errors="replace")

    serial = guest_serial  # the same, shorter

    def guest_outcome(self, vm: str) -> dict[str, Any]:
        """What the VM's last qemu run did once it ended: ``returncode``, ``boots_seen``, ``powered_off``,
        ``seconds`` (or ``timeout``/``error``); {} while it runs or if it never booted."""
        with self.xapi.lock:
            run = self.xapi.guests.get(self.vm_ref(vm))
            return dict(run.outcome) if run is not None else {}

    def wait_halted(self, vm: str, timeout: float = 300) -> None:
        """Wait until the VM is Halted (a booted guest powered itself off); TimeoutError otherwise."""
        ref = self.vm_ref(vm)
        deadline = time.monotonic() + timeout
        while True:
            with self.xapi.lock:
                state = self.xapi.rec("VM", ref)["power_state"]
            if state == "Halted":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"VM {vm} still {state} after {timeout:g} s")
            time.sleep(0.1)

    def guest_write(self, vdi: str, offset: int, data: bytes) -> None:
        """Write into a VDI as a running guest's tapdisk does: for a VDI of an NFS SR, NFS WRITEs and a
        COMMIT to its file through the mount of the host the VM runs on (any plugged PBD's if no running
        VM has it); for another, its local file."""
        target = self._guest_target(vdi)
        if isinstance(target, Path):
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        else:
            target[0].write(target[1], offset, data)

    def guest_read(self, vdi: str, offset: int, length: int) -> bytes:
        """Read a VDI as tapdisk does (NFS READs of its file for a VDI of an NFS SR)."""
        target = self._guest_target(vdi)
        if isinstance(target, Path):
            with open(target, "rb") as f:
                f.seek(offset)
                return f.read(length)
        return target[0].read(target[1], offset, length)

    def _guest_target(self, vdi: str) -> Any:
        with self.xapi.lock:
            remote = self.xapi._remote_file(vdi, self.xapi.guest_host(vdi))
            return remote if remote is not None else self.xapi.vdi_path(vdi)

    def record(self, cls: str, ref: str) -> dict[str, Any]:
        """The record as the API gives it (int64 as strings)."""
        with self.xapi.lock:
            return self.xapi.public(cls, ref)

    def exists(self, cls: str, ref: str) -> bool:
        with self.xapi.lock:
            return ref in self.xapi.db[cls]

    # ------------------------------------------------------------------ log and faults
    @property
    def log(self) -> list[dict[str, Any]]:
        return self.xapi.log

    def calls(self, method: str, **match: Any) -> list[dict[str, Any]]:
        """Log entries of what was answered: API calls by name (``args`` without the session, ``ok``,
        ``result`` or ``error``, ``at``: the address of the host that answered), "GET /export_raw_vdi",
        "PUT /import_raw_vdi" (``at`` too), "nbd-export", "nbd-connect", "nbd-drop", "nbd-refused",
        "refused", "sessions-expired", "sim-error"; the storage of NFS SRs: "sm" (``op`` sr_attach,
        sr_detach, sr_scan, vdi_delete; ``sr``; attach and detach with ``host``, a successful attach with
        ``source``, the address it mounted from), "message" (an XAPI message the SM created, ``name``),
        "vdi-copy" (``vdi``, ``dst``, ``bytes``, ``nfs``); real boots: "guest-start" (``vm``,
        ``drives``), "guest-exit" (``vm`` and what qemu did); "ha-restart" (``move_vm``)."""
        return self.xapi.calls(method, **match)

    @property
    def refuse(self) -> dict[str, Any]:
        """``refuse["VM.snapshot"] = n``: the next n calls fail (OTHER_OPERATION_IN_PROGRESS, as when
        another operation holds the object); ``= (n, ["CODE", ...])`` for another error."""
        return self.xapi.refuse

    def expire_sessions(self) -> None:
        self.xapi.expire_sessions()

    def nbd_drop_after(self, after_bytes: int, times: int = 1) -> None:
        self.nbd.drop_after(after_bytes, times)

    def nbd_slow(self, seconds_per_piece: float) -> None:
        """Every NBD connection waits this long before relaying each 256 KiB piece (until reset)."""
        self.nbd.delay = seconds_per_piece

    def disable_cbt_behind_back(self, vdi: str) -> None:
        self.xapi.disable_cbt_behind_back(vdi)

    def reset(self) -> None:
        """Fault switches and knobs off, every host enabled again, guests still running killed and the
        test's own sessions closed (between tests); the inventory stays."""
        self.close_sessions()
        with self.xapi.lock:
            self.xapi.refuse.clear()
            self.xapi.boot_guests = False
            for h in self.xapi.hosts:
                self.xapi.rec("host", h)["enabled"] = True
        self.nbd.reset_faults()
        self.xapi.wait_tasks()
        self.xapi.stop_guests()


@contextmanager
def running(workdir: Path) -> Iterator[XapiSim]:
    sim = XapiSim(workdir)
    try:
        yield sim
    finally:
        sim.close()
        shutil.rmtree(workdir / "sr-mount", ignore_errors=True)
