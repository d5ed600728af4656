"""The service's HTTP API end to end: the real app served by ``serve_api`` (Hypercorn's trio worker,
TLS with the certificate it generates) in a background thread, a real repository made by the CLI, and
urllib3 over TLS verifying that certificate.  Sessions, points and files are the CLI's (compared with
its ``--json``); the single-file download opens a real libguestfs appliance.

Only the scheduler is a stand-in (:class:`StandInScheduler`, for the jobs endpoints), until
service/scheduler.py exists.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import stat
import subprocess
import tarfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Cli, force_unmount, random_image
from vmrecover.cli import token_cmds
from vmrecover.cli.common import common_options
from vmrecover.repo.repository import Repository
from vmrecover.service import auth, config, metrics, tls
from vmrecover.service.api import serve_api
from vmrecover.service.core import Service
from vmrecover.vfs.cache import ChunkCache
from vmrecover.vfs.tree import Vfs

MiB = 1 << 20
ERROR_KEYS = {"error", "message", "hint", "exit_code"}


class StandInScheduler:
    """The JobScheduler protocol (service/core.py) over a dict, for the jobs endpoints only."""

    def __init__(self) -> None:
        self.runs: dict[int, dict[str, Any]] = {}

    def jobs(self) -> list[dict[str, Any]]:
        latest = max(self.runs.values(), key=lambda r: r["id"], default=None)
        return [{"name": "nightly", "kind": "backup", "schedule": "0 2 * * *", "enabled": True,
                 "next_run": "2026-12-03T02:00:00Z", "state": "queued" if latest else "idle",
                 "last_run": latest}]  # fmt: skip

    async def run_now(self, name: str) -> int:
        if name != "nightly":
            raise KeyError(name)
        rid = len(self.runs) + 1
        self.runs[rid] = {"id": rid, "job": name, "state": "queued", "scheduled_for": "2026-12-02T10:00:00Z",
                          "started": None, "ended": None, "attempt": 1, "error": None, "log": []}  # fmt: skip
        return rid

    def history(self, name: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        runs = sorted(self.runs.values(), key=lambda r: -r["id"])
        return [r for r in runs if name in (None, r["job"])][:limit]

    def run(self, run_id: int) -> dict[str, Any]:
        return self.runs[run_id]

    def reload(self, config: config.Config) -> None:
        pass

    def abort(self, reason: str) -> None:
        pass


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")


@dataclass
class Reply:
    status: int
    headers: Any
    data: bytes

    def json(self) -> Any:
        return json.loads(self.data)


class Api:
    """The served API: ``call(method, path, token=..., body=...)`` over verified TLS."""

    def __init__(self, port: int, cert: Path, tokens: dict[str, str], cli: Cli, service: Service) -> None:
        self.port, self.cert, self.tokens, self.cli, self.service = port, cert, tokens, cli, service
        self.pools: dict[str, urllib3.HTTPSConnectionPool] = {}

    def pool(self, source: str) -> urllib3.HTTPSConnectionPool:
        if source not in self.pools:
            self.pools[source] = urllib3.HTTPSConnectionPool(
                "127.0.0.1", self.port, ca_certs=str(self.cert), cert_reqs="CERT_REQUIRED", retries=False,
                timeout=urllib3.Timeout(connect=10, read=180), source_address=(source, 0),
            )  # fmt: skip
        return self.pools[source]

    def call(
        self, method: str, path: str, *, token: str | None = "ops", body: Any = None,
        raw: bytes | None = None, source: str = "127.0.0.1", headers: dict[str, str] | None = None,
    ) -> Reply:  # fmt: skip
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {self.tokens.get(token, token)}"
        if body is not None:
            raw = json.dumps(body).encode()
        if raw is not None:
            h.setdefault("Content-Type", "application/json")
        r = self.pool(source).urlopen(method, path, body=raw, headers=h, redirect=False)
        return Reply(r.status, r.headers, r.data)

    def get(self, path: str, **kw: Any) -> Any:
        r = self.call("GET", path, **kw)
        assert r.status == 200, (r.status, r.data)
        return r.json()


class Served:
    """serve_api in a trio loop of its own thread; stop() cancels it."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.ready: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=trio.run, args=(self._main,), name="api", daemon=True)
        self.thread.start()
        got = self.ready.get(timeout=60)
        if isinstance(got, BaseException):
            raise got
        self.addresses: list[tuple[str, int]] = got

    async def _main(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.cancel, self.token = nursery.cancel_scope, trio.lowlevel.current_trio_token()
                self.ready.put(await nursery.start(serve_api, self.service))
        except BaseException as exc:
            self.ready.put(exc)
            raise

    def stop(self) -> None:
        trio.from_thread.run_sync(self.cancel.cancel, trio_token=self.token)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def fs_image(path: Path) -> Path:
    """A whole-disk ext4 (no partition table, no OS) holding /data/a.txt and /data/sub/b.bin, made by
    mke2fs -d from a folder (no appliance needed to build it)."""
    tree = path.with_suffix(".tree")
    (tree / "data" / "sub").mkdir(parents=True)
    (tree / "data" / "a.txt").write_bytes(b"alpha\n")
    (tree / "data" / "sub" / "b.bin").write_bytes(hashlib.sha256(b"b").digest() * 4096)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "apidata", "-d", str(tree), str(path), "16M"], check=True)
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with serving_api(tmp_path_factory.mktemp("api")) as a:
        yield a


