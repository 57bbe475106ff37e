"""The lockstep relay over real loopback sockets, against an aiosmtpd sink the test controls."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from smtpgate.mail.params import SIZE_MARGIN
from tests.support.wire import Wire, code, free_port, strip_trace

MESSAGE = (
    b"From: Jane <jane@corp.example>\r\n"
    b"To: client@supplier.example\r\n"
    b"Subject: Invoice 4411\r\n"
    b"Message-ID: <m1@corp.example>\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".leading dot line\r\n"
    b"\r\n"
    b"regards\r\n"
)


async def session(port: int, *, source: str | None = None) -> Wire:
    wire, greeting = await Wire.open(port, source=source)
    assert code(greeting) == 220
    assert code(await wire.cmd("EHLO client.test")) == 250
    return wire


def dot_stuff(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def ehlo_keywords(reply: str) -> list[str]:
    """The extension keywords of an EHLO reply (the lines after the greeting line)."""
    return [line[4:].split(" ")[0].upper() for line in reply.split("\n")[1:]]


async def send_data(wire: Wire, data: bytes) -> str:
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(data) + b".\r\n")
    return await wire.reply()


async def test_message_arrives_unchanged_plus_one_received(relay, sink):
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    received = sink.messages[0]
    added, rest = strip_trace(received.data)
    assert rest == MESSAGE
    assert len(added) == 1 and added[0].startswith(b"Received: from client.test ([127.0.0.1])")
    assert received.mail_from == "jane@corp.example"
    assert received.rcpt_tos == ["client@supplier.example"]
    await wire.cmd("QUIT")


async def test_client_hears_250_only_after_the_upstream_said_250(relay, sink):
    """Lockstep: while the upstream holds its answer to the dot, the client hears
    nothing; then it hears the upstream's own 250, which names a queue id only the upstream knew."""
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    queue_id = uuid.uuid4().hex.upper()
    sink.data_reply = f"250 2.0.0 Ok: queued as {queue_id}"
    sink.hold_data = asyncio.Event()
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(MESSAGE) + b".\r\n")
    await sink.wait_for_received(1)
    # A whole other session through smtpgate (one event loop) while the upstream holds: any
    # reply smtpgate had for the first client by now is in that client's socket.
    other = await session(port)
    assert code(await other.cmd("NOOP")) == 250
    await other.cmd("QUIT")
    assert wire.pending() == b""
    sink.hold_data.set()
    assert await wire.reply() == f"250 2.0.0 Ok: queued as {queue_id}"
    await wire.cmd("QUIT")


async def test_message_id_added_when_missing(relay, sink):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    body = b"Subject: no id\r\n\r\nbody\r\n"
    assert code(await send_data(wire, body)) == 250
    added, rest = strip_trace(sink.messages[0].data)
    assert rest == body
    assert [line.split(b":")[0] for line in added] == [b"Received", b"Message-ID"]
    assert added[1].strip().endswith(b"@relay.test.example>")


