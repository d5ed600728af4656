"""Untrusted images and restore outputs (issue 10, "Untrusted images and files").

An image can name host files: a qcow2 its backing file (a path, a ``json:`` spec, a chain), a qcow2
its external data file, a vmdk descriptor (also one hidden behind a sparse header) its extents, a
sparse vmdk its parent.  Every hostile image here names a "secret" host file.  A local backup
(trusted) reads it and says so in ``files_read``; an ``--untrusted`` backup never opens it (inotify
sees every open of it by any process), and either refuses the image or reads zeros in its place.
Each restore is searched for the secret's bytes.

Restore outputs: symlinks planted where a restore writes (its partial folder, its destination, a
way onto a block device) are never followed, and the file they point to stays as it was.

Real images made with qemu-img, the real CLI, real qemu-nbd; nothing is mocked but one race's timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmrecover import qemu

from .conftest import (
    Cli,
    MiB,
    assert_clean_error,
    convert,
    guest_sha256,
    make_sparse_image,
    sha256_file,
    watching,
)

BAD_INPUT = 6
SECRET_SIZE = 1 * MiB


# --------------------------------------------------------------------------- helpers
def qemu_img(*args: str | Path) -> None:
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, f"qemu-img {' '.join(map(str, args))}: {proc.stderr}"


def real(p: Path) -> str:
    return os.path.realpath(p)


def restored(cli: Cli, vm: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"restored-{vm}.raw"
    cli.run("restore", vm, "--to", out, "--overwrite")
    return out.read_bytes()


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    dev = subprocess.run(
        ["losetup", "--find", "--show", backing], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


@pytest.fixture
def secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A host file nobody should find in a backup of an untrusted image: 1 MiB of random bytes."""
    data = random.Random(1234).randbytes(SECRET_SIZE)
    p = tmp_path / "secret"
    p.write_bytes(data)
    return p, data


