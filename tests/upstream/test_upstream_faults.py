"""Upstream faults at every stage, against `smtpgate serve` as a process.

One server process relays to a sink the test breaks in one way after another:
connection refused, a 421 greeting, 4xx and 5xx to MAIL, RCPT, DATA and the
final dot, a connection dropped after the dot, a stall past the phase timeout
at each stage, and an over-long reply line. For each, the client's reply at the
stage where the fault shows has the class docs/upstream.md gives (the
upstream's own verdict, or smtpgate's 451 4.4.1 / 4.4.2), the store has no
message record of it, and the next message through the same process is
delivered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tests.conftest import write_config
from tests.support.configs import SUBMISSION
from tests.support.process import ServeProcess, run_cli
from tests.support.sink import Sink
from tests.support.wire import Wire, code, free_port

SENDER = "uk-payroll+101203-T@corp.example"
RECIPIENT = "client@supplier.example"
LONG_LINE = b"x" * 10_000  # RFC 5321 4.5.3.1.5 allows 512 octets; aiosmtplib refuses over 8192

# Phase timeouts short enough for a test, far below what the test client waits (15 s a reply).
CONFIG = """\
hostname: relay.test.example
""" + SUBMISSION + """\
upstream:
  url: smtp://127.0.0.1:{sink_port}
  pool_size: 0
  timeout: 8
  timeouts: {{connect: 2, command: 2, data: 2}}
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


@dataclass
class Fault:
    name: str
    knobs: dict = field(default_factory=dict)  # Sink attributes to set
    stage: str = "dot"  # where the client hears about it: MAIL | RCPT | dot
    reply: str = ""  # the start of the reply the client must get there
    refuse_connections: bool = False


FAULTS = [
    Fault("connection refused", refuse_connections=True, stage="MAIL", reply="451 4.4.1"),
    Fault("421 greeting", {"greeting": "421 4.3.2 Service not available"}, "MAIL", "451 4.4.1"),
    Fault("4xx to MAIL", {"mail_reply": "451 4.3.0 Try again later"}, "MAIL", "451 4.3.0"),
    Fault("5xx to MAIL", {"mail_reply": "553 5.7.1 Sender refused"}, "MAIL", "553 5.7.1"),
    Fault("4xx to RCPT", {"rcpt_replies": {RECIPIENT: "450 4.2.1 Mailbox busy"}}, "RCPT", "450 4.2.1"),
    Fault("5xx to RCPT", {"rcpt_replies": {RECIPIENT: "550 5.1.1 User unknown"}}, "RCPT", "550 5.1.1"),
    Fault("4xx to DATA", {"data_command_reply": "451 4.3.0 Not now"}, "dot", "451 4.3.0"),
    Fault("5xx to DATA", {"data_command_reply": "554 5.5.1 No valid recipients"}, "dot", "554 5.5.1"),
    Fault("4xx to the dot", {"data_reply": "452 4.3.1 Insufficient storage"}, "dot", "452 4.3.1"),
    Fault("5xx to the dot", {"data_reply": "554 5.7.1 Message refused"}, "dot", "554 5.7.1"),
    Fault("dropped after the dot", {"drop_after_data": True}, "dot", "451 4.4.2"),
    Fault("stall at the greeting", {"stall": {"greeting"}}, "MAIL", "451 4.4.1"),
    Fault("stall at MAIL", {"stall": {"MAIL"}}, "MAIL", "451 4.4.2"),
    Fault("stall at RCPT", {"stall": {"RCPT"}}, "RCPT", "451 4.4.2"),
    Fault("stall at DATA", {"stall": {"DATA"}}, "dot", "451 4.4.2"),
    Fault("stall at the dot", {"stall": {"dot"}}, "dot", "451 4.4.2"),
    Fault("over-long greeting", {"raw_replies": {"greeting": b"220 " + LONG_LINE + b"\r\n"}}, "MAIL", "451 4.4.1"),
    Fault("over-long reply to MAIL", {"raw_replies": {"MAIL": b"250 " + LONG_LINE + b"\r\n"}}, "MAIL", "451 4.4.2"),
    Fault("over-long reply to RCPT", {"raw_replies": {"RCPT": b"250 " + LONG_LINE + b"\r\n"}}, "RCPT", "451 4.4.2"),
    Fault("over-long reply to the dot", {"raw_replies": {"dot": b"250 " + LONG_LINE + b"\r\n"}}, "dot", "451 4.4.2"),
]

CLEAN = {"greeting": None, "mail_reply": None, "rcpt_replies": {}, "data_command_reply": None,
         "data_reply": None, "drop_after_data": False, "stall": set(), "raw_replies": {}}


def message(message_id: str) -> bytes:
    return (f"From: Team A <{SENDER}>\r\nTo: {RECIPIENT}\r\nSubject: fault test\r\n"
            f"Message-ID: {message_id}\r\n\r\nbody\r\n").encode()


async def transaction(port: int, message_id: str) -> tuple[str, str]:
    """Run one transaction; (stage, reply) of the first refusal, else ("dot", the reply to the dot)."""
    wire, greeting = await Wire.open(port)
    try:
        assert code(greeting) == 220, greeting
        await wire.cmd("EHLO client.test")
        reply = await wire.cmd(f"MAIL FROM:<{SENDER}>")
        if code(reply) != 250:
            return "MAIL", reply
        reply = await wire.cmd(f"RCPT TO:<{RECIPIENT}>")
        if code(reply) != 250:
            await wire.cmd("RSET")
            return "RCPT", reply
        reply = await wire.cmd("DATA")
        assert code(reply) == 354, reply  # smtpgate answers DATA itself
        await wire.send(message(message_id) + b".\r\n")
        return "dot", await wire.reply()
    finally:
        await wire.close()


async def test_every_upstream_fault_gives_the_designed_reply_and_no_record(tmp_path):
    async with Sink() as sink:
        port = free_port()
        config = write_config(tmp_path, CONFIG.format(port=port, sink_port=sink.port))
        async with ServeProcess(config) as served:
            problems = []
            delivered, failed = [], []
            for n, fault in enumerate(FAULTS):
                message_id = f"<fault-{n}@corp.example>"
                if fault.refuse_connections:
                    await sink.stop()
                for knob, value in fault.knobs.items():
                    setattr(sink, knob, value)
                stage, reply = await transaction(port, message_id)
                failed.append(message_id)
                if (stage, reply[:len(fault.reply)]) != (fault.stage, fault.reply):
                    problems.append(f"{fault.name}: expected {fault.stage} {fault.reply}..., got {stage} {reply!r}")

                for knob, value in CLEAN.items():
                    setattr(sink, knob, value)
                if fault.refuse_connections:
                    await sink.start()  # the same port again
                good_id = f"<after-{n}@corp.example>"
                stage, reply = await transaction(port, good_id)
                if (stage, code(reply)) != ("dot", 250):
                    problems.append(f"after {fault.name}: the next message got {stage} {reply!r}")
                delivered.append(good_id)
            assert problems == []

            status, out = await run_cli("links", "show", "101203-T", "--json", "-c", str(config), cwd=tmp_path)
            assert status == 0, out
            recorded = {m["message_id"] for m in json.loads(out)["messages"]}
            assert recorded == set(delivered), f"records of refused messages: {recorded & set(failed)}"
            at_sink = [m.data for m in sink.messages]
            assert all(any(mid.encode() in data for data in at_sink) for mid in delivered)
            assert not any(mid.encode() in data for mid in failed for data in at_sink)
            assert served.named("session.error") == []
            assert await served.stop() == 0
