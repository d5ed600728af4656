"""Push ingest's core (ingest/push.py feeding a PointWriter): full and incremental sparse streams commit
exactly like a local backup; a cut stream, a stream longer than declared and malformed headers leave
nothing behind.  The HTTP endpoints that carry these streams are tested with the API."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# --------------------------------------------------------------------------- over the HTTP API
from tests.test_service_api import Api, assert_error, serving_api  # noqa: E402


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serving_api(tmp_path_factory.mktemp("push-api")) as a:
        yield a


def _disk_put(api: Api, path: str, body: bytes, kind: str, token: str = "ops") -> Any:
    # a refusal may come before the body is read, and the server then closes the connection: never
    # reuse one for the next request
    return api.call("PUT", path, raw=body, token=token, headers={"Content-Type": kind, "Connection": "close"})


def test_one_disk_pushed_is_one_point_and_an_incremental_follows(api: Api, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "p.raw", 6 * MiB, seed=41)
    r = _disk_put(api, "/api/v1/vms/pushed1/disks/xvda", img.read_bytes(), push.RAW)
    assert r.status == 201, r.data
    doc = r.json()
    assert doc["vm"] == "pushed1" and doc["kind"] == "full" and doc["disks"][0]["name"] == "xvda"
    assert restored_sha(api.cli, f"pushed1@{doc['point']}", "xvda", tmp_path) == sha256_file(img)
    with open(img, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"new bytes" * 100)
    body = b"".join(push.encode(str(img), changed=[(3 * MiB, 900)]))
    r = _disk_put(api, "/api/v1/vms/pushed1/disks/xvda", body, push.SPARSE)
    assert r.status == 201 and r.json()["kind"] == "incremental", r.data
    assert restored_sha(api.cli, "pushed1", "xvda", tmp_path) == sha256_file(img)
    points = api.cli.json("list", "pushed1")["points"]
    assert points[-1]["config"]["platform"] == "push" and points[-1]["config"]["token"] == "ops"


def test_a_point_of_two_disks_commits_once_and_a_dropped_one_leaves_nothing(api: Api, tmp_path: Path) -> None:
    a = disk_image(tmp_path / "a.raw", 4 * MiB, seed=42)
    b = disk_image(tmp_path / "b.raw", 2 * MiB, seed=43)
    r = api.call("POST", "/api/v1/vms/pushed2/uploads", body={})
    assert r.status == 201, r.data
    up = r.json()["upload"]
    r2 = api.call("POST", "/api/v1/vms/pushed2/uploads", body={})  # one upload per VM at a time
    assert_error(r2, 409, "Busy", "backup of pushed2")
    assert (
        _disk_put(api, f"/api/v1/uploads/{up}/disks/xvda", b"".join(push.encode(str(a))), push.SPARSE).status
        == 200
    )
    assert "pushed2" not in str(api.cli.json("list"))  # nothing visible before the commit
    assert _disk_put(api, f"/api/v1/uploads/{up}/disks/xvdb", b.read_bytes(), push.RAW).status == 200
    r = api.call("POST", f"/api/v1/uploads/{up}/commit")
    assert r.status == 201 and [d["name"] for d in r.json()["disks"]] == ["xvda", "xvdb"], r.data
    assert restored_sha(api.cli, "pushed2", "xvda", tmp_path) == sha256_file(a)
    assert restored_sha(api.cli, "pushed2", "xvdb", tmp_path) == sha256_file(b)

    before = sorted(os.listdir(api.cli.repo / "indexes"))
    up = api.call("POST", "/api/v1/vms/pushed2/uploads", body={}).json()["upload"]
    assert _disk_put(api, f"/api/v1/uploads/{up}/disks/xvda", a.read_bytes(), push.RAW).status == 200
    assert api.call("DELETE", f"/api/v1/uploads/{up}").status == 200
    assert sorted(os.listdir(api.cli.repo / "indexes")) == before
    assert len(api.cli.json("list", "pushed2")["points"]) == 1
    assert_error(api.call("POST", f"/api/v1/uploads/{up}/commit"), 404, "NotFound", "no open upload")


def test_a_cut_or_overlong_push_leaves_nothing(api: Api, tmp_path: Path) -> None:
    import socket
    import ssl

    img = disk_image(tmp_path / "c.raw", 4 * MiB, seed=44)
    before = sorted(os.listdir(api.cli.repo / "indexes"))
    # longer than declared: the sparse header says less than the body holds
    body = b"".join(push.encode(str(img))) + b"and more"
    assert_error(
        _disk_put(api, "/api/v1/vms/pushed3/disks/xvda", body, push.SPARSE), 400, "StreamError", "more than"
    )
    # cut: half the body, then the connection closes
    ctx = ssl.create_default_context(cafile=str(api.cert))
    with (
        socket.create_connection(("127.0.0.1", api.port)) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        head = (f"PUT /api/v1/vms/pushed3/disks/xvda HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {api.tokens['ops']}\r\nContent-Type: {push.RAW}\r\n"
                f"Content-Length: {4 * MiB}\r\n\r\n")  # fmt: skip
        s.sendall(head.encode() + img.read_bytes()[: 2 * MiB])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sorted(os.listdir(api.cli.repo / "indexes")) != before:
        time.sleep(0.1)
    assert sorted(os.listdir(api.cli.repo / "indexes")) == before
    assert "pushed3" not in str(api.cli.json("list"))


def test_bad_pushes_are_refused(api: Api, tmp_path: Path) -> None:
    img = disk_image(tmp_path / "d.raw", 1 * MiB, seed=45)
    small = b"x" * 4096  # refused before the body is read: a big one would meet a closed connection
    assert _disk_put(api, "/api/v1/vms/pushed4/disks/xvda", small, push.RAW, token="viewer").status == 403
    assert_error(
        _disk_put(api, "/api/v1/vms/pushed4/disks/xvda", b"x", "text/plain"),
        400,
        "BadInput",
        "not a disk stream",
    )
    assert_error(_disk_put(api, "/api/v1/vms/pushed4/disks/..", small, push.RAW), 400, "BadInput")
    assert_error(_disk_put(api, "/api/v1/vms/.hidden/disks/xvda", small, push.RAW), 400, "BadInput")
    inc = b"".join(push.encode(str(img), changed=[(0, 100)]))
    assert_error(
        _disk_put(api, "/api/v1/vms/pushed4/disks/xvda", inc, push.SPARSE), 400, "BadInput", "earlier point"
    )
    assert "pushed4" not in str(api.cli.json("list"))
