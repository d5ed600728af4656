"""Copying guest files out, at unit level: the extraction and the swap into place against archives and
destinations no real guest holds.  A stand-in for the libguestfs appliance (FakeImage) serves guest
objects and hostile tar archives, so these run wherever Python does (no appliance needed)."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

# --------------------------------------------------------------------------- copy-out, unit level
# The extraction and the swap into place against archives and destinations no real guest holds: a
# stand-in for the appliance (FakeImage) serves guest objects and hostile tar archives.
OUTSIDE_MODE, OUTSIDE_MTIME = 0o750, 1_000_000_000


class FakeImage:
    """What copy_out needs of a GuestImage: guest path -> (Entry, file bytes or a folder's tar)."""

    what = "fake@0"

    def __init__(self, objects: dict[str, tuple[Any, bytes]]) -> None:
        self.objects = objects

    def resolve(self, path: str) -> str:
        return path

    def stat(self, path: str) -> Any:
        from vmrecover.errors import NotFound

        if path not in self.objects:
            raise NotFound(f"{path} does not exist in {self.what}")
        return self.objects[path][0]

    @staticmethod
    def _write(out: Any, data: bytes) -> None:
        if isinstance(out, int):  # an open descriptor
            os.write(out, data)
        else:  # a host path (copy_out before descriptors): lets these tests run against it too
            Path(out).write_bytes(data)

    def copy_file(self, e: Any, out: Any) -> dict[str, Any]:
        self._write(out, self.objects[e.path][1])
        return {"read": "disk", "fallback": None}

    def tar_out(self, path: str, out: Any) -> None:
        self._write(out, self.objects[path][1])


def _entry(path: str, kind: str, mode: int = 0o644, size: int = 0, target: str | None = None) -> Any:
    from vmrecover.files.guest import Entry

    fmt = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK}[kind]
    return Entry(path, kind, fmt | mode, size, 1_600_000_000 * 10**9, target=target)


