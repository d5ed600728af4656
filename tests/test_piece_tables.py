"""Piece tables beside each index (repo/tables.py): every backup kind writes the chunks' heads, a cold
random read then reads its piece's bytes only, and a stale, forged or damaged table costs a read, never
a wrong byte, an error, or a damaged piece passing."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmrecover.errors import CorruptChunk
from vmrecover.repo.blob import ENTRY, HEADER, PIECE_SIZE, ZERO_DIGEST
from vmrecover.repo.index import FixedIndex
from vmrecover.repo.repository import Repository
from vmrecover.repo.tables import FILE_HEADER, PieceTables
from vmrecover.vfs.cache import ChunkCache
from vmrecover.vfs.disk import BackupDisk

from .conftest import Cli, MiB, force_unmount, random_image, sha256_file

PASSPHRASE = "correct horse battery staple"
SIZE = 8 * MiB


@pytest.fixture(params=[False, True], ids=["plain", "encrypted"])
def backed_up(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Cli, Path, dict[str, str]]]:
    """A format 2 repository with 1 MiB chunks holding three points of one image: a full backup, an
    incremental one (chunk 2 changed), and the same data as another VM (dedup hits only)."""
    encrypted = request.param
    cli = Cli(tmp_path / "repo", env={"VMRECOVER_PASSPHRASE": PASSPHRASE} if encrypted else None)
    cli.run("init", "--chunk-size", "1M", *(["--encryption", "aes-256-gcm"] if encrypted else []))
    img = random_image(tmp_path / "disk.raw", SIZE, seed=11, density=0.7)
    with open(img, "r+b") as f:  # chunk 5 a hole, whatever the seed says
        f.seek(5 * MiB)
        f.write(bytes(MiB))
    points = {"full": cli.json("backup", img, "--vm", "vm")["point"]}
    with open(img, "r+b") as f:
        f.seek(2 * MiB + 4096)
        f.write(random.Random(12).randbytes(3 * PIECE_SIZE))
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps([[2 * MiB, MiB]]))
    inc = cli.json("backup", img, "--vm", "vm", "--changed-extents", changed)
    assert inc["kind"] == "incremental", inc
    points["incremental"] = inc["point"]
    copy = cli.json("backup", img, "--vm", "copy")
    assert copy["new_bytes"] == 0, copy
    points["dedup"] = copy["point"]
    yield cli, img, points


def _open(cli: Cli) -> Repository:
    return Repository.open(cli.repo, passphrase=lambda: PASSPHRASE)


def _disk(repo: Repository, point: str) -> str:
    return repo.catalog.disks(point)[0].name


def test_every_backup_kind_writes_each_chunks_head(backed_up: tuple[Cli, Path, dict[str, str]]) -> None:
    cli, _, points = backed_up
    with _open(cli) as repo:
        for kind, point in points.items():
            disk = _disk(repo, point)
            index = repo.read_index(point, disk)
            tables = repo.read_tables(point, disk, index)
            assert tables is not None, kind
            assert (repo.tables_path(point, disk).stat().st_mode & 0o777) == 0o600
            for i in range(index.count):
                d = index.digest(i)
                head = tables.head(i)
                if d == ZERO_DIGEST:
                    assert head is None, (kind, i)
                    continue
                stored = repo.chunks.read_head(d)
                assert stored and head is not None and head[: len(stored)] == stored, (kind, i)
                assert not any(head[len(stored) :]), (kind, i)
            assert index.digest(5) == ZERO_DIGEST
        # the incremental's chunk 2 is new, its other records came from the full point's file
        disk = _disk(repo, points["full"])
        full = repo.read_index(points["full"], disk)
        inc = repo.read_index(points["incremental"], disk)
        assert [i for i in range(full.count) if full.digest(i) != inc.digest(i)] == [2]


def _count_preads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of every os.pread from now on (the chunk store's reads)."""
    calls: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        calls.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    return calls


