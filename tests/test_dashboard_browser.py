"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, against a running demo cluster of two nodes (in memory).

Skipped only when Chromium or its driver is not installed (``.ci/run`` installs both, and
sets ``APSCHED_DASHBOARD_REQUIRE_BROWSER`` so that there a missing browser fails instead).
Screenshots go to pytest's temporary directory, and also to
``$APSCHED_DASHBOARD_SCREENSHOTS`` when set (that is how docs/_static's were made).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.processes import stop_process

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TOKEN = "browser-test-token-0123456789"
VIEWER_ZONE = "Asia/Tokyo"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER))
    and not os.environ.get("APSCHED_DASHBOARD_REQUIRE_BROWSER"),  # set by .ci/run
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver; .ci/run installs them)",
)


class Demo:
    """``python -m apsched_mongo demo --nodes 2 --dashboard 0`` in a subprocess."""

    def __init__(self) -> None:
        env = {**os.environ, "APSCHED_DASHBOARD_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apsched_mongo", "demo", "--nodes", "2", "--dashboard", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=Path(__file__).parent.parent,
        )
        self.lines: list[str] = []
        self._url_found = threading.Event()
        self.url = ""
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("Dashboard: "):
                self.url = line.split()[1]
                self._url_found.set()
        self._url_found.set()

    def wait_for_url(self) -> str:
        assert self._url_found.wait(60), "the demo printed no dashboard URL"
        assert self.url, "".join(self.lines)
        return self.url

    def stop(self) -> str:
        stop_process(self.process, signal.SIGINT)
        return "".join(self.lines)


@pytest.fixture
def demo() -> Iterator[Demo]:
    running = Demo()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from selenium import webdriver

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--window-size=1280,900",
                     f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                      env={**os.environ, "TZ": VIEWER_ZONE})
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: Any, tmp_path: Path, name: str) -> None:
    """Save a screenshot of the whole page (its scrollable height)."""
    height, chrome = driver.execute_script(
        "return [document.documentElement.scrollHeight, outerHeight - innerHeight]")
    driver.set_window_size(1280, max(600, min(int(height) + int(chrome), 2400)))
    path = tmp_path / f"dashboard-{name}.png"
    assert driver.save_screenshot(str(path))
    if target := os.environ.get("APSCHED_DASHBOARD_SCREENSHOTS"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    driver.set_window_size(1280, 900)


def test_dashboard_in_a_real_browser(demo: Demo, browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = demo.wait_for_url()
    # The page swaps its <main> every 2 s: an element found before a swap goes stale
    wait = WebDriverWait(browser, 30, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,))

    def text(selector: str) -> str:
        """The element's text, or "" while there is none (e.g. mid-navigation)."""
        return str(browser.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''",
            selector))

    def card(label: str) -> str:
        """A card's value, read in one script run (atomic with respect to refreshes)."""
        cards = browser.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('.card')].map("
            "c => [c.querySelector('.label').innerText, c.querySelector('.value').innerText]))")
        return str(cards[label])

    def click(xpath: str) -> None:
        for _ in range(10):
            try:
                browser.find_element(By.XPATH, xpath).click()
                return
            except StaleElementReferenceException:
                continue
        raise AssertionError(f"{xpath} kept going stale")

    # Overview: the demo's counts, both nodes seen, refreshed in place (no reload)
    browser.get(url)
    assert card("active schedules") == "3"
    assert card("paused schedules") == "0"
    assert card("finished schedules") == "0"
    assert card("expired leases") == "0"
    wait.until(lambda d: {"node-1", "node-2"} <= set(d.execute_script(
        "return [...document.querySelectorAll('table.nodes td:first-child')]"
        ".map(c => c.innerText)")))
    browser.execute_script("window.notReloaded = true; document.body.dataset.status = '';")
    wait.until(lambda d: d.execute_script("return document.body.dataset.status") == "200")
    assert browser.execute_script("return window.notReloaded") is True
    assert text("#zone") == VIEWER_ZONE  # times shown in the viewer's time zone
    assert int(card("queued jobs").replace(",", "")) >= 0
    shoot(browser, tmp_path, "overview")

    # Outcomes: the plot is there and has bars for the jobs the demo ran
    browser.get(url + "outcomes")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.plot rect.bar"))
    assert browser.find_element(By.CSS_SELECTOR, "svg.plot title").get_attribute(
        "textContent") == "Jobs released per minute by outcome, last 60 minutes"
    assert "success" in text(".legend")
    shoot(browser, tmp_path, "outcomes")

    # Schedules and jobs pages render the demo's data
    browser.get(url + "schedules")
    rows = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('table.schedules tbody tr')]"
        ".map(r => [r.querySelector('td code').innerText, r.innerText]))")
    assert sorted(rows) == ["cron", "slow", "tick"]
    assert "every 1 s" in rows["tick"]
    shoot(browser, tmp_path, "schedules")
    browser.get(url + "jobs?state=running")
    wait.until(lambda d: "Running (" in text(".tabs"))
    shoot(browser, tmp_path, "jobs")

    # An action without the token is refused, and nothing changes
    browser.get(url + "schedules")
    pause_tick = "//tr[td/code[text()='tick']]//button[@data-action='pause']"
    click(pause_tick)
    wait.until(lambda d: "Token required" in text("h1"))
    assert "log in first" in text(".problem .message")
    shoot(browser, tmp_path, "refused")
    browser.get(url + "schedules")
    tick_row = "//tr[td/code[text()='tick']]"
    wait.until(lambda d: "active" in d.find_element(By.XPATH, tick_row).text)

    # With the token: log in, pause "tick"
    browser.get(url + "login?next=/schedules")
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, ".login button").click()
    # (the login page's own address ends in "?next=/schedules": wait for the path)
    wait.until(lambda d: urlsplit(d.current_url).path == "/schedules")
    assert "actions enabled" in text("header .mode")
    click(pause_tick)
    wait.until(lambda d: "paused schedule 'tick'" in text(".notice"))
    wait.until(lambda d: "paused" in d.find_element(By.XPATH, tick_row).text)
    assert browser.find_elements(By.XPATH, tick_row + "//button[@data-action='resume']")
    browser.get(url)
    wait.until(lambda d: card("paused schedules") == "1")
    shoot(browser, tmp_path, "after-pause")

    output = demo.stop()
    assert demo.process.returncode == 0, output
    assert "Traceback" not in output
    assert "job runs per node:" in output
