"""Repository format 2 beside format 1: v1 and v2 points side by side in one repository through
backup, restore, FUSE, NFS, verify, prune and gc; a damaged v2 piece costs only its own range on every
read path; an upgrade killed at any moment loses nothing."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmrecover.repo.blob import ChunkCodec
from vmrecover.repo.index import FixedIndex
from vmrecover.repo.keys import Keys

from .conftest import Cli, MiB, NfsServer, force_unmount, random_image, sha256_file

PASSPHRASE = "correct horse battery staple"
PIECE = 64 * 1024


def _versions(repo: Path) -> dict[int, int]:
    """How many chunk files of each envelope version the repository holds."""
    out: dict[int, int] = {}
    for f in (repo / "chunks").glob("??/*"):
        with open(f, "rb") as fh:
            v = fh.read(5)[4]
        out[v] = out.get(v, 0) + 1
    return out


def _nfs_cat(url: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(["nfs-cat", url], capture_output=True, timeout=120)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


def _pread(path: Path, off: int, n: int) -> bytes:
    """One read of exactly these bytes (no readahead: the kernel would widen the request to the
    FUSE daemon, and a request that touches a damaged piece fails whole)."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def _flip_piece(repo: Path, digest: bytes, i: int, keys: Keys | None) -> None:
    """Flip one bit in the middle of the stored bytes of piece i of a v2 chunk."""
    path = repo / "chunks" / digest.hex()[:2] / digest.hex()
    blob = bytearray(path.read_bytes())
    layout = ChunkCodec(keys=keys).layout(digest, bytes(blob), len(blob))
    assert layout.version == 2 and layout.count == 16
    blob[layout.offsets[i] + layout.lengths[i] // 2] ^= 0x04
    os.chmod(path, 0o600)
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_v1_and_v2_points_side_by_side(tmp_path: Path, encrypted: bool) -> None:
    cli = Cli(tmp_path / "repo", env={"VMRECOVER_PASSPHRASE": PASSPHRASE} if encrypted else None)
    enc = ["--encryption", "aes-256-gcm"] if encrypted else []
    assert cli.json("init", "--chunk-size", "1M", "--format", "1", *enc)["format"] == 1
    img = random_image(tmp_path / "disk.raw", 12 * MiB, seed=5, density=0.9)
    p1 = cli.json("backup", img, "--vm", "vm")
    sha1 = sha256_file(img)
    v1 = _versions(cli.repo)
    assert set(v1) == {1}

    up = cli.json("upgrade")
    # the v1 point gets its piece tables file: every record unknown (a v1 chunk's head tells nothing)
    assert up == {"repo": str(cli.repo), "format": 2, "upgraded": True, "piece_tables": 1}
    again = cli.json("upgrade")
    assert again["upgraded"] is False and again["piece_tables"] == 0  # idempotent
    rng = random.Random(6)
    with open(img, "r+b") as f:  # two whole chunks change; the rest is as the v1 point stored it
        f.seek(4 * MiB)
        f.write(rng.randbytes(2 * MiB))
    p2 = cli.json("backup", img, "--vm", "vm")
    sha2 = sha256_file(img)
    # exact deduplication across the formats: only the two changed chunks are new, and they are v2
    assert p2["new_bytes"] == 2 * MiB, p2
    assert _versions(cli.repo) == {
        1: p1["new_chunks"] if "new_chunks" in p1 else _versions(cli.repo)[1],
        2: 2,
    }
    # the same data backed up again as another VM: nothing new, in either format
    assert cli.json("backup", img, "--vm", "copy")["new_bytes"] == 0

    disk = cli.json("list", "vm")["points"][0]["disks"][0]["name"]
    for point, sha in ((p1["point"], sha1), (p2["point"], sha2)):
        out = tmp_path / f"restored-{point}.raw"
        cli.run("restore", f"vm@{point}", "--to", out)
        assert sha256_file(out) == sha, "restore"
    assert cli.json("verify")["ok"] is True

    # FUSE and NFS serve both points, byte for byte
    mp = tmp_path / "mnt"
    mp.mkdir()
    cli.run("mount", mp, "--cache-size", "64M")
    srv = NfsServer(cli)
    try:
        for point, sha in ((p1["point"], sha1), (p2["point"], sha2)):
            view = mp / "vms" / "vm" / point / f"{disk}.raw"
            assert sha256_file(view) == sha, "FUSE"
            url = srv.url(f"vms/vm/{point}/{disk}.raw")
            assert hashlib.sha256(_nfs_cat(url).stdout).hexdigest() == sha, "NFS"
    finally:
        srv.stop()
        cli.run("umount", mp, check=False)
        force_unmount(mp)

    # a damaged v2 piece: EIO for its 64 KiB only, on every read path; never wrong bytes
    keys = None
    if encrypted:
        from vmrecover.repo.repository import Repository

        with Repository.open(cli.repo, passphrase=lambda: PASSPHRASE) as repo:
            keys = repo.codec.keys
    index = FixedIndex.read(cli.repo / "indexes" / p2["point"] / f"{disk}.fidx")
    digest = index.digest(5)  # bytes 5 MiB..6 MiB: written after the upgrade, a v2 chunk
    _flip_piece(cli.repo, digest, 7, keys)
    bad = 5 * MiB + 7 * PIECE
    want = img.read_bytes()
    res = cli.run("verify", "--json", check=False)
    assert res.returncode != 0 and [b["digest"] for b in res.json()["bad_chunks"]] == [digest.hex()]
    cli.run("mount", mp, "--cache-size", "64M")
    srv = NfsServer(cli)
    try:
        view = mp / "vms" / "vm" / p2["point"] / f"{disk}.raw"
        for off in (bad, bad + PIECE - 4096):  # random reads inside the damaged piece
            with pytest.raises(OSError) as exc:
                _pread(view, off, 4096)
            assert exc.value.errno == errno.EIO
        for off in (bad - PIECE, bad + PIECE, 5 * MiB, 6 * MiB - 4096):  # its neighbours read right
            assert _pread(view, off, 4096) == want[off : off + 4096]
        with pytest.raises(OSError):  # a sequential reader gets the error too, at that range
            sha256_file(view)
        url = srv.url(f"vms/vm/{p2['point']}/{disk}.raw")
        got = _nfs_cat(url, check=False)
        assert got.returncode != 0 and want.startswith(got.stdout), "NFS served wrong bytes"
        assert len(got.stdout) <= bad
    finally:
        srv.stop()
        cli.run("umount", mp, check=False)
        force_unmount(mp)
    res = cli.run("restore", f"vm@{p2['point']}", "--to", tmp_path / "bad.raw", check=False)
    assert res.returncode == 3 and "cannot be read" in res.stderr
    _flip_piece(cli.repo, digest, 7, keys)  # undo

    # prune the v1 point and gc: the v1 chunks only it used go; the v2 point still reads whole
    before = _versions(cli.repo)
    cli.run("prune", "--vm", "vm", "--keep-last", "1")
    cli.json("gc")
    after = _versions(cli.repo)
    assert after[2] == 2 and after[1] == before[1] - 2  # the two chunks the second point replaced
    cli.run("restore", f"vm@{p2['point']}", "--to", tmp_path / "again.raw")
    assert sha256_file(tmp_path / "again.raw") == sha2
    assert cli.json("verify")["ok"] is True


@pytest.mark.parametrize("moment", ["upgrade.before-write", "upgrade.after-write", None])
def test_an_upgrade_killed_at_any_moment_loses_nothing(tmp_path: Path, moment: str | None) -> None:
    cli = Cli(tmp_path / "repo")
    cli.run("init", "--chunk-size", "64K", "--format", "1")
    img = random_image(tmp_path / "disk.raw", 4 * MiB, seed=8, density=0.8)
    point = cli.json("backup", img, "--vm", "vm")["point"]
    want = sha256_file(img)
    if moment is not None:
        res = Cli(cli.repo, env={"VMRECOVER_FAULT": f"{moment}=SIGKILL"}).run("upgrade", check=False)
        assert res.returncode == -signal.SIGKILL
    else:  # killed from outside, at whatever moment it has reached
        for delay in (0.05, 0.2, 0.4, 0.6):
            proc = cli.popen("upgrade")
            time.sleep(delay)
            proc.kill()
            proc.communicate()
    # whatever the moment: repo.toml whole (format 1 or 2), the point reads, and the upgrade completes
    text = (cli.repo / "repo.toml").read_text()
    assert "format = 1" in text or "format = 2" in text
    assert not list(cli.repo.glob("repo.toml.*")) or all(
        ".tmp" in p.name for p in cli.repo.glob("repo.toml.*")
    )
    assert cli.json("verify")["ok"] is True
    assert cli.json("upgrade")["format"] == 2
    cli.run("restore", f"vm@{point}", "--to", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == want
    with open(img, "r+b") as f:
        f.write(b"\x01" * 100_000)
    cli.json("backup", img, "--vm", "vm")
    assert cli.json("verify")["ok"] is True and set(_versions(cli.repo)) == {1, 2}
