"""prune and gc run while datastores serve (FUSE and NFS at once) and sessions run: what is listed keeps
reading, a point pruned under a reader says so (stale handle, not damage), and gc never takes the
folder of a session that is being started."""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests import nfsclient as nc
from tests.conftest import Cli, Mounted, random_image, sha256_file
from vmrecover.faults import ENV

MiB = 1 << 20
CHUNK = 64 * 1024


def _points(cli: Cli, vm: str) -> list[str]:
    return [p["id"] for p in sorted(cli.json("list", vm)["points"], key=lambda p: p["created"])]


def test_gc_while_fuse_and_nfs_serve(cli: Cli, mounted: Mounted, nfs_server, tmp_path: Path) -> None:
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    old.write_bytes(random.Random(1).randbytes(4 * MiB))  # no chunk in common
    new.write_bytes(random.Random(2).randbytes(4 * MiB))
    cli.run("backup", old, "--vm", "v")
    cli.run("backup", new, "--vm", "v")
    first, second = _points(cli, "v")
    cli.run("recover", "start", f"v@{second}", "--name", "s1")
    srv = nfs_server()
    old_file = mounted.point_dir("v", first) / "old.raw"
    with nc.NfsClient(srv.port) as c, open(old_file, "rb") as held:
        nfs_old = c.walk(c.root(), f"vms/v/{first}/old.raw")
        assert held.read(CHUNK) == old.read_bytes()[:CHUNK]  # the reader is under way
        assert c.read(nfs_old, 0, 4096)[0] == nc.OK

        cli.run("prune", "--vm", "v", "--keep-last", "1")
        doc = cli.json("gc")  # readers no longer block gc
        assert doc["removed_chunks"] == 4 * MiB // CHUNK, doc

        time.sleep(1.5)  # both servers notice catalog changes within a second
        assert c.getattr(nfs_old)[0] == nc.STALE  # no attributes kept of a pruned point's file
        with pytest.raises(FileNotFoundError):  # the kernel no longer holds its folder's entry
            os.stat(old_file)
        held.seek(2 * MiB)
        with pytest.raises(OSError) as exc:
            held.read(CHUNK)
        assert exc.value.errno == errno.ESTALE
        status, _, _ = c.read(nfs_old, 2 * MiB, 4096)
        assert status == nc.STALE
        assert first not in os.listdir(mounted.path / "vms" / "v")
        assert first not in [n for n, _, _ in c.readdir(c.walk(c.root(), "vms/v"))[1]]

        # what is listed reads on, byte for byte, on both front ends; the session too
        assert sha256_file(mounted.point_dir("v", second) / "new.raw") == sha256_file(new)
        nfs_new = c.walk(c.root(), f"vms/v/{second}/new.raw")
        assert c.read(nfs_new, MiB, 4096)[1] == new.read_bytes()[MiB : MiB + 4096]
        disk = mounted.session_dir("s1") / "new.raw"
        with open(disk, "r+b") as f:
            f.seek(4096)
            f.write(b"S" * 4096)
        assert disk.read_bytes() == new.read_bytes()[:4096] + b"S" * 4096 + new.read_bytes()[8192:]
    assert cli.run("verify", check=False).returncode == 0


def test_gc_never_takes_the_folder_of_a_session_being_started(cli: Cli, tmp_path: Path) -> None:
    """`recover start` is stopped (SIGSTOP) after creating its folder, before its catalog row commits:
    gc waits for it, then leaves session folders for the next run instead of removing that one; the
    session then starts and works."""
    img = random_image(tmp_path / "d.raw", 2 * MiB, seed=3)
    cli.run("backup", img, "--vm", "v")
    starter = Cli(cli.repo, env={ENV: "session.in-commit=SIGSTOP"}).popen(
        "recover", "start", "v", "--name", "s1"
    )
    try:
        deadline = time.monotonic() + 60
        while Path(f"/proc/{starter.pid}/stat").read_text().split(")")[1].split()[0] != "T":
            assert time.monotonic() < deadline and starter.poll() is None, "recover start did not stop"
            time.sleep(0.01)
        (folder,) = os.listdir(cli.repo / "sessions")
        (cli.repo / "sessions" / "leftover").mkdir()  # what a crash leaves: a folder no session names
        res = cli.run("gc")
        assert "left for the next gc" in res.stdout
        assert sorted(os.listdir(cli.repo / "sessions")) == sorted([folder, "leftover"])
    finally:
        os.kill(starter.pid, signal.SIGCONT)
        _, err = starter.communicate(timeout=60)
    assert starter.returncode == 0, err
    assert cli.json("gc")["removed_session_dirs"] == 1  # the leftover only
    assert os.listdir(cli.repo / "sessions") == [folder]
    cli.run("recover", "migrate", "s1", "--to", tmp_path / "m.raw", "--format", "raw")
    assert sha256_file(tmp_path / "m.raw") == sha256_file(img)
