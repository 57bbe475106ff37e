"""The activity pages in a real browser: Debian's headless Chromium driven through chromium-driver.

A person signs in with a team token, reads their own team's activity with its
message timeline, follows the link to the other team's activity (header
information only), uses the search box, and signs in as the other team.
A team lead signed in through single sign-on (a small header-injecting proxy
in front, as oauth2-proxy would be) searches a subject and opens the result.
Screenshots go to test-artifacts/ (or $SMTPGATE_TEST_ARTIFACTS): each test
deletes its own before it starts and checks that this run made them anew.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.admin import SOURCE, TEAM_A, TEAM_B, admin_relay, sign_on_relay  # noqa: F401 - fixtures
from tests.support.ci import needs

ROOT = Path(__file__).resolve().parents[2]
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


class FreshScreenshots:
    """Screenshot names of one test: old files deleted now, `check()` asserts this run wrote each."""

    def __init__(self, *names: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.paths = [ARTIFACTS / name for name in names]
        for path in self.paths:
            path.unlink(missing_ok=True)
        self.started = time.time()

    def check(self) -> None:
        for path in self.paths:
            assert path.stat().st_size > 0, path
            assert path.stat().st_mtime >= self.started - 1, f"{path} was not made by this run"


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
    cookie = browser.get_cookie("smtpgate_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["value"] != tokens[TEAM_A] and tokens[TEAM_A] not in cookie["value"]
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
    shots = FreshScreenshots("activity-own-team.png", "activity-other-team.png", "activity-team-b-own.png")
    browser = await asyncio.to_thread(start_browser, *browser_paths, tmp_path / "chromium-profile")
    try:
        # Selenium blocks; the server runs on this loop, so the browser works from a thread.
        await asyncio.to_thread(walk_through, browser, relay.admin_url, relay.tokens, relay.linked, ARTIFACTS)
    finally:
        await asyncio.to_thread(browser.quit)
    shots.check()


# ---------------------------------------------------------------- single sign-on through a proxy

LEAD = "agnieszka.nowak@corp.example"
# Hop-by-hop and framing headers a proxy does not pass on (RFC 9110 7.6.1).
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
        "proxy-authenticate", "content-length", "content-encoding", "host"}


class IdentityProxy:
    """What oauth2-proxy does once a person signed in: forwards every request to smtpgate from
    the trusted address (127.0.0.2), with the person's identity headers set and any the browser
    sent removed."""

    def __init__(self, upstream: str, identity: dict[str, str]):
        self.upstream = upstream
        self.identity = identity
        self.runner: web.AppRunner | None = None
        self.client: aiohttp.ClientSession | None = None
        self.url = ""

    async def __aenter__(self) -> IdentityProxy:
        self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)),
                                            auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()
        await self.client.close()

    async def forward(self, request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in _HOP and k.lower() not in {h.lower() for h in self.identity}}
        headers.update(self.identity)
        async with self.client.request(request.method, self.upstream + request.path_qs, headers=headers,
                                       data=await request.read(), allow_redirects=False) as answer:
            body = await answer.read()
            out = [(k, v) for k, v in answer.headers.items() if k.lower() not in _HOP]
            return web.Response(status=answer.status, body=body, headers=out)


def lead_walks_through(browser, base: str, linked: str, shots: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    # No sign-in form: the proxy already said who this is.
    browser.get(f"{base}/")
    table = wait.until(EC.presence_of_element_located((By.ID, "activities")))
    assert browser.find_element(By.ID, "signed-in").text == f"Signed in as {LEAD} ({TEAM_B})"
    assert not browser.find_elements(By.ID, "token")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [row.find_element(By.CSS_SELECTOR, "a.open").text for row in rows] == [linked, SOURCE]
    assert "header information only" in rows[1].text and "Invoice 4411" not in rows[1].text
    browser.save_screenshot(str(shots / "sso-activities-list.png"))

    box = browser.find_element(By.ID, "q")
    box.send_keys("invoice 4411")
    browser.find_element(By.ID, "search-list").click()
    wait.until(EC.url_contains("q=invoice+4411"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#activities tbody tr")
    assert len(rows) == 1 and "Invoice 4411" in rows[0].text
    browser.save_screenshot(str(shots / "sso-search-result.png"))

    rows[0].find_element(By.CSS_SELECTOR, "a.open").click()
    timeline = wait.until(EC.presence_of_element_located((By.ID, "timeline")))
    assert browser.current_url == f"{base}/activities/{linked}"
    assert "Invoice 4411" in timeline.text and TEAM_B in browser.find_element(By.ID, "owner").text
    browser.save_screenshot(str(shots / "sso-activity.png"))


async def test_a_team_lead_signed_in_through_the_proxy_finds_and_opens_an_activity(sign_on_relay, browser_paths,
                                                                                     tmp_path, log_lines):
    relay = sign_on_relay
    shots = FreshScreenshots("sso-activities-list.png", "sso-search-result.png", "sso-activity.png")
    identity = {"X-Forwarded-Email": LEAD, "X-Forwarded-Groups": "staff, PL-Payroll-Agents"}
    async with IdentityProxy(relay.admin_url, identity) as proxy:
        browser = await asyncio.to_thread(start_browser, *browser_paths, tmp_path / "chromium-profile")
        try:
            await asyncio.to_thread(lead_walks_through, browser, proxy.url, relay.linked, ARTIFACTS)
        finally:
            await asyncio.to_thread(browser.quit)
    shots.check()
    # Every view is in the log with the person's name, the team and the proxy's address.
    views = [(e["path"], e["query"]) for e in log_lines() if e["event"] == "admin.request"
             and e["person"] == LEAD and e["team"] == TEAM_B and e["peer"] == "127.0.0.2" and e["status"] == 200]
    assert ("/activities", None) in views
    assert any(path == "/activities" and query and "q=invoice 4411" in query for path, query in views)
    assert (f"/activities/{relay.linked}", None) in views
