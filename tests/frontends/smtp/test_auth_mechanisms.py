"""AUTH PLAIN and LOGIN as smtpgate's own mechanism hooks speak them (smtpgate.frontends.smtp.auth)."""

from __future__ import annotations

import base64

import pytest

from tests.support.sink import client_tls_context
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_relay import wait_until
from tests.frontends.smtp.test_tls_auth import config_with_listener


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
async def tls_session(tmp_path, sink, start_gate, log_lines):
    """A function opening a session that has done STARTTLS and EHLO, on a listener with AUTH."""
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "optional", "[]"))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))

    async def open_session() -> Wire:
        wire, _ = await Wire.open(port)
        await wire.cmd("EHLO client.test")
        assert code(await wire.cmd("STARTTLS")) == 220
        await wire.writer.start_tls(tls, server_hostname="localhost")
        assert "AUTH LOGIN PLAIN" in await wire.cmd("EHLO client.test")
        return wire

    return open_session


async def authenticated(wire: Wire) -> bool:
    """Whether MAIL is now accepted from a client outside relay_networks."""
    return code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250


@pytest.mark.parametrize("exchange", [
    [f"AUTH PLAIN {b64(chr(0) + 'jane' + chr(0) + 's3cret pass')}"],
    ["AUTH PLAIN", b64("\0jane\0s3cret pass")],
    [f"AUTH LOGIN {b64('jane')}", b64("s3cret pass")],
    ["AUTH LOGIN", b64("jane"), b64("s3cret pass")],
], ids=["plain", "plain-challenge", "login-initial", "login"])
async def test_good_credentials_in_every_form(tls_session, log_lines, exchange):
    wire = await tls_session()
    for line in exchange[:-1]:
        assert code(await wire.cmd(line)) == 334
    assert (await wire.cmd(exchange[-1])).startswith("235 2.7.0")
    assert await authenticated(wire)
    [result] = [e for e in log_lines() if e["event"] == "auth.result"]
    assert result["user"] == "jane" and result["success"] is True
    assert "s3cret" not in str(log_lines())


@pytest.mark.parametrize("exchange,reply", [
    ([f"AUTH PLAIN {b64(chr(0) + 'jane' + chr(0) + 'wrong')}"], "535 5.7.8"),
    ([f"AUTH PLAIN {b64(chr(0) + 'nobody' + chr(0) + 'x')}"], "535 5.7.8"),
    (["AUTH PLAIN not-base64!"], "501 5.5.2"),
    ([f"AUTH PLAIN {b64('jane' + chr(0) + 'pw')}"], "501 5.5.2"),
    (["AUTH PLAIN", "*"], "501 5.7.0"),
    (["AUTH LOGIN", "*"], "501 5.7.0"),
    (["AUTH LOGIN !!!"], "501 5.5.2"),
    ([f"AUTH LOGIN {b64('jane')}", "*"], "501 5.7.0"),
    (["AUTH LOGIN", b64("jane"), b64("wrong")], "535 5.7.8"),
], ids=["wrong-password", "unknown-user", "bad-base64", "no-authzid-split", "plain-abort",
        "login-abort", "login-bad-base64", "login-abort-password", "login-wrong"])
async def test_refused_credentials_leave_the_session_unauthenticated(tls_session, exchange, reply):
    wire = await tls_session()
    for line in exchange[:-1]:
        assert code(await wire.cmd(line)) == 334
    assert (await wire.cmd(exchange[-1])).startswith(reply)
    assert not await authenticated(wire)


@pytest.mark.parametrize("exchange,mechanism,user,reason", [
    (["AUTH LOGIN", base64.b64encode(b"j\xffane").decode(), "*"], "LOGIN", "j\ufffdane",
     "the client ended the exchange"),
    (["AUTH PLAIN !!!"], "PLAIN", None, "initial response is not base64"),
    (["AUTH PLAIN", "*"], "PLAIN", None, "the client ended the exchange"),
    (["AUTH LOGIN", "*"], "LOGIN", None, "the client ended the exchange"),
    (["AUTH LOGIN !!!"], "LOGIN", None, "initial response is not base64"),
], ids=["login-not-utf8-then-abort", "plain-bad-base64", "plain-abort", "login-abort-username",
        "login-bad-base64"])
async def test_an_abandoned_exchange_is_logged_on_the_session(tls_session, log_lines, exchange, mechanism, user,
                                                              reason):
    wire = await tls_session()
    for line in exchange[:-1]:
        assert code(await wire.cmd(line)) == 334
    assert code(await wire.cmd(exchange[-1])) == 501
    [result] = [e for e in log_lines() if e["event"] == "auth.result"]
    assert {k: result.get(k) for k in ("user", "success", "mechanism", "reason", "level")} == {
        "user": user, "success": False, "mechanism": mechanism, "reason": reason, "level": "warning"}
    assert result["session"] and result["listener"]  # the session's own logger


async def test_plain_without_initial_response_gets_an_empty_challenge(tls_session):
    """RFC 4954 4: the server's challenge for PLAIN is empty, "334 " with its space and nothing more."""
    wire = await tls_session()
    assert await wire.cmd("AUTH PLAIN") == "334 "
    assert (await wire.cmd(b64("\0jane\0s3cret pass"))).startswith("235 2.7.0")


@pytest.mark.parametrize("exchange,mechanism,user", [
    (["AUTH PLAIN"], "PLAIN", None),
    (["AUTH LOGIN"], "LOGIN", None),
    (["AUTH LOGIN", b64("jane")], "LOGIN", "jane"),
], ids=["plain-challenge", "login-username", "login-password"])
async def test_a_client_gone_mid_exchange_is_logged_on_the_session(tls_session, log_lines, exchange, mechanism, user):
    wire = await tls_session()
    for line in exchange:
        assert code(await wire.cmd(line)) == 334
    await wire.close()  # gone while smtpgate waits for its answer
    await wait_until(lambda: any(e["event"] == "auth.result" for e in log_lines()), timeout=5)
    [result] = [e for e in log_lines() if e["event"] == "auth.result"]
    assert {k: result.get(k) for k in ("user", "success", "mechanism", "reason", "level")} == {
        "user": user, "success": False, "mechanism": mechanism, "reason": "connection lost during the exchange",
        "level": "warning"}
    assert result["session"] and result["listener"]  # the session's own logger
