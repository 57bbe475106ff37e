"""Single sign-on through a trusted proxy, hashed tokens, sign-in sessions and HTTPS, over real sockets.

smtpgate's admin listener trusts identity headers from 127.0.0.2 only
(tests/support/admin.py, SIGN_ON_YAML): a client bound to 127.0.0.2 stands
for the proxy, one bound to 127.0.0.1 for anyone else on the host.
"""

from __future__ import annotations

import hashlib
import json
import ssl

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.store_helpers import pg_database, store_url  # noqa: F401 - fixtures
from tests.support.admin import (  # noqa: F401 - fixtures
    ADMIN_YAML,
    SIGN_ON_YAML,
    SOURCE,
    TEAM_A,
    TEAM_B,
    admin_relay,
    sign_on_relay,
    start_admin_relay,
)

PROXY = "127.0.0.2"
ELSEWHERE = "127.0.0.1"


async def request(url: str, *, source: str = ELSEWHERE, method: str = "GET", headers=None, cookie=None,
                  token=None, data=None, ssl_context=None):
    """One request from source's address; returns (status, headers, text, cookies set)."""
    headers = CIMultiDict(headers or [])
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = f"smtpgate_session={cookie}"
    connector = aiohttp.TCPConnector(local_addr=(source, 0), ssl=ssl_context if ssl_context else None)
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.request(method, url, headers=headers, data=data, allow_redirects=False) as response:
            return response.status, response.headers, await response.text(), response.cookies


def person(name: str, groups: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-Email", name), ("X-Forwarded-Groups", groups)]


def audit(log_lines) -> list[dict]:
    return [e for e in log_lines() if e["event"] == "admin.request"]


# ---------------------------------------------------------------- the trusted proxy


async def test_a_person_from_the_trusted_proxy_sees_as_their_team(sign_on_relay, log_lines):
    relay = sign_on_relay
    agent = person("agnieszka@corp.example", "pl-payroll-agents")
    status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities/{relay.linked}", source=PROXY,
                                       headers=agent)
    assert status == 200 and json.loads(text)["messages"], text
    status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities/{SOURCE}", source=PROXY,
                                       headers=agent)
    assert status == 200 and "messages" not in json.loads(text)
    status, _, html, _ = await request(f"{relay.admin_url}/activities/{relay.linked}", source=PROXY, headers=agent)
    assert status == 200 and f"Signed in as agnieszka@corp.example ({TEAM_B})" in html
    assert 'action="/logout"' not in html  # the proxy's sign-out is the proxy's
    lines = audit(log_lines)[-3:]
    assert [(e["person"], e["team"], e["via"], e["peer"], e["status"]) for e in lines] == [
        ("agnieszka@corp.example", TEAM_B, "proxy", PROXY, 200)] * 3
    assert [e["path"] for e in lines] == [f"/api/v1/activities/{relay.linked}", f"/api/v1/activities/{SOURCE}",
                                          f"/activities/{relay.linked}"]


async def test_identity_headers_from_any_other_address_are_ignored(sign_on_relay, log_lines):
    relay = sign_on_relay
    claim = person("boss@corp.example", "mail-admins")
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    status, _, text, _ = await request(url, source=ELSEWHERE, headers=claim)
    assert status == 401 and "messages" not in text
    # With a token the request is the token's, whatever the headers claim.
    status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities/{relay.linked}", source=ELSEWHERE,
                                       headers=claim, token=relay.tokens[TEAM_A])
    assert status == 200 and "messages" not in json.loads(text)
    first, second = audit(log_lines)[-2:]
    assert first["person"] is None and first["team"] is None and first["status"] == 401
    assert first["ignored"] and "trusted_proxy" in first["ignored"]
    assert second["person"] is None and second["team"] == TEAM_A and second["via"] == "token"


async def test_without_a_trusted_proxy_identity_headers_mean_nothing(admin_relay):
    relay = admin_relay
    claim = person("boss@corp.example", "mail-admins")
    for source in (PROXY, ELSEWHERE):
        status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities/{SOURCE}", source=source,
                                           headers=claim)
        assert status == 401 and "messages" not in text


async def test_several_groups_see_the_union_of_their_teams_and_admin_sees_everything(sign_on_relay):
    relay = sign_on_relay
    both = person("lead@corp.example", "uk-payroll-agents,pl-payroll-agents")
    admin = person("postmaster@corp.example", "staff, mail-admins")
    for who in (both, admin):
        for reference in (SOURCE, relay.linked):
            status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities/{reference}",
                                               source=PROXY, headers=who)
            assert status == 200 and "messages" in json.loads(text), (who, reference)


async def test_groups_are_matched_ignoring_case_and_spacing(sign_on_relay):
    relay = sign_on_relay
    odd = person("lead@corp.example", " ,  PAYROLL   leads ,, Other ")
    status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities/{relay.linked}", source=PROXY,
                                       headers=odd)
    assert status == 200 and "messages" in json.loads(text)


