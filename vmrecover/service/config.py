"""The service's configuration: one TOML file (``/etc/vmrecover/vmrecover.toml``), read and checked here.

The schema is the pydantic models below (unknown keys are errors, so a typo never silently does
nothing); ``service/example.toml`` is the documented example, and a test keeps the two in step.  An
error names the file, the line and the key (``vmrecover.toml:14: jobs[1].schedule: ...``): TOML
syntax errors come with tomllib's line, schema errors are located by :func:`_line_of`, which finds the
key's line in the text.  Secrets never live in this file: API tokens are stored as SHA-256 digests,
and the repository's passphrase, the SMTP password and the webhook's token are read from their
``*_file`` (which must not be readable by others).
"""

from __future__ import annotations

import ipaddress
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import BadInput
from ..fsutil import write_file
from ..repo.catalog import check_name
from ..repo.repository import parse_size

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str | float) -> float:
    """'90s', '5m', '2h', '1d', 30 -> seconds."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"cannot read duration {text!r}: write it like 30s, 5m, 2h or 1d")
    return float(m.group(1)) * _UNITS[m.group(2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Repository(_Strict):
    path: Path
    passphrase_file: Path | None = None  # an encrypted repository's passphrase (mode 0600 or 0400)
    cache_size: str = "1G"  # the chunk cache shared by the datastores, the NFS export and restores

    @field_validator("cache_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v


class Token(_Strict):
    name: str
    role: Literal["admin", "read-only"]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # of the token; the token itself is never stored

    @field_validator("name")
    @classmethod
    def _not_local(cls, v: str) -> str:
        if v == "local":  # the audit log's name for the local socket's admin (service/auth.py)
            raise ValueError("'local' names the service's local socket in the audit log: pick another name")
        return v


_SCRYPT_HASH = r"^\$scrypt\$ln=\d{1,2},r=\d{1,2},p=\d{1,2}\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$"


class User(_Strict):
    """A local user of the web console (``[[api.users]]``, made by ``vmrecover user new``): a name, a
    role and the scrypt hash of the password (service/auth.py); the password itself is never stored."""

    name: str
    role: Literal["admin", "read-only"]
    password_hash: Annotated[str, Field(pattern=_SCRYPT_HASH)]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return check_name("user", v)
        except BadInput as exc:
            raise ValueError(exc.message) from None


class Api(_Strict):
    enabled: bool = True
    listen: list[str] = ["0.0.0.0:8443"]  # HOST:PORT, [IPv6]:PORT
    tls_cert: Path | None = None  # default: a self-signed certificate generated at first start
    tls_key: Path | None = None
    tokens: list[Token] = []
    users: list[User] = []  # the web console's local users (it also signs in with a token)
    console_idle: Annotated[float, Field(gt=0)] = 3600.0  # seconds: a console session unused this long ends
    console_lifetime: Annotated[float, Field(gt=0)] = 12 * 3600.0  # seconds: and any after this long

    @field_validator("console_idle", "console_lifetime", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("listen")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for a in v:
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
                raise ValueError(f"listen address {a!r} is not HOST:PORT")
        return v

    @model_validator(mode="after")
    def _pair(self) -> Api:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("two tokens have the same name")
        users = [u.name for u in self.users]
        if len(set(users)) != len(users):
            raise ValueError("two users have the same name")
        return self


class Nfs(_Strict):
    enabled: bool = True
    listen: str = "0.0.0.0"
    port: int = 2049
    portmapper: bool = True
    allow: list[str] = []  # networks (CIDR) of the hypervisors' hosts; also grown by recoveries

    @field_validator("allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for n in v:
            ipaddress.ip_network(n, strict=False)
        return v


class Fuse(_Strict):
    mountpoint: Path | None = None  # where the datastore is mounted; none: no FUSE mount


class Scheduler(_Strict):
    max_streams: Annotated[int, Field(ge=1)] = 4  # backups running at once, all hosts together
    per_host: Annotated[int, Field(ge=1)] = 1  # backups at once against one physical host
    per_datastore: Annotated[int, Field(ge=1)] = 1  # ... and against one datastore / SR
    retries: Annotated[int, Field(ge=0)] = 2  # a failed run is tried again this often ...
    retry_backoff: str | float = "5m"  # ... after this long, doubled each time
    keep_runs: Annotated[int, Field(ge=1)] = 200  # runs kept in the history of each job (with their logs)

    @field_validator("retry_backoff")
    @classmethod
    def _duration(cls, v: str | float) -> str | float:
        parse_duration(v)
        return v


class Retention(_Strict):
    keep_last: Annotated[int, Field(ge=0)] = 0
    daily: Annotated[int, Field(ge=0)] = 0
    weekly: Annotated[int, Field(ge=0)] = 0
    monthly: Annotated[int, Field(ge=0)] = 0


class Job(_Strict):
    name: str
    kind: Literal["backup", "gc", "verify", "boot-check"] = "backup"
    schedule: str  # cron: minute hour day-of-month month day-of-week
    enabled: bool = True
    # backup: a hypervisor's VMs (by name, folder:PATH or tag:TAG where the platform has them), or images
    hypervisor: str | None = None
    vms: list[str] = []
    images: list[Path] = []
    vm: str | None = None  # images: the VM name in the repository
    mode: str | None = None  # xen: normal|quiesced|offline|memory; vmware: normal|quiesce|memory
    full: bool = False
    retention: Retention | None = None  # applied after each run (to the job's VMs)
    compression_level: Annotated[int, Field(ge=1, le=22)] | None = None
    bandwidth: str | None = None  # bytes per second read from the source, e.g. "100M"
    pre_hook: list[str] | None = None  # argv run on the appliance before the snapshot
    post_hook: list[str] | None = None  # argv run after the backup
    hook_timeout: str | float = "5m"
    # boot-check: the latest point of each of vms (names in the repository; none: every VM) booted and
    # judged (recovery/healthcheck.py), each within boot_timeout, by expect (default: a login prompt)
    boot_timeout: str | float = "5m"
    expect: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            check_name("job", v)
        except BadInput as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str) -> str:
        if not croniter.is_valid(v) or len(v.split()) != 5:
            raise ValueError(
                f"{v!r} is not a cron schedule (minute hour day month weekday, e.g. '0 2 * * *')"
            )
        return v

    @field_validator("bandwidth")
    @classmethod
    def _bandwidth(cls, v: str | None) -> str | None:
        if v is not None and parse_size(v) <= 0:
            raise ValueError(f"{v!r}: a bandwidth cap must be more than 0 bytes per second")
        return v

    @field_validator("hook_timeout", "boot_timeout")
    @classmethod
    def _timeout(cls, v: str | float) -> str | float:
        parse_duration(v)
        return v

    @field_validator("expect")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"expect {v!r} is not a regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _what(self) -> Job:
        if self.kind == "boot-check":
            if self.hypervisor or self.images:
                raise ValueError("a boot-check job takes vms (repository names), no hypervisor or images")
            for name in self.vms:
                try:
                    check_name("VM", name)
                except BadInput as exc:
                    raise ValueError(exc.message) from None
            return self
        if self.kind != "backup":
            if self.hypervisor or self.vms or self.images:
                raise ValueError(f"a {self.kind} job takes no hypervisor, vms or images")
            return self
        if bool(self.hypervisor) == bool(self.images):
            raise ValueError("a backup job names either a hypervisor (with vms) or images (with vm)")
        if self.hypervisor and not self.vms:
            raise ValueError("a backup job of a hypervisor lists its vms")
        if self.images and not self.vm:
            raise ValueError("a backup job of images names the vm they are")
        return self


Outcome = Literal["failure", "success"]


def parse_syslog(text: str) -> tuple[str, str, int]:
    """A syslog destination -> (kind, address, port): ("none", "", 0), ("unix", "/dev/log", 0) for
    "local" or "unix:///path", ("udp" | "tcp", host, port) for "udp://host[:port]" (port 514 by default)."""
    if text in ("none", ""):
        return ("none", "", 0)
    if text == "local":
        return ("unix", "/dev/log", 0)
    u = urlsplit(text)
    if u.scheme == "unix" and not u.netloc and u.path.startswith("/"):
        return ("unix", u.path, 0)
    try:
        port = u.port or 514
    except ValueError:
        port = 0
    if u.scheme in ("udp", "tcp") and u.hostname and 0 < port < 65536 and u.path in ("", "/"):
        if u.username or u.password or u.query or u.fragment:
            raise ValueError(f"syslog destination {text!r} takes only a host and a port")
        return (u.scheme, u.hostname, port)
    raise ValueError(
        f"syslog destination {text!r} is not one of: local, unix:///PATH, udp://HOST[:PORT], "
        "tcp://HOST[:PORT], none"
    )


def parse_smtp(text: str) -> tuple[str, int]:
    """ "host", "host:port" or "[v6]:port" -> (host, port); port 25 by default."""
    u = urlsplit(f"//{text}")
    try:
        port = u.port or 25
    except ValueError:
        port = 0
    if not u.hostname or not 0 < port < 65536 or u.path or u.username or u.password or u.query:
        raise ValueError(f"smtp server {text!r} is not HOST[:PORT]")
    return (u.hostname, port)


def _on(v: list[str]) -> list[str]:
    if len(set(v)) != len(v):
        raise ValueError("an outcome is listed twice")
    return v


class _Channel(_Strict):
    """What every notification channel has: the outcomes it is told, and a network timeout."""

    on: list[Outcome] = ["failure"]
    timeout: str | float = "10s"

    @field_validator("on")
    @classmethod
    def _outcomes(cls, v: list[str]) -> list[str]:
        return _on(v)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str | float) -> str | float:
        if parse_duration(v) <= 0:
            raise ValueError("timeout must be more than 0")
        return v


class Email(_Channel):
    smtp: str  # HOST[:PORT] of the mail server (port 25 by default; 587 is the usual submission port)
    starttls: bool = True  # upgrade the connection to TLS (required before a password is sent)
    ca_file: Path | None = None  # the CA(s) that signed the server's certificate; default: the system's
    user: str | None = None  # log in as (with the password of password_file)
    password_file: Path | None = None  # the SMTP password, in a file only root may read (chmod 600)
    from_: str = Field(alias="from")  # the sender address
    to: Annotated[list[str], Field(min_length=1)]  # the recipients
    on: list[Outcome] = ["failure"]  # which outcomes are mailed
    timeout: str | float = "30s"  # per network operation; a run's notification never waits much longer

    @field_validator("smtp")
    @classmethod
    def _server(cls, v: str) -> str:
        parse_smtp(v)
        return v

    @field_validator("from_", "to")
    @classmethod
    def _addresses(cls, v: str | list[str]) -> str | list[str]:
        for a in [v] if isinstance(v, str) else v:
            if "@" not in a or any(c in a for c in "\r\n\0,;<>") or a != a.strip():
                raise ValueError(f"{a!r} is not a mail address (user@domain)")
        return v

    @model_validator(mode="after")
    def _login(self) -> Email:
        if (self.user is None) != (self.password_file is None):
            raise ValueError("user and password_file go together")
        if self.password_file is not None and not self.starttls:
            raise ValueError("a password is only sent over TLS: set starttls = true")
        return self


class Webhook(_Channel):
    url: str  # https://... (http:// only to this machine): a JSON document is POSTed there
    on: list[Outcome] = ["failure"]
    ca_file: Path | None = None  # the CA(s) that signed the server's certificate; default: the system's
    token_file: Path | None = None  # a bearer token (Authorization header), in a file only root may read
    timeout: str | float = "10s"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = urlsplit(v)
        try:
            u.port  # noqa: B018  (raises for a bad port)
        except ValueError:
            raise ValueError("the webhook's url has a bad port") from None
        if u.scheme not in ("https", "http") or not u.hostname:
            raise ValueError("the webhook's url is https://HOST[:PORT]/PATH")
        if u.username or u.password:
            raise ValueError("the webhook's url holds no credentials: put a token in token_file")
        if u.scheme == "http" and u.hostname not in ("localhost", "127.0.0.1", "::1"):
            raise ValueError("the webhook's url is https:// (http:// only to this machine)")
        return v


class Notify(_Strict):
    syslog: str = "local"  # local (/dev/log), unix:///PATH, udp://HOST[:514], tcp://HOST[:514], none
    syslog_on: list[Outcome] = ["failure", "success"]  # failures at severity err, successes at notice
    email: Email | None = None
    webhook: Webhook | None = None

    @field_validator("syslog")
    @classmethod
    def _syslog(cls, v: str) -> str:
        parse_syslog(v)
        return v

    @field_validator("syslog_on")
    @classmethod
    def _outcomes(cls, v: list[str]) -> list[str]:
        return _on(v)


class Config(_Strict):
    repository: Repository
    api: Api = Api()
    nfs: Nfs = Nfs()
    fuse: Fuse = Fuse()
    scheduler: Scheduler = Scheduler()
    notify: Notify = Notify()
    jobs: list[Job] = []

    @model_validator(mode="after")
    def _unique(self) -> Config:
        names = [j.name for j in self.jobs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two jobs are named {dup[0]!r}")
        return self

    def job(self, name: str) -> Job:
        for j in self.jobs:
            if j.name == name:
                return j
        raise KeyError(name)


class ConfigError(BadInput):
    """The configuration file is wrong: the message names the file, line and key."""


def _lines(text: str) -> dict[tuple[Any, ...], int]:
    """Where each table and key is set in the TOML *text*: ("jobs", 1, "schedule") -> line (1-based).
    ``[[a]]`` headers count their elements; ``[a.b]`` after ``[[a]]`` belongs to a's last element."""
    where: dict[tuple[Any, ...], int] = {}
    counts: dict[tuple[Any, ...], int] = {}
    table: tuple[Any, ...] = ()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^(\[\[?)\s*([\w.\-]+)\s*\]\]?$", line)
        if m:
            path: tuple[Any, ...] = ()
            for part in m.group(2).split("."):
                path += (part,)
                if path in counts and not (m.group(1) == "[[" and path == tuple(m.group(2).split("."))):
                    path += (counts[path],)  # inside the last element of an array of tables
            if m.group(1) == "[[":
                counts[path] = counts.get(path, -1) + 1
                path += (counts[path],)
            table = path
            where.setdefault(table, n)
            continue
        k = re.match(r"^([\w\-]+)\s*=", line)
        if k:
            where.setdefault((*table, k.group(1)), n)
    return where


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """The line that sets *loc*, or the nearest enclosing key or table that the text has."""
    where = _lines(text)
    for end in range(len(loc), 0, -1):
        if loc[:end] in where:
            return where[loc[:end]]
    return None


