"""The shared chunk cache: hits, LRU eviction, one fetch for concurrent readers, errors never cached."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from vmrecover.errors import CorruptChunk
from vmrecover.repo.blob import ChunkCodec
from vmrecover.repo.chunkstore import ChunkStore
from vmrecover.vfs.cache import ChunkCache


class CountingStore(ChunkStore):
    def __init__(self, root: Path) -> None:
        ChunkStore.create_layout(root)
        super().__init__(root, ChunkCodec(keys=None))
        self.reads = 0
        self.lock = threading.Lock()

    def read_raw(self, digest: bytes) -> bytes:
        with self.lock:
            self.reads += 1
        time.sleep(0.05)  # a slow disk, so that concurrent readers overlap
        return super().read_raw(digest)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path)


def _put(store: ChunkStore, data: bytes) -> bytes:
    d = store.codec.digest(data)
    store.put(d, data)
    return d


def test_concurrent_readers_share_one_fetch_and_hits_are_cached(store: CountingStore) -> None:
    d = _put(store, b"a" * 5000)
    cache = ChunkCache(store, 1 << 20)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(d))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"a" * 5000] * 8 and store.reads == 1
    assert cache.lookup(d) == b"a" * 5000 and store.reads == 1
    cache.close()


def test_lru_eviction_by_bytes(store: CountingStore) -> None:
    ds = [_put(store, bytes([i]) * 4000) for i in range(1, 5)]
    cache = ChunkCache(store, 10_000)
    for d in ds[:2]:
        cache.get(d)
    cache.get(ds[0])  # touch: ds[1] is now least recently used
    cache.get(ds[2])
    assert cache.size <= 10_000
    assert cache.lookup(ds[1]) is None and cache.lookup(ds[0]) is not None
    cache.close()


def test_corrupt_chunk_raises_for_every_waiter_and_is_not_cached(store: CountingStore) -> None:
    d = _put(store, b"z" * 3000)
    path = store.path(d)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    cache = ChunkCache(store, 1 << 20)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            cache.get(d)
        except CorruptChunk as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 and cache.lookup(d) is None
    cache.prefetch([d])  # swallowed in the background; the next reader still sees the error
    with pytest.raises(CorruptChunk):
        cache.get(d)
    cache.close()


def _wait_cached(cache: ChunkCache, d: bytes) -> bytes | None:
    deadline = time.monotonic() + 5
    while cache.lookup(d) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return cache.lookup(d)


@pytest.fixture
def encrypted_store(tmp_path: Path) -> CountingStore:
    from vmrecover.repo.keys import new_keys

    s = CountingStore(tmp_path)
    s.codec = ChunkCodec(keys=new_keys("pw", "rid")[0])
    return s


def test_partial_read_returns_the_range_then_caches_the_verified_chunk(
    encrypted_store: CountingStore,
) -> None:
    """Encrypted (GCM binds bytes to digest): the range comes back before the whole chunk is decoded."""
    import os

    store = encrypted_store
    data = b"".join(b"line %d %s\n" % (i, os.urandom(8).hex().encode()) for i in range(30000))
    d = _put(store, data)
    cache = ChunkCache(store, 8 << 20)
    assert cache.read(d, 1000, 5096) == data[1000:5096]
    assert _wait_cached(cache, d) == data  # finished in the background, digest checked
    assert cache.read(d, 10, 20) == data[10:20] and store.reads == 1
    cache.close()


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_partial_read_of_a_damaged_chunk_is_an_error_and_nothing_is_cached(
    kind: str, store: CountingStore, encrypted_store: CountingStore
) -> None:
    store = encrypted_store if kind == "encrypted" else store
    data = b"abcdefgh" * 20000
    d = _put(store, data)
    path = store.path(d)
    blob = bytearray(path.read_bytes())
    blob[-20] ^= 0x40  # bit rot in the payload: the crc32 catches it before any byte is returned
    path.write_bytes(bytes(blob))
    cache = ChunkCache(store, 8 << 20)
    for _ in range(2):
        with pytest.raises(CorruptChunk):
            cache.read(d, 0, 100)
    assert cache.lookup(d) is None
    cache.close()


def test_small_read_of_a_chunk_stored_under_a_wrong_name_fails(store: CountingStore) -> None:
    """Unencrypted, a well-formed envelope holding another chunk's bytes passes the crc32: the small
    read path must check the digest before returning anything."""
    good, other = b"g" * 50000, b"o" * 50000
    d = _put(store, good)
    store.path(d).write_bytes(store.codec.encode(d, other))
    cache = ChunkCache(store, 8 << 20)
    for _ in range(2):
        with pytest.raises(CorruptChunk, match="digest"):
            cache.read(d, 0, 10)
    assert cache.lookup(d) is None
    cache.close()


def test_prefetch_queued_before_a_partial_read_does_not_deadlock_the_pool(store: CountingStore) -> None:
    """Readahead of a chunk that a random read then claims: the pool task must not wait for the
    partial read's completion, which is queued behind it in the same (one-worker) pool."""
    slow, d = _put(store, b"s" * 70000), _put(store, b"d" * 70000)
    cache = ChunkCache(store, 8 << 20, readahead_workers=1)
    cache.prefetch([slow, d])  # the worker is busy with `slow`; d's prefetch waits in the queue
    assert cache.read(d, 5, 10) == b"d" * 5  # claims d, queues its completion behind the prefetch
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