async def test_a_person_whose_groups_map_to_no_team_gets_403_saying_so(sign_on_relay, log_lines):
    relay = sign_on_relay
    stranger = person("visitor@corp.example", "finance, staff")
    status, _, html, _ = await request(f"{relay.admin_url}/activities", source=PROXY, headers=stranger)
    assert status == 403
    assert "visitor@corp.example" in html and "none of your groups (finance, staff)" in html
    assert "admin.teams" in html and SOURCE not in html
    status, _, text, _ = await request(f"{relay.admin_url}/api/v1/activities", source=PROXY, headers=stranger)
    assert status == 403 and json.loads(text) == {"error": "no team for these groups"}
    status, _, _, _ = await request(f"{relay.admin_url}/activities", source=PROXY,
                                    headers=[("X-Forwarded-Email", "visitor@corp.example")])
    assert status == 403  # no groups header at all: no team either
    event = audit(log_lines)[-1]
    assert event["person"] == "visitor@corp.example" and event["status"] == 403 and event["team"] is None


async def test_identity_headers_given_twice_or_empty_are_refused(sign_on_relay):
    relay = sign_on_relay
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    twice = [("X-Forwarded-Email", "a@corp.example"), ("X-Forwarded-Email", "boss@corp.example"),
             ("X-Forwarded-Groups", "pl-payroll-agents")]
    status, _, text, _ = await request(url, source=PROXY, headers=twice)
    assert status == 400 and json.loads(text) == {"error": "X-Forwarded-Email given 2 times"}
    groups_twice = person("a@corp.example", "pl-payroll-agents") + [("X-Forwarded-Groups", "mail-admins")]
    status, _, text, _ = await request(url, source=PROXY, headers=groups_twice)
    assert status == 400 and "X-Forwarded-Groups given 2 times" in text
    status, _, text, _ = await request(url, source=PROXY, headers=person("  ", "mail-admins"))
    assert status == 400 and "X-Forwarded-Email is empty" in text


# ---------------------------------------------------------------- tokens


async def test_a_token_file_may_hold_the_tokens_hash(sign_on_relay, tmp_path):
    relay = sign_on_relay
    stored = (tmp_path / "team-b.token").read_text().strip()
    assert stored == "sha256:" + hashlib.sha256(relay.tokens[TEAM_B].encode()).hexdigest()
    url = f"{relay.admin_url}/api/v1/activities/{relay.linked}"
    status, _, text, _ = await request(url, token=relay.tokens[TEAM_B])  # the token: accepted
    assert status == 200 and "messages" in json.loads(text)
    assert (await request(url, token=stored))[0] == 401  # what the config host holds: useless
    assert (await request(url, token=stored[len("sha256:"):]))[0] == 401
    status, _, text, _ = await request(url, token=relay.tokens[TEAM_A])  # a plain token file beside it
    assert status == 200 and "messages" not in json.loads(text)


def test_a_malformed_token_hash_and_odd_teams_are_config_errors(tmp_path):
    import textwrap

    from smtpgate.config import ConfigError, load_config
    from tests.conftest import write_config

    (tmp_path / "a.token").write_text("sha256:abc\n")
    text = textwrap.dedent("""\
        listeners:
          - name: submission
            address: 127.0.0.1:2525
        upstream:
          url: smtp://mail.corp.example:25
        internal_domains: [corp.example]
        mailboxes:
          - address: uk-payroll@corp.example
            team: Team A (UK)
        admin:
          tokens:
            - team: Team A (UK)
              token_file: a.token
          trusted_proxy:
            networks: [127.0.0.2/32]
          teams:
            - team: Team C
              groups: []
        """)

    def line(needle: str) -> int:
        return text.splitlines().index(next(x for x in text.splitlines() if needle in x)) + 1

    def problems() -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_config(write_config(tmp_path, text))
        return info.value.problems

    assert problems() == [f"smtpgate.yaml:{line('groups: []')}: admin.teams[0].groups: name at least one group"]
    text = text.replace("groups: []", "groups: [agents]")
    assert problems() == [
        f'smtpgate.yaml:{line("token_file")}: admin.tokens[0].token_file: {tmp_path / "a.token"}: after '
        f'"sha256:" a token file holds the 64 hex digits of the token\'s SHA-256 hash',
        f'smtpgate.yaml:{line("Team C")}: admin.teams[0].team: "Team C" is neither a team of mailboxes: nor admin',
    ]
    (tmp_path / "a.token").write_text("SHA256:" + "Ab" * 32 + "\n")  # any case
    text = text.replace("Team C", "Team A (UK)")
    config = load_config(write_config(tmp_path, text))
    assert config.admin.teams[0].groups == ("agents",) and config.admin.trusted_proxy.user_header == \
        "X-Forwarded-Email"
    # A loopback proxy network is allowed, with a warning that says what it means.
    assert config.warnings == (
        f"smtpgate.yaml:{line('networks')}: admin.trusted_proxy.networks[0]: 127.0.0.2/32 is this host's loopback: "
        "every local user and process may claim any identity (admin included) with identity headers; give the "
        "proxy an address of its own and let only it reach admin.listen (docs/operations.md, \"Single sign-on\")",)
    assert load_config(write_config(tmp_path, text.replace("127.0.0.2/32", "10.0.5.10/32"))).warnings == ()
    text = text.replace("  trusted_proxy:\n    networks: [127.0.0.2/32]\n", "")
    assert problems() == [f"smtpgate.yaml:{line('groups: [agents]') - 1}: admin.teams: teams map the groups a trusted proxy "
                          "names: set admin.trusted_proxy too"]


