"""Error classes of vmrecover.

Every error a user can cause or fix is a :class:`VmrecoverError`: it carries a message that names the
object concerned, an optional hint that says what to do, and a stable exit code.  The CLI prints these
without a traceback; anything else is a bug and is printed with one (exit code 1).

Exit codes are part of the interface (scripts depend on them): never renumber, only add.
"""

from __future__ import annotations

from typing import Any


class ExitCode:
    OK = 0
    INTERNAL = 1  # a bug: unexpected exception
    USAGE = 2  # bad command line (argparse uses 2 as well)
    INTEGRITY = 3  # stored data is corrupt or missing (verify found damage, restore hit a bad chunk)
    LOCKED = 4  # the repository is busy (another writer, or readers during gc)
    NOT_FOUND = 5  # repository, VM, restore point, disk or image does not exist
    BAD_INPUT = 6  # unreadable, truncated or unsupported image; malformed extents file; bad name
    INCOMPATIBLE = 7  # not a repository, another format version, already exists
    AUTH = 8  # passphrase missing or wrong
    NO_SPACE = 9  # the repository's or the destination's filesystem is full
    UNREACHABLE = 10  # a hypervisor cannot be reached, or failed an operation it should do
    CERTIFICATE = 11  # a hypervisor's TLS certificate is not trusted (see hypervisor add --ca-file)
    BOOT_FAILED = 12  # a boot health check (verify --boot) did not see the restore point boot
    INTERRUPTED = 130  # SIGINT


class VmrecoverError(Exception):
    exit_code: int = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "error": type(self).__name__,
            "message": self.message,
            "exit_code": self.exit_code,
        }
        if self.hint:
            out["hint"] = self.hint
        if self.details:
            out["details"] = self.details
        return out

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"

    @staticmethod
    def from_json(doc: dict[str, Any]) -> VmrecoverError:
        """The error another vmrecover process reported with :meth:`to_json`, as its own class and
        exit code (a plain VmrecoverError for classes with other constructors)."""
        cls = globals().get(doc.get("error", ""))
        if not (isinstance(cls, type) and issubclass(cls, VmrecoverError)) or issubclass(cls, CorruptChunk):
            cls = VmrecoverError
        err = cls.__new__(cls)
        VmrecoverError.__init__(err, doc.get("message", "unknown error"), hint=doc.get("hint"))
        err.exit_code = doc.get("exit_code", ExitCode.INTERNAL)
        return err


class UsageError(VmrecoverError):
    exit_code = ExitCode.USAGE


class IntegrityError(VmrecoverError):
    exit_code = ExitCode.INTEGRITY


class CorruptChunk(IntegrityError):
    """A stored chunk cannot be read back to the bytes its digest names."""

    def __init__(self, digest: bytes, reason: str) -> None:
        super().__init__(f"chunk {digest.hex()} is corrupt: {reason}", digest=digest.hex(), reason=reason)
        self.digest = digest
        self.reason = reason


class MissingChunk(CorruptChunk):
    def __init__(self, digest: bytes) -> None:
        super().__init__(digest, "the chunk file is missing")


class LockedError(VmrecoverError):
    exit_code = ExitCode.LOCKED


class NotFound(VmrecoverError):
    exit_code = ExitCode.NOT_FOUND


class PointPruned(NotFound):
    """A restore point that was listed when a command started was pruned while it read it."""

    def __init__(self, what: str, *, wrote: str = "") -> None:
        super().__init__(
            f"restore point {what} was pruned while it was being read{wrote}",
            hint="choose another point (vmrecover list); prune and gc do not wait for readers",
        )


class BadInput(VmrecoverError):
    exit_code = ExitCode.BAD_INPUT


class Incompatible(VmrecoverError):
    exit_code = ExitCode.INCOMPATIBLE


class AuthError(VmrecoverError):
    exit_code = ExitCode.AUTH


class NoSpace(VmrecoverError):
    exit_code = ExitCode.NO_SPACE


class Unreachable(VmrecoverError):
    exit_code = ExitCode.UNREACHABLE


class CertificateError(VmrecoverError):
    exit_code = ExitCode.CERTIFICATE
