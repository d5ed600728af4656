"""Copying guest files out: all or nothing, never overwriting without being asked, never reaching
outside the destination.

Everything is first written to a private staging folder inside the destination (same filesystem),
then put in place: a new name with ``renameat2(RENAME_NOREPLACE)``, an existing one (``--overwrite``)
with ``renameat2(RENAME_EXCHANGE)``, which swaps the new copy and the old object (any types: a file
for a folder too) in one step; the old one is deleted only once every path is in place.  A failure
(a damaged chunk, a full disk, a missing path, a refused member, one path that cannot be swapped)
swaps back what was swapped and removes the staging folder: the destination is as it was.  Where the
filesystem cannot exchange (EINVAL), the old object is renamed aside first and renamed back on a
failure (not atomic: for a moment the name is missing, but nothing is lost).

Every name below the staging folder is a guest's, so it is only ever touched through
:class:`vmrecover.beneath.Beneath` (directory descriptors, no symlink followed, no ``..``): files are
created ``O_EXCL|O_NOFOLLOW`` and their modes and times set on the open descriptor; folders and
symlinks are changed by name without following.  Files keep their content, mode (without setuid and
setgid) and mtime; folders come through ``tar-out`` and :func:`extract`; symlinks are copied as links,
whatever they point at, and never followed on the host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from ..beneath import Beneath, safe_mode, split
from ..errors import BadInput, NoSpace, NotFound, VmrecoverError
from .guest import Entry, GuestImage

log = logging.getLogger("vmrecover.files")
Progress = Callable[[str], None]


def _utime_fd(fd: int, mtime_ns: int) -> None:
    os.utime(fd, ns=(mtime_ns, mtime_ns))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _place_entry(img: GuestImage, e: Entry, w: Beneath, rel: str) -> dict[str, Any]:
    """Write guest object *e* at *rel* below *w* (a name that does not exist yet); returns how its
    bytes were read (``{"read": "disk" | "appliance", "fallback": why or None}``)."""
    if e.kind == "file":
        fd = w.create_open(rel, 0o600)
        try:
            how = img.copy_file(e, fd)
            os.fchmod(fd, safe_mode(e.mode))
            _utime_fd(fd, e.mtime_ns)
        finally:
            os.close(fd)
        return how
    if e.kind == "symlink":
        w.symlink(e.target or "", rel)
        w.utime(rel, (e.mtime_ns, e.mtime_ns))
        return {"read": None, "fallback": None}
    if e.kind == "dir":
        w.mkdir(rel, 0o700)
        with _guest_tar(img, w, e.path) as f:
            extract(f, w, rel)
        w.chmod(rel, safe_mode(e.mode))
        w.utime(rel, (e.mtime_ns, e.mtime_ns))
        return {"read": "appliance", "fallback": None}
    raise BadInput(f"{e.path} in {img.what} is a {e.kind} (device, socket or fifo): not copied")


@contextlib.contextmanager
def _guest_tar(img: GuestImage, w: Beneath, path: str) -> Iterator[IO[bytes]]:
    """The guest folder *path* as a tar (``tar-out`` into a private file below *w*), open for reading
    in the block and removed after it."""
    fd = w.create_open("dir.tar", 0o600)
    try:
        img.tar_out(path, fd)
    finally:
        os.close(fd)
    try:
        with open(w.open("dir.tar", os.O_RDONLY), "rb") as f:
            yield f
    finally:
        w.unlink("dir.tar")


def extract(archive: IO[bytes], w: Beneath, top: str) -> None:
    """Unpack a guest's tar into the folder *top* below *w* (an empty folder).  Nothing lands or
    changes outside it: absolute names, ``..``, a path through a symlink extracted earlier, a name
    that exists already (a folder member over a symlink, a file over anything) and hard links to
    anything outside it are refused (:class:`BadInput`, and the caller throws the whole copy away);
    symlinks are created as they are and never followed; setuid/setgid bits, owners, devices and
    fifos are dropped.  Folders are created 0700 and get their own mode and mtime at the end, after
    their contents (which change a folder's mtime), by name and without following anything."""
    dirs: list[tuple[str, int, int]] = []
    with tarfile.open(fileobj=archive, mode="r:") as tf:
        for m in tf:
            try:
                parts = split(m.name)
                if not parts:
                    continue  # './': the folder itself, whose mode and mtime the caller sets
                rel = "/".join([top, *parts])
                mtime_ns = int(m.mtime * 1_000_000_000)
                if m.isdir():
                    try:
                        w.mkdir(rel, 0o700)
                    except FileExistsError:
                        if not stat.S_ISDIR(w.lstat(rel).st_mode):
                            raise
                    dirs.append((rel, safe_mode(m.mode), mtime_ns))
                elif m.isreg():
                    data = tf.extractfile(m)
                    assert data is not None
                    fd = w.create_open(rel, 0o600)
                    try:
                        while block := data.read(1 << 20):
                            _write_all(fd, block)
                        os.fchmod(fd, safe_mode(m.mode))
                        _utime_fd(fd, mtime_ns)
                    finally:
                        os.close(fd)
                elif m.issym():
                    w.symlink(m.linkname, rel)
                    w.utime(rel, (mtime_ns, mtime_ns))
                elif m.islnk():
                    w.link("/".join([top, *split(m.linkname)]), rel)
                # devices, fifos and anything else: dropped
            except FileExistsError:
                raise BadInput(
                    f"refusing archive member {m.name!r}: that name was extracted before "
                    "(a symlink or file may not be replaced or gone through)"
                ) from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise NoSpace("the destination's filesystem is full") from None
                raise BadInput(
                    f"refusing archive member {m.name!r}"
                    + (f" -> {m.linkname!r}" if m.islnk() or m.issym() else "")
                    + f": {exc.strerror} (it would leave the destination or go through a symlink)"
                ) from None
    for rel, mode, mtime_ns in reversed(dirs):
        w.chmod(rel, mode)
        w.utime(rel, (mtime_ns, mtime_ns))


# ------------------------------------------------------------------------------------ putting in place
def _put(d: Beneath, staged: str, target: str, aside: str, overwrite: bool) -> str:
    """Move *staged* to *target* (names below *d*); returns how ("new", "exchanged", "aside"), which
    :func:`_take_back` undoes."""
    if overwrite:
        try:
            d.exchange(staged, target)
            return "exchanged"
        except FileNotFoundError:
            pass  # nothing there (any more): a plain new name
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
            log.info("%s: the filesystem cannot exchange names; renaming the old one aside", d.top)
            if d.lexists(target):
                d.rename(target, aside)
                try:
                    d.rename(staged, target)
                except BaseException:
                    d.rename(aside, target)
                    raise
                return "aside"
    try:
        d.rename_noreplace(staged, target)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        if d.lexists(target):  # no atomic promise from this filesystem: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), target) from None
        d.rename(staged, target)
    return "new"


class OldCopiesKept(VmrecoverError):
    """An install failed and could not be fully undone: the old objects wait in the staging folder."""


def _take_back(d: Beneath, staged: str, target: str, aside: str, how: str) -> None:
    if how == "exchanged":
        d.exchange(staged, target)
    elif how == "aside":
        d.rename(target, staged)
        d.rename(aside, target)
    else:
        d.rename(target, staged)


def install(d: Beneath, moves: Sequence[tuple[str, str]], aside_dir: str, *, overwrite: bool) -> None:
    """Put every (staged, target) of *moves* (names below *d*) in place, all or none: when one
    fails, those already in place are swapped or renamed back, in reverse order.  Old objects end
    up at their staged names (or in *aside_dir*), for the caller to delete with its staging folder.

    A failure that was fully undone is BadInput; when something could not be put back, OldCopiesKept
    names where the old objects are, and the caller must keep its staging folder (as after an
    interrupt, which may come between a swap and its record)."""
    done: list[tuple[str, str, str, str]] = []
    try:
        for i, (staged, target) in enumerate(moves):
            aside = f"{aside_dir}/{i}"
            done.append((staged, target, aside, _put(d, staged, target, aside, overwrite)))
    except Exception as exc:
        failed = moves[len(done)][1]
        stuck = []
        for staged, target, aside, how in reversed(done):
            try:
                _take_back(d, staged, target, aside, how)
            except OSError as undo:  # only a concurrent change of the destination gets here
                log.error("could not put back %s after a failure: %s", d.top / target, undo)
                stuck.append(target)
        if stuck:
            where = d.top / aside_dir.rsplit("/", 1)[0]
            raise OldCopiesKept(
                f"cannot put {d.top / failed} in place ({exc}), and could not put back "
                f"{', '.join(str(d.top / t) for t in stuck)}: the old copies are kept in {where}",
                hint="move them back by hand (staged/ holds them, or aside/), then remove that folder",
            ) from None
        if isinstance(exc, FileExistsError):
            hint = "nothing was changed; add --overwrite to replace it"
            raise BadInput(f"{d.top / failed} appeared meanwhile", hint=hint) from None
        if isinstance(exc, OSError):
            hint = "nothing was changed (what was already in place was put back)"
            raise BadInput(f"cannot put {d.top / failed} in place: {exc.strerror}", hint=hint) from None
        raise


def copy_out(
    img: GuestImage,
    guest_paths: Sequence[str],
    dest: Path,
    *,
    as_tar: str | None = None,
    overwrite: bool = False,
    progress: Progress = lambda m: None,
) -> list[dict[str, Any]]:
    """Copy *guest_paths* into folder *dest* (or, with *as_tar*, into one tar archive of that name
    there).  Returns what was written, and how each file was read."""
    if not dest.is_dir():
        raise NotFound(f"destination {dest} is not a folder", hint="create it first, or give another --to")
    entries = [img.stat(img.resolve(p)) for p in guest_paths]  # NotFound before anything is written
    names = [e.name if e.path != "/" else "root" for e in entries]
    if len(set(names)) != len(names):
        raise BadInput("two of the paths have the same name", hint="copy them in two commands")
    targets = [as_tar] if as_tar else names
    d = Beneath(dest)
    existing = [t for t in targets if d.lexists(t)]
    if existing and not overwrite:
        raise BadInput(f"{dest / existing[0]} exists", hint="choose another --to, or add --overwrite")
    work = Path(tempfile.mkdtemp(prefix=".vmrecover-files-", dir=dest))  # 0700, a name of our own
    keep_work = False  # True once old objects may sit in it: an interrupted or half-undone install
    try:
        w = Beneath(work)
        w.mkdir("staged", 0o700)
        w.mkdir("aside", 0o700)
        if as_tar:
            reads = _write_tar(img, entries, names, w, f"staged/{as_tar}", progress)
        else:
            reads = []
            for e, name in zip(entries, names, strict=True):
                progress(f"copying {e.path}")
                reads.append(_place_entry(img, e, w, f"staged/{name}"))
        moves = [(f"{work.name}/staged/{t}", t) for t in targets]
        try:
            install(d, moves, f"{work.name}/aside", overwrite=overwrite)
        except BadInput:  # undone: nothing changed
            raise
        except BaseException:
            keep_work = True
            raise
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpace(f"the filesystem of {dest} is full", hint="nothing was changed") from None
        raise VmrecoverError(f"cannot write to {dest}: {exc}", hint="nothing was changed") from None
    finally:
        if keep_work:
            log.error("kept %s: it may hold the old copies of what was being replaced", work)
        else:
            shutil.rmtree(work, ignore_errors=True)  # staging, and the old objects replaced
    where = targets * len(entries) if as_tar else targets
    out = []
    for e, t, how in zip(entries, where, reads, strict=True):
        out.append({"guest_path": e.path, "kind": e.kind, "size": e.size, "to": str(dest / t), **how})
        if how["read"]:
            log.info("%s %s -> %s: read %s%s", img.what, e.path, dest / t,
                     "from the disk at its extents" if how["read"] == "disk" else "through the appliance",
                     f" ({how['fallback']})" if how["fallback"] else "")  # fmt: skip
    return out


def _write_tar(
    img: GuestImage, entries: list[Entry], names: list[str], w: Beneath, rel: str, progress: Progress
) -> list[dict[str, Any]]:
    """One archive (0600: it holds files only their owners may read) of every entry; members keep
    the guest's modes without setuid/setgid, mtimes and numeric owners; device nodes and fifos are
    left out (extracted by root, a guest's device node would open a host device)."""
    reads = []
    fd = w.create_open(rel, 0o600)
    with open(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for e, name in zip(entries, names, strict=True):
            progress(f"adding {e.path}")
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = safe_mode(e.mode), e.mtime_ns // 1_000_000_000
            info.uid, info.gid = e.uid, e.gid
            how: dict[str, Any] = {"read": None, "fallback": None}
            if e.kind == "file":
                tmp = w.create_open("file", 0o600)
                try:
                    how = img.copy_file(e, tmp)
                    info.size = os.fstat(tmp).st_size
                finally:
                    os.close(tmp)
                with open(w.open("file", os.O_RDONLY), "rb") as f:
                    tar.addfile(info, f)
                w.unlink("file")
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target or ""
                tar.addfile(info)
            elif e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                with _guest_tar(img, w, e.path) as pf, tarfile.open(fileobj=pf, mode="r:") as src:
                    for m in src:
                        rel_name = m.name.removeprefix("./").strip("/")
                        if not rel_name or m.ischr() or m.isblk() or m.isfifo():
                            continue  # no device nodes or fifos, as in extract()
                        data = src.extractfile(m) if m.isreg() else None
                        m.name = f"{name}/{rel_name}"
                        m.mode = safe_mode(m.mode)
                        if m.islnk():
                            m.linkname = f"{name}/{m.linkname.removeprefix('./')}"
                        tar.addfile(m, data)
                how = {"read": "appliance", "fallback": None}
            else:
                raise BadInput(f"{e.path} in {img.what} is a {e.kind} (device, socket or fifo): not copied")
            reads.append(how)
    return reads
