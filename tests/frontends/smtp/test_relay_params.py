"""What the client says and what reaches the upstream: extensions, parameters, limits, odd commands.

Each test talks SMTP over loopback to a real smtpgate relaying to a sink the test
controls (tests/support/sink.py), and looks at both ends: the client's replies
and the commands and envelope the upstream received.
"""

from __future__ import annotations

import pytest

from smtpgate.mail.params import SIZE_MARGIN
from tests.support.sink import Sink
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_relay import MESSAGE, ehlo_keywords, send_data, session


def upstream_saw(sink: Sink, verb: str) -> list[str]:
    """The commands with this verb that reached the upstream, in order."""
    return [c for c in sink.commands if c.split(" ", 1)[0] == verb]


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


# ---------------------------------------------------------------- SMTPUTF8 (RFC 6531)


async def test_smtputf8_addresses_relayed_to_an_upstream_that_has_it(relay, sink):
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jöe@corp.example> SMTPUTF8")) == 250
    assert code(await wire.cmd("RCPT TO:<zoë@supplier.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<info@bücher.example>")) == 250
    message = "From: Jöe <jöe@corp.example>\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
    assert code(await send_data(wire, message)) == 250
    [got] = sink.messages
    assert got.mail_from == "jöe@corp.example" and "SMTPUTF8" in got.mail_options
    assert got.rcpt_tos == ["zoë@supplier.example", "info@bücher.example"]
    assert got.data.endswith(message)
    await wire.cmd("QUIT")


async def test_non_ascii_address_without_smtputf8_is_a_syntax_error(relay, sink):
    gate, port = relay
    wire = await session(port)
    assert (await wire.cmd("MAIL FROM:<jöe@corp.example>")).startswith("501 5.1.7 ")
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert (await wire.cmd("RCPT TO:<zoë@supplier.example>")).startswith("501 5.1.3 ")
    assert not any(not c.isascii() for c in sink.commands), sink.commands
    await wire.cmd("QUIT")


async def test_smtputf8_refused_when_the_upstream_lacks_it(config_for, start_gate, log_lines):
    async with Sink(smtputf8=False) as plain:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{plain.port}"))
        wire = await session(port)
        # RFC 6531 3.7.5: an address the next hop cannot take is refused with 553 5.6.7.
        assert (await wire.cmd("MAIL FROM:<jöe@corp.example> SMTPUTF8")).startswith("553 5.6.7 ")
        assert upstream_saw(plain, "MAIL") == []
        # An ASCII sender goes on; the parameter is dropped for this upstream (README).
        assert code(await wire.cmd("MAIL FROM:<jane@corp.example> SMTPUTF8")) == 250
        assert (await wire.cmd("RCPT TO:<zoë@supplier.example>")).startswith("553 5.6.7 ")
        assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
        assert code(await send_data(wire, MESSAGE)) == 250
        [got] = plain.messages
        assert got.mail_options == [] and got.rcpt_tos == ["b@x.example"]
        assert all(c.isascii() for c in plain.commands), plain.commands
        refused = [e["code"] for e in events(log_lines, "command.refused")]
        assert refused == [553, 553]
        await wire.cmd("QUIT")


async def test_the_connection_a_non_ascii_sender_was_refused_on_carries_the_next_mail(config_for, start_gate):
    """The refusal is smtpgate's, before anything went upstream: the connection goes back to the pool."""
    async with Sink(smtputf8=False) as plain:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{plain.port}"))
        wire = await session(port)
        assert (await wire.cmd("MAIL FROM:<jöe@corp.example> SMTPUTF8")).startswith("553 5.6.7 ")
        assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
        assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
        assert code(await send_data(wire, MESSAGE)) == 250
        assert plain.connections == 1 and upstream_saw(plain, "MAIL") == ["MAIL FROM:<jane@corp.example>"]
        await wire.cmd("QUIT")


