"""The console's sign-in machinery without a browser: password hashes, sessions (idle, lifetime,
revocation by a reload), the CSRF and origin rules, `vmrecover user new`, and the zip a folder download
becomes.  (The browser flows are tests/test_console.py.)"""

from __future__ import annotations

import argparse
import io
import json
import stat
import tarfile
import time
import tomllib
import zipfile

import pytest

from tests.conftest import Cli, assert_clean_error
from vmrecover.cli import token_cmds
from vmrecover.cli.common import common_options
from vmrecover.errors import ExitCode
from vmrecover.service import auth, config, console


def test_passwords_are_scrypt_hashed_salted_and_checked_in_constant_form() -> None:
    h = auth.hash_password("correct horse battery")
    assert h.startswith(f"$scrypt$ln={auth.SCRYPT_LOG_N},r={auth.SCRYPT_R},p={auth.SCRYPT_P}$")
    assert config.User(name="alice", role="admin", password_hash=h).password_hash == h  # the schema takes it
    assert auth.hash_password("correct horse battery") != h  # a new salt each time
    assert auth.check_password("correct horse battery", h)
    for wrong in ("correct horse batterx", "", "correct horse battery "):
        assert not auth.check_password(wrong, h)
    # a hash with absurd costs (a GiB of memory) is refused rather than computed
    assert not auth.check_password("x", h.replace(f"ln={auth.SCRYPT_LOG_N}", "ln=30"))
    assert not auth.check_password("x", "$2b$12$bcrypt-hashes-are-not-ours")
    with pytest.raises(ValueError, match="password_hash"):
        config.User(name="alice", role="admin", password_hash="plain text")
    with pytest.raises(ValueError, match="invalid user name"):
        config.User(name="../x", role="admin", password_hash=h)
    users = [config.User(name="alice", role="admin", password_hash=h)]
    assert auth.sign_in_user("alice", "correct horse battery", users) == users[0]
    assert auth.sign_in_user("alice", "nope", users) is None
    started = time.monotonic()
    assert auth.sign_in_user("mallory", "correct horse battery", users) is None
    assert time.monotonic() - started > 0.05  # an unknown name costs a hash too (no user enumeration)


def test_sessions_end_when_idle_when_old_and_when_their_credential_goes() -> None:
    now = [1000.0]
    store = auth.WebSessions(clock=lambda: now[0], max_sessions=3)
    token = auth.new_token()
    tokens = [config.Token(name="ops", role="admin", sha256=auth.digest(token))]
    cookie, web = store.new("token", "ops", auth.digest(token))
    assert store.get(cookie, idle=60, lifetime=600) is web and len(web.csrf) >= 43
    assert auth.principal(web, tokens, []) == tokens[0]
    assert auth.principal(web, [], []) is None  # the token was removed by a reload: the session ends
    now[0] += 59
    assert store.get(cookie, idle=60, lifetime=600) is web  # used: the idle clock starts again
    now[0] += 61
    assert store.get(cookie, idle=60, lifetime=600) is None and len(store) == 0
    cookie, web = store.new("user", "alice", "$scrypt$old")
    for _ in range(19):  # used every 30 s: 570 s
        now[0] += 30
        assert store.get(cookie, idle=60, lifetime=600) is web
    now[0] += 31
    assert store.get(cookie, idle=60, lifetime=600) is None  # in use all along, but past its lifetime
    h = auth.hash_password("a long password")
    users = [config.User(name="alice", role="read-only", password_hash=h)]
    _, web = store.new("user", "alice", h)
    who = auth.principal(web, [], users)
    assert who is not None and (who.name, who.role) == ("user:alice", "read-only")
    changed = [config.User(name="alice", role="read-only", password_hash=auth.hash_password("another one"))]
    assert auth.principal(web, [], changed) is None  # a new password ends the sessions of the old one
    assert auth.principal(web, tokens, []) is None  # and a user is never taken for a token
    for _ in range(5):
        store.new("token", "ops", "x")
    assert len(store) == 3  # the least recently used go first
    assert store.get("not-a-cookie", idle=60, lifetime=600) is None