async def test_one_of_three_recipients_refused(relay, sink):
    gate, port = relay
    sink.rcpt_replies["nobody@supplier.example"] = "550 5.1.1 No such user"
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert code(await wire.cmd("RCPT TO:<a@supplier.example>")) == 250
    refused = await wire.cmd("RCPT TO:<nobody@supplier.example>")
    assert refused.startswith("550 5.1.1")
    assert code(await wire.cmd("RCPT TO:<b@supplier.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    assert sink.messages[0].rcpt_tos == ["a@supplier.example", "b@supplier.example"]


async def test_upstream_552_to_rcpt_becomes_452(relay, sink):
    gate, port = relay
    sink.rcpt_replies["many@supplier.example"] = "552 5.5.3 Too many recipients"
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert (await wire.cmd("RCPT TO:<many@supplier.example>")).startswith("452 4.5.3")


async def test_a_multi_line_552_to_rcpt_becomes_452_with_the_upstreams_first_line(relay, sink):
    gate, port = relay
    sink.raw_replies["RCPT"] = b"552-5.5.3 Too many recipients for one message\r\n552 5.5.3 Send the rest later\r\n"
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert await wire.cmd("RCPT TO:<many@supplier.example>") == "452 4.5.3 Too many recipients for one message"
    await wire.cmd("QUIT")


TAGGED = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: client@supplier.example\r\n"
    b"Subject: refused at the dot\r\n"
    b"Message-ID: <dot-refused@corp.example>\r\n"
    b"\r\n"
    b"body\r\n"
)


@pytest.mark.parametrize("upstream_reply", ["451 4.3.0 Try again later", "554 5.7.1 Content refused"])
async def test_final_dot_refusal_passed_through(relay, sink, log_lines, upstream_reply):
    """The upstream's 4xx/5xx to the dot reaches the client unchanged, and the
    message counts as refused: logged message.rejected, no message record, the upstream reset."""
    gate, port = relay
    sink.data_reply = upstream_reply
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert await send_data(wire, TAGGED) == upstream_reply
    outcomes = [e for e in log_lines() if e["event"] in ("message.relayed", "message.rejected")]
    assert [(e["event"], e["code"]) for e in outcomes] == [("message.rejected", int(upstream_reply[:3]))]
    assert await gate.store.find_thread(["<dot-refused@corp.example>"]) is None
    after_dot = sink.commands[sink.commands.index("DATA") + 1:]
    assert after_dot[:1] == ["RSET"], sink.commands
    # The session goes on, on the same upstream connection: the retry is relayed and recorded.
    sink.data_reply = None
    assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, TAGGED)) == 250
    assert [e["event"] for e in log_lines() if e["event"] == "message.relayed"] == ["message.relayed"]
    hit = await gate.store.find_thread(["<dot-refused@corp.example>"])
    assert hit is not None and hit.source_reference == "101203-T"
    assert sink.connections == 1
    await wire.cmd("QUIT")


async def test_upstream_drops_after_dot_gives_451(relay, sink):
    gate, port = relay
    sink.drop_after_data = True
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    reply = await send_data(wire, MESSAGE)
    assert reply.startswith("451 4.4.2")


