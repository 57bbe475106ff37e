"""Who an admin request is (smtpgate/admin/identity.py), over real sockets: the
audit line of each way in, the session cookie's attributes, and its clearing."""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from aiohttp import web

from smtpgate.admin.auth import Grant
from smtpgate.admin.identity import Audit, Identities, session_id
from smtpgate.config import load_config
from smtpgate.store import StoreError, open_store
from tests.admin.test_admin_signon import ELSEWHERE, audit, person, request, sign_in
from tests.store_helpers import pg_database, store_url  # noqa: F401 - fixtures
from tests.support.admin import ADMIN_YAML, SOURCE, TEAM_A, TEAM_B, write_tokens
from tests.support.admin import admin_relay, sign_on_relay  # noqa: F401 - fixtures


async def test_identity_headers_from_elsewhere_are_named_ignored_and_no_token_denied(sign_on_relay, log_lines):
    relay = sign_on_relay
    status, *_ = await request(f"{relay.admin_url}/api/v1/activities/{relay.linked}", source=ELSEWHERE,
                               headers=person("boss@corp.example", "mail-admins"))
    assert status == 401
    line = audit(log_lines)[-1]
    assert line["ignored"] == "identity headers from an address admin.trusted_proxy does not name"
    assert line["denied"] == "no token"


async def test_a_bearer_token_with_a_space_inside_is_a_wrong_token(admin_relay, log_lines):
    relay = admin_relay
    status, *_ = await request(f"{relay.admin_url}/api/v1/activities/{relay.linked}",
                               headers=[("Authorization", f"Bearer {relay.tokens[TEAM_B]} extra")])
    assert status == 401
    assert audit(log_lines)[-1]["denied"] == "wrong token"


async def test_a_session_cookie_is_32_random_bytes_for_the_whole_site_and_a_working_day(admin_relay, log_lines):
    relay = admin_relay
    set_cookies, cookie = await sign_in(relay.admin_url, relay.tokens[TEAM_B])
    assert len(cookie) == 43  # 32 bytes in unpadded base64url
    (header,) = [h for h in set_cookies if h.startswith("smtpgate_session=")]
    attributes = {part.strip().split("=")[0].lower(): part.strip().partition("=")[2] for part in header.split(";")}
    assert attributes["path"] == "/" and attributes["max-age"] == "36000"
    status, *_ = await request(f"{relay.admin_url}/api/v1/activities/{relay.linked}", cookie=cookie)
    assert status == 200
    line = audit(log_lines)[-1]
    assert (line["via"], line["team"], line["denied"]) == ("session", TEAM_B, None)
    status, headers, _, _ = await request(f"{relay.admin_url}/logout", method="POST", cookie=cookie)
    assert status == 303
    (cleared,) = [h for h in headers.getall("Set-Cookie") if h.startswith("smtpgate_session=")]
    assert "Path=/" in [part.strip() for part in cleared.split(";")]


async def raw_get(admin_url: str, path: str, cookie: bytes) -> tuple[int, bytes]:
    """GET with a Cookie header of exactly these octets; (status, body)."""
    host, _, port = admin_url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\nCookie: smtpgate_session="
                 + cookie + b"\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_a_cookie_that_is_not_utf8_is_the_session_named_by_the_sha256_of_its_octets(admin_relay, log_lines):
    relay = admin_relay
    token = hashlib.sha256(relay.tokens[TEAM_A].encode()).hexdigest()
    expires = datetime.now(timezone.utc) + timedelta(minutes=5)
    await relay.gate.store.create_session(hashlib.sha256(b"caf\xe9\xff").hexdigest(), TEAM_A, token, expires)
    status, body = await raw_get(relay.admin_url, f"/api/v1/activities/{SOURCE}", b"caf\xe9\xff")
    assert status == 200 and json.loads(body)["messages"]
    line = audit(log_lines)[-1]
    assert (line["via"], line["team"], line["denied"]) == ("session", TEAM_A, None)
    status, body = await raw_get(relay.admin_url, f"/api/v1/activities/{SOURCE}", b"caf\xe9\xfe")
    assert status == 401 and audit(log_lines)[-1]["denied"] == "no session"


async def test_a_token_withdrawn_under_a_session_ends_it_and_the_refusal_says_so(admin_relay, tmp_path, log_lines):
    relay = admin_relay
    _, cookie = await sign_in(relay.admin_url, relay.tokens[TEAM_A])
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    assert (await request(url, cookie=cookie))[0] == 200
    (tmp_path / "team-a.token").write_text("rotated-team-a-token\n", encoding="utf-8")
    relay.gate.reload(load_config(relay.gate.config.path))
    status, _, text, _ = await request(url, cookie=cookie)
    assert status == 401
    assert json.loads(text) == {"error": "token withdrawn: send Authorization: Bearer <token>"}
    line = audit(log_lines)[-1]
    assert (line["denied"], line["team"], line["via"]) == ("token withdrawn", None, None)
    status, _, html, _ = await request(f"{relay.admin_url}/activities", cookie=cookie)
    assert status == 401 and "Your session has ended. Sign in again." in html
    assert audit(log_lines)[-1]["denied"] == "token withdrawn"


async def served(handler, *, cookie: str | None = None) -> tuple[int, str]:
    """One POST, with or without a session cookie, to an aiohttp app of one handler; (status, body)."""
    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        _, port = runner.addresses[0][:2]
        status, _, text, _ = await request(f"http://127.0.0.1:{port}/", method="POST", cookie=cookie)
    finally:
        await runner.cleanup()
    return status, text


async def test_sign_out_says_whether_it_ended_a_session(tmp_path):
    store = await open_store(f"sqlite:{tmp_path / 'smtpgate.db'}", base_dir=tmp_path, auto_upgrade=True)
    cookie = "c" * 43
    await store.create_session(session_id(cookie), TEAM_A, "00" * 32, datetime.now(timezone.utc) + timedelta(hours=1))

    def sign_out(with_store):
        async def handler(request: web.Request) -> web.Response:
            response = web.Response()
            response.text = json.dumps(await Identities.sign_out(with_store, request, response))
            return response
        return handler

    try:
        assert await served(sign_out(None), cookie=cookie) == (200, "false")  # no store: nothing to end
        assert await served(sign_out(store), cookie=cookie) == (200, "true")
        assert await served(sign_out(store), cookie=cookie) == (200, "false")  # ended already
        assert await served(sign_out(store)) == (200, "false")  # no cookie
        assert await store.find_session(session_id(cookie)) is None
    finally:
        await store.close()


async def test_without_a_store_a_session_is_neither_looked_up_nor_started(tmp_path, config_for, sink):
    tokens = write_tokens(tmp_path)
    config = config_for(f"smtp://127.0.0.1:{sink.port}", ADMIN_YAML)
    grant = Grant(teams=frozenset({TEAM_A}), via="token", token=hashlib.sha256(tokens[TEAM_A].encode()).hexdigest())

    async def look_up(request: web.Request) -> web.Response:
        try:
            await Identities().grant(request, config, None, Audit())
        except StoreError as exc:
            return web.Response(text=str(exc))
        return web.Response(text="looked up")

    assert await served(look_up, cookie="c" * 43) == (200, "the store is not open")
    with pytest.raises(StoreError) as info:
        await Identities.sign_in(None, grant, web.Response(), secure=False)
    assert str(info.value) == "the store is not open"
