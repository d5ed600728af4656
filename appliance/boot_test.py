#!/usr/bin/env python3
"""Boot test of the appliance image (make appliance-boot-test; as root).  Its :class:`Appliance` also
boots the image for the suite's slow tier (tests/test_appliance.py).

1. Offline, with libguestfs (read-only, TCG): the image has no usable root password in /etc/shadow,
   no SSH host keys in /etc/ssh, and an empty /etc/machine-id.
2. Boots it under ``qemu-system-x86_64 -accel tcg -cpu max -m 4096 -smp 2`` on a throw-away overlay, with a
   second blank 8 GiB disk and user networking forwarding the API port, BIOS (default) or UEFI
   (``--uefi``, OVMF); the serial console goes to a log file.
3. Waits for ``https://127.0.0.1:PORT/api/v1/health`` to answer and times it from power-on (target:
   at most 90 s under TCG), checks that a call without a token is refused (401).
4. Shuts the VM down with ACPI (QMP ``system_powerdown``) and waits for qemu to end.
5. Offline on the overlay: first boot made SSH host keys, the configuration, the root-only admin
   token, the repository on the second disk (labelled vmrecover-repo) and the banner in /etc/issue.
6. Prints a table: compressed qcow2 size (target <= 1 GiB), build time, power-on to API, shutdown.

With ``--seed``, a cloud-init NoCloud seed (an ISO labelled cidata, as the Vagrantfile makes) gives the
appliance a host name, root's SSH key and the admin token's SHA-256: the token made here must then be
accepted by the API (200), the appliance must keep no copy of it, and root must have the key.

    boot_test.py [--image dist/vmrecover-appliance-VERSION.qcow2] [--uefi] [--seed] [--timeout 300] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
GiB = 1 << 30
OVMF = Path("/usr/share/ovmf/OVMF.fd")


def default_image() -> Path:
    version = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["version"]
    return TOP / "dist" / f"vmrecover-appliance-{version}.qcow2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def guestfs_open(image: Path, *, fmt: str = "qcow2", extra: Path | None = None):  # type: ignore[no-untyped-def]
    import guestfs  # python3-guestfs (Debian), seen through the venv's system site-packages

    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(["force_tcg"])
    g.add_drive_opts(str(image), readonly=1, format=fmt)
    if extra is not None:
        g.add_drive_opts(str(extra), readonly=1, format="qcow2")
    g.launch()
    root = next(d for d, label in g.list_filesystems().items() if label == "ext4"
                and g.vfs_label(d) == "vmrecover-root")  # fmt: skip
    g.mount_ro(root, "/")
    return g


class Failed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    print(f"  {'ok ' if cond else 'FAIL'} {what}")
    if not cond:
        raise Failed(what)


def offline_image_checks(image: Path) -> None:
    print(f"offline checks of {image} (libguestfs, TCG)")
    g = guestfs_open(image)
    try:
        shadow = g.cat("/etc/shadow")
        root_hash = next(line.split(":")[1] for line in shadow.splitlines() if line.startswith("root:"))
        check(
            root_hash.startswith(("!", "*")), f"root has no usable password (/etc/shadow field {root_hash!r})"
        )
        usable = [
            ln.split(":")[0] for ln in shadow.splitlines() if ln.split(":")[1][:1] not in ("!", "*", "")
        ]
        check(not usable, f"no account has a usable password {usable or ''}")
        empty = [ln.split(":")[0] for ln in shadow.splitlines() if ln.split(":")[1] == ""]
        check(not empty, f"no account has an empty password {empty or ''}")
        keys = [f for f in g.ls("/etc/ssh") if f.startswith("ssh_host_")]
        check(not keys, f"no SSH host keys baked in /etc/ssh {keys or ''}")
        check(g.filesize("/etc/machine-id") == 0, "/etc/machine-id is empty")
        check(not g.exists("/etc/vmrecover/vmrecover.toml"), "no configuration (made at first boot)")
        check(not g.exists("/etc/vmrecover/tls"), "no TLS key (made at first boot)")
    finally:
        g.close()


def make_seed(work: Path) -> tuple[Path, str, str]:
    """A NoCloud seed ISO with a new token's SHA-256 and SSH key: (iso, token, public key)."""
    import hashlib
    import secrets

    token = "vmr_" + secrets.token_urlsafe(32)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "key")], check=True)
    pub = (work / "key.pub").read_text().strip()
    seed = work / "seed"
    seed.mkdir()
    (seed / "meta-data").write_text("instance-id: boot-test\nlocal-hostname: vmr-boot-test\n")
    digest = hashlib.sha256(token.encode()).hexdigest()
    (seed / "user-data").write_text(
        f"#cloud-config\nssh_authorized_keys:\n  - {pub}\nvmrecover:\n  admin_token_sha256: {digest}\n"
    )
    iso = work / "seed.iso"
    tool = ["genisoimage"] if shutil.which("genisoimage") else ["xorriso", "-as", "mkisofs"]
    subprocess.run([*tool, "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock",
                    str(seed / "user-data"), str(seed / "meta-data")], check=True)  # fmt: skip
    return iso, token, pub


