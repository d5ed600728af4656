"""The repository is private: folders 0700, files 0600, whatever the caller's umask (repo.toml holds
the wrapped keys; the catalog and chunks hold every backup)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.conftest import Cli, Mounted, random_image
from vmrecover.repo.repository import Repository

MiB = 1 << 20


def _loose(root: Path) -> list[str]:
    """Everything under *root* (and root) that another user could read, write or enter.  Files a
    hypervisor creates in a session keep the modes it gives them (it sees them): the repository's own
    0700 folders keep them private."""
    out = []
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        parts = p.relative_to(root).parts
        in_upper = parts[:1] == ("sessions",) and parts[2:3] == ("upper",) and len(parts) > 3
        if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode) or in_upper:
            continue
        if st.st_mode & 0o077:
            out.append(f"{p.relative_to(root.parent)} {stat.filemode(st.st_mode)}")
    return out


def test_everything_the_cli_writes_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the CLI sets its own umask; a loose one in the caller changes nothing
    try:
        cli = Cli(tmp_path / "repo")
        cli.run("init", "--chunk-size", "64K")
        cli.run("backup", random_image(tmp_path / "d.raw", 2 * MiB, seed=1), "--vm", "v")
        cli.run("recover", "start", "v", "--name", "s1")
        cli.run("restore", "v", "--to", tmp_path / "out.raw")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cli.run("mount", mnt)
        try:
            Mounted(cli, mnt).session_dir("s1").joinpath("hyp.log").write_text("created by a client")
            assert _loose(cli.repo) == []
        finally:
            cli.run("umount", mnt)
        assert stat.S_IMODE(os.stat(tmp_path / "out.raw").st_mode) == 0o600
        assert _loose(cli.repo) == []
    finally:
        os.umask(old)


def test_library_writes_private_files_and_tightens_an_old_repository(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        root = tmp_path / "repo"
        root.mkdir(mode=0o755)  # an empty folder made by the user
        Repository.init(root).close()
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        for name in ("repo.toml", "catalog.sqlite"):
            assert stat.S_IMODE((root / name).stat().st_mode) == 0o600, name
        os.chmod(root, 0o755)  # as an older vmrecover left it
        Repository.open(root).close()
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
    finally:
        os.umask(old)
