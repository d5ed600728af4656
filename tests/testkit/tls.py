"""TLS certificates for the test peers (the vSphere proxy, the XAPI simulator and its NBD servers).

:func:`server_certs` writes a certificate for 127.0.0.1, ::1 and localhost, either signed by a test CA
(``ca_file`` is the CA: what a vCenter with its own CA looks like) or self-signed (``ca_file`` is the
certificate itself: what a XenServer host has out of the box, and what its ``VDI.get_nbd_info`` hands
out as ``cert``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerCerts:
    ca_file: Path  # the CA's certificate (PEM): what a verifying client is given
    cert_file: Path  # the server's certificate (PEM)
    key_file: Path  # its private key (PEM, PKCS#8, mode 0600)
    pem_file: Path  # certificate then key, one file (what ssl.SSLContext.load_cert_chain takes)

    @property
    def cert_pem(self) -> str:
        return self.cert_file.read_text()

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.pem_file)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that verifies this server (hostname included) against ``ca_file``."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def server_certs(workdir: Path, *, ca_name: str = "vmrecover test CA", prefix: str = "") -> ServerCerts:
    """Write ``{prefix}ca.pem``, ``{prefix}server-cert.pem``, ``{prefix}server-key.pem`` and
    ``{prefix}server.pem`` (certificate then key) into *workdir*."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name_x = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name_x)
        .issuer_name(ca_name_x)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name_x)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
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
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file = workdir / f"{prefix}ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file = workdir / f"{prefix}server-cert.pem"
    cert_file.write_bytes(cert_pem)
    key_file = workdir / f"{prefix}server-key.pem"
    key_file.write_bytes(key_pem)
    os.chmod(key_file, 0o600)
    pem = workdir / f"{prefix}server.pem"
    pem.write_bytes(cert_pem + key_pem)
    os.chmod(pem, 0o600)
    return ServerCerts(ca_file, cert_file, key_file, pem)
