"""Which chunks deserve the chunk cache: a frequency filter after W-TinyLFU (Einziger, Friedman, Manes:
"TinyLFU: A Highly Efficient Cache Admission Policy", ACM ToS 2017; Caffeine's policy).

Why not plain LRU: a reader that scans more than the cache holds (a hypervisor copying a recovered
disk to production, a restore, ``nfs-cat`` of a view) evicts every chunk before its next pass wants
it, and flushes what a running VM reads again and again on its way through.  With this filter a
chunk that leaves the cache's small recency window enters the main part only if it was wanted more
often lately than the main part's least recently used chunk, which it would evict.  A scan then
keeps what was cached before it, and a scan repeated over more than the cache finds the part that
stayed (LRU finds nothing).

Counted per *visit*, not per read: a sequential reader reads a chunk in several requests, a random
one a piece at a time, and a booting guest several nearby pieces; all of those within VISIT_TICKS
chunk fetches of the last counted one are one visit.  The fetches (cache misses) are the clock, so a
reader whose every read hits advances it not at all.

Kept exactly (a dict, not the paper's count-min sketch): the cache holds some hundreds of chunks and
the history is bounded by the aging below to about ``sample`` digests: ten times the chunks (or
pieces) the cache has held at most, a few MB for a 512 MiB cache.
Aging: after ``sample`` counted visits every count is halved, so that what was popular long ago
gives way (the paper's reset).  Not thread-safe: the cache calls it under its lock.
"""

from __future__ import annotations

VISIT_TICKS = 16  # at least two readers' decode-ahead (2 x vfs/disk.py READAHEAD_CHUNKS): a chunk decoded
# ahead is claimed at most that many fetches before its reader gets to it, and that is one visit
SAMPLE_PER_CHUNK = 10  # the paper's sample size: ten times what the cache holds


class Frequency:
    def __init__(self, sample: int) -> None:
        self.sample = max(sample, 64)
        self._count: dict[bytes, int] = {}
        self._last: dict[bytes, int] = {}  # the tick of each digest's last counted visit
        self._tick = 0
        self._added = 0

    def wanted(self, digest: bytes, *, fetched: bool) -> None:
        """*digest* was read (*fetched*: it missed the cache and is being fetched)."""
        if fetched:
            self._tick += 1
        last = self._last.get(digest)
        if last is not None and self._tick - last <= VISIT_TICKS:
            return  # the same visit
        self._last[digest] = self._tick
        self._count[digest] = self._count.get(digest, 0) + 1
        self._added += 1
        if self._added >= self.sample:
            self._age()

    def holding(self, entries: int) -> None:
        """The cache holds *entries* chunks now: the sample (and so the history) grows to ten times the
        most it has held."""
        self.sample = max(self.sample, entries * SAMPLE_PER_CHUNK)

    def of(self, digest: bytes) -> int:
        return self._count.get(digest, 0)

    def admit(self, candidate: bytes, victim: bytes) -> bool:
        """Should *candidate* take the place of *victim*?  Only if wanted more often: a tie keeps what
        is cached (a scan's chunks, each wanted once, never displace each other or anything else)."""
        return self.of(candidate) > self.of(victim)

    def _age(self) -> None:
        self._count = {d: c >> 1 for d, c in self._count.items() if c > 1}
        self._last = {d: t for d, t in self._last.items() if d in self._count}
        self._added //= 2

    def __len__(self) -> int:
        return len(self._count)
