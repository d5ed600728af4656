"""Debian's chromium, headless, driven by Selenium through Debian's chromedriver: the one way the tests
(tests/test_console.py) and the benchmark (bench/console_bench.py) open the web console.  Nothing is
downloaded: both binaries come from apt (scripts/setup.sh), named here, so Selenium Manager never runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


class PageTimeout(Exception):
    """What was waited for did not show; the message has the page's text."""


def chromium(*, downloads: Path | None = None, log: Path | None = None, extra: tuple[str, ...] = (),
             timeout: float = 60) -> Any:  # fmt: skip
    """A WebDriver of a new headless chromium (1280x900) that accepts the service's self-signed
    certificate (the tests check it by its file elsewhere); files it downloads go to *downloads*."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run", *extra):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("acceptInsecureCerts", True)
    if downloads is not None:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(downloads), "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        })  # fmt: skip
    service = Service(CHROMEDRIVER, log_output=str(log) if log is not None else None)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(timeout)
    driver.set_script_timeout(timeout)
    return driver


def page_text(driver: Any, tail: int = 3000) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)[-tail:]


def wait_for(driver: Any, css: str, *, text: str | None = None, timeout: float = 60) -> Any:
    """The element *css* once visible (and holding *text*); PageTimeout with the page's text if not."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.1)
    try:
        if text is not None:
            wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
        return wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))
    except TimeoutException:
        shown = f"{css!r} (text {text!r}) not shown in {timeout:g} s"
        raise PageTimeout(f"{shown}; the page says:\n{page_text(driver)}") from None