class _Located(Exception):
    """A problem found before the schema (with its location, as pydantic reports them)."""

    def __init__(self, loc: tuple[Any, ...], msg: str) -> None:
        self.loc, self.msg = loc, msg

    def errors(self) -> list[dict[str, Any]]:
        return [{"loc": self.loc, "msg": self.msg, "type": "value_error"}]


def _check_unique_jobs(doc: dict[str, Any]) -> None:
    seen: set[Any] = set()
    for i, job in enumerate(doc.get("jobs") or []):
        name = job.get("name") if isinstance(job, dict) else None
        if name in seen:
            raise _Located(("jobs", i, "name"), f"two jobs are named {name!r}")
        seen.add(name)


def _schema_error(path: Path, text: str, exc: ValidationError | _Located) -> ConfigError:
    """The first schema problem of *text* (the file *path*) as a ConfigError naming its line and key."""
    e = exc.errors()[0]
    loc = tuple(e["loc"])
    where = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    line = _line_of(text, loc)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key (a typo?)"
    elif e["type"] == "missing":
        msg = "missing"
    hint = f"see the commented example {EXAMPLE}"
    return ConfigError(f"{path}:{line if line else '?'}: {where or '(top)'}: {msg}", hint=hint)


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read configuration {path}: {exc.strerror}", hint=f"create it: see {EXAMPLE}"
        ) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}", hint="fix the TOML syntax there") from None


