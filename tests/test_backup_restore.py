"""Backup and restore end to end through the real CLI, real images and real qemu tools.

Every restore is compared byte for byte (sha256 of the guest-visible disk) with its source.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from vmrecover.repo.index import FixedIndex

from .conftest import Cli, MiB, convert, guest_sha256, make_sparse_image, random_image, sha256_file

CHUNK = 64 * 1024


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_full_backup_and_sparse_restore(cli: Cli, tmp_path: Path) -> None:
    """Holes are never read or stored; the restored image is identical and as sparse as the source."""
    size = 32 * MiB + 12345  # not a multiple of the chunk size
    img = random_image(tmp_path / "disk.raw", size, seed=1, density=0.3)
    # an explicitly written all-zero region: read, but never stored, and restored as a hole
    with open(img, "r+b") as f:
        f.seek(20 * MiB)
        f.write(bytes(2 * MiB))
        f.seek(size - 100)
        f.write(b"tail" * 25)
    res = cli.json("backup", img, "--vm", "web")
    assert res["kind"] == "full" and res["parent"] is None
    disk = res["disks"][0]
    assert disk["name"] == "disk" and disk["size"] == size
    # only allocated extents are read (rounded to chunks); holes are skipped
    assert res["bytes_read"] <= allocated(img) + 2 * CHUNK
    assert res["bytes_read"] < size / 2
    assert disk["zero_chunks"] >= 2 * MiB // CHUNK
    assert 0 < disk["duration_s"] <= res["duration_s"]  # each disk's time, within the point's
    out = tmp_path / "out.raw"
    r = cli.json("restore", "web", "--to", out)
    assert r["size"] == size and r["point"] == res["point"]
    assert sha256_file(out) == sha256_file(img)
    assert allocated(out) <= allocated(img) - 2 * MiB + CHUNK  # the zero region became a hole
    assert not list(tmp_path.glob("*.vmrecover-partial"))


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx"])
def test_backup_from_image_formats(cli: Cli, tmp_path: Path, fmt: str) -> None:
    """qcow2/vmdk/vhd/vhdx are read as the guest sees them; unallocated clusters are not read."""
    rng = random.Random(2)
    # data in the first 4 MiB and at 12 MiB: every format (vhd allocates 2 MiB blocks) has holes
    raw = make_sparse_image(
        tmp_path / "src.raw", 16 * MiB, [(0, rng.randbytes(4 * MiB)), (12 * MiB, b"x" * 5000)]
    )
    img = convert(raw, tmp_path / f"disk0.{fmt}", fmt)
    res = cli.json("backup", img, "--vm", f"vm-{fmt}")
    assert res["disks"][0]["name"] == "disk0"
    assert res["new_bytes"] <= 5 * MiB  # zeros are never stored
    if fmt != "vhdx":  # qemu 7.2's vhdx driver has no block status: everything reads as allocated
        assert res["bytes_read"] <= 6 * MiB
    out = tmp_path / "out.raw"
    cli.run("restore", f"vm-{fmt}", "--to", out)
    # vhd rounds the virtual size up to its CHS geometry: compare the source's guest view
    assert sha256_file(out) == guest_sha256(img)
    listing = cli.json("list", f"vm-{fmt}")
    assert listing["points"][0]["disks"][0]["format"] == fmt


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhd", "vhdx"])
def test_restore_to_image_formats(cli: Cli, tmp_path: Path, fmt: str) -> None:
    img = random_image(tmp_path / "d.raw", 12 * MiB, seed=3, density=0.4)
    cli.run("backup", img, "--vm", "v")
    out = tmp_path / f"out.{fmt}"
    r = cli.json("restore", "v", "--to", out, "--format", fmt)
    assert r["format"] == fmt
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", out], capture_output=True).stdout)
    assert info["format"] == {"vhd": "vpc"}.get(fmt, fmt)
    check = tmp_path / "check.raw"
    convert(out, check, "raw")
    with open(check, "rb") as a, open(img, "rb") as b:
        assert a.read(12 * MiB) == b.read()  # vhd may round the size up; the disk's bytes must match
    assert allocated(out) < 12 * MiB  # sparse in its own format


def _scribble(path: Path, rng: random.Random, n: int) -> list[list[int]]:
    """Overwrite *n* unaligned ranges with random bytes; return them as a changed-extents list."""
    size = path.stat().st_size
    changed = []
    with open(path, "r+b") as f:
        for _ in range(n):
            length = rng.randrange(1, 3 * CHUNK)
            off = rng.randrange(0, size - length)
            f.seek(off)
            f.write(rng.randbytes(length))
            changed.append([off, length])
    return changed


def test_incremental_with_changed_extents_reads_only_them(cli: Cli, tmp_path: Path) -> None:
    """Every point stays a full view: the first point still restores the original disk."""
    img = random_image(tmp_path / "disk.raw", 24 * MiB, seed=4, density=0.6)
    original = tmp_path / "original.raw"
    shutil.copy(img, original)
    first = cli.json("backup", img, "--vm", "db")
    changed = _scribble(img, random.Random(5), 6)
    ce = tmp_path / "changed.json"
    ce.write_text(json.dumps(changed))
    second = cli.json("backup", img, "--vm", "db", "--changed-extents", ce)
    assert second["kind"] == "incremental" and second["parent"] == first["point"]
    touched = {b // CHUNK for off, n in changed for b in (off, off + n - 1)}
    assert second["bytes_read"] <= (len(touched) + 2 * len(changed)) * CHUNK
    assert second["new_bytes"] <= second["bytes_read"]
    for point, expected in ((first["point"], original), ("latest", img)):
        out = tmp_path / f"out-{point}.raw"
        cli.run("restore", f"db@{point}", "--to", out)
        assert sha256_file(out) == sha256_file(expected), point


def test_incremental_when_the_disk_grew(cli: Cli, tmp_path: Path) -> None:
    img = random_image(tmp_path / "disk.raw", 5 * CHUNK + 100, seed=6, density=1.0)
    cli.run("backup", img, "--vm", "g")
    with open(img, "ab") as f:  # grow by 3.5 chunks of data; the extents file only names an old range
        f.write(random.Random(7).randbytes(3 * CHUNK + CHUNK // 2))
    ce = tmp_path / "ce.json"
    ce.write_text("[[0, 10]]")
    res = cli.json("backup", img, "--vm", "g", "--changed-extents", ce)
    assert res["kind"] == "incremental"
    out = tmp_path / "out.raw"
    cli.run("restore", "g", "--to", out)
    assert sha256_file(out) == sha256_file(img)


def test_backup_without_cbt_stores_only_new_chunks(cli: Cli, tmp_path: Path) -> None:
    img = random_image(tmp_path / "disk.raw", 16 * MiB, seed=8, density=0.8)
    a = cli.json("backup", img, "--vm", "a")
    changed = _scribble(img, random.Random(9), 2)
    b = cli.json("backup", img, "--vm", "a")
    assert b["kind"] == "full" and b["bytes_read"] >= a["bytes_read"]
    assert b["new_bytes"] <= sum(n for _, n in changed) + 4 * CHUNK
    # the same disk under another VM is fully deduplicated
    c = cli.json("backup", img, "--vm", "copy-of-a")
    assert c["new_bytes"] == 0 and c["stored_bytes"] == 0


def test_multi_disk_vm(cli: Cli, tmp_path: Path) -> None:
    d0 = random_image(tmp_path / "system.raw", 8 * MiB, seed=10)
    d1 = convert(random_image(tmp_path / "data.raw", 6 * MiB, seed=11), tmp_path / "data.qcow2", "qcow2")
    res = cli.json("backup", d0, d1, "--vm", "two")
    assert [d["name"] for d in res["disks"]] == ["system", "data"]
    pts = cli.json("list", "two")["points"]
    assert len(pts) == 1 and [d["name"] for d in pts[0]["disks"]] == ["system", "data"]
    r = cli.run("restore", "two", "--to", tmp_path / "x.raw", check=False)
    assert r.returncode == 6 and "--disk" in r.stderr and "system" in r.stderr
    for name, src in (("system", d0), ("data", d1)):
        out = tmp_path / f"r-{name}.raw"
        cli.run("restore", "two", "--disk", name, "--to", out)
        assert sha256_file(out) == guest_sha256(src)
    # explicit names; a changed-extents object per disk
    ce = tmp_path / "ce.json"
    ce.write_text(json.dumps({"os": [[0, 100]], "db": []}))
    cli.run("backup", d0, d1, "--vm", "named", "--disk-name", "os", "--disk-name", "db")
    inc = cli.json(
        "backup", d0, d1, "--vm", "named", "--disk-name", "os", "--disk-name", "db", "--changed-extents", ce
    )
    assert inc["kind"] == "incremental" and inc["bytes_read"] == CHUNK
    r = cli.run("backup", d0, d0, "--vm", "dup", check=False)
    assert r.returncode == 6 and "same name" in r.stderr


def test_point_selection(cli: Cli, tmp_path: Path) -> None:
    img = make_sparse_image(tmp_path / "d.raw", 4 * MiB, [(0, b"one")])
    p1 = cli.json("backup", img, "--vm", "s")
    make_sparse_image(img, 4 * MiB, [(0, b"two")])
    p2 = cli.json("backup", img, "--vm", "s")

    def first_bytes(spec: str) -> bytes:
        out = tmp_path / "sel.raw"
        cli.run("restore", spec, "--to", out, "--overwrite")
        return out.read_bytes()[:3]

    assert first_bytes("s") == b"two" and first_bytes("s@latest") == b"two"
    assert first_bytes(f"s@{p1['point']}") == b"one"
    assert first_bytes(f"s@{p1['point'][:6]}") == b"one"
    assert first_bytes(f"s@{p2['created'][:26]}") == b"two"  # a timestamp prefix down to microseconds
    r = cli.run("restore", f"s@{p1['created'][:4]}", "--to", tmp_path / "z.raw", check=False)
    assert r.returncode == 6 and "matches 2 restore points" in r.stderr
    r = cli.run("restore", "s@nope", "--to", tmp_path / "z.raw", check=False)
    assert r.returncode == 5
    r = cli.run(
        "restore",
        "nosuchvm",
        "--to",
        tmp_path / "z.raw",
        check=False,
    )
    assert r.returncode == 5 and "nosuchvm" in r.stderr
    err = cli.run("restore", "nosuchvm", "--to", tmp_path / "z.raw", "--json", check=False).json()
    assert err["exit_code"] == 5 and err["error"] == "NotFound"


def test_prune_and_gc_free_space_and_keep_the_rest_intact(cli: Cli, tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    contents = {}
    for i in range(4):
        random_image(img, 4 * MiB, seed=100 + i, density=0.7)  # mostly new data each time
        contents[cli.json("backup", img, "--vm", "p")["point"]] = sha256_file(img)
    ids = list(contents)
    dry = cli.json("prune", "--keep-last", "2", "--dry-run")
    assert {p["id"] for p in dry["removed"]["p"]} == set(ids[:2])
    assert len(cli.json("list", "p")["points"]) == 4
    chunks_before = sum(1 for _ in (cli.repo / "chunks").rglob("*") if _.is_file())
    cli.json("prune", "--keep-last", "2")
    assert [p["id"] for p in cli.json("list", "p")["points"]] == ids[2:]
    assert not (cli.repo / "indexes" / ids[0]).exists()
    gc = cli.json("gc")
    assert gc["removed_chunks"] > 0 and gc["removed_bytes"] > 0
    chunks_after = sum(1 for _ in (cli.repo / "chunks").rglob("*") if _.is_file())
    assert chunks_after == chunks_before - gc["removed_chunks"]
    assert cli.json("gc")["removed_chunks"] == 0  # idempotent
    assert cli.json("verify")["ok"]
    for pid in ids[2:]:
        out = tmp_path / f"{pid}.raw"
        cli.run("restore", f"p@{pid}", "--to", out)
        assert sha256_file(out) == contents[pid]
    r = cli.run("prune", check=False)
    assert r.returncode == 2 and "--keep" in r.stderr


def test_list_and_human_output(cli: Cli, tmp_path: Path) -> None:
    img = random_image(tmp_path / "d.raw", 2 * MiB, seed=12)
    cli.run("backup", img, "--vm", "alpha")
    cli.run("backup", img, "--vm", "beta")
    vms = cli.json("list")["vms"]
    assert [v["name"] for v in vms] == ["alpha", "beta"] and all(v["points"] == 1 for v in vms)
    text = cli.run("list").stdout
    assert "alpha" in text and "beta" in text
    text = cli.run("verify").stdout
    assert "OK" in text


def test_explicit_format_beats_probing(cli: Cli, tmp_path: Path) -> None:
    """A raw disk whose guest wrote a qcow2 image at sector 0 is backed up as raw with --format raw."""
    inner = tmp_path / "inner.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", inner, "1M"], check=True)
    img = make_sparse_image(tmp_path / "guest.raw", 4 * MiB, [(0, inner.read_bytes())])
    probed = cli.json("backup", img, "--vm", "probe")
    assert probed["disks"][0]["size"] == 1 * MiB  # qemu-img took it for the qcow2 it contains
    res = cli.json("backup", img, "--vm", "raw", "--format", "raw")
    assert res["disks"][0]["size"] == 4 * MiB
    out = tmp_path / "out.raw"
    cli.run("restore", "raw", "--to", out)
    assert sha256_file(out) == sha256_file(img)


def test_catalog_of_schema_2_is_upgraded_in_place(cli: Cli, tmp_path: Path) -> None:
    """A repository written by the previous release (catalog schema 2: no point configuration, no
    change tokens) opens, keeps its points, and takes new ones."""
    import sqlite3

    from vmrecover.repo.catalog import SCHEMA_VERSION

    img = random_image(tmp_path / "d.raw", 1 * MiB, seed=40)
    first = cli.json("backup", img, "--vm", "v")["point"]
    db = sqlite3.connect(cli.repo / "catalog.sqlite")
    db.executescript(
        "ALTER TABLE points DROP COLUMN config; ALTER TABLE disks DROP COLUMN change_token; "
        "UPDATE meta SET value = '2' WHERE key = 'schema_version';"
    )
    db.close()
    (point,) = cli.json("list", "v")["points"]
    assert point["id"] == first and point["config"] is None and point["disks"][0]["change_token"] is None
    cli.json("backup", img, "--vm", "v")
    db = sqlite3.connect(cli.repo / "catalog.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.close()
    assert len(cli.json("list", "v")["points"]) == 2


# --- raw restores: O_DIRECT for aligned chunks, the page cache for the rest -------------------------

_K64 = 64 * 1024


def _odd_disk() -> tuple[FixedIndex, list[tuple[int, int, bytes | None]]]:
    """Four 64 KiB chunks' worth of disk, the last one 1536 bytes (a disk size no 4 KiB multiple):
    data, a hole, data, and the unaligned tail."""
    rng = random.Random(16)
    size = 3 * _K64 + 1536
    index = FixedIndex.empty(size, _K64)
    data = [rng.randbytes(_K64), None, rng.randbytes(_K64), rng.randbytes(1536)]
    return index, [(i, i * _K64, d) for i, d in enumerate(data)]


def _expected(chunks: list[tuple[int, int, bytes | None]]) -> bytes:
    return b"".join(bytes(_K64) if d is None else d for _, _, d in chunks)


def _spy_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(offset, through an O_DIRECT descriptor) of every write the raw writer makes."""
    import fcntl

    from vmrecover import restore

    seen: list[tuple[int, bool]] = []
    real = restore._pwrite_all

    def spy(fd: int, view: memoryview, offset: int) -> None:
        seen.append((offset, bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        real(fd, view, offset)

    monkeypatch.setattr(restore, "_pwrite_all", spy)
    return seen


def test_raw_restore_writes_aligned_chunks_direct_and_the_tail_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmrecover import restore

    seen = _spy_writes(monkeypatch)
    index, chunks = _odd_disk()
    dest = tmp_path / "out.raw"
    written = restore.write_image(iter(chunks), index, dest, fmt="raw", overwrite=False, what="t")
    assert written == 2 * _K64 + 1536
    assert dest.read_bytes() == _expected(chunks)
    assert sorted(seen) == [(0, True), (2 * _K64, True), (3 * _K64, False)]
    assert os.stat(dest).st_blocks * 512 < index.disk_size  # the hole stays a hole


def test_raw_restore_without_o_direct_goes_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filesystem that refuses O_DIRECT at open, or one that opens it and then refuses its writes
    (EINVAL): the same bytes, through the page cache."""
    import errno
    import fcntl

    from vmrecover import restore

    index, chunks = _odd_disk()
    seen = _spy_writes(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(restore, "_open_direct", lambda fd: None)
        restore.write_image(iter(chunks), index, tmp_path / "a.raw", fmt="raw", overwrite=False, what="t")
    assert (tmp_path / "a.raw").read_bytes() == _expected(chunks)
    assert [direct for _, direct in seen] == [False, False, False]

    seen.clear()
    spy = restore._pwrite_all

    def refuses_direct(fd: int, view: memoryview, offset: int) -> None:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        spy(fd, view, offset)

    monkeypatch.setattr(restore, "_pwrite_all", refuses_direct)
    restore.write_image(iter(chunks), index, tmp_path / "b.raw", fmt="raw", overwrite=False, what="t")
    assert (tmp_path / "b.raw").read_bytes() == _expected(chunks)
    assert sorted(seen) == [(0, False), (2 * _K64, False), (3 * _K64, False)]  # each, once, cached


def test_a_failed_direct_write_fails_the_restore_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO in a writer thread: the restore fails with it (from the next write or from finish), no
    output and no partial folder are left."""
    import errno

    from vmrecover import restore

    _spy_writes(monkeypatch)
    spy = restore._pwrite_all

    def fails(fd: int, view: memoryview, offset: int) -> None:
        spy(fd, view, offset)
        if offset == 2 * _K64:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(restore, "_pwrite_all", fails)
    index, chunks = _odd_disk()
    dest = tmp_path / "out.raw"
    with pytest.raises(OSError, match="Input/output error"):
        restore.write_image(iter(chunks), index, dest, fmt="raw", overwrite=False, what="t")
    assert list(tmp_path.iterdir()) == []
