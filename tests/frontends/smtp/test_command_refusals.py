"""What the SMTP session (smtpgate/frontends/smtp/server.py) logs when it refuses a command: its
own refusals with their wording, and the upstream's passed on with the address they refuse."""

from __future__ import annotations

from smtpgate.config import load_config
from tests.conftest import BASE_CONFIG, write_config
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_relay import session


def refusals(log_lines) -> list[dict]:
    return [e for e in log_lines() if e["event"] == "command.refused"]


async def test_smtpgates_own_refusal_is_logged_with_the_replys_wording(relay, log_lines):
    _, port = relay
    wire = await session(port)
    reply = await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(reply) == 503
    [refused] = refusals(log_lines)
    assert (refused["code"], refused["stage"]) == (503, "rcpt")
    assert refused["reason"] == reply[4:]  # enhanced status code and text, as the client read them
    await wire.cmd("QUIT")


async def test_the_upstreams_refusal_of_mail_and_rcpt_is_logged_with_the_address(relay, sink, log_lines):
    _, port = relay
    sink.mail_reply = "550 5.7.1 Sender rejected"
    wire = await session(port)
    assert await wire.cmd("MAIL FROM:<jane@corp.example>") == "550 5.7.1 Sender rejected"
    sink.mail_reply = None
    sink.rcpt_replies["nobody@supplier.example"] = "550 5.1.1 No such user"
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert await wire.cmd("RCPT TO:<nobody@supplier.example>") == "550 5.1.1 No such user"
    mail, rcpt = refusals(log_lines)
    assert (mail["stage"], mail["reason"], mail["mail_from"]) == ("mail", "upstream: 5.7.1 Sender rejected",
                                                                 "jane@corp.example")
    assert (rcpt["stage"], rcpt["reason"], rcpt["recipient"]) == ("rcpt", "upstream: 5.1.1 No such user",
                                                                 "nobody@supplier.example")
    await wire.cmd("QUIT")


async def test_an_unknown_verb_is_refused_as_not_recognized_and_logged_as_unknown(relay, log_lines):
    _, port = relay
    wire = await session(port)
    reply = await wire.cmd("FOO bar")
    assert reply == '500 5.5.2 Error: command "FOO" not recognized'
    [refused] = refusals(log_lines)
    assert (refused["code"], refused["stage"], refused["reason"]) == (500, "unknown", reply[4:])
    assert code(await wire.cmd("NOOP")) == 250  # the session goes on
    await wire.cmd("QUIT")


async def test_a_line_refused_before_its_verb_is_read_is_logged_as_an_unknown_command(relay, log_lines):
    """An empty line or a line over the command limit is refused before any verb is looked
    up: logged as no known command, not as the command answered before it (a one-line
    reply or a multi-line one)."""
    _, port = relay
    wire = await session(port)  # EHLO: a multi-line reply
    assert await wire.cmd("NOOP " + "y" * 1100) == "500 5.5.6 Command line too long"
    assert code(await wire.cmd("NOOP")) == 250
    assert await wire.cmd("") == "500 5.5.2 Error: bad syntax"
    assert [(e["code"], e["stage"], e["reason"]) for e in refusals(log_lines)] == [
        (500, "unknown", "5.5.6 Command line too long"), (500, "unknown", "5.5.2 Error: bad syntax")]
    await wire.cmd("QUIT")


async def test_a_connection_refused_before_its_first_command_is_no_command_refusal(sink, config_for, start_gate,
                                                                                  log_lines):
    _, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}",
                                          "limits:\n  max_connections_per_client: 1\n"))
    first = await session(port)
    second, greeting = await Wire.open(port)
    assert greeting.startswith("421 4.7.0 ")
    await second.close()
    assert [e["reason"] for e in log_lines() if e["event"] == "session.refused"] == [
        "limits.max_connections_per_client reached"]
    assert refusals(log_lines) == []
    await first.cmd("QUIT")


async def test_a_sender_or_recipient_path_refused_is_logged_with_what_is_wrong_with_it(relay, log_lines):
    _, port = relay
    wire = await session(port)
    assert await wire.cmd("MAIL FROM:<jan\u00e9@corp.example>") == "501 5.1.7 Bad sender address syntax"
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert await wire.cmd("RCPT TO:<>") == "501 5.1.3 Bad recipient address syntax"
    assert [(e["code"], e["stage"], e["reason"]) for e in refusals(log_lines)] == [
        (501, "mail", "non-ASCII sender without SMTPUTF8"), (501, "rcpt", "the null path is not a recipient")]
    await wire.cmd("QUIT")


async def test_an_inbound_listener_refuses_a_recipient_outside_the_internal_domains(tmp_path, sink, start_gate,
                                                                                   log_lines):
    text = BASE_CONFIG.replace("  - name: submission\n", "  - name: inbound\n").replace(
        "    relay_networks: [127.0.0.1/32]\n", "    direction: inbound\n")
    _, port = await start_gate(load_config(write_config(tmp_path, text.format(
        upstream=f"smtp://127.0.0.1:{sink.port}", store=f"sqlite:{tmp_path}/smtpgate.db"))))
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<client@supplier.example>")) == 250
    assert await wire.cmd("RCPT TO:<someone@elsewhere.example>") == "554 5.7.1 Relay access denied"
    assert code(await wire.cmd("RCPT TO:<uk-payroll@corp.example>")) == 250
    [refused] = refusals(log_lines)
    assert (refused["code"], refused["stage"], refused["reason"], refused["listener"]) == (
        554, "rcpt", "inbound listener: not an internal domain", "inbound")
    rcpts = [c for c in sink.commands if c.upper().startswith("RCPT TO:")]
    assert rcpts == ["RCPT TO:<uk-payroll@corp.example>"]  # the other one never asked upstream
    await wire.cmd("QUIT")


def mail_line(octets: int) -> str:
    """A MAIL command of ``octets`` octets before its CRLF (the address is refused later; its length is what counts)."""
    head, tail = "MAIL FROM:<", "@corp.example>"
    return head + "j" * (octets - len(head) - len(tail)) + tail


async def test_repeated_ehlo_does_not_raise_the_mail_line_limit(relay):
    """After EHLO a MAIL line may be 548 octets (512, and room for SIZE and SMTPUTF8); saying
    EHLO again does not add that room again."""
    _, port = relay
    wire = await session(port)
    for _ in range(3):
        assert code(await wire.cmd("EHLO client.test")) == 250
    assert code(await wire.cmd(mail_line(600))) == 500
    assert code(await wire.cmd(mail_line(548))) != 500  # read as a command
    await wire.cmd("QUIT")


async def test_a_new_connection_leaves_the_mail_line_limit_of_a_session_past_ehlo(relay):
    _, port = relay
    first = await session(port)
    second, greeting = await Wire.open(port)
    assert code(greeting) == 220
    assert code(await first.cmd(mail_line(548))) != 500  # still the limit its EHLO gave it
    assert code(await first.cmd(mail_line(549))) == 500
    for wire in (first, second):
        await wire.cmd("QUIT")
