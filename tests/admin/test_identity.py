"""Who an admin request is (smtpgate/admin/identity.py), over real sockets: the
audit line of each way in, the session cookie's attributes, and its clearing."""

from __future__ import annotations

from tests.admin.test_admin_signon import ELSEWHERE, audit, person, request, sign_in
from tests.store_helpers import pg_database, store_url  # noqa: F401 - fixtures
from tests.support.admin import TEAM_B, admin_relay, sign_on_relay  # noqa: F401 - fixtures


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