# ---------------------------------------------------------------- sessions


async def sign_in(admin_url: str, token: str, **kwargs):
    status, headers, text, cookies = await request(admin_url + "/login", method="POST",
                                                   data={"token": token, "next": "/activities"}, **kwargs)
    assert status == 303, text
    return headers.getall("Set-Cookie"), cookies["smtpgate_session"].value


async def test_a_session_holds_on_every_node_and_sign_out_ends_it_everywhere(store_url, config_for, start_gate,
                                                                            sink, log_lines, tmp_path):
    relay = await start_admin_relay(sink, config_for, start_gate, tmp_path, SIGN_ON_YAML, store=store_url)
    # A second smtpgate on the same store: another node (or worker) behind the same name.
    other, _ = await start_gate(relay.gate.config)
    other_url = "http://%s:%d" % other.admin.bound[0]
    _, cookie = await sign_in(relay.admin_url, relay.tokens[TEAM_B])
    assert cookie != relay.tokens[TEAM_B] and relay.tokens[TEAM_B] not in cookie
    for base in (relay.admin_url, other_url):
        status, _, text, _ = await request(f"{base}/api/v1/activities/{relay.linked}", cookie=cookie)
        assert status == 200 and "messages" in json.loads(text)
    status, headers, _, _ = await request(f"{other_url}/logout", method="POST", cookie=cookie)
    assert status == 303 and "Max-Age=0" in headers["Set-Cookie"]
    for base in (relay.admin_url, other_url):
        assert (await request(f"{base}/api/v1/activities/{relay.linked}", cookie=cookie))[0] == 401
    status, _, html, _ = await request(f"{relay.admin_url}/activities", cookie=cookie)
    assert status == 401 and "Your session has ended." in html


async def test_a_session_ends_when_it_expires(admin_relay):
    from datetime import datetime, timedelta, timezone

    from smtpgate.admin.identity import session_id

    relay = admin_relay
    token = hashlib.sha256(relay.tokens[TEAM_A].encode()).hexdigest()
    now = datetime.now(timezone.utc)
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    for cookie, expires, status in (("fresh-session-" + "x" * 30, now + timedelta(minutes=5), 200),
                                    ("stale-session-" + "y" * 30, now - timedelta(seconds=1), 401)):
        await relay.gate.store.create_session(session_id(cookie), TEAM_A, token, expires)
        assert (await request(url, cookie=cookie))[0] == status, cookie


async def test_a_rotated_token_ends_its_sessions(admin_relay, tmp_path):
    from smtpgate.config import load_config

    relay = admin_relay
    _, cookie = await sign_in(relay.admin_url, relay.tokens[TEAM_A])
    url = f"{relay.admin_url}/api/v1/activities/{SOURCE}"
    assert (await request(url, cookie=cookie))[0] == 200
    (tmp_path / "team-a.token").write_text("rotated-team-a-token\n", encoding="utf-8")
    relay.gate.reload(load_config(relay.gate.config.path))
    assert (await request(url, cookie=cookie))[0] == 401


async def test_https_serves_the_pages_and_marks_the_cookie_secure(sink, config_for, start_gate, log_lines,
                                                                  tmp_path):
    from tests.support.pki import TestCA

    ca = TestCA(tmp_path / "ca")
    cert, key = ca.server("localhost")
    relay = await start_admin_relay(sink, config_for, start_gate, tmp_path,
                                    ADMIN_YAML + f"  tls_cert: {cert}\n  tls_key: {key}\n", scheme="https")
    [started] = [e for e in log_lines() if e["event"] == "listener.started" and e.get("listener") == "admin"]
    assert started["tls"] == "https"
    trust = ssl.create_default_context(cafile=str(ca.cert))
    raw, _ = await sign_in(relay.admin_url, relay.tokens[TEAM_A], ssl_context=trust)
    [set_cookie] = raw
    assert "Secure" in set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    status, _, html, _ = await request(f"{relay.admin_url}/activities/{SOURCE}", token=relay.tokens[TEAM_A],
                                       ssl_context=trust)
    assert status == 200 and 'id="timeline"' in html
    with pytest.raises(aiohttp.ClientError):  # plain HTTP to the HTTPS port
        await request(relay.admin_url.replace("https:", "http:") + "/healthz")
