"""The service's scheduler and job runner (service/scheduler.py, service/runner.py) and `vmrecover job`,
with real parts: real repositories (the `cli` fixture), real backups of small images, the VMware and
XAPI simulators where a VM's host and datastores matter, a real SIGKILL.  Cron and backoff run on
trio's MockClock (the scheduler's wall clock follows it), the rest in real time."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import (
    CHUNK,
    Cli,
    assert_clean_error,
    corrupt_chunk,
    make_sparse_image,
    random_image,
    sha256_file,
)
from vmrecover.errors import ExitCode
from vmrecover.repo.catalog import SCHEMA_VERSION
from vmrecover.repo.repository import Repository
from vmrecover.service.config import Config
from vmrecover.service.scheduler import Scheduler, iso, local_now, next_slot

MiB = 1 << 20
T0 = datetime(2026, 3, 2, 1, 30, tzinfo=UTC)  # what the scheduler's clock says at trio time 0
FINISHED = ("succeeded", "failed", "interrupted")


def mock_now() -> datetime:
    return T0 + timedelta(seconds=trio.current_time())


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead once the loop has been idle 10 ms of real time (a backup in a
    worker thread is not idleness that long: its run's polls keep the loop busy)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


def config(repo: Path, jobs: list[dict[str, Any]], notify: str = "none", **scheduler: Any) -> Config:
    return Config.model_validate(
        {
            "repository": {"path": str(repo)},
            "scheduler": scheduler,
            "notify": {"syslog": notify},
            "jobs": jobs,
        }
    )


def vm_disk(path: Path, seed: int) -> Path:
    """A 2 MiB disk for a simulated VM: 512 KiB of data (read in one request), then a hole."""
    return make_sparse_image(path, 2 * MiB, [(0, random.Random(seed).randbytes(512 * 1024))])


def image_job(name: str, image: Path, vm: str, schedule: str = "0 2 * * *", **more: Any) -> dict[str, Any]:
    return {"name": name, "schedule": schedule, "images": [str(image)], "vm": vm, **more}


@pytest.fixture
def repo(cli: Cli) -> Iterator[Repository]:
    r = Repository.open(cli.repo)
    yield r
    r.close()


@asynccontextmanager
async def serving(repo: Repository, cfg: Config, **kw: Any) -> AsyncIterator[Scheduler]:
    """A scheduler serving in the test's trio loop; cancelled (running jobs aborted) at the end."""
    sched = Scheduler(repo, cfg, **kw)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sched.serve)
            yield sched
            nursery.cancel_scope.cancel()
    finally:
        sched.close()


async def finished(sched: Scheduler, run_id: int, timeout: float = 60, poll: float = 0.02) -> dict[str, Any]:
    return await until(lambda: (doc := sched.run(run_id))["state"] in FINISHED and doc, timeout, poll)


async def finished_v(sched: Scheduler, run_id: int) -> dict[str, Any]:
    """:func:`finished` under the MockClock."""
    return await finished(sched, run_id, timeout=3600, poll=5)


async def until(check: Callable[[], Any], timeout: float = 30, poll: float = 0.02) -> Any:
    """*check*'s first true answer, asked every *poll* seconds (virtual seconds under the MockClock,
    where each poll also costs the clock's autojump threshold of real time)."""
    with trio.fail_after(timeout):
        while not (got := check()):
            await trio.sleep(poll)
    return got


def overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Did the two VM backups (their docs in a run's stats) run at the same time?"""
    return a["started"] < b["ended"] and b["started"] < a["ended"]


# --------------------------------------------------------------------------- cron, missed runs, retries
@pytest.mark.trio
async def test_cron_next_run_and_slots_missed_while_down_run_once(
    repo: Repository, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    img = random_image(tmp_path / "a.raw", 1 * MiB, seed=1)
    cfg = config(repo.root, [image_job("hourly", img, "a", "0 * * * *")])
    async with serving(repo, cfg, now=mock_now) as sched:
        (job,) = sched.jobs()
        assert job["next_run"] == "2026-03-02T02:00:00.000000Z" and job["state"] == "idle"
        assert job["last_run"] is None
        (run,) = await until(lambda: sched.history("hourly"), timeout=3600, poll=15)
        assert mock_now() >= T0 + timedelta(minutes=30)  # not before its slot
        run = await finished_v(sched, run["id"])
        assert (run["trigger"], run["scheduled_for"], run["state"]) == (
            "schedule", "2026-03-02T02:00:00.000000Z", "succeeded",
        )  # fmt: skip
        assert sched.jobs()[0]["next_run"] == "2026-03-02T03:00:00.000000Z"
    await trio.sleep(5 * 3600)  # down from about 02:00 to 07:00: five slots pass
    async with serving(repo, cfg, now=mock_now) as sched:
        runs = await until(lambda: [r for r in sched.history("hourly") if r["id"] != run["id"]], 3600, 5)
        assert [(r["trigger"], r["scheduled_for"]) for r in runs] == [
            ("schedule", "2026-03-02T07:00:00.000000Z")
        ]
        assert (await finished_v(sched, runs[0]["id"]))["state"] == "succeeded"
        # the next slot runs as usual
        runs = await until(lambda: len(h := sched.history("hourly")) == 3 and h, timeout=7200, poll=60)
        assert [r["scheduled_for"][11:16] for r in runs] == ["08:00", "07:00", "02:00"]
        await finished_v(sched, runs[0]["id"])
    assert len(repo.catalog.points("a")) == 3


@pytest.mark.trio
async def test_a_failed_run_is_retried_with_backoff_then_recorded_failed_with_its_reason(
    repo: Repository, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    missing = tmp_path / "gone.raw"
    yearly = "0 0 1 1 *"  # no slot comes during the test
    cfg = config(repo.root, [image_job("nightly", missing, "v", yearly)], retries=2, retry_backoff="5m")
    async with serving(repo, cfg, now=mock_now) as sched:
        first = await sched.run_now("nightly")

        def ended() -> list[dict[str, Any]]:
            runs = sorted(sched.history("nightly"), key=lambda r: r["id"])
            return runs if len(runs) == 3 and runs[-1]["state"] in FINISHED else []

        runs = await until(ended, timeout=3600, poll=5)
        await trio.sleep(3600)
        assert len(sched.history("nightly")) == 3  # two retries, no more
        assert [r["attempt"] for r in runs] == [1, 2, 3]
        assert [r["trigger"] for r in runs] == ["manual", "retry", "retry"]
        assert [r["retry_of"] for r in runs] == [None, first, runs[1]["id"]]
        assert {r["state"] for r in runs} == {"failed"}
        starts = [datetime.fromisoformat(r["started"]) for r in runs]
        ends = [datetime.fromisoformat(r["ended"]) for r in runs]
        # 5m, then doubled (and the scheduler's tick, at most a minute, may pass while a run is recorded)
        assert 300 <= (starts[1] - ends[0]).total_seconds() < 362
        assert 600 <= (starts[2] - ends[1]).total_seconds() < 662
        for r in runs:
            assert str(missing) in r["error"] and "does not exist" in r["error"], r["error"]
            (vm,) = r["stats"]["vms"]
            assert vm["state"] == "failed" and vm["exit_code"] == ExitCode.NOT_FOUND
        (job,) = sched.jobs()
        assert job["state"] == "idle" and job["last_run"]["id"] == runs[-1]["id"]
        assert job["last_run"]["error"] == runs[-1]["error"]
        assert repo.catalog.points("v") == []
        # a retry that works ends the series
        again = await finished_v(sched, await sched.run_now("nightly"))
        random_image(missing, 1 * MiB, seed=2)
        retry = await until(
            lambda: [r for r in sched.history("nightly") if r["retry_of"] == again["id"]], 3600, 5
        )
        assert (await finished_v(sched, retry[0]["id"]))["state"] == "succeeded"
        await trio.sleep(3600)
        runs = [r for r in sched.history("nightly") if r["id"] >= again["id"]]
        assert [(r["attempt"], r["state"]) for r in runs] == [(2, "succeeded"), (1, "failed")]
    assert len(repo.catalog.points("v")) == 1


# --------------------------------------------------------------------------- caps
@pytest.fixture
def vc(cli: Cli, vsphere: Any) -> Iterator[Cli]:
    cli.run("hypervisor", "add", "vc1", vsphere.vmware_url, "--ca-file", vsphere.ca_file, "--password-stdin",
            input=vsphere.password + "\n")  # fmt: skip
    yield cli


def vm_job(name: str, vms: list[str], hv: str = "vc1", **more: Any) -> dict[str, Any]:
    return {"name": name, "schedule": "0 2 * * *", "hypervisor": hv, "vms": vms, **more}


@pytest.mark.trio
async def test_per_host_cap_backups_on_one_host_one_after_the_other_on_two_hosts_at_once(
    vc: Cli, repo: Repository, vsphere: Any, tmp_path: Path
) -> None:
    """Three jobs, each one VM: cap-a and cap-b on host DC0_C0_H0, cap-c on DC0_C0_H1, all on one
    datastore (per_datastore is raised so that only the host counts).  Disk reads are slowed."""
    for i, (vm, host) in enumerate([("cap-a", "DC0_C0_H0"), ("cap-b", "DC0_C0_H0"), ("cap-c", "DC0_C0_H1")]):
        vsphere.make_vm(vm, [vm_disk(tmp_path / f"{vm}.raw", i)], host=host)
    vsphere.proxy.delays["/folder"] = 0.6
    jobs = [vm_job("a", ["cap-a"]), vm_job("b", ["cap-b"]), vm_job("c", ["cap-c"])]
    cfg = config(repo.root, jobs, per_host=1, per_datastore=9, max_streams=9)
    async with serving(repo, cfg) as sched:
        ids = [await sched.run_now(j) for j in ("a", "b", "c")]
        # one of a and b waits for the host, while the other and c run
        waiting = await until(lambda: [j for j in sched.jobs() if j["state"] == "waiting"])
        assert [j["name"] for j in waiting] in (["a"], ["b"])
        assert waiting[0]["waiting_for"] == ["host DC0_C0_H0 (vc1)"]
        wid = waiting[0]["runs"][0]
        assert (
            sched.run(wid)["state"] == "waiting"
            and sched.run(wid)["waiting_for"] == waiting[0]["waiting_for"]
        )
        await until(lambda: repo.catalog.job_run(wid).state == "waiting")  # the catalog says so too
        docs = [await finished(sched, i) for i in ids]
    assert [d["state"] for d in docs] == ["succeeded"] * 3, [d["error"] for d in docs]
    a, b, c = (d["stats"]["vms"][0] for d in docs)
    assert (a["host"], b["host"], c["host"]) == ("DC0_C0_H0 (vc1)", "DC0_C0_H0 (vc1)", "DC0_C0_H1 (vc1)")
    assert a["datastores"] == ["LocalDS_0 (vc1)"]
    assert not overlap(a, b)
    first = a if a["started"] < b["started"] else b
    assert overlap(first, c)
    assert max(a["waited_s"], b["waited_s"]) > 0.5 and c["waited_s"] < 0.5
    assert a["kind"] == "full" and a["disks"][0]["read_whole"] == "changed block tracking was just enabled"


@pytest.mark.trio
async def test_max_streams_caps_backups_in_all_and_per_datastore_too(
    vc: Cli, repo: Repository, vsphere: Any, tmp_path: Path
) -> None:
    """Two VMs on two hosts of one datastore: one stream in all (two jobs), then one backup per
    datastore (one job of both VMs)."""
    for i, (vm, host) in enumerate([("str-a", "DC0_C0_H0"), ("str-b", "DC0_C0_H1")]):
        vsphere.make_vm(vm, [vm_disk(tmp_path / f"{vm}.raw", 10 + i)], host=host)
    vsphere.proxy.delays["/folder"] = 0.4
    jobs = [vm_job("a", ["str-a"]), vm_job("b", ["str-b"]), vm_job("both", ["str-a", "str-b"])]
    cfg = config(repo.root, jobs, max_streams=1, per_datastore=9)
    async with serving(repo, cfg) as sched:
        ids = [await sched.run_now("a"), await sched.run_now("b")]
        waits = await until(lambda: [w for i in ids for w in sched.run(i)["waiting_for"]])
        assert waits == ["a stream (1 backups run: max_streams)"]
        a, b = [(await finished(sched, i))["stats"]["vms"][0] for i in ids]
        assert a["state"] == b["state"] == "succeeded" and not overlap(a, b), (a, b)
        sched.reload(config(repo.root, jobs, max_streams=9, per_datastore=1))
        run_id = await sched.run_now("both")
        assert await until(lambda: sched.run(run_id)["waiting_for"]) == ["datastore LocalDS_0 (vc1)"]
        doc = await finished(sched, run_id)
    assert doc["state"] == "succeeded", doc["error"]
    a, b = doc["stats"]["vms"]
    assert not overlap(a, b), (a, b)


@pytest.mark.trio
async def test_reload_keeps_a_running_job_and_new_schedules_apply_from_then(
    vc: Cli, repo: Repository, vsphere: Any, tmp_path: Path
) -> None:
    vsphere.make_vm("rl-a", [vm_disk(tmp_path / "rl.raw", 20)])
    vsphere.proxy.delays["/folder"] = 0.5
    cfg = config(repo.root, [vm_job("rl", ["rl-a"], retention={"keep_last": 5})])
    async with serving(repo, cfg) as sched:
        run_id = await sched.run_now("rl")
        await until(lambda: sched.run(run_id)["progress"] and sched.run(run_id)["progress"]["total"])
        new = config(repo.root, [vm_job("rl", ["rl-a"], schedule="30 4 * * *", retention={"keep_last": 1})],
                     max_streams=1)  # fmt: skip
        sched.reload(new)
        (job,) = sched.jobs()
        assert job["schedule"] == "30 4 * * *" and job["next_run"] == iso(
            next_slot("30 4 * * *", local_now())
        )
        assert job["state"] == "running"
        doc = await finished(sched, run_id)
        assert doc["state"] == "succeeded" and doc["stats"]["retention"] == {"removed": {"rl-a": []}}
        assert doc["progress"] is None and doc["log"]
        # the next run is the new configuration's: keep_last 1
        doc = await finished(sched, await sched.run_now("rl"))
        assert doc["state"] == "succeeded" and len(doc["stats"]["retention"]["removed"]["rl-a"]) == 1
    with sqlite3.connect(repo.root / "catalog.sqlite") as db:
        assert db.execute("SELECT schedule FROM job_slots WHERE job = 'rl'").fetchone() == ("30 4 * * *",)


@pytest.mark.trio
async def test_a_vsphere_folder_selects_its_vms_and_tags_are_refused_plainly(
    vc: Cli, repo: Repository, vsphere: Any, tmp_path: Path
) -> None:
    vm = vsphere.make_vm("fold-a", [vm_disk(tmp_path / "f.raw", 40)], host="DC0_C0_H1")
    folder = vsphere.props(vsphere.find("Datacenter", "DC0"), "vmFolder")["vmFolder"].CreateFolder("sched-f")
    vsphere.wait(folder.MoveIntoFolder_Task([vsphere.obj("VirtualMachine", vm)]))
    cfg = config(repo.root, [vm_job("f", ["folder:/DC0/vm/sched-f", "tag:prod", "folder:/DC0/vm/none"])])
    async with serving(repo, cfg) as sched:
        doc = await finished(sched, await sched.run_now("f"))
    got, tag, none = doc["stats"]["vms"]
    assert (got["target"], got["vm"], got["state"], got["host"]) == (
        vm,
        "fold-a",
        "succeeded",
        "DC0_C0_H1 (vc1)",
    )
    assert tag["state"] == "failed" and "tag:prod: vSphere keeps tags in its REST tagging API" in tag["error"]
    assert none["state"] == "failed" and "no VM folder '/DC0/vm/none' on vc1" in none["error"]
    assert doc["state"] == "failed" and doc["error"].startswith("2 of 3 VMs failed")


# --------------------------------------------------------------------------- placement on XenServer
@pytest.mark.trio
async def test_xen_placement_a_vm_that_fails_is_retried_alone_and_an_unreachable_pool_fails_cleanly(
    cli: Cli, repo: Repository, xapi: Any, tmp_path: Path
) -> None:
    cli.run("hypervisor", "add", "pool1", f"xen://root@127.0.0.1:{xapi.port}", "--ca-file", xapi.ca_file,
            "--password-stdin", input=xapi.password + "\n")  # fmt: skip
    cli.run("hypervisor", "add", "down", "xen://root@127.0.0.1:1", "--no-check", "--password-stdin",
            input="secret\n")  # fmt: skip
    running = xapi.make_vm("sx-run", [vm_disk(tmp_path / "r.raw", 30)])
    xapi.make_vm("sx-member", [vm_disk(tmp_path / "m.raw", 32)], host=xapi.member_ref)
    halted = xapi.make_vm("sx-halt", [vm_disk(tmp_path / "h.raw", 31)], power_state="Halted",
                          other_config={"folder": "/sx-prod/web"})  # fmt: skip
    with xapi.session() as s:
        s.xenapi.VM.add_tags(running, "sx-tagged")
    master = xapi.record("host", xapi.host_ref)["name_label"]
    member = xapi.record("host", xapi.member_ref)["name_label"]
    local_sr = xapi.record("SR", xapi.local_sr)["name_label"]
    jobs = [vm_job("x", ["sx-run", "sx-halt", "sx-member", "sx-later"], hv="pool1"),
            vm_job("d", ["a", "b"], hv="down"),
            vm_job("sel", ["tag:sx-tagged", "folder:/sx-prod"], hv="pool1")]  # fmt: skip
    cfg = config(repo.root, jobs, retries=1, retry_backoff="1s")
    async with serving(repo, cfg) as sched:
        first = await finished(sched, await sched.run_now("x"))
        assert first["state"] == "failed" and first["error"].startswith("sx-later: no VM 'sx-later' on pool1")
        run, halt, other, later = first["stats"]["vms"]
        assert [v["state"] for v in (run, halt, other, later)] == ["succeeded"] * 3 + ["failed"]
        assert run["host"] == halt["host"] == f"{master} (pool1)"  # a halted VM: the pool master
        assert other["host"] == f"{member} (pool1)"  # where it runs (resident_on)
        assert run["datastores"] == halt["datastores"] == [f"{local_sr} (pool1)"]
        assert not overlap(run, halt) and not overlap(halt, other) and not overlap(run, other)  # one SR
        assert run["transport"] == "NBD" and later["exit_code"] == ExitCode.NOT_FOUND
        xapi.make_vm("sx-later", [2 * MiB])
        retry = await until(lambda: [r for r in sched.history("x") if r["trigger"] == "retry"])
        retry = await finished(sched, retry[0]["id"])
        assert (retry["state"], retry["vms"], retry["attempt"]) == ("succeeded", ["sx-later"], 2)
        assert [v["target"] for v in retry["stats"]["vms"]] == ["sx-later"]
        down = await finished(sched, await sched.run_now("d"))
        assert down["state"] == "failed" and down["stats"]["exit_code"] == ExitCode.UNREACHABLE
        assert [v["state"] for v in down["stats"]["vms"]] == ["failed", "failed"]
        assert "127.0.0.1" in down["stats"]["vms"][0]["error"], down["stats"]["vms"][0]
        sel = await finished(sched, await sched.run_now("sel"))  # by tag, by XenCenter folder
        assert sel["state"] == "succeeded", sel["error"]
        by_tag, by_folder = sel["stats"]["vms"]
        assert (by_tag["vm"], by_folder["vm"]) == ("sx-run", "sx-halt")
        assert by_folder["target"] == xapi.record("VM", halted)["uuid"]
    assert sorted(v["name"] for v in repo.catalog.vms()) == ["sx-halt", "sx-later", "sx-member", "sx-run"]


# --------------------------------------------------------------------------- crashes
def test_a_killed_service_leaves_no_partial_point_and_its_run_is_retried_once(
    cli: Cli, tmp_path: Path
) -> None:
    """`vmrecover job run` SIGKILLed when the backup's chunks and indexes are durable but its point is
    not committed (the worst moment); the next start of the scheduler says so and runs the job once."""
    img = random_image(tmp_path / "k.raw", 2 * MiB, seed=40)
    path = tmp_path / "vmrecover.toml"
    job = f'[[jobs]]\nname = "k"\nschedule = "0 2 * * *"\nimages = ["{img}"]\nvm = "k"\n'
    path.write_text(f'[repository]\npath = "{cli.repo}"\n[scheduler]\nretries = 0\n\n{job}')
    killer = Cli(cli.repo, env={"VMRECOVER_FAULT": "backup.before-commit=SIGKILL"})
    res = killer.run("job", "run", "k", "--config", path, check=False)
    assert res.returncode == -9, res
    assert cli.json("list")["vms"] == []  # no partial point ...
    (left,) = [p for p in (cli.repo / "indexes").iterdir()]  # ... only its indexes, for gc
    (row,) = cli.json("job", "history", "--config", path)["runs"]
    assert row["state"] == "running"  # as the dead process left it

    async def restart() -> list[dict[str, Any]]:
        repo = Repository.open(cli.repo)
        try:
            async with serving(repo, Config.model_validate(_toml(path))) as sched:
                resumes = await until(lambda: [r for r in sched.history("k") if r["trigger"] == "resume"])
                await finished(sched, resumes[0]["id"])
                return sched.history("k")
        finally:
            repo.close()

    resumed, killed = trio.run(restart)
    assert killed["id"] == row["id"] and killed["state"] == "interrupted"
    assert killed["error"] == f"the process that ran it (pid {row['pid']}) ended during the run"
    assert (resumed["trigger"], resumed["retry_of"], resumed["attempt"]) == ("resume", row["id"], 2)
    assert resumed["state"] == "succeeded" and resumed["vms"] is None
    (point,) = cli.json("list", "k")["points"]
    assert point["id"] == resumed["stats"]["vms"][0]["point"] and point["id"] != left.name
    cli.run("restore", "k", "--to", tmp_path / "out.raw")
    assert sha256_file(tmp_path / "out.raw") == sha256_file(img)
    assert cli.json("verify")["ok"]
    assert cli.json("gc")["removed_index_dirs"] == 1  # the killed backup's indexes
    assert len(trio.run(restart_once_more, cli.repo, path)) == 2  # resumed once only


async def restart_once_more(root: Path, path: Path) -> list[dict[str, Any]]:
    repo = Repository.open(root)
    try:
        async with serving(repo, Config.model_validate(_toml(path))) as sched:
            await trio.sleep(0.3)
            return sched.history("k")
    finally:
        repo.close()


def _toml(path: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(path.read_text())


def test_sigterm_stops_job_run_cleanly_and_that_run_is_not_resumed(cli: Cli, tmp_path: Path) -> None:
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:  # 384 MiB of data: a backup that takes a while
        for _ in range(384):
            f.write(os.urandom(MiB))
    path = tmp_path / "vmrecover.toml"
    job = f'[[jobs]]\nname = "big"\nschedule = "0 2 * * *"\nimages = ["{big}"]\nvm = "big"\n'
    path.write_text(f'[repository]\npath = "{cli.repo}"\n\n{job}')
    proc = cli.popen("job", "run", "big", "--config", path)
    deadline = time.monotonic() + 60
    while True:  # until it runs (the catalog, read directly: a command would take too long) ...
        with contextlib.suppress(sqlite3.Error), sqlite3.connect(cli.repo / "catalog.sqlite") as db:
            if db.execute("SELECT state FROM job_runs").fetchone() == ("running",):
                break
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.5)  # ... and reads
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "stopping the job" in err and "Traceback" not in err
    (run,) = cli.json("job", "history", "--config", path)["runs"]
    assert run["state"] == "interrupted" and run["error"] == "stopped: SIGTERM to vmrecover job run"
    assert run["stats"]["resume"] is False and run["stats"]["vms"][0]["state"] == "interrupted"
    assert cli.json("list")["vms"] == [] and cli.json("gc")["removed_chunks"] == 0  # nothing was left

    async def restart() -> list[dict[str, Any]]:
        repo = Repository.open(cli.repo)
        try:
            async with serving(repo, Config.model_validate(_toml(path))) as sched:
                await trio.sleep(0.3)
                return sched.history("big")
        finally:
            repo.close()

    assert [r["id"] for r in trio.run(restart)] == [run["id"]]  # a stop on purpose is not resumed


# --------------------------------------------------------------------------- retention, gc, verify
@pytest.mark.trio
async def test_retention_after_each_run_then_gc_and_verify_jobs(
    cli: Cli, repo: Repository, tmp_path: Path
) -> None:
    img = random_image(tmp_path / "r.raw", 2 * MiB, seed=50)
    other = random_image(tmp_path / "o.raw", 1 * MiB, seed=51)
    jobs = [image_job("keep2", img, "r", retention={"keep_last": 2}), image_job("other", other, "o"),
            {"name": "gc", "kind": "gc", "schedule": "0 5 * * 0"},
            {"name": "verify", "kind": "verify", "schedule": "0 6 1 * *"}]  # fmt: skip
    cfg = config(repo.root, jobs, retries=2, retry_backoff="1s")
    async with serving(repo, cfg) as sched:
        for _ in range(3):
            await finished(sched, await sched.run_now("other"))
        points = []
        for i in range(3):
            random_image(img, 2 * MiB, seed=60 + i)  # new data each time: chunks to free later
            doc = await finished(sched, await sched.run_now("keep2"))
            assert doc["state"] == "succeeded"
            points.append(doc["stats"]["vms"][0]["point"])
            removed = doc["stats"]["retention"]["removed"]["r"]
            assert removed == ([] if i < 2 else [points[0]])
        assert [p.id for p in repo.catalog.points("r")] == points[1:]
        assert len(repo.catalog.points("o")) == 3  # another job's VM: its own retention (none)
        gc_doc = await finished(sched, await sched.run_now("gc"))
        assert gc_doc["state"] == "succeeded" and gc_doc["stats"]["gc"]["removed_chunks"] > 0
        ok = await finished(sched, await sched.run_now("verify"))
        assert ok["state"] == "succeeded" and ok["stats"]["verify"]["ok"]
        assert ok["stats"]["verify"]["points"] == 5
        data = other.read_bytes()
        corrupt_chunk(
            repo.root,
            next(data[i : i + CHUNK] for i in range(0, len(data), CHUNK) if any(data[i : i + CHUNK])),
        )
        bad = await finished(sched, await sched.run_now("verify"))
        assert bad["state"] == "failed" and bad["error"].startswith("verify found damage: 1 bad chunk")
        assert bad["stats"]["exit_code"] == ExitCode.INTEGRITY
        await trio.sleep(1.5)
        assert [r["id"] for r in sched.history("verify")] == [bad["id"], ok["id"]]  # damage: no retry


@pytest.mark.trio
async def test_hooks_run_around_the_backups_and_the_end_of_a_run_goes_to_syslog(
    repo: Repository, tmp_path: Path
) -> None:
    img = random_image(tmp_path / "h.raw", 1 * MiB, seed=80)
    said = tmp_path / "hooks.txt"
    sh = [
        "/bin/sh",
        "-c",
        f'echo "$VMRECOVER_PHASE $VMRECOVER_JOB $VMRECOVER_VM $VMRECOVER_RESULT $VMRECOVER_RUN" >> {said}',
    ]
    log_path = tmp_path / "log.sock"
    refuse = ["/bin/sh", "-c", "echo cannot freeze; exit 3"]
    jobs = [image_job("hooked", img, "h", pre_hook=sh, post_hook=sh),
            image_job("frozen", img, "f", pre_hook=refuse, post_hook=sh)]  # fmt: skip
    with trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as syslog:
        await syslog.bind(str(log_path))
        async with serving(repo, config(repo.root, jobs, notify=f"unix://{log_path}", retries=0)) as sched:
            ok = await finished(sched, await sched.run_now("hooked"))
            assert ok["state"] == "succeeded", ok["error"]
            assert said.read_text().split("\n")[:2] == [
                f"pre hooked h  {ok['id']}",
                f"post hooked h succeeded {ok['id']}",
            ]
            assert (
                ok["stats"]["hooks"]["pre"]["exit_code"] == 0
                and ok["stats"]["hooks"]["post"]["exit_code"] == 0
            )
            with trio.fail_after(10):
                message = (await syslog.recv(65536)).decode(errors="replace")
            assert "hooked" in message and "succeeded" in message, message
            bad = await finished(sched, await sched.run_now("frozen"))
        assert bad["state"] == "failed" and bad["error"].startswith("pre-hook /bin/sh exited 3")
        assert "cannot freeze" in bad["error"] and bad["stats"]["hooks"]["pre"]["output"] == ["cannot freeze"]
        assert bad["stats"]["vms"] == [] and "post" not in bad["stats"]["hooks"]  # nothing was frozen
        assert repo.catalog.points("f") == [] and len(said.read_text().splitlines()) == 2
        with trio.fail_after(10):
            message = (await syslog.recv(65536)).decode(errors="replace")
        assert "frozen" in message and "failed" in message, message


def test_a_catalog_of_schema_3_gets_the_job_tables(cli: Cli, tmp_path: Path) -> None:
    db = sqlite3.connect(cli.repo / "catalog.sqlite")
    db.executescript("DROP TABLE job_runs; DROP TABLE job_slots; UPDATE meta SET value = '3' WHERE key = "
                     "'schema_version';")  # fmt: skip
    db.close()
    path = tmp_path / "vmrecover.toml"
    path.write_text(f'[repository]\npath = "{cli.repo}"\n')
    assert cli.json("job", "history", "--config", path) == {"job": None, "runs": []}
    db = sqlite3.connect(cli.repo / "catalog.sqlite")
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.close()


# --------------------------------------------------------------------------- the CLI
def test_job_run_list_and_history_on_the_command_line(cli: Cli, tmp_path: Path) -> None:
    img = random_image(tmp_path / "c.raw", 1 * MiB, seed=70)
    path = tmp_path / "vmrecover.toml"
    path.write_text(
        f'[repository]\npath = "{cli.repo}"\n\n'
        f'[[jobs]]\nname = "img"\nschedule = "15 3 * * *"\nimages = ["{img}"]\nvm = "c"\n'
        f'retention = {{ keep_last = 1 }}\n\n'
        f'[[jobs]]\nname = "broken"\nschedule = "0 4 * * *"\nimages = ["{tmp_path / "no.raw"}"]\nvm = "n"\n'
        '\n[[jobs]]\nname = "gc"\nkind = "gc"\nschedule = "0 5 * * 0"\nenabled = false\n'
    )  # fmt: skip
    doc = cli.json("job", "run", "img", "--config", path)
    assert doc["state"] == "succeeded" and doc["trigger"] == "manual" and doc["pid"] != os.getpid()
    (vm,) = doc["stats"]["vms"]
    assert vm["vm"] == "c" and vm["kind"] == "full" and vm["bytes_read"] > 0
    assert vm["disks"][0]["name"] == "c" and vm["disks"][0]["mode"] == "full"
    assert cli.json("list", "c")["points"][0]["id"] == vm["point"]
    res = cli.run("job", "run", "img", "--config", path)
    assert "retention removed 1 point(s) of c" in res.stdout and "succeeded" in res.stdout
    res = cli.run("job", "run", "broken", "--config", path, check=False)
    assert_clean_error(
        res, ExitCode.NOT_FOUND, r"run 3 of job broken: failed: n: image .*no\.raw does not exist"
    )
    assert_clean_error(cli.run("job", "run", "nope", "--config", path, "--json", check=False),
                       ExitCode.NOT_FOUND, "no job named 'nope'", "jobs: img, broken, gc")  # fmt: skip
    jobs = {j["name"]: j for j in cli.json("job", "list", "--config", path)["jobs"]}
    assert (
        jobs["img"]["next_run"] == iso(next_slot("15 3 * * *", local_now()))
        and jobs["img"]["state"] == "idle"
    )
    assert jobs["img"]["last_run"]["state"] == "succeeded"
    assert jobs["broken"]["last_run"]["error"].startswith("n: image")
    assert (
        jobs["gc"]["enabled"] is False and jobs["gc"]["next_run"] is None and jobs["gc"]["last_run"] is None
    )
    runs = cli.json("job", "history", "img", "--config", path)["runs"]
    assert [r["id"] for r in runs] == [2, 1] and {r["state"] for r in runs} == {"succeeded"}
    assert [r["id"] for r in cli.json("job", "history", "--config", path, "--limit", "1")["runs"]] == [3]
    text = cli.run("job", "list", "--config", path).stdout
    assert "img" in text and "disabled" in text and "failed" in text
    text = cli.run("job", "history", "--config", path).stdout
    assert "1/1 VMs" in text and "0/1 VMs" in text
    assert_clean_error(cli.run("job", "list", "--config", tmp_path / "none.toml", check=False),
                       ExitCode.BAD_INPUT, "cannot read configuration")  # fmt: skip


def text_disk(path: Path, size: int, seed: int) -> Path:
    """A disk of lines of words: compressible, and more so at a higher zstd level."""
    rnd = random.Random(seed)
    vocab = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(3000)]  # fmt: skip
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rnd.choices(vocab, k=12)) + "\n").encode()
    path.write_bytes(out[:size])
    return path


