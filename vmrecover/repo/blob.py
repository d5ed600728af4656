"""Chunk digests and the chunk envelope: the one place that knows how chunk bytes are stored.

Envelope v1 (every stored chunk file is exactly this, little endian)::

    offset size  field
    0      4     magic  b"VMRC"
    4      1     version = 1
    5      1     flags: bit 0 = payload zstd-compressed, bit 1 = payload AES-256-GCM encrypted
    6      2     reserved, 0
    8      4     raw_len: length of the plaintext chunk
    12     4     crc32 of bytes 16.. (detects bit rot without the key; cheap)
    16     ...   payload; if encrypted: 12-byte nonce + ciphertext with 16-byte tag,
                 associated data = the chunk's digest (a chunk file renamed to another digest fails)

Reads check the plaintext against the digest (always) and the crc32 (verify, and the datastore's
small random reads in encrypted repositories, which see a chunk's first bytes before its digest is
checked: PartialDecode).
The digest is SHA-256 of the plaintext, or HMAC-SHA256(id_key, plaintext) in an encrypted repository.
Payloads that zstd does not shrink (random data) are stored uncompressed: restoring them costs nothing.
The all-zero digest is reserved for "hole": all-zero chunks are never stored.

Thread safety: zstd (de)compressor objects are not thread-safe, so each thread gets its own
(``threading.local``); hashlib, hmac, zlib and AES-GCM release the GIL on large buffers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import zlib

import zstandard

from ..errors import CorruptChunk
from .keys import Keys

MAGIC = b"VMRC"
VERSION = 1
FLAG_ZSTD = 1
FLAG_AESGCM = 2
HEADER = struct.Struct("<4sBBHII")
DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)


class ChunkCodec:
    def __init__(self, *, keys: Keys | None, level: int = 3) -> None:
        self._keys = keys
        self._level = level
        self._local = threading.local()
        self._aes = None
        if keys is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aes = AESGCM(keys.enc_key)

    @property
    def encrypted(self) -> bool:
        return self._keys is not None

    @property
    def level(self) -> int:
        return self._level

    def at_level(self, level: int) -> ChunkCodec:
        """The same keys compressing new chunks at zstd *level*: a chunk's digest and what reads it do
        not depend on the level, so chunks of any level mix in one repository."""
        return self if level == self._level else ChunkCodec(keys=self._keys, level=level)

    def digest(self, data: bytes | memoryview) -> bytes:
        if self._keys is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self._keys.id_key, data, "sha256")

    def _ctx(self) -> threading.local:
        local = self._local
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=self._level)
            local.d = zstandard.ZstdDecompressor()
        return local

    def encode(self, digest: bytes, data: bytes) -> bytes:
        flags = 0
        payload = self._ctx().c.compress(data)
        if len(payload) < len(data):
            flags |= FLAG_ZSTD
        else:
            payload = data
        if self._aes is not None:
            nonce = os.urandom(12)
            payload = nonce + self._aes.encrypt(nonce, payload, digest)
            flags |= FLAG_AESGCM
        return HEADER.pack(MAGIC, VERSION, flags, 0, len(data), zlib.crc32(payload)) + payload

    def _open(self, digest: bytes, blob: bytes, *, check_crc: bool) -> tuple[int, int, memoryview]:
        """Check the envelope (and the crc32 if asked), decrypt; return (flags, raw_len, payload)."""
        if len(blob) < HEADER.size:
            raise CorruptChunk(digest, f"file is {len(blob)} bytes, shorter than the envelope header")
        magic, version, flags, reserved, raw_len, crc = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise CorruptChunk(digest, "bad magic")
        if version != VERSION:
            raise CorruptChunk(digest, f"envelope version {version} is unknown")
        if reserved or flags & ~(FLAG_ZSTD | FLAG_AESGCM):
            raise CorruptChunk(digest, "unknown flags set in the envelope header")
        payload = memoryview(blob)[HEADER.size :]
        if check_crc and zlib.crc32(payload) != crc:
            raise CorruptChunk(digest, "crc32 mismatch (bit rot or truncation)")
        if flags & FLAG_AESGCM:
            if self._aes is None:
                raise CorruptChunk(digest, "chunk is encrypted but the repository has no key")
            from cryptography.exceptions import InvalidTag

            try:
                # bytes(): cryptography < 40 (Debian 12 ships 38) accepts no memoryview here
                payload = memoryview(self._aes.decrypt(bytes(payload[:12]), bytes(payload[12:]), digest))
            except InvalidTag:
                reason = "authentication failed (tampered, or stored under another name)"
                raise CorruptChunk(digest, reason) from None
        elif self._aes is not None:
            raise CorruptChunk(digest, "chunk is not encrypted in an encrypted repository")
        return flags, raw_len, payload

    def decode(self, digest: bytes, blob: bytes, *, check_crc: bool = False) -> bytes:
        """Return the chunk's plaintext, or raise CorruptChunk saying what is wrong.

        The plaintext is always checked against its digest, which catches every corruption; the crc32
        (40% more CPU on the read path) is checked only when asked, to tell bit rot apart in reports.
        """
        flags, raw_len, payload = self._open(digest, blob, check_crc=check_crc)
        if flags & FLAG_ZSTD:
            try:
                data = self._ctx().d.decompress(payload, max_output_size=raw_len)
            except zstandard.ZstdError as exc:
                raise CorruptChunk(digest, f"zstd: {exc}") from None
        else:
            data = bytes(payload)
        return self._checked(digest, data, raw_len)

    def _checked(self, digest: bytes, data: bytes, raw_len: int) -> bytes:
        if len(data) != raw_len:
            raise CorruptChunk(digest, f"decoded {len(data)} bytes, envelope says {raw_len}")
        if self.digest(data) != digest:
            raise CorruptChunk(digest, "content does not match its digest")
        return data

    def decode_partial(self, digest: bytes, blob: bytes) -> PartialDecode:
        """Start decoding a chunk for a reader that needs only its beginning (see PartialDecode)."""
        flags, raw_len, payload = self._open(digest, blob, check_crc=True)
        return PartialDecode(self, digest, flags, raw_len, payload)


class PartialDecode:
    """A chunk decoded only as far as a reader needs, for the latency of small random reads.

    The bytes a reader gets from :meth:`upto` have passed the envelope's crc32 and, in an encrypted
    repository, the AES-GCM tag, which binds them to their digest: only then may they be served before
    :meth:`finish` decodes the rest and checks the digest (only a finished chunk may be cached).
    Without encryption the crc32 catches bit rot but not a whole chunk stored under the wrong name,
    so unencrypted readers (see ChunkCache.read) do not serve partial bytes.
    """

    def __init__(
        self, codec: ChunkCodec, digest: bytes, flags: int, raw_len: int, payload: memoryview
    ) -> None:
        self.codec = codec
        self.digest = digest
        self.raw_len = raw_len
        self._buf = bytearray()
        self._reader = None
        if flags & FLAG_ZSTD:
            self._reader = zstandard.ZstdDecompressor().stream_reader(payload)
        else:
            self._buf[:] = payload

    def upto(self, end: int) -> bytes | bytearray:
        """At least the first *end* bytes of the plaintext (fewer only at its end)."""
        try:
            while self._reader is not None and len(self._buf) < end:
                more = self._reader.read(end - len(self._buf))
                if not more:
                    self._reader = None
                    break
                self._buf += more
        except zstandard.ZstdError as exc:
            raise CorruptChunk(self.digest, f"zstd: {exc}") from None
        return self._buf

    def finish(self) -> bytes:
        """The whole plaintext, checked against the digest (CorruptChunk otherwise)."""
        self.upto(self.raw_len + 1)
        return self.codec._checked(self.digest, bytes(self._buf), self.raw_len)
