"""XDR (RFC 4506): the subset NFS v3, MOUNT v3 and the portmapper use.

Decoding never trusts a length from the wire: every variable-length item is checked against both the
bytes actually left in the message and the item's own bound before anything is allocated, and any
shortfall raises :class:`XdrError` (answered GARBAGE_ARGS by the RPC layer).
"""

from __future__ import annotations

import struct

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")


class XdrError(ValueError):
    """The bytes are not the XDR the procedure expects (short, too long, or out of range)."""


class Packer:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u32(self, v: int) -> None:
        self.buf += _U32.pack(v & 0xFFFFFFFF)

    def i32(self, v: int) -> None:
        self.buf += _I32.pack(v)

    def u64(self, v: int) -> None:
        self.buf += _U64.pack(v & 0xFFFFFFFFFFFFFFFF)

    def bool(self, v: bool) -> None:
        self.u32(1 if v else 0)

    def fixed(self, data: bytes) -> None:
        """Fixed-length opaque: the bytes, padded to 4."""
        self.buf += data
        self.buf += b"\0" * (-len(data) % 4)

    def opaque(self, data: bytes | bytearray | memoryview) -> None:
        """Variable-length opaque: a length, the bytes, padding."""
        self.u32(len(data))
        self.buf += data
        self.buf += b"\0" * (-len(data) % 4)

    def string(self, text: str | bytes) -> None:
        self.opaque(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)

    def getvalue(self) -> bytes:
        return bytes(self.buf)


class Unpacker:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise XdrError(f"message ends {end - len(self.data)} bytes early")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def i32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def bool(self) -> bool:
        v = self.u32()
        if v > 1:
            raise XdrError(f"boolean {v}")
        return v == 1

    def enum(self, allowed: range | frozenset[int]) -> int:
        v = self.u32()
        if v not in allowed:
            raise XdrError(f"enum value {v} out of range")
        return v

    def fixed(self, n: int) -> bytes:
        out = bytes(self._take(n))
        self._take(-n % 4)
        return out

    def opaque_view(self, limit: int) -> memoryview:
        """Variable-length opaque of at most *limit* bytes, as a view into the message (no copy)."""
        n = self.u32()
        if n > limit:
            raise XdrError(f"{n} bytes where at most {limit} are allowed")
        out = self._take(n)
        self._take(-n % 4)
        return out

    def opaque(self, limit: int) -> bytes:
        return bytes(self.opaque_view(limit))

    def string(self, limit: int) -> str:
        """A string as NFS sends it: bytes, not necessarily UTF-8 (kept losslessly as surrogates)."""
        return self.opaque_view(limit).tobytes().decode("utf-8", "surrogateescape")