@pytest.mark.trio
async def test_a_jobs_bandwidth_cap_and_compression_level_apply_to_its_backups(
    cli: Cli, repo: Repository, tmp_path: Path
) -> None:
    size = 8 * MiB
    jobs = [
        image_job("free", random_image(tmp_path / "f.raw", size, seed=70, density=1.0), "f"),
        image_job(
            "capped", random_image(tmp_path / "c.raw", size, seed=71, density=1.0), "c", bandwidth="4M"
        ),
        image_job("fast", text_disk(tmp_path / "t1.raw", size, seed=72), "t1", compression_level=1),
        image_job("small", text_disk(tmp_path / "t2.raw", size, seed=73), "t2", compression_level=19),
        {"name": "verify", "kind": "verify", "schedule": "0 6 1 * *"},
    ]
    async with serving(repo, config(repo.root, jobs)) as sched:
        docs = {}
        for name in ("free", "capped", "fast", "small", "verify"):
            docs[name] = await finished(sched, await sched.run_now(name))
            assert docs[name]["state"] == "succeeded", docs[name]
    free, capped = (docs[n]["stats"]["vms"][0] for n in ("free", "capped"))
    assert free["bytes_read"] == capped["bytes_read"] == size
    # 8 MiB at 4 MiB/s: about 2 s (no burst at the start), whatever this machine's speed
    assert capped["duration_s"] >= 1.6 > free["duration_s"], (capped, free)
    assert size / capped["duration_s"] <= 4.6 * MiB
    fast, small = (docs[n]["stats"]["vms"][0]["stored_bytes"] for n in ("fast", "small"))
    assert small < 0.9 * fast, (small, fast)  # level 19 against level 1 on the same kind of text
    assert docs["verify"]["stats"]["verify"]["ok"]  # the chunks of every level read back
    assert repo.config.compression_level == 1  # the repository's own level (the default) is not touched


