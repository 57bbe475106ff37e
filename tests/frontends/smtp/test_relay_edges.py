"""Edges of the lockstep relay: clients that vanish, upstreams that misbehave, one test per bug.

Everything runs over loopback against a real smtpgate. The aiosmtpd sink is the
upstream where it can play the part; `Scripted` below is a line-based upstream
for what the sink cannot do: answer two commands in one write, refuse the DATA
command itself, or send a malformed reply.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.wire import Wire, code
from tests.frontends.smtp.test_relay import MESSAGE, dot_stuff, send_data, session, strip_trace, wait_until


class Scripted:
    """A minimal upstream SMTP server whose replies the test scripts.

    - RCPT to an address starting with "slow@" is answered only once the next
      command has arrived, and both replies go out in one write.
    - RCPT to an address starting with "nobody@" is refused with 550.
    - MAIL inside an open transaction gets "503 nested MAIL", as Postfix does.
    - `data_command_reply`, when set, refuses the DATA command itself.
    - `mail_reply_raw`, when set, is written verbatim in answer to MAIL.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0
        self.lines: list[str] = []
        self.delivered: list[bytes] = []
        self.data_command_reply: str | None = None
        self.mail_reply_raw: bytes | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        state = {"tx": False, "writer": writer}
        writer.write(b"220 scripted.test ESMTP\r\n")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                command = line.decode("utf-8", "replace").rstrip("\r\n")
                self.lines.append(command)
                if command.upper().startswith("RCPT") and "<slow@" in command.lower():
                    held = b"250 2.1.5 Ok (late)\r\n"
                    following = await reader.readline()
                    if not following:
                        break
                    nxt = following.decode("utf-8", "replace").rstrip("\r\n")
                    self.lines.append(nxt)
                    writer.write(held + await self._answer(nxt, state, reader))
                else:
                    writer.write(await self._answer(command, state, reader))
                await writer.drain()
                if command.upper() == "QUIT":
                    break
        except ConnectionError:
            pass
        finally:
            self.closed += 1
            writer.close()

    async def _answer(self, command: str, state: dict, reader: asyncio.StreamReader) -> bytes:
        verb = command.split(" ", 1)[0].upper()
        if verb in ("EHLO", "HELO"):
            return b"250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        if verb == "MAIL":
            if self.mail_reply_raw is not None:
                return self.mail_reply_raw
            if state["tx"]:
                return b"503 5.5.1 Error: nested MAIL command\r\n"
            state["tx"] = True
            return b"250 2.1.0 Ok\r\n"
        if verb == "RCPT":
            if "<nobody@" in command.lower():
                return b"550 5.1.1 <nobody>: Recipient address rejected: User unknown\r\n"
            return b"250 2.1.5 Ok\r\n"
        if verb == "RSET":
            state["tx"] = False
            return b"250 2.0.0 Ok\r\n"
        if verb == "NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == "DATA":
            if self.data_command_reply is not None:
                return self.data_command_reply.encode() + b"\r\n"
            state["writer"].write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            body = []
            while True:
                data_line = await reader.readline()
                if not data_line or data_line == b".\r\n":
                    break
                body.append(data_line)
            state["tx"] = False
            self.delivered.append(b"".join(body))
            return b"250 2.0.0 Ok: queued\r\n"
        if verb == "QUIT":
            return b"221 2.0.0 Bye\r\n"
        return b"502 5.5.2 Error: command not recognized\r\n"


@pytest.fixture
async def scripted():
    async with Scripted() as upstream:
        yield upstream


@pytest.fixture
async def scripted_relay(scripted, config_for, start_gate, log_lines):
    return await start_gate(config_for(f"smtp://127.0.0.1:{scripted.port}"))


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


# ---------------------------------------------------------------- client gone


async def test_client_gone_while_upstream_answers_dot_is_logged_recorded_and_released(relay, sink, log_lines):
    """A client that hangs up after its final dot must not leave the relay half done:
    the upstream's verdict is logged once, the message recorded, the connection released."""
    gate, port = relay
    wire = await session(port)
    message = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
               b"To: client@supplier.example\r\nSubject: gone\r\nMessage-ID: <gone@corp.example>\r\n\r\nhi\r\n")
    assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    hold = asyncio.Event()
    sink.hold_data = hold
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(message) + b".\r\n")
    await sink.wait_for_received(1)
    await wire.close()
    await wait_until(lambda: not gate.registry.sessions)
    hold.set()
    await sink.wait_for_messages(1)
    await wait_until(lambda: events(log_lines, "message.relayed"))
    await wait_until(lambda: len(gate.snapshot.pool.idle) == 1)
    assert len(events(log_lines, "message.relayed")) == 1
    assert not events(log_lines, "message.rejected")
    hit = await gate.store.find_thread(["<gone@corp.example>"])
    assert hit is not None and hit.source_reference == "101203-T"