@pytest.mark.parametrize("smtputf8,eightbitmime", [(False, True), (True, False), (False, False)])
async def test_ehlo_hides_what_the_upstream_lacks(config_for, start_gate, log_lines, smtputf8, eightbitmime):
    """smtpgate offers SMTPUTF8 and 8BITMIME only when the upstream it relays to has them."""
    async with Sink(smtputf8=smtputf8, eightbitmime=eightbitmime) as upstream:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{upstream.port}"))
        wire, _ = await Wire.open(port)
        keywords = ehlo_keywords(await wire.cmd("EHLO client.test"))
        assert ("SMTPUTF8" in keywords) is smtputf8
        assert ("8BITMIME" in keywords) is eightbitmime
        assert "PIPELINING" in keywords  # the rest is still offered
        await wire.cmd("QUIT")


# ---------------------------------------------------------------- limits


async def test_max_recipients_answers_452_and_relays_the_rest(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_recipients: 2\n"))
    sink.rcpt_replies["gone@x.example"] = "550 5.1.1 gone"
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<a@x.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<gone@x.example>")) == 550  # refused ones do not count
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    # RFC 5321 4.5.3.1.10: too many recipients is temporary; the client sends the rest later.
    assert (await wire.cmd("RCPT TO:<c@x.example>")).startswith("452 4.5.3 ")
    assert code(await send_data(wire, MESSAGE)) == 250
    assert sink.messages[0].rcpt_tos == ["a@x.example", "b@x.example"]
    assert not any("<c@x.example>" in c for c in sink.commands)
    # The upstream's refusal is logged as the upstream's; the 452 is smtpgate's own.
    assert [(e["code"], e["reason"].startswith("upstream: ")) for e in events(log_lines, "command.refused")] == [
        (550, True), (452, False)]
    await wire.cmd("QUIT")


async def test_a_line_over_1000_octets_in_data_is_refused_and_the_session_goes_on(relay, sink, log_lines):
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\nend\r\n.\r\n")
    assert await wire.reply() == "500 5.5.2 Line too long"  # RFC 5321 4.5.3.1.6
    [rejected] = events(log_lines, "message.rejected")
    assert rejected["code"] == 500 and rejected["reason"] == "line over 1000 octets"
    # DATA went upstream with the client's; the refusal closes that connection, no dot sent.
    await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream transaction given up")
    assert sink.received == []
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")


async def test_a_command_line_too_long_is_refused(relay, sink):
    gate, port = relay
    wire = await session(port)
    reply = await wire.cmd("MAIL FROM:<" + "a" * 1100 + "@corp.example>")
    assert reply == "500 5.5.6 Command line too long"
    assert upstream_saw(sink, "MAIL") == []
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    await wire.cmd("QUIT")


# ---------------------------------------------------------------- Message-ID


async def test_message_id_is_logged_and_recorded_as_its_id_only(relay, sink, log_lines):
    """A later In-Reply-To names the bare <id>: that is what the message record must hold
    (the other ways to write the field: tests/mail/test_msgid.py)."""
    field = b"Message-ID:\r\n <trim@corp.example> (sent from a phone)\r\n"
    gate, port = relay
    message = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
               b"Subject: trimmed\r\n" + field + b"\r\nbody\r\n")
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, message)) == 250
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["message_id"] == "<trim@corp.example>"
    hit = await gate.store.find_thread(["<trim@corp.example>"])
    assert hit is not None and hit.source_reference == "101203-T"
    assert sink.messages[0].data.endswith(message)  # the field itself is relayed as written
    await wire.cmd("QUIT")


# ---------------------------------------------------------------- replay and DSN