async def test_no_upstream_listening_gives_4xx_at_mail(config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{free_port()}"))
    wire = await session(port)
    reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert reply.startswith("451 4.4.1")
    events = [e["event"] for e in log_lines()]
    assert "upstream.error" in events


async def test_dsn_and_outlook_parameters_reach_a_dsn_sink(relay, sink):
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<a@corp.example> AUTH=<> SIZE=123 RET=HDRS ENVID=QQ314159")) == 250
    assert code(await wire.cmd("RCPT TO:<b@x.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@x.example")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    got = sink.messages[0]
    # SIZE with room for what smtpgate adds (smtpgate.mail.params.upstream_size).
    assert f"SIZE={123 + SIZE_MARGIN}" in got.mail_options and "RET=HDRS" in got.mail_options
    assert "ENVID=QQ314159" in got.mail_options
    assert got.rcpt_options[0] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@x.example"]


async def test_dsn_parameters_dropped_for_a_sink_without_dsn(config_for, start_gate, log_lines):
    from tests.support.sink import Sink

    async with Sink(dsn=False) as plain:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{plain.port}"))
        wire = await session(port)
        assert "DSN" not in ehlo_keywords(await wire.cmd("EHLO again.test"))
        assert code(await wire.cmd("MAIL FROM:<a@corp.example> AUTH=<> RET=FULL")) == 250
        assert code(await wire.cmd("RCPT TO:<b@x.example> NOTIFY=NEVER")) == 250
        assert code(await send_data(wire, MESSAGE)) == 250
        got = plain.messages[0]
        assert not any(o.startswith("RET=") for o in got.mail_options)
        assert got.rcpt_options[0] == []


async def test_ehlo_advertises_pipelining_and_size(relay, sink):
    gate, port = relay
    wire, _ = await Wire.open(port)
    ehlo = await wire.cmd("EHLO client.test")
    lines = [line[4:] for line in ehlo.split("\n")]
    assert {"PIPELINING", "ENHANCEDSTATUSCODES", "DSN", "8BITMIME", "SMTPUTF8"} <= set(ehlo_keywords(ehlo))
    assert f"SIZE {gate.config.limits.max_message_size}" in lines
    assert not any(line.startswith("AUTH") for line in lines)


async def test_pipelined_client(relay, sink):
    gate, port = relay
    sink.rcpt_replies["gone@x.example"] = "550 5.1.1 gone"
    wire = await session(port)
    await wire.send("MAIL FROM:<a@corp.example>\r\nRCPT TO:<b@x.example>\r\n"
                    "RCPT TO:<gone@x.example>\r\nRCPT TO:<c@x.example>\r\nDATA\r\n")
    replies = [await wire.reply() for _ in range(5)]
    assert [code(r) for r in replies] == [250, 250, 550, 250, 354]
    await wire.send(dot_stuff(MESSAGE) + b".\r\nQUIT\r\n")
    assert code(await wire.reply()) == 250
    assert code(await wire.reply()) == 221
    assert sink.messages[0].rcpt_tos == ["b@x.example", "c@x.example"]


async def test_stranger_gets_530_at_mail(relay, sink, log_lines):
    gate, port = relay
    wire = await session(port, source="127.0.0.2")
    reply = await wire.cmd("MAIL FROM:<spammer@evil.example>")
    assert reply.startswith("530 5.7.0")
    assert code(await wire.cmd("RCPT TO:<victim@x.example>")) == 503
    # Judged before any upstream work: the upstream never saw a MAIL for it.
    assert not any(c.startswith("MAIL") for c in sink.commands), sink.commands
    assert any(e["event"] == "message.rejected" and e.get("code") == 530 for e in log_lines())


async def test_smuggled_message_refused(relay, sink):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await wire.cmd("DATA")) == 354
    smuggled = (b"Subject: hi\r\n\r\nfirst\r\n\n.\n"
                b"MAIL FROM:<ceo@corp.example>\r\nRCPT TO:<victim@x.example>\r\nDATA\r\nforged\r\n")
    await wire.send(smuggled + b".\r\n")
    reply = await wire.reply()
    assert reply.startswith("550 5.5.2")
    assert code(await wire.cmd("NOOP")) == 250
    await wire.cmd("QUIT")
    # Nothing of it went upstream: no message, and no command smuggled in it. (DATA itself
    # may have gone out at the client's DATA; the refusal then closed that connection.)
    assert sink.messages == [] and sink.received == []
    assert not any("ceo@corp.example" in c or "victim@x.example" in c for c in sink.commands)


@pytest.mark.parametrize("bad", [b"bare\rcr\r\n", b"nul\x00byte\r\n", b"bare lf\nhere\r\n"])
async def test_bad_bytes_refused(relay, sink, bad):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    reply = await send_data(wire, b"Subject: x\r\n\r\n" + bad)
    assert reply.startswith("550 5.5.2")
    assert sink.messages == []


async def test_too_many_hops_refused(relay, sink):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    hops = b"".join(b"Received: from h%d by h%d; Fri, 27 Nov 2026 10:00:00 +0000\r\n" % (i, i) for i in range(51))
    reply = await send_data(wire, hops + b"Subject: loop\r\n\r\nbody\r\n")
    assert reply.startswith("554 5.4.6")
    assert sink.messages == []


async def test_size_limit_advertised_and_enforced(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_message_size: 1000\n"))
    wire = await session(port)
    assert (await wire.cmd("MAIL FROM:<a@corp.example> SIZE=5000")).startswith("552 5.3.4")
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    await wire.cmd("RCPT TO:<b@x.example>")
    reply = await send_data(wire, b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 30 + b"y" * 1000 + b"\r\n")
    assert reply.startswith("552 5.3.4")
    assert sink.messages == []
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250


async def test_rset_and_quit_abort_upstream_without_data(relay, sink):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await wire.cmd("RSET")) == 250
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await wire.cmd("QUIT")) == 221
    await wait_until(lambda: sink.commands.count("RSET") >= 2)
    assert sink.messages == []
    assert not any(c.upper().startswith("DATA") for c in sink.commands)


