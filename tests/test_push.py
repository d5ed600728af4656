"""Push ingest's core (ingest/push.py feeding a PointWriter): full and incremental sparse streams commit
exactly like a local backup; a cut stream, a stream longer than declared and malformed headers leave
nothing behind.  The HTTP endpoints that carry these streams are tested with the API."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from tests.conftest import Cli, sha256_file
from tests.testkit.vmdisks import disk_image, restored_sha
from vmrecover.ingest import push
from vmrecover.ingest.pipeline import DiskJob, PointWriter
from vmrecover.repo.repository import Repository

MiB = 1 << 20


def _ingest(cli: Cli, vm: str, disk: str, body: io.BufferedIOBase) -> str:
    """What the API does with one upload: header, source, PointWriter, finish, commit."""
    with Repository.open(cli.repo) as repo, repo.backing_up(vm), PointWriter(repo, vm) as w:
        d = push.read_header(body.read)
        base = push.parent_reader(repo, w.parent.id, disk) if d.changed and w.parent else None
        src = push.StreamSource(disk, d.size, d.extents, body.read, base=base)
        w.add(DiskJob(disk, src, d.extents if d.changed else None))
        src.finish()
        return w.commit(config={"source": "push"}).id


def _state(cli: Cli) -> tuple[list[str], int]:
    chunks = sum(1 for f in (cli.repo / "chunks").rglob("*") if f.is_file())
    return sorted(os.listdir(cli.repo / "indexes")), chunks


def test_full_then_incremental_streams_commit_like_a_local_backup(cli: Cli, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "d.raw", 8 * MiB, seed=31)
    body = io.BytesIO(b"".join(push.encode(str(img))))
    first = _ingest(cli, "pushed", "xvda", body)
    assert restored_sha(cli, f"pushed@{first}", "xvda", tmp_path) == sha256_file(img)
    data = sum(n for _, n in push.read_header(io.BytesIO(body.getvalue()).read).extents)
    assert 0 < data < 8 * MiB  # only the data crossed: holes are not sent

    with open(img, "r+b") as f:  # the guest writes; the agent sends only what changed
        for off in (4096, 5 * MiB + 100):
            f.seek(off)
            f.write(b"changed by the guest" * 10)
    changed = [(4096, 200), (5 * MiB + 100, 200)]
    body = io.BytesIO(b"".join(push.encode(str(img), changed=changed)))
    second = _ingest(cli, "pushed", "xvda", body)
    points = {p["id"]: p for p in cli.json("list", "pushed")["points"]}
    assert points[second]["kind"] == "incremental" and points[second]["stats"]["bytes_read"] <= 2 * 64 * 1024
    assert restored_sha(cli, f"pushed@{second}", "xvda", tmp_path) == sha256_file(img)
    assert cli.run("verify", check=False).returncode == 0


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_cut_stream_leaves_nothing(cli: Cli, tmp_path: Path, cut: str) -> None:
    img = disk_image(tmp_path / "d.raw", 8 * MiB, seed=32)
    whole = b"".join(push.encode(str(img)))
    head_len = whole.index(b"\n") + 1
    before = _state(cli)
    half = (len(whole) - head_len) // 2
    body = io.BytesIO(whole[: head_len // 2] if cut == "header" else whole[: head_len + half])
    with pytest.raises(push.StreamError, match="ended" if cut == "header" else "a cut upload"):
        _ingest(cli, "cut", "xvda", body)
    assert _state(cli) == before and cli.json("list")["vms"] == []


def test_a_stream_longer_than_declared_is_refused_and_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "d.raw", 4 * MiB, seed=33)
    before = _state(cli)
    body = io.BytesIO(b"".join(push.encode(str(img))) + b"one byte too many and more")
    with pytest.raises(push.StreamError, match="holds more than"):
        _ingest(cli, "long", "xvda", body)
    assert _state(cli) == before and cli.json("list")["vms"] == []


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"not json\n", "not JSON"),
        (b'{"format": "qcow2", "version": 1}\n', "is not"),
        (b'{"format": "vmrecover-sparse", "version": 1, "size": -1, "extents": []}\n', "positive"),
        (b'{"format": "vmrecover-sparse", "version": 1, "size": 4096, "extents": [[0, 8192]]}\n', "within"),
        (b'{"format": "vmrecover-sparse", "version": 1, "size": 8192, "extents": [[4096, 10], [0, 10]]}\n',
         "ascending"),
        (b'{"format": "vmrecover-sparse", "version": 1, "size": 8192, "extents": [[0, true]]}\n', "within"),
    ],
)  # fmt: skip
def test_malformed_headers_are_refused(head: bytes, why: str) -> None:
    with pytest.raises(push.StreamError, match=why):
        push.read_header(io.BytesIO(head).read)


def test_a_header_line_without_end_is_bounded() -> None:
    endless = io.BytesIO(b"{" + b" " * (push.HEADER_MAX + 10))
    with pytest.raises(push.StreamError, match="longer than"):
        push.read_header(endless.read)


def test_encode_declares_what_it_sends(tmp_path: Path) -> None:
    img = disk_image(tmp_path / "d.raw", 4 * MiB, seed=34)
    parts = list(push.encode(str(img)))
    head = json.loads(parts[0])
    assert head["size"] == 4 * MiB and sum(len(p) for p in parts[1:]) == sum(n for _, n in head["extents"])
