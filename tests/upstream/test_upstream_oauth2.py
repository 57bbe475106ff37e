"""The token cache (smtpgate.upstream.oauth2.TokenSource) against a real token endpoint on loopback.

Time is a clock the test moves; every request crosses a real HTTP connection.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from smtpgate.config import OAuth2
from smtpgate.upstream.oauth2 import TokenError, TokenSource
from tests.support.token_endpoint import TokenEndpoint
from tests.upstream.test_upstream_xoauth2 import CLIENT_ID, SECRET, Clock


@pytest.fixture
async def endpoint():
    async with TokenEndpoint(client_id=CLIENT_ID, client_secret=SECRET) as e:
        yield e


@pytest.fixture
async def source(tmp_path, endpoint):
    secret_file = tmp_path / "oauth.secret"
    secret_file.write_text(SECRET + "\n")
    settings = OAuth2(token_url=endpoint.url, client_id=CLIENT_ID, client_secret_file=secret_file,
                      scope="https://outlook.office365.com/.default")
    s = TokenSource(settings, timeout=10, clock=Clock())
    yield s
    await s.close()


async def test_concurrent_first_callers_share_one_request(source, endpoint):
    endpoint.hold = asyncio.Event()
    callers = [asyncio.create_task(source.token()) for _ in range(10)]
    await endpoint.wait_for(lambda: len(endpoint.requests) == 1)
    assert not any(c.done() for c in callers)  # nobody has a token yet: they all wait
    endpoint.hold.set()
    tokens = await asyncio.gather(*callers)
    assert {t.value for t in tokens} == set(endpoint.issued) and len(endpoint.requests) == 1


async def test_cached_until_shortly_before_expiry(source, endpoint):
    endpoint.expires_in = 3600
    first = await source.token()
    source.clock.advance(3600 - 301)  # five minutes and a second before expiry: still fresh
    assert (await source.token()).value == first.value
    assert len(endpoint.requests) == 1
    # Inside the last five minutes: the valid token is returned at once, one refresh runs behind it.
    source.clock.advance(2)
    endpoint.hold = asyncio.Event()
    for _ in range(5):
        assert (await source.token()).value == first.value
    await endpoint.wait_for(lambda: len(endpoint.requests) == 2)
    endpoint.hold.set()
    await source.settle()
    assert (await source.token()).value == endpoint.issued[1]
    assert len(endpoint.requests) == 2


async def test_a_token_about_to_expire_is_not_handed_out(source, endpoint):
    endpoint.expires_in = "3599"  # Microsoft's v1 endpoint sends the number as a string
    first = await source.token()
    source.clock.advance(3599 - 29)  # it would expire on the way to the upstream
    endpoint.hold = asyncio.Event()
    waiting = asyncio.create_task(source.token())
    await endpoint.wait_for(lambda: len(endpoint.requests) == 2)
    assert not waiting.done()
    endpoint.hold.set()
    assert (await waiting).value == endpoint.issued[1] != first.value


async def test_failure_reaches_every_waiter_once(source, endpoint):
    endpoint.failure = (500, {"error": "temporarily_unavailable"})
    endpoint.hold = asyncio.Event()
    callers = [asyncio.create_task(source.token()) for _ in range(3)]
    await endpoint.wait_for(lambda: len(endpoint.requests) == 1)
    endpoint.hold.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, TokenError) for r in results)
    assert results[0].reason == f"token endpoint {endpoint.url} answered HTTP 500: temporarily_unavailable"
    assert len(endpoint.requests) == 1
    # The next caller tries again.
    endpoint.failure = None
    assert (await source.token()).value == endpoint.issued[0]


async def test_failed_background_refresh_is_logged_and_the_valid_token_kept(source, endpoint, log_lines):
    first = await source.token()
    source.clock.advance(3400)
    endpoint.failure = (503, {"error": "temporarily_unavailable", "error_description": "try later"})
    assert (await source.token()).value == first.value
    await source.settle()
    [failed] = [e for e in log_lines() if e["event"] == "upstream.auth_failed"]
    assert failed["stage"] == "token_refresh" and failed["valid_for_s"] == 3599 - 30 - 3400
    assert failed["token_url"] == endpoint.url
    assert "HTTP 503: temporarily_unavailable: try later" in failed["reason"]
    endpoint.failure = None
    assert (await source.token()).value == first.value  # still valid; this call starts the next refresh
    await source.settle()
    assert len(endpoint.requests) == 3 and (await source.token()).value == endpoint.issued[1]
    assert SECRET not in json.dumps(log_lines())


async def test_a_caller_that_gives_up_does_not_cancel_the_refresh(source, endpoint):
    endpoint.hold = asyncio.Event()
    impatient = asyncio.create_task(source.token())
    await endpoint.wait_for(lambda: len(endpoint.requests) == 1)
    impatient.cancel()
    endpoint.hold.set()
    await source.settle()
    assert (await source.token()).value == endpoint.issued[0]
    assert len(endpoint.requests) == 1


async def test_discard_forgets_only_that_token(source, endpoint):
    first = await source.token()
    source.discard(first)
    second = await source.token()
    assert second.value == endpoint.issued[1]
    source.discard(first)  # an older token: the newer one stays
    assert (await source.token()).value == second.value
    assert "eyJ" not in repr(second)  # a token never shows in a repr


@pytest.mark.parametrize("status,body,reason", [
    (200, b"<html>hello</html>", "answered 200 without a JSON object"),
    (200, b'{"token_type": "Bearer", "expires_in": 3599}', "answered 200 without an access_token"),
    (200, b'{"access_token": "x", "token_type": "mac"}', "gave a token of type 'mac', not Bearer"),
    (200, b'{"access_token": "x", "expires_in": "soon"}', "gave expires_in 'soon', not a number"),
    (200, b'{"access_token": "x", "expires_in": 0}', "gave a token that has already expired"),
    (503, b"<html>Service Unavailable</html>", "answered HTTP 503"),
    (400, b'{"error": "invalid_scope", "error_description": "  "}', "answered HTTP 400: invalid_scope"),
])
async def test_bad_answers(source, endpoint, status, body, reason):
    endpoint.raw = (status, body)
    with pytest.raises(TokenError) as info:
        await source.token()
    assert info.value.reason == f"token endpoint {endpoint.url} {reason}"


async def test_token_without_expires_in_is_kept_briefly(source, endpoint):
    endpoint.raw = (200, b'{"access_token": "short-lived", "token_type": "bearer"}')
    assert (await source.token()).value == "short-lived"
    source.clock.advance(200)  # RFC 6749 5.1 makes expires_in optional: assume five minutes
    endpoint.raw = None
    assert (await source.token()).value == "short-lived"
    await source.settle()
    assert (await source.token()).value == endpoint.issued[0]


async def test_unreadable_secret_and_unreachable_endpoint(source, endpoint):
    Path(source.settings.client_secret_file).unlink()
    with pytest.raises(TokenError) as info:
        await source.token()
    assert info.value.reason == f"cannot read {source.settings.client_secret_file}: No such file or directory"
    assert endpoint.requests == []
    Path(source.settings.client_secret_file).write_text(SECRET)
    await endpoint.stop()
    with pytest.raises(TokenError) as info:
        await source.token()
    assert info.value.reason.startswith(f"token endpoint {endpoint.url} not reachable: ClientConnectorError")


async def test_close_while_a_refresh_is_in_flight(source, endpoint):
    """A reload closes the old pool: a session waiting for its token gets a TokenError, not a cancellation."""
    endpoint.hold = asyncio.Event()
    waiting = asyncio.create_task(source.token())
    await endpoint.wait_for(lambda: len(endpoint.requests) == 1)
    await source.close()
    with pytest.raises(TokenError, match="being closed"):
        await waiting
    with pytest.raises(TokenError, match="being closed"):
        await source.token()
    endpoint.hold.set()


async def test_a_closed_source_says_why_it_has_no_token(source, endpoint):
    await source.token()
    await source.close()
    with pytest.raises(TokenError) as info:
        await source.token()
    assert info.value.reason == "no token: the upstream connections are being closed (reload or stop)"
    assert len(endpoint.requests) == 1


async def test_a_token_endpoint_that_never_answers_fails_within_the_timeout(tmp_path, endpoint):
    endpoint.hold = asyncio.Event()  # the request arrives; the answer never comes
    secret_file = tmp_path / "oauth.secret"
    secret_file.write_text(SECRET)
    settings = OAuth2(token_url=endpoint.url, client_id=CLIENT_ID, client_secret_file=secret_file,
                      scope="https://outlook.office365.com/.default")
    source = TokenSource(settings, timeout=0.2, clock=Clock())
    try:
        # Far beyond the 0.2 s it is given: only a source that ignores its timeout gets here.
        async with asyncio.timeout(10):
            with pytest.raises(TokenError) as info:
                await source.token()
        assert info.value.reason.startswith(f"token endpoint {endpoint.url} not reachable: TimeoutError")
        assert len(endpoint.requests) == 1
    finally:
        await source.close()
        endpoint.hold.set()


async def test_a_finished_fetch_leaves_the_event_loop_nothing_to_report(source, endpoint, caplog):
    """Neither a first fetch that fails (no token to fall back on) nor one that succeeds
    makes the refresh's completion raise, which asyncio would log as an error."""
    endpoint.failure = (500, {"error": "temporarily_unavailable"})
    with pytest.raises(TokenError):
        await source.token()
    endpoint.failure = None
    assert (await source.token()).value == endpoint.issued[0]
    await source.settle()
    assert [record.getMessage() for record in caplog.records if record.name == "asyncio"] == []


async def test_redirects_are_not_followed(source, endpoint):
    """A 307 would take the client secret along to wherever it points."""
    source.settings = source.settings.model_copy(update={"token_url": endpoint.url.replace(
        "/tenant-id/oauth2/v2.0/token", "/moved")})
    with pytest.raises(TokenError) as info:
        await source.token()
    assert info.value.reason == f"token endpoint {source.settings.token_url} answered HTTP 307"
    assert len(endpoint.requests) == 1 and endpoint.issued == []
