"""Open, create and lay out a repository (formats 1 and 2, described in developer-notes/repository.md)::

REPO/
  repo.toml                 format version, id, chunk size, compression, wrapped keys
  catalog.sqlite            VMs, restore points, disks (see catalog.py)
  chunks/ab/<digest-hex>    chunk envelopes (see blob.py)
  indexes/<point>/<disk>.fidx  fixed indexes (see index.py)
  indexes/<point>/<disk>.ptab  their piece tables, a read hint (see tables.py)
  locks/writer, locks/sessions  (see lock.py)
  sessions/                 recovery overlays (later), never inside chunks/ or indexes/
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import tomllib
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from .. import faults
from ..errors import BadInput, Incompatible, IntegrityError, NotFound, PointPruned
from ..fsutil import fsync_dir, write_file
from . import lock
from .blob import ChunkCodec
from .catalog import SCHEMA_VERSION, Catalog, Point, now_iso
from .chunkstore import ChunkStore
from .index import FixedIndex, chunk_count
from .keys import Keys, new_keys, unwrap_keys
from .reader import read_pool
from .tables import PieceTables, TableWriter, record_size, tables_name

FORMAT_VERSION = 2  # new repositories; format 1 ones are read and written as they are until upgraded
FORMATS = (1, 2)
PRIVATE_DIR = 0o700  # the repository is private: folders 0700, files 0600 (fsutil.write_file)
REPO_ENV = "VMRECOVER_REPO"
log = logging.getLogger("vmrecover.repo")
ENCRYPTION_MODES = ("none", "aes-256-gcm")


def default_repo_path() -> Path:
    """``$VMRECOVER_REPO``, else ``$XDG_DATA_HOME/vmrecover/repo`` (``~/.local/share/vmrecover/repo``)."""
    env = os.environ.get(REPO_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "vmrecover" / "repo"


def parse_size(text: str) -> int:
    """'1M', '4MiB', '512K', '1048576' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMGT" else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise BadInput(f"cannot read size {text!r}", hint="write it like 1M, 512K or 4MiB") from None
    return value


# zstd level of new repositories: 1, from bench/service_bench.py's table (level 1 takes 0.83x the time
# and 0.79x the CPU of level 3 for 2.8% more stored; decompression costs the same)
DEFAULT_COMPRESSION_LEVEL = 1


@dataclass
class Config:
    id: str
    format: int
    chunk_size: int
    compression: str
    compression_level: int
    created: str
    encryption: dict[str, Any]
    upgraded: str = ""  # when a format 1 repository became format 2 (its v1 chunks stay: see upgrade)

    @property
    def legacy_chunks(self) -> bool:
        """May the repository hold v1 chunks?  Then backups look data up by its v1 digest as well, so
        deduplication against them stays exact."""
        return self.format == 1 or bool(self.upgraded)

    def to_toml(self) -> bytes:
        table: dict[str, Any] = {
            "format": self.format,
            "id": self.id,
            "created": self.created,
            "chunk_size": self.chunk_size,
            "compression": self.compression,
            "compression_level": self.compression_level,
        }
        if self.upgraded:
            table["upgraded"] = self.upgraded
        return tomli_w.dumps({"repository": table, "encryption": self.encryption}).encode()