def _read(index: FixedIndex, cache: ChunkCache, tables: PieceTables | None, off: int, n: int) -> bytes:
    """A random read: a disk with no read before it (chunk 0 excepted: a reader starting there reads
    on sequentially, whole chunks, without the tables)."""
    assert off >= MiB
    return bytes(BackupDisk(index, cache, tables).read(off, n))


def _random_reads(index: FixedIndex, cache: ChunkCache, tables: PieceTables | None, img: Path) -> int:
    """A 4 KiB read inside one piece of every data chunk but the first, checked against the image;
    how many chunks were read."""
    want = img.read_bytes()
    n = 0
    for i in range(1, index.count):
        if index.digest(i) != ZERO_DIGEST:
            off = i * MiB + (3 + i % 11) * PIECE_SIZE + 1000
            assert _read(index, cache, tables, off, 4096) == want[off : off + 4096], f"chunk {i}"
            n += 1
    return n


def test_a_cold_random_read_reads_only_its_piece(
    backed_up: tuple[Cli, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli, img, points = backed_up
    with _open(cli) as repo:
        point = points["incremental"]
        disk = _disk(repo, point)
        index = repo.read_index(point, disk)
        for tables, reads_per_chunk in ((repo.read_tables(point, disk, index), 1), (None, 2)):
            cache = ChunkCache(repo.chunks, 64 * MiB)
            try:
                calls = _count_preads(monkeypatch)
                chunks = _random_reads(index, cache, tables, img)
                monkeypatch.undo()
            finally:
                cache.close()
            assert chunks >= 5 and len(calls) == chunks * reads_per_chunk, (tables is not None, calls)
            assert all(n < 2 * PIECE_SIZE for n in calls), calls  # pieces and heads, never a whole chunk


def _rewrite_records(path: Path, change: Callable[[list[bytearray]], None]) -> None:
    data = bytearray(path.read_bytes())
    _, _, rec, count = FILE_HEADER.unpack_from(data)
    recs = [data[FILE_HEADER.size + i * rec : FILE_HEADER.size + (i + 1) * rec] for i in range(count)]
    change(recs)
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data[: FILE_HEADER.size]) + b"".join(recs))


def _swap_records(recs: list[bytearray]) -> None:
    """Chunks 1 and 2 get each other's (valid, proven for the other digest) heads."""
    recs[1], recs[2] = recs[2], recs[1]


def _swap_lengths(recs: list[bytearray]) -> None:
    """Chunk 1's pieces 3 and 4 swap their stored lengths: same total, so the file size still agrees,
    and (unencrypted) the hashes the digest covers are untouched; the pieces land in the wrong place."""
    rec = recs[1]
    a, b = HEADER.size + 3 * ENTRY.size, HEADER.size + 4 * ENTRY.size
    if rec[a : a + 4] == rec[b : b + 4]:
        rec[a] ^= 1  # equal lengths: make them differ (the total then disagrees: also refused)
    rec[a : a + 4], rec[b : b + 4] = rec[b : b + 4], rec[a : a + 4]


def _garbage(recs: list[bytearray]) -> None:
    rng = random.Random(3)
    for r in recs:
        r[4:] = rng.randbytes(len(r) - 4)  # the magic stays: every record is taken, then refused