def test_throttle_keeps_the_rate_saves_at_most_one_second_of_burst_and_stops_on_abort() -> None:
    from vmrecover.ingest.throttle import Throttle

    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    t = Throttle(1000, clock=lambda: now[0], sleep=sleep)
    t.take(500)
    assert sum(slept) == pytest.approx(0.5)
    now[0] += 60  # a long quiet spell earns one second, no more
    slept.clear()
    t.take(1000)
    t.take(1000)
    assert sum(slept) == pytest.approx(1.0)

    class Stop(Exception):
        pass

    def check() -> None:
        if sum(slept) > 1.4:
            raise Stop

    with pytest.raises(Stop):
        t.take(10_000, check)  # a 10 s debt: the abort cuts the sleep within a slice
    assert sum(slept) < 1.8
    with pytest.raises(ValueError):
        Throttle(0)


@pytest.mark.trio
async def test_a_run_asked_of_a_scheduler_not_running_is_refused_as_unavailable(
    repo: Repository, tmp_path: Path
) -> None:
    from vmrecover.service.core import Unavailable

    cfg = config(repo.root, [image_job("j", random_image(tmp_path / "j.raw", MiB, seed=80), "j")])
    async with serving(repo, cfg) as sched:
        pass
    with pytest.raises(Unavailable, match=r"the scheduler is (stopping|not running)") as e:
        await sched.run_now("j")
    assert e.value.http_status == 503 and e.value.hint  # the API answers 503 with the hint
    with pytest.raises(KeyError):
        await sched.run_now("ghost")