class Repository:
    def __init__(self, root: Path, config: Config, keys: Keys | None) -> None:
        self.root = Path(os.path.abspath(root))  # daemons and records outlive the caller's cwd
        self.config = config
        self.codec = ChunkCodec(keys=keys, level=config.compression_level, version=config.format)
        self.chunks = ChunkStore(root / "chunks", self.codec)
        self.catalog = Catalog(root / "catalog.sqlite")
        self._backup_fd: int | None = None  # the writer lock of the backup this process runs

    # --- lifecycle -----------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        root: Path,
        *,
        chunk_size: int = 2**20,
        encryption: str = "none",
        passphrase: Callable[[], str] | None = None,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        format: int = FORMAT_VERSION,
    ) -> Repository:
        if encryption not in ENCRYPTION_MODES:
            raise BadInput(
                f"unknown encryption {encryption!r}", hint=f"choose one of {', '.join(ENCRYPTION_MODES)}"
            )
        if chunk_size < 64 * 1024 or chunk_size > 64 * 2**20 or chunk_size & (chunk_size - 1):
            raise BadInput(f"chunk size {chunk_size} is not a power of two between 64K and 64M")
        if (root / "repo.toml").exists():
            raise Incompatible(f"a repository already exists at {root}")
        if root.exists() and any(root.iterdir()):
            raise Incompatible(f"{root} exists and is not empty", hint="choose a new or empty directory")
        rid = uuid.uuid4().hex
        keys, enc = None, {"mode": "none"}
        if encryption != "none":
            assert passphrase is not None
            keys, enc = new_keys(passphrase(), rid)
        if format not in FORMATS:
            raise BadInput(f"unknown repository format {format}", hint="choose 1 or 2")
        config = Config(rid, format, chunk_size, "zstd", compression_level, now_iso(), enc)
        root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        os.chmod(root, PRIVATE_DIR)  # also an empty folder the user made: repo.toml holds wrapped keys
        for sub in ("indexes", "locks", "sessions"):
            (root / sub).mkdir(exist_ok=True, mode=PRIVATE_DIR)
        ChunkStore.create_layout(root / "chunks")
        cat = Catalog(root / "catalog.sqlite")
        cat.create_schema()
        cat.close()
        write_file(root / "repo.toml", config.to_toml(), what="repo.toml")  # last: marks the repo valid
        return cls(root, config, keys)

    @classmethod
    def open(cls, root: Path, *, passphrase: Callable[[], str] | None = None) -> Repository:
        cfg_path = root / "repo.toml"
        if not root.exists():
            raise NotFound(f"no repository at {root}", hint=f"create one with: vmrecover init --repo {root}")
        try:
            raw = tomllib.loads(cfg_path.read_text())
            r = raw["repository"]
            fmt = int(r["format"])
        except FileNotFoundError:
            raise Incompatible(f"{root} is not a vmrecover repository (no repo.toml)") from None
        except (tomllib.TOMLDecodeError, KeyError, ValueError, TypeError) as exc:
            raise Incompatible(f"{cfg_path} is damaged: {exc}") from None
        if fmt not in FORMATS:
            raise Incompatible(
                f"repository {root} has format version {fmt}; this vmrecover reads versions 1 and 2",
                hint="use a vmrecover release that supports that format",
            )
        config = Config(
            r["id"],
            fmt,
            int(r["chunk_size"]),
            r["compression"],
            int(r["compression_level"]),
            r["created"],
            raw.get("encryption", {"mode": "none"}),
            str(r.get("upgraded", "")),
        )
        keys = None
        if config.encryption.get("mode", "none") != "none":
            if passphrase is None:
                raise Incompatible(f"repository {root} is encrypted")
            keys = unwrap_keys(config.encryption, passphrase(), config.id, str(root))
        repo = cls(root, config, keys)
        repo._keep_private()
        if repo.catalog.schema_version() < SCHEMA_VERSION:
            repo.catalog.upgrade()
        if repo.catalog.schema_version() != SCHEMA_VERSION:
            raise Incompatible(f"catalog of {root} has schema version {repo.catalog.schema_version()}")
        return repo

    def close(self) -> None:
        self.catalog.close()

    def upgrade(self) -> bool:
        """Make a format 1 repository format 2: new chunks are then written as v2 envelopes (pieces
        readable alone).  Nothing else is rewritten: the v1 chunks stay as they are, read as v1 (their
        envelope says so) and found by later backups by their v1 digest, until prune and gc retire them.
        The only write is repo.toml's atomic replacement, under the exclusive writer lock, so a killed
        upgrade leaves the repository either wholly format 1 or wholly format 2.  False if it was
        format 2 already."""
        with self.writer("upgrade"):
            if self.config.format == FORMAT_VERSION:
                return False
            new = dataclasses.replace(self.config, format=FORMAT_VERSION, upgraded=now_iso())
            faults.moment("upgrade.before-write")
            write_file(self.root / "repo.toml", new.to_toml(), what="repo.toml")
            faults.moment("upgrade.after-write")
            self.config = new
            self.codec = ChunkCodec(keys=self.codec.keys, level=self.codec.level, version=new.format)
            self.chunks = ChunkStore(self.root / "chunks", self.codec)
            return True

    def add_piece_tables(
        self,
        *,
        progress_total: Callable[[int], None] = lambda n: None,
        progress: Callable[[int], None] = lambda n: None,
    ) -> int:
        """Write the piece tables (tables.py) of every disk of a point written before they existed, so
        that its cold random reads read one part of a chunk file, not two.  Format 2 only (a format 1
        repository has no heads to keep).  Each file is written in run/, synced, then renamed into the
        point's index folder: a killed run leaves no partial table where a reader looks (a table is a
        hint anyway) and the next run writes the rest.  Under the exclusive writer lock, so prune
        cannot remove a point meanwhile.  Returns how many files were written."""
        if self.codec.version == 1:
            return 0
        with self.writer("upgrade"):
            todo = [
                d
                for p in self.catalog.points()
                for d in self.catalog.disks(p.id)
                if not os.path.lexists(self.tables_path(p.id, d.name))
            ]
            progress_total(sum(chunk_count(d.size, d.chunk_size) for d in todo))
            with read_pool("tables") as pool:
                for d in todo:  # one index in memory at a time
                    self._add_tables(d.point, d.name, self.read_index(d.point, d.name), pool, progress)
        return len(todo)

    def _add_tables(
        self, point: str, disk: str, index: FixedIndex, pool: Executor, progress: Callable[[int], None]
    ) -> None:
        tmp = self.run_dir() / f"{point}-{tables_name(disk)}.tmp"
        tmp.unlink(missing_ok=True)  # left by a killed run
        w = TableWriter(tmp, index.count, record_size(index.chunk_size, self.encrypted))
        try:
            known = w.fill(index, self.chunks.read_head, pool, progress)
            w.sync()
        except BaseException:
            w.close()
            tmp.unlink(missing_ok=True)
            raise
        w.close()
        faults.moment("tables.before-rename")
        path = self.tables_path(point, disk)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        log.info(
            "piece tables of %s disk %s written: %d of %d chunk heads known", point, disk, known, index.count
        )

    def _keep_private(self) -> None:
        """A repository made by an older vmrecover (or copied with a loose umask) is closed to other
        users at its top: nobody else can then reach anything inside it."""
        st = os.stat(self.root)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(self.root, PRIVATE_DIR)
            log.warning("repository %s was readable by other users: its folder is now 0700", self.root)

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compress_at(self, level: int) -> None:
        """New chunks written through this object at zstd *level* (a handle of one job: a copy of the
        repository; the configured level stays the default of everything else)."""
        self.codec = self.codec.at_level(level)
        self.chunks = ChunkStore(self.root / "chunks", self.codec)

    # --- layout --------------------------------------------------------------------------------
    @property
    def encrypted(self) -> bool:
        return self.codec.encrypted

    def index_dir(self, point: str) -> Path:
        return self.root / "indexes" / point

    def index_path(self, point: str, disk: str) -> Path:
        return self.index_dir(point) / f"{disk}.fidx"

    def run_dir(self) -> Path:
        """``run/``: daemons' records and logs, and private scratch space on the repository's disk."""
        path = self.root / "run"
        path.mkdir(exist_ok=True, mode=PRIVATE_DIR)
        return path

    def session_dir(self, session_id: str) -> Path:
        return self.root / "sessions" / session_id

    def read_index(self, point: str, disk: str) -> FixedIndex:
        return FixedIndex.read(self.index_path(point, disk))

    def tables_path(self, point: str, disk: str) -> Path:
        return self.index_dir(point) / tables_name(disk)

    def read_tables(self, point: str, disk: str, index: FixedIndex) -> PieceTables | None:
        """The disk's piece tables, a read hint (None: each chunk's head is read from its file)."""
        return PieceTables.open(self.tables_path(point, disk), index.count)

    @contextlib.contextmanager
    def reading(self, point: Point, *, outcome: str = "") -> Iterator[None]:
        """Around a read of *point*'s data: a missing index or chunk of a point that prune removed
        meanwhile (and gc freed) is PointPruned, not damage.  Readers take no lock (see repo/gc.py)."""
        try:
            yield
        except IntegrityError:
            if self.catalog.point(point.id) is None:
                raise PointPruned(f"{point.vm}@{point.id}", wrote=outcome) from None
            raise

    # --- locks ---------------------------------------------------------------------------------
    def writer(self, op: str) -> contextlib.AbstractContextManager[int]:
        """Exclusive: prune and gc (no backup runs meanwhile).  See lock.py."""
        return lock.hold(self.root / "locks" / "writer", exclusive=True, op=op, repo=self.root)

    @contextlib.contextmanager
    def backing_up(
        self, vm: str, *, wait: float | None = None, waiting: Callable[[str], None] | None = None
    ) -> Iterator[None]:
        """A backup of *vm*: the VM's own lock, then the writer lock shared with backups of other VMs
        (see lock.py).  *wait*: seconds, None for as long as it takes (*waiting* is told for whom; by
        default the log says it)."""
        op = f"backup of {vm}"
        if waiting is None:
            waiting = lambda who: log.warning("backup of %s waits: the repository is locked by %s", vm, who)  # noqa: E731
        vm_lock = self.root / "locks" / f"vm-{hashlib.sha256(vm.encode()).hexdigest()[:16]}"
        with (
            lock.hold(vm_lock, exclusive=True, op=op, repo=self.root, wait=wait, waiting=waiting),
            lock.hold(
                self.root / "locks" / "writer",
                exclusive=False,
                op=op,
                repo=self.root,
                wait=wait,
                waiting=waiting,
            ) as fd,  # fmt: skip
        ):
            self._backup_fd = fd
            try:
                yield
            finally:
                self._backup_fd = None

    def sole_writer(self) -> bool:
        """Within :meth:`backing_up`: is this backup the only writer at this moment?  If so it now holds
        the writer lock exclusively (nothing else can start using what it wrote); if not, it must write
        nothing more (its shared hold may be gone).  A failed backup asks before deleting its chunks."""
        return self._backup_fd is not None and lock.upgrade(self._backup_fd)

    def session_folders(
        self, op: str, *, exclusive: bool, wait: float
    ) -> contextlib.AbstractContextManager[None]:
        """Shared while `recover start` creates a session's folder, exclusive while gc removes folders
        no session names (see lock.py)."""
        return lock.hold(
            self.root / "locks" / "sessions", exclusive=exclusive, op=op, repo=self.root, wait=wait
        )