@contextlib.contextmanager
def serving_api(root: Path) -> Iterator[Api]:
    """A repository with points of vm1, vm2 (and data, with a filesystem) served by serve_api over TLS,
    with an admin token "ops" and a read-only one "viewer" (also for other test modules)."""
    cli = Cli(root / "repo", env={"VMRECOVER_FILES_IDLE": "600"})
    cli.run("init", "--chunk-size", "64K")
    cli.run("backup", random_image(root / "vm1.raw", 4 * MiB, seed=1), "--vm", "vm1")
    cli.run("backup", random_image(root / "vm1.raw", 4 * MiB, seed=2), "--vm", "vm1")
    cli.run("backup", random_image(root / "vm2.raw", 2 * MiB, seed=3), "--vm", "vm2")
    random_image(root / "job.raw", 1 * MiB, seed=4)
    if shutil.which("mkfs.ext4"):
        cli.run("backup", fs_image(root / "data.raw"), "--vm", "data", "--format", "raw")
    tokens = {"ops": auth.new_token(), "viewer": auth.new_token()}
    cfg = config.Config(
        repository=config.Repository(path=cli.repo, cache_size="64M"),
        api=config.Api(
            listen=["127.0.0.1:8443"],
            tokens=[
                config.Token(name="ops", role="admin", sha256=auth.digest(tokens["ops"])),
                config.Token(name="viewer", role="read-only", sha256=auth.digest(tokens["viewer"])),
            ],
        ),
        # its own VM: a run (of the real scheduler) adds a point that no other test counts
        jobs=[config.Job(name="nightly", schedule="0 2 * * *", images=[root / "job.raw"], vm="jobvm")],
    )
    # port 0 (a free one) is for tests: the configuration's own check wants a real port
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"listen": ["127.0.0.1:0"]})})
    repo = Repository.open(cli.repo)
    cache = ChunkCache(repo.chunks, 64 * MiB)
    service = Service(repo, cfg, root / "etc" / "vmrecover.toml", cache, Vfs(repo, cache),
                      scheduler=StandInScheduler(), started=time.time())  # fmt: skip
    logs = ListHandler()
    logging.getLogger("vmrecover.api").addHandler(logs)
    logging.getLogger("vmrecover.api").setLevel(logging.INFO)
    try:
        served = Served(service)
        [(host, port)] = served.addresses
        assert host == "127.0.0.1" and port > 0
        a = Api(port, tls.default_paths(service.config_path)[0], tokens, cli, service)
        a.startup_log = list(logs.lines)  # type: ignore[attr-defined]
        yield a
        served.stop()
    finally:
        logging.getLogger("vmrecover.api").removeHandler(logs)
        with contextlib.suppress(Exception):
            cli.run("files", "stop", timeout=120, check=False)
        force_unmount(cli.repo / "run" / "files" / "mnt")  # if the service could not be stopped
        service.vfs.close()
        cache.close()
        repo.close()


