"""Fault injection: bad input gets a clear error and loses nothing.

Every test here breaks something for real (SIGKILL, flipped bits, deleted or truncated chunk files,
truncated images, a full filesystem, a second writer, a wrong passphrase ...) while running the real
``vmrecover`` command, real qemu tools and real filesystems; nothing is mocked.  Each test's docstring
says what must survive the fault.  The common promise: the command fails with its documented exit code
and a message that names the problem, no partial restore point ever becomes visible, every committed
point still verifies and restores byte for byte, and ``gc`` removes whatever a killed run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import (
    Cli,
    MiB,
    assert_clean_error,
    chunk_digest,
    make_sparse_image,
    message,
    random_image,
    sha256_file,
)

CHUNK = 64 * 1024
TMP_MARK = ".tmp-"  # temp files and index dirs of a running (or killed) writer carry this in their name
PARTIAL = ".vmrecover-partial"  # suffix of a restore's output while it is being written

# exit codes (vmrecover/errors.py ExitCode; part of the interface, so spelled out here)
INTEGRITY, LOCKED, NOT_FOUND, BAD_INPUT, INCOMPATIBLE, AUTH, NO_SPACE, INTERRUPTED = 3, 4, 5, 6, 7, 8, 9, 130


# --- helpers ---------------------------------------------------------------------------------------


def random_raw(path: Path, size: int, *, seed: int) -> Path:
    """A raw image full of (incompressible, never-deduplicated) seeded random bytes."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def tree_digest(root: Path, *subdirs: str) -> dict[str, str]:
    """relative path -> sha256 of every file under *root* (or only under the given subdirectories)."""
    out = {}
    for base in [root / s for s in subdirs] if subdirs else [root]:
        for p in sorted(base.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def chunk_files(repo: Path) -> dict[str, Path]:
    """digest hex -> path of every complete chunk file (temp files excluded)."""
    return {p.name: p for p in (repo / "chunks").glob("*/*") if TMP_MARK not in p.name}


def count_chunk_files(repo: Path) -> int:
    """Files under chunks/ (temp files included): cheap enough to poll during a backup."""
    return sum(len(os.listdir(d)) for d in os.scandir(repo / "chunks"))


def chunk_temp_files(repo: Path) -> list[Path]:
    return [p for p in (repo / "chunks").glob("*/*") if TMP_MARK in p.name]


def all_points(cli: Cli) -> dict[str, set[str]]:
    """VM name -> ids of its restore points, as ``list --json`` shows them."""
    out = {}
    for vm in cli.json("list")["vms"]:
        out[vm["name"]] = {p["id"] for p in cli.json("list", vm["name"])["points"]}
    return out


def restore_sha(cli: Cli, target: str, dest: Path, *extra: str) -> str:
    cli.run("restore", target, "--to", dest, *extra)
    try:
        return sha256_file(dest)
    finally:
        dest.unlink()


def wait_for(cond, what: str, proc: subprocess.Popen[str] | None = None, timeout: float = 60) -> None:
    """Poll *cond* every millisecond until it is true (fail if *proc* exits first or on timeout)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (exit {proc.returncode}) before {what}:\n{err}{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


# --- 1. SIGKILL during backup ------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_backup_leaves_no_partial_point(cli: Cli, tmp_path: Path) -> None:
    """A backup SIGKILLed at random moments.

    Must survive: every committed point (an earlier VM, and any run whose commit happened before the
    kill arrived: it must then be complete and restore byte-identical) and a clean ``verify``; no partial
    point is ever listed; the kernel releases the writer lock, so the next backup succeeds and restores
    byte-identical; ``gc`` then removes exactly the killed runs' leftovers (orphan index directories,
    temp files, unreferenced chunks) and the repository still verifies.
    """
    rng = random.Random(0xB4C0)
    base = random_image(tmp_path / "base.raw", 4 * MiB, seed=11)
    base_point = cli.json("backup", base, "--vm", "base")["point"]
    img = tmp_path / "big.raw"
    size = 48 * MiB
    total = size // CHUNK
    # Kill when a random fraction of the run's chunks are on disk (whatever the machine's speed or load);
    # 1.0 = all chunks written: the kill lands in the commit steps (index write, syncfs, rename, catalog);
    # "renamed": as soon as the index directory has its final name, racing the catalog commit;
    # "catalog": as soon as the catalog's write-ahead log grows, i.e. in the middle of the commit itself.
    triggers: list[float | str] = [0.0, 1.0, "renamed", "catalog", "catalog"] + [
        rng.random() for _ in range(5)
    ]
    rng.shuffle(triggers)

    def victim_points() -> set[str]:
        res = cli.run("list", "victim", "--json", check=False)
        return {p["id"] for p in res.json()["points"]} if res.returncode == 0 else set()

    indexes = cli.repo / "indexes"
    committed: dict[str, str] = {}  # point -> sha256 of the image it was taken from
    interrupted = 0  # runs killed before their commit
    for attempt, trigger in enumerate(triggers):
        random_raw(img, size, seed=attempt)  # fresh content: every run has new chunks to write
        sha = sha256_file(img)
        stored = count_chunk_files(cli.repo)
        proc = cli.popen("backup", img, "--vm", "victim", "--json")
        tmp_suffix = f"{TMP_MARK}{proc.pid}"
        # the run is inside its pipeline once its temp index directory exists
        wait_for(lambda s=tmp_suffix: any(e.name.endswith(s) for e in indexes.iterdir()), "pipeline", proc)
        wal = cli.repo / "catalog.sqlite-wal"
        wal_size = wal.stat().st_size if wal.exists() else 0
        if trigger == "catalog":
            while proc.poll() is None and (wal.stat().st_size if wal.exists() else 0) == wal_size:
                time.sleep(0.0002)
        elif trigger == "renamed":
            (tmpdir,) = [e for e in indexes.iterdir() if e.name.endswith(tmp_suffix)]
            final = indexes / tmpdir.name.split(TMP_MARK)[0]
            while proc.poll() is None and not final.exists():
                time.sleep(0.0002)
        else:
            target = stored + round(float(trigger) * total)
            while proc.poll() is None and count_chunk_files(cli.repo) < target:
                time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        new = victim_points() - set(committed)
        when = trigger if isinstance(trigger, str) else f"{trigger:.0%} of the chunks"
        print(f"run {attempt}: killed at {when}: exit {proc.returncode}, new point {new}")
        assert proc.returncode in (0, -signal.SIGKILL), f"run {attempt} exit {proc.returncode}: {err}"
        assert len(new) <= 1
        if proc.returncode == 0:  # finished before the kill arrived: a real, complete point
            assert new == {json.loads(out)["point"]}
        if new:  # committed (perhaps killed just after the commit): must be complete, checked below
            committed[new.pop()] = sha
        else:
            interrupted += 1
    assert interrupted >= len(triggers) - 2, f"only {interrupted} of {len(triggers)} runs were killed mid-way"

    # no partial point: only the baseline and runs that really committed are listed
    expected = {"base": {base_point}} | ({"victim": set(committed)} if committed else {})
    assert all_points(cli) == expected
    assert cli.run("verify", check=False).returncode == 0
    # every interrupted run left its index directory (its point never became visible): gc must find these
    known = {base_point, *committed}
    orphans = sorted(e.name for e in indexes.iterdir() if e.name not in known)
    assert len(orphans) == interrupted, orphans
    temp_before_gc = len(chunk_temp_files(cli.repo))

    # the next backup takes the lock (released by the kernel) and restores byte-identical
    good = cli.json("backup", img, "--vm", "victim")
    assert good["point"] not in known
    committed[good["point"]] = sha256_file(img)

    gc = cli.json("gc")
    assert gc["removed_index_dirs"] == interrupted
    assert gc["removed_temp_files"] == temp_before_gc
    assert gc["removed_chunks"] > 0  # chunks of the interrupted runs' (different) images
    # nothing but committed points and the chunks they reference is left
    known.add(good["point"])
    assert sorted(e.name for e in indexes.iterdir()) == sorted(known)
    assert chunk_temp_files(cli.repo) == []
    assert len(chunk_files(cli.repo)) == gc["referenced_chunks"]
    assert cli.run("verify", check=False).returncode == 0
    for point, sha in committed.items():
        assert restore_sha(cli, f"victim@{point}", tmp_path / "out.raw") == sha, point
    assert restore_sha(cli, "base", tmp_path / "out.raw") == sha256_file(base)


def test_sigterm_during_backup_cleans_up(cli: Cli, tmp_path: Path) -> None:
    """SIGTERM (what a service manager sends) mid-backup: exit 130, no point, and the run removes its own
    temp index directory and temp files on the way out; the earlier point still verifies."""
    first = cli.json("backup", random_image(tmp_path / "a.raw", 2 * MiB, seed=5), "--vm", "v")["point"]
    img = random_raw(tmp_path / "big.raw", 48 * MiB, seed=6)
    stored = count_chunk_files(cli.repo)
    proc = cli.popen("backup", img, "--vm", "v")
    indexes = cli.repo / "indexes"
    # a quarter of the chunks are written: the run is well inside its pipeline
    wait_for(lambda: count_chunk_files(cli.repo) >= stored + 48 * MiB // CHUNK // 4, "chunks", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, f"exit {proc.returncode}: {err}{out}"
    assert "interrupted" in err
    assert all_points(cli) == {"v": {first}}
    assert sorted(e.name for e in indexes.iterdir()) == [first]
    assert chunk_temp_files(cli.repo) == []
    assert cli.run("verify", check=False).returncode == 0


# --- 2. damaged chunk files ---------------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    if how == "bitflip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x08
        path.write_bytes(data)
    elif how == "delete":
        path.unlink()
    elif how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "truncate-header":
        os.truncate(path, 7)
    else:
        raise ValueError(how)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("bitflip", "crc32"),
        ("delete", "missing"),
        ("truncate", "crc32"),
        ("truncate-header", "shorter than the envelope header"),
    ],
)
def test_damaged_chunk_is_reported_everywhere_it_is_used(
    cli: Cli, tmp_path: Path, how: str, reason: str
) -> None:
    """One damaged chunk file, used twice by one disk and shared by three disks of three points of two VMs.

    Must survive: points that do not use the chunk (they verify and restore byte-identical); ``verify``
    exits 3 and names every point, disk and byte range that uses the chunk; ``restore`` of an affected
    disk exits 3 naming the byte range and leaves no file behind (neither output nor partial).
    """
    rng = random.Random(zlib.crc32(how.encode()))
    shared = rng.randbytes(CHUNK)
    img1 = make_sparse_image(
        tmp_path / "img1.raw",
        8 * MiB,
        [(0, rng.randbytes(3 * MiB)), (1 * MiB, shared), (5 * MiB, shared), (6 * MiB, rng.randbytes(MiB))],
    )
    img2 = random_raw(tmp_path / "img2.raw", 4 * MiB, seed=rng.randrange(1 << 30))
    a1 = cli.json("backup", img1, "--vm", "a", "--disk-name", "sys")["point"]
    a2 = cli.json("backup", img1, "--vm", "a", "--disk-name", "sys")["point"]
    b1 = cli.json("backup", img1, img2, "--vm", "b", "--disk-name", "d1", "--disk-name", "d2")["point"]
    c1 = cli.json("backup", img2, "--vm", "c")["point"]

    digest = chunk_digest(shared)
    path = cli.repo / "chunks" / digest[:2] / digest
    assert path.is_file()
    damage(path, how)

    res = cli.run("verify", "--json", check=False)
    assert res.returncode == INTEGRITY, res.stderr
    doc = res.json()
    assert doc["ok"] is False and doc["bad_indexes"] == []
    assert [b["digest"] for b in doc["bad_chunks"]] == [digest]
    bad = doc["bad_chunks"][0]
    assert reason in bad["reason"]
    users = {(u["vm"], u["point"], u["disk"]): u["ranges"] for u in bad["used_by"]}
    assert set(users) == {("a", a1, "sys"), ("a", a2, "sys"), ("b", b1, "d1")}  # not b/d2, not c
    for ranges in users.values():
        assert ranges == [[1 * MiB, CHUNK], [5 * MiB, CHUNK]]
    # the human report names them too
    res = cli.run("verify", check=False)
    assert res.returncode == INTEGRITY
    for vm, point, disk in users:
        assert f"used by {vm}@{point} disk {disk} bytes 1048576..1114112, 5242880..5308416" in res.stdout
    assert "DAMAGED" in res.stdout
    # a point that does not use the chunk verifies clean
    assert cli.run("verify", "c", check=False).returncode == 0

    outdir = tmp_path / "out"
    outdir.mkdir()
    for target, disk in [("a", "sys"), (f"a@{a1}", "sys"), ("b", "d1")]:
        res = cli.run("restore", target, "--disk", disk, "--to", outdir / "x.raw", check=False)
        assert_clean_error(res, INTEGRITY, r"bytes 1048576\.\.1114112", digest[:16])
        assert list(outdir.iterdir()) == [], f"restore of {target} left files behind"
    res = cli.run("restore", "a", "--to", outdir / "x.raw", "--json", check=False)
    assert res.returncode == INTEGRITY
    assert res.json()["details"]["ranges"] == [[1 * MiB, CHUNK], [5 * MiB, CHUNK]]
    assert list(outdir.iterdir()) == []

    # undamaged disks and points restore byte-identical
    assert restore_sha(cli, "b", outdir / "d2.raw", "--disk", "d2") == sha256_file(img2)
    assert restore_sha(cli, f"c@{c1}", outdir / "c.raw") == sha256_file(img2)


@pytest.mark.parametrize("how", ["bitflip", "delete"])
def test_damaged_index_is_reported_and_gc_keeps_its_chunks(cli: Cli, tmp_path: Path, how: str) -> None:
    """A damaged or missing index file of one restore point.

    Must survive: the chunks that point uses (gc must refuse to sweep rather than treat them as
    unreferenced: they may be all that is left of that disk); the other points (verify and restore);
    verify exits 3 naming the point and disk; restore of it exits 3 and writes nothing.
    """
    img1 = random_raw(tmp_path / "one.raw", 2 * MiB, seed=31)
    img2 = random_raw(tmp_path / "two.raw", 2 * MiB, seed=32)
    p1 = cli.json("backup", img1, "--vm", "one")["point"]
    cli.json("backup", img2, "--vm", "two")
    index = cli.repo / "indexes" / p1 / "one.fidx"
    assert index.is_file()
    damage(index, how)
    chunks = tree_digest(cli.repo, "chunks")

    res = cli.run("verify", "--json", check=False)
    assert res.returncode == INTEGRITY
    doc = res.json()
    assert [(b["vm"], b["point"], b["disk"]) for b in doc["bad_indexes"]] == [("one", p1, "one")]
    assert re.search("missing" if how == "delete" else "damaged", doc["bad_indexes"][0]["error"])
    assert cli.run("verify", "two", check=False).returncode == 0

    out = tmp_path / "out.raw"
    assert_clean_error(cli.run("restore", "one", "--to", out, check=False), INTEGRITY, "index file")
    assert not out.exists() and not out.with_name(out.name + PARTIAL).exists()
    assert_clean_error(cli.run("gc", check=False), INTEGRITY, "index file", "missing|damaged")
    assert tree_digest(cli.repo, "chunks") == chunks, "gc deleted chunks while an index was unreadable"
    assert restore_sha(cli, "two", out) == sha256_file(img2)


# --- 3. bad input ---------------------------------------------------------------------------------


def _truncated_qcow2(d: Path) -> Path:
    img = d / "trunc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 2M", img], check=True, capture_output=True
    )
    assert img.stat().st_size > 2 * MiB
    os.truncate(img, 1 * MiB)  # the data clusters (2 MiB of 0xab) now lie past the end of the file
    return img


def _bad_image(case: str, d: Path) -> tuple[list[str | Path], int, list[str]]:
    """(backup arguments, expected exit code, message patterns) for one kind of bad input."""
    if case == "missing":
        return [d / "nope.raw"], NOT_FOUND, ["does not exist", "nope.raw"]
    if case == "directory":
        (d / "adir").mkdir()
        return [d / "adir"], BAD_INPUT, ["is a directory"]
    if case == "empty":
        (d / "empty.raw").write_bytes(b"")
        return [d / "empty.raw"], BAD_INPUT, ["empty"]
    if case == "truncated-qcow2":
        return [_truncated_qcow2(d)], BAD_INPUT, ["truncated", "1048576..3145728"]
    if case == "vdi":
        subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", d / "x.vdi", "4M"], check=True)
        return [d / "x.vdi"], BAD_INPUT, ["format 'vdi'"]
    raise ValueError(case)


EXTENT_CASES = {
    # name: (file contents, expected exit code, message patterns)
    "extents-bad-json": ("[[0, 65536], ", BAD_INPUT, ["cannot read changed-extents file"]),
    "extents-negative": ("[[-65536, 65536]]", BAD_INPUT, ["entry 0", "integers >= 0"]),
    "extents-not-pairs": ('[[0, 65536, 1], "x"]', BAD_INPUT, ["entry 0", r"\[offset, length\]"]),
    "extents-past-end": (f"[[{2 * MiB - 4096}, 65536]]", BAD_INPUT, ["past the disk's size 2097152"]),
    "extents-unknown-disk": ('{"other": [[0, 65536]]}', BAD_INPUT, ["other", "not in this backup"]),
    "extents-missing-file": (None, NOT_FOUND, ["does not exist"]),
}


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "truncated-qcow2", "vdi", *EXTENT_CASES])
def test_bad_input_is_refused_and_loses_nothing(cli: Cli, tmp_path: Path, case: str) -> None:
    """Unreadable, truncated or unsupported images and malformed --changed-extents files.

    Must survive: the repository exactly as it was (no new VM or point, chunks/ and indexes/ unchanged,
    no leftovers), the existing point still verifies; the error has the documented exit code, names the
    problem and prints no traceback.
    """
    good = random_raw(tmp_path / "good.raw", 2 * MiB, seed=3)
    cli.run("backup", good, "--vm", "v")
    points = all_points(cli)
    files = tree_digest(cli.repo, "chunks", "indexes")

    if case in EXTENT_CASES:
        text, code, patterns = EXTENT_CASES[case]
        ext = tmp_path / "changed.json"
        if text is not None:
            ext.write_text(text)
        res = cli.run("backup", good, "--vm", "v", "--changed-extents", ext, check=False)
    else:
        args, code, patterns = _bad_image(case, tmp_path)
        res = cli.run("backup", *args, "--vm", "w", check=False)
    assert_clean_error(res, code, *patterns)

    assert all_points(cli) == points
    assert tree_digest(cli.repo, "chunks", "indexes") == files
    assert cli.run("verify", check=False).returncode == 0


def test_bad_input_error_as_json(cli: Cli, tmp_path: Path) -> None:
    """With --json a refused image is reported as a JSON error document on stdout (for scripts)."""
    (tmp_path / "empty.raw").write_bytes(b"")
    res = cli.run("backup", tmp_path / "empty.raw", "--vm", "v", "--json", check=False)
    assert res.returncode == BAD_INPUT
    doc = res.json()
    assert doc["exit_code"] == BAD_INPUT and doc["error"] == "BadInput"
    assert "empty" in doc["message"] and str(tmp_path / "empty.raw") in doc["message"]
    assert cli.json("list") == {"vms": []}


# --- 4. repository of another format version ------------------------------------------------------


def test_other_format_version_is_refused_untouched(cli: Cli, tmp_path: Path) -> None:
    """A repository written by a future vmrecover (format 3).

    Must survive: every byte of the repository (no command may write to it, not even a lock or a
    catalog journal); every command exits 7 naming the versions; set back to format 2, it verifies and
    restores as before.
    """
    img = random_image(tmp_path / "d.raw", 4 * MiB, seed=4)
    cli.run("backup", img, "--vm", "v")
    toml = cli.repo / "repo.toml"
    text = toml.read_text()
    assert "format = 2\n" in text
    toml.write_text(text.replace("format = 2\n", "format = 3\n"))
    before = tree_digest(cli.repo)
    out = tmp_path / "out.raw"

    commands: list[list[str | Path]] = [
        ["list"],
        ["list", "v"],
        ["verify"],
        ["verify", "v"],
        ["backup", img, "--vm", "v"],
        ["backup", img, "--vm", "new"],
        ["restore", "v", "--to", out],
        ["prune", "--keep-last", "1"],
        ["gc"],
        ["gc", "--dry-run"],
    ]
    for args in commands:
        res = cli.run(*args, check=False)
        assert_clean_error(res, INCOMPATIBLE, "format version 3", "versions 1 and 2")
    res = cli.run("list", "--json", check=False)
    assert res.returncode == INCOMPATIBLE and res.json()["exit_code"] == INCOMPATIBLE
    assert "version 3" in res.json()["message"]
    # init refuses to overwrite it
    assert_clean_error(cli.run("init", "--chunk-size", "64K", check=False), INCOMPATIBLE, "already exists")

    assert not out.exists()
    assert tree_digest(cli.repo) == before

    toml.write_text(text)
    assert cli.run("verify", check=False).returncode == 0
    assert restore_sha(cli, "v", out) == sha256_file(img)


# --- 5. encryption ------------------------------------------------------------------------------------

PASSPHRASE = "correct horse battery staple"
MARKER = b"VMRECOVER-SECRET-PLAINTEXT-MARKER-7f3a9c"


def _image_with_marker(path: Path) -> Path:
    """Random (incompressible) chunks with MARKER inside, so an unencrypted repository stores the marker
    verbatim; plus a compressible text region made of the marker."""
    rng = random.Random(55)
    regions = []
    for i in range(8):
        block = bytearray(rng.randbytes(CHUNK))
        block[1000 : 1000 + len(MARKER)] = MARKER
        regions.append((i * CHUNK, bytes(block)))
    regions.append((2 * MiB, MARKER * (MiB // len(MARKER))))
    return make_sparse_image(path, 4 * MiB, regions)


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_encrypted_repository(tmp_path: Path) -> None:
    """An aes-256-gcm repository.

    Must survive: the round trip (byte-identical restore); secrecy (no repository file contains the
    plaintext, while the same image in an unencrypted repository does); the repository itself when a
    wrong, empty or missing passphrase is used (exit 8, nothing written); and tampering is caught by
    authentication (verify exit 3, restore exit 3 with no output), even when the crc32 is fixed up
    and when a valid chunk file is copied over another one.
    """
    root = tmp_path / "enc"
    enc = Cli(root, env={"VMRECOVER_PASSPHRASE": PASSPHRASE})
    enc.run("init", "--encryption", "aes-256-gcm", "--chunk-size", "64K")
    img = _image_with_marker(tmp_path / "secret.raw")
    point = enc.json("backup", img, "--vm", "s")["point"]
    out = tmp_path / "out.raw"
    assert restore_sha(enc, "s", out) == sha256_file(img)
    assert enc.run("verify", check=False).returncode == 0

    # secrecy: the control repository (unencrypted) shows the check would find the plaintext
    plain = Cli(tmp_path / "plain")
    plain.run("init", "--chunk-size", "64K")
    plain.run("backup", img, "--vm", "s")
    assert _files_containing(plain.repo / "chunks", MARKER)
    assert _files_containing(root, MARKER) == []
    assert PASSPHRASE.encode() not in (root / "repo.toml").read_bytes()

    # wrong / empty / no passphrase: exit 8, nothing changes
    before = tree_digest(root)
    wrong = Cli(root, env={"VMRECOVER_PASSPHRASE": "Correct horse battery staple"})
    for args in (["list"], ["verify"], ["backup", img, "--vm", "s"], ["restore", "s", "--to", out], ["gc"]):
        assert_clean_error(wrong.run(*args, check=False), AUTH, "wrong passphrase")
    assert_clean_error(Cli(root, env={"VMRECOVER_PASSPHRASE": ""}).run("list", check=False), AUTH, "empty")
    nopass = Cli(root)  # conftest's Cli drops VMRECOVER_PASSPHRASE; stdin is not a terminal
    for args in (["list"], ["backup", img, "--vm", "s"], ["restore", "s", "--to", out]):
        assert_clean_error(nopass.run(*args, check=False), AUTH, "encrypted", "no passphrase")
    assert not out.exists()
    assert tree_digest(root) == before

    # tampering: change one ciphertext byte and fix the envelope's crc32 (so only AES-GCM can notice),
    # and copy one valid chunk file over another (its associated data, the digest, no longer matches)
    files = sorted(chunk_files(root).items())
    assert len(files) >= 3
    (tampered, t_path), (src, s_path), (overwritten, o_path) = files[0], files[1], files[2]
    blob = bytearray(t_path.read_bytes())
    assert blob[:4] == b"VMRC" and blob[5] & 2, "expected an AES-GCM envelope"
    blob[16 + 12 + 5] ^= 0x01  # header (16) + nonce (12) + a ciphertext byte
    blob[12:16] = struct.pack("<I", zlib.crc32(bytes(blob[16:])))
    t_path.write_bytes(blob)
    o_path.write_bytes(s_path.read_bytes())

    res = enc.run("verify", "--json", check=False)
    assert res.returncode == INTEGRITY
    bad = {b["digest"]: b for b in res.json()["bad_chunks"]}
    assert set(bad) == {tampered, overwritten}, f"{src} is intact"
    for b in bad.values():
        assert "authentication failed" in b["reason"]
        assert [(u["vm"], u["point"]) for u in b["used_by"]] == [("s", point)]
    assert_clean_error(enc.run("restore", "s", "--to", out, check=False), INTEGRITY, "authentication failed")
    assert not out.exists() and not out.with_name(out.name + PARTIAL).exists()


# --- 6. full filesystem ---------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs (a real filesystem that fills up), unmounted afterwards whatever happens."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot run here: mounting a tmpfs needs root (CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_backup(small_fs: Path, tmp_path: Path) -> None:
    """The repository's filesystem fills up in the middle of a backup.

    Must survive: the first point (listed alone, verifies, restores byte-identical); the backup fails
    with exit 9 saying there is no space and leaves no temp files or index directory; the failed
    backup's own chunks are removed again (developer-notes/repository.md: "ENOSPC at any step ...
    removes what this backup wrote that is not referenced"); after gc a small backup succeeds.
    """
    cli = Cli(small_fs / "repo")
    cli.run("init", "--chunk-size", "64K")
    first_img = random_raw(tmp_path / "first.raw", 1 * MiB, seed=1)
    first = cli.json("backup", first_img, "--vm", "v")["point"]
    chunks_before = set(chunk_files(cli.repo))

    big = random_raw(tmp_path / "big.raw", 8 * MiB, seed=2)  # more than fits in 6 MiB
    res = cli.run("backup", big, "--vm", "v", check=False)
    assert_clean_error(res, NO_SPACE, "no space left")
    leftover_chunks = set(chunk_files(cli.repo)) - chunks_before

    assert all_points(cli) == {"v": {first}}
    assert sorted(e.name for e in (cli.repo / "indexes").iterdir()) == [first]
    assert chunk_temp_files(cli.repo) == []
    assert cli.run("verify", check=False).returncode == 0
    assert restore_sha(cli, "v", tmp_path / "out.raw") == sha256_file(first_img)

    big.unlink()
    gc = cli.json("gc")
    assert gc["referenced_chunks"] == len(chunks_before)
    assert set(chunk_files(cli.repo)) == chunks_before
    second_img = random_raw(tmp_path / "second.raw", 1 * MiB, seed=3)
    second = cli.json("backup", second_img, "--vm", "v")["point"]
    assert all_points(cli) == {"v": {first, second}}
    assert cli.run("verify", check=False).returncode == 0
    assert restore_sha(cli, f"v@{second}", tmp_path / "out.raw") == sha256_file(second_img)
    assert restore_sha(cli, f"v@{first}", tmp_path / "out.raw") == sha256_file(first_img)

    assert not leftover_chunks, (
        f"the backup that hit ENOSPC left {len(leftover_chunks)} unreferenced chunk files on the full "
        "filesystem (only gc freed them)"
    )


def test_full_disk_during_restore(cli: Cli, small_fs: Path, tmp_path: Path) -> None:
    """The destination's filesystem fills up during a restore.

    Must survive: the repository (the point still verifies and restores elsewhere); the restore exits 9
    saying there is no space and leaves nothing on the full filesystem (no output, no partial file).
    """
    img = random_raw(tmp_path / "d.raw", 8 * MiB, seed=41)  # more than the 6 MiB filesystem holds
    cli.run("backup", img, "--vm", "v")
    res = cli.run("restore", "v", "--to", small_fs / "out.raw", check=False)
    assert_clean_error(res, NO_SPACE, "no space left")
    assert list(small_fs.iterdir()) == []
    assert cli.run("verify", check=False).returncode == 0
    assert restore_sha(cli, "v", tmp_path / "out.raw") == sha256_file(img)


# --- 7. concurrent commands -----------------------------------------------------------------------


def _lock_info(repo: Path) -> dict:
    try:
        return json.loads((repo / "locks" / "writer").read_text() or "{}")
    except (FileNotFoundError, ValueError):
        return {}


@pytest.mark.slow
def test_backups_of_other_vms_run_beside_a_backup_while_prune_gc_and_the_same_vm_wait_or_refuse(
    tmp_path: Path,
) -> None:
    """A backup of VM 'big' runs (stopped in the middle, holding its locks).  Beside it: a backup of
    another VM runs and commits at once;
    prune and gc are refused (they remove what backups may use); a backup of 'big' with --no-wait is
    refused, without it waits, saying for whom, and runs once the first is done.

    Must survive: every point (each lists, verifies and restores byte-identical); the refused commands
    change nothing and name the holder (op and pid).
    """
    import threading

    cli = Cli(tmp_path / "repo")
    cli.run("init", "--chunk-size", "64K")
    big = random_raw(tmp_path / "big.raw", 8 * MiB, seed=8)
    small = random_raw(tmp_path / "small.raw", 1 * MiB, seed=9)

    first = cli.popen("backup", big, "--vm", "big", "--json")
    wait_for(lambda: (cli.repo / "locks" / f"writer.{first.pid}").exists(), "the backup's lock", first)
    os.kill(first.pid, signal.SIGSTOP)  # it holds its locks for as long as the test needs, whatever the load
    try:
        other = cli.run("backup", small, "--vm", "other", "--json", check=False)
        refused = [
            cli.run("prune", "--keep-last", "1", check=False),
            cli.run("gc", check=False),
            cli.run("backup", small, "--vm", "big", "--no-wait", check=False),
        ]
        second = cli.popen("backup", small, "--vm", "big", "--json")
        said: list[str] = []
        assert second.stderr is not None
        reader = threading.Thread(target=lambda: said.extend(second.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        wait_for(lambda: any("waits" in line for line in said), "the second backup to wait", second)
    finally:
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    assert second.stdout is not None
    with second.stdout, second.stderr:
        out2 = second.stdout.read()
        second.wait(timeout=300)
        reader.join(timeout=60)
    err2 = "".join(said)
    assert first.returncode == 0, err
    assert other.returncode == 0, other.stderr
    for res in refused:
        assert_clean_error(res, LOCKED, "locked", rf"backup of big \(pid {first.pid}\b")
    assert second.returncode == 0, err2
    assert re.search(
        rf"backup of big waits: the repository is locked by backup of big \(pid {first.pid}\b", err2
    ), err2

    points = all_points(cli)
    assert set(points) == {"big", "other"} and len(points["big"]) == 2
    assert json.loads(out)["point"] in points["big"] and json.loads(out2)["point"] in points["big"]
    assert cli.run("verify", check=False).returncode == 0
    assert restore_sha(cli, f"big@{json.loads(out)['point']}", tmp_path / "out.raw") == sha256_file(big)
    assert restore_sha(cli, "big", tmp_path / "out.raw") == sha256_file(small)
    assert restore_sha(cli, "other", tmp_path / "out.raw") == sha256_file(small)
    cli.run("prune", "--vm", "big", "--keep-last", "1")  # and now prune gets its turn


class _FailingSource:
    """Random chunks, then an error at *fail_at* (a source that breaks in the middle of a backup)."""

    format, path, backing_not_read = "raw", "failing", None

    def __init__(self, size: int, fail_at: int, seed: int) -> None:
        self.size, self.fail_at, self.files_read = size, fail_at, ["failing"]
        self.rng = random.Random(seed)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        yield (0, self.size)

    def read(self, offset: int, length: int) -> bytes:
        if offset >= self.fail_at:
            raise OSError(5, "the source broke")
        return self.rng.randbytes(length)

    def close(self) -> None:
        pass


def test_a_failed_backup_keeps_its_chunks_while_another_backup_may_use_them(cli: Cli) -> None:
    """A failed backup deletes the chunks it created (the space a full disk needs back) only when no
    other backup runs: a concurrent one may have found them, and would commit a point missing them."""
    from vmrecover.ingest.pipeline import DiskJob, run_backup
    from vmrecover.repo.repository import Repository

    def chunk_files() -> int:
        return sum(1 for f in (cli.repo / "chunks").rglob("*") if f.is_file() and TMP_MARK not in f.name)

    before = chunk_files()
    with Repository.open(cli.repo) as other, other.backing_up("running"):  # a backup of another VM runs
        with (
            Repository.open(cli.repo) as repo,
            repo.backing_up("broken"),
            pytest.raises(OSError, match="the source broke"),
        ):
            run_backup(repo, "broken", [DiskJob("d", _FailingSource(2 * MiB, MiB, seed=1), None)])
        kept = chunk_files() - before
    assert 0 < kept <= MiB // CHUNK  # nothing deleted: "running" might have found them
    with (  # alone: its chunks are removed
        Repository.open(cli.repo) as repo,
        repo.backing_up("broken"),
        pytest.raises(OSError, match="the source broke"),
    ):
        run_backup(repo, "broken", [DiskJob("d", _FailingSource(2 * MiB, MiB, seed=2), None)])
    assert chunk_files() - before == kept
    assert cli.json("gc")["removed_chunks"] == kept  # the first run's are garbage: gc frees them


@contextlib.contextmanager
def stopped_restoring(cli: Cli, target: str, out: Path) -> Iterator[subprocess.Popen[str]]:
    """``vmrecover restore TARGET --to OUT`` SIGSTOPped as soon as it writes its output (so it has read
    some chunks and not yet the others); yield it, then let it continue."""
    proc = cli.popen("restore", target, "--to", out, "--json")
    partial = out.with_name(out.name + PARTIAL) / out.name  # the output, staged beside its final name

    def written() -> bool:
        with contextlib.suppress(FileNotFoundError):
            return partial.stat().st_blocks > 0  # its size is set at once; its blocks come with data
        return False

    wait_for(written, "the restore's first write", proc)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def _two_points_one_pruned(cli: Cli, tmp_path: Path) -> int:
    """VM 'old' with two points, the older pruned: returns how many chunks only that point used."""
    cli.run("backup", random_raw(tmp_path / "o1.raw", 1 * MiB, seed=31), "--vm", "old")
    cli.run("backup", random_raw(tmp_path / "o2.raw", 1 * MiB, seed=32), "--vm", "old")
    cli.run("prune", "--vm", "old", "--keep-last", "1")
    return MiB // CHUNK


def test_gc_runs_beside_a_reader_and_frees_only_what_no_listed_point_uses(cli: Cli, tmp_path: Path) -> None:
    """gc while a restore reads (SIGSTOPped in the middle of it).

    Must survive: the restore (it completes, byte-identical); gc succeeds at once (readers no longer
    block it), frees exactly the chunks of the pruned point and nothing a listed point uses; backups
    still run beside the reader.
    """
    img = random_raw(tmp_path / "d.raw", 16 * MiB, seed=12)
    cli.run("backup", img, "--vm", "v")
    freed = _two_points_one_pruned(cli, tmp_path)
    out = tmp_path / "out.raw"
    with stopped_restoring(cli, "v", out) as proc:
        assert cli.json("gc")["removed_chunks"] == freed
        cli.run("backup", random_raw(tmp_path / "w.raw", 1 * MiB, seed=13), "--vm", "w")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert sha256_file(out) == sha256_file(img)
    assert cli.json("gc")["removed_chunks"] == 0
    assert cli.run("verify", check=False).returncode == 0


def test_restore_of_a_point_pruned_under_it_says_so(cli: Cli, tmp_path: Path) -> None:
    """prune + gc take the point a running restore reads.  The restore fails with exit 5 saying the
    point was pruned (not a damage report), and leaves no output and no partial file."""
    img = random_raw(tmp_path / "d.raw", 16 * MiB, seed=14)
    cli.run("backup", img, "--vm", "v")
    cli.run("backup", random_raw(tmp_path / "d2.raw", 1 * MiB, seed=15), "--vm", "v")
    first = sorted(cli.json("list", "v")["points"], key=lambda p: p["created"])[0]["id"]
    out = tmp_path / "out.raw"
    with stopped_restoring(cli, f"v@{first}", out) as proc:
        cli.run("prune", "--vm", "v", "--keep-last", "1")
        cli.run("gc")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == NOT_FOUND, stderr + stdout
    doc = json.loads(stdout)
    assert doc["error"] == "PointPruned" and "pruned" in doc["message"], doc
    assert not out.exists() and not out.with_name(out.name + PARTIAL).exists()
    assert cli.run("verify", check=False).returncode == 0


def test_verify_reports_a_point_pruned_during_it_as_pruned_not_damaged(cli: Cli, tmp_path: Path) -> None:
    """verify was given a point that prune and gc then removed (the list of points a running verify
    took at its start): the point is reported as pruned, nothing as damaged, and verify passes."""
    from vmrecover.repo.repository import Repository
    from vmrecover.repo.verify import verify

    cli.run("backup", random_raw(tmp_path / "v.raw", 2 * MiB, seed=16), "--vm", "v")
    _two_points_one_pruned(cli, tmp_path)
    with Repository.open(cli.repo) as repo:
        points = repo.catalog.points()
    cli.run("backup", random_raw(tmp_path / "o3.raw", 1 * MiB, seed=33), "--vm", "old")
    cli.run("prune", "--vm", "old", "--keep-last", "1")
    cli.run("gc")
    with Repository.open(cli.repo) as repo:
        report = verify(repo, points)
    assert report.ok, report.to_json()
    assert len(report.pruned) == 1 and report.pruned[0].startswith("old@")


def test_lock_conflict_names_the_holder_even_before_it_wrote_its_record(cli: Cli, tmp_path: Path) -> None:
    """A process holds the writer lock but has not written its record yet (or an old record of another
    process is still in the file): the refused command names the real holder by pid and command."""
    lock_file = cli.repo / "locks" / "writer"
    lock_file.write_text(json.dumps({"op": "backup", "pid": 1, "host": "elsewhere", "since": "long ago"}))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(lock_file)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        res = cli.run(
            "backup", random_raw(tmp_path / "x.raw", 1 * MiB, seed=17), "--vm", "x", "--no-wait", check=False
        )
        assert_clean_error(res, LOCKED, rf"locked by .*python.* \(pid {holder.pid}\)")
        assert "?" not in message(res) and "elsewhere" not in message(res)
    finally:
        holder.kill()
        holder.communicate()


# --- 8. restore destination -------------------------------------------------------------------------


def test_restore_never_overwrites_without_flag(cli: Cli, tmp_path: Path) -> None:
    """The restore destination already exists and --overwrite is not given.

    Must survive: the existing file, byte for byte, inode and mtime; the error exits 6 and says what to
    do; with --overwrite the restore replaces it with the right bytes.
    """
    img = random_image(tmp_path / "d.raw", 4 * MiB, seed=21)
    cli.run("backup", img, "--vm", "v")
    dest = tmp_path / "precious.raw"
    dest.write_bytes(b"the only copy of something important\n" * 1000)
    st, sha = dest.stat(), sha256_file(dest)

    res = cli.run("restore", "v", "--to", dest, check=False)
    assert_clean_error(res, BAD_INPUT, "already exists", "--overwrite")
    res = cli.run("restore", "v", "--to", dest, "--json", check=False)
    assert res.returncode == BAD_INPUT and res.json()["exit_code"] == BAD_INPUT
    after = dest.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert sha256_file(dest) == sha
    assert sorted(p.name for p in tmp_path.iterdir() if PARTIAL in p.name) == []

    # a destination directory that does not exist: exit 5, nothing created
    res = cli.run("restore", "v", "--to", tmp_path / "nodir" / "x.raw", check=False)
    assert_clean_error(res, NOT_FOUND, "does not exist")
    assert not (tmp_path / "nodir").exists()

    cli.run("restore", "v", "--to", dest, "--overwrite")
    assert sha256_file(dest) == sha256_file(img)
