"""Submission listeners as clients meet them: implicit TLS with AUTH (RFC 8314), the LOGIN
challenges clients expect, every refused command in the log with its code, and a SIZE
that covers what smtpgate adds."""

from __future__ import annotations

import asyncio
import base64

import pytest

from tests.frontends.smtp.test_abuse_limits import until
from tests.support.submission import PASSWORD, USER, Submission, strict_sink, submission  # noqa: F401 - fixtures
from tests.support.wire import Wire, code

MESSAGE = (b"From: jane@corp.example\r\nTo: b@x.example\r\nSubject: submission\r\n"
           b"Message-ID: <submission@corp.example>\r\n\r\nbody\r\n")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def plain(user: str = USER, password: str = PASSWORD) -> str:
    return f"AUTH PLAIN {b64(chr(0) + user + chr(0) + password)}"


async def open_implicit(submission: Submission) -> tuple[Wire, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", submission.implicit_port, ssl=submission.client_context(), server_hostname="localhost"), 10)
    wire = Wire(reader, writer)
    return wire, await wire.reply()


async def open_starttls(submission: Submission) -> Wire:
    wire, _ = await Wire.open(submission.starttls_port)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd("STARTTLS")) == 220
    await wire.writer.start_tls(submission.client_context(), server_hostname="localhost")
    return wire


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


async def send_message(wire: Wire, message: bytes = MESSAGE, size: int | None = None) -> str:
    mail = "MAIL FROM:<jane@corp.example>" + (f" SIZE={size}" if size is not None else "")
    assert code(await wire.cmd(mail)) == 250
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    return await wire.cmd(message.decode() + ".")


async def test_implicit_tls_session_is_encrypted_from_its_first_byte(submission, strict_sink, log_lines):
    wire, greeting = await open_implicit(submission)
    assert greeting.startswith("220 ")
    ehlo = await wire.cmd("EHLO client.test")
    # RFC 8314 3: AUTH is offered at once; STARTTLS is not (the session is already TLS).
    assert "250-AUTH LOGIN PLAIN" in ehlo and "STARTTLS" not in ehlo
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 530
    assert (await wire.cmd(plain())).startswith("235 2.7.0 ")
    assert (await send_message(wire)).startswith("250 ")
    [got] = strict_sink.messages
    # The trace names the session as encrypted and authenticated (RFC 3848).
    assert b"with ESMTPSA id" in got.data.split(b"\r\n\r\n")[0]
    [refused] = events(log_lines, "message.rejected")
    assert (refused["code"], refused["stage"]) == (530, "mail")
    [result] = events(log_lines, "auth.result")
    assert (result["user"], result["success"]) == (USER, True)


async def test_implicit_tls_answers_login_and_a_wrong_password(submission, log_lines):
    wire, _ = await open_implicit(submission)
    await wire.cmd("EHLO client.test")
    assert (await wire.cmd("AUTH LOGIN")).startswith("334 ")
    assert code(await wire.cmd(b64(USER))) == 334
    assert (await wire.cmd(b64("wrong"))).startswith("535 5.7.8 ")
    assert [e["code"] for e in events(log_lines, "command.refused")] == [535]
    assert (await wire.cmd("STARTTLS")).startswith("503 5.5.1 ")  # not offered, not served


async def test_login_challenges_are_the_ones_clients_expect(submission):
    """Dovecot, Cyrus SASL and Exchange challenge with "Username:" and "Password:"."""
    wire = await open_starttls(submission)
    await wire.cmd("EHLO client.test")
    first = await wire.cmd("AUTH LOGIN")
    assert base64.b64decode(first[4:]) == b"Username:"
    second = await wire.cmd(b64(USER))
    assert base64.b64decode(second[4:]) == b"Password:"
    assert (await wire.cmd(b64(PASSWORD))).startswith("235 ")
    # With the user name as initial response only the password is asked for.
    wire = await open_starttls(submission)
    await wire.cmd("EHLO client.test")
    assert base64.b64decode((await wire.cmd(f"AUTH LOGIN {b64(USER)}"))[4:]) == b"Password:"


async def test_every_refused_command_is_logged_with_its_code(submission, log_lines):
    wire, _ = await Wire.open(submission.starttls_port)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd(plain())) == 538  # no AUTH before TLS (RFC 4954 4)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 530
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 530
    assert code(await wire.cmd("XYZZY")) == 500
    await wire.close()
    wire = await open_starttls(submission)
    await wire.cmd("EHLO client.test")
    # The exchange abandoned half-way (neomutt gave up on the first challenge like this).
    assert code(await wire.cmd("AUTH LOGIN")) == 334
    assert (await wire.cmd("AUTH LOGIN")).startswith("501 5.5.2 ")
    assert code(await wire.cmd("AUTH PLAIN")) == 334
    assert (await wire.cmd("*")).startswith("501 5.7.0 ")
    assert code(await wire.cmd(plain(password="wrong"))) == 535
    refused = [(e["code"], e["stage"]) for e in events(log_lines, "command.refused")]
    assert refused == [(538, "auth"), (530, "rcpt"), (500, "unknown"), (501, "auth"), (501, "auth"), (535, "auth")]
    # MAIL's 530 is the message's refusal, as for a client outside relay_networks.
    [mail] = events(log_lines, "message.rejected")
    assert (mail["code"], mail["stage"], mail["reason"]) == (530, "mail", "not authenticated, auth: required")
    results = [(e["mechanism"], e["success"], e.get("reason")) for e in events(log_lines, "auth.result")]
    assert results == [("LOGIN", False, "the client ended the exchange"),
                       ("PLAIN", False, "the client ended the exchange"), ("PLAIN", False, None)]


async def test_a_login_cut_off_half_way_is_an_auth_result(submission, log_lines):
    wire = await open_starttls(submission)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd(f"AUTH LOGIN {b64(USER)}")) == 334
    await wire.close()
    await until(lambda: events(log_lines, "session.closed"))
    [result] = events(log_lines, "auth.result")
    assert (result["user"], result["success"], result["reason"]) == (
        USER, False, "connection lost during the exchange")


@pytest.mark.parametrize("security", ["starttls", "implicit"])
async def test_a_strict_upstream_takes_what_the_client_declared_with_size(submission, strict_sink, security):
    """The client declares its message's exact size; smtpgate adds a Received field, so the
    SIZE it declares upstream must leave room for it."""
    if security == "implicit":
        wire, _ = await open_implicit(submission)
    else:
        wire = await open_starttls(submission)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd(plain())) == 235
    assert (await send_message(wire, size=len(MESSAGE))).startswith("250 ")
    [got] = strict_sink.messages
    assert len(got.data) > len(MESSAGE)
