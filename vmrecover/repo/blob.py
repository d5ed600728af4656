"""Chunk digests and the chunk envelope: the one place that knows how chunk bytes are stored.

Every stored chunk file starts with the same 16-byte header (little endian)::

    offset size  field
    0      4     magic  b"VMRC"
    4      1     envelope version: 1 or 2
    5      1     flags: bit 0 = payload zstd-compressed (v1 only), bit 1 = AES-256-GCM encrypted
    6      2     v1: reserved, 0; v2: log2 of the piece size (16: 64 KiB pieces)
    8      4     raw_len: length of the plaintext chunk
    12     4     crc32 of bytes 16.. (detects bit rot without the key; cheap)

**Envelope v1** (repository format 1): bytes 16.. are the payload, the whole chunk as one zstd frame
(or raw when zstd does not shrink it); if encrypted, 12-byte nonce + ciphertext + 16-byte tag, the
associated data being the chunk's digest.  Its digest is SHA-256 of the plaintext, or
HMAC-SHA256(id_key, plaintext) in an encrypted repository.  Reading any byte means decoding the whole.

**Envelope v2** (repository format 2): the chunk is cut into pieces of 64 KiB (the last may be
shorter), each stored alone so that one piece can be decoded and proven without touching the others:

    16     ...   piece table: per piece, u32 stored length (bit 31 set: the piece is a zstd frame)
                 and the SHA-256 of its plaintext (36 bytes each).  Encrypted: 12-byte nonce +
                 AES-GCM(table) + 16-byte tag, associated data b"T" + digest
    ...    ...   the pieces' stored bytes, in order.  Encrypted: each AES-GCM with the nonce
                 ``table nonce + i + 1`` (counter in the last 4 bytes) and associated data
                 digest + u32 i, so a piece moved to another place or chunk fails its tag

The digest is the root of a two-level hash tree: BLAKE2b-256 (person ``vmrc-chunk-v2``, keyed with
id_key in an encrypted repository) of u64 raw_len, u32 piece size and the pieces' SHA-256s.  A reader
of piece i checks the table against the digest (one small hash) and the piece against the table:
nothing unproven is returned.  The root is a different function from v1's digest, so a v1 chunk can
never pass as a v2 chunk of the same name or the other way round (a chunk file's own version byte
may choose the check): both kinds live in one repository (see developer-notes/repository.md).

Payloads (or pieces) that zstd does not shrink are stored uncompressed.  The all-zero digest is
reserved for "hole": all-zero chunks are never stored.

Thread safety: zstd (de)compressor objects are not thread-safe, so each thread gets its own
(``threading.local``); hashlib, hmac, zlib, zstd and AES-GCM release the GIL on large buffers.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import struct
import threading
import zlib
from dataclasses import dataclass

import zstandard

from ..errors import CorruptChunk
from .keys import Keys

MAGIC = b"VMRC"
V1, V2 = 1, 2
FLAG_ZSTD = 1
FLAG_AESGCM = 2
HEADER = struct.Struct("<4sBBHII")
DIGEST_SIZE = 32
ZERO_DIGEST = bytes(DIGEST_SIZE)
PIECE_SHIFT = 16
PIECE_SIZE = 1 << PIECE_SHIFT
ENTRY = struct.Struct("<I32s")  # a v2 piece-table entry
ZFRAME = 1 << 31  # in an entry's length: the piece is a zstd frame
NONCE, TAG = 12, 16
TREE_PERSON = b"vmrc-chunk-v2"


@dataclass(frozen=True, slots=True)
class Identity:
    """A chunk's digest, and for v2 the SHA-256 of each piece (computed once, stored in the table)."""

    digest: bytes
    pieces: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a chunk's pieces are in its file, proven against its digest (v1: one piece, the whole)."""

    version: int
    raw_len: int
    piece_size: int
    offsets: tuple[int, ...]  # file offset of each piece's stored bytes (v1: of the payload)
    lengths: tuple[int, ...]  # stored length of each piece (v1: of the payload)
    zstd: tuple[bool, ...]
    hashes: tuple[bytes, ...]  # v2: SHA-256 of each piece's plaintext
    nonce: bytes = b""  # v2 encrypted: the table's nonce (pieces count on from it)

    @property
    def count(self) -> int:
        return len(self.offsets)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """(file offset, length) of the stored bytes of pieces first..last."""
        return self.offsets[first], self.offsets[last] + self.lengths[last] - self.offsets[first]

    def piece_extent(self, i: int) -> tuple[int, int]:
        """(start, end) of piece i within the plaintext."""
        a = i * self.piece_size
        return a, min(a + self.piece_size, self.raw_len)