def offline_overlay_checks(
    overlay: Path, repo_disk: Path, token: str | None = None, pub: str | None = None
) -> None:
    print("offline checks of what the first boot made")
    g = guestfs_open(overlay, extra=repo_disk)
    try:
        keys = [f for f in g.ls("/etc/ssh") if f.startswith("ssh_host_")]
        check(len(keys) >= 6, f"SSH host keys made at first boot ({len(keys)} files)")
        st = g.statns("/root/vmrecover-admin-token")
        check(st["st_mode"] & 0o777 == 0o600 and st["st_uid"] == 0, "admin token in /root, mode 0600")
        if token is None:
            check(len(g.cat("/root/vmrecover-admin-token").strip()) >= 32, "admin token is there")
        else:
            check(
                "cloud-init" in g.cat("/root/vmrecover-admin-token"), "the seed's token: only a note in /root"
            )
            check(token not in g.cat("/etc/vmrecover/vmrecover.toml"), "the token itself is nowhere")
            check(
                pub is not None and pub in g.cat("/root/.ssh/authorized_keys"), "root has the seed's SSH key"
            )
            check(g.cat("/etc/hostname").strip() == "vmr-boot-test", "the seed's host name")
        conf = g.cat("/etc/vmrecover/vmrecover.toml")
        check(
            "[[api.tokens]]" in conf and 'name = "admin"' in conf,
            "configuration has the admin token's SHA-256",
        )
        check('path = "/srv/vmrecover-repo/repo"' in conf, "repository on the second disk")
        check("LABEL=vmrecover-repo" in g.cat("/etc/fstab"), "the repository disk is in /etc/fstab")
        issue = g.cat("/etc/issue")
        check(
            bool(re.search(r"SHA-256 ([0-9A-F]{2}:){31}[0-9A-F]{2}", issue)), "/etc/issue has the fingerprint"
        )
        check("/root/vmrecover-admin-token" in issue and ":8443" in issue, "/etc/issue has the API and token")
        labels = {d: g.vfs_label(d) for d in g.list_filesystems() if d.startswith("/dev/sdb")}
        check(
            "vmrecover-repo" in labels.values(), f"second disk formatted with label vmrecover-repo {labels}"
        )
    finally:
        g.close()


