"""The hypervisor registry and its command line, without a hypervisor: URLs, where passwords live (never
on a command line, never readable by others), and what `hypervisor test` says when the host is
unreachable or its certificate is not trusted."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli, assert_clean_error
from vmrecover.errors import BadInput, ExitCode
from vmrecover.hypervisors import Hypervisor, Registry, parse_url
from vmrecover.vfs.formats import vmdk_descriptor, vmdk_extents


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("vmware://vc.example", ("vmware", "root", "vc.example", 443)),
        ("vmware://administrator@vsphere.local@vc.example:8443/", ("vmware", "administrator@vsphere.local",
                                                                    "vc.example", 8443)),
        ("vmware://admin@[fd00::5]:443", ("vmware", "admin", "fd00::5", 443)),
        ("vmware://10.0.0.5", ("vmware", "root", "10.0.0.5", 443)),
    ],
)  # fmt: skip
def test_urls(url: str, want: tuple[str, str, str, int]) -> None:
    assert parse_url(url) == want
    scheme, user, host, port = want
    assert parse_url(Hypervisor("x", scheme, user, host, port).url) == want


@pytest.mark.parametrize(
    "url", ["vc.example", "http://vc", "vmware://", "vmware://vc:99999", "vmware://a/b c"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(BadInput):
        parse_url(url)


def test_errors_are_printed_as_they_are(cli: Cli, tmp_path: Path) -> None:
    """A fingerprint's ":CD:" is not an emoji code and a long path is not folded inside a word (both
    broke the certificate error's fingerprint, depending on the random certificate)."""
    where = tmp_path / "6E:CD:A0:smile:" / ("x" * 120)
    res = cli.run("list", "--repo", where, check=False)
    assert_clean_error(res, ExitCode.NOT_FOUND)
    assert f"no repository at {where}\n" in res.stderr, res.stderr


def test_a_target_must_name_a_hypervisor_of_its_platform(cli: Cli, tmp_path: Path) -> None:
    """xen:// and vmware:// name platforms: a mismatch, or an operation a platform cannot do yet, is
    said plainly; an unreachable pool master is exit 10 from the XenAPI session, like a vCenter."""
    cli.run("hypervisor", "add", "pool1", "xen://root@127.0.0.1:1", "--password-stdin", "--no-check",
            input="pw\n")  # fmt: skip
    res = cli.run("backup", "vmware://pool1/web", check=False)
    assert_clean_error(
        res, ExitCode.BAD_INPUT, "pool1 is XenServer / XCP-ng, not VMware vSphere", "xen://pool1"
    )
    img = tmp_path / "web.raw"
    img.write_bytes(b"x" * 65536)
    cli.run("backup", img, "--vm", "web")
    res = cli.run("restore", "web", "--to", "xen://pool1", check=False)  # refused before connecting
    assert_clean_error(res, ExitCode.BAD_INPUT, "backed up from disk images, not from XenServer")
    res = cli.run("backup", "xen://pool1/web", "--quiesce", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "--quiesce and --memory are vSphere's", "--mode quiesced")
    res = cli.run("backup", "xen://pool1/web", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, r"cannot reach hypervisor pool1 \(127.0.0.1:1\)")
    res = cli.run("hypervisor", "test", "pool1", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, r"cannot reach hypervisor pool1 \(127.0.0.1:1\)")


def test_recovered_vmx_quotes_what_it_writes() -> None:
    """A VM name may hold '"' and '|' (vSphere allows them): written raw, '"' would end the value."""
    from vmrecover.hypervisors.vmware import vmx

    original = 'displayName = "old"\nethernet0.address = "00:50:56:01:02:03"\nannotation = "a|22b|7Cc"\n'
    text = vmx.recovered({"vmx": original}, ["scsi0-0"], 'db "prod"|2').decode()
    got = vmx.parse(text)
    assert got["displayName"] == "db |22prod|22|7C2" and got["nvram"] == "db |22prod|22|7C2.nvram"
    assert got["annotation"] == "a|22b|7Cc"  # read values stay as VMware wrote them
    assert got["scsi0:0.fileName"] == "scsi0-0.vmdk" and text.count('"') == 2 * len(got)


def test_vmdk_descriptor_extents() -> None:
    assert vmdk_extents(vmdk_descriptor("web01", 4 << 20, "id")) == [("RW", 8192, "VMFS", "web01-flat.vmdk")]
    two = (
        b'# Disk DescriptorFile\ncreateType="twoGbMaxExtentFlat"\n'
        b'RW 100 FLAT "a-f001.vmdk" 0\nRW 5 FLAT "a-f002.vmdk" 0\n'
    )
    assert [e[3] for e in vmdk_extents(two)] == ["a-f001.vmdk", "a-f002.vmdk"]
    with pytest.raises(ValueError):
        vmdk_extents(b"KDMV\x01\x00\x00\x00binary sparse header")
    with pytest.raises(ValueError):
        vmdk_extents(b'# Disk DescriptorFile\nRW 100 FLAT "a" 512\n')  # an offset into its file


