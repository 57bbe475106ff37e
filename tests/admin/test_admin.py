"""The admin listener over real sockets: health, readiness, the API and the pages with team permissions.

smtpgate runs with `admin.listen` on a loopback port, relays to the sink,
and keeps links in a real SQLite store that a real SMTP message filled
(tests/support/admin.py). Requests go through aiohttp's client.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from http.cookies import SimpleCookie

import aiohttp
import pytest
from aiohttp import http_parser

from tests.support.admin import SOURCE, TEAM_A, TEAM_B, admin_relay  # noqa: F401 - fixture
from tests.support.sink import Sink


async def get(url: str, *, token: str | None = None, cookie: str | None = None, headers=None, **kwargs):
    """GET url; returns (status, headers, text). No redirect is followed."""
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = f"smtpgate_session={cookie}"
    async with aiohttp.ClientSession() as client:
        async with client.get(url, headers=headers, allow_redirects=False, **kwargs) as response:
            return response.status, response.headers, await response.text()


def links_show(config_path, reference: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "smtpgate", "links", "show", reference, "--json",
                          "-c", str(config_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---------------------------------------------------------------- health


async def test_healthz_answers_without_a_token(admin_relay):
    status, headers, text = await get(admin_relay.admin_url + "/healthz")
    assert status == 200 and json.loads(text) == {"status": "alive"}
    assert headers["Content-Type"].startswith("application/json")


async def test_the_admin_listener_start_is_logged_with_its_bound_address(admin_relay, log_lines):
    host, port = admin_relay.gate.admin.bound[0]
    [started] = [e for e in log_lines() if e["event"] == "listener.started" and e.get("listener") == "admin"]
    assert (started["address"], started["tls"]) == (f"{host}:{port}", "none")


async def test_readyz_follows_the_upstream_going_away_and_coming_back(admin_relay):
    url = admin_relay.admin_url + "/readyz"
    status, _, text = await get(url)
    assert status == 200, text
    assert json.loads(text) == {"ready": True, "store": "ok", "upstream": "ok"}

    port = admin_relay.sink.port
    await admin_relay.sink.stop()
    status, _, text = await get(url)
    body = json.loads(text)
    assert status == 503, text
    assert body["ready"] is False and body["store"] == "ok"
    assert f"127.0.0.1:{port}" in body["upstream"] and body["reason"].startswith("upstream: ")

    async with Sink(port=port):
        status, _, text = await get(url)
        assert status == 200, text
        assert json.loads(text)["upstream"] == "ok"


async def test_readyz_names_a_store_that_cannot_answer(admin_relay):
    await admin_relay.gate.store.close()
    status, _, text = await get(admin_relay.admin_url + "/readyz")
    body = json.loads(text)
    assert status == 503 and body["upstream"] == "ok" and body["store"] != "ok"
    assert body["reason"].startswith("store: ")


async def test_readyz_is_503_while_draining(admin_relay):
    """A load balancer stops sending while transactions in flight finish."""
    relay = admin_relay
    relay.sink.hold_data = asyncio.Event()
    sending = asyncio.create_task(relay.send("uk-payroll+101203-T@corp.example", ["client@supplier.example"],
                                             b"Subject: held\r\n\r\nbody\r\n"))
    await relay.sink.wait_for_received(2)
    draining = asyncio.create_task(relay.gate.drain(10))
    try:
        async with asyncio.timeout(10):
            while not relay.gate.registry.draining:  # the drain task sets it on its first step
                await asyncio.sleep(0)
        status, _, text = await get(relay.admin_url + "/readyz")
        assert status == 503 and json.loads(text) == {"ready": False, "reason": "shutting down"}
    finally:
        relay.sink.hold_data.set()
        await sending
        await draining


# ---------------------------------------------------------------- API


async def test_api_own_team_sees_the_same_json_as_links_show(admin_relay):
    relay = admin_relay
    status, headers, text = await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 200, text
    assert headers["Content-Type"].startswith("application/json")
    shown = json.loads(text)
    assert shown == links_show(relay.gate.config.path, SOURCE)
    assert shown["team"] == TEAM_A
    assert [link["reference"] for link in shown["links"]] == [relay.linked]
    [message] = shown["messages"]
    assert message["message_id"] == "<admin.first@corp.example>"


async def test_api_other_team_sees_header_information_only(admin_relay):
    relay = admin_relay
    status, _, text = await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}", token=relay.tokens[TEAM_B])
    assert status == 200, text
    full = links_show(relay.gate.config.path, SOURCE)
    shown = json.loads(text)
    assert "messages" not in shown
    assert shown == {key: full[key] for key in ("reference", "mailbox", "team", "links")}


async def test_api_each_team_sees_its_own_side_of_the_link_in_full(admin_relay):
    relay = admin_relay
    url = f"{relay.admin_url}/api/v1/activities/{relay.linked}"
    status, _, text = await get(url, token=relay.tokens[TEAM_B])
    assert status == 200 and json.loads(text) == links_show(relay.gate.config.path, relay.linked)
    assert json.loads(text)["messages"]
    status, _, text = await get(url, token=relay.tokens[TEAM_A])
    assert status == 200 and "messages" not in json.loads(text)


async def test_api_admin_sees_everything(admin_relay):
    relay = admin_relay
    for reference in (SOURCE, relay.linked):
        status, _, text = await get(f"{relay.admin_url}/api/v1/activities/{reference}", token=relay.tokens["admin"])
        assert status == 200 and json.loads(text) == links_show(relay.gate.config.path, reference)


async def test_api_without_a_token_is_401(admin_relay):
    status, headers, text = await get(f"{admin_relay.admin_url}/api/v1/activities/{SOURCE}")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="smtpgate"'
    assert "messages" not in text and SOURCE not in text


async def test_api_with_a_wrong_token_is_401_and_the_token_is_not_logged(admin_relay, log_lines):
    relay = admin_relay
    wrong = relay.tokens[TEAM_A] + "x"
    status, headers, text = await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}", token=wrong)
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Bearer realm="smtpgate", error="invalid_token"'
    # A token of another scheme is no token either.
    status, _, _ = await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}",
                             headers={"Authorization": f"Basic {relay.tokens[TEAM_A]}"})
    assert status == 401
    await get(f"{relay.admin_url}/api/v1/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    events = [e for e in log_lines() if e["event"] == "admin.request"]
    assert [(e["status"], e["denied"], e["team"]) for e in events[-3:]] == [
        (401, "wrong token", None), (401, "no token", None), (200, None, TEAM_A)]
    logged = json.dumps(log_lines())
    assert all(token not in logged for token in relay.tokens.values())
    assert wrong not in logged


async def test_the_request_log_gives_what_was_asked_and_the_time_taken(admin_relay, log_lines):
    """admin.request: the query string as sent (its first 300 characters), null without one, and
    duration_ms in milliseconds to a tenth, within the time the client waited."""
    relay = admin_relay
    url = f"{relay.admin_url}/api/v1/activities"
    token = relay.tokens[TEAM_A]
    took_ms = []
    for params in ({"q": "invoice 4411", "limit": "5"}, None, {"q": "y" * 400}):
        began = time.monotonic()
        status, _, _ = await get(url, token=token, params=params)
        took_ms.append((time.monotonic() - began) * 1000)
        assert status == 200
    events = [e for e in log_lines() if e["event"] == "admin.request"][-3:]
    assert [(e["path"], e["query"]) for e in events] == [
        ("/api/v1/activities", "q=invoice 4411&limit=5"), ("/api/v1/activities", None),
        ("/api/v1/activities", "q=" + "y" * 298)]
    for event, took in zip(events, took_ms):
        duration = event["duration_ms"]
        assert isinstance(duration, float) and duration == round(duration, 1)
        assert 0 < duration <= took, (duration, took)


async def test_api_unknown_reference_is_404_after_authentication(admin_relay):
    relay = admin_relay
    status, _, text = await get(f"{relay.admin_url}/api/v1/activities/4-A", token=relay.tokens[TEAM_A])
    assert status == 404 and json.loads(text) == {"error": "no activity 4-A"}
    status, _, _ = await get(f"{relay.admin_url}/api/v1/activities/4-A")
    assert status == 401  # nothing about existence before the token is checked


async def sign_in(relay, token: str) -> str:
    """The session cookie the sign-in form sets for token."""
    async with aiohttp.ClientSession() as client:
        async with client.post(relay.admin_url + "/login", allow_redirects=False,
                               data={"token": token, "next": "/activities"}) as response:
            assert response.status == 303, await response.text()
            return response.cookies["smtpgate_session"].value


async def test_api_accepts_the_session_cookie_but_not_the_token_as_a_cookie(admin_relay):
    relay = admin_relay
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    status, _, text = await get(url, cookie=await sign_in(relay, relay.tokens[TEAM_B]))
    assert status == 200 and "messages" not in json.loads(text)
    assert (await get(url, cookie=relay.tokens[TEAM_B]))[0] == 401


async def test_tokens_are_read_again_on_reload(admin_relay, tmp_path):
    """Rotating a token: write the file, reload; the old token stops working."""
    from smtpgate.config import load_config

    relay = admin_relay
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    old = relay.tokens[TEAM_A]
    (tmp_path / "team-a.token").write_text("rotated-team-a-token\n", encoding="utf-8")
    assert (await get(url, token=old))[0] == 200  # same snapshot: the file is not read per request
    relay.gate.reload(load_config(relay.gate.config.path))
    assert (await get(url, token=old))[0] == 401
    assert (await get(url, token="rotated-team-a-token"))[0] == 200


async def test_a_search_text_in_a_request_target_up_to_64_kib_gets_smtpgates_answer(admin_relay):
    """A long `q` is refused by smtpgate naming it; only a request line past 64 KiB
    (65536 octets of target for aiohttp's C parser, of the whole line for its Python one)
    is refused by the HTTP parser itself."""
    relay = admin_relay
    host, port = relay.gate.admin.bound[0]
    counted = 0 if http_parser.HttpRequestParser is not http_parser.HttpRequestParserPy else len("GET  HTTP/1.1")

    async def raw_get(target: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {relay.tokens[TEAM_A]}\r\n"
                     f"Connection: close\r\n\r\n".encode("ascii"))
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    prefix = "/api/v1/activities?q="
    longest = prefix + "x" * (65536 - counted - len(prefix))
    status, body = await raw_get(longest)
    q_length = 65536 - counted - len(prefix)
    assert (status, json.loads(body)) == (400, {"error": f"q: at most 1000 characters (got {q_length})"})
    status, body = await raw_get(longest + "x")
    assert status == 400 and b"q: at most" not in body


# ---------------------------------------------------------------- pages


async def test_page_own_team_shows_links_and_the_timeline(admin_relay):
    relay = admin_relay
    status, headers, html = await get(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_A])
    assert status == 200, html
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in \
        headers["Content-Security-Policy"]
    assert f'href="/activities/{relay.linked}"' in html
    assert 'id="timeline"' in html and 'id="messages-hidden"' not in html
    assert "&lt;admin.first@corp.example&gt;" in html
    # Header text is escaped, never markup: the subject held "<b>&amp; co</b>".
    assert "Invoice 4411 &lt;b&gt;&amp;amp; co&lt;/b&gt;" in html and "<b>" not in html
    assert "Signed in as Team A (UK)" in html


async def test_page_other_team_shows_links_but_no_messages(admin_relay):
    relay = admin_relay
    status, _, html = await get(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_B])
    assert status == 200, html
    assert f'href="/activities/{relay.linked}"' in html
    assert 'id="messages-hidden"' in html and 'id="timeline"' not in html
    assert "Invoice 4411" not in html and "admin.first@corp.example" not in html


async def test_page_admin_sees_the_timeline_of_every_team(admin_relay):
    relay = admin_relay
    for reference in (SOURCE, relay.linked):
        status, _, html = await get(f"{relay.admin_url}/activities/{reference}", token=relay.tokens["admin"])
        assert status == 200 and 'id="timeline"' in html and "Invoice 4411" in html


async def test_page_without_a_token_is_a_401_login_form(admin_relay):
    status, _, html = await get(f"{admin_relay.admin_url}/activities/{SOURCE}")
    assert status == 401
    assert '<form action="/login" method="post">' in html
    assert f'name="next" value="/activities/{SOURCE}"' in html
    assert 'id="login-error"' not in html and "Invoice" not in html


async def test_page_with_an_unknown_session_is_401(admin_relay):
    status, _, html = await get(f"{admin_relay.admin_url}/activities/{SOURCE}", cookie="not-a-session")
    assert status == 401 and "Your session has ended." in html and "Invoice" not in html


async def test_page_unknown_reference_is_404(admin_relay):
    status, _, html = await get(f"{admin_relay.admin_url}/activities/4-A", token=admin_relay.tokens[TEAM_A])
    assert status == 404 and "No activity 4-A" in html
    status, _, _ = await get(f"{admin_relay.admin_url}/activities/4-A")
    assert status == 401


async def test_login_sets_an_httponly_strict_cookie_that_opens_the_page(admin_relay):
    relay = admin_relay
    async with aiohttp.ClientSession() as client:
        async with client.post(relay.admin_url + "/login", allow_redirects=False,
                               data={"token": relay.tokens[TEAM_A], "next": f"/activities/{SOURCE}"}) as response:
            assert response.status == 303
            assert response.headers["Location"] == f"/activities/{SOURCE}"
            [raw] = response.headers.getall("Set-Cookie")
    cookie = SimpleCookie()
    cookie.load(raw)
    morsel = cookie["smtpgate_session"]
    assert morsel["httponly"] is True and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP here; tests/admin/test_admin_signon.py checks HTTPS
    assert int(morsel["max-age"]) > 0
    # The cookie is an opaque session id, nothing derived from the token.
    assert relay.tokens[TEAM_A] not in raw and len(morsel.value) >= 40
    status, _, html = await get(f"{relay.admin_url}/activities/{SOURCE}", cookie=morsel.value)
    assert status == 200 and 'id="timeline"' in html


async def test_login_refuses_a_wrong_token_and_never_redirects_off_site(admin_relay):
    relay = admin_relay
    async with aiohttp.ClientSession() as client:
        async with client.post(relay.admin_url + "/login", allow_redirects=False,
                               data={"token": "nope", "next": "/activities"}) as response:
            assert response.status == 401 and "Set-Cookie" not in response.headers
            assert "That token is not accepted." in await response.text()
        async with client.post(relay.admin_url + "/login", allow_redirects=False,
                               data={"token": relay.tokens["admin"], "next": "//evil.example/"}) as response:
            assert response.status == 303 and response.headers["Location"] == "/activities"
        async with client.post(relay.admin_url + "/logout", allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/login"
            assert "smtpgate_session=" in response.headers["Set-Cookie"]
            assert "Max-Age=0" in response.headers["Set-Cookie"]


async def test_search_box_jumps_to_the_reference(admin_relay):
    relay = admin_relay
    status, headers, _ = await get(f"{relay.admin_url}/activities", token=relay.tokens[TEAM_B],
                                   params={"reference": f" {relay.linked} "})
    assert status == 303 and headers["Location"] == f"/activities/{relay.linked}"
    status, _, html = await get(f"{relay.admin_url}/activities", token=relay.tokens[TEAM_B])
    assert status == 200 and 'name="reference"' in html
    status, headers, _ = await get(relay.admin_url + "/")
    assert status == 302 and headers["Location"] == "/activities"


# ---------------------------------------------------------------- configuration


CONFIG = """\
listeners:
  - name: submission
    address: 127.0.0.1:2525
    relay_networks: [127.0.0.0/8]
upstream:
  url: smtp://mail.corp.example:25
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
admin:
  listen: "[::1]:9925"
  tokens:
    - team: Team A (UK)
      token_file: a.token
    - team: Team A (U.K.)
      token_file: b.token
    - team: admin
      token_file: empty.token
"""


def test_admin_tokens_name_a_known_team_and_a_non_empty_file(tmp_path):
    from smtpgate.config import ConfigError, load_config, parse_hostport
    from tests.conftest import write_config

    (tmp_path / "a.token").write_text("secret-a\n")
    (tmp_path / "b.token").write_text("secret-b\n")
    (tmp_path / "empty.token").write_text("\n")
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, CONFIG))
    assert info.value.problems == [
        'smtpgate.yaml:16: admin.tokens[1].team: "Team A (U.K.)" is neither a team of mailboxes: nor admin',
        f"smtpgate.yaml:19: admin.tokens[2].token_file: {tmp_path / 'empty.token'} is empty",
    ]
    fixed = CONFIG.replace("Team A (U.K.)", "Team A (UK)").replace("empty.token", "b.token")
    config = load_config(write_config(tmp_path, fixed))
    assert parse_hostport(config.admin.listen) == ("::1", 9925)
    assert [t.team for t in config.admin.tokens] == ["Team A (UK)", "Team A (UK)", "admin"]


async def test_a_token_file_gone_at_start_is_logged_and_refuses_access(sink, config_for, start_gate, log_lines,
                                                                        tmp_path):
    from tests.support.admin import ADMIN_YAML, write_tokens

    tokens = write_tokens(tmp_path)
    config = config_for(f"smtp://127.0.0.1:{sink.port}", ADMIN_YAML)
    (tmp_path / "team-b.token").unlink()  # after the config was checked, before smtpgate reads it
    gate, _ = await start_gate(config)
    host, port = gate.admin.bound[0]
    url = f"http://{host}:{port}/api/v1/activities/{SOURCE}"
    assert (await get(url, token=tokens[TEAM_B]))[0] == 401
    assert (await get(url, token=tokens[TEAM_A]))[0] == 404  # the others still work
    [event] = [e for e in log_lines() if e["event"] == "admin.token_unusable"]
    assert event["team"] == TEAM_B and event["file"].endswith("team-b.token")
    assert event["reason"] == "FileNotFoundError" and event["level"] == "error"
