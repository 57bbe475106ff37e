"""The admin listener's answers checked against expectations written here from the documented
object (README "Admin"), not against another view of the same function: who sees which
messages, a store that fails, where a sign-in may send the browser, the headers on every answer.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta, timezone

import aiohttp
import pytest

from smtpgate.admin import AdminServer, Sources
from smtpgate.store import open_store
from smtpgate.upstream.client import UpstreamPool
from tests.store_helpers import pg_database, pg_store_url  # noqa: F401 - fixtures
from tests.support.admin import (ADMIN_YAML, SOURCE, TEAM_A, TEAM_B, admin_relay,  # noqa: F401 - fixture
                                 start_admin_relay, write_tokens)
from tests.admin.test_admin import get

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
FIRST_MESSAGE = {
    "message_id": "<admin.first@corp.example>",
    "date": "Fri, 27 Nov 2026 10:00:00 +0000",
    "from": "Team A <uk-payroll+101203-T@corp.example>",
    "subject": "Invoice 4411 <b>&amp; co</b>",
}
SECURITY = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


async def api(relay, reference: str, who: str) -> tuple[int, dict]:
    status, _, text = await get(f"{relay.admin_url}/api/v1/activities/{reference}", token=relay.tokens[who])
    return status, json.loads(text)


def recent(stamp: str) -> bool:
    """An ISO time in UTC from the last few minutes (the link the fixture made)."""
    assert ISO.fullmatch(stamp), stamp
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return timedelta(0) <= datetime.now(timezone.utc) - when < timedelta(minutes=10)


async def test_the_api_object_is_the_documented_one_for_each_side(admin_relay):
    relay = admin_relay
    tagged_b = f"pl-payroll+{relay.linked}@corp.example"
    status, own = await api(relay, SOURCE, TEAM_A)
    assert status == 200
    [link] = own.pop("links")
    assert recent(link.pop("created_at"))
    assert link == {"reference": relay.linked, "mailbox": "pl-payroll@corp.example", "team": TEAM_B}
    assert own == {"reference": SOURCE, "mailbox": "uk-payroll@corp.example", "team": TEAM_A,
                   "messages": [{**FIRST_MESSAGE, "recipients": ["client@supplier.example", tagged_b]}]}
    status, other = await api(relay, SOURCE, TEAM_B)
    assert status == 200 and set(other) == {"reference", "mailbox", "team", "links"}
    status, linked = await api(relay, relay.linked, TEAM_B)
    assert status == 200
    [back] = linked["links"]
    assert (back["reference"], back["mailbox"], back["team"]) == (SOURCE, "uk-payroll@corp.example", TEAM_A)
    assert (linked["mailbox"], linked["team"]) == ("pl-payroll@corp.example", TEAM_B)
    assert [m["message_id"] for m in linked["messages"]] == ["<admin.first@corp.example>"]


async def test_an_activity_with_no_owner_shows_its_messages_to_no_team(admin_relay):
    relay = admin_relay
    # The source is named only in the subject, by someone who is not a team mailbox: no owner.
    data = (b"From: Jane <jane@corp.example>\r\nTo: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
            b"Subject: RE: payslips [5512-C]\r\nMessage-ID: <ownerless@corp.example>\r\n\r\nbody\r\n")
    result = await relay.send("jane@corp.example", ["client@supplier.example", "pl-payroll@corp.example"], data)
    assert result.data[0] == 250
    for team in (TEAM_A, TEAM_B):
        status, shown = await api(relay, "5512-C", team)
        assert status == 200 and shown["mailbox"] is None and shown["team"] is None
        assert "messages" not in shown, team
    status, shown = await api(relay, "5512-C", "admin")
    assert [m["message_id"] for m in shown["messages"]] == ["<ownerless@corp.example>"]


async def test_a_store_that_fails_is_a_503_for_the_api_and_the_page(admin_relay, tmp_path):
    relay = admin_relay
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        conn.execute("ALTER TABLE links RENAME TO links_away")
    status, headers, text = await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 503 and json.loads(text)["error"].startswith("store: ")
    status, headers, text = await get(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 503 and headers["Content-Type"].startswith("text/html")
    assert all(headers[name] == value for name, value in SECURITY.items())


async def test_a_store_failure_names_the_store_in_utf_8_not_escapes(sink, config_for, start_gate, log_lines,
                                                                     tmp_path):
    path = tmp_path / "składnica łączy.db"
    relay = await start_admin_relay(sink, config_for, start_gate, tmp_path, store=f"sqlite:{path}")
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE links RENAME TO links_away")
    status, headers, text = await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 503 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(text) == {"error": f"store: sqlite {path}: no such table: links"}
    assert f"sqlite {path}:" in text  # as written, not \\u escapes


async def serve_admin(sources: Sources, ready_timeout: float) -> tuple[AdminServer, str]:
    """An admin listener on a free loopback port reading these sources."""
    server = AdminServer(lambda: sources, ready_timeout=ready_timeout)
    await server.start("127.0.0.1", 0)
    host, port = server.bound[0]
    return server, f"http://{host}:{port}"


async def test_readiness_and_the_list_say_so_when_no_store_is_open(sink, config_for, tmp_path):
    tokens = write_tokens(tmp_path)
    config = config_for(f"smtp://127.0.0.1:{sink.port}", ADMIN_YAML)
    pool = UpstreamPool(config.upstream, local_hostname=config.hostname)
    server, url = await serve_admin(Sources(config, None, pool), ready_timeout=5)
    try:
        status, _, text = await get(url + "/readyz")
        assert (status, json.loads(text)) == (503, {"ready": False, "store": "not open", "upstream": "ok",
                                                   "reason": "store: not open"})
        status, _, text = await get(url + "/api/v1/activities", token=tokens[TEAM_A])
        assert (status, json.loads(text)) == (503, {"error": "store: the store is not open"})
    finally:
        await server.close()
        await pool.close()


@pytest.mark.postgres
async def test_readiness_gives_up_on_a_store_that_does_not_answer_within_its_timeout(
        pg_store_url, sink, config_for, tmp_path):
    """The schema table locked by another connection: the store's check waits; readiness
    answers 503 after the ready timeout, not when the store finally answers."""
    import asyncpg

    config = config_for(f"smtp://127.0.0.1:{sink.port}", store=pg_store_url)
    store = await open_store(pg_store_url, base_dir=tmp_path)
    pool = UpstreamPool(config.upstream, local_hostname=config.hostname)
    server, url = await serve_admin(Sources(config, store, pool), ready_timeout=0.2)
    locker = await asyncpg.connect(pg_store_url)
    try:
        status, _, text = await get(url + "/readyz")
        assert (status, json.loads(text)) == (200, {"ready": True, "store": "ok", "upstream": "ok"})
        async with locker.transaction():
            await locker.execute("LOCK TABLE smtpgate_schema IN ACCESS EXCLUSIVE MODE")
            status, _, text = await get(url + "/readyz", timeout=aiohttp.ClientTimeout(total=5))
        assert (status, json.loads(text)) == (503, {
            "ready": False, "store": "no answer within 0.2 s", "upstream": "ok",
            "reason": "store: no answer within 0.2 s"})
        status, _, text = await get(url + "/readyz")
        assert status == 200, text
    finally:
        await locker.close()
        await server.close()
        await pool.close()
        await store.close()


async def login(relay, next_path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as client:
        async with client.post(relay.admin_url + "/login", allow_redirects=False,
                               data={"token": relay.tokens[TEAM_A], "next": next_path}) as response:
            return response.status, response.headers.get("Location", "")


async def test_a_sign_in_sends_the_browser_to_a_path_on_this_server_only(admin_relay):
    relay = admin_relay
    for elsewhere in ("//evil.example/activities", "https://evil.example/", "/\\evil.example", "evil.example",
                      "", "javascript:alert(1)"):
        assert await login(relay, elsewhere) == (303, "/activities"), elsewhere
    assert await login(relay, f"/activities/{SOURCE}") == (303, f"/activities/{SOURCE}")
    status, headers, text = await get(f"{relay.admin_url}/login?next=//evil.example/x")
    assert status == 200 and "evil.example" not in text


async def test_every_answer_carries_the_security_headers(admin_relay):
    relay = admin_relay
    answers = [
        await get(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_A]),  # 200 page
        await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}"),  # 401
        await get(f"{relay.admin_url}/api/v1/activities/4-A", token=relay.tokens[TEAM_A]),  # 404
        await get(f"{relay.admin_url}/"),  # a redirect
        await get(f"{relay.admin_url}/healthz"),
    ]
    assert [status for status, _, _ in answers] == [200, 401, 404, 302, 200]
    for status, headers, _ in answers:
        for name, value in SECURITY.items():
            assert headers.get(name) == value, (status, name)
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], status