def assert_error(r: Reply, status: int, error: str, *words: str) -> dict[str, Any]:
    assert r.status == status, (r.status, r.data)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    doc: dict[str, Any] = r.json()
    assert set(doc) >= ERROR_KEYS and doc["error"] == error, doc
    for w in words:
        assert w.lower() in doc["message"].lower(), doc
    return doc


# --------------------------------------------------------------------------------------------- tests
def test_tls_health_and_openapi(api: Api) -> None:
    """HTTPS with the generated certificate (key 0600, fingerprint logged); health and the OpenAPI
    document need no token; the document says that everything else takes a bearer token."""
    cert, key = tls.default_paths(api.service.config_path)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fp = tls.fingerprint(cert.read_bytes())
    assert any(fp in line for line in api.startup_log), api.startup_log  # type: ignore[attr-defined]
    health = api.get("/api/v1/health", token=None)
    assert health["status"] == "ok" and health["version"] and health["uptime_s"] >= 0
    doc = api.get("/api/v1/openapi.json", token=None)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = ["/api/v1/vms/{vm}/points/{point}", "/api/v1/sessions", "/api/v1/jobs/{name}/run", "/metrics",
             "/api/v1/runs/{run_id}", "/api/v1/vms/{vm}/points/{point}/files/content"]  # fmt: skip
    assert set(paths) <= set(doc["paths"]), sorted(doc["paths"])
    assert doc["paths"]["/api/v1/health"]["get"]["security"] == []
    # plain HTTP on the TLS port is not served
    plain = urllib3.HTTPConnectionPool("127.0.0.1", api.port, retries=False, timeout=10)
    with pytest.raises(urllib3.exceptions.HTTPError):
        plain.urlopen("GET", "/api/v1/health")


def test_no_token_and_wrong_tokens_are_refused_then_rate_limited(api: Api) -> None:
    """401 without a token (not counted) and with a wrong one; the sixth wrong token within a minute
    from one address is a 429 with Retry-After, and so is everything from there meanwhile, even a good
    token; other addresses are not affected."""
    r = api.call("GET", "/api/v1/vms", token=None)
    assert_error(r, 401, "AuthError", "needs a token")
    assert r.headers["www-authenticate"] == "Bearer"
    for _ in range(8):
        assert api.call("GET", "/api/v1/vms", token=None, source="127.0.0.3").status == 401
    assert api.call("GET", "/api/v1/vms", token="viewer", source="127.0.0.3").status == 200
    for i in range(5):
        r = api.call("GET", "/api/v1/vms", token=f"vmr_guess{i}", source="127.0.0.2")
        assert_error(r, 401, "AuthError", "not valid")
    assert api.call("GET", "/api/v1/vms", token="Basic", source="127.0.0.2").status == 429
    r = api.call("POST", "/api/v1/jobs/nightly/run", token="ops", source="127.0.0.2")
    doc = assert_error(r, 429, "AuthError", "too many failed")
    assert 50 <= int(r.headers["retry-after"]) <= 60, r.headers
    assert "try again" in doc["hint"]
    assert api.call("GET", "/api/v1/vms", token="viewer").status == 200  # 127.0.0.1 is not limited
    assert api.service.scheduler is not None and not api.service.scheduler.history("nightly")