@pytest.mark.parametrize("damage", [_swap_records, _swap_lengths, _garbage], ids=lambda f: f.__name__[1:])
def test_a_stale_or_forged_table_costs_a_read_never_a_wrong_byte(
    backed_up: tuple[Cli, Path, dict[str, str]], damage: Callable[[list[bytearray]], None], tmp_path: Path
) -> None:
    cli, _, points = backed_up
    point = points["full"]
    with _open(cli) as repo:
        disk = _disk(repo, point)
        _rewrite_records(repo.tables_path(point, disk), damage)
        want = _view_of(cli, repo, point, disk)  # what the full point held
        index = repo.read_index(point, disk)
        tables = repo.read_tables(point, disk, index)
        assert tables is not None
        cache = ChunkCache(repo.chunks, 64 * MiB)
        try:
            for i in range(1, index.count):
                off = i * MiB + 3 * PIECE_SIZE + 100
                got = _read(index, cache, tables, off, 2 * PIECE_SIZE)
                assert got == want[off : off + 2 * PIECE_SIZE], i
        finally:
            cache.close()
    # through the kernel: a FUSE mount reads the point right, byte for byte
    mp = tmp_path / "mnt"
    mp.mkdir()
    cli.run("mount", mp, "--cache-size", "16M")
    try:
        view = mp / "vms" / "vm" / point / f"{disk}.raw"
        with open(view, "rb") as f:
            for i in (1, 0, 4, 2):
                f.seek(i * MiB + 4 * PIECE_SIZE + 17)
                assert f.read(4096) == want[i * MiB + 4 * PIECE_SIZE + 17 :][:4096], i
    finally:
        cli.run("umount", mp, check=False)
        force_unmount(mp)


def _view_of(cli: Cli, repo: Repository, point: str, disk: str) -> bytes:
    """The point's disk, restored (not through the tables)."""
    out = cli.repo.parent / f"restored-{point}.raw"
    if not out.exists():
        cli.run("restore", f"{repo.catalog.point(point).vm}@{point}", "--to", out)  # type: ignore[union-attr]
    return out.read_bytes()


