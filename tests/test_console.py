"""The web console in a real browser: Debian's chromium (headless) driven by Selenium through its
chromedriver, against `vmrecover serve` (its API over TLS with the generated certificate, the real
scheduler, the FUSE datastore, libguestfs for files, qemu for boot checks).

Every page the tests visit is saved as a PNG under ``test-output/console/`` (or $VMRECOVER_TEST_OUTPUT)
for a person to look at.  The security tests go round the browser as an attacker would: requests with
the console's cookie but without its CSRF token or from another origin, another site's page that posts
to the console, a read-only user who calls the API by hand, and path traversal in every parameter.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from tests.conftest import Cli, force_unmount, needs_fuse, random_image
from tests.test_service import Served
from tests.test_service_api import fs_image
from tests.testkit import browser as browser_kit
from vmrecover.hypervisors import Hypervisor, Registry
from vmrecover.service import auth, tls

MiB = 1 << 20
MANY = 1500  # files in one folder of the data VM's second point (the console's windowed table)
OUTPUT = Path(os.environ.get("VMRECOVER_TEST_OUTPUT") or Path(__file__).parents[1] / "test-output")
OUTPUT /= "console"
PASSWORDS = {"alice": "alice-correct-horse", "bob": "bob-battery-staple"}

pytestmark = [needs_fuse]


class Console:
    """The served console: its URL, the CLI of its repository, tokens, and HTTPS calls as a script."""

    def __init__(self, cli: Cli, served: Served, port: int, cert: Path, tokens: dict[str, str], config: Path,
                 job_image: Path) -> None:  # fmt: skip
        self.cli, self.served, self.port, self.tokens = cli, served, port, tokens
        self.config, self.job_image = config, job_image
        self.url = f"https://127.0.0.1:{port}"
        self.pool = urllib3.HTTPSConnectionPool(
            "127.0.0.1", port, ca_certs=str(cert), cert_reqs="CERT_REQUIRED", retries=False, timeout=300
        )
        self.cert = cert

    def call(self, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None,
             source: str = "127.0.0.1") -> urllib3.BaseHTTPResponse:  # fmt: skip
        raw = None if body is None else json.dumps(body).encode()
        h = {"Content-Type": "application/json"} if raw is not None else {}
        if source == "127.0.0.1":
            return self.pool.urlopen(method, path, body=raw, headers={**h, **(headers or {})}, redirect=False)
        with urllib3.HTTPSConnectionPool(
            "127.0.0.1", self.port, ca_certs=str(self.cert), cert_reqs="CERT_REQUIRED", retries=False,
            source_address=(source, 0),
        ) as pool:  # fmt: skip
            return pool.urlopen(method, path, body=raw, headers={**h, **(headers or {})}, redirect=False)

    def sign_in(self, **body: str) -> tuple[str, str]:
        """(cookie header, CSRF token) of a new console session."""
        r = self.call("POST", "/api/v1/console/login", body=body)
        assert r.status == 200, r.data
        cookie = r.headers["set-cookie"]
        for attr in ("Secure", "HttpOnly", "SameSite=strict", "Path=/"):
            assert attr.lower() in cookie.lower(), cookie
        return cookie.split(";", 1)[0], r.json()["csrf"]


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Console]:
    root = tmp_path_factory.mktemp("console")
    cli = Cli(root / "repo", env={"VMRECOVER_FILES_IDLE": "600"})
    cli.run("init", "--chunk-size", "64K")
    cli.run("backup", random_image(root / "vm1.raw", 4 * MiB, seed=1), "--vm", "vm1")
    cli.run("backup", random_image(root / "vm1.raw", 4 * MiB, seed=2), "--vm", "vm1")
    data = fs_image(root / "data.raw")
    cli.run("backup", data, "--vm", "data", "--format", "raw")
    tree = data.with_suffix(".tree")
    (tree / "data" / "a.txt").write_bytes(b"alpha, second version\n")
    (tree / "many").mkdir()
    for i in range(MANY):
        (tree / "many" / f"f{i:04d}.txt").write_bytes(b"%d\n" % i)
    data.unlink()
    cli.run("backup", fs_image_from(tree, data), "--vm", "data", "--format", "raw")
    cli.run("backup", guest_image, "--vm", "g", "--format", "raw")
    random_image(root / "job.raw", 96 * MiB, seed=5, density=1.0)  # a run long enough to be seen running
    # a vCenter that does not answer (the discard port): its options show, and its errors are shown
    Registry(cli.repo).add(Hypervisor("vc-test", "vmware", "root", "127.0.0.1", 9), "not-a-real-password")
    tokens = {"ops": auth.new_token(), "viewer": auth.new_token()}
    mnt = root / "mnt"
    mnt.mkdir()
    cfg = root / "etc" / "vmrecover.toml"
    cfg.parent.mkdir()
    users = "".join(auth.user_block(n, r, auth.hash_password(PASSWORDS[n]))
                    for n, r in (("alice", "admin"), ("bob", "read-only")))  # fmt: skip
    cfg.write_text(
        f'[repository]\npath = "{cli.repo}"\ncache_size = "64M"\n\n[api]\nlisten = ["127.0.0.1:0"]\n\n'
        + auth.config_block("ops", "admin", auth.digest(tokens["ops"]))
        + auth.config_block("viewer", "read-only", auth.digest(tokens["viewer"]))
        + users
        + f'\n[nfs]\nenabled = false\n\n[fuse]\nmountpoint = "{mnt}"\n\n'
        f'[[jobs]]\nname = "nightly"\nschedule = "0 2 * * *"\nimages = ["{root / "job.raw"}"]\nvm = "jobvm"\n'
        '\n[[jobs]]\nname = "check"\nkind = "verify"\nschedule = "0 5 * * 0"\n'
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify.sock"))
    served = Served(cli, cfg, notify)
    console_pool: urllib3.HTTPSConnectionPool | None = None
    try:
        [(_, port)] = served.record["api"]
        console = Console(cli, served, port, tls.default_paths(cfg)[0], tokens, cfg, root / "job.raw")
        console_pool = console.pool
        yield console
    finally:
        err = served.stop()
        notify.close()
        if console_pool is not None:
            console_pool.close()
        with contextlib.suppress(Exception):
            cli.run("files", "stop", timeout=120, check=False)
        force_unmount(cli.repo / "run" / "files" / "mnt")
        force_unmount(mnt)
    assert served.proc.returncode == 0, err[-3000:]


def fs_image_from(tree: Path, path: Path) -> Path:
    import subprocess

    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "apidata", "-d", str(tree), str(path), "16M"], check=True)
    return path


# ------------------------------------------------------------------------------------------ the browser
class Browser:
    def __init__(self, downloads: Path) -> None:
        self.downloads = downloads
        self.driver = browser_kit.chromium(downloads=downloads)

    def go(self, url: str) -> None:
        """Open *url* and wait until its page is drawn.

        A change of the hash alone does not load the page again: the console draws the new route into the
        same `#main`. Until it has, the old page's elements still answer a CSS wait and go stale under the
        caller, so the old page's heading is marked and the new one awaited.
        """
        current = self.driver.current_url
        same_document = current.split("#", 1)[0] == url.split("#", 1)[0] and "#" in url
        marked = same_document and self.js(
            "const h = document.querySelector('#main > :first-child');"
            " if (!h) return false; h.dataset.leaving = '1'; return true;"
        )
        if marked and current == url:
            self.driver.refresh()  # (the same hash fires no hashchange)
        else:
            self.driver.get(url)
        if marked:
            self.until_js(
                "const h = document.querySelector('#main > :first-child');"
                " return h !== null && h.dataset.leaving === undefined;",
                timeout=60,
            )

    def wait(self, css: str, timeout: float = 60, text: str | None = None) -> Any:
        try:
            return browser_kit.wait_for(self.driver, css, text=text, timeout=timeout)
        except browser_kit.PageTimeout as exc:
            OUTPUT.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(OUTPUT / "failed.png"))
            raise AssertionError(str(exc)) from None

    def until_js(self, script: str, timeout: float) -> Any:
        """Poll *script* (a function body) until it returns something true."""
        deadline = time.monotonic() + timeout
        while not (got := self.js(script)):
            if time.monotonic() > deadline:
                self.driver.save_screenshot(str(OUTPUT / "failed.png"))
                raise AssertionError(f"not true within {timeout} s: {script}")
            time.sleep(0.1)
        return got

    def all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def fetch(self, method: str, path: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """A fetch() from the page itself (its cookie goes with it): {status, body}."""
        return self.driver.execute_async_script(
            "const [m, p, h, done] = arguments;"
            "fetch(p, {method: m, headers: h, credentials: 'include'})"
            ".then(async r => done({status: r.status, body: await r.text()}))"
            ".catch(e => done({status: 0, body: String(e)}));",
            method, path, headers or {},
        )  # fmt: skip

    def shot(self, name: str) -> Path:
        OUTPUT.mkdir(parents=True, exist_ok=True)
        path = OUTPUT / f"{name}.png"
        self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 5000, path  # a rendered page, not a blank one
        return path

    def sign_in(self, base: str, user: str) -> None:
        self.go(base + "/#/dashboard")
        self.driver.delete_all_cookies()  # (of this origin: the one loaded)
        self.driver.refresh()
        self.wait("#sign-in")
        self.wait("#user").send_keys(user)
        self.wait("#password").send_keys(PASSWORDS[user])
        self.wait("#sign-in-button").click()
        self.wait("#who", text=f"{user} (")

    def downloaded(self, name: str, timeout: float = 120) -> Path:
        path = self.downloads / name
        deadline = time.monotonic() + timeout
        while not path.exists() or list(self.downloads.glob("*.crdownload")):
            assert time.monotonic() < deadline, sorted(self.downloads.iterdir())
            time.sleep(0.2)
        return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(tmp_path_factory.mktemp("downloads"))
    try:
        yield b
    finally:
        b.driver.quit()


# ------------------------------------------------------------------------------------------ the flows
def test_nothing_works_without_a_sign_in(console: Console, browser: Browser) -> None:
    """The page shows only the sign-in form; every API call without a session or token is a 401; a
    wrong password is refused on the page; the rate limit counts wrong sign-ins."""
    browser.driver.delete_all_cookies()
    browser.go(console.url + "/#/vms/vm1")
    browser.wait("#sign-in")
    [top] = browser.all("#top")
    assert not top.is_displayed() and not browser.all("#points")
    for path in ("/api/v1/vms", "/api/v1/dashboard", "/api/v1/jobs", "/api/v1/sessions",
                 "/api/v1/console/session", "/api/v1/vms/data/points/latest/files?path=/",
                 "/api/v1/runs/1/events", "/metrics"):  # fmt: skip
        got = browser.fetch("GET", path)
        assert got["status"] == 401, (path, got)
    assert browser.fetch("POST", "/api/v1/jobs/nightly/run")["status"] == 401
    browser.wait("#user").send_keys("alice")
    browser.wait("#password").send_keys("not-her-password")
    browser.wait("#sign-in-button").click()
    browser.wait("#sign-in-error", text="wrong user name or password")
    browser.shot("01-sign-in-refused")
    # an unknown user costs as much and says the same; five wrong tries from one address: 429
    for _ in range(5):
        r = console.call("POST", "/api/v1/console/login", body={"user": "mallory", "password": "x" * 12},
                         source="127.0.0.3")  # fmt: skip
        assert r.status == 401 and "wrong user name or password" in r.json()["message"], r.data
    r = console.call("POST", "/api/v1/console/login", body={"user": "alice", "password": PASSWORDS["alice"]},
                     source="127.0.0.3")  # fmt: skip
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1, r.data
    for bad in ({"user": "alice"}, {"token": "x", "user": "alice", "password": "y"}, {"nope": 1}):
        r = console.call("POST", "/api/v1/console/login", body=bad)
        assert r.status == 422, r.data


def test_sign_in_and_follow_a_job_run_live(console: Console, browser: Browser) -> None:
    browser.sign_in(console.url, "alice")
    browser.wait("#dashboard-jobs")
    assert "nightly" in browser.wait("#dashboard-jobs").text
    browser.shot("02-dashboard")
    browser.go(console.url + "/#/jobs")
    browser.wait('[data-run="nightly"]').click()
    browser.wait("#run-state")
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        text = browser.wait("#run-state").text
        if not seen or seen[-1] != text:
            seen.append(text)
        if text in ("succeeded", "failed", "interrupted"):
            break
        time.sleep(0.05)
    assert seen[-1] == "succeeded", seen
    assert "running" in seen, seen  # updated on the page while it ran (server-sent events)
    assert "read 96.0 MiB" in browser.wait("#run-figures").text, browser.wait("#run-figures").text
    browser.wait("#run-log", text="jobvm")
    browser.shot("03-job-run")
    # one EventSource stream carried it: the page did not reload
    kinds = browser.js("return performance.getEntriesByType('resource').map(e => e.name)")
    assert sum("/events" in k for k in kinds) >= 1, kinds
    browser.go(console.url + "/#/dashboard")
    row = browser.wait('#dashboard-jobs tr[data-job="nightly"]')
    assert "succeeded" in row.text and "96.0 MiB" in row.text, row.text


def test_a_vms_timeline_and_a_boot_check_with_its_screenshot(console: Console, browser: Browser) -> None:
    browser.sign_in(console.url, "alice")
    browser.go(console.url + "/#/vms")
    browser.wait("#vms")
    assert {"data", "g", "vm1"} <= {r.text.split()[0] for r in browser.all("#vms tbody tr")}
    browser.go(console.url + "/#/vms/vm1")
    browser.wait("#verify-note", text="No verify job has run yet")
    ops = {"Authorization": f"Bearer {console.tokens['ops']}"}
    run = console.call("POST", "/api/v1/jobs/check/run", headers=ops).json()["run"]
    deadline = time.monotonic() + 300
    while console.call("GET", f"/api/v1/runs/{run}", headers=ops).json()["state"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    browser.driver.refresh()
    browser.wait("#verify-note", text=f"run #{run} of job check")
    assert len(browser.all(".timeline .dot")) == 2 and len(browser.all("#points tbody tr")) == 2
    verified = [r.find_elements("css selector", "td")[4].text for r in browser.all("#points tbody tr")]
    assert verified == ["intact", "intact"], verified
    browser.shot("04-vm-timeline")
    browser.go(console.url + "/#/vms/g")
    browser.wait("#boot-check-button")
    browser.wait("#boot-expect").send_keys(r"VMRECOVER-GUEST-BOOT n=1\b")
    browser.wait("#boot-check-button").click()
    browser.wait("#boot-screenshot", timeout=400)
    browser.until_js("const i = document.getElementById('boot-screenshot');"
                     "return i && i.complete && i.naturalWidth >= 320", 30)  # fmt: skip
    assert "boots" in browser.wait("#point-detail").text
    browser.shot("05-boot-check")
    browser.go(console.url + "/#/dashboard")
    browser.wait("#dashboard-jobs")
    assert "boots" in browser.wait("main").text


def test_browse_search_history_and_download_files(console: Console, browser: Browser) -> None:
    browser.sign_in(console.url, "alice")
    browser.go(console.url + "/#/files/data/latest?path=/data")
    browser.wait("#entries", timeout=300)
    names = [r.get_attribute("data-name") for r in browser.all("#entries tbody tr")]
    assert names == ["sub", "a.txt"], names
    browser.shot("06-files")
    # into a running VM (VMware guest operations): the form reaches the API, whose error is shown
    browser.wait('#entries tr[data-name="a.txt"] a.into-vm').click()
    dialog = browser.wait("#into-vm")
    for name, value in (("vm", "web01"), ("user", "Administrator"), ("password", "guest-secret")):
        dialog.find_element("css selector", f'input[name="{name}"]').send_keys(value)
    dialog.find_element("css selector", 'button[type="submit"]').click()
    browser.wait("#toast", text="cannot reach hypervisor vc-test", timeout=120)
    assert browser.js("return document.querySelector('#into-vm input[name=password]').value") == ""
    browser.driver.execute_script("document.getElementById('into-vm').close()")
    browser.wait('#entries tr[data-name="sub"] a').click()
    browser.wait('#entries tr[data-name="b.bin"]')
    browser.wait('#entries tr[data-name="b.bin"] a.download').click()
    got = browser.downloaded("b.bin")
    assert hashlib.sha256(got.read_bytes()).hexdigest() == hashlib.sha256(
        hashlib.sha256(b"b").digest() * 4096).hexdigest()  # fmt: skip
    # the folder as a zip, streamed: the same files with their modes
    browser.go(console.url + "/#/files/data/latest?path=/data")
    browser.wait("#entries")
    browser.wait('#entries tr[data-name="sub"] a[href$="format=zip"]').click()
    z = zipfile.ZipFile(io.BytesIO(browser.downloaded(next_name(browser, ".zip")).read_bytes()))
    assert z.testzip() is None
    assert z.read("sub/b.bin") == hashlib.sha256(b"b").digest() * 4096, z.namelist()
    # a big folder: the table holds the rows in sight, scrolls the rest in, and filters by name
    browser.go(console.url + "/#/files/data/latest?path=/many")
    browser.wait("#files-status", text=f"{MANY} entries")
    drawn = browser.all("#entries tbody tr[data-name]")
    assert 10 <= len(drawn) < 200 and drawn[0].get_attribute("data-name") == "f0000.txt"
    browser.js("const s = document.getElementById('entries-scroll'); s.scrollTop = s.scrollHeight")
    browser.wait(f'#entries tr[data-name="f{MANY - 1:04d}.txt"]')
    assert not browser.all('#entries tr[data-name="f0000.txt"]')
    browser.shot("07-big-folder")
    browser.wait("#entries-filter").send_keys("f1234")
    browser.wait('#entries tr[data-name="f1234.txt"]')
    kept = [r.get_attribute("data-name") for r in browser.all("#entries tbody tr[data-name]")]
    assert kept == ["f1234.txt"], kept
    browser.go(console.url + "/#/files/data/latest?path=/data")
    browser.wait("#entries")
    # search by name in every point, then one file's history across points
    browser.wait("#find-pattern").send_keys("a.txt\n")
    browser.wait("#found", timeout=300)
    assert len(browser.all("#found tbody tr")) == 2
    browser.shot("08-find")
    browser.wait("#found tbody tr a").click()
    browser.wait("#history", timeout=300)
    changes = [r.find_elements("css selector", "td")[1].text for r in browser.all("#history tbody tr")]
    assert changes[0] == "present" and changes[1].startswith("changed: size"), changes
    browser.shot("09-history")


def next_name(browser: Browser, suffix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        done = [p for p in browser.downloads.iterdir() if p.name.endswith(suffix)]
        if done and not list(browser.downloads.glob("*.crdownload")):
            return done[0].name
        assert time.monotonic() < deadline, sorted(browser.downloads.iterdir())
        time.sleep(0.2)


def test_create_edit_and_delete_a_job(console: Console, browser: Browser) -> None:
    """Jobs made in the console are files of jobs.d/ beside the configuration (the main file is never
    rewritten), taken at once by the scheduler; the configuration file's own jobs are not editable
    there, and hooks (commands run on the appliance) cannot be set through the API."""
    import tomllib

    jobs_d = console.config.parent / "jobs.d"
    main_text = console.config.read_text()
    browser.sign_in(console.url, "alice")
    browser.go(console.url + "/#/jobs")
    browser.wait("#job-new").click()
    browser.wait("#job-name").send_keys("web-job")
    browser.wait("#job-schedule").clear()
    browser.wait("#job-schedule").send_keys("99 3 * * *")
    browser.wait("#job-images").send_keys(str(console.job_image))
    browser.wait("#job-vm").send_keys("webvm")
    browser.wait("#job-keep_last").send_keys("3")
    browser.wait("#job-save").click()
    browser.wait("#job-error", text="not a cron schedule")
    assert not (jobs_d / "web-job.toml").exists()
    browser.wait("#job-schedule").clear()
    browser.wait("#job-schedule").send_keys("30 3 * * *")
    browser.wait("#job-save").click()
    browser.wait('#jobs tr[data-job="web-job"]')
    browser.shot("13-job-created")
    saved = tomllib.loads((jobs_d / "web-job.toml").read_text())
    assert saved == {"name": "web-job", "schedule": "30 3 * * *", "images": [str(console.job_image)],
                     "vm": "webvm", "retention": {"keep_last": 3}}  # fmt: skip
    ops = {"Authorization": f"Bearer {console.tokens['ops']}"}
    [job] = [j for j in console.call("GET", "/api/v1/jobs", headers=ops).json() if j["name"] == "web-job"]
    assert job["managed"] and "T03:30:00" in job["next_run"], job  # the scheduler has it
    browser.wait("#job-edit").click()
    browser.wait("#job-schedule").clear()
    browser.wait("#job-schedule").send_keys("45 4 * * 1")
    browser.wait("#job-save").click()
    browser.wait('#jobs tr[data-job="web-job"]', text="45 4 * * 1")
    assert tomllib.loads((jobs_d / "web-job.toml").read_text())["schedule"] == "45 4 * * 1"

    r = console.call("PUT", "/api/v1/jobs/nightly", headers=ops, body={"schedule": "0 1 * * *"})
    assert r.status == 409 and "defined in" in r.json()["message"], r.data
    hooked = {"schedule": "0 1 * * *", "kind": "gc", "pre_hook": ["/bin/sh", "-c", "id"]}
    r = console.call("PUT", "/api/v1/jobs/evil", headers=ops, body=hooked)
    assert r.status == 400 and "hooks" in r.json()["message"], r.data
    r = console.call("PUT", "/api/v1/jobs/..%2fx", headers=ops, body={"schedule": "0 1 * * *", "kind": "gc"})
    assert r.status in (400, 404), r.data
    r = console.call("PUT", "/api/v1/jobs/typo", headers=ops, body={"schedule": "0 1 * * *", "kinds": "gc"})
    assert r.status == 400 and "kinds" in r.json()["message"], r.data
    viewer = {"Authorization": f"Bearer {console.tokens['viewer']}"}
    r = console.call("DELETE", "/api/v1/jobs/web-job", headers=viewer)
    assert r.status == 403, r.data
    assert sorted(p.name for p in jobs_d.iterdir()) == ["web-job.toml"]

    browser.driver.execute_script("window.confirm = () => true")
    browser.wait("#job-delete").click()
    browser.wait("#jobs")

    def listed() -> list[str]:
        return [j["name"] for j in console.call("GET", "/api/v1/jobs", headers=ops).json()]

    # the click's DELETE answers once the service took the configuration again: until then the job is
    # still listed (the file is gone first); the page tells when it answered by dropping the row
    deadline = time.monotonic() + 60
    while browser.driver.find_elements("css selector", '#jobs tr[data-job="web-job"]'):
        assert time.monotonic() < deadline, "the deleted job's row stays in the page"
        time.sleep(0.2)
    assert not (jobs_d / "web-job.toml").exists()
    assert "web-job" not in listed()
    assert console.config.read_text() == main_text


def test_start_and_stop_a_recovery_session(console: Console, browser: Browser) -> None:
    browser.sign_in(console.url, "alice")
    from selenium.webdriver.support.ui import Select

    browser.go(console.url + "/#/sessions?vm=vm1&point=latest")
    browser.wait("#recover-form")
    # on a hypervisor that does not answer: the error is shown, no session is left
    Select(browser.wait("#recover-where")).select_by_value("vmware://vc-test")
    browser.wait("#recover-start").click()
    toast = browser.wait("#toast", text="vc-test", timeout=120)
    assert "127.0.0.1" in toast.text or "connect" in toast.text.lower(), toast.text
    browser.shot("09-recover-unreachable")
    assert console.cli.json("recover", "list") == []
    Select(browser.wait("#recover-where")).select_by_value("datastores")
    browser.wait("#recover-name").send_keys("web-s1")
    browser.wait("#recover-start").click()
    browser.wait('#sessions tr[data-session="web-s1"]')
    browser.wait("#recover-progress", text="is up")
    assert [s["name"] for s in console.cli.json("recover", "list")] == ["web-s1"]
    mnt = Path(console.served.record["fuse"])
    assert (mnt / "recover" / "web-s1" / "vm1.raw").stat().st_size == 4 * MiB  # a disk is named by its image
    browser.shot("10-recover")
    browser.wait('[data-stop="web-s1"]').click()
    browser.wait("#no-sessions")
    assert console.cli.json("recover", "list") == []

    # run here, under qemu: its screen is shown with the session (and refreshed) while it runs
    browser.go(console.url + "/#/sessions?vm=g&point=latest")
    browser.wait("#recover-name").send_keys("web-q1")
    Select(browser.wait("#recover-where")).select_by_value("qemu")
    browser.wait("#recover-start").click()
    browser.wait("#recover-progress", text="web-q1 is up")
    browser.wait('img[data-screen="web-q1"]', timeout=30)
    browser.until_js('const i = document.querySelector(\'img[data-screen="web-q1"]\');'
                     "return i && i.complete && i.naturalWidth >= 320", 30)  # fmt: skip
    browser.shot("10-recover-qemu")
    browser.wait('[data-stop="web-q1"]').click()
    browser.wait("#no-sessions")
    assert console.cli.json("recover", "list") == []


def test_a_read_only_user_sees_no_mutation_and_is_refused_one(console: Console, browser: Browser) -> None:
    browser.sign_in(console.url, "bob")
    browser.go(console.url + "/#/jobs")
    browser.wait("#jobs")
    assert not browser.all("[data-run]")
    browser.go(console.url + "/#/sessions")
    browser.wait("main h1", text="Recover")
    assert not browser.all("#recover-form")
    browser.go(console.url + "/#/vms/g")
    browser.wait("#point-detail h2")
    assert not browser.all("#boot-check-button") and not browser.all("#recover-button")
    browser.shot("11-read-only")
    csrf = json.loads(browser.fetch("GET", "/api/v1/console/session")["body"])["csrf"]
    got = browser.fetch("POST", "/api/v1/jobs/nightly/run", {"X-CSRF-Token": csrf})
    assert got["status"] == 403 and "read-only" in got["body"], got
    got = browser.fetch("DELETE", "/api/v1/sessions/anything", {"X-CSRF-Token": csrf})
    assert got["status"] == 403, got
    assert browser.fetch("POST", "/api/v1/console/logout", {"X-CSRF-Token": csrf})["status"] == 200
    assert browser.fetch("GET", "/api/v1/dashboard")["status"] == 401  # signed out for good


class _Evil(http.server.BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


def test_csrf_from_another_origin_fails(console: Console, browser: Browser) -> None:
    """Another site's page posts a form to the console and fetch()es with the browser's credentials:
    nothing runs.  By hand: the cookie without the CSRF token, or with it from another origin: 403."""
    ops = {"Authorization": f"Bearer {console.tokens['ops']}"}
    runs = len(console.call("GET", "/api/v1/runs", headers=ops).json())
    browser.sign_in(console.url, "alice")
    _Evil.page = (
        f'<form id="f" method="post" action="{console.url}/api/v1/jobs/nightly/run"></form>'
        f"<script>fetch('{console.url}/api/v1/jobs/nightly/run', {{method: 'POST', credentials: 'include', "
        "mode: 'no-cors'}); setTimeout(() => document.getElementById('f').submit(), 300);</script>"
    ).encode()
    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Evil)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        browser.go(f"http://127.0.0.1:{evil.server_address[1]}/")
        time.sleep(3)
        browser.shot("12-csrf-attempt")
    finally:
        evil.shutdown()
        evil.server_close()
    after = console.call("GET", "/api/v1/runs", headers=ops).json()
    assert len(after) == runs, after[:2]

    cookie, csrf = console.sign_in(user="alice", password=PASSWORDS["alice"])
    base = {"Cookie": cookie}
    r = console.call("POST", "/api/v1/jobs/nightly/run", headers=base)
    assert r.status == 403 and "CSRF" in r.json()["message"], r.data
    r = console.call("POST", "/api/v1/jobs/nightly/run", headers={**base, "X-CSRF-Token": "x" * 43})
    assert r.status == 403, r.data
    for origin in ("https://evil.example", "null", f"http://127.0.0.1:{console.port}"):
        r = console.call("POST", "/api/v1/jobs/nightly/run",
                         headers={**base, "X-CSRF-Token": csrf, "Origin": origin})  # fmt: skip
        assert r.status == 403, (origin, r.data)
    r = console.call("POST", "/api/v1/jobs/nightly/run",
                     headers={**base, "X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"})  # fmt: skip
    assert r.status == 403, r.data
    r = console.call("POST", "/api/v1/console/login", body={"user": "alice", "password": PASSWORDS["alice"]},
                     headers={"Origin": "https://evil.example"})  # fmt: skip
    assert r.status == 403 and "set-cookie" not in r.headers, r.data
    assert len(console.call("GET", "/api/v1/runs", headers=base).json()) == runs
    # and with both, from this origin, it is the console itself: it runs
    r = console.call("POST", "/api/v1/jobs/nightly/run",
                     headers={**base, "X-CSRF-Token": csrf, "Origin": console.url})  # fmt: skip
    assert r.status == 202, r.data


def test_path_traversal_in_every_browse_and_download_parameter_is_refused(console: Console) -> None:
    cookie, _ = console.sign_in(token=console.tokens["viewer"])
    h = {"Cookie": cookie}
    bad = [
        "/api/v1/vms/data/points/latest/files?path=/data/../../etc",
        "/api/v1/vms/data/points/latest/files?path=..",
        "/api/v1/vms/data/points/latest/files/content?path=/data/..%2f..%2fetc%2fshadow",
        "/api/v1/vms/data/points/latest/files/content?path=/data/%00",
        "/api/v1/vms/data/points/latest/files/content?path=/data&format=../../x",
        "/api/v1/vms/data/points/..%2f..%2f/files?path=/",
        "/api/v1/vms/..%2fdata/points/latest/files?path=/",
        "/api/v1/vms/data/files/history?path=/data/../../etc/passwd",
        "/api/v1/vms/data/files/find?pattern=%00",
        "/api/v1/vms/..%5c/files/find?pattern=x",
        "/api/v1/vms/g/points/latest/boot-checks/..%2f1/screenshot",
        "/console/..%2f..%2fconfig.py",
        "/console/../api.py",
    ]
    for path in bad:
        r = console.call("GET", path, headers=h)
        assert r.status in (400, 404, 422), (path, r.status, r.data[:200])
        assert b"root:" not in r.data and b"import" not in r.data, path
    assert console.call("GET", "/console/console.js").status == 200  # the assets need no sign-in


def test_the_page_and_api_answers_carry_the_browser_protections(console: Console) -> None:
    r = console.call("GET", "/")
    assert r.status == 200 and b'<script src="/console/console.js"' in r.data
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    cookie, csrf = console.sign_in(token=console.tokens["ops"])
    r = console.call("GET", "/api/v1/console/session", headers={"Cookie": cookie})
    assert r.json() == {"kind": "token", "name": "ops", "role": "admin", "csrf": csrf}
    assert r.headers["cache-control"] == "no-store"
    r = console.call("POST", "/api/v1/console/logout", headers={"Cookie": cookie, "X-CSRF-Token": csrf})
    assert r.status == 200 and "max-age=0" in r.headers["set-cookie"].lower()
    assert console.call("GET", "/api/v1/console/session", headers={"Cookie": cookie}).status == 401