def _tar(*members: tuple[str, str, Any, int]) -> bytes:
    """(type, name, data or link target, mode) -> a tar archive, as tar-out would write one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for kind, name, arg, mode in members:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_500_000_000
            if kind == "file":
                info.size = len(arg)
                tf.addfile(info, io.BytesIO(arg))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                         "fifo": tarfile.FIFOTYPE, "chr": tarfile.CHRTYPE}[kind]  # fmt: skip
            info.linkname = arg or ""
            tf.addfile(info)
    return buf.getvalue()


def _folder(path: str, archive: bytes) -> tuple[Any, bytes]:
    return _entry(path, "dir", 0o755), archive


def _file(path: str, data: bytes, mode: int = 0o644) -> tuple[Any, bytes]:
    return _entry(path, "file", mode, len(data)), data


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): an empty destination, and a host folder next to it that nothing may touch."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"host data")
    os.chmod(outside, OUTSIDE_MODE)
    os.utime(outside, (OUTSIDE_MTIME, OUTSIDE_MTIME))
    return dest, outside


def _outside_intact(outside: Path) -> None:
    st = outside.stat()
    assert (stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (OUTSIDE_MODE, OUTSIDE_MTIME)
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_bytes() == b"host data"
    assert stat.S_IMODE((outside / "victim").stat().st_mode) == 0o644


HOSTILE = {
    # a symlink to a host folder, then a folder member of the same name: its mode and mtime would be
    # set on the host folder, and files below it written there
    "folder over a symlink": [("sym", "d", "{outside}", 0o777), ("dir", "d", None, 0o777)],
    "file through a symlink": [("sym", "d", "{outside}", 0o777), ("file", "d/new", b"x", 0o644)],
    "folder through a symlink": [("sym", "d", "{outside}", 0o777), ("dir", "d/sub", None, 0o777)],
    "file over a symlink": [("sym", "v", "{outside}/victim", 0o777), ("file", "v", b"pwned", 0o666)],
    "dot-dot": [("file", "../escape", b"x", 0o644)],
    "dot-dot inside": [("dir", "a", None, 0o755), ("file", "a/../../escape", b"x", 0o644)],
    "absolute": [("file", "/tmp/vmrecover-escape", b"x", 0o644)],
    "hard link out": [("link", "h", "../outside/victim", 0o644)],
    "hard link through a symlink": [("sym", "d", "{outside}", 0o777), ("link", "h", "d/victim", 0o644)],
    "hard link to an absolute path": [("link", "h", "{outside}/victim", 0o644)],
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_archives_change_nothing_outside(host: tuple[Path, Path], case: str) -> None:
    """Whatever a guest's folder archive holds, nothing outside the destination is created or
    changed (modes and times neither), the copy is refused, and the destination is left empty."""
    from vmrecover.errors import BadInput
    from vmrecover.files.copyout import copy_out

    dest, outside = host
    members = [
        (k, n, a.format(outside=outside) if isinstance(a, str) else a, m) for k, n, a, m in HOSTILE[case]
    ]
    img = FakeImage({"/g": _folder("/g", _tar(("dir", ".", None, 0o755), *members))})
    with pytest.raises(BadInput, match="refusing"):
        copy_out(img, ["/g"], dest)  # type: ignore[arg-type]
    _outside_intact(outside)
    assert not os.path.lexists("/tmp/vmrecover-escape")
    assert os.listdir(dest) == []


def test_setuid_setgid_devices_and_fifos_are_dropped(host: tuple[Path, Path]) -> None:
    """No setuid or setgid bit reaches the host: single files, files and folders inside a folder,
    members of --tar archives; device nodes and fifos are not created; symlinks are kept as they are
    (never followed) and hard links inside the folder stay hard links."""
    from vmrecover.files.copyout import copy_out

    dest, outside = host
    archive = _tar(
        ("dir", ".", None, 0o755),
        ("file", "tool", b"#!/bin/sh\n", 0o6755),
        ("dir", "shared", None, 0o3775),
        ("file", "shared/f", b"f", 0o2644),
        ("link", "shared/again", "tool", 0o6755),
        ("sym", "shared/out", f"{outside}/victim", 0o777),
        ("fifo", "pipe", None, 0o644),
        ("chr", "null", None, 0o666),
    )
    img = FakeImage({"/su": _file("/su", b"elf", 0o4755), "/sg": _file("/sg", b"elf", 0o2711),
                     "/d": _folder("/d", archive)})  # fmt: skip
    written = copy_out(img, ["/su", "/sg", "/d"], dest)  # type: ignore[arg-type]
    assert [w["kind"] for w in written] == ["file", "file", "dir"]

    def mode(p: str) -> int:
        return stat.S_IMODE((dest / p).lstat().st_mode)

    assert (mode("su"), mode("sg"), mode("d/tool"), mode("d/shared"), mode("d/shared/f")) == (
        0o755, 0o711, 0o755, 0o1775, 0o644)  # fmt: skip
    assert (dest / "d" / "shared" / "again").stat().st_ino == (dest / "d" / "tool").stat().st_ino
    assert os.readlink(dest / "d" / "shared" / "out") == f"{outside}/victim"
    assert sorted(os.listdir(dest / "d")) == ["shared", "tool"]  # no fifo, no device
    assert int((dest / "d" / "shared").stat().st_mtime) == 1_500_000_000  # set after its contents
    _outside_intact(outside)

    copy_out(img, ["/su", "/d"], dest, as_tar="all.tar")  # type: ignore[arg-type]
    assert stat.S_IMODE((dest / "all.tar").stat().st_mode) == 0o600
    with tarfile.open(dest / "all.tar") as tf:
        modes = {m.name: stat.S_IMODE(m.mode) for m in tf}
        assert tf.getmember("d/shared/again").linkname == "d/tool"
    assert modes["su"] == 0o755 and modes["d/tool"] == 0o755 and modes["d/shared"] == 0o1775
    assert not any(m & (stat.S_ISUID | stat.S_ISGID) for m in modes.values())
    assert "d/pipe" not in modes and "d/null" not in modes


def test_overwrite_swaps_any_types_and_removes_the_old(host: tuple[Path, Path]) -> None:
    """--overwrite: a file takes a folder's place, a folder a file's, a symlink is replaced as a
    name (its target untouched); the old objects are gone and no staging folder is left."""
    from vmrecover.files.copyout import copy_out

    dest, outside = host
    (dest / "a").mkdir()
    (dest / "a" / "old").write_bytes(b"old")
    (dest / "b").write_bytes(b"old b")
    (dest / "c").symlink_to(outside / "victim")
    img = FakeImage({"/a": _file("/a", b"new a"), "/b": _folder("/b", _tar(("file", "x", b"new x", 0o600))),
                     "/c": _file("/c", b"new c")})  # fmt: skip
    copy_out(img, ["/a", "/b", "/c"], dest, overwrite=True)  # type: ignore[arg-type]
    assert (dest / "a").read_bytes() == b"new a"
    assert (dest / "b" / "x").read_bytes() == b"new x"
    assert not (dest / "c").is_symlink() and (dest / "c").read_bytes() == b"new c"
    assert sorted(os.listdir(dest)) == ["a", "b", "c"]
    _outside_intact(outside)


def _three_over_old(dest: Path) -> FakeImage:
    (dest / "a").write_bytes(b"old a")
    (dest / "c").mkdir()
    (dest / "c" / "keep").write_bytes(b"old c")
    return FakeImage({"/a": _file("/a", b"new a"), "/b": _file("/b", b"new b"), "/c": _file("/c", b"new c")})


def _old_intact(dest: Path) -> None:
    assert sorted(os.listdir(dest)) == ["a", "c"], "a staging folder or a new name was left behind"
    assert (dest / "a").read_bytes() == b"old a"
    assert (dest / "c" / "keep").read_bytes() == b"old c"


def test_overwrite_is_all_or_nothing_when_one_cannot_be_replaced(host: tuple[Path, Path]) -> None:
    """The last of three paths cannot be replaced (its place is a mount point: EBUSY): the first is
    swapped back, the second taken out again; everything old is as it was."""
    from vmrecover.errors import BadInput
    from vmrecover.files.copyout import copy_out

    dest, _ = host
    img = _three_over_old(dest)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(dest / "c")], check=True)
    try:
        (dest / "c" / "keep").write_bytes(b"old c")
        with pytest.raises(BadInput, match=r"cannot put .*/c in place"):
            copy_out(img, ["/a", "/b", "/c"], dest, overwrite=True)  # type: ignore[arg-type]
        _old_intact(dest)
        assert os.path.ismount(dest / "c")
    finally:
        subprocess.run(["umount", str(dest / "c")], check=True)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "filesystem without exchange"])
def test_overwrite_injected_failure_puts_everything_back(
    host: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """An I/O error putting the third path in place: the old objects all survive, whether the
    filesystem can exchange names (swapped back) or not (EINVAL: the old ones were renamed aside,
    and are renamed back)."""
    import vmrecover.beneath as beneath
    from vmrecover.errors import BadInput
    from vmrecover.files.copyout import copy_out

    dest, _ = host
    img = _three_over_old(dest)
    real_renameat2, real_rename = beneath.renameat2, beneath.Beneath.rename

    def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
        if not exchange:
            raise OSError(errno.EINVAL, "not supported by this filesystem")
        if dst == "c":
            raise OSError(errno.EIO, "injected")
        real_renameat2(src_dir, src, dst_dir, dst, flags)

    def rename(self: Any, rel: str, new_rel: str) -> None:
        if new_rel == "c" and "/staged/" in rel:  # the new copy going in (not the old one back)
            raise OSError(errno.EIO, "injected")
        real_rename(self, rel, new_rel)

    monkeypatch.setattr(beneath, "renameat2", renameat2)
    monkeypatch.setattr(beneath.Beneath, "rename", rename)
    with pytest.raises(BadInput, match=r"cannot put .*/c in place"):
        copy_out(img, ["/a", "/b", "/c"], dest, overwrite=True)  # type: ignore[arg-type]
    _old_intact(dest)
    monkeypatch.undo()
    copy_out(img, ["/a", "/b", "/c"], dest, overwrite=True)  # type: ignore[arg-type]
    assert [(dest / n).read_bytes() for n in "abc"] == [b"new a", b"new b", b"new c"]


def test_a_name_that_appears_meanwhile_is_never_replaced(host: tuple[Path, Path]) -> None:
    """Without --overwrite, a name created at the destination while the copy runs is not
    clobbered (RENAME_NOREPLACE), and nothing of the copy is left."""
    from vmrecover.errors import BadInput
    from vmrecover.files.copyout import copy_out

    dest, _ = host

    class Racing(FakeImage):
        def copy_file(self, e: Any, out: Any) -> dict[str, Any]:
            if e.path == "/b":
                (dest / "a").write_bytes(b"someone else's")
            return super().copy_file(e, out)

    img = Racing({"/a": _file("/a", b"new a"), "/b": _file("/b", b"new b")})
    with pytest.raises(BadInput, match="appeared meanwhile"):
        copy_out(img, ["/a", "/b"], dest)  # type: ignore[arg-type]
    assert os.listdir(dest) == ["a"] and (dest / "a").read_bytes() == b"someone else's"


def test_journal_state_is_read_strictly() -> None:
    """Only a clear 'clean' lets a file be read from the disk; anything unclear is 'not known'."""
    from vmrecover.files.guest import _ext_needs_recovery, _xfs_log_dirty

    assert _xfs_log_dirty("xfs_logprint:\n    log tail: 11 head: 11 state: <CLEAN>\n") is False
    assert _xfs_log_dirty("    log tail: 0 head: 5 state: <DIRTY>\n") is True
    assert _xfs_log_dirty("xfs_logprint: external log device not specified\n") is None
    assert _xfs_log_dirty("") is None
    clean = {"Filesystem features": "has_journal ext_attr extent 64bit metadata_csum"}
    assert _ext_needs_recovery(clean) is False
    assert _ext_needs_recovery({"Filesystem features": "has_journal needs_recovery extent"}) is True
    assert _ext_needs_recovery(clean | {"First orphan inode": "12"}) is True
    assert _ext_needs_recovery({"Filesystem features": "has_journal orphan_file orphan_present"}) is True
    assert _ext_needs_recovery({}) is None


def test_filefrag_report_of_a_one_block_file() -> None:
    """'1 block of 4096 bytes' (singular) is a report like any other: small files are read from the
    disk too, not sent through the appliance for want of a plural."""
    from vmrecover.files.guest import _parse_filefrag

    report = (
        "Filesystem type is: ef53\nFile size of /sysroot/README.txt is 39 (1 block of 1024 bytes)\n"
        " ext:     logical_offset:        physical_offset: length:   expected: flags:\n"
        "   0:        0..       0:       8705..      8705:      1:             last,eof\n"
    )
    assert _parse_filefrag(report, 1 << 20, 39, Path("d.raw")) == (
        Path("d.raw"),
        [(0, (1 << 20) + 8705 * 1024, 39)],
    )
    assert _parse_filefrag(report.replace("last,eof", "unwritten,last"), 0, 39, Path("d.raw")) is None


def test_overwrite_that_cannot_be_undone_keeps_the_old_copies_and_says_where(
    host: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The third path fails and swapping the first one back fails too: nothing old is deleted; the
    error says that not everything was put back and names the folder that holds the old copies."""
    import vmrecover.beneath as beneath
    from vmrecover.files.copyout import OldCopiesKept, copy_out

    dest, _ = host
    img = _three_over_old(dest)
    real_renameat2 = beneath.renameat2
    calls = {"a": 0}

    def renameat2(src_dir: int, src: str, dst_dir: int, dst: str, flags: int) -> None:
        if dst == "c":
            raise OSError(errno.EIO, "injected")
        if dst == "a":
            calls["a"] += 1
            if calls["a"] == 2:  # the swap back
                raise OSError(errno.EIO, "injected on undo")
        real_renameat2(src_dir, src, dst_dir, dst, flags)

    monkeypatch.setattr(beneath, "renameat2", renameat2)
    with pytest.raises(OldCopiesKept, match=r"could not put back .*/a: the old copies are kept in") as exc:
        copy_out(img, ["/a", "/b", "/c"], dest, overwrite=True)  # type: ignore[arg-type]
    monkeypatch.undo()
    kept = Path(str(exc.value.message).rsplit("kept in ", 1)[1])
    assert kept.parent == dest and kept.is_dir()
    found = {p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    assert b"old a" in found  # the old a survived, in the named folder
    assert (dest / "c" / "keep").read_bytes() == b"old c"  # never replaced
