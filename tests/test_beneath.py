"""vmrecover.beneath: no operation on a name below the top folder reaches anything outside it."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from tests.conftest import watching
from vmrecover.beneath import Beneath, safe_mode


@pytest.fixture
def jail(tmp_path: Path) -> tuple[Beneath, Path]:
    top = tmp_path / "top"
    top.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious host data")
    os.chmod(outside / "victim", 0o600)
    (top / "dir").mkdir()
    (top / "link").symlink_to(outside / "victim")
    (top / "dirlink").symlink_to(outside)
    return Beneath(top), outside


def _victim_intact(outside: Path) -> None:
    v = outside / "victim"
    assert v.read_bytes() == b"precious host data"
    assert stat.S_IMODE(v.stat().st_mode) == 0o600
    assert sorted(os.listdir(outside)) == ["victim"]


@pytest.mark.parametrize(
    "op",
    [
        lambda b: b.truncate("link", 0),
        lambda b: b.open("link", os.O_WRONLY),
        lambda b: b.open("link", os.O_RDONLY),
        lambda b: b.truncate("dirlink/victim", 0),
        lambda b: b.open("dirlink/victim", os.O_RDWR),
        lambda b: b.chmod("dirlink/victim", 0o777),
        lambda b: b.chown("dirlink/victim", 1234, 1234),
        lambda b: b.utime("dirlink/victim", (0, 0)),
        lambda b: b.create("dirlink/new", 0o644),
        lambda b: b.mkdir("dirlink/newdir", 0o755),
        lambda b: b.symlink("/etc/passwd", "dirlink/newlink"),
        lambda b: b.unlink("dirlink/victim"),
        lambda b: b.rename("dirlink/victim", "stolen"),
        lambda b: b.rename("dir", "dirlink/moved"),
        lambda b: b.listdir("dirlink"),
        lambda b: b.lstat("dirlink/victim"),
        lambda b: b.readlink("dirlink/victim"),
        lambda b: b.truncate("../outside/victim", 0),
        lambda b: b.open("/etc/passwd", os.O_RDONLY),
        lambda b: b.exchange("dir", "dirlink/victim"),
        lambda b: b.rename_noreplace("dirlink/victim", "stolen"),
        lambda b: b.link("dirlink/victim", "hard"),
        lambda b: b.link("dir", "dirlink/hard"),
        lambda b: b.lexists("dirlink/victim"),
    ],
)
def test_no_operation_follows_a_symlink_or_climbs_out(jail: tuple[Beneath, Path], op) -> None:
    b, outside = jail
    with pytest.raises(OSError) as exc:
        op(b)
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.EINVAL), exc.value
    _victim_intact(outside)


def test_symlink_itself_is_what_changes(jail: tuple[Beneath, Path]) -> None:
    b, outside = jail
    b.chmod("link", 0o777)  # a symlink has no mode of its own: left as it is, the target untouched
    b.chown("link", os.getuid(), os.getgid())
    b.utime("link", (10**9, 10**9))
    assert os.lstat(b.top / "link").st_mtime == 1
    b.rename("link", "dir/moved-link")
    assert os.readlink(b.top / "dir" / "moved-link") == str(outside / "victim")
    b.unlink("dir/moved-link")
    _victim_intact(outside)


def test_regular_operations_work(jail: tuple[Beneath, Path]) -> None:
    b, _ = jail
    b.mkdir("dir/sub", 0o755)
    b.create("dir/sub/f", 0o4755)
    fd = b.open("dir/sub/f", os.O_RDWR)
    try:
        os.pwrite(fd, b"hello", 0)
    finally:
        os.close(fd)
    b.truncate("dir/sub/f", 2)
    b.chmod("dir/sub/f", safe_mode(0o6755))
    assert stat.S_IMODE(b.lstat("dir/sub/f").st_mode) == 0o755
    assert (b.top / "dir/sub/f").read_bytes() == b"he"
    assert [n for n, _ in b.listdir("dir/sub")] == ["f"]
    assert sorted(rel for rel, _ in b.walk()) == ["dir", "dir/sub", "dir/sub/f", "dirlink", "link"]
    b.rename("dir/sub/f", "g")
    b.unlink("g")
    b.rmdir("dir/sub")


def test_special_files_are_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    b = Beneath(tmp_path)
    done = threading.Event()

    def attempt() -> None:
        with pytest.raises(OSError) as exc:
            b.open("fifo", os.O_WRONLY)  # opening a fifo for writing would block without a reader
        assert exc.value.errno == errno.EINVAL
        done.set()

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(5)
    assert done.is_set()


def test_folder_swapped_for_a_symlink_mid_walk_cannot_redirect(tmp_path: Path) -> None:
    """A folder replaced by a symlink between two operations: the next walk refuses the symlink."""
    top = tmp_path / "top"
    (top / "d").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(b"x")
    b = Beneath(top)
    (top / "d" / "f").write_bytes(b"inside")
    with b.dir("d") as fd:  # a use already under way keeps the folder it opened
        os.rename(top / "d", top / "d-old")
        (top / "d").symlink_to(outside)
        assert os.stat("f", dir_fd=fd, follow_symlinks=False).st_size == len(b"inside")
    with pytest.raises(OSError) as exc:
        b.truncate("d/f", 0)
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert (outside / "f").read_bytes() == b"x"


def test_exchange_swaps_any_types_and_noreplace_refuses(jail: tuple[Beneath, Path]) -> None:
    b, outside = jail
    (b.top / "dir" / "inner").write_bytes(b"in the folder")
    b.create("file", 0o644)
    b.exchange("dir", "file")  # a folder and a file trade places in one step
    assert (b.top / "file" / "inner").read_bytes() == b"in the folder"
    assert (b.top / "dir").is_file()
    b.exchange("link", "dir")  # a symlink moves as itself, its target untouched
    assert os.readlink(b.top / "dir") == str(outside / "victim")
    with pytest.raises(FileExistsError):
        b.rename_noreplace("link", "file")
    with pytest.raises(FileNotFoundError):
        b.exchange("link", "missing")
    b.rename_noreplace("link", "new-name")
    assert b.lexists("new-name") and not b.lexists("link")
    _victim_intact(outside)


def test_link_acts_on_the_name_not_its_target(jail: tuple[Beneath, Path]) -> None:
    b, outside = jail
    b.link("link", "dir/hard-to-symlink")  # a hard link to the symlink itself
    assert os.readlink(b.top / "dir" / "hard-to-symlink") == str(outside / "victim")
    assert os.lstat(b.top / "dir" / "hard-to-symlink").st_ino == os.lstat(b.top / "link").st_ino
    b.create("dir/f", 0o644)
    b.link("dir/f", "f-again")
    assert os.stat(b.top / "f-again").st_nlink == 2
    _victim_intact(outside)


def test_renameat2_reports_an_unsupported_flag(tmp_path: Path) -> None:
    """EINVAL (not a silent plain rename) for flags the kernel or filesystem does not know."""
    from vmrecover.beneath import renameat2

    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as exc:
            renameat2(fd, "a", fd, "b", 1 << 30)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert (tmp_path / "b").read_bytes() == b"b"


def test_walk_never_opens_what_a_symlink_points_at(tmp_path: Path) -> None:
    """The walk classifies entries by their own lstat and descends only into real folders, opened with
    O_NOFOLLOW: a symlink to a host folder (which a client could swap for a fifo or device in the
    instant between a check and an open) is listed, never opened.  os.fwalk opens it."""
    top = tmp_path / "top"
    (top / "a" / "deep").mkdir(parents=True)
    (top / "a" / "deep" / "f").write_bytes(b"x")
    host = tmp_path / "host"
    host.mkdir()
    os.mkfifo(host / "fifo")
    (top / "a" / "z").symlink_to(host)
    (top / "fifo-link").symlink_to(host / "fifo")
    with watching([host]) as w:
        got = dict(Beneath(top).walk())
        assert w.opened() == []
    assert sorted(got) == ["a", "a/deep", "a/deep/f", "a/z", "fifo-link"]
    assert stat.S_ISLNK(got["a/z"].st_mode) and stat.S_ISREG(got["a/deep/f"].st_mode)