# --------------------------------------------------------------------------- hostile images
# Each builder makes, in folder d, an image naming the secret; it returns (image, files it names).
def qcow2_backing_path(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    img = d / "backed.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, img, str(SECRET_SIZE))
    return img, [secret]


def qcow2_backing_json(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    img = d / "json-backed.qcow2"
    spec = json.dumps({"driver": "raw", "file": {"driver": "file", "filename": str(secret)}})
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", f"json:{spec}", img, str(SECRET_SIZE))
    return img, [secret]


def qcow2_backing_chain(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    """top.qcow2 -> mid.qcow2 (a relative name) -> the secret."""
    mid, top = d / "mid.qcow2", d / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret, mid, str(SECRET_SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "mid.qcow2", top, str(SECRET_SIZE))
    return top, [mid, secret]


def qcow2_data_file(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    """A qcow2 whose guest data is the secret (external data file, raw layout)."""
    img, scratch = d / "datafile.qcow2", d / "scratch.bin"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"data_file={scratch},data_file_raw=on", img, str(SECRET_SIZE)
    )
    qemu_img("amend", "-o", f"data_file={secret}", img)
    scratch.unlink()
    return img, [secret]


def _descriptor(extent: Path) -> bytes:
    return (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\nRW {SECRET_SIZE // 512} FLAT "{extent}" 0\n'
    ).encode()


def vmdk_descriptor(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    img = d / "descriptor.vmdk"
    img.write_bytes(_descriptor(secret))
    return img, [secret]


def vmdk_sparse_header_with_descriptor(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    """A sparse vmdk header (KDMV) of capacity 0 whose embedded descriptor names the secret: qemu
    reads that descriptor as a descriptor file."""
    header = b"KDMV" + struct.pack("<IIQQQQIQQQ", 1, 0, 0, 128, 1, 1, 512, 0, 0, 0)
    img = d / "sparse-header.vmdk"
    img.write_bytes(header.ljust(512, b"\0") + _descriptor(secret).ljust(512, b"\0"))
    return img, [secret]


def vmdk_parent(d: Path, secret: Path) -> tuple[Path, list[Path]]:
    """A sparse vmdk whose parent (parentFileNameHint) holds the secret."""
    base, child = d / "base.vmdk", d / "child.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", secret, base)
    qemu_img("create", "-q", "-f", "vmdk", "-F", "vmdk", "-b", "base.vmdk", child, str(SECRET_SIZE))
    return child, [base]


# builder, what --untrusted does: "zeros" (the backing file is not opened) or the refusal's reason
HOSTILE: dict[str, tuple[Callable[[Path, Path], tuple[Path, list[Path]]], str]] = {
    "qcow2-backing-path": (qcow2_backing_path, "zeros"),
    "qcow2-backing-json": (qcow2_backing_json, "zeros"),
    "qcow2-backing-chain": (qcow2_backing_chain, "zeros"),
    "vmdk-parent": (vmdk_parent, "zeros"),
    "qcow2-data-file": (qcow2_data_file, "qcow2 image with an external data file"),
    "vmdk-descriptor": (vmdk_descriptor, "VMDK descriptor: its extents"),
    "vmdk-sparse-header-descriptor": (vmdk_sparse_header_with_descriptor, "VMDK descriptor: its extents"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_trusted_backup_follows_what_the_image_names_and_says_so(
    cli: Cli, tmp_path: Path, secret: tuple[Path, bytes], case: str
) -> None:
    """A local backup reads the chain / extents / data file as qemu would: the restore holds the
    secret's bytes, and the output names every file that was read, the image first."""
    build, _ = HOSTILE[case]
    img, named = build(tmp_path, secret[0])
    with watching(named) as w:
        doc = cli.json("backup", img, "--vm", "local")
        assert set(w.opened()) == {str(p) for p in named}  # the watch works: these were opened
    disk = doc["disks"][0]
    assert disk["files_read"] == [real(img), *map(real, named)]
    assert disk["backing_not_read"] is None and doc["untrusted"] is False
    (point,) = cli.json("list", "local")["points"]  # and the point keeps the list
    assert point["stats"]["files_read"] == {disk["name"]: disk["files_read"]}
    assert restored(cli, "local", tmp_path)[:SECRET_SIZE] == secret[1]
    text = cli.run("backup", img, "--vm", "local").stdout  # the human output names them too
    assert all(real(p) in text for p in named), text


@pytest.mark.parametrize("case", HOSTILE)
def test_untrusted_backup_never_opens_what_the_image_names(
    cli: Cli, tmp_path: Path, secret: tuple[Path, bytes], case: str
) -> None:
    """--untrusted: the named files are never opened, not even to probe the format; a backing file
    reads as zeros (and the output names it as not read), anything else is refused (exit 6, naming
    the image and why)."""
    build, outcome = HOSTILE[case]
    img, named = build(tmp_path, secret[0])
    with watching(named) as w:
        res = cli.run("backup", img, "--vm", "pushed", "--untrusted", "--json", check=False)
        assert w.opened() == []
    if outcome == "zeros":
        assert res.returncode == 0, res.stderr
        disk = res.json()["disks"][0]
        assert disk["files_read"] == [real(img)]
        assert named[0].name in (disk["backing_not_read"] or "")  # the name the image gives
        data = restored(cli, "pushed", tmp_path)
        assert data == bytes(len(data))  # the image holds nothing of its own: all zeros
        assert "backing file" in res.stderr and "not read" in res.stderr
    else:
        assert_clean_error(res, BAD_INPUT, str(img), outcome, "untrusted")
        assert cli.json("list") == {"vms": []}


def test_untrusted_refusal_does_not_depend_on_probing(
    cli: Cli, tmp_path: Path, secret: tuple[Path, bytes]
) -> None:
    """An explicit --format does not let a descriptor through; a descriptor qemu's probe would miss
    (a blank line before 'version=') is refused as vmdk just the same."""
    img, named = vmdk_descriptor(tmp_path, secret[0])
    odd = tmp_path / "odd.vmdk"
    odd.write_bytes(b"\n" + img.read_bytes())
    with watching(named) as w:
        for image in (img, odd):
            res = cli.run("backup", image, "--vm", "x", "--format", "vmdk", "--untrusted", check=False)
            assert_clean_error(res, BAD_INPUT, str(image), "VMDK descriptor")
        assert w.opened() == []


def test_raw_disk_with_an_image_header_as_raw_runs_no_qemu(
    cli: Cli, tmp_path: Path, secret: tuple[Path, bytes]
) -> None:
    """A raw guest disk that starts with a qcow2 header naming a host file: with --format raw it is
    backed up byte-exact, no qemu tool runs, and nothing but the disk is read.  Probed, a local backup
    takes it for the qcow2 (and names the file it read); --untrusted still opens nothing else."""
    header, _ = qcow2_backing_path(tmp_path, secret[0])
    disk = make_sparse_image(tmp_path / "guest.raw", 4 * MiB, [(0, header.read_bytes()), (3 * MiB, b"tail")])
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    ran = tmp_path / "qemu-ran"
    for tool in ("qemu-img", "qemu-nbd"):
        (fakebin / tool).write_text(f"#!/bin/sh\necho {tool} >> {ran}\nexit 1\n")
        (fakebin / tool).chmod(0o755)
    no_qemu = Cli(cli.repo, env={"PATH": f"{fakebin}:{os.environ['PATH']}"})
    with watching([secret[0]]) as w:
        for trust in ([], ["--untrusted"]):
            doc = no_qemu.json("backup", disk, "--vm", "raw", "--format", "raw", *trust)
            assert doc["disks"][0]["files_read"] == [real(disk)] and doc["disks"][0]["size"] == 4 * MiB
        assert w.opened() == []
    assert not ran.exists(), ran.read_text()
    out = tmp_path / "out.raw"
    cli.run("restore", "raw", "--to", out)
    assert sha256_file(out) == sha256_file(disk)

    probed = cli.json("backup", disk, "--vm", "probed")["disks"][0]
    assert probed["size"] == SECRET_SIZE and probed["files_read"] == [real(disk), real(secret[0])]
    with watching([secret[0]]) as w:
        untrusted = cli.json("backup", disk, "--vm", "probed-untrusted", "--untrusted")["disks"][0]
        assert w.opened() == []
    assert untrusted["files_read"] == [real(disk)] and untrusted["backing_not_read"] == str(secret[0])


# --------------------------------------------------------------------------- ordinary images
def test_self_contained_images_back_up_the_same_trusted_or_not(cli: Cli, tmp_path: Path) -> None:
    """Every supported format, as qemu-img writes it, is read only from itself either way."""
    rng = random.Random(5)
    raw = make_sparse_image(tmp_path / "src.raw", 6 * MiB, [(0, rng.randbytes(MiB)), (5 * MiB, b"end" * 99)])
    images = [convert(raw, tmp_path / f"d.{fmt}", fmt) for fmt in ("qcow2", "vmdk", "vpc", "vhdx")]
    stream = tmp_path / "stream.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, stream)
    for img in [*images, stream]:
        for trust in ([], ["--untrusted"]):
            doc = cli.json("backup", img, "--vm", "v", *trust)
            assert doc["disks"][0]["files_read"] == [real(img)], (img, trust)
            out = tmp_path / "out.raw"
            cli.run("restore", "v", "--to", out, "--overwrite")
            assert sha256_file(out) == guest_sha256(img), (img, trust)


def test_trusted_vmdk_with_a_flat_extent(cli: Cli, tmp_path: Path) -> None:
    """A monolithicFlat vmdk (descriptor + -flat.vmdk) backs up locally: its data lies in the extent,
    so the descriptor's small size does not mean it is truncated (it was refused as truncated)."""
    raw = make_sparse_image(tmp_path / "src.raw", 2 * MiB, [(4096, random.Random(6).randbytes(300_000))])
    img = tmp_path / "flat.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", raw, img)
    doc = cli.json("backup", img, "--vm", "flat")
    assert doc["disks"][0]["files_read"] == [real(img), real(tmp_path / "flat-flat.vmdk")]
    out = tmp_path / "out.raw"
    cli.run("restore", "flat", "--to", out)
    assert sha256_file(out) == sha256_file(raw)


def test_local_names_are_never_protocols(cli: Cli, tmp_path: Path) -> None:
    """A relative image name with a colon ('nbd:…') is a file here, not a qemu protocol."""
    raw = make_sparse_image(tmp_path / "src.raw", 1 * MiB, [(0, b"colon" * 1000)])
    convert(raw, tmp_path / "nbd:disk.qcow2", "qcow2")
    doc = cli.run("backup", "nbd:disk.qcow2", "--vm", "colon", "--json", cwd=tmp_path).json()
    assert doc["disks"][0]["files_read"] == [real(tmp_path / "nbd:disk.qcow2")]
    assert restored(cli, "colon", tmp_path) == raw.read_bytes()


# qemu-img can create these; qemu's probe and ours must agree (an image type vmrecover does not back
# up must be refused, never backed up as raw)
PROBE_CASES = {
    "raw": ("raw", []),
    "qcow2": ("qcow2", []),
    "qcow": ("qcow", []),
    "qed": ("qed", []),
    "vdi": ("vdi", []),
    "vmdk-sparse": ("vmdk", []),
    "vmdk-flat": ("vmdk", ["-o", "subformat=monolithicFlat"]),
    "vmdk-stream": ("vmdk", ["-o", "subformat=streamOptimized"]),
    "vmdk-2g-sparse": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    "vpc": ("vpc", []),
    "vhdx": ("vhdx", []),
    "parallels": ("parallels", []),
}


def test_probe_agrees_with_qemu(tmp_path: Path) -> None:
    for case, (fmt, opts) in PROBE_CASES.items():
        img = tmp_path / f"{case}.img"
        qemu_img("create", "-q", "-f", fmt, *opts, img, "4M")
        info = json.loads(
            subprocess.run(["qemu-img", "info", "--output=json", img], capture_output=True).stdout
        )
        with open(img, "rb") as f:
            assert qemu.probe_format(f.read(qemu.PROBE_BYTES), img.name) == info["format"], case
    luks = tmp_path / "x.luks"
    secret_obj, opts = "secret,id=s,data=pw", "key-secret=s,iter-time=10"
    create = ["qemu-img", "create", "-q", "--object", secret_obj, "-f", "luks", "-o", opts, str(luks), "4M"]
    # qemu times its PBKDF with the thread's CPU clock; on a kernel with tick-based accounting a
    # short first round can measure 0 ms, and qemu then gives up ("Unable to get accurate CPU
    # usage"). That is qemu's benchmark, not the probe under test: try again.
    for _ in range(5):
        proc = subprocess.run(create, capture_output=True, text=True)
        if "accurate CPU usage" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr
    assert qemu.probe_format(luks.read_bytes()[: qemu.PROBE_BYTES], luks.name) == "luks"


def test_block_device_with_an_explicit_format(cli: Cli, tmp_path: Path) -> None:
    """A qcow2 on a block device is read as qcow2 when --format says so (it was read as raw)."""
    raw = make_sparse_image(tmp_path / "src.raw", 2 * MiB, [(MiB, random.Random(7).randbytes(70_000))])
    q = convert(raw, tmp_path / "d.qcow2", "qcow2")
    with loop_device(q) as dev:
        doc = cli.json("backup", dev, "--vm", "lv", "--format", "qcow2", "--untrusted")
        assert doc["disks"][0]["files_read"] == [dev] and doc["disks"][0]["size"] == 2 * MiB
    assert restored(cli, "lv", tmp_path) == raw.read_bytes()


# --------------------------------------------------------------------------- restore outputs
def victim_state(p: Path) -> tuple[str, int, int]:
    st = p.stat()
    return sha256_file(p), st.st_size, st.st_mtime_ns


@pytest.fixture
def backed_up(cli: Cli, tmp_path: Path) -> Path:
    img = make_sparse_image(tmp_path / "d.raw", 2 * MiB, [(0, random.Random(8).randbytes(300_000))])
    cli.run("backup", img, "--vm", "v")
    return img


@pytest.mark.parametrize(
    "how", ["restore raw", "restore qcow2", "restore vmdk", "migrate raw", "migrate qcow2"]
)
def test_planted_symlinks_are_never_followed(cli: Cli, tmp_path: Path, backed_up: Path, how: str) -> None:
    """A symlink planted at the partial name (as in a shared folder) and one at the destination: the
    restore (and recover migrate, the same code) writes neither through, the file they point to is
    unchanged, and the output is a new file with the right bytes."""
    command, fmt = how.split()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious " * 10_000)
    before = victim_state(victim)
    out = tmp_path / f"out.{fmt}"
    out.with_name(out.name + ".vmrecover-partial").symlink_to(victim)
    if command == "restore":
        cli.run("restore", "v", "--to", out, "--format", fmt)
    else:
        cli.run("recover", "start", "v", "--name", "s")
        cli.run("recover", "migrate", "s", "--to", out, "--format", fmt)
    assert victim_state(victim) == before
    assert not out.is_symlink() and guest_sha256(out) == sha256_file(backed_up)
    if fmt == "vmdk":  # written under its final name, which the vmdk records
        assert f'SPARSE "{out.name}"'.encode() in out.read_bytes()[:4096]
    assert [p.name for p in tmp_path.glob("*.vmrecover-partial")] == []

    # a symlink at the destination itself: "already exists" (even dangling); replaced with --overwrite
    out.unlink()
    out.symlink_to(tmp_path / "nowhere")
    res = cli.run("restore", "v", "--to", out, "--format", fmt, check=False)
    assert_clean_error(res, BAD_INPUT, "already exists")
    out.unlink()
    out.symlink_to(victim)
    cli.run("restore", "v", "--to", out, "--format", fmt, "--overwrite")
    assert victim_state(victim) == before and not out.is_symlink()


def test_symlink_reappearing_after_the_stale_partial_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the stale partial name is removed, and a symlink is planted again before the new one
    is made.  The restore fails (exit 6) instead of following it."""
    from vmrecover import restore
    from vmrecover.errors import BadInput
    from vmrecover.repo.index import FixedIndex

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "out.raw"
    partial = tmp_path / "out.raw.vmrecover-partial"
    partial.symlink_to(victim)
    remove = restore._remove_stale

    def remove_then_plant(folder: Path) -> None:
        remove(folder)
        folder.symlink_to(victim)  # the attacker wins the race

    monkeypatch.setattr(restore, "_remove_stale", remove_then_plant)
    index = FixedIndex.empty(MiB, 64 * 1024)
    chunks = iter([(0, 0, b"x" * 65536)])
    with pytest.raises(BadInput, match="put a file there"):
        restore.write_image(chunks, index, dest, fmt="raw", overwrite=False, what="test")
    assert victim.read_bytes() == b"precious" and not dest.exists()


def test_block_device_destinations(cli: Cli, tmp_path: Path, backed_up: Path) -> None:
    """A block device is written through a symlink owned by root (as in /dev/disk/by-id), not
    through one someone else planted, and not while a filesystem on it is mounted."""
    target = tmp_path / "device-backing"
    target.write_bytes(b"\xee" * (4 * MiB))
    with loop_device(target) as dev:
        planted = tmp_path / "shared" / "out.raw"
        planted.parent.mkdir()
        planted.symlink_to(dev)
        os.lchown(planted, 65534, 65534)  # nobody's symlink
        before = sha256_file(target)
        res = cli.run("restore", "v", "--to", planted, check=False)
        assert_clean_error(res, BAD_INPUT, "symlink owned by uid 65534", str(planted))
        assert sha256_file(target) == before

        by_id = tmp_path / "by-id-link"
        by_id.symlink_to(dev)  # ours (root's)
        cli.run("restore", "v", "--to", by_id)
        data = target.read_bytes()
        assert data[: 2 * MiB] == backed_up.read_bytes() and data[2 * MiB :] == b"\xee" * (2 * MiB)

        subprocess.run(["mkfs.ext4", "-q", dev], check=True)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        subprocess.run(["mount", dev, mnt], check=True)
        try:
            res = cli.run("restore", "v", "--to", dev, check=False)
            assert_clean_error(res, BAD_INPUT, "in use", dev)
        finally:
            subprocess.run(["umount", mnt], check=True)
        subprocess.run(["fsck.ext4", "-n", dev], check=True, capture_output=True)  # untouched
