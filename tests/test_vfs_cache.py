"""The shared chunk cache: hits, LRU eviction, one fetch for concurrent readers, errors never cached,
and v2 chunks read piece by piece, each piece proven (a damaged piece costs only its own range)."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from vmrecover.errors import CorruptChunk
from vmrecover.repo.blob import PIECE_SIZE, ChunkCodec, Identity, Layout
from vmrecover.repo.chunkstore import ChunkStore
from vmrecover.repo.keys import Keys
from vmrecover.vfs.cache import ChunkCache

MiB = 1 << 20


class CountingStore(ChunkStore):
    def __init__(self, root: Path, *, version: int = 2, keys: Keys | None = None) -> None:
        ChunkStore.create_layout(root)
        super().__init__(root, ChunkCodec(keys=keys, version=version))
        self.reads: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.delay = 0.0
        self.whole_delay = 0.0

    def read_pieces(
        self, digest: bytes, first: int, last: int, layout: Layout | None = None, *, head: bytes | None = None
    ) -> tuple[Layout, bytes | bytearray]:
        with self.lock:
            self.reads.append((first, last))
        time.sleep(self.delay if first == last else self.whole_delay)  # a slow disk: readers overlap
        return super().read_pieces(digest, first, last, layout, head=head)


STORES = ["v1", "v2", "v2-encrypted"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> CountingStore:
    keys = Keys(os.urandom(32), os.urandom(32)) if "encrypted" in request.param else None
    return CountingStore(tmp_path / "chunks", version=1 if request.param == "v1" else 2, keys=keys)


def _put(store: ChunkStore, data: bytes) -> bytes:
    ident = store.codec.identify(data)
    store.put(ident, data)
    return ident.digest


def _text(n: int) -> bytes:
    return b"".join(b"line %d %s\n" % (i, os.urandom(6).hex().encode()) for i in range(n // 20))[:n]


def test_concurrent_readers_share_one_fetch_and_hits_are_cached(store: CountingStore) -> None:
    d = _put(store, b"a" * 5000)
    store.delay = 0.05
    cache = ChunkCache(store, MiB)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(d))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"a" * 5000] * 8 and len(store.reads) == 1
    assert cache.lookup(d, 0, 5000) == b"a" * 5000 and len(store.reads) == 1
    cache.close()


def test_eviction_by_bytes(store: CountingStore) -> None:
    ds = [_put(store, bytes([i]) * 4000) for i in range(1, 5)]
    cache = ChunkCache(store, 10_000)
    for d in ds[:2]:
        cache.get(d)
    cache.get(ds[0])  # touch: ds[1] is now least recently used
    cache.get(ds[2])
    assert cache.size <= 10_000
    assert cache.lookup(ds[1], 0, 10) is None and cache.lookup(ds[0], 0, 10) is not None
    cache.close()


def _chunks(store: ChunkStore, tag: str, n: int) -> list[bytes]:
    return [_put(store, (b"%s %d " % (tag.encode(), i)).ljust(4000, b".")) for i in range(n)]


def _pass(cache: ChunkCache, store: CountingStore, ds: list[bytes]) -> int:
    """Read every chunk of *ds* whole, in order; how many had to be read from the store."""
    before = len(store.reads)
    for d in ds:
        cache.get(d)
    return len(store.reads) - before


def test_a_scan_larger_than_the_cache_finds_what_stayed_on_its_next_pass(store: CountingStore) -> None:
    """LRU would evict each chunk before the next pass wants it (every pass would read 60): the
    chunks that entered the main part stay, the rest do not displace them."""
    ds = _chunks(store, "loop", 60)
    cache = ChunkCache(store, 160_000)  # 40 chunks: a window of 20, a main part of 20
    assert _pass(cache, store, ds) == 60
    for _ in range(3):
        assert _pass(cache, store, ds) == 40
        assert cache.size <= 160_000
    cache.close()


def test_a_scan_keeps_what_a_reader_wants_again_and_again(store: CountingStore) -> None:
    """A running VM's hot chunks survive a hypervisor copying a whole disk (a migration's scan)."""
    hot, filler, scan = _chunks(store, "hot", 5), _chunks(store, "filler", 60), _chunks(store, "scan", 200)
    cache = ChunkCache(store, 160_000, window=20_000)
    for i in range(3):  # wanted three times, with other reads between (three visits)
        _pass(cache, store, hot)
        _pass(cache, store, filler[i * 20 : i * 20 + 20])
    assert _pass(cache, store, scan) == 200
    assert _pass(cache, store, hot) == 0
    cache.close()


def test_what_is_wanted_again_replaces_what_was_wanted_once(store: CountingStore) -> None:
    """The filter does not freeze the cache: chunks read once long ago give way to a set read again."""
    old, now = _chunks(store, "old", 50), _chunks(store, "now", 20)  # now: more than the window holds
    cache = ChunkCache(store, 160_000, window=20_000)
    _pass(cache, store, old)
    assert _pass(cache, store, now) == 20
    _pass(cache, store, now)
    assert _pass(cache, store, now) == 0
    cache.close()


def test_the_admission_filter_counts_visits_and_ages() -> None:
    from vmrecover.vfs.admission import VISIT_TICKS, Frequency
    from vmrecover.vfs.disk import READAHEAD_CHUNKS

    assert VISIT_TICKS >= 2 * READAHEAD_CHUNKS  # two readers' decode-ahead is one visit of each chunk
    f = Frequency(sample=100)
    f.wanted(b"a", fetched=True)
    for _ in range(8):  # a sequential reader's requests into the chunk it just fetched: one visit
        f.wanted(b"a", fetched=False)
    assert f.of(b"a") == 1
    for i in range(VISIT_TICKS):  # other chunks fetched meanwhile: as many as two readers decode ahead
        f.wanted(b"x%d" % i, fetched=True)
    f.wanted(b"a", fetched=False)
    assert f.of(b"a") == 1  # still the visit that fetched it
    f.wanted(b"x%d" % VISIT_TICKS, fetched=True)  # one more: the next read of it is a new visit
    f.wanted(b"a", fetched=False)
    assert f.of(b"a") == 2 and f.admit(b"a", b"x0") and not f.admit(b"x0", b"x1")
    for i in range(100):  # the sample is full: every count halves, ones are forgotten
        f.wanted(b"y%d" % i, fetched=True)
    assert f.of(b"a") == 1 and f.of(b"x0") == 0 and len(f) < 100
    f.holding(5)  # the sample follows the most chunks the cache has held, never fewer
    assert f.sample == 100
    f.holding(20)
    assert f.sample == 200


def test_random_read_gets_its_piece_first_and_the_rest_later(store: CountingStore) -> None:
    data = _text(MiB)
    d = _put(store, data)
    store.whole_delay = 0.5  # decoding the whole chunk is slow: the pieces must not wait for it
    cache = ChunkCache(store, 8 * MiB)
    a, b, n = 5 * PIECE_SIZE + 100, 9 * PIECE_SIZE, 6 * PIECE_SIZE + 8192
    began = time.monotonic()
    assert cache.read(d, a, a + 4096) == data[a : a + 4096]
    if store.codec.version == 1:
        assert cache.lookup(d, 0, MiB) == data  # a v1 chunk is one piece: the whole was decoded
    else:
        assert store.reads == [(5, 5)] and cache.lookup(d, 0, 10) is None  # its piece, nothing more
        assert cache.read(d, b, b + 512) == data[b : b + 512]  # a second piece, far from the first:
        time.sleep(0.1)  # a random reader, whose next reads the rest of the chunk would only delay
        assert store.reads == [(5, 5), (9, 9)], "a far second piece started a background decode"
        assert cache.read(d, n, n + 512) == data[n : n + 512]  # next to the first: a reader that stays
        assert time.monotonic() - began < 0.6 and store.reads[:3] == [(5, 5), (9, 9), (6, 6)]
        assert cache.lookup(d, 0, 10) is None, "a piece waited for the rest of the chunk"
        deadline = time.monotonic() + 5  # the rest of the chunk comes later, in the background
        while cache.lookup(d, 0, MiB) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cache.lookup(d, 0, MiB) == data and store.reads[3] == (0, 1 << 30)
    reads = len(store.reads)
    c = 6 * PIECE_SIZE - 10  # now a hit, across a piece boundary
    assert cache.read(d, c, c + 20) == data[c : c + 20] and cache.get(d) == data and len(store.reads) == reads
    cache.close()


def test_random_reads_never_queue_behind_many_background_decodes(tmp_path: Path) -> None:
    store = CountingStore(tmp_path)
    chunks = [_text(MiB) for _ in range(8)]
    ds = [_put(store, c) for c in chunks]
    store.whole_delay = 0.3
    cache = ChunkCache(store, 64 * MiB)
    began = time.monotonic()
    for d, c in zip(ds, chunks, strict=True):
        assert cache.read(d, 100, 200) == c[100:200]
        assert cache.read(d, PIECE_SIZE, PIECE_SIZE + 100) == c[PIECE_SIZE : PIECE_SIZE + 100]  # a neighbour
    assert time.monotonic() - began < 0.3, "random reads waited for background decodes"
    cache.close()  # waits for the background work
    wholes = [r for r in store.reads if r[0] != r[1]]
    assert 1 <= len(wholes) <= 3, wholes  # at most LATER_MAX queued (+1 running): the rest dropped


def _flip(store: ChunkStore, d: bytes, at: int) -> None:
    path = store.path(d)
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_bit_flip_in_any_piece_fails_that_range_only(store: CountingStore) -> None:
    data = _text(MiB - 1000)  # the last piece is short
    d = _put(store, data)
    layout, _ = ChunkStore.read_pieces(store, d, 0, 0)
    for i in range(layout.count):
        _flip(store, d, layout.offsets[i] + layout.lengths[i] // 2)
        cache = ChunkCache(store, 8 * MiB)
        a = layout.piece_extent(i)[0] if layout.version == 2 else 0
        for _ in range(2):  # never cached: the second reader sees the error too
            with pytest.raises(CorruptChunk):
                cache.read(d, a + 10, a + 20)
        with pytest.raises(CorruptChunk):
            cache.get(d)  # the whole chunk holds the damaged piece
        for j in range(layout.count):  # every other piece still reads, and right
            if j != i:
                c, e = layout.piece_extent(j)
                assert cache.read(d, c, e) == data[c:e]
        cache.close()
        _flip(store, d, layout.offsets[i] + layout.lengths[i] // 2)  # undo


def _zstd_frame_claiming(size: int, length: int) -> bytes:
    """A zstd frame of *length* bytes whose header says it decodes to *size* bytes (one raw block)."""
    body = b"x" * (length - 16)
    head = b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", size)  # single segment, 8-byte content size
    return head + ((len(body) << 3) | 1).to_bytes(3, "little") + body  # the last block, raw


@pytest.mark.parametrize("version", [1, 2])
def test_a_zstd_frame_claiming_a_huge_size_is_damage_not_an_allocation(version: int, tmp_path: Path) -> None:
    """python-zstandard allocates what a frame's header says it holds (1 TiB: MemoryError, 8 GiB:
    mapped, then a zstd error): a chunk must be caught as damaged before that."""
    store = CountingStore(tmp_path, version=version)
    data = _text(MiB)
    d = _put(store, data)
    layout, _ = ChunkStore.read_pieces(store, d, 0, 0)
    i = 3 if version == 2 else 0
    assert layout.zstd[i]
    raw = bytearray(store.path(d).read_bytes())
    raw[layout.offsets[i] : layout.offsets[i] + layout.lengths[i]] = _zstd_frame_claiming(
        1 << 40, layout.lengths[i]
    )
    store.path(d).write_bytes(bytes(raw))
    cache = ChunkCache(store, 8 * MiB)
    a, b = layout.piece_extent(i)
    with pytest.raises(CorruptChunk, match=f"zstd frame says {1 << 40} bytes, the envelope {b - a}"):
        cache.read(d, a + 10, a + 20)
    with pytest.raises(CorruptChunk):
        cache.get(d)
    if version == 2:
        assert cache.read(d, 0, 100) == data[:100]  # the other pieces still read
    cache.close()


def test_damaged_piece_table_or_header_fails_every_read(store: CountingStore) -> None:
    data = _text(MiB)
    d = _put(store, data)
    # flags, a later table entry's hash (v1: the payload), v2: the first entry's length (v1: a zstd
    # frame header bit that changes nothing decoded, so not a damage to report)
    for at in (5, 300) if store.codec.version == 1 else (5, 300, 17):
        _flip(store, d, at)
        cache = ChunkCache(store, 8 * MiB)
        with pytest.raises(CorruptChunk):
            cache.read(d, 0, 10)
        cache.close()
        _flip(store, d, at)
    cache = ChunkCache(store, 8 * MiB)
    assert cache.read(d, 0, 10) == data[:10]
    cache.close()


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_piece_swapped_in_from_another_chunk_is_caught(encrypted: bool, tmp_path: Path) -> None:
    store = CountingStore(tmp_path, keys=Keys(os.urandom(32), os.urandom(32)) if encrypted else None)
    one, two = _text(MiB), _text(MiB)
    d1, d2 = _put(store, one), _put(store, two)
    l1, _ = ChunkStore.read_pieces(store, d1, 0, 0)
    l2, _ = ChunkStore.read_pieces(store, d2, 0, 0)
    raw1, raw2 = bytearray(store.path(d1).read_bytes()), store.path(d2).read_bytes()
    # piece 3 of chunk 2 in place of piece 3 of chunk 1, the table entry's length fixed to match
    # where the lengths agree (else the table no longer matches the file): compressed text of the same
    # shape is close; pad or cut to the slot
    slot = slice(l1.offsets[3], l1.offsets[3] + l1.lengths[3])
    donor = raw2[l2.offsets[3] : l2.offsets[3] + l2.lengths[3]]
    raw1[slot] = donor[: l1.lengths[3]].ljust(l1.lengths[3], b"\0")
    store.path(d1).write_bytes(bytes(raw1))
    cache = ChunkCache(store, 8 * MiB)
    a, b = l1.piece_extent(3)
    with pytest.raises(CorruptChunk):
        cache.read(d1, a, b)
    c, e = l1.piece_extent(2)
    assert cache.read(d1, c, e) == one[c:e]
    cache.close()
    # the whole file of another chunk under this name: its table does not match the digest
    store.path(d1).write_bytes(raw2)
    cache = ChunkCache(store, 8 * MiB)
    with pytest.raises(CorruptChunk, match=r"digest|another name"):
        cache.read(d1, 0, 10)
    cache.close()


def test_a_v1_envelope_cannot_pass_as_a_v2_chunk_or_back(tmp_path: Path) -> None:
    """Both kinds share one repository and the file's version byte picks the check: each check is a
    different hash function, so a v1 file under a v2 name (or the reverse) fails."""
    for keys in (None, Keys(os.urandom(32), os.urandom(32))):
        v1 = ChunkCodec(keys=keys, version=1)
        v2 = ChunkCodec(keys=keys, version=2)
        data = _text(300_000)
        i1, i2 = v1.identify(data), v2.identify(data)
        assert i1.digest != i2.digest
        with pytest.raises(CorruptChunk):  # a v1 envelope of the data under the v2 name
            v2.decode(i2.digest, v1.encode(Identity(i2.digest), data))
        with pytest.raises(CorruptChunk):  # a v2 envelope (pieces, table) under the v1 name
            v1.decode(i1.digest, v2.encode(Identity(i1.digest, i2.pieces), data))
        assert v2.decode(i1.digest, v1.encode(i1, data)) == data  # either codec reads either kind
        assert v1.decode(i2.digest, v2.encode(i2, data)) == data


def test_prefetch_queued_before_a_read_does_not_deadlock_the_pool(store: CountingStore) -> None:
    """Readahead of a chunk that a reader then claims: pool tasks never wait for other fetches."""
    slow, d = _put(store, b"s" * 70000), _put(store, b"d" * 70000)
    store.delay = 0.05
    cache = ChunkCache(store, 8 * MiB, workers=1)
    cache.prefetch([slow, d])  # the worker is busy with `slow`; d's prefetch waits in the queue
    assert cache.read(d, 5, 10) == b"d" * 5
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(cache.get(d)), daemon=True)
    t.start()
    t.join(timeout=5)
    assert got == [b"d" * 70000], "a reader waiting for the chunk hung"
    cache.close()


def test_lru_map_bounds_count_and_weight_and_reports_evictions() -> None:
    from vmrecover.vfs.lru import Lru

    evicted: list[str] = []
    m: Lru[str, bytes] = Lru(3, budget=10, weigh=len, on_evict=lambda k, v: evicted.append(k))
    m.put("a", b"1234")
    m.put("b", b"1234")
    assert m.get("a") == b"1234"  # a is now the most recent
    m.put("c", b"1234")  # weight 12 > 10: the least recently used (b) goes
    assert evicted == ["b"] and "a" in m and "c" in m and m.weight == 8
    m.put("d", b"1")
    m.put("e", b"1")  # 4 entries > 3: a goes
    assert evicted == ["b", "a"] and len(m) == 3
    m.put("big", b"x" * 100)  # the newest is kept even alone over the budget
    assert list(m) == ["big"] and m.weight == 100
    assert m.pop("big") == b"x" * 100 and m.weight == 0 and m.get("big") is None


def test_decode_ahead_queued_twice_decodes_each_chunk_once(tmp_path: Path) -> None:
    """Readers moving on call prefetch again and again for the same next chunks while the pool is
    busy: a chunk already queued (or already decoded when its task starts) is not decoded again."""
    store = CountingStore(tmp_path)
    chunks = [_text(MiB) for _ in range(6)]
    ds = [_put(store, c) for c in chunks]
    store.whole_delay = 0.05
    cache = ChunkCache(store, 64 * MiB, workers=1)
    for _ in range(5):
        cache.prefetch(ds)
    for d, c in zip(ds, chunks, strict=True):
        assert cache.read(d, 0, MiB, whole=True) == c
    cache.close()
    assert len(store.reads) == len(ds), store.reads
