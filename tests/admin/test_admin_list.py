"""The activities list and search (`GET /api/v1/activities`, the /activities page) over real HTTP,
on SQLite and PostgreSQL, with the team scoping of the single view and bad input of every kind.

The store is filled through SMTP: Team A's 101203-T linked to a new Team B
activity (tests/support/admin.py), Team A's 101204-T with a subject full of
SQL, and a message from Team B's activity whose subject holds a script tag.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from smtpgate.store import listing
from tests.store_helpers import pg_database, store_url  # noqa: F401 - fixtures
from tests.support.admin import SOURCE, TEAM_A, TEAM_B, start_admin_relay

SQL = "Pension query '; DROP TABLE activities; --"
SCRIPT = "<script>alert('x')</script> payslip"


async def get(url: str, *, token: str | None = None, params=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as client:
        async with client.get(url, headers=headers, params=params, allow_redirects=False) as response:
            return response.status, await response.text()


@pytest.fixture(params=["index first", "set first"])
async def listed(request, store_url, sink, config_for, start_gate, log_lines, tmp_path, monkeypatch):
    """A filled store; each list query shape (listing.FEW: 0 reads the list's index first)."""
    if request.param == "index first":
        monkeypatch.setattr(listing, "FEW", 0)
    relay = await start_admin_relay(sink, config_for, start_gate, tmp_path, store=store_url)
    for sender, subject, message_id in (
        ("uk-payroll+101204-T@corp.example", SQL, "<pension.1@corp.example>"),
        (f"pl-payroll+{relay.linked}@corp.example", SCRIPT, "<payslip.2@corp.example>"),
    ):
        data = (f"From: {sender}\r\nTo: client@supplier.example\r\nSubject: {subject}\r\n"
                f"Message-ID: {message_id}\r\n\r\nbody\r\n").encode()
        assert (await relay.send(sender, ["client@supplier.example"], data)).data[0] == 250
    return relay


async def api_list(relay, who: str, **params) -> dict:
    status, text = await get(f"{relay.admin_url}/api/v1/activities", token=relay.tokens[who], params=params)
    assert status == 200, text
    return json.loads(text)


def refs(listing_: dict) -> list[str]:
    return [row["reference"] for row in listing_["activities"]]


async def test_each_team_lists_its_own_activities_in_full_and_linked_ones_as_header_information(listed):
    relay = listed
    b = await api_list(relay, TEAM_B)
    assert refs(b) == [relay.linked, SOURCE] and b["next"] is None  # newest first; 101204-T is not B's
    own, other = b["activities"]
    assert own["full"] is True and own["team"] == TEAM_B and own["last_subject"] == SCRIPT
    assert [link["reference"] for link in own["links"]] == [SOURCE]
    assert other == {"reference": SOURCE, "mailbox": "uk-payroll@corp.example", "team": TEAM_A,
                     "created_at": other["created_at"], "full": False,
                     "links": [{"reference": relay.linked, "mailbox": "pl-payroll@corp.example",
                                "team": TEAM_B, "created_at": own["links"][0]["created_at"]}]}
    a = await api_list(relay, TEAM_A)
    assert refs(a) == ["101204-T", relay.linked, SOURCE]
    assert [row["full"] for row in a["activities"]] == [True, False, True]
    assert a["activities"][0]["last_subject"] == SQL
    assert "last_subject" not in a["activities"][1] and SCRIPT not in json.dumps(a)
    everything = await api_list(relay, "admin")
    assert refs(everything) == ["101204-T", relay.linked, SOURCE]
    assert all(row["full"] for row in everything["activities"])
    assert refs(await api_list(relay, TEAM_A, mailbox="PL-Payroll@corp.example")) == [relay.linked]
    assert refs(await api_list(relay, TEAM_B, since="2000-01-01")) == [relay.linked, SOURCE]
    assert refs(await api_list(relay, TEAM_B, since="2999-01-01T00:00:00Z")) == []


async def test_search_finds_only_messages_the_caller_may_see_in_full(listed):
    relay = listed
    assert refs(await api_list(relay, TEAM_B, q="invoice 4411")) == [relay.linked]
    assert refs(await api_list(relay, TEAM_A, q="INVOICE 4411")) == [SOURCE]
    # Team A's pension message: found by Team A and the admin, never by Team B.
    assert refs(await api_list(relay, TEAM_A, q="pension")) == ["101204-T"]
    assert refs(await api_list(relay, "admin", q="pension")) == ["101204-T"]
    assert refs(await api_list(relay, TEAM_B, q="pension")) == []
    # Team B's payslip reached only Team B's activity.
    assert refs(await api_list(relay, TEAM_A, q="payslip")) == []
    assert refs(await api_list(relay, TEAM_B, q="payslip")) == [relay.linked]
    # A Message-ID, whole or in part.
    assert refs(await api_list(relay, TEAM_A, q="<pension.1@corp.example>")) == ["101204-T"]
    assert refs(await api_list(relay, TEAM_A, q="admin.first@")) == [SOURCE]
    assert refs(await api_list(relay, TEAM_B, q="<admin.first@corp.example>")) == [relay.linked]
    # Short texts are searched too.
    assert refs(await api_list(relay, TEAM_B, q="44")) == [relay.linked]


async def test_pages_follow_the_cursor_to_the_end(listed):
    relay = listed
    seen, after = [], None
    while True:
        page = await api_list(relay, "admin", limit="1", **({"after": after} if after else {}))
        seen += refs(page)
        after = page["next"]
        if after is None:
            break
    assert seen == ["101204-T", relay.linked, SOURCE]
    # A cursor is only a position: the next page is scoped again.
    first = await api_list(relay, TEAM_B, limit="1")
    assert refs(await api_list(relay, TEAM_B, after=first["next"])) == [SOURCE]


async def test_metacharacters_are_text_and_bad_parameters_are_400(listed, log_lines):
    relay = listed
    # SQL and HTML metacharacters are text to search for, nothing else.
    assert refs(await api_list(relay, TEAM_A, q="'; DROP TABLE")) == ["101204-T"]
    assert refs(await api_list(relay, TEAM_A, q="%")) == [] and refs(await api_list(relay, TEAM_A, q="_")) == []
    assert refs(await api_list(relay, TEAM_B, q="<script>")) == [relay.linked]
    assert refs(await api_list(relay, "admin")) == ["101204-T", relay.linked, SOURCE]  # every table still there
    url = f"{relay.admin_url}/api/v1/activities"
    token = relay.tokens[TEAM_A]
    for params, error in (
        ({"q": "x" * 10_000}, "q: at most 1000 characters (got 10000)"),
        ({"limit": "0"}, "limit: a whole number from 1 to 200"),
        ({"limit": "-1"}, "limit: a whole number from 1 to 200"),
        ({"limit": str(10**9)}, "limit: a whole number from 1 to 200"),
        ({"limit": "ten"}, "limit: a whole number from 1 to 200"),
        ({"since": "last week"}, "since: expected a date (2026-11-27) or an ISO 8601 time"),
        ({"after": "forged"}, 'after: not a cursor this server gave (use the "next" value of the previous page)'),
        ({"after": "WyIyMDI2LTAxLTAxIiwgNV0"}, 'after: not a cursor this server gave (use the "next" value '
                                              'of the previous page)'),
        ([("q", "a"), ("q", "b")], "q given 2 times"),
    ):
        status, text = await get(url, token=token, params=params)
        assert (status, json.loads(text)) == (400, {"error": error}), params
    event = [e for e in log_lines() if e["event"] == "admin.request"][-1]
    assert event["status"] == 400 and event["denied"] == "bad query: q given 2 times" and event["team"] == TEAM_A
    status, _ = await get(url)
    assert status == 401


async def test_the_list_page_searches_pages_and_opens_each_row_without_javascript(listed):
    relay = listed
    token = relay.tokens[TEAM_B]
    status, html = await get(f"{relay.admin_url}/activities", token=token)
    assert status == 200 and "<script>" not in html and "&lt;script&gt;" in html
    assert f'<a class="open" href="/activities/{relay.linked}">' in html
    assert f'<a class="open" href="/activities/{SOURCE}">' in html and "header information only" in html
    assert "Pension" not in html and "Invoice 4411" not in html  # Team A's subjects
    assert '<form class="search" action="/activities" method="get"' in html
    status, html = await get(f"{relay.admin_url}/activities", token=token, params={"q": "invoice", "limit": "1"})
    assert status == 200 and f'href="/activities/{relay.linked}"' in html and 'id="next-page"' not in html
    status, html = await get(f"{relay.admin_url}/activities", token=token, params={"limit": "1"})
    next_url = html.split('id="next-page"')[0].rsplit('href="', 1)[1].split('"')[0].replace("&amp;", "&")
    assert parse_qs(urlsplit(next_url).query)["limit"] == ["1"]
    status, html = await get(relay.admin_url + next_url, token=token)
    assert status == 200 and f'<a class="open" href="/activities/{SOURCE}">' in html and 'id="first-page"' in html
    status, html = await get(f"{relay.admin_url}/activities", token=token, params={"q": "x" * 10_000})
    assert status == 400 and "q: at most 1000 characters" in html