async def test_dropped_client_aborts_upstream(relay, sink):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(b"Subject: half a message\r\n\r\nno end")
    await wire.close()
    # DATA went upstream with the client's (every recipient final at RCPT): only closing ends it.
    await wait_until(lambda: sink.closed_after_data == 1)
    assert sink.messages == [] and sink.received == []


async def test_upstream_connection_reused(relay, sink):
    gate, port = relay
    for _ in range(3):
        wire = await session(port)
        await wire.cmd("MAIL FROM:<jane@corp.example>")
        await wire.cmd("RCPT TO:<client@supplier.example>")
        assert code(await send_data(wire, MESSAGE)) == 250
        await wire.cmd("QUIT")
    assert len(sink.messages) == 3
    assert sink.connections == 1


# One command per reply; the parameter and address checks behind them are unit-tested in
# tests/mail/test_params.py and tests/mail/test_addresses.py.
@pytest.mark.parametrize("command,expected", [
    ("MAIL FROM:<a@corp.example> FOO=bar", "555 5.5.4 "),
    ("MAIL FROM:<a@corp.example> BODY=9BIT", "501 5.5.4 "),
    ("MAIL FROM:a@", "501 5.1.7 "),
    ("MAIL TO:<a@corp.example>", "501 5.5.4 Syntax: MAIL FROM:"),
])
async def test_bad_mail_commands(relay, sink, command, expected):
    gate, port = relay
    wire = await session(port)
    assert (await wire.cmd(command)).startswith(expected)
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert not any(c.startswith("MAIL") and c != "MAIL FROM:<a@corp.example>" for c in sink.commands)


@pytest.mark.parametrize("command,expected", [
    ("RCPT TO:<b@x.example> RET=FULL", "555 5.5.4 "),
    ("RCPT TO:<b@x.example> NOTIFY=SOMETIMES", "501 5.5.4 "),
    ("RCPT TO:<>", "501 5.1.3 "),
    ("RCPT TO:<@a.example:b@x.example", "501 5.5.4 Syntax: RCPT TO:"),
])
async def test_bad_rcpt_commands(relay, sink, command, expected):
    gate, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<a@corp.example>")
    assert (await wire.cmd(command)).startswith(expected)
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert [c for c in sink.commands if c.startswith("RCPT")] == ["RCPT TO:<b@x.example>"]


async def test_null_sender_relayed(relay, sink):
    gate, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<>")) == 250
    await wire.cmd("RCPT TO:<b@x.example>")
    assert code(await send_data(wire, MESSAGE)) == 250
    assert sink.messages[0].mail_from in ("", "<>")


async def wait_until(predicate, timeout: float = 10.0) -> None:
    """Poll a condition the server reaches asynchronously (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_sessions_are_released_after_close(relay, sink):
    gate, port = relay
    for _ in range(3):
        wire = await session(port)
        await wire.cmd("QUIT")
        await wire.close()
    await wait_until(lambda: not gate.registry.sessions)


async def test_max_connections(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_connections: 1\n"))
    first = await session(port)
    second, greeting = await Wire.open(port)
    assert greeting.startswith("421 4.7.0")
    await first.cmd("QUIT")


@pytest.mark.parametrize("source,expected", [("10.1.2.3", 530), ("127.0.0.1", 250)])
async def test_proxy_protocol_client_address_judged(sink, config_for, start_gate, log_lines, source, expected):
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    listener = config.listeners[0].model_copy(update={"proxy_protocol": True})
    gate, port = await start_gate(config.model_copy(update={"listeners": (listener,)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"PROXY TCP4 {source} 127.0.0.1 40000 25\r\n".encode())
    wire = Wire(reader, writer)
    assert code(await wire.reply()) == 220
    await wire.cmd("EHLO proxied.test")
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == expected
    await wire.cmd("QUIT")


async def test_odd_helo_keeps_received_well_formed(relay, sink):
    gate, port = relay
    wire, _ = await Wire.open(port)
    assert code(await wire.cmd("EHLO bad;helo(with)parts")) == 250
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await send_data(wire, MESSAGE)) == 250
    added, rest = strip_trace(sink.messages[0].data)
    assert added[0].startswith(b"Received: from unknown ([127.0.0.1])\r\n\tby relay.test.example (smtpgate)")
