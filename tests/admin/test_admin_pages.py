"""The admin listener's finer points:
what each error page and the sign-in form say, what the header's search box holds, the
teams each page names, the paging links, readiness with two problems at once, the pooled
connection readiness hands back, tokens that are not UTF-8 or not usable, and what the
audit line says of a trusted proxy's requests. Over real sockets against a real smtpgate
(tests/support/admin.py)."""

from __future__ import annotations

import asyncio
import html as html_lib
import json
import re
import sqlite3
from urllib.parse import parse_qs, urlsplit

from structlog.testing import capture_logs

from smtpgate.admin.lists import MAX_Q
from tests.support.admin import SOURCE, TEAM_A, TEAM_B, admin_relay, sign_on_relay  # noqa: F401 - fixtures
from tests.admin.test_admin import get, sign_in
from tests.admin.test_admin_signon import PROXY, audit, person, request

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"


def error_page(html: str) -> tuple[str, str]:
    """(title, detail) of an error page."""
    title = re.search(r'<h1 id="error-title">(.*?)</h1>', html, re.S)
    detail = re.search(r'<p class="owner">(.*?)</p>', html, re.S)
    assert title and detail, html
    return html_lib.unescape(title.group(1)), html_lib.unescape(detail.group(1))


def search_box(html: str) -> str | None:
    """The value of the header's "go to activity" box; None when the header has none."""
    found = re.search(r'<input type="search" name="reference" value="([^"]*)"', html)
    return html_lib.unescape(found.group(1)) if found else None


def next_field(html: str) -> str:
    found = re.search(r'<input type="hidden" name="next" value="([^"]*)">', html)
    assert found, html
    return html_lib.unescape(found.group(1))


# ---------------------------------------------------------------- error pages


async def test_the_proxy_refusal_pages_say_what_is_wrong_and_the_audit_says_why(sign_on_relay, log_lines):
    relay = sign_on_relay
    url = f"{relay.admin_url}/activities"
    status, _, html, _ = await request(url, source=PROXY, headers=[("X-Forwarded-Email", "visitor@corp.example")])
    assert status == 403
    title, detail = error_page(html)
    assert title == "No team for you here" and "<title>No team for you here · smtpgate</title>" in html
    assert "none of your groups (none) is given a team" in detail
    assert audit(log_lines)[-1]["denied"] == "no team for these groups"
    twice = [("X-Forwarded-Email", "a@corp.example"), ("X-Forwarded-Email", "b@corp.example")]
    status, _, html, _ = await request(url, source=PROXY, headers=twice)
    assert status == 400
    assert error_page(html) == ("Sign-on headers not usable", "X-Forwarded-Email given 2 times")
    assert search_box(html) is None  # nobody is signed in: no header form
    assert audit(log_lines)[-1]["denied"] == "X-Forwarded-Email given 2 times"