def test_registry_keeps_passwords_private_and_out_of_listings(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "vmware://admin@vsphere.local@vc.example"
    res = cli.run("hypervisor", "add", "vc1", url, "--password-stdin", "--no-check", input="s3cret pass\n")
    assert "s3cret" not in res.stdout + res.stderr
    path = cli.repo / "hypervisors.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listed = cli.json("hypervisor", "list")["hypervisors"]
    assert listed == [{"name": "vc1", "url": "vmware://admin@vsphere.local@vc.example:443", "insecure": False,
                       "ca_file": None, "password": "registry"}]  # fmt: skip
    assert "s3cret" not in json.dumps(listed)
    reg = Registry(cli.repo)
    hv = reg.get("vc1")
    assert reg.password(hv) == "s3cret pass"
    monkeypatch.setenv("VMRECOVER_HYPERVISOR_VC1_PASSWORD", "from the environment")
    assert reg.password(hv) == "from the environment"  # the environment wins (a service's secret store)
    res = cli.run("hypervisor", "add", "vc1", "vmware://x", "--password-stdin", "--no-check", input="p\n",
                  check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.BAD_INPUT, "exists")
    assert cli.json("hypervisor", "remove", "vc1") == {"name": "vc1", "removed": True}
    assert "s3cret" not in path.read_text()


def test_password_is_never_taken_from_argv_or_a_pipe_without_asking(cli: Cli) -> None:
    res = cli.run(
        "hypervisor", "add", "vc1", "vmware://vc.example", "--no-check", check=False
    )  # stdin: /dev/null
    assert_clean_error(res, ExitCode.AUTH, "no password given", "--password-stdin")
    assert not (cli.repo / "hypervisors.toml").exists()


def test_unreachable_host_is_said_so(cli: Cli) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli.run("hypervisor", "add", "dead", f"vmware://root@127.0.0.1:{port}", "--password-stdin", "--no-check",
            input="pw\n")  # fmt: skip
    res = cli.run("hypervisor", "test", "dead", check=False)
    assert_clean_error(res, ExitCode.UNREACHABLE, "cannot reach hypervisor dead", "refused")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS server with a self-signed certificate (no vSphere behind it): (port, its certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-a-vcenter")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    pem = tmp_path / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile = tmp_path / "key.pem"
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem, keyfile)
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
            except (ssl.SSLError, OSError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], pem
    finally:
        stop.set()
        t.join()
        srv.close()


def test_untrusted_certificate_is_said_so_with_its_fingerprint(
    cli: Cli, tls_server: tuple[int, Path]
) -> None:
    port, _ = tls_server
    cli.run("hypervisor", "add", "self", f"vmware://root@127.0.0.1:{port}", "--password-stdin", "--no-check",
            input="pw\n")  # fmt: skip
    res = cli.run("hypervisor", "test", "self", check=False)
    fp = r"fingerprint is [0-9A-F]{2}(\s?:\s?[0-9A-F]{2}){31}"  # (the console may fold the line)
    assert_clean_error(res, ExitCode.CERTIFICATE, "not trusted", fp, "--ca-file")


def test_names_that_would_share_a_password_variable_are_refused(cli: Cli) -> None:
    cli.run("hypervisor", "add", "vc-1", "vmware://a", "--password-stdin", "--no-check", input="one\n")
    res = cli.run("hypervisor", "add", "vc_1", "vmware://b", "--password-stdin", "--no-check", input="two\n",
                  check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.BAD_INPUT, "VMRECOVER_HYPERVISOR_VC_1_PASSWORD", "'vc-1'")
    res = cli.run("hypervisor", "add", "vc 1", "vmware://b", "--password-stdin", "--no-check", input="two\n",
                  check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.BAD_INPUT, "invalid hypervisor name")


def test_a_password_in_the_url_is_refused_and_not_echoed(cli: Cli) -> None:
    res = cli.run("hypervisor", "add", "vc1", "vmware://root:hunter2@vc", "--password-stdin", input="x\n",
                  check=False)  # fmt: skip
    assert_clean_error(res, ExitCode.BAD_INPUT, "does not belong in the URL")
    assert "hunter2" not in res.stdout + res.stderr
