"""Copying guest files out: all or nothing, never overwriting without being asked.

Everything is first written to a staging folder inside the destination (same filesystem), then each
item is renamed into place; a failure (a damaged chunk, a full disk, a missing path) removes the
staging folder and leaves the destination as it was.  Files keep their content, mode and mtime;
folders are copied recursively through ``tar-out`` (modes, mtimes and symlinks as they are);
symlinks are copied as links, whatever they point at, and are never followed on the host (the
extraction refuses any member whose path would leave the destination).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import BadInput, NotFound
from .guest import Entry, GuestImage


def _place_entry(img: GuestImage, e: Entry, out: Path, work: Path) -> None:
    """Write guest object *e* at host path *out* (which does not exist)."""
    if e.kind == "file":
        img.copy_file(e, out)
        os.chmod(out, stat.S_IMODE(e.mode))
        os.utime(out, ns=(e.mtime_ns, e.mtime_ns))
    elif e.kind == "symlink":
        os.symlink(e.target or "", out)
        os.utime(out, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
    elif e.kind == "dir":
        archive = work / "dir.tar"
        img.tar_out(e.path, archive)
        out.mkdir()
        _extract(archive, out)
        archive.unlink()
        os.chmod(out, stat.S_IMODE(e.mode))
        os.utime(out, ns=(e.mtime_ns, e.mtime_ns))
    else:
        raise BadInput(f"{e.path} in {img.what} is a {e.kind} (device, socket or fifo): not copied")


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a guest's tar into *dest* (an empty folder).  Nothing may land outside it: absolute
    names, '..' and any path through a symlink extracted earlier are refused; symlinks are created as
    they are (never followed); setuid/setgid bits, owners, devices and fifos are dropped."""
    root = os.path.realpath(dest)
    dirs: list[tuple[Path, int, float]] = []
    with tarfile.open(archive) as tf:
        for m in tf:
            parts = [p for p in m.name.split("/") if p not in ("", ".")]
            if not parts:
                continue
            if m.name.startswith("/") or ".." in parts:
                raise BadInput(f"refusing archive member {m.name!r}: it would leave the destination")
            out = Path(root, *parts)
            if os.path.commonpath([root, os.path.realpath(out.parent)]) != root:
                raise BadInput(
                    f"refusing archive member {m.name!r}: its folder is a link out of the destination"
                )
            mode = stat.S_IMODE(m.mode) & ~(stat.S_ISUID | stat.S_ISGID)
            if m.isdir():
                out.mkdir(exist_ok=True)
                dirs.append((out, mode, m.mtime))
            elif m.isfile():
                src = tf.extractfile(m)
                assert src is not None
                with src, open(out, "xb") as f:
                    shutil.copyfileobj(src, f, 1 << 20)
                os.chmod(out, mode)
                os.utime(out, (m.mtime, m.mtime))
            elif m.issym():
                os.symlink(m.linkname, out)
                os.utime(out, (m.mtime, m.mtime), follow_symlinks=False)
            elif m.islnk():
                target = Path(root, *[p for p in m.linkname.split("/") if p not in ("", ".")])
                if (
                    ".." in m.linkname.split("/")
                    or os.path.commonpath([root, os.path.realpath(target)]) != root
                ):
                    raise BadInput(f"refusing hard link {m.name!r} -> {m.linkname!r}")
                os.link(target, out)
    for d, mode, mtime in reversed(dirs):  # after their contents, which change a folder's mtime
        os.chmod(d, mode)
        os.utime(d, (mtime, mtime))


def copy_out(
    img: GuestImage,
    guest_paths: Sequence[str],
    dest: Path,
    *,
    as_tar: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] = lambda m: None,
) -> list[dict[str, Any]]:
    """Copy *guest_paths* into folder *dest* (or, with *as_tar*, into one tar archive of that name
    there).  Returns what was written."""
    if not dest.is_dir():
        raise NotFound(f"destination {dest} is not a folder", hint="create it first, or give another --to")
    entries = [img.stat(img.resolve(p)) for p in guest_paths]  # NotFound before anything is written
    names = [e.name if e.path != "/" else "root" for e in entries]
    if len(set(names)) != len(names):
        raise BadInput("two of the paths have the same name", hint="copy them in two commands")
    targets = [dest / as_tar] if as_tar else [dest / n for n in names]
    existing = [t for t in targets if os.path.lexists(t)]
    if existing and not overwrite:
        raise BadInput(f"{existing[0]} exists", hint="choose another --to, or add --overwrite")
    work = Path(tempfile.mkdtemp(prefix=".vmrecover-files-", dir=dest))
    try:
        staged = work / "staged"
        staged.mkdir()
        if as_tar:
            _write_tar(img, entries, names, work / "out.tar", work, progress)
            moves = [(work / "out.tar", targets[0])]
        else:
            for e, name in zip(entries, names, strict=True):
                progress(f"copying {e.path}")
                _place_entry(img, e, staged / name, work)
            moves = [(staged / n, t) for n, t in zip(names, targets, strict=True)]
        for src, dst in moves:
            if os.path.lexists(dst):
                aside = work / "replaced"
                os.rename(dst, aside)
                shutil.rmtree(aside) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
            os.rename(src, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    where = targets * len(entries) if as_tar else targets
    return [
        {"guest_path": e.path, "kind": e.kind, "size": e.size, "to": str(t)}
        for e, t in zip(entries, where, strict=True)
    ]


def _write_tar(
    img: GuestImage, entries: list[Entry], names: list[str], out: Path, work: Path,
    progress: Callable[[str], None],
) -> None:  # fmt: skip
    with tarfile.open(out, "w") as tar:
        for e, name in zip(entries, names, strict=True):
            progress(f"adding {e.path}")
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = stat.S_IMODE(e.mode), e.mtime_ns // 1_000_000_000
            if e.kind == "file":
                tmp = work / "file"
                img.copy_file(e, tmp)
                info.size = tmp.stat().st_size
                with open(tmp, "rb") as f:
                    tar.addfile(info, f)
                tmp.unlink()
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target or ""
                tar.addfile(info)
            elif e.kind == "dir":
                part = work / "dir.tar"
                img.tar_out(e.path, part)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                with tarfile.open(part) as src:
                    for m in src:
                        rel = m.name.removeprefix("./").strip("/")
                        if not rel:
                            continue
                        data = src.extractfile(m) if m.isfile() else None
                        m.name = f"{name}/{rel}"
                        tar.addfile(m, data)
                part.unlink()