async def test_replay_keeps_the_parameters_and_adds_orcpt_for_rewritten_recipients(relay, sink):
    """ORCPT keeps the original address of a rewritten recipient (unless the client
    gave one); the MAIL and RCPT parameters survive the RSET and replay (README)."""
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd(
        "MAIL FROM:<uk-payroll+101203-T@corp.example> SIZE=2000 RET=HDRS ENVID=QQ314159")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example> NOTIFY=SUCCESS,FAILURE")) == 250
    assert code(await wire.cmd("RCPT TO:<uk-payroll@corp.example> ORCPT=rfc822;uk-payroll@corp.example")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example> NOTIFY=NEVER")) == 250
    message = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
               b"Cc: uk-payroll@corp.example, client@supplier.example\r\nSubject: dsn\r\n\r\nbody\r\n")
    assert code(await send_data(wire, message)) == 250
    [got] = sink.messages
    [tagged_b] = [r for r in got.rcpt_tos if r.startswith("pl-payroll+")]
    assert got.rcpt_tos == [tagged_b, "uk-payroll+101203-T@corp.example", "client@supplier.example"]
    assert got.mail_options == [f"SIZE={2000 + SIZE_MARGIN}", "RET=HDRS", "ENVID=QQ314159"]
    assert got.rcpt_options == [
        ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;pl-payroll@corp.example"],
        ["ORCPT=rfc822;uk-payroll@corp.example"],
        ["NOTIFY=NEVER"],
    ]
    # Replayed: the first MAIL was reset and sent again with its parameters.
    mails = upstream_saw(sink, "MAIL")
    assert len(mails) == 2 and mails[0] == mails[1]
    assert "RSET" in sink.commands[sink.commands.index(mails[0]) + 1:]
    await wire.cmd("QUIT")


async def test_replay_to_an_upstream_without_dsn_adds_no_orcpt(config_for, start_gate, log_lines):
    async with Sink(dsn=False) as plain:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{plain.port}"))
        wire = await session(port)
        assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example> RET=FULL")) == 250
        assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example> NOTIFY=SUCCESS")) == 250
        message = b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n\r\nbody\r\n"
        assert code(await send_data(wire, message)) == 250
        [got] = plain.messages
        assert got.rcpt_tos[0].startswith("pl-payroll+")
        assert got.mail_options == [] and got.rcpt_options == [[]]
        await wire.cmd("QUIT")


# ---------------------------------------------------------------- odd commands


async def test_nested_mail_is_refused_and_the_transaction_goes_on(relay, sink):
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert (await wire.cmd("MAIL FROM:<other@corp.example>")).startswith("503 5.5.1 ")
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    assert upstream_saw(sink, "MAIL") == ["MAIL FROM:<jane@corp.example>"]
    assert sink.messages[0].mail_from == "jane@corp.example"
    await wire.cmd("QUIT")


async def test_parameters_after_helo_are_refused(relay, sink):
    """RFC 5321 4.1.1.11: parameters are an ESMTP thing; a HELO client may not send them."""
    gate, port = relay
    wire, _ = await Wire.open(port)
    assert code(await wire.cmd("HELO old.client.test")) == 250
    assert (await wire.cmd("MAIL FROM:<jane@corp.example> SIZE=100")).startswith("501 5.5.4 ")
    assert upstream_saw(sink, "MAIL") == []
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert (await wire.cmd("RCPT TO:<b@x.example> NOTIFY=NEVER")).startswith("501 5.5.4 ")
    assert upstream_saw(sink, "RCPT") == []
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    assert sink.messages[0].mail_options == [] and sink.messages[0].rcpt_options == [[]]
    await wire.cmd("QUIT")


async def test_auth_on_a_listener_without_auth_is_not_available(relay, sink, log_lines):
    gate, port = relay
    wire = await session(port)
    assert await wire.cmd("AUTH PLAIN AGphbmUAczNjcmV0") == "502 5.5.1 AUTH not available on this listener"
    assert not events(log_lines, "auth.result")
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    await wire.cmd("QUIT")



# The SIZE arithmetic itself: tests/mail/test_params.py (upstream_size).
async def test_size_declared_near_the_upstream_limit_is_not_turned_away(config_for, start_gate):
    async with Sink(data_size_limit=1000) as small:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{small.port}"))
        wire = await session(port)
        assert code(await wire.cmd(f"MAIL FROM:<jane@corp.example> SIZE=990")) == 250
        assert upstream_saw(small, "MAIL") == ["MAIL FROM:<jane@corp.example> SIZE=1000"]
        await wire.cmd("QUIT")
