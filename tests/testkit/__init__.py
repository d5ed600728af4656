"""Test kit: real things for tests and the demo to back up and recover.

:mod:`tests.testkit.guest` builds a small bootable Linux guest disk from Debian packages (no mount,
no root needed beyond reading /boot) and boots it with qemu under TCG; each boot counts itself on the
guest's own disk, so "the recovered VM booted and saw its earlier writes" is a plain assertion.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .guest import (
        BOOT_LOG,
        GUEST_MARKER,
        ROOT_PARTUUID,
        BootResult,
        GuestBootTimeout,
        GuestError,
        GuestLayout,
        boot,
        build_guest_disk,
        guest_layout,
        read_boot_log,
    )

__all__ = [
    "BOOT_LOG",
    "GUEST_MARKER",
    "ROOT_PARTUUID",
    "BootResult",
    "GuestBootTimeout",
    "GuestError",
    "GuestLayout",
    "boot",
    "build_guest_disk",
    "guest_layout",
    "read_boot_log",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that ``python -m tests.testkit.guest`` does not import the module twice.
    if name in __all__:
        from . import guest

        return getattr(guest, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