async def test_the_store_failure_page_names_the_failure(admin_relay, tmp_path):
    relay = admin_relay
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        conn.execute("ALTER TABLE links RENAME TO links_away")
    status, _, html = await get(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 503
    title, detail = error_page(html)
    assert title == "Store unavailable" and "no such table: links" in detail
    assert search_box(html) is None


async def test_the_unknown_activity_page_keeps_the_header_of_who_is_signed_in(admin_relay):
    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities/4-A", token=relay.tokens[TEAM_A])
    assert status == 404
    assert error_page(html) == ("No activity 4-A",
                                "smtpgate has not relayed or linked an activity with this reference.")
    assert "Signed in as Team A (UK)" in html and search_box(html) == "4-A"


# ---------------------------------------------------------------- sign-in form


async def test_the_sign_in_form_comes_back_to_the_page_asked_for(admin_relay):
    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities?q=invoice&since=2026-11-01")
    assert status == 401 and next_field(html) == "/activities?q=invoice&since=2026-11-01"
    assert search_box(html) is None
    status, _, html = await get(f"{relay.admin_url}/login?next=/activities/{SOURCE}")
    assert status == 200 and next_field(html) == f"/activities/{SOURCE}" and 'id="login-error"' not in html
    status, _, html = await get(f"{relay.admin_url}/login")
    assert status == 200 and next_field(html) == "/activities"


async def test_the_sign_in_form_says_why_after_a_wrong_token_or_an_ended_session(admin_relay, tmp_path):
    from smtpgate.config import load_config

    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities/{SOURCE}", token="not-a-token")
    assert status == 401 and '<p class="error" id="login-error">That token is not accepted.</p>' in html
    cookie = await sign_in(relay, relay.tokens[TEAM_A])
    (tmp_path / "team-a.token").write_text("rotated-team-a-token\n", encoding="utf-8")
    relay.gate.reload(load_config(relay.gate.config.path))  # the session's token is withdrawn
    status, _, html = await get(f"{relay.admin_url}/activities", cookie=cookie)
    assert status == 401 and '<p class="error" id="login-error">Your session has ended. Sign in again.</p>' in html


# ---------------------------------------------------------------- the pages' contents


async def test_the_activity_page_names_the_teams_and_fills_the_search_box(admin_relay):
    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 200
    assert f'<p class="owner" id="owner">{UK} · {TEAM_A}</p>' in html
    assert f"<td>{PL}</td>\n      <td>{TEAM_B}</td>" in html
    assert search_box(html) == SOURCE


async def test_the_list_page_form_teams_and_times(admin_relay):
    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities", token=relay.tokens[TEAM_A])
    assert status == 200
    assert search_box(html) == ""
    assert f'<input type="search" name="q" id="q" value="" maxlength="{MAX_Q}"' in html
    assert '<input type="date" name="since" id="since" value="">' in html
    assert f"{UK}<br><small>{TEAM_A}</small>" in html  # the row's own team
    assert f"{relay.linked}</a> <small>({TEAM_B})</small>" in html  # the linked activity's team
    assert re.search(r'<time datetime="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ">\d{4}-\d\d-\d\d \d\d:\d\d UTC</time>', html)


async def test_a_bad_query_on_the_list_page_is_audited(admin_relay, log_lines):
    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities", token=relay.tokens[TEAM_A], params={"limit": "0"})
    assert status == 400 and 'id="list-error"' in html
    [event] = [e for e in log_lines() if e["event"] == "admin.request" and e["status"] == 400]
    assert event["denied"].startswith("bad query: ")


async def test_a_later_page_links_back_to_the_first_with_the_same_search(admin_relay):
    relay = admin_relay
    token = relay.tokens["admin"]
    status, _, html = await get(f"{relay.admin_url}/activities", token=token, params={"limit": "1"})
    assert status == 200 and 'id="first-page"' not in html
    later = html_lib.unescape(re.search(r'<a href="([^"]*)" id="next-page">', html).group(1))
    after = parse_qs(urlsplit(later).query)["after"][0]
    status, _, html = await get(relay.admin_url + later, token=token)
    assert status == 200
    assert html_lib.unescape(re.search(r'<a href="([^"]*)" id="first-page">', html).group(1)) == "/activities?limit=1"
    status, _, html = await get(f"{relay.admin_url}/activities", token=token, params={"after": after})
    assert status == 200 and '<a href="/activities" id="first-page">' in html


# ---------------------------------------------------------------- readiness


async def test_readyz_names_both_problems_at_once(admin_relay):
    relay = admin_relay
    await relay.gate.store.close()
    await relay.sink.stop()
    status, _, text = await get(relay.admin_url + "/readyz")
    body = json.loads(text)
    assert status == 503 and body["ready"] is False
    assert body["store"].startswith("StoreError: ") and body["upstream"] != "ok"
    assert body["reason"] == f"store: {body['store']}; upstream: {body['upstream']}"


async def test_readyz_hands_its_upstream_connection_back_to_the_pool(admin_relay):
    relay = admin_relay
    for _ in range(3):
        status, _, text = await get(relay.admin_url + "/readyz")
        assert status == 200, text
    # The checked connection is pooled again: later checks (and messages) reuse it.
    before = relay.sink.connections
    for _ in range(3):
        assert (await get(relay.admin_url + "/readyz"))[0] == 200
    assert relay.sink.connections == before


# ---------------------------------------------------------------- tokens and sign-on


async def test_a_token_that_is_not_utf8_is_refused_like_any_wrong_token(admin_relay):
    host, port = admin_relay.admin_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /api/v1/activities/" + SOURCE.encode() + b" HTTP/1.1\r\nHost: smtpgate\r\n"
                     b"Authorization: Bearer caf\xe9-\xff\r\nConnection: close\r\n\r\n")
        answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_an_unusable_token_file_is_logged_and_the_others_still_count(tmp_path):
    from smtpgate.admin.auth import Tokens, token_digest
    from smtpgate.config.admin import Admin, AdminToken

    files = {name: tmp_path / f"{name}.token" for name in ("gone", "empty", "short", "good")}
    for path in files.values():
        path.write_text("placeholder\n", encoding="utf-8")  # readable when the config is read
    admin = Admin(tokens=tuple(AdminToken(team=team, token_file=files[name])
                               for team, name in (("Team R", "gone"), ("Team E", "empty"), ("Team S", "short"),
                                                  ("Team G", "good"))))
    files["gone"].unlink()
    files["empty"].write_text("  \n", encoding="utf-8")  # changed since
    files["short"].write_text("sha256:abcd\n", encoding="utf-8")
    files["good"].write_text("good-token\n", encoding="utf-8")
    with capture_logs() as logs:
        tokens = Tokens.load(admin)
    assert [(e["team"], e["file"], e["reason"]) for e in logs if e["event"] == "admin.token_unusable"] == [
        ("Team R", str(files["gone"]), "FileNotFoundError"), ("Team E", str(files["empty"]), "the file is empty"),
        ("Team S", str(files["short"]), "sha256: needs 64 hex digits")]
    grant = tokens.identify("good-token")
    assert grant is not None and grant.teams == {"Team G"} and grant.token == token_digest("good-token").hex()


async def test_the_trusted_proxy_may_send_a_token_without_identity_headers(sign_on_relay, log_lines):
    relay = sign_on_relay
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    status, _, text, _ = await request(url, source=PROXY, token=relay.tokens[TEAM_A])
    assert status == 200, text
    status, _, text, _ = await request(url, token=relay.tokens[TEAM_A])  # from elsewhere: nothing ignored
    assert status == 200, text
    event = audit(log_lines)[-1]
    assert event["team"] == TEAM_A and event["via"] == "token" and event["ignored"] is None


async def test_a_refusal_for_groups_given_twice_names_the_person_in_the_audit(sign_on_relay, log_lines):
    relay = sign_on_relay
    headers = person("a@corp.example", "pl-payroll-agents") + [("X-Forwarded-Groups", "mail-admins")]
    status, _, _, _ = await request(f"{relay.admin_url}/api/v1/activities", source=PROXY, headers=headers)
    assert status == 400
    event = audit(log_lines)[-1]
    assert event["person"] == "a@corp.example" and event["denied"] == "X-Forwarded-Groups given 2 times"