# Jobs made or edited in the web console: one TOML file each (the job's keys at the top level) in
# ``jobs.d/`` beside the configuration file, named after the job; read after the file's own [[jobs]].
# The console never rewrites the main file (its comments and layout are the administrator's); the
# jobs defined there are shown, run, but edited only there.
JOBS_DIR = "jobs.d"


def jobs_dir(config_path: Path) -> Path:
    return config_path.parent / JOBS_DIR


def _job_files(config_path: Path) -> list[Path]:
    d = jobs_dir(config_path)
    return sorted(p for p in d.glob("*.toml") if p.is_file()) if d.is_dir() else []


def load(path: Path) -> Config:
    """Read and check *path* (and the jobs of its ``jobs.d/``); ConfigError naming the file, line and
    key of the first problem."""
    text, doc = _read_toml(path)
    main_jobs = len(doc.get("jobs") or []) if isinstance(doc.get("jobs"), list) else 0
    for f in _job_files(path):
        job_text, job = _read_toml(f)
        try:
            Job.model_validate(job)
        except ValidationError as exc:
            raise _schema_error(f, job_text, exc) from None
        if job.get("name") != f.stem:
            raise ConfigError(f"{f}: its job is named {job.get('name')!r}, not {f.stem!r} as its file",
                              hint="a file of jobs.d/ holds the job it is named after")  # fmt: skip
        if isinstance(doc.get("jobs"), list):
            doc["jobs"].append(job)
        else:
            doc["jobs"] = [job]
    try:
        _check_unique_jobs(doc)
        config = Config.model_validate(doc)
    except (ValidationError, _Located) as exc:
        loc = exc.errors()[0]["loc"]
        if len(loc) >= 2 and loc[0] == "jobs" and isinstance(loc[1], int) and loc[1] >= main_jobs:
            f = _job_files(path)[loc[1] - main_jobs]
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{f}: {msg}", hint=f"the same name is used in {path}") from None
        raise _schema_error(path, text, exc) from None
    pf = config.repository.passphrase_file
    if pf is not None:
        try:
            mode = pf.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"{path}: repository.passphrase_file {pf}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: repository.passphrase_file {pf} is readable by others",
                hint=f"chmod 600 {pf}",
            )
    n = config.notify
    for loc, secret in (
        (("notify", "email", "password_file"), n.email and n.email.password_file),
        (("notify", "webhook", "token_file"), n.webhook and n.webhook.token_file),
    ):
        if secret:
            _check_private(path, text, loc, secret)
    return config


