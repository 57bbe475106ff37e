"""Mail clients people use, against both TLS listener kinds with AUTH required.

Each of swaks, msmtp, curl, Python's smtplib and Postfix (as a relay client) sends
through a STARTTLS listener and an implicit-TLS listener (RFC 8314's port 465 shape)
with AUTH PLAIN and with AUTH LOGIN: every message links Team A's activity to Team B's
mailbox and is compared with what the upstream received (envelope and Cc tagged, the
rest of the header block and the body unchanged). A wrong password on each listener
must show the client `535 5.7.8`. The upstream enforces the declared SIZE, as a strict
one may. The clients of one kind run concurrently, so the matrix stays fast.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.support.ci import needs
from tests.support.clients import CLIENTS, Attempt, PostfixClient, missing_program, submit
from tests.support.sink import Received, Sink
from tests.support.submission import PASSWORD, USER, strict_sink, submission  # noqa: F401 - fixtures
from tests.support.wire import strip_trace

_references = itertools.count(71001)


def linking_message(client: str, name: str, reference: str) -> bytes:
    return (
        f"From: Jane Doe <uk-payroll+{reference}@corp.example>\r\n"
        "To: Client <client@supplier.example>\r\n"
        "Cc: \"Team B (Poland)\" <pl-payroll@corp.example>\r\n"
        f"Subject: {client} over {name}\r\n"
        "Date: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
        f"Message-ID: <{reference}.{client}@corp.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"Sent by {client}.\r\n"
        ".. a line that starts with a dot\r\n"
        "\r\n"
        "Regards\r\n"
    ).encode("ascii")


def attempts_for(client: str) -> list[Attempt]:
    """Both listener kinds with both mechanisms, and a wrong password on each kind."""
    out = []
    for security, mechanism, password in [
        ("starttls", "PLAIN", PASSWORD), ("starttls", "LOGIN", PASSWORD),
        ("implicit", "PLAIN", PASSWORD), ("implicit", "LOGIN", PASSWORD),
        ("starttls", "LOGIN", "wrong"), ("implicit", "PLAIN", "wrong"),
    ]:
        reference = f"{next(_references)}-T"
        sender = f"uk-payroll+{reference}@corp.example"
        name = f"{security}-{mechanism.lower()}"
        out.append(Attempt(security, mechanism, USER, password, sender,
                           ("client@supplier.example", "pl-payroll@corp.example"),
                           linking_message(client, name, reference)))
    return out


def check_linked(got: Received, attempt: Attempt) -> None:
    """The upstream got the message with Team B's mailbox tagged in the envelope and in Cc,
    and every other byte of it as the client sent it (after the trace fields)."""
    [tagged] = [r for r in got.rcpt_tos if r.startswith("pl-payroll+")]
    assert tagged.endswith("-T@corp.example") and tagged != "pl-payroll+-T@corp.example"
    assert sorted(got.rcpt_tos) == sorted(["client@supplier.example", tagged])
    _, rest = strip_trace(got.data)
    expected = attempt.message.replace(b"<pl-payroll@corp.example>", f"<{tagged}>".encode())
    assert rest == expected, (attempt.name, rest)
    assert got.data.split(b"\r\n\r\n", 1)[1] == attempt.message.split(b"\r\n\r\n", 1)[1]
    assert b"with ESMTPSA id" in got.data.split(b"\r\n\r\n")[0]


def check_outcomes(sink: Sink, attempts: list[Attempt], sent: dict[str, Received], log: list[dict]) -> None:
    # Each listener kind saw each mechanism succeed, and only the wrong passwords fail.
    results = [(e["listener"], e["mechanism"], e["success"]) for e in log if e["event"] == "auth.result"]
    kinds = {"starttls": "submission", "implicit": "smtps"}
    expected = [(kinds[a.security], a.mechanism, a.password == PASSWORD) for a in attempts]
    assert sorted(set(results)) == sorted(set(expected))
    for attempt in attempts:
        if attempt.password == PASSWORD:
            check_linked(sent[attempt.mail_from], attempt)
        else:
            assert attempt.mail_from not in sent
    assert len(sink.messages) == sum(a.password == PASSWORD for a in attempts)


@pytest.mark.parametrize("client", CLIENTS)
async def test_client_sends_through_both_tls_listener_kinds(client, submission, strict_sink, tmp_path, log_lines):
    why = missing_program(client)
    if why:
        needs(client, why)
    attempts = attempts_for(client)
    outcomes = await asyncio.gather(*(submit(client, submission, a, tmp_path / f"{client}-{i}")
                                      for i, a in enumerate(attempts)))
    for attempt, outcome in zip(attempts, outcomes):
        if attempt.password == PASSWORD:
            assert outcome.sent, f"{client} {attempt.name}:\n{outcome.transcript}"
        else:
            assert not outcome.sent, f"{client} {attempt.name} sent with a wrong password"
            assert "535 5.7.8" in outcome.transcript, f"{client} {attempt.name}:\n{outcome.transcript}"
    check_outcomes(strict_sink, attempts, {m.mail_from: m for m in strict_sink.messages}, log_lines())


@pytest.mark.postfix
async def test_postfix_relays_through_both_tls_listener_kinds(submission, strict_sink, tmp_path, log_lines):
    """Postfix as the client, smtpgate its relayhost: smtp_sasl_auth_enable over STARTTLS and
    with smtp_tls_wrappermode (465), PLAIN and LOGIN; a wrong password is a deferral that
    names smtpgate's 535 5.7.8 (smtp_sasl_auth_soft_bounce), never a bounce."""
    attempts = attempts_for("postfix")
    postfix = PostfixClient(tmp_path / "postfix", submission, attempts)
    await asyncio.to_thread(postfix.start)
    try:
        await asyncio.gather(*(asyncio.to_thread(postfix.inject, a) for a in attempts))
        good = sum(a.password == PASSWORD for a in attempts)
        await strict_sink.wait_for(lambda: len(strict_sink.messages) >= good, timeout=30,
                                   what=f"{good} messages from Postfix")
        log = await postfix.wait_for_log("said: 535 5.7.8")
        assert "status=deferred (SASL authentication failed" in log and "status=bounced" not in log
    finally:
        await asyncio.to_thread(postfix.stop)
    check_outcomes(strict_sink, attempts, {m.mail_from: m for m in strict_sink.messages}, log_lines())
