"""The service's configuration file: the example is valid and complete, and every kind of mistake is
refused naming the file, the line and the key (what `serve --check-config` and a reload report)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmrecover.service import config

EXAMPLE = config.EXAMPLE.read_text()


def test_the_example_is_valid_and_mentions_every_key() -> None:
    c = config.load(config.EXAMPLE)
    assert [j.name for j in c.jobs] == [
        "web-nightly",
        "images",
        "weekly-gc",
        "monthly-verify",
        "weekly-boot-check",
    ]
    assert c.jobs[-1].kind == "boot-check" and c.jobs[-1].vms == ["web01"]
    assert c.jobs[0].retention == config.Retention(keep_last=3, daily=7, weekly=4, monthly=6)

    def fields(model: type[config.BaseModel]) -> set[str]:
        out = {f.alias or name for name, f in model.model_fields.items()}  # as written: `from`, not from_
        for f in model.model_fields.values():
            for t in (*getattr(f.annotation, "__args__", ()), f.annotation):
                if isinstance(t, type) and issubclass(t, config.BaseModel):
                    out |= fields(t)
        return out

    keys = set(re.findall(r"^\s*#?\s*(\w+) =", EXAMPLE, re.M)) | set(re.findall(r"[{,] (\w+) =", EXAMPLE))
    # tables, also those commented out because they need a real server (`# [notify.email]`)
    tables = {p for h in re.findall(r"^#?\s*\[\[?([\w.]+)\]\]?", EXAMPLE, re.M) for p in h.split(".")}
    missing = sorted(fields(config.Config) - keys - tables)
    assert not missing, f"keys the example does not show: {missing}"


CASES = [  # (text in the example, what it becomes, the error's pattern, the start of the line it names)
    ('schedule = "30 1 * * *"', 'schedule = "61 1 * * *"',
     r"jobs\[1\]\.schedule: '61 1 \* \* \*' is not a cron", "schedule ="),
    ("per_host = 1 ", "per_hots = 1 ", r"scheduler\.per_hots: unknown key", "per_hots ="),
    ('role = "admin"  ', 'role = "root"  ', r"api\.tokens\[0\]\.role: Input should be 'admin' or 'read-only'",
     "role ="),
    ("[fuse]", "[fuse\n", r"Expected '\]' at the end of a table declaration \(at line \d+", None),
    ('name = "images"', 'name = "web-nightly"', r"jobs\[1\]\.name: two jobs are named 'web-nightly'",
     'name = "web-nightly"'),
    ('name = "images"', 'name = "../etc"', r"jobs\[1\]\.name: invalid job name", 'name = "../etc"'),
    ('retry_backoff = "5m"', 'retry_backoff = "soon"', r"scheduler\.retry_backoff: cannot read duration",
     "retry_backoff ="),
    ('vm = "build01"\n', "", r"jobs\[1\]: a backup job of images names the vm", "[[jobs]]"),
    ('listen = ["0.0.0.0:8443"]', 'listen = ["0.0.0.0"]',
     r"api\.listen: listen address '0\.0\.0\.0' is not HOST:PORT", "listen ="),
    ('syslog = "local"', 'syslog = "udp://logs:70000"',
     r"notify\.syslog: syslog destination 'udp://logs:70000' is not one of", "syslog ="),
    ('syslog_on = ["failure", "success"]', 'syslog_on = ["failure", "sucess"]',
     r"notify\.syslog_on\[1\]: Input should be 'failure' or 'success'", "syslog_on ="),
    ('name = "admin"', 'name = "local"', r"api\.tokens\[0\]\.name: .*'local' names the service's local",
     'name = "local"'),
    ('bandwidth = "200M"', 'bandwidth = "0"', r"jobs\[0\]\.bandwidth: '0': a bandwidth cap must be more",
     "bandwidth ="),
]  # fmt: skip


@pytest.mark.parametrize(("old", "new", "where", "on"), CASES)
def test_mistakes_name_the_line_and_the_key(
    tmp_path: Path, old: str, new: str, where: str, on: str | None
) -> None:
    assert old in EXAMPLE
    path = tmp_path / "vmrecover.toml"
    path.write_text(EXAMPLE.replace(old, new, 1))
    with pytest.raises(config.ConfigError) as e:
        config.load(path)
    assert str(path) in e.value.message and re.search(where, e.value.message), e.value.message
    m = re.search(rf"{re.escape(str(path))}:(\d+):", e.value.message)
    if on is not None:  # the line named is the one the mistake is on
        assert m is not None
        assert EXAMPLE.replace(old, new, 1).splitlines()[int(m.group(1)) - 1].startswith(on)


def test_a_passphrase_file_others_can_read_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "passphrase"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    path = tmp_path / "vmrecover.toml"
    path.write_text(
        EXAMPLE.replace('# passphrase_file = "/etc/vmrecover/passphrase"', f'passphrase_file = "{secret}"')
    )
    with pytest.raises(config.ConfigError, match="readable by others"):
        config.load(path)
    secret.chmod(0o600)
    assert config.load(path).repository.passphrase_file == secret


def test_the_examples_commented_notify_sections_load(tmp_path: Path) -> None:
    """[notify.email] and [notify.webhook] are commented out (they need real servers): as written, with
    their secret files made, they load."""
    text = re.sub(r"^# (\[notify\.\w+\]\n(?:# .*\n)*)", lambda m: re.sub(r"^# ", "", m[0], flags=re.M),
                  EXAMPLE, flags=re.M)  # fmt: skip
    for name in ("smtp-password", "hook-token"):
        (tmp_path / name).write_text("s3cret\n")
        (tmp_path / name).chmod(0o600)
        text = text.replace(f"/etc/vmrecover/{name}", str(tmp_path / name))
    path = tmp_path / "vmrecover.toml"
    path.write_text(text)
    n = config.load(path).notify
    assert n.email is not None and n.webhook is not None
    assert (n.email.from_, n.email.to, n.email.on) == ("vmrecover@example.com", ["backup-admins@example.com"],
                                                       ["failure"])  # fmt: skip
    assert n.webhook.token_file == tmp_path / "hook-token" and n.webhook.on == ["failure", "success"]
    (tmp_path / "hook-token").chmod(0o640)
    with pytest.raises(config.ConfigError, match=r":\d+: notify\.webhook\.token_file: .* readable by others"):
        config.load(path)


def test_a_boot_check_job_names_repository_vms_and_a_valid_pattern() -> None:
    job = {"name": "bc", "kind": "boot-check", "schedule": "0 7 * * 6"}
    assert config.Job(**job).vms == [] and config.Job(**job).boot_timeout == "5m"  # every VM
    for bad, pattern in (
        ({"images": ["/srv/a.raw"]}, "no hypervisor or images"),
        ({"vms": ["../etc"]}, "VM name"),
        ({"expect": "(unclosed"}, "not a regular expression"),
        ({"boot_timeout": "soon"}, "soon"),
    ):
        with pytest.raises(config.ValidationError, match=pattern):
            config.Job(**job, **bad)


def test_jobs_of_jobs_d_join_the_files_jobs_and_their_mistakes_name_their_file(tmp_path: Path) -> None:
    main = tmp_path / "vmrecover.toml"
    main.write_text('[repository]\npath = "/srv/repo"\n\n[[jobs]]\nname = "nightly"\nkind = "gc"\n'
                    'schedule = "0 2 * * *"\n')  # fmt: skip
    assert [j.name for j in config.load(main).jobs] == ["nightly"] and config.managed_jobs(main) == set()
    made = config.save_job(main, config.Job(name="weekly", kind="verify", schedule="0 3 * * 0"))
    assert [j.name for j in made.jobs] == ["nightly", "weekly"] and config.managed_jobs(main) == {"weekly"}
    saved = tmp_path / "jobs.d" / "weekly.toml"
    assert saved.read_text().startswith('name = "weekly"\n') and (saved.stat().st_mode & 0o777) == 0o640
    # a job of the same name as the file's is refused, and the file is not left behind
    with pytest.raises(config.ConfigError, match=r"jobs\.d/nightly\.toml: two jobs are named 'nightly'"):
        config.save_job(main, config.Job(name="nightly", kind="gc", schedule="0 4 * * *"))
    assert not (tmp_path / "jobs.d" / "nightly.toml").exists()
    # a replacement that the whole configuration refuses puts the previous file back
    before = saved.read_text()
    main.write_text(main.read_text() + '\n[[jobs]]\nname = "weekly"\nkind = "gc"\nschedule = "0 5 * * *"\n')
    with pytest.raises(config.ConfigError, match="two jobs are named 'weekly'"):
        config.save_job(main, config.Job(name="weekly", kind="verify", schedule="0 6 * * 0"))
    assert saved.read_text() == before
    main.write_text(main.read_text().rsplit("\n[[jobs]]", 1)[0])
    saved.write_text(before + 'schedul = "0 1 * * *"\n')
    with pytest.raises(config.ConfigError, match=r"weekly\.toml:4: schedul: unknown key"):
        config.load(main)
    (tmp_path / "jobs.d" / "other.toml").write_text('name = "weekly2"\nkind = "gc"\nschedule = "0 1 * * *"\n')
    saved.write_text(before)
    with pytest.raises(config.ConfigError, match="named 'weekly2', not 'other'"):
        config.load(main)
    (tmp_path / "jobs.d" / "other.toml").unlink()
    assert [j.name for j in config.delete_job(main, "weekly").jobs] == ["nightly"]