def request(
    method: str, url: str, token: str | None = None, *, data: bytes | None = None,
    content_type: str = "application/json", timeout: float = 5,
) -> tuple[int, bytes]:  # fmt: skip
    """An HTTPS call to the appliance: (status, body), error statuses included.  Its certificate is
    self-signed and not verified here: the tests compare its fingerprint with the console banner's."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", content_type)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    return request("GET", url, token)


class Appliance:
    """One appliance under ``qemu-system-x86_64 -accel tcg`` (2 vCPU, 4 GiB by default), booted and
    booted again from the same throw-away overlay of *image* and the same blank repository disk in
    *work*, with user networking: the API on a free host port, and *forwards* (host port -> guest
    port, e.g. 111 and 2049 for the NFS export, a free one for SSH).  The serial console goes to
    ``work/serial.log`` (each boot appends), QMP to ``work/qmp.sock``.

    The vCPU is TCG's ``max``: it has AMD-V with nested paging (SVM, NPT), as a hypervisor with nested
    virtualization enabled gives it (the OVA asks ESXi for it, the Vagrantfile libvirt).  The appliance's
    own qemu (libguestfs for file restores) then runs with KVM, emulated by this TCG at its speed, where
    TCG inside TCG takes over 20 minutes to start libguestfs.  ``cpu="qemu64"`` is a host without it."""

    def __init__(
        self, image: Path, work: Path, *, uefi: bool = False, seed: Path | None = None,
        forwards: dict[int, int] | None = None, memory_mib: int = 4096, cpu: str = "max",
    ) -> None:  # fmt: skip
        self.image, self.work, self.uefi, self.seed, self.cpu = image, work, uefi, seed, cpu
        self.forwards = {free_port(): 8443, **(forwards or {})}
        self.port = next(h for h, g in self.forwards.items() if g == 8443)
        self.url = f"https://127.0.0.1:{self.port}/api/v1"
        self.memory_mib = memory_mib
        self.overlay, self.repo_disk = work / "overlay.qcow2", work / "repo.qcow2"
        self.serial, self.qmp_sock = work / "serial.log", work / "qmp.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.powered_on = 0.0

    def argv(self) -> list[str]:
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.forwards.items())
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", self.cpu, "-m", str(self.memory_mib), "-smp", "2",
            "-nographic",
            "-chardev", f"file,id=ser0,path={self.serial},append=on", "-serial", "chardev:ser0",
            "-monitor", "none", "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-drive", f"file={self.overlay},format=qcow2,if=virtio",
            "-drive", f"file={self.repo_disk},format=qcow2,if=virtio",
            "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        if self.uefi:
            cmd += ["-bios", str(OVMF)]
        if self.seed is not None:
            cmd += ["-drive", f"file={self.seed},format=raw,media=cdrom,readonly=on"]
        return cmd

    def power_on(self) -> None:
        if not self.overlay.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image), "-F", "qcow2",
                            str(self.overlay)], check=True)  # fmt: skip
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.repo_disk), "8G"], check=True)
        self.powered_on = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL)

    def wait_api(self, timeout: float) -> tuple[float, bytes]:
        """Seconds from power-on until /health answered 200, and its answer."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise Failed(f"qemu ended (exit {self.proc.returncode}) before the API answered")
            if time.monotonic() - self.powered_on > timeout:
                raise Failed(f"no API after {timeout:.0f} s")
            try:
                status, body = get(f"{self.url}/health")
                if status == 200:
                    return time.monotonic() - self.powered_on, body
            except (OSError, ssl.SSLError):
                pass
            time.sleep(1)

    def power_down(self, timeout: float = 180) -> float:
        """ACPI power-down (QMP system_powerdown); seconds until qemu ended, which must be cleanly."""
        assert self.proc is not None
        t = time.monotonic()
        from vmrecover.recovery.healthcheck import Qmp

        q = Qmp(self.qmp_sock, timeout=10)
        try:
            q.command("system_powerdown")
        finally:
            q.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"no power-off within {timeout:.0f} s of ACPI power-down") from None
        check(self.proc.returncode == 0, f"qemu ended cleanly (exit {self.proc.returncode})")
        return time.monotonic() - t

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def serial_tail(self, lines: int = 40) -> str:
        if not self.serial.exists():
            return ""
        return "\n".join(self.serial.read_text(errors="replace").splitlines()[-lines:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", type=Path, default=default_image())
    ap.add_argument("--uefi", action="store_true", help="boot with OVMF instead of SeaBIOS")
    ap.add_argument("--timeout", type=float, default=300, help="seconds from power-on to an answering API")
    ap.add_argument("--keep", action="store_true", help="keep the overlay, disk and serial log")
    ap.add_argument("--skip-offline", action="store_true", help="no libguestfs checks (faster)")
    ap.add_argument("--seed", action="store_true", help="configure it with a cloud-init NoCloud seed")
    args = ap.parse_args()
    image: Path = args.image.resolve()
    if not image.exists():
        print(f"boot_test: no image {image}: make appliance", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("boot_test: run as root (libguestfs reads the kernel; qemu)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vmrecover-boottest-", dir="/var/tmp"))
    results: dict[str, str] = {}
    ok = False
    token = pub = iso = None
    if args.seed:
        iso, token, pub = make_seed(work)
    box = Appliance(image, work, uefi=args.uefi, seed=iso)
    try:
        if not args.skip_offline:
            offline_image_checks(image)
        firmware = "UEFI" if args.uefi else "BIOS"
        print(f"booting ({firmware}, TCG, API on 127.0.0.1:{box.port}, serial {box.serial})")
        box.power_on()
        boot_s, body = box.wait_api(args.timeout)
        results["power-on to API"] = f"{boot_s:.0f} s (target <= 90 s)"
        print(f"API answered after {boot_s:.1f} s: {body[:200].decode(errors='replace')}")
        status, _ = get(f"{box.url}/vms")
        check(status == 401, f"a call without a token is refused ({status})")
        status, _ = get(f"{box.url}/vms", token="0" * 64)
        check(status == 401, f"a call with a wrong token is refused ({status})")
        if token is not None:
            status, body = get(f"{box.url}/vms", token=token)
            check(status == 200, f"the seed's admin token is accepted ({status} {body[:100]!r})")
        results["ACPI power-down"] = f"{box.power_down():.0f} s"
        log = box.serial.read_text(errors="replace")
        check("vmrecover-firstboot: done" in log, "first-boot set-up ran")
        check("reboot: Power down" in log, "the kernel powered down (clean shutdown)")
        if not args.skip_offline:
            offline_overlay_checks(box.overlay, box.repo_disk, token, pub)
        ok = True
    except Failed as exc:
        print(f"boot_test: FAILED: {exc}", file=sys.stderr)
        print("--- last lines of the serial console ---", file=sys.stderr)
        print(box.serial_tail(), file=sys.stderr)
    finally:
        box.kill()
        size = image.stat().st_size
        build = image.with_name(image.name + ".build-seconds")
        print()
        print(f"  {'image (qcow2, compressed)':<28} {size / 2**20:.0f} MiB (target <= 1024 MiB)")
        if build.exists():
            print(f"  {'build time':<28} {build.read_text().strip()} s")
        for k, v in results.items():
            print(f"  {k:<28} {v}")
        if args.keep or not ok:
            print(f"  {'work files':<28} {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
