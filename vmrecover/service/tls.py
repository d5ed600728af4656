"""The API's TLS certificate: the configured one, or a self-signed one generated at the first start.

Without ``api.tls_cert``/``api.tls_key`` the service makes an ECDSA P-256 key and a self-signed
certificate (10 years; names: this host's names, localhost, 127.0.0.1, ::1 and the specific addresses
it listens on) in ``tls/`` next to the configuration file (``/etc/vmrecover/tls/cert.pem`` and
``key.pem``), and uses them from then on.  The key is written 0600 before any byte of it exists on
disk; a key file that others may read is refused, generated or not.  The certificate's SHA-256
fingerprint is logged at every start (and as a warning when it is new): clients that cannot be given
the certificate compare it with that (``curl --cacert cert.pem`` or pinning the fingerprint).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from ..fsutil import write_file
from .config import Api

log = logging.getLogger("vmrecover.api")

VALID_DAYS = 3650
RENEW_BEFORE = datetime.timedelta(days=30)  # a generated certificate this close to expiry is replaced


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path
    fingerprint: str  # SHA-256 of the DER certificate, "AB:CD:..." as openssl and browsers show it
    generated: bool  # made by this module (replaced when it expires), not configured


def default_paths(config_path: Path) -> tuple[Path, Path]:
    """Where the generated certificate and key live: ``tls/`` next to the configuration file."""
    d = config_path.parent / "tls"
    return d / "cert.pem", d / "key.pem"


def fingerprint(pem: bytes) -> str:
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _check_key(key: Path) -> None:
    try:
        mode = os.stat(key).st_mode
    except OSError as exc:
        raise BadInput(f"cannot read the API's TLS key {key}: {exc.strerror}") from None
    if mode & stat.S_IRWXO:
        raise BadInput(f"the API's TLS key {key} is readable by others", hint=f"chmod 600 {key}")


def _names(listen: list[str]) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    dns = ["localhost"]
    for name in (socket.gethostname(), socket.getfqdn()):
        if name and name not in dns:
            dns.append(name)
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"),
    ]  # fmt: skip
    for a in listen:
        host = a.rpartition(":")[0].strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host not in dns:
                dns.append(host)
            continue
        if not ip.is_unspecified and ip not in ips:
            ips.append(ip)
    return dns, ips


def generate(cert: Path, key: Path, listen: list[str]) -> str:
    """A new key (0600) and self-signed certificate at *cert* and *key*; returns its fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    dns, ips = _names(listen)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, dns[-1][:64]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmrecover appliance (self-signed)"),
    ])  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    public = private.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    built = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(
            x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, ips)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = built.public_bytes(serialization.Encoding.PEM)
    cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file(key, key_pem, what="the API's TLS key", mode=0o600)  # created 0600 (O_EXCL), renamed
    write_file(cert, cert_pem, what="the API's TLS certificate", mode=0o644)
    return fingerprint(cert_pem)


def _expires(pem: bytes) -> datetime.datetime:
    from cryptography import x509

    c = x509.load_pem_x509_certificate(pem)
    utc = getattr(c, "not_valid_after_utc", None)  # cryptography >= 42 (not_valid_after is deprecated)
    return utc if utc is not None else c.not_valid_after.replace(tzinfo=datetime.UTC)


def ensure(api: Api, config_path: Path) -> Certificate:
    """The certificate the API serves: the configured pair, else the generated one (made now if there
    is none yet, or if it expires within 30 days).  BadInput if a file cannot be read or the key is
    readable by others."""
    if api.tls_cert is not None and api.tls_key is not None:
        cert, key = api.tls_cert, api.tls_key
        try:
            pem = cert.read_bytes()
        except OSError as exc:
            raise BadInput(f"cannot read the API's TLS certificate {cert}: {exc.strerror}") from None
        _check_key(key)
        try:
            fp = fingerprint(pem)
        except ValueError:
            raise BadInput(f"{cert} is not a PEM certificate", hint="api.tls_cert takes a PEM file") from None
        log.info("API TLS certificate %s, SHA-256 fingerprint %s", cert, fp)
        return Certificate(cert, key, fp, generated=False)
    cert, key = default_paths(config_path)
    renew = "no certificate yet"
    if cert.exists() and key.exists():
        pem = cert.read_bytes()
        if _expires(pem) - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE:
            _check_key(key)
            fp = fingerprint(pem)
            log.info("API TLS certificate %s (self-signed), SHA-256 fingerprint %s", cert, fp)
            return Certificate(cert, key, fp, generated=True)
        renew = "the previous one expires"
    fp = generate(cert, key, api.listen)
    log.warning(
        "generated a self-signed TLS certificate for the API (%s): %s, SHA-256 fingerprint %s; "
        "give clients the certificate or have them check that fingerprint", renew, cert, fp,
    )  # fmt: skip
    return Certificate(cert, key, fp, generated=True)