def _check_private(path: Path, text: str, loc: tuple[str, ...], secret: Path) -> None:
    """A file holding a secret exists, is a regular file and no one but its owner may read it."""
    line = _line_of(text, loc)
    where = f"{path}:{line if line else '?'}: {'.'.join(loc)}"
    try:
        st = secret.stat()
    except OSError as exc:
        raise ConfigError(f"{where}: {secret}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {secret} is not a file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{where}: {secret} is readable by others", hint=f"chmod 600 {secret}")


EXAMPLE = Path(__file__).with_name("example.toml")


# ------------------------------------------------------------------------------------- console jobs
def managed_jobs(config_path: Path) -> set[str]:
    """The names of the jobs kept in ``jobs.d/`` (the console may edit and delete those)."""
    return {f.stem for f in _job_files(config_path)}


def save_job(config_path: Path, job: Job) -> Config:
    """Write *job* as ``jobs.d/<name>.toml`` (replacing one of that name) and read the whole
    configuration again; if that fails (the name is taken in the main file...), the previous file is
    put back and the error raised.  The new Config is returned (the caller applies it, as a reload)."""
    import tomli_w

    d = jobs_dir(config_path)
    d.mkdir(mode=0o750, exist_ok=True)
    target = d / f"{check_name('job', job.name)}.toml"
    before = target.read_bytes() if target.exists() else None
    doc = job.model_dump(mode="json", exclude_defaults=True)
    doc = {"name": job.name, **doc}  # (first, for a person who opens the file)
    write_file(target, tomli_w.dumps(doc).encode(), what="job file", mode=0o640)
    try:
        return load(config_path)
    except ConfigError:
        if before is None:
            target.unlink()
        else:
            write_file(target, before, what="job file", mode=0o640)
        raise


def delete_job(config_path: Path, name: str) -> Config:
    """Remove the job *name* of ``jobs.d/``; the configuration read again."""
    target = jobs_dir(config_path) / f"{check_name('job', name)}.toml"
    target.unlink()
    return load(config_path)