def test_a_damaged_piece_still_fails_its_range_only_with_a_good_table(
    backed_up: tuple[Cli, Path, dict[str, str]],
) -> None:
    cli, _, points = backed_up
    point = points["full"]
    with _open(cli) as repo:
        disk = _disk(repo, point)
        want = _view_of(cli, repo, point, disk)
        index = repo.read_index(point, disk)
        tables = repo.read_tables(point, disk, index)
        assert tables is not None and tables.head(1) is not None
        digest = index.digest(1)
        path = repo.chunks.path(digest)
        layout = repo.chunks.codec.layout(digest, repo.chunks.read_head(digest), path.stat().st_size)
        blob = bytearray(path.read_bytes())
        blob[layout.offsets[6] + layout.lengths[6] // 2] ^= 0x10
        os.chmod(path, 0o600)
        path.write_bytes(bytes(blob))
        cache = ChunkCache(repo.chunks, 64 * MiB)
        try:
            with pytest.raises(CorruptChunk, match="piece 6"):
                _read(index, cache, tables, MiB + 6 * PIECE_SIZE + 10, 4096)
            for p in (5, 7, 0, 6):
                off = MiB + p * PIECE_SIZE + 10
                if p == 6:
                    with pytest.raises(CorruptChunk, match="piece 6"):  # never cached, never passed
                        _read(index, cache, tables, off, 4096)
                else:
                    assert _read(index, cache, tables, off, 4096) == want[off : off + 4096], p
        finally:
            cache.close()


@pytest.mark.parametrize("how", ["truncated", "other index", "missing"])
def test_an_unusable_tables_file_is_not_used(backed_up: tuple[Cli, Path, dict[str, str]], how: str) -> None:
    cli, img, points = backed_up
    point = points["incremental"]
    with _open(cli) as repo:
        disk = _disk(repo, point)
        path = repo.tables_path(point, disk)
        if how == "truncated":
            os.truncate(path, path.stat().st_size - 1)
        elif how == "other index":
            data = bytearray(path.read_bytes())
            FILE_HEADER.pack_into(data, 0, b"VMRPTAB\n", 1, FILE_HEADER.unpack_from(data)[2], 9)
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        index = repo.read_index(point, disk)
        assert PieceTables.open(path, index.count) is None
        cache = ChunkCache(repo.chunks, 64 * MiB)
        try:
            assert _random_reads(index, cache, repo.read_tables(point, disk, index), img) >= 5
        finally:
            cache.close()
    # a point without its tables still reads, restores and verifies; the next incremental writes them
    out = cli.repo.parent / "out.raw"
    cli.run("restore", f"vm@{point}", "--to", out)
    assert sha256_file(out) == sha256_file(img)
    assert cli.json("verify")["ok"] is True
    changed = cli.repo.parent / "none.json"
    changed.write_text("[]")
    nxt = cli.json("backup", img, "--vm", "vm", "--changed-extents", changed)["point"]
    with _open(cli) as repo:
        index = repo.read_index(nxt, disk)
        tables = repo.read_tables(nxt, disk, index)
        assert tables is not None  # a file, its inherited records unknown: heads come from chunk files
        assert all(tables.head(i) is None for i in range(index.count))


def test_a_full_backup_of_unchanged_data_takes_heads_from_its_parent(
    backed_up: tuple[Cli, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full backup of the same data (an image backed up again without a changed-extent list) finds
    every chunk stored already: each head comes from the parent's tables, no chunk file is read."""
    from vmrecover.ingest.pipeline import DiskJob, run_backup
    from vmrecover.ingest.sources import open_image
    from vmrecover.repo.chunkstore import ChunkStore

    cli, img, _ = backed_up

    def no_read(self: ChunkStore, digest: bytes) -> bytes:
        raise AssertionError(f"the head of chunk {digest.hex()} was read from its file")

    with _open(cli) as repo:
        disk = _disk(repo, repo.catalog.latest_point("vm").id)  # type: ignore[union-attr]
        monkeypatch.setattr(ChunkStore, "read_head", no_read)
        with repo.backing_up("vm"):
            point, stats = run_backup(repo, "vm", [DiskJob(disk, open_image(img, "raw", trusted=True))])
        monkeypatch.undo()
        assert stats[0].mode == "full" and stats[0].new_chunks == 0, stats
        index = repo.read_index(point.id, disk)
        tables = repo.read_tables(point.id, disk, index)
        assert tables is not None
        for i in range(index.count):
            d = index.digest(i)
            head = tables.head(i)
            assert (
                (head is None) if d == ZERO_DIGEST else (head or b"").startswith(repo.chunks.read_head(d))
            ), i


def test_upgrade_writes_the_tables_of_points_written_before_them(
    backed_up: tuple[Cli, Path, dict[str, str]],
) -> None:
    """`vmrecover upgrade` gives every point without piece tables the file a backup writes today, byte
    for byte; killed before its rename, it leaves none half written, and the next run completes."""
    cli, _, points = backed_up
    with _open(cli) as repo:
        paths = [repo.tables_path(p, _disk(repo, p)) for p in points.values()]
    written = {path: path.read_bytes() for path in paths}
    for path in paths:
        path.unlink()  # as points written before piece tables existed
    env = {**cli.env, "VMRECOVER_FAULT": "tables.before-rename=SIGKILL"}
    res = Cli(cli.repo, env=env).run("upgrade", check=False)
    assert res.returncode == -signal.SIGKILL
    assert not any(path.exists() for path in paths)  # nothing where a reader looks
    doc = cli.json("upgrade")
    assert doc["piece_tables"] == 3 and doc["upgraded"] is False, doc
    for path in paths:
        assert path.read_bytes() == written[path], path
        assert (path.stat().st_mode & 0o777) == 0o600
    assert not list((cli.repo / "run").glob("*.ptab.tmp"))
    assert cli.json("upgrade")["piece_tables"] == 0
    assert cli.json("verify")["ok"] is True


def test_tables_written_through_a_small_window_equal_the_backups(
    backed_up: tuple[Cli, Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heads are read with a bounded number queued (a large disk's reads are not all queued at
    once): a window smaller than the disk gives the same file."""
    monkeypatch.setattr("vmrecover.repo.tables._FILL_WINDOW", 3)
    cli, _, points = backed_up
    with _open(cli) as repo:
        paths = [repo.tables_path(p, _disk(repo, p)) for p in points.values()]
        written = {path: path.read_bytes() for path in paths}
        for path in paths:
            path.unlink()
        assert repo.add_piece_tables() == 3
    assert {path: path.read_bytes() for path in paths} == written