@pytest.mark.trio
async def test_each_job_keeps_its_latest_runs_only(repo: Repository, tmp_path: Path) -> None:
    jobs = [image_job("a", random_image(tmp_path / "a.raw", MiB, seed=81), "a"),
            image_job("b", random_image(tmp_path / "b.raw", MiB, seed=82), "b")]  # fmt: skip
    async with serving(repo, config(repo.root, jobs, keep_runs=2)) as sched:
        b = await finished(sched, await sched.run_now("b"))
        ids = [(await finished(sched, await sched.run_now("a")))["id"] for _ in range(4)]
        assert [r["id"] for r in sched.history("a")] == ids[:-3:-1]  # the two newest
        assert [r["id"] for r in sched.history("b")] == [b["id"]]  # another job's are its own
    assert len(repo.catalog.points("a")) == 4  # the points stay: only the runs' records go


def test_a_jobs_threads_yield_the_cpu_to_the_services_and_give_their_priority_back() -> None:
    """Backups run as threads of the service: they are nicer than its API/NFS thread (else two backups
    starve it: bench/service_bench.py), their pool threads inherit that, and the worker thread gets its
    own priority back for the next call it serves."""
    import threading

    from vmrecover.service.runner import BACKGROUND_NICE, background_priority

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: dict[str, int] = {}

    def work() -> None:
        seen["before"] = nice()
        with background_priority():
            seen["inside"] = nice()
            t = threading.Thread(target=lambda: seen.__setitem__("child", nice()))
            t.start()
            t.join()
        seen["after"] = nice()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["inside"] == seen["child"] == min(19, seen["before"] + BACKGROUND_NICE)
    assert seen["after"] == seen["before"] == nice()  # (and this thread was never touched)
