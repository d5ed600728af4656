"""Session disks shared by several workers and processes: a stopped session's descriptor is never
reused under a worker still holding its view, and two processes serving one session (FUSE and NFS at
once) never lose each other's writes to the same block."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, random_image
from vmrecover.recovery import sessions
from vmrecover.repo.repository import Repository
from vmrecover.vfs.cache import ChunkCache
from vmrecover.vfs.disk import SessionDisk
from vmrecover.vfs.tree import RECOVER_INO, Vfs

MiB = 1 << 20
SECTOR = 512


@pytest.fixture
def session_repo(cli: Cli, tmp_path: Path) -> Cli:
    cli.run("backup", "--vm", "vm1", random_image(tmp_path / "disk.raw", 2 * MiB, seed=8, density=1.0))
    cli.run("recover", "start", "vm1", "--name", "s1")
    return cli


def test_stopped_session_descriptor_is_never_reused_under_a_held_view(
    session_repo: Cli, tmp_path: Path
) -> None:
    repo = Repository.open(session_repo.repo)
    cache = ChunkCache(repo.chunks, 8 * MiB)
    vfs = Vfs(repo, cache)
    other = tmp_path / "unrelated-file"
    other.write_bytes(b"o" * 8192)
    try:
        disk = vfs.lookup(vfs.lookup(RECOVER_INO, "s1").ino, "disk.raw")
        view = vfs._view(disk.ino)  # what a worker thread holds while it serves a request
        view.read(0, 4096)
        sessions.stop(repo, "s1")
        vfs.sessions(force=True)  # the datastore notices the stop and lets go of the session's disks
        fd = os.open(other, os.O_RDWR)  # the lowest free descriptor: the delta's, if it was closed
        try:
            with pytest.raises(OSError) as exc:
                view.write(0, b"W" * 4096)
            assert exc.value.errno == errno.ESTALE
            with pytest.raises(OSError) as exc:
                view.read(0, 4096)
            assert exc.value.errno == errno.ESTALE
        finally:
            os.close(fd)
        assert other.read_bytes() == b"o" * 8192
    finally:
        vfs.close()
        cache.close()
        repo.close()


def test_unwritten_cached_ranges_of_a_session_are_read_on_the_event_loop(
    session_repo: Cli, tmp_path: Path
) -> None:
    """A session's disk has a hit path too (NFS and FUSE answer it without a worker thread): a range
    the session did not write, whose chunks are cached.  A range it wrote, a write of this process
    under way (lseek would wait for its inode lock), a catalog not looked at for 0.5 s (a worker would
    look: the session may have been stopped) and a stopped session all go to a worker."""
    repo = Repository.open(session_repo.repo)
    cache = ChunkCache(repo.chunks, 8 * MiB)
    vfs = Vfs(repo, cache)
    image = (tmp_path / "disk.raw").read_bytes()
    try:
        ino = vfs.lookup(vfs.lookup(RECOVER_INO, "s1").ino, "disk.raw").ino
        assert vfs.read_cached(ino, 4096, 8192) is None  # nothing cached yet
        assert vfs.read(ino, 0, MiB) == image[:MiB]  # a worker reads it: the chunk is cached
        assert vfs.read_cached(ino, 4096, 8192) == image[4096:12288]
        assert vfs.getattr_cached(ino) == vfs.getattr(ino)
        vfs.write(ino, 8192, b"W" * 4096)
        assert vfs.read_cached(ino, 4096, 8192) is None  # half of it written: a worker merges it
        assert vfs.read(ino, 4096, 8192) == image[4096:8192] + b"W" * 4096
        assert vfs.read_cached(ino, 16384, 4096) == image[16384:20480]  # beside the write
        disk = vfs._view(ino).disk
        assert isinstance(disk, SessionDisk)
        with disk._writing():
            assert vfs.read_cached(ino, 16384, 4096) is None
        seen, _ = vfs._catalog_seen
        vfs._catalog_seen = (seen, time.monotonic() - 1)  # the catalog last looked at 1 s ago
        assert vfs.read_cached(ino, 16384, 4096) is None and vfs.getattr_cached(ino) is None
        vfs.changes()  # what watch_changes does every 0.5 s
        assert vfs.read_cached(ino, 16384, 4096) == image[16384:20480]
        sessions.stop(repo, "s1")
        vfs.sessions(force=True)
        assert vfs.read_cached(ino, 16384, 4096) is None and vfs.getattr_cached(ino) is None
    finally:
        vfs.close()
        cache.close()
        repo.close()


WRITER = r"""
import sys
from pathlib import Path
from vmrecover.repo.repository import Repository
from vmrecover.vfs.cache import ChunkCache
from vmrecover.vfs.tree import RECOVER_INO, Vfs

repo_path, parity, rounds, span = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
repo = Repository.open(Path(repo_path))
vfs = Vfs(repo, ChunkCache(repo.chunks, 8 << 20))
ino = vfs.lookup(vfs.lookup(RECOVER_INO, "s1").ino, "disk.raw").ino
print("ready", flush=True)
sys.stdin.readline()
mine = range(parity, span // 512, 2)  # every other 512-byte sector: each write is a read-modify-write
for sector in mine:
    vfs.write(ino, sector * 512, bytes(512))
for _ in range(rounds):  # increment a counter in each of my sectors: a lost write stays lost
    for sector in mine:
        n = int.from_bytes(vfs.read(ino, sector * 512, 4), "big")
        vfs.write(ino, sector * 512, (n + 1).to_bytes(4, "big") + bytes(508))
vfs.close()
"""


def test_two_processes_never_lose_writes_to_the_same_block(session_repo: Cli) -> None:
    """Two processes (as FUSE and NFS serving one session) own alternate 512-byte sectors of the same
    4 KiB blocks and increment a counter in each of theirs: every write is a read-modify-write of a
    block the other process writes too, and an undone write shows as a counter that fell behind."""
    rounds, span = 60, 64 * 1024
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(session_repo.repo), str(parity), str(rounds), str(span)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for parity in (0, 1)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:  # start both at once
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    repo = Repository.open(session_repo.repo)
    cache = ChunkCache(repo.chunks, 8 * MiB)
    vfs = Vfs(repo, cache)
    try:
        ino = vfs.lookup(vfs.lookup(RECOVER_INO, "s1").ino, "disk.raw").ino
        data = vfs.read(ino, 0, span)
    finally:
        vfs.close()
        cache.close()
        repo.close()
    counts = [int.from_bytes(data[s * SECTOR : s * SECTOR + 4], "big") for s in range(span // SECTOR)]
    lost = {s: rounds - c for s, c in enumerate(counts) if c != rounds}
    assert not lost, (
        f"{len(lost)} sectors lost writes (sector: lost increments): {dict(list(lost.items())[:8])}"
    )


def test_a_session_started_a_moment_ago_is_found_at_once(session_repo: Cli) -> None:
    """The datastore re-reads the catalog at most every 0.5 s; a lookup of a session's name must not
    miss a session started within that time (the demo lists it right after `recover start`)."""
    repo = Repository.open(session_repo.repo)
    cache = ChunkCache(repo.chunks, 8 * MiB)
    vfs = Vfs(repo, cache)
    try:
        vfs.readdir(RECOVER_INO)  # the catalog was just read
        other = Repository.open(session_repo.repo)  # another process's connection
        try:
            sessions.start(other, other.catalog.resolve("vm1"), "s2")
        finally:
            other.close()
        assert vfs.lookup(RECOVER_INO, "s2").is_dir
    finally:
        vfs.close()
        cache.close()
        repo.close()
