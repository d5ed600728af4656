"""SIGTERM and ^C at the instants around a catalog commit never delete what the catalog lists.

The signal is delivered by the process itself at a named moment (vmrecover.faults), so every window
is hit exactly, not by luck: before the commit, inside the transaction (rows written, no COMMIT yet)
and right after COMMIT returned (before the code that cleans up after failures learns of it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Cli, random_image, sha256_file
from vmrecover.errors import ExitCode
from vmrecover.faults import ENV

MiB = 1 << 20
SIGNALS = ["SIGTERM", "SIGINT"]


def _faulty(cli: Cli, spec: str) -> Cli:
    return Cli(cli.repo, env={ENV: spec})


def _points(cli: Cli, vm: str) -> list[str]:
    res = cli.run("list", vm, "--json", check=False)
    return [p["id"] for p in res.json()["points"]] if res.returncode == 0 else []


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("moment", ["backup.before-commit", "backup.in-commit", "backup.after-commit"])
def test_interrupted_backup_keeps_every_listed_point_whole(
    cli: Cli, tmp_path: Path, moment: str, sig: str
) -> None:
    base = random_image(tmp_path / "base.raw", 2 * MiB, seed=1)
    cli.run("backup", base, "--vm", "v")
    img = random_image(tmp_path / "new.raw", 2 * MiB, seed=2, density=0.9)
    res = _faulty(cli, f"{moment}={sig}").run("backup", img, "--vm", "v", check=False)
    assert res.returncode == ExitCode.INTERRUPTED, res.stderr
    assert "Traceback" not in res.stderr
    points = _points(cli, "v")
    if moment == "backup.after-commit":
        assert len(points) == 2, "the COMMIT happened: the point must be listed"
        assert "was committed: kept" in res.stderr
    else:
        assert len(points) == 1, "no COMMIT: no point"
    cli.run("gc")  # removes exactly what no listed point uses
    assert cli.run("verify", check=False).returncode == 0
    for point, source in zip(points, [base, img], strict=False):
        out = tmp_path / f"{point}.raw"
        cli.run("restore", f"v@{point}", "--to", out)
        assert sha256_file(out) == sha256_file(source)
    # nothing of the interrupted run is left once gc ran: no index folder, no chunk, no temp file
    assert sorted(p.name for p in (cli.repo / "indexes").iterdir()) == sorted(points)


@pytest.mark.parametrize("sig", SIGNALS)
@pytest.mark.parametrize("moment", ["session.in-commit", "session.after-commit"])
def test_interrupted_recover_start_keeps_a_listed_session_whole(
    cli: Cli, tmp_path: Path, moment: str, sig: str
) -> None:
    cli.run("backup", random_image(tmp_path / "d.raw", 2 * MiB, seed=3), "--vm", "v")
    res = _faulty(cli, f"{moment}={sig}").run("recover", "start", "v", "--name", "s1", check=False)
    assert res.returncode == ExitCode.INTERRUPTED, res.stderr
    assert "Traceback" not in res.stderr
    listed = cli.json("recover", "list")
    folders = sorted(os.listdir(cli.repo / "sessions"))
    if moment == "session.after-commit":
        assert [s["name"] for s in listed] == ["s1"]
        assert folders == [listed[0]["id"]]
        assert sorted(os.listdir(cli.repo / "sessions" / folders[0] / "disks")) == ["d.delta"]
        cli.run("gc")
        assert sorted(os.listdir(cli.repo / "sessions")) == folders  # gc keeps a live session's folder
        cli.run("recover", "migrate", "s1", "--to", tmp_path / "m.raw", "--format", "raw")
        assert sha256_file(tmp_path / "m.raw") == sha256_file(tmp_path / "d.raw")
    else:
        assert listed == [] and folders == []


def test_prune_keeps_a_point_whose_session_started_after_it_looked(cli: Cli, tmp_path: Path) -> None:
    """A session starts on a point between prune's look at the sessions and its delete: the point is
    kept (no foreign-key traceback, no session left without its point)."""
    from vmrecover.recovery import sessions
    from vmrecover.repo.prune import Policy, prune
    from vmrecover.repo.repository import Repository

    cli.run("backup", random_image(tmp_path / "a.raw", 1 * MiB, seed=5), "--vm", "v")
    cli.run("backup", random_image(tmp_path / "b.raw", 1 * MiB, seed=6), "--vm", "v")
    with Repository.open(cli.repo) as repo:
        old = repo.catalog.points("v")[0]
        real_sessions = repo.catalog.sessions

        def sessions_then_start() -> list:  # prune looks, then a session starts on the old point
            seen = real_sessions()
            with Repository.open(cli.repo) as other:
                sessions.start(other, old, "late")
            return seen

        repo.catalog.sessions = sessions_then_start  # type: ignore[method-assign]
        removed = prune(repo, Policy(last=1), vm="v")
    assert removed == {"v": []}
    assert [s["name"] for s in cli.json("recover", "list")] == ["late"]
    assert len(_points(cli, "v")) == 2 and cli.run("verify", check=False).returncode == 0