def piece_nonce(nonce: bytes, i: int) -> bytes:
    n = (int.from_bytes(nonce[8:], "little") + i + 1) & 0xFFFFFFFF
    return nonce[:8] + n.to_bytes(4, "little")


class ChunkCodec:
    def __init__(self, *, keys: Keys | None, level: int = 3, version: int = V2) -> None:
        self._keys = keys
        self._level = level
        self.version = version
        self._local = threading.local()
        self._aes = None
        if keys is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aes = AESGCM(keys.enc_key)

    @property
    def encrypted(self) -> bool:
        return self._keys is not None

    @property
    def keys(self) -> Keys | None:
        return self._keys

    @property
    def level(self) -> int:
        return self._level

    def at_level(self, level: int) -> ChunkCodec:
        """The same keys compressing new chunks at zstd *level*: a chunk's digest and what reads it do
        not depend on the level, so chunks of any level mix in one repository."""
        if level == self._level:
            return self
        return ChunkCodec(keys=self._keys, level=level, version=self.version)

    # --- identity ------------------------------------------------------------------------------
    def digest_v1(self, data: bytes | bytearray | memoryview) -> bytes:
        if self._keys is None:
            return hashlib.sha256(data).digest()
        return hmac.digest(self._keys.id_key, data, "sha256")

    def tree_root(self, raw_len: int, hashes: tuple[bytes, ...] | list[bytes]) -> bytes:
        key = b"" if self._keys is None else self._keys.id_key
        h = hashlib.blake2b(digest_size=DIGEST_SIZE, key=key, person=TREE_PERSON)
        h.update(struct.pack("<QI", raw_len, PIECE_SIZE))
        h.update(b"".join(hashes))
        return h.digest()

    def identify(self, data: bytes | bytearray | memoryview) -> Identity:
        """The digest new chunks get in this repository's format (v2: with the pieces' hashes)."""
        if self.version == V1:
            return Identity(self.digest_v1(data))
        view = memoryview(data)
        hashes = tuple(
            hashlib.sha256(view[a : a + PIECE_SIZE]).digest() for a in range(0, len(view), PIECE_SIZE)
        )
        return Identity(self.tree_root(len(view), hashes), hashes)

    def digest(self, data: bytes | bytearray | memoryview) -> bytes:
        return self.identify(data).digest

    def _ctx(self) -> threading.local:
        local = self._local
        if not hasattr(local, "c"):
            local.c = zstandard.ZstdCompressor(level=self._level)
            local.d = zstandard.ZstdDecompressor()
        return local

    # --- writing -------------------------------------------------------------------------------
    def encode(self, ident: Identity | bytes, data: bytes) -> bytes:
        if isinstance(ident, bytes):  # a digest alone: v1, or v2 hashed again
            ident = Identity(ident) if self.version == V1 else self.identify(data)
        if not ident.pieces:
            return self._encode_v1(ident.digest, data)
        digest, c = ident.digest, self._ctx().c
        view = memoryview(data)
        table, stored = [], []
        nonce = os.urandom(NONCE) if self._aes is not None else b""
        for i, h in enumerate(ident.pieces):
            piece = view[i * PIECE_SIZE : (i + 1) * PIECE_SIZE]
            z = c.compress(piece)
            flag = ZFRAME
            if len(z) >= len(piece):
                z, flag = bytes(piece), 0
            if self._aes is not None:
                z = self._aes.encrypt(piece_nonce(nonce, i), z, digest + i.to_bytes(4, "little"))
            table.append(ENTRY.pack(len(z) | flag, h))
            stored.append(z)
        tbl = b"".join(table)
        flags = 0
        if self._aes is not None:
            tbl = nonce + self._aes.encrypt(nonce, tbl, b"T" + digest)
            flags = FLAG_AESGCM
        body = tbl + b"".join(stored)
        return HEADER.pack(MAGIC, V2, flags, PIECE_SHIFT, len(data), zlib.crc32(body)) + body

    def _encode_v1(self, digest: bytes, data: bytes) -> bytes:
        flags = 0
        payload = self._ctx().c.compress(data)
        if len(payload) < len(data):
            flags |= FLAG_ZSTD
        else:
            payload = data
        if self._aes is not None:
            nonce = os.urandom(NONCE)
            payload = nonce + self._aes.encrypt(nonce, payload, digest)
            flags |= FLAG_AESGCM
        return HEADER.pack(MAGIC, V1, flags, 0, len(data), zlib.crc32(payload)) + payload

    # --- reading -------------------------------------------------------------------------------
    def head_size(self, digest: bytes, head: bytes | memoryview) -> int:
        """How many bytes from the file's start :meth:`layout` needs (header and piece table)."""
        version, flags, shift, raw_len = self._header(digest, head)
        if version == V1:
            return HEADER.size
        n = -(-raw_len // (1 << shift))
        return HEADER.size + n * ENTRY.size + (NONCE + TAG if flags & FLAG_AESGCM else 0)

    def _header(self, digest: bytes, blob: bytes | memoryview) -> tuple[int, int, int, int]:
        if len(blob) < HEADER.size:
            raise CorruptChunk(digest, f"file is {len(blob)} bytes, shorter than the envelope header")
        magic, version, flags, field, raw_len, _ = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise CorruptChunk(digest, "bad magic")
        if version == V1:
            if field or flags & ~(FLAG_ZSTD | FLAG_AESGCM):
                raise CorruptChunk(digest, "unknown flags set in the envelope header")
        elif version == V2:
            if field != PIECE_SHIFT or flags & ~FLAG_AESGCM:
                raise CorruptChunk(
                    digest, f"unknown flags or piece size in the envelope header ({flags}, {field})"
                )
        else:
            raise CorruptChunk(digest, f"envelope version {version} is unknown")
        if bool(flags & FLAG_AESGCM) != (self._aes is not None):
            if self._aes is None:
                raise CorruptChunk(digest, "chunk is encrypted but the repository has no key")
            raise CorruptChunk(digest, "chunk is not encrypted in an encrypted repository")
        return version, flags, field, raw_len

    def layout(self, digest: bytes, head: bytes | memoryview, file_size: int) -> Layout:
        """The chunk's layout from the first :meth:`head_size` bytes of its file, its piece table
        authenticated (encrypted) and proven against *digest* (CorruptChunk otherwise)."""
        version, flags, _, raw_len = self._header(digest, head)
        if version == V1:
            n = file_size - HEADER.size
            return Layout(V1, raw_len, raw_len, (HEADER.size,), (n,), (bool(flags & FLAG_ZSTD),), ())
        end = self.head_size(digest, head)
        if len(head) < end:
            raise CorruptChunk(digest, f"file is {len(head)} bytes, shorter than its piece table")
        tbl = memoryview(head)[HEADER.size : end]
        nonce = b""
        if self._aes is not None:
            nonce = bytes(tbl[:NONCE])
            tbl = memoryview(self._decrypt(digest, nonce, tbl[NONCE:], b"T" + digest, "piece table"))
        entries = list(ENTRY.iter_unpack(tbl))  # (in C: this runs for every cold random read)
        hashes = tuple(h for _, h in entries)
        if self.tree_root(raw_len, hashes) != digest:
            raise CorruptChunk(digest, "piece table does not match the digest")
        lengths = tuple(w & ~ZFRAME for w, _ in entries)
        offsets = tuple(itertools.accumulate(lengths[:-1], initial=end))
        pos = end + sum(lengths)
        if pos != file_size:
            raise CorruptChunk(digest, f"file is {file_size} bytes, its piece table says {pos}")
        zstd = tuple(bool(w & ZFRAME) for w, _ in entries)
        return Layout(V2, raw_len, PIECE_SIZE, offsets, lengths, zstd, hashes, nonce)

    def _decrypt(self, digest: bytes, nonce: bytes, data: bytes | memoryview, ad: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        assert self._aes is not None
        try:
            # bytes(): cryptography < 40 (Debian 12 ships 38) accepts no memoryview here
            return self._aes.decrypt(nonce, bytes(data), ad)
        except InvalidTag:
            reason = f"{what}: authentication failed (tampered, moved, or stored under another name)"
            raise CorruptChunk(digest, reason) from None

    def _inflate(self, digest: bytes, data: bytes | memoryview, size: int, what: str = "") -> bytes:
        """One zstd frame that must decode to *size* bytes.  A frame that names its size (ours all
        do) is checked before anything is allocated: python-zstandard allocates what the frame says,
        whatever ``max_output_size`` says, so a damaged or hostile size could ask for gigabytes."""
        try:
            named = zstandard.frame_content_size(data)
            if named not in (-1, size):
                raise CorruptChunk(digest, f"{what}zstd frame says {named} bytes, the envelope {size}")
            out = self._ctx().d.decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(digest, f"{what}zstd: {exc}") from None
        return out

    def decode_pieces(
        self, digest: bytes, layout: Layout, first: int, last: int, stored: bytes | memoryview, at: int
    ) -> bytes | bytearray:
        """The plaintext of pieces first..last, one buffer, each piece proven against the (proven)
        table; *stored* holds their stored bytes from file offset *at* on.  A v1 chunk's one piece is
        the whole, proven against the digest.  v2 pieces are decoded in place into the result (no
        piece buffers, no join: the page faults of a fresh buffer per piece cost more than the hash)."""
        view = memoryview(stored)
        if layout.version == V1:
            o = layout.offsets[0] - at
            return self._decode_v1(digest, layout, view[o : o + layout.lengths[0]])
        if first == last:  # a random reader's piece: zstd's own buffer, no zeroed bytearray to fill
            o = layout.offsets[first] - at
            return self._decode_piece(digest, layout, first, view[o : o + layout.lengths[first]])
        base = first * layout.piece_size
        out = bytearray(layout.piece_extent(last)[1] - base)
        target = memoryview(out)
        for i in range(first, last + 1):
            a, b = layout.piece_extent(i)
            o = layout.offsets[i] - at
            self._decode_into(digest, layout, i, view[o : o + layout.lengths[i]], target[a - base : b - base])
        return out

    def _open_piece(
        self, digest: bytes, layout: Layout, i: int, stored: bytes | memoryview
    ) -> bytes | memoryview:
        """Piece i's stored bytes, authenticated and decrypted in an encrypted repository."""
        if self._aes is None:
            return stored
        ad = digest + i.to_bytes(4, "little")
        return self._decrypt(digest, piece_nonce(layout.nonce, i), stored, ad, f"piece {i}")

    def _check_piece(
        self, digest: bytes, layout: Layout, i: int, ok: bool, plain: bytes | memoryview
    ) -> None:
        if not ok or hashlib.sha256(plain).digest() != layout.hashes[i]:
            a, b = layout.piece_extent(i)
            raise CorruptChunk(digest, f"piece {i} (bytes {a}-{b}) does not match its hash")

    def _decode_piece(self, digest: bytes, layout: Layout, i: int, stored: bytes | memoryview) -> bytes:
        stored = self._open_piece(digest, layout, i, stored)
        a, b = layout.piece_extent(i)
        plain = self._inflate(digest, stored, b - a, f"piece {i}: ") if layout.zstd[i] else bytes(stored)
        self._check_piece(digest, layout, i, len(plain) == b - a, plain)
        return plain

    def _decode_into(
        self, digest: bytes, layout: Layout, i: int, stored: bytes | memoryview, out: memoryview
    ) -> None:
        stored = self._open_piece(digest, layout, i, stored)
        n = len(out)
        if not layout.zstd[i]:
            ok = len(stored) == n
            if ok:
                out[:] = stored
        else:
            try:
                reader = self._ctx().d.stream_reader(stored, read_across_frames=False)
                got = 0
                while got < n and (k := reader.readinto(out[got:])):
                    got += k
                ok = got == n and not reader.read(1)
            except zstandard.ZstdError as exc:
                raise CorruptChunk(digest, f"piece {i}: zstd: {exc}") from None
        self._check_piece(digest, layout, i, ok, out)

    def _decode_v1(self, digest: bytes, layout: Layout, payload: bytes | memoryview) -> bytes:
        if self._aes is not None:
            payload = self._decrypt(digest, bytes(payload[:NONCE]), payload[NONCE:], digest, "chunk")
        data = self._inflate(digest, payload, layout.raw_len) if layout.zstd[0] else bytes(payload)
        if len(data) != layout.raw_len:
            raise CorruptChunk(digest, f"decoded {len(data)} bytes, envelope says {layout.raw_len}")
        if self.digest_v1(data) != digest:
            raise CorruptChunk(digest, "content does not match its digest")
        return data

    def decode(self, digest: bytes, blob: bytes, *, check_crc: bool = False) -> bytes | bytearray:
        """Return the chunk's plaintext, or raise CorruptChunk saying what is wrong.

        The plaintext is always checked against its digest, which catches every corruption; the crc32
        (more CPU on the read path) is checked only when asked, to tell bit rot apart in reports.
        """
        if check_crc:
            self._header(digest, blob)
            if zlib.crc32(memoryview(blob)[HEADER.size :]) != HEADER.unpack_from(blob)[5]:
                raise CorruptChunk(digest, "crc32 mismatch (bit rot or truncation)")
        layout = self.layout(digest, blob, len(blob))
        return self.decode_pieces(digest, layout, 0, layout.count - 1, blob, 0)