def test_read_only_token_cannot_change_anything(
    api: Api, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmrecover.api.audit")
    before = api.get("/api/v1/sessions", token="viewer")
    for method, path, body in [
        ("POST", "/api/v1/sessions", {"vm": "vm1"}),
        ("DELETE", "/api/v1/sessions/anything", None),
        ("POST", "/api/v1/sessions/anything/migrate", {"to": str(tmp_path / "x.qcow2")}),
        ("POST", "/api/v1/jobs/nightly/run", None),
        ("POST", "/api/v1/vms/vm1/points/latest/boot-checks", {}),
    ]:
        r = api.call(method, path, token="viewer", body=body)
        doc = assert_error(r, 403, "AuthError", "read-only", "viewer")
        assert doc["exit_code"] == 8
    assert api.get("/api/v1/sessions", token="viewer") == before
    assert not list(tmp_path.iterdir())
    refused = [r for r in caplog.records if r.name == "vmrecover.api.audit"]
    assert len(refused) == 5 and all('token="viewer"' in r.getMessage() and "status=403" in r.getMessage()
                                     and r.levelno == logging.WARNING for r in refused)  # fmt: skip


def test_admin_mutations_are_logged_with_the_token_name(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """Run a job now (the stand-in scheduler), follow it; the change is logged with the token's name."""
    caplog.set_level(logging.INFO, logger="vmrecover.api.audit")
    r = api.call("POST", "/api/v1/jobs/nightly/run")
    assert r.status == 202, r.data
    run = r.json()["run"]
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "vmrecover.api.audit"]
    assert any('token="ops"' in m and "method=POST" in m and '"/api/v1/jobs/nightly/run"' in m
               and "status=202" in m and "role=admin" in m for m in lines), lines  # fmt: skip
    assert api.get(f"/api/v1/runs/{run}", token="viewer")["state"] == "queued"
    assert [h["id"] for h in api.get("/api/v1/jobs/nightly/history?limit=5")] == [run]
    assert api.get("/api/v1/jobs")[0]["state"] == "queued"
    assert_error(api.call("POST", "/api/v1/jobs/weekly/run"), 404, "NotFound", "weekly")
    assert_error(api.call("GET", "/api/v1/runs/999"), 404, "NotFound", "999")
    sched, api.service.scheduler = api.service.scheduler, None
    try:
        assert_error(api.call("GET", "/api/v1/jobs"), 503, "Unavailable", "scheduler is not running")
    finally:
        api.service.scheduler = sched
    # a failed mutation is logged too, with its status
    caplog.clear()
    assert api.call("DELETE", "/api/v1/sessions/no-such-session").status == 404
    assert any(
        'token="ops"' in rec.getMessage() and "status=404" in rec.getMessage() for rec in caplog.records
    )


TRAVERSALS = [  # (method, raw path, JSON body): every name the API takes
    ("GET", "/api/v1/vms/../points", None),
    ("GET", "/api/v1/vms/..%2F..%2Fetc/points", None),
    ("GET", "/api/v1/vms/vm1%00/points", None),
    ("GET", "/api/v1/vms/.hidden/points", None),
    ("GET", "/api/v1/vms/vm1/points/..", None),
    ("GET", "/api/v1/vms/vm1/points/..%2F..%2Findexes", None),
    ("GET", "/api/v1/vms/..%5C..%5Cetc/points/latest", None),
    ("GET", "/api/v1/vms/vm1/points/latest/files?path=/../../etc/passwd", None),
    ("GET", "/api/v1/vms/vm1/points/latest/files?path=data/..", None),
    ("GET", "/api/v1/vms/vm1/points/latest/files/content?path=..%2F..%2Fetc%2Fshadow", None),
    ("GET", "/api/v1/vms/vm1/points/latest/files/content?path=C:%5C..%5Cx", None),
    ("GET", "/api/v1/vms/vm1/points/latest/files/content?path=/etc/%00", None),
    ("GET", "/api/v1/vms/../points/latest/files?path=/", None),
    ("POST", "/api/v1/sessions", {"vm": "../vm1"}),
    ("POST", "/api/v1/sessions", {"vm": "vm1", "point": "../../x"}),
    ("POST", "/api/v1/sessions", {"vm": "vm1", "name": "../../escaped"}),
    ("POST", "/api/v1/sessions", {"vm": "vm1", "name": ".."}),
    ("POST", "/api/v1/sessions", {"vm": "vm1@latest"}),
    ("DELETE", "/api/v1/sessions/..", None),
    ("DELETE", "/api/v1/sessions/..%2F..%2Fcatalog.sqlite", None),
    ("POST", "/api/v1/sessions/..%2Fx/migrate", {"to": "/tmp/x.qcow2"}),
    ("POST", "/api/v1/sessions/s/migrate", {"to": "/tmp/../etc/x.qcow2"}),
    ("POST", "/api/v1/sessions/s/migrate", {"to": "relative.qcow2"}),
    ("POST", "/api/v1/sessions/s/migrate", {"to": "/tmp/x.qcow2", "disk": "../x"}),
    ("POST", "/api/v1/jobs/..%2F..%2Fetc/run", None),
    ("GET", "/api/v1/vms/..%2Fvm1/points/latest/boot-checks", None),
    ("GET", "/api/v1/vms/vm1/points/..%2F..%2Fx/boot-checks/1/screenshot", None),
    ("GET", "/api/v1/vms/vm1/points/latest/boot-checks/..%2F1/serial", None),
    ("POST", "/api/v1/vms/..%2Fvm1/points/latest/boot-checks", {}),
    ("POST", "/api/v1/vms/vm1/points/..%2F..%2Fx/boot-checks", {}),
    ("GET", "/api/v1/jobs/../history", None),
]


def repo_files(root: Path) -> list[str]:
    """Every file and folder of the repository but run/ (where the services keep their state)."""
    out = []
    for top, dirs, files in os.walk(root):
        if Path(top) == root and "run" in dirs:
            dirs.remove("run")
        out += [os.path.join(top, n) for n in dirs + files]
    return sorted(out)


def test_path_traversal_in_every_name_is_refused(api: Api) -> None:
    """400 (a bad name) or 404 (no such route or object), always a JSON error, and nothing made or
    read outside: no session, no appliance started, the repository's files as they were."""
    listing = repo_files(api.cli.repo)
    for method, path, body in TRAVERSALS:
        r = api.call(method, path, body=body)
        assert r.status in (400, 404), (method, path, r.status, r.data)
        assert set(r.json()) >= ERROR_KEYS, (path, r.data)
    assert api.get("/api/v1/sessions") == []
    assert repo_files(api.cli.repo) == listing
    assert not (api.cli.repo / "run" / "files" / "files.sock").exists()  # no appliance was asked


def test_malformed_requests_get_json_errors(api: Api) -> None:
    d = assert_error(
        api.call("POST", "/api/v1/sessions", raw=b'{"vm": "vm1",'), 400, "BadInput", "not valid JSON"
    )
    assert d["exit_code"] == 6
    assert_error(api.call("POST", "/api/v1/sessions", body={"vm": 5}), 422, "BadInput", "body.vm", "string")
    assert_error(api.call("POST", "/api/v1/sessions", body={}), 422, "BadInput", "body.vm", "required")
    assert_error(api.call("POST", "/api/v1/sessions", body=["vm1"]), 422, "BadInput")
    assert_error(
        api.call("POST", "/api/v1/sessions", body={"vm": "vm1", "power": 1}), 422, "BadInput", "power"
    )
    r = api.call("POST", "/api/v1/sessions/s/migrate", body={"to": "/tmp/x", "overwrite": "yes"})
    assert_error(r, 422, "BadInput", "overwrite")
    r = api.call("POST", "/api/v1/sessions/s/migrate", body={"to": "/tmp/x", "format": "zip"})
    assert_error(r, 422, "BadInput", "format")
    big = {"vm": "vm1", "name": "x" * (200 * 1024)}
    assert_error(api.call("POST", "/api/v1/sessions", body=big), 413, "BadInput", "larger than")
    assert_error(api.call("GET", "/api/v1/runs/abc"), 422, "BadInput", "run_id")
    assert_error(api.call("GET", "/api/v1/jobs/nightly/history?limit=0"), 422, "BadInput", "limit")
    assert_error(api.call("GET", "/api/v1/nothing-here"), 404, "NotFound", "no such endpoint")
    assert_error(api.call("PUT", "/api/v1/sessions", body={}), 405, "UsageError", "not allowed")
    assert api.get("/api/v1/sessions") == []


def test_vms_points_and_repository_usage_are_the_clis(api: Api) -> None:
    assert api.get("/api/v1/vms", token="viewer") == api.cli.json("list")
    listing = api.cli.json("list", "vm1")
    assert api.get("/api/v1/vms/vm1/points") == listing
    first, latest = listing["points"]
    assert api.get("/api/v1/vms/vm1/points/latest") == latest
    assert api.get(f"/api/v1/vms/vm1/points/{first['id'][:6]}") == first
    assert api.get(f"/api/v1/vms/vm1/points/{latest['created'][:26]}")["id"] == latest["id"]
    assert_error(api.call("GET", "/api/v1/vms/nobody/points"), 404, "NotFound", "nobody")
    assert_error(api.call("GET", "/api/v1/vms/vm1/points/ffffffffffff"), 404, "NotFound")
    usage = api.get("/api/v1/repository?fresh=true", token="viewer")
    chunk_files = [p for p in (api.cli.repo / "chunks").rglob("*") if p.is_file()]
    assert usage["chunks"]["count"] == len(chunk_files) > 0
    assert usage["chunks"]["bytes"] == sum(p.stat().st_size for p in chunk_files)
    vms = api.cli.json("list")["vms"]
    assert usage["vms"] == len(vms) and usage["points"] == sum(v["points"] for v in vms)
    assert usage["sessions"] == 0 and usage["filesystem"]["available"] > 0
    assert usage["backups"]["bytes_read"] > 0 and usage["chunk_size"] == 64 * 1024


def test_sessions_started_stopped_and_migrated_through_the_api_are_the_clis(api: Api, tmp_path: Path) -> None:
    r = api.call("POST", "/api/v1/sessions", body={"vm": "vm1", "name": "api-s1"})
    assert r.status == 201, r.data
    started = r.json()
    api.cli.run("recover", "start", "vm2", "--name", "cli-s2")
    listed = api.get("/api/v1/sessions", token="viewer")
    assert listed == api.cli.json("recover", "list")
    assert [s["name"] for s in listed] == ["api-s1", "cli-s2"] and listed[0] == started
    assert started["point"] == api.cli.json("list", "vm1")["points"][-1]["id"]
    r = api.call("POST", "/api/v1/sessions", body={"vm": "vm1", "name": "api-s1"})
    assert_error(r, 400, "BadInput", "exists")
    assert api.get("/api/v1/repository")["sessions"] == 2

    dest = tmp_path / "out.qcow2"
    r = api.call("POST", "/api/v1/sessions/api-s1/migrate", body={"to": str(dest)})
    assert r.status == 200, r.data
    assert r.json()["path"] == str(dest) and r.json()["format"] == "qcow2" and dest.stat().st_size > 0
    r = api.call("POST", "/api/v1/sessions/api-s1/migrate", body={"to": str(dest)})
    assert_error(r, 400, "BadInput", "exists")

    for name in ("api-s1", "cli-s2"):
        r = api.call("DELETE", f"/api/v1/sessions/{name}")
        assert r.status == 200 and r.json()["stopped"] is True, r.data
    assert api.cli.json("recover", "list") == [] == api.get("/api/v1/sessions")
    assert_error(api.call("DELETE", "/api/v1/sessions/api-s1"), 404, "NotFound", "api-s1")
    assert_error(api.call("POST", "/api/v1/sessions", body={"vm": "ghost"}), 404, "NotFound", "ghost")


def test_metrics_parse(api: Api) -> None:
    metrics.nfs_calls.labels(procedure="READ").observe(0.002)  # as the NFS server will
    assert api.call("GET", "/metrics", token=None).status == 401
    r = api.call("GET", "/metrics", token="viewer")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain"), r.headers
    samples = {}
    for family in text_string_to_metric_families(r.data.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    points = {v["name"]: v["points"] for v in api.cli.json("list")["vms"]}
    assert samples[("vmrecover_restore_points", (("vm", "vm1"),))] == points["vm1"] == 2
    assert samples[("vmrecover_backup_read_bytes", (("vm", "vm2"),))] > 0
    assert samples[("vmrecover_last_backup_timestamp_seconds", (("vm", "vm1"),))] > time.time() - 3600
    assert samples[("vmrecover_recovery_sessions", ())] == 0
    assert samples[("vmrecover_repository_chunks", ())] > 0
    assert ("vmrecover_chunk_cache_hits_total", ()) in samples
    assert samples[("vmrecover_chunk_cache_capacity_bytes", ())] == 64 * MiB
    jobs = api.get("/api/v1/jobs")
    state = jobs[0]["state"]
    assert samples[("vmrecover_jobs", (("state", state),))] == 1
    assert samples[("vmrecover_nfs_call_seconds_count", (("procedure", "READ"),))] >= 1
    assert samples[("vmrecover_api_requests_total", (("method", "GET"), ("status", "401")))] >= 1


def test_token_new_prints_the_token_once_and_its_config_lines(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    """`token new`: the token and the [[api.tokens]] lines; pasted into the configuration (as a reload
    does), the token works at once."""
    parser = argparse.ArgumentParser()
    token_cmds.register(parser.add_subparsers(dest="command"), common_options())
    args = parser.parse_args(["token", "new", "ci-bot", "--role", "admin"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    token = next(w for w in out.split() if w.startswith(auth.TOKEN_PREFIX))
    block = tomllib.loads(out[out.index("[[api.tokens]]") :])["api"]["tokens"][0]
    assert block == {"name": "ci-bot", "role": "admin", "sha256": hashlib.sha256(token.encode()).hexdigest()}
    assert token not in out[out.index("[[api.tokens]]") :]  # only its digest goes into the file

    args = parser.parse_args(["token", "new", "grafana", "--json"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["role"] == "read-only" and doc["sha256"] == auth.digest(doc["token"])
    assert tomllib.loads(doc["config"])["api"]["tokens"][0]["name"] == "grafana"
    with pytest.raises(Exception, match="invalid token name"):
        token_cmds.cmd_new(parser.parse_args(["token", "new", "../x"]))

    assert api.call("GET", "/api/v1/vms", token=token).status == 401
    old = api.service.config
    new_tokens = [*old.api.tokens, config.Token(**block)]
    api.service.config = old.model_copy(update={"api": old.api.model_copy(update={"tokens": new_tokens})})
    try:
        assert api.call("GET", "/api/v1/vms", token=token).status == 200
    finally:
        api.service.config = old
    assert api.call("GET", "/api/v1/vms", token=token).status == 401  # revoked by the next "reload"


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)")
def test_list_and_download_files_of_a_point(api: Api) -> None:
    """Through the repository's file-restore service (one libguestfs appliance, ~20 s under TCG): a
    folder listing as `files ls --json`, a file as itself, a folder as a tar."""
    pytest.importorskip("guestfs", reason="needs libguestfs (make setup)")
    # The CLI first: the file-restore service is then started by its process.  Started from this one
    # (the API's), files/service.py's Popen would be collected while the service runs: a ResourceWarning
    expected = api.cli.json("files", "ls", "data", "/data")
    listing = api.get("/api/v1/vms/data/points/latest/files?path=/data", token="viewer")
    assert listing == expected
    assert {e["path"] for e in listing["entries"]} == {"/data/a.txt", "/data/sub"}
    r = api.call("GET", "/api/v1/vms/data/points/latest/files/content?path=/data/a.txt", token="viewer")
    assert r.status == 200 and r.data == b"alpha\n", (r.status, r.data)
    assert r.headers["content-type"] == "application/octet-stream"
    assert 'filename="a.txt"' in r.headers["content-disposition"]
    r = api.call("GET", "/api/v1/vms/data/points/latest/files/content?path=/data", token="viewer")
    assert r.status == 200 and r.headers["content-type"] == "application/x-tar", (r.status, r.data[:200])
    with tarfile.open(fileobj=io.BytesIO(r.data)) as tar:
        names = {m.name: m for m in tar}
        assert {"data", "data/a.txt", "data/sub", "data/sub/b.bin"} <= set(names)
        member = tar.extractfile(names["data/sub/b.bin"])
        assert member is not None and member.read() == hashlib.sha256(b"b").digest() * 4096
    r = api.call("GET", "/api/v1/vms/data/points/latest/files/content?path=/data/missing", token="viewer")
    assert_error(r, 404, "NotFound", "missing")
    downloads = api.cli.repo / "run" / "api-downloads"
    assert list(downloads.iterdir()) == []  # nothing kept once streamed
    assert os.stat(downloads).st_mode & 0o077 == 0


def test_a_second_catalog_in_a_process_keeps_its_commits_visible(cli: Cli, tmp_path: Path) -> None:
    """Two catalog connections in one process (the service's, and any part's), then a CLI command:
    commits made afterwards must still reach other processes."""
    from vmrecover.recovery import sessions
    from vmrecover.repo.catalog import Catalog

    cli.run("backup", random_image(tmp_path / "a.raw", 1 * MiB, seed=9), "--vm", "a")
    with Repository.open(cli.repo) as repo:
        second = Catalog(cli.repo / "catalog.sqlite")
        try:
            cli.run("list")  # another process opens and closes the catalog
            sessions.start(repo, repo.catalog.resolve("a"), "seen")
            assert [s["name"] for s in cli.json("recover", "list")] == ["seen"]
        finally:
            second.close()


# ------------------------------------------------------------------------------------- without a server
def test_failure_limiter_counts_per_address_within_the_window() -> None:
    now = [1000.0]
    lim = auth.FailureLimiter(max_failures=3, window=60, clock=lambda: now[0], max_clients=2)
    for _ in range(3):
        assert lim.retry_after("a") is None
        lim.failed("a")
    assert lim.retry_after("a") == 60 and lim.retry_after("b") is None
    now[0] += 30
    assert lim.retry_after("a") == 30
    now[0] += 30.5
    assert lim.retry_after("a") is None  # the failures left the window
    lim.failed("b")
    lim.failed("c")
    lim.failed("d")  # at most two addresses are remembered: the oldest goes
    assert sorted(lim._failures) == ["c", "d"]


def test_authenticate_takes_bearer_tokens_only() -> None:
    token = auth.new_token()
    known = [config.Token(name="x", role="admin", sha256=auth.digest(token))]
    assert auth.authenticate(f"Bearer {token}", known) == known[0]
    assert auth.authenticate(f"bearer   {token} ", known) == known[0]
    for header in (None, token, f"Basic {token}", "Bearer", "Bearer ", f"Bearer {token}x"):
        assert auth.authenticate(header, known) is None, header


def test_tls_generated_once_and_kept_private(tmp_path: Path) -> None:
    api_cfg = config.Api(listen=["192.0.2.7:8443", "[::]:8443"])
    first = tls.ensure(api_cfg, tmp_path / "vmrecover.toml")
    assert first.generated and stat.S_IMODE(first.key.stat().st_mode) == 0o600
    again = tls.ensure(api_cfg, tmp_path / "vmrecover.toml")
    assert again.fingerprint == first.fingerprint  # kept, not made again
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    ips = {str(i) for i in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
           .get_values_for_type(x509.IPAddress)}  # fmt: skip
    assert {"127.0.0.1", "::1", "192.0.2.7"} <= ips and "::" not in ips
    first.key.chmod(0o644)
    with pytest.raises(Exception, match="readable by others"):
        tls.ensure(api_cfg, tmp_path / "vmrecover.toml")
    given = config.Api(tls_cert=first.cert, tls_key=tmp_path / "missing.pem")
    with pytest.raises(Exception, match="cannot read"):
        tls.ensure(given, tmp_path / "vmrecover.toml")
