"""What every platform's connection shares: the TLS context of a configured hypervisor and the user's
view of a failure to reach it or log in.

- **TLS** is verified against the system's CAs (plus the hypervisor's ``ca_file``) unless it was added
  with ``--insecure``, which logs a warning on every connection.
- A certificate that is not trusted is a :class:`CertificateError` showing the server's SHA-256
  fingerprint, so an administrator can compare it with the one the management console shows before
  trusting it.  Unreachable is exit 10, certificate 11, login 8.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl

from ..errors import AuthError, CertificateError, Unreachable, VmrecoverError
from . import Hypervisor

log = logging.getLogger("vmrecover.hypervisors")


def ssl_context(hv: Hypervisor) -> ssl.SSLContext:
    if hv.insecure:
        log.warning(
            "TLS certificate of hypervisor %s (%s) is NOT verified (--insecure): anyone on the network "
            "path can read its password and the backups", hv.name, hv.host,
        )  # fmt: skip
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    if hv.ca_file:
        ctx.load_verify_locations(cafile=hv.ca_file)
    return ctx


def fingerprint(host: str, port: int) -> str | None:
    """SHA-256 fingerprint of the certificate the server presents (for an error message)."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=10)
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def classify(
    hv: Hypervisor, exc: BaseException, *, login_refused: bool = False, console: str = "its console",
    ca_example: str = "",
) -> VmrecoverError:  # fmt: skip
    """The user's view of a failure to reach or log in to *hv* (*login_refused*: the platform's own
    "wrong user or password" answer; *console* and *ca_example* name the platform's in the hint)."""
    where = f"hypervisor {hv.name} ({hv.host}:{hv.port})"
    if isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)
    ):
        fp = fingerprint(hv.host, hv.port)
        return CertificateError(
            f"the TLS certificate of {where} is not trusted: {getattr(exc, 'verify_message', exc)}"
            + (f"; its SHA-256 fingerprint is {fp}" if fp else ""),
            hint=f"compare the fingerprint with the one {console} shows, then add the hypervisor again with "
            f"--ca-file (its CA certificate{ca_example}) or, only on a trusted network, --insecure",
        )
    if login_refused:
        return AuthError(f"{where} refused the login of user {hv.user}", hint="check the user and password")
    if isinstance(exc, socket.gaierror):
        return Unreachable(f"cannot resolve the name of {where}: {exc.strerror}", hint="check the host name")
    if isinstance(exc, (OSError, TimeoutError)):
        return Unreachable(f"cannot reach {where}: {exc}", hint="check the address, port and firewall")
    msg = getattr(exc, "msg", None) or str(exc)
    return Unreachable(f"{where} failed: {msg}")
