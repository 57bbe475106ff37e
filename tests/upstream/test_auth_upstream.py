"""auth_backend: upstream: a client's AUTH is its own login at the upstream, which carries its mail.

The upstream is a sink that requires AUTH over STARTTLS and knows one user.
"""

from __future__ import annotations

import base64

import aiosmtplib
import pytest
from aiosmtpd.smtp import AuthResult

from smtpgate.config import ConfigError, load_config
from smtpgate.frontends.smtp.auth import upstream_authenticator
from smtpgate.upstream.client import UpstreamPool
from tests.conftest import write_config
from tests.support.sink import Sink, client_tls_context, make_test_cert, make_test_tls
from tests.support.smtp import send
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_relay import wait_until

JANE = ("jane@corp.example", "jane's own password")


def message(n: int) -> bytes:
    return f"From: jane@corp.example\r\nTo: b@x.example\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()


def config_text(tmp_path, up_port: int, up_ca: str, scheme: str = "smtp+starttls") -> str:
    cert, key = make_test_cert(tmp_path / "tls")
    return f"""\
listeners:
  - name: submission
    address: 127.0.0.1:0
    tls: starttls
    tls_cert: {cert}
    tls_key: {key}
    auth: required
auth_backend: upstream
upstream:
  url: {scheme}://localhost:{up_port}
  ca_file: {up_ca}
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


@pytest.fixture
async def upstream(tmp_path):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context, auth=dict([JANE]), require_auth=True) as up:
        up.cafile = cafile
        yield up


async def test_good_password_logs_in_upstream_and_carries_the_messages(tmp_path, upstream, start_gate, log_lines):
    gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, upstream.port, upstream.cafile))))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=tls)
    await client.connect()
    await client.starttls()
    assert (await client.login(*JANE)).code == 235
    logins_after_auth = [c for c in upstream.commands if c.startswith("AUTH")]
    assert len(logins_after_auth) == 1  # the AUTH was checked by the upstream itself
    for n in range(2):
        errors, reply = await client.sendmail("jane@corp.example", ["b@x.example"], message(n))
        assert not errors and reply.startswith("2")
    await client.quit()
    [first, second] = await upstream.wait_for_messages(2)
    # Both messages went over jane's own upstream login, on the one connection that login opened.
    assert first.auth_login == second.auth_login == "jane@corp.example"
    assert first.tls and first.peer == second.peer
    assert [c for c in upstream.commands if c.startswith("AUTH")] == logins_after_auth
    # Each transaction first checks the kept connection with NOOP before MAIL reuses it.
    assert [c.split()[0] for c in upstream.commands if c.split()[0] in ("NOOP", "MAIL")] == ["NOOP", "MAIL"] * 2
    text = str(log_lines()) + "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                                      and p.suffix not in (".db",))
    assert JANE[1] not in text
    assert JANE[1].encode() not in (tmp_path / "smtpgate.db").read_bytes()
    [result] = [e for e in log_lines() if e["event"] == "auth.result"]
    assert result["success"] is True and result["backend"] == "upstream" and result["user"] == JANE[0]


async def test_bad_password_refused_and_nothing_relayed(tmp_path, upstream, start_gate, log_lines):
    gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, upstream.port, upstream.cafile))))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
        await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"], data=message(0),
                   starttls=True, tls_context=tls, login=(JANE[0], "guess"))
    assert info.value.code == 535
    unknown = await send_after_failed_login(port, tls)
    assert code(unknown) == 530  # still not authenticated: MAIL refused
    assert upstream.messages == [] and upstream.received == []
    assert "guess" not in str(log_lines())
    results = [e for e in log_lines() if e["event"] == "auth.result"]
    assert results and all(e["success"] is False for e in results)
    assert "535" in results[0]["reason"]
    assert results[0]["user"] == JANE[0] and results[0]["backend"] == "upstream" and results[0]["mechanism"]
    assert results[0]["session"]  # the session's own logger


async def test_an_upstream_without_auth_refuses_every_login_and_says_why(tmp_path, start_gate, log_lines):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context) as up:  # STARTTLS, no AUTH offered
        gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, up.port, cafile))))
        tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as info:
            await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"], data=message(0),
                       starttls=True, tls_context=tls, login=JANE)
        assert info.value.code == 535
        assert up.messages == []
    results = [e for e in log_lines() if e["event"] == "auth.result"]  # one per mechanism the client tried
    assert results and all(not e["success"] and "temporary" not in e for e in results)
    assert {e["reason"] for e in results} == {
        f"smtp+starttls://localhost:{up.port} does not offer AUTH (auth_backend is upstream)"}


async def send_after_failed_login(port: int, tls) -> str:
    wire, _ = await Wire.open(port)
    await wire.cmd("EHLO client.test")
    await wire.cmd("STARTTLS")
    await wire.writer.start_tls(tls, server_hostname="localhost")
    await wire.cmd("EHLO client.test")
    reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.close()
    return reply


async def test_unreachable_upstream_is_a_temporary_auth_failure(tmp_path, start_gate, log_lines):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context, auth=dict([JANE]), require_auth=True) as up:
        port_of_dead_upstream = up.port
    gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, port_of_dead_upstream, cafile))))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    wire, _ = await Wire.open(port)
    await wire.cmd("EHLO client.test")
    await wire.cmd("STARTTLS")
    await wire.writer.start_tls(tls, server_hostname="localhost")
    await wire.cmd("EHLO client.test")
    reply = await wire.cmd("AUTH PLAIN " + base64.b64encode(f"\0{JANE[0]}\0{JANE[1]}".encode()).decode())
    assert reply.startswith("454 4.7.0")
    await wire.close()
    assert not any(e["event"] == "auth.delayed" for e in log_lines())  # not a guess: no slow-down


def test_upstream_backend_needs_tls_to_the_upstream(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, config_text(tmp_path, 2525, "ca.pem", scheme="smtp")
                                 .replace("  ca_file: ca.pem\n", "")))
    [problem] = info.value.problems
    assert problem.startswith("smtpgate.yaml:8: auth_backend: upstream sends each client's "
                              "password to the upstream, so upstream.url must be smtps:// or smtp+starttls://")


async def test_dropped_user_connection_logs_in_again_for_the_next_message(tmp_path, upstream, start_gate, log_lines):
    gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, upstream.port, upstream.cafile))))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=tls)
    await client.connect()
    await client.starttls()
    await client.login(*JANE)
    upstream.drop_after_data = True  # the upstream hangs up on the first message's dot
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await client.sendmail("jane@corp.example", ["b@x.example"], message(0))
    assert info.value.code == 451
    upstream.drop_after_data = False
    errors, reply = await client.sendmail("jane@corp.example", ["b@x.example"], message(1))
    assert not errors and reply.startswith("2")
    await client.quit()
    [delivered] = await upstream.wait_for_messages(1)
    # A new connection, logged in again with the credentials the session holds.
    assert delivered.auth_login == "jane@corp.example"
    assert len([c for c in upstream.commands if c.startswith("AUTH")]) == 2
    assert JANE[1] not in str(log_lines())


async def test_a_client_gone_in_a_transaction_closes_its_upstream_login(tmp_path, upstream, start_gate, log_lines):
    """The session's end closes the client's upstream login; the transaction's connection,
    given back after its RSET (answered 250), is closed too, not kept for a session that is gone."""
    gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, upstream.port, upstream.cafile))))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, tls_context=tls)
    await client.connect()
    await client.starttls()
    await client.login(*JANE)
    assert (await client.mail("jane@corp.example")).code == 250
    assert (await client.rcpt("b@x.example")).code == 250
    client.close()  # gone without QUIT, the transaction open
    # The login's connection: RSET (the abort), then QUIT (closed); nothing after it.
    await wait_until(lambda: upstream.commands[-2:] == ["RSET", "QUIT"], timeout=5)
    assert upstream.commands[-5:] == ["NOOP", "MAIL FROM:<jane@corp.example>", "RCPT TO:<b@x.example>", "RSET", "QUIT"]


async def test_a_login_and_password_that_are_not_utf8_reach_the_upstream_with_replacement_characters(
        tmp_path, start_gate, log_lines):
    """Each byte that is not UTF-8 goes upstream as U+FFFD: the upstream decides on that login."""
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context, auth={"j\ufffdne@corp.example": "caf\ufffd \ufffd"},
                    require_auth=True) as up:
        gate, port = await start_gate(load_config(write_config(tmp_path, config_text(tmp_path, up.port, cafile))))
        tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
        wire, _ = await Wire.open(port)
        await wire.cmd("EHLO client.test")
        await wire.cmd("STARTTLS")
        await wire.writer.start_tls(tls, server_hostname="localhost")
        await wire.cmd("EHLO client.test")
        plain = base64.b64encode(b"\0j\xe9ne@corp.example\0caf\xe9 \xff").decode()  # Latin-1, not UTF-8
        assert code(await wire.cmd("AUTH PLAIN " + plain)) == 235
        assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
        assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
        assert code(await wire.cmd("DATA")) == 354
        assert code(await wire.cmd(message(0).decode() + ".")) == 250
        await wire.cmd("QUIT")
        await wire.close()
        [delivered] = await up.wait_for_messages(1)
    assert delivered.auth_login == "j\ufffdne@corp.example"
    [result] = [e for e in log_lines() if e["event"] == "auth.result"]
    assert (result["success"], result["user"]) == (True, "j\ufffdne@corp.example")


async def test_credentials_other_than_a_login_and_password_are_refused_without_asking_the_upstream(
        tmp_path, upstream):
    config = load_config(write_config(tmp_path, config_text(tmp_path, upstream.port, upstream.cafile)))
    pool = UpstreamPool(config.upstream, local_hostname="gate.test")
    authenticate = upstream_authenticator(pool)
    result = await authenticate(None, None, None, "XOAUTH2", b"user=jane\x01auth=Bearer token\x01\x01")
    assert result == AuthResult(success=False, handled=False)  # unhandled: answered as a wrong password
    await pool.close()
    assert upstream.commands == []