async def test_client_gone_during_slow_rcpt_never_desyncs_a_pooled_upstream(scripted_relay, scripted):
    """A RCPT cut short by the client's hang-up leaves its reply in flight: that upstream
    connection must not be reused, or a later RCPT reads an earlier command's 250."""
    gate, port = scripted_relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    await wire.send("RCPT TO:<slow@x.example>\r\n")
    await wait_until(lambda: any(line.upper().startswith("RCPT") for line in scripted.lines))
    await wire.close()
    await wait_until(lambda: not gate.registry.sessions and not gate.registry.tasks)

    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    refused = await wire.cmd("RCPT TO:<nobody@x.example>")
    assert code(refused) == 550, refused
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")


# ---------------------------------------------------------------- upstream state


async def test_upstream_refusing_data_command_leaves_no_open_transaction_in_the_pool(scripted_relay, scripted):
    """An upstream that refuses the DATA command keeps its MAIL/RCPT state (Postfix does):
    the connection must be reset before the next session's MAIL uses it."""
    gate, port = scripted_relay
    scripted.data_command_reply = "554 5.7.1 <DATA>: Data command rejected"
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<b@x.example>")
    reply = await send_data(wire, MESSAGE)
    assert reply.startswith("554 5.7.1")
    await wire.cmd("QUIT")
    scripted.data_command_reply = None

    wire = await session(port)
    reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert code(reply) == 250, reply
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")
    assert len(scripted.delivered) == 1


async def test_upstream_garbling_mail_reply_gets_its_connection_closed(scripted_relay, scripted):
    gate, port = scripted_relay
    wire = await session(port)
    scripted.mail_reply_raw = b"hello there\r\n"
    reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert reply.startswith("451 4.4.2")
    # smtpgate closes the upstream connection it can no longer trust.
    await wait_until(lambda: scripted.closed == scripted.connections)
    scripted.mail_reply_raw = None
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    await wire.cmd("QUIT")


@pytest.mark.parametrize("command,expected", [
    ('MAIL FROM:<"a\tb"@corp.example>', "501 5.1.7"),
    ('RCPT TO:<"a\tb"@x.example>', "501 5.1.3"),
])
async def test_control_character_in_quoted_local_part_is_a_syntax_error(relay, sink, command, expected):
    """RFC 5321 qtextSMTP has no TAB: refused as syntax, not relayed into an upstream
    client that cannot send it (which left a 451 and an unreleased upstream connection)."""
    gate, port = relay
    wire = await session(port)
    if command.startswith("RCPT"):
        assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    reply = await wire.cmd(command)
    assert reply.startswith(expected), reply
    if command.startswith("MAIL"):
        assert len(gate.snapshot.pool.idle) == 1  # the probed connection is still there for the next MAIL
        assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")


# ---------------------------------------------------------------- logs and trace


async def test_data_over_size_logs_one_message_rejected(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_message_size: 1000\n"))
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    reply = await send_data(wire, b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 40)
    assert reply.startswith("552 5.3.4")
    assert code(await wire.cmd("NOOP")) == 250
    rejected = events(log_lines, "message.rejected")
    assert len(rejected) == 1 and rejected[0]["code"] == 552
    assert rejected[0]["mail_from"] == "a@corp.example"
    assert sink.messages == []


async def test_received_says_smtp_for_a_helo_client(relay, sink):
    """RFC 3848: "with ESMTP" only when the client greeted with EHLO."""
    gate, port = relay
    wire, _ = await Wire.open(port)
    assert code(await wire.cmd("HELO old.client.test")) == 250
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    added, _ = strip_trace(sink.messages[0].data)
    assert b" with SMTP id " in added[0], added[0]
    await wire.cmd("QUIT")


# ---------------------------------------------------------------- replay


async def test_replay_sends_a_mailbox_once_whatever_the_case_of_its_local_part(relay, sink, log_lines):
    """Duplicates after rewriting are sent once; mailbox local parts match
    case-insensitively, so two spellings of one mailbox are one recipient."""
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<PL-Payroll@corp.example>")) == 250
    message = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
               b"Subject: twice\r\n\r\nbody\r\n")
    assert code(await send_data(wire, message)) == 250
    [got] = sink.messages
    assert len(got.rcpt_tos) == 1, got.rcpt_tos
    assert got.rcpt_tos[0].startswith("pl-payroll+"), got.rcpt_tos  # tagged, not delivered untagged too
    await wire.cmd("QUIT")
