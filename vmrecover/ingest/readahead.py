"""Read-ahead for hypervisor disk sources: the next chunks in flight while the pipeline stores this one.

The pipeline (ingest/pipeline.py) reads whole chunks in disk order, of every chunk touching the areas a
source was told to read (allocated or changed areas).  A remote source knows those areas, so it can
ask for what comes next before it is asked: ``window`` requests at once, each of up to
``request_bytes`` of adjacent chunks (fewer, larger requests cost the host and the client less per
byte).  How a request travels is the source's: a thread per HTTP range (vmware/source.py), or NBD
commands in flight on one connection (xen/nbd.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

REQUEST_BYTES = 4 << 20  # adjacent chunks are asked for together, up to this much in one request
T = TypeVar("T")  # a request in flight


class ReadAhead(Generic[T]):
    """*issue(offset, length)* starts a request, *collect(request)* waits for its bytes, *drop(request)*
    abandons one (the reads went elsewhere)."""

    def __init__(
        self, areas: list[tuple[int, int]], *, chunk_size: int, size: int, window: int,
        issue: Callable[[int, int], T], collect: Callable[[T], bytes | bytearray],
        drop: Callable[[T], None] = lambda r: None, request_bytes: int = REQUEST_BYTES,
    ) -> None:  # fmt: skip
        self.areas = areas  # ascending, not overlapping
        self._ends = [a + n for a, n in areas]
        self.chunk_size = chunk_size
        self.size = size
        self.window = window
        self.span = max(1, request_bytes // chunk_size)
        self._issue, self._collect, self._drop = issue, collect, drop
        # chunk (offset, length) -> the request that fetches it, and where in that request's bytes
        self._ahead: dict[tuple[int, int], tuple[T, int]] = {}

    def _chunks_after(self, offset: int) -> Iterator[tuple[int, int]]:
        """The (offset, length) of the chunks the pipeline reads after the one at *offset*: every
        chunk touching an area, in order."""
        cs = self.chunk_size
        last = offset // cs
        for a, n in self.areas[bisect.bisect_right(self._ends, offset) :]:
            for i in range(max(a // cs, last + 1), (a + n - 1) // cs + 1):
                last = i
                yield i * cs, min(cs, self.size - i * cs)

    def _requests_after(self, offset: int) -> Iterator[list[tuple[int, int]]]:
        """The chunks after *offset*, grouped into requests of up to ``span`` adjacent chunks."""
        group: list[tuple[int, int]] = []
        for o, n in self._chunks_after(offset):
            if group and (group[-1][0] + group[-1][1] != o or len(group) == self.span):
                yield group
                group = []
            group.append((o, n))
        if group:
            yield group

    def _fill(self, offset: int) -> None:
        """Keep ``window`` requests in flight over the chunks after *offset* (and after those already
        asked for)."""
        inflight = {id(r) for r, _ in self._ahead.values()}
        if len(inflight) >= self.window:
            return
        for group in self._requests_after(max([offset, *(o for o, _ in self._ahead)])):
            start = group[0][0]
            req = self._issue(start, group[-1][0] + group[-1][1] - start)
            for o, n in group:
                self._ahead[(o, n)] = (req, o - start)
            inflight.add(id(req))
            if len(inflight) >= self.window:
                break

    def read(self, offset: int, length: int, direct: Callable[[int, int], bytes | bytearray]) -> bytes:
        """The chunk at *offset*: from a request in flight, else *direct* (reads went elsewhere: what
        was asked for ahead is dropped).  The next requests are issued before waiting for this one."""
        got = self._ahead.pop((offset, length), None)
        if got is None:
            self.clear()
        self._fill(offset)
        if got is None:
            return bytes(direct(offset, length))
        req, pos = got
        data = self._collect(req)
        return bytes(data) if pos == 0 and len(data) == length else bytes(data[pos : pos + length])

    def clear(self) -> None:
        for req in {id(r): r for r, _ in self._ahead.values()}.values():
            self._drop(req)
        self._ahead.clear()
