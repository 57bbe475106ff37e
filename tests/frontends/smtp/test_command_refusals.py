"""What the SMTP session (smtpgate/frontends/smtp/server.py) logs when it refuses a command: its
own refusals with their wording, and the upstream's passed on with the address they refuse."""

from __future__ import annotations

from tests.support.wire import code
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
