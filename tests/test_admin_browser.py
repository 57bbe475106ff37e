"""The activity pages in a real browser: Debian's headless Chromium driven through chromium-driver.

A person signs in with a team token, reads their own team's activity with its
message timeline, follows the link to the other team's activity (header
information only), uses the search box, and signs in as the other team.
Screenshots go to test-artifacts/ (or $SMTPGATE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.support.admin import SOURCE, TEAM_A, TEAM_B, admin_relay  # noqa: F401 - fixture
from tests.support.ci import needs

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SMTPGATE_TEST_ARTIFACTS") or ROOT / "test-artifacts")

# Quiet, reproducible Chromium: no sandbox (root in CI), no network of its own, a fresh profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900")

pytestmark = pytest.mark.browser


@pytest.fixture
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver); skip when missing, fail under CI (make system-deps installs them)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [path for path in (chromium, driver) if not os.access(path, os.X_OK)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (the test extra)")
    if missing:
        why = f"the browser test needs Debian's chromium and chromium-driver: missing {', '.join(missing)}"
        needs("Chromium", why)
    return chromium, driver


def start_browser(chromium: str, driver: str, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    # Both paths are given, so selenium never looks for (or downloads) a driver itself.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def walk_through(browser, base: str, tokens: dict[str, str], linked: str, shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)

    def sign_in(token: str) -> None:
        box = wait.until(EC.presence_of_element_located((By.ID, "token")))
        box.clear()
        box.send_keys(token)
        browser.find_element(By.ID, "sign-in").click()

    # Not signed in: the page asks for a token and refuses a wrong one.
    browser.get(f"{base}/activities/{SOURCE}")
    sign_in("not-a-token")
    assert wait.until(EC.presence_of_element_located((By.ID, "login-error"))).text == "That token is not accepted."

    # Team A reads its own activity: links and the message timeline.
    sign_in(tokens[TEAM_A])
    timeline = wait.until(EC.presence_of_element_located((By.ID, "timeline")))
    assert browser.current_url == f"{base}/activities/{SOURCE}"
    assert browser.find_element(By.ID, "signed-in").text == f"Signed in as {TEAM_A}"
    assert browser.find_element(By.ID, "owner").text == f"uk-payroll@corp.example · {TEAM_A}"
    assert "RE: Invoice 4411" in timeline.text
    # Header text is shown as written, never interpreted as markup.
    assert "Invoice 4411 <b>&amp; co</b>" in timeline.text
    assert not browser.find_elements(By.TAG_NAME, "b")
    assert not browser.find_elements(By.ID, "messages-hidden")
    cookie = browser.get_cookie("smtpgate_token")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    browser.save_screenshot(str(shots / "activity-own-team.png"))

    # Following the link: Team B's activity, header information only.
    browser.find_element(By.LINK_TEXT, linked).click()
    hidden = wait.until(EC.presence_of_element_located((By.ID, "messages-hidden")))
    assert browser.current_url == f"{base}/activities/{linked}"
    assert TEAM_B in browser.find_element(By.ID, "owner").text and TEAM_B in hidden.text
    assert not browser.find_elements(By.ID, "timeline")
    assert "Invoice 4411" not in browser.page_source
    assert browser.find_element(By.LINK_TEXT, SOURCE).get_attribute("href") == f"{base}/activities/{SOURCE}"
    browser.save_screenshot(str(shots / "activity-other-team.png"))

    # The search box jumps back.
    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys(SOURCE)
    search.submit()
    wait.until(EC.presence_of_element_located((By.ID, "timeline")))
    assert browser.current_url == f"{base}/activities/{SOURCE}"

    # Team B signs in: the roles swap.
    browser.find_element(By.CSS_SELECTOR, "form[action='/logout'] button").click()
    sign_in(tokens[TEAM_B])
    wait.until(EC.presence_of_element_located((By.ID, "signed-in")))
    browser.get(f"{base}/activities/{SOURCE}")
    wait.until(EC.presence_of_element_located((By.ID, "messages-hidden")))
    assert not browser.find_elements(By.ID, "timeline")
    browser.find_element(By.LINK_TEXT, linked).click()
    timeline = wait.until(EC.presence_of_element_located((By.ID, "timeline")))
    assert "RE: Invoice 4411" in timeline.text
    browser.save_screenshot(str(shots / "activity-team-b-own.png"))


async def test_a_person_reads_linked_activities_in_chromium(admin_relay, browser_paths, tmp_path):
    relay = admin_relay
    reply = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
             b"To: Client Ltd <client@supplier.example>\r\nCc: Payroll Poland <pl-payroll@corp.example>\r\n"
             b"Subject: RE: Invoice 4411\r\nDate: Mon, 30 Nov 2026 09:15:00 +0000\r\n\r\nReminder\r\n")
    sent = await relay.send(f"uk-payroll+{SOURCE}@corp.example",
                            ["client@supplier.example", "pl-payroll@corp.example"], reply)
    assert sent.data[0] == 250
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = await asyncio.to_thread(start_browser, *browser_paths, tmp_path / "chromium-profile")
    try:
        # Selenium blocks; the server runs on this loop, so the browser works from a thread.
        await asyncio.to_thread(walk_through, browser, relay.admin_url, relay.tokens, relay.linked, ARTIFACTS)
    finally:
        await asyncio.to_thread(browser.quit)
    for name in ("activity-own-team.png", "activity-other-team.png", "activity-team-b-own.png"):
        assert (ARTIFACTS / name).stat().st_size > 0
