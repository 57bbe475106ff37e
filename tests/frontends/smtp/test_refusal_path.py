"""The SMTP front end's one error path (docs/architecture.md, "Refusals").

Every 4xx or 5xx a client hears is logged exactly once, as message.rejected or
command.refused, whoever refused: smtpgate's own checks of a command, aiosmtpd's
(an unknown verb, DATA without recipients), the upstream's verdict passed on (RCPT,
the final dot), a refusal found in the data as it streams (size, bare LF). The
metrics counters move with those events (smtpgate.metrics), so each refusal is
counted once too. The replies are read from a real session against a real upstream.
"""

from __future__ import annotations

import pytest

from smtpgate.mail.replies import Reply
from tests.support.wire import Wire, code

LIMITS = "limits:\n  max_message_size: 4000\n  max_bad_commands: 100\n"
REFUSALS = ("message.rejected", "command.refused")


async def test_every_refusal_the_client_hears_is_logged_once(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", LIMITS))
    sink.rcpt_replies["gone@x.example"] = "550 5.1.1 No such user"
    wire, _ = await Wire.open(port)
    said: list[str] = []

    async def cmd(line: str) -> int:
        said.append(await wire.cmd(line))
        return code(said[-1])

    async def message(data: bytes) -> None:
        for line in ("MAIL FROM:<a@corp.example>", "RCPT TO:<b@x.example>"):
            assert await cmd(line) == 250
        assert await cmd("DATA") == 354
        await wire.send(data + b".\r\n")
        said.append(await wire.reply())

    assert await cmd("EHLO client.test") == 250
    assert await cmd("DATA") == 554  # no transaction: aiosmtpd's check, smtpgate's reply
    assert await cmd("RCPT TO:<b@x.example>") == 503
    assert await cmd("MAIL FROM:no-brackets") == 501
    assert await cmd("XYZZY") == 500
    assert await cmd("MAIL FROM:<a@corp.example>") == 250
    assert await cmd("MAIL FROM:<a@corp.example>") == 503  # nested
    assert await cmd("RCPT TO:<gone@x.example>") == 550  # the upstream's
    assert await cmd("DATA") == 554  # every recipient refused: the message's refusal
    assert await cmd("RSET") == 250
    await message(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 80)  # over max_message_size
    await message(b"Subject: bare\r\n\r\nbare\nLF\r\n")
    sink.data_reply = "554 5.7.1 Not today"
    await message(b"Subject: upstream\r\n\r\nrefused at the dot\r\n")
    assert await cmd("QUIT") == 221
    await wire.close()

    heard = [code(reply) for reply in said if code(reply) >= 400]
    assert heard == [554, 503, 501, 500, 503, 550, 554, 552, 550, 554]
    logged = [(e["event"], e["stage"], e["code"]) for e in log_lines() if e["event"] in REFUSALS]
    assert logged == [
        ("command.refused", "data", 554),
        ("command.refused", "rcpt", 503),
        ("command.refused", "mail", 501),
        ("command.refused", "unknown", 500),
        ("command.refused", "mail", 503),
        ("command.refused", "rcpt", 550),
        ("message.rejected", "data", 554),
        ("message.rejected", "data", 552),
        ("message.rejected", "data", 550),
        ("message.rejected", "data", 554),
    ]
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert rejected[0]["refused"] == [{"recipient": "gone@x.example", "reply": "550 5.1.1 No such user"}]
    assert rejected[3]["reason"] == "upstream: 5.7.1 Not today"
    assert all(e["mail_from"] == "a@corp.example" and e["client_ip"] == "127.0.0.1" for e in rejected)


async def test_a_refused_mail_for_want_of_auth_is_the_message_s_one_rejection(sink, config_for, start_gate,
                                                                              log_lines):
    text = config_for(f"smtp://127.0.0.1:{sink.port}")
    gate, port = await start_gate(text)
    wire, _ = await Wire.open(port, source="127.0.0.2")  # outside relay_networks
    assert code(await wire.cmd("EHLO client.test")) == 250
    assert (await wire.cmd("MAIL FROM:<a@corp.example>")).startswith("530 5.7.0 ")
    await wire.close()
    logged = [e for e in log_lines() if e["event"] in REFUSALS]
    assert [(e["event"], e["stage"], e["code"]) for e in logged] == [("message.rejected", "mail", 530)]
    assert logged[0]["reason"] == "not authenticated, not in relay_networks"


@pytest.mark.parametrize("line", ["550 5.1.1 <b@x.example>: no such user", "550 5.0.0", "550  two spaces",
                                  "552 5.3.4  two spaces after the code", "501 Syntax: DATA", "250 OK", "354",
                                  "550 5.1.1x not an enhanced code"])
def test_a_reply_worded_elsewhere_is_read_once_and_said_as_it_came(line):
    reply = Reply.parse(line)
    assert reply is not None and reply.line() == line
    assert (reply.code, reply.wording) == (int(line[:3]), line[4:])


def test_what_is_no_reply_line_is_not_read_as_one():
    assert Reply.parse("OK") is None and Reply.parse("25 OK") is None