def scope(method: str = "POST", **headers: str) -> dict[str, object]:
    return {"type": "http", "method": method, "scheme": "https",
            "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}  # fmt: skip


def test_origin_rules_and_cookie_parsing() -> None:
    assert auth.same_origin(scope(host="appliance:8443"))  # no Origin (a non-browser client): fine
    assert auth.same_origin(scope(host="appliance:8443", origin="https://appliance:8443"))
    same = scope(host="appliance:8443", origin="https://appliance:8443", sec_fetch_site="same-origin")
    assert auth.same_origin(same)
    for bad in ({"origin": "https://evil.example"}, {"origin": "null"}, {"origin": "http://appliance:8443"},
                {"origin": "https://appliance:8443", "sec_fetch_site": "same-site"},
                {"sec_fetch_site": "cross-site"}):  # fmt: skip
        assert not auth.same_origin(scope(host="appliance:8443", **bad)), bad
    assert not auth.same_origin(scope(origin="https://appliance:8443"))  # no Host to compare with
    assert auth.cookie_value(scope(cookie=f"a=1; {auth.COOKIE}=abc; b=2")) == "abc"
    for header in ("", "a=1", f"{auth.COOKIE}=", 'x="unterminated'):
        assert auth.cookie_value(scope(cookie=header)) is None, header
    assert auth.cookie_value(scope()) is None


def test_user_new_hashes_a_password_read_from_stdin_or_asked_twice(
    tmp_path: object, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = Cli(tmp_path / "repo")  # type: ignore[operator]
    res = cli.run("user", "new", "alice", "--role", "admin", "--password-stdin", "--json",
                  input="a password of some length\n")  # fmt: skip
    doc = res.json()
    assert "a password of some length" not in res.stdout + res.stderr
    assert auth.check_password("a password of some length", doc["password_hash"])
    block = tomllib.loads(doc["config"])["api"]["users"][0]
    assert block == {"name": "alice", "role": "admin", "password_hash": doc["password_hash"]}
    res = cli.run("user", "new", "bob", "--password-stdin", input="short\n", check=False)
    assert_clean_error(res, ExitCode.AUTH, "too short", "12 characters")
    res = cli.run("user", "new", "bob", check=False)  # no terminal, no --password-stdin: never argv
    assert_clean_error(res, ExitCode.AUTH, "no password given", "--password-stdin")
    res = cli.run("user", "new", "../bob", "--password-stdin", input="long enough password\n", check=False)
    assert_clean_error(res, ExitCode.BAD_INPUT, "invalid user name")

    asked = iter(["first long password", "second long password"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(asked))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    parser = argparse.ArgumentParser()
    token_cmds.register(parser.add_subparsers(dest="command"), common_options())
    with pytest.raises(Exception, match="differ"):
        token_cmds.cmd_user_new(parser.parse_args(["user", "new", "carol"]))
    asked = iter(["same long password", "same long password"])
    assert token_cmds.cmd_user_new(parser.parse_args(["user", "new", "carol"])) == 0
    out = capsys.readouterr().out
    assert "same long password" not in out
    assert auth.check_password("same long password", tomllib.loads(out)["api"]["users"][0]["password_hash"])


def test_a_folder_tar_becomes_a_zip_with_its_files_links_modes_and_times() -> None:
    raw = io.BytesIO()
    big = bytes(range(256)) * 9000  # more than one block of the conversion
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind, data, mode, mtime in [
            ("etc", tarfile.DIRTYPE, b"", 0o755, 1_700_000_000),
            ("etc/hosts", tarfile.REGTYPE, b"127.0.0.1 localhost\n", 0o644, 1_700_000_002),
            ("etc/big.bin", tarfile.REGTYPE, big, 0o600, 100),  # before 1980: zip cannot say it
            ("etc/link", tarfile.SYMTYPE, b"", 0o777, 1_700_000_002),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.size = kind, mode, mtime, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname = "hosts"
            tar.addfile(info, io.BytesIO(data) if data else None)
    raw.seek(0)
    with tarfile.open(fileobj=raw, mode="r:") as tar:
        blocks = list(console.tar_to_zip(tar, block=64 * 1024))
    assert len([b for b in blocks if b]) > 3  # streamed in pieces, not built whole
    z = zipfile.ZipFile(io.BytesIO(b"".join(blocks)))
    assert z.testzip() is None
    assert z.namelist() == ["etc/", "etc/hosts", "etc/big.bin", "etc/link"]
    assert z.read("etc/hosts") == b"127.0.0.1 localhost\n" and z.read("etc/big.bin") == big
    assert z.read("etc/link") == b"hosts" and stat.S_ISLNK(z.getinfo("etc/link").external_attr >> 16)
    assert stat.S_IMODE(z.getinfo("etc/big.bin").external_attr >> 16) == 0o600
    assert z.getinfo("etc/hosts").date_time == time.gmtime(1_700_000_002)[:6]  # (zip: 2 s steps)
    assert z.getinfo("etc/big.bin").date_time == (1980, 1, 1, 0, 0, 0)
    assert json.dumps(console.check_pattern("*.conf")) == '"*.conf"'
    for bad in ("", "a\x00b", "x" * 256, "tab\there"):
        with pytest.raises(Exception, match="invalid search pattern"):
            console.check_pattern(bad)
