"""The message data reader (GlueSMTP.smtp_DATA, read_message_data): what arrives between
DATA's 354 and the final dot, in whatever pieces TCP makes of it.

Three layers, all over real sockets or a real asyncio.StreamReader:

- smtpgate relaying to the sink: the bytes the upstream receives for each edge of
  RFC 5321 4.5.2 (dot-stuffing) and 4.1.1.4 (the final dot), the size and line limits,
  pipelining after the dot and a large message;
- aiosmtpd's own smtp_DATA beside GlueSMTP's, both with small limits, fed the same
  bytes in random pieces: the same replies and the same content, every time;
- read_message_data on a StreamReader fed one piece at a time, for every split.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import logging
import socket
import struct
import termios
import threading

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from smtpgate.frontends.smtp.aiosmtpd_glue import DataLimits, GlueSMTP, _MessageData, data_refusal, read_message_data
from smtpgate.mail import replies
from tests.support.wire import Wire, code, strip_trace
from tests.frontends.smtp.test_relay import dot_stuff, session, wait_until

SUBJECT = b"From: Jane <jane@corp.example>\r\nTo: client@supplier.example\r\nSubject: data\r\n\r\n"


# ---------------------------------------------------------------- smtpgate relaying to the sink


async def open_data(port: int) -> Wire:
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    return wire


def relayed(sink) -> bytes:
    """The one message the sink received, without the trace fields smtpgate prepends."""
    [message] = sink.messages
    return strip_trace(message.data)[1]


@pytest.mark.parametrize(("sent", "expected"), [
    pytest.param(b".\r\n", b"", id="an empty message is the final dot alone"),
    pytest.param(b"\r\n.\r\n", b"\r\n", id="a first line of one CRLF, then the final dot"),
    pytest.param(b"..hidden\r\n" + SUBJECT + b"body\r\n.\r\n", b".hidden\r\n" + SUBJECT + b"body\r\n",
                 id="a dot-stuffed first line loses its first dot"),
    pytest.param(b"..\r\n...\r\n" + SUBJECT + b"..\r\n...\r\n....\r\nx.\r\n..x\r\n.\r\n",
                 b".\r\n..\r\n" + SUBJECT + b".\r\n..\r\n...\r\nx.\r\n.x\r\n",
                 id="lines of nothing but dots lose one each"),
])
async def test_data_as_sent_is_relayed_unstuffed(relay, sink, sent, expected):
    gate, port = relay
    wire = await open_data(port)
    await wire.send(sent)
    assert code(await wire.reply()) == 250
    assert relayed(sink) == expected


def unread(server) -> int:
    """Octets waiting in the gate's socket for the gate to read them."""
    sock = server.transport.get_extra_info("socket")
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def send_in_pieces(wire: Wire, gate, pieces) -> None:
    """Each piece is written once the gate has read the one before: one read for each."""
    [server] = gate.registry.sessions
    for piece in pieces:
        await wire.send(piece)
        await wait_until(lambda: unread(server) == 0)


@pytest.mark.parametrize("message", [SUBJECT + b"body\r\n", b"\r\n", SUBJECT + b"\r\n", SUBJECT + b"..\r\n"])
async def test_the_final_dot_arriving_one_octet_at_a_time(relay, sink, message):
    gate, port = relay
    wire = await open_data(port)
    stream = dot_stuff(message) + b".\r\n"
    await send_in_pieces(wire, gate, [stream[i:i + 1] for i in range(len(stream))])
    assert code(await wire.reply()) == 250
    assert relayed(sink) == message


@pytest.mark.parametrize("tail", [b"body\r", b"body\r\n", b"body\r\n.", b"body\r\n.\r"])
async def test_the_final_dot_split_between_two_reads(relay, sink, tail):
    gate, port = relay
    wire = await open_data(port)
    stream = SUBJECT + b"body\r\n.\r\n"
    cut = len(SUBJECT) + len(tail)
    await send_in_pieces(wire, gate, [stream[:cut], stream[cut:]])
    assert code(await wire.reply()) == 250
    assert relayed(sink) == SUBJECT + b"body\r\n"


async def test_a_dot_line_after_a_bare_cr_ends_the_data(relay, sink):
    """"x" CR CR LF "." CR LF: the CR LF before the dot ends a line, so this is the final dot;
    the bare CR before it makes the data guard refuse the message as it does today."""
    gate, port = relay
    wire = await open_data(port)
    await send_in_pieces(wire, gate, [SUBJECT + b"x\r", b"\r\n.\r", b"\n"])
    assert await wire.reply() == replies.BAD_LINE_ENDINGS.line()
    assert code(await wire.cmd("NOOP")) == 250
    assert sink.messages == []


@pytest.mark.parametrize("pieces", [[b"x\n.\r\n", b"more\r\n.\r\n"], [b"x\n", b".\r\nmore\r\n.\r\n"],
                                    [b"x\n.", b"\r\nmore\r\n.\r\n"]])
async def test_a_dot_line_after_a_bare_lf_does_not_end_the_data(relay, sink, pieces):
    """A bare LF ends no line: "." CR LF after it is data, and the one reply (the data guard's
    refusal, as today) comes after the real final dot; the session goes on in step."""
    gate, port = relay
    wire = await open_data(port)
    await send_in_pieces(wire, gate, [SUBJECT] + pieces)
    assert await wire.reply() == replies.BAD_LINE_ENDINGS.line()
    assert code(await wire.cmd("NOOP")) == 250
    assert sink.messages == []


@pytest.mark.parametrize("bad", [b"bare lf\nhere\r\n", b"bare cr\rhere\r\n", b"\n\r\n", b"\r\r\n"])
async def test_bare_lf_and_bare_cr_are_refused_by_the_data_guard_as_before(relay, sink, bad):
    gate, port = relay
    wire = await open_data(port)
    await wire.send(SUBJECT + bad + b".\r\n")
    assert await wire.reply() == replies.BAD_LINE_ENDINGS.line()
    assert sink.messages == []


async def test_a_command_pipelined_after_the_final_dot_is_read_as_a_command(relay, sink):
    gate, port = relay
    wire = await open_data(port)
    await wire.send(SUBJECT + b"body\r\n.\r\nQUIT\r\n")
    assert code(await wire.reply()) == 250
    assert code(await wire.reply()) == 221
    assert relayed(sink) == SUBJECT + b"body\r\n"


async def test_a_whole_transaction_pipelined_after_the_final_dot(relay, sink):
    gate, port = relay
    wire = await open_data(port)
    await wire.send(SUBJECT + b"one\r\n.\r\nMAIL FROM:<jane@corp.example>\r\nRCPT TO:<b@x.example>\r\n"
                    b"DATA\r\n" + SUBJECT + b"two\r\n.\r\nNOOP\r\n")
    assert [code(await wire.reply()) for _ in range(6)] == [250, 250, 250, 354, 250, 250]
    assert [strip_trace(m.data)[1] for m in sink.messages] == [SUBJECT + b"one\r\n", SUBJECT + b"two\r\n"]


@pytest.fixture
async def small_relay(sink, config_for, start_gate, log_lines):
    return await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_message_size: 1000\n"))


def of_size(size: int, line: int = 50) -> bytes:
    """A message of exactly `size` octets as sent (its lines `line` octets with CRLF)."""
    body = b"".join(b"%0*d\r\n" % (line - 2, i) for i in range((size - len(SUBJECT)) // line))
    short = size - len(SUBJECT) - len(body)
    return SUBJECT + body + (b"y" * (short - 2) + b"\r\n" if short else b"")


@pytest.mark.parametrize("size", [999, 1000])
async def test_a_message_of_at_most_the_size_limit_is_relayed(small_relay, sink, size):
    gate, port = small_relay
    message = of_size(size)
    assert len(message) == size
    wire = await open_data(port)
    await wire.send(message + b".\r\n")
    assert code(await wire.reply()) == 250
    assert relayed(sink) == message


async def test_dot_stuffing_counts_towards_the_size_limit(small_relay, sink, log_lines):
    """aiosmtpd counts the octets as sent: 999 of message plus one stuffed dot is 1000."""
    gate, port = small_relay
    message = of_size(999 - 4) + b".x\r\n"
    wire = await open_data(port)
    await wire.send(dot_stuff(message) + b".\r\n")
    assert code(await wire.reply()) == 250
    assert relayed(sink) == message


async def test_one_octet_over_the_size_limit_is_refused_after_the_final_dot(small_relay, sink, log_lines):
    gate, port = small_relay
    wire = await open_data(port)
    message = of_size(1001)
    await send_in_pieces(wire, gate, [message[:1001 - 10], message[-10:]])
    assert wire.pending() == b""  # nothing said before the final dot
    await wire.send(b".\r\n")
    assert await wire.reply() == replies.MESSAGE_TOO_BIG.line()
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert [(e["code"], e["reason"], e["stage"]) for e in rejected] == [(552, "data over limits.max_message_size", "data")]
    assert code(await wire.cmd("NOOP")) == 250
    assert sink.messages == []


async def test_far_over_the_size_limit_is_read_to_the_final_dot_and_refused(small_relay, sink):
    gate, port = small_relay
    wire = await open_data(port)
    await wire.send(SUBJECT + b"".join(b"%076d\r\n" % i for i in range(30_000)) + b".\r\nNOOP\r\n")
    assert await wire.reply() == replies.MESSAGE_TOO_BIG.line()
    assert code(await wire.reply()) == 250
    assert sink.messages == []


@pytest.mark.parametrize("length", [1000, 1001])  # with its CRLF: aiosmtpd's line_length_limit is 1001
async def test_a_line_up_to_the_line_limit_is_relayed(relay, sink, length):
    gate, port = relay
    message = SUBJECT + b"x" * (length - 2) + b"\r\nend\r\n"
    wire = await open_data(port)
    await wire.send(message + b".\r\n")
    assert code(await wire.reply()) == 250
    assert relayed(sink) == message


@pytest.mark.parametrize("length", [1002, 1003, 1004, 70_000])
async def test_a_line_over_the_line_limit_is_refused_after_the_final_dot(relay, sink, log_lines, length):
    gate, port = relay
    wire = await open_data(port)
    await wire.send(SUBJECT + b"x" * (length - 2) + b"\r\nend\r\n")
    assert wire.pending() == b""
    await wire.send(b".\r\n")
    assert await wire.reply() == replies.LINE_TOO_LONG.line()
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert [(e["code"], e["reason"], e["stage"]) for e in rejected] == [(500, "line over 1000 octets", "data")]
    assert code(await wire.cmd("NOOP")) == 250
    assert sink.messages == []


@pytest.mark.parametrize(("length", "reply"), [(1002, replies.MESSAGE_TOO_BIG), (1003, replies.MESSAGE_TOO_BIG),
                                               (1004, replies.LINE_TOO_LONG)])
async def test_a_long_line_across_the_size_limit_gets_the_reply_aiosmtpd_gives(small_relay, sink, length, reply):
    """aiosmtpd reads a line of up to 1001 octets of text whole, counts it, then measures it
    (552 first); a longer one overruns its reader and is refused before it is counted (500)."""
    gate, port = small_relay
    wire = await open_data(port)
    await wire.send(b"x" * (length - 2) + b"\r\n.\r\n")
    assert await wire.reply() == reply.line()
    assert sink.messages == []


async def test_a_5_mb_message_is_relayed_byte_for_byte(relay, sink):
    gate, port = relay
    body = base64.encodebytes(bytes(range(256)) * 15_000).replace(b"\n", b"\r\n")
    lines = body.split(b"\r\n")
    lines[1::997] = [b"." + line for line in lines[1::997]]  # now and then a line that needs stuffing
    message = SUBJECT + b"\r\n".join(lines) + b".\r\n..\r\n"
    assert len(message) > 5_000_000
    wire = await open_data(port)
    await wire.send(dot_stuff(message) + b".\r\nNOOP\r\n")
    assert code(await wire.reply(timeout=60)) == 250
    assert code(await wire.reply()) == 250
    assert relayed(sink) == message


async def test_the_reader_limit_is_raised_only_while_data_is_read(relay, sink):
    """Commands keep aiosmtpd's 1001-octet limit after a message."""
    gate, port = relay
    wire = await open_data(port)
    await wire.send(SUBJECT + b"x" * 5000 + b"\r\n.\r\n")
    assert code(await wire.reply()) == 500
    assert await wire.cmd("NOOP " + "y" * 1100) == "500 5.5.6 Command line too long"
    [server] = gate.registry.sessions
    assert server._reader._limit == server.line_length_limit


async def test_a_client_gone_in_the_middle_of_the_data_is_logged_as_aiosmtpd_logs_it(relay, sink, caplog):
    gate, port = relay
    wire = await open_data(port)
    await wire.send(SUBJECT + b"half a mess")
    with caplog.at_level(logging.INFO, logger="mail.log"):
        await wire.close()
        await wait_until(lambda: not gate.registry.sessions)
    assert "Connection lost during DATA" in [r.getMessage() for r in caplog.records if r.name == "mail.log"]
    await wait_until(lambda: sink.closed_after_data == 1)  # DATA had gone upstream: closed, no dot
    assert sink.received == []


# ---------------------------------------------------------------- aiosmtpd's smtp_DATA beside GlueSMTP's

LINE_LIMIT = 16  # aiosmtpd's line_length_limit, and so its stream reader's limit
SIZE_LIMIT = 80


class Recorder:
    """A DATA hook that keeps what each server handed it."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    async def handle_DATA(self, server, session, envelope):
        self.seen.append((envelope.content, envelope.original_content))
        return "250 Recorded"


class NoHook:
    """No DATA hook at all: aiosmtpd answers 250 OK."""


class OldStyle:
    """The deprecated process_message."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def process_message(self, peer, mail_from, rcpt_tos, content):
        self.seen.append((mail_from, rcpt_tos, content))
        return "250 Processed"


class OldStyleAsync(OldStyle):
    async def process_message(self, peer, mail_from, rcpt_tos, content):
        return super().process_message(peer, mail_from, rcpt_tos, content)


class OldStyleSilent(OldStyle):
    def process_message(self, peer, mail_from, rcpt_tos, content):
        super().process_message(peer, mail_from, rcpt_tos, content)


class StockSMTP(SMTP):
    line_length_limit = LINE_LIMIT


class SmallGlue(GlueSMTP):
    line_length_limit = LINE_LIMIT
    data_read_limit = LINE_LIMIT  # small chunks: every path of the chunked reader is taken


class Servers:
    """Pairs of servers (aiosmtpd's own, GlueSMTP) on an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def start(self, cls, handler, **settings) -> int:
        async def start():
            server = await self.loop.create_server(lambda: cls(handler, hostname="test", **settings), "127.0.0.1", 0)
            self.servers.append(server)
            return server.sockets[0].getsockname()[1]

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def stop(self) -> None:
        async def stop():
            for server in self.servers:
                server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


SETTINGS = {
    "bytes": dict(data_size_limit=SIZE_LIMIT),
    "ascii": dict(data_size_limit=SIZE_LIMIT, decode_data=True),
    "utf8": dict(data_size_limit=SIZE_LIMIT, decode_data=True, enable_SMTPUTF8=True),
    "unlimited": dict(data_size_limit=None),
}


@pytest.fixture(scope="module")
def pairs():
    servers = Servers()
    made = {}
    for name, settings_ in SETTINGS.items():
        made[name] = tuple((servers.start(cls, handler, **settings_), handler)
                           for cls, handler in ((StockSMTP, Recorder()), (SmallGlue, Recorder())))
    yield made
    servers.stop()


def recv_reply(sock: socket.socket, buffer: bytearray) -> str:
    """One whole reply (its lines joined with newlines); "(closed)" when the server hung up."""
    while True:
        start = 0
        while (end := buffer.find(b"\r\n", start)) != -1:
            if buffer[start + 3:start + 4] != b"-":
                reply = bytes(buffer[:end]).decode("utf-8", "replace").replace("\r\n", "\n")
                del buffer[:end + 2]
                return reply
            start = end + 2
        chunk = sock.recv(65536)
        if not chunk:
            return "(closed)"
        buffer += chunk


def converse(port: int, pieces: list[bytes], replies_after: int) -> list[str]:
    """HELO, MAIL, RCPT, DATA, then the pieces one send each; the replies that follow."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray()
        said = [recv_reply(sock, buffer)]
        for command in (b"HELO t\r\n", b"MAIL FROM:<a@b>\r\n", b"RCPT TO:<d@e>\r\n", b"DATA\r\n"):
            sock.sendall(command)
            said.append(recv_reply(sock, buffer))
        for piece in pieces:
            sock.sendall(piece)
        said.extend(recv_reply(sock, buffer) for _ in range(replies_after))
        return said


def both(pairs, name: str, pieces: list[bytes], replies_after: int = 2) -> tuple:
    results = []
    for port, handler in pairs[name]:
        handler.seen.clear()
        said = converse(port, pieces, replies_after)
        results.append((said, list(handler.seen)))
    return tuple(results)


# Text made of what the reader cares about: dots, CRs, LFs, CRLFs, runs around the limits.
TOKENS = st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r", b"\xc3\xa9",
                          b"x" * 13, b"y" * 14, b"z" * 15, b"w" * 16, b"v" * 40])


@st.composite
def sessions(draw):
    data = b"".join(draw(st.lists(TOKENS, max_size=30)))
    if data:
        data += b"\r\n"
    # The first final dot is where the data ends: make it this one.
    assume(b"\r\n.\r\n" not in b"\r\n" + data)
    stream = data + b".\r\nNOOP\r\n"
    cuts = sorted(draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    return draw(st.sampled_from(sorted(SETTINGS))), pieces


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(sessions())
def test_glue_reads_data_as_aiosmtpd_does(pairs, session_):
    name, pieces = session_
    stock, glue = both(pairs, name, pieces)
    assert glue == stock


@pytest.mark.parametrize("data", [
    b"", b"..", b"...", b"\r", b"\r\r", b"\r.", b".\r", b"\n.", b"x\n.", b"\r\n", b"x" * 14,
    b"x" * 15, b"x" * 16, b"x" * 17, b"x" * 18, b"x" * 19, b".x" * 9, b"\r" * 40, b"\n" * 40, b".\r" * 20,
    b"x" * 60 + b"\r\n" + b"y" * 19, b"x" * 70 + b"\r\n" + b"y" * 10, b"a\r\n" * 26, b"a\r\n" * 27,
    b"a\r\n" * 26 + b"b" * 17, b"a\r\n" * 20 + b"b" * 17, b"a\r\n" * 20 + b"b" * 16 + b"\r\n" + b"c" * 20,
    b"x\r\n..y",  # a dot-stuffed line right after a first line of one octet
    b"caf\xc3\xa9 \xff\xfe",  # not UTF-8: "ascii" refuses it, "utf8" keeps the octets as surrogates
])
@pytest.mark.parametrize("split", ["whole", "octets"])
def test_glue_reads_these_as_aiosmtpd_does(pairs, data, split):
    data = data + b"\r\n" if data else data
    stream = data + b".\r\nNOOP\r\n"
    pieces = [stream] if split == "whole" else [stream[i:i + 1] for i in range(len(stream))]
    for name in SETTINGS:
        stock, glue = both(pairs, name, pieces)
        assert glue == stock


def test_the_data_command_refusals_are_aiosmtpd_s():
    servers = Servers()
    try:
        said = []
        for cls in (StockSMTP, SmallGlue):
            port = servers.start(cls, Recorder())
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                buffer = bytearray()
                replies_ = [recv_reply(sock, buffer)]
                for command in (b"DATA\r\n", b"HELO t\r\n", b"DATA\r\n", b"MAIL FROM:<a@b>\r\n", b"DATA\r\n",
                                b"RCPT TO:<d@e>\r\n", b"DATA x\r\n", b"DATA\r\n", b"x\r\n.\r\n"):
                    sock.sendall(command)
                    replies_.append(recv_reply(sock, buffer))
                said.append(replies_)
        assert said[0] == said[1]
        assert said[0][1:] == ["503 Error: send HELO first", "250 test", "503 Error: need RCPT command", "250 OK",
                               "503 Error: need RCPT command", "250 OK", "501 Syntax: DATA",
                               "354 End data with <CR><LF>.<CR><LF>", "250 Recorded"]
    finally:
        servers.stop()


@pytest.mark.parametrize("handler", [NoHook, OldStyle, OldStyleAsync, OldStyleSilent])
@pytest.mark.filterwarnings("ignore:Use handler.handle_DATA:DeprecationWarning")
def test_a_handler_without_a_data_hook_is_answered_as_aiosmtpd_answers(handler):
    servers = Servers()
    try:
        seen = []
        for cls in (StockSMTP, SmallGlue):
            instance = handler()
            port = servers.start(cls, instance)
            said = converse(port, [b"..a\r\nb\r\n.\r\nNOOP\r\n"], 2)
            seen.append((said, getattr(instance, "seen", None)))
        assert seen[0] == seen[1]
        assert seen[0][0][-2] == ("250 Processed" if handler in (OldStyle, OldStyleAsync) else "250 OK")
        assert seen[0][1] in (None, [("a@b", ["d@e"], b".a\r\nb\r\n")])
    finally:
        servers.stop()


def test_process_message_is_deprecated_as_aiosmtpd_says():
    servers = Servers()
    try:
        port = servers.start(SmallGlue, OldStyle())
        with pytest.warns(DeprecationWarning) as caught:
            converse(port, [b"a\r\n.\r\nNOOP\r\n"], 2)
        assert [str(w.message) for w in caught] == ["Use handler.handle_DATA() instead of .process_message()"]
    finally:
        servers.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_auth_required_before_data_is_aiosmtpd_s(caplog):
    servers = Servers()
    caplog.set_level(logging.INFO, logger="mail.log")
    try:
        said = []
        for cls in (StockSMTP, SmallGlue):
            port = servers.start(cls, Recorder(), auth_required=True, auth_require_tls=False)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                buffer = bytearray()
                replies_ = [recv_reply(sock, buffer)]
                for command in (b"HELO t\r\n", b"DATA\r\n"):
                    sock.sendall(command)
                    replies_.append(recv_reply(sock, buffer))
                said.append(replies_)
        assert said[0] == said[1]
        assert said[0][2].startswith("530")
        # aiosmtpd's log names the refused command, for the glue's DATA as for its own.
        logged = [r.getMessage() for r in caplog.records if r.name == "mail.log"]
        assert logged.count("DATA: Authentication required") == 2
    finally:
        servers.stop()


# ---------------------------------------------------------------- read_message_data piece by piece


async def read_in_pieces(pieces: list[bytes], limit: int) -> tuple[bytes, bytes]:
    """(what read_message_data handed on, what it left in the reader) for these pieces."""
    reader = asyncio.StreamReader(limit=limit)
    got: list[bytes] = []
    task = asyncio.ensure_future(read_message_data(reader, lambda piece: got.append(bytes(piece))))
    for piece in pieces:
        reader.feed_data(piece)
        await asyncio.sleep(0)  # the reader runs on what it has
    reader.feed_eof()
    await task
    return b"".join(got), await reader.read()


STREAMS = [
    (b"", b""), (b"x\r\n", b""), (b"\r\n", b""), (b"..\r\n", b""), (b"\r\r\n", b""), (b"\r.\r\n", b""),
    (b".\r\r\n", b""), (b"x\n.\r\ny\r\n", b""), (b"\r\n\r\n..\r\n", b"QUIT\r\n"), (b"a" * 30 + b"\r\n", b"NOOP\r\n"),
    (b"." + b"a" * 30 + b"\r\n", b""), (b"\r" + b"\r" * 30 + b"\r\n", b""), (b"x\r\n\r\n.\r\r\n", b".\r\n"),
]


@pytest.mark.parametrize(("data", "after"), STREAMS)
@pytest.mark.parametrize("limit", [1, 4, 64 * 1024])
async def test_read_message_data_at_every_split(data, after, limit):
    stream = data + b".\r\n" + after
    for cut in range(len(stream) + 1):
        assert await read_in_pieces([stream[:cut], stream[cut:]], limit) == (data, after)
    assert await read_in_pieces([stream[i:i + 1] for i in range(len(stream))], limit) == (data, after)


def aiosmtpd_refusal(data: bytes, size_limit: int | None, line_limit: int) -> str | None:
    """What aiosmtpd's line loop decides, line by line (its stream reader's limit: line_limit)."""
    count, state = 0, None
    for line in data.split(b"\r\n")[:-1]:
        line += b"\r\n"
        if state is None and len(line) - 2 > line_limit:
            state = "500 Line too long (see RFC5321 4.5.3.1.6)"
        count += len(line)
        if state is None and size_limit and count > size_limit:
            state = "552 Error: Too much mail data"
        if state is None and len(line) > line_limit:
            state = "500 Line too long (see RFC5321 4.5.3.1.6)"
    return state


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 30), max_size=12), st.sampled_from([None, 20, 50, 100]))
@example([8, 8, 13], 20)  # exactly the size limit, then a line that overruns the reader: 500, not 552
def test_data_refusal_is_aiosmtpd_s_line_by_line_verdict(lengths, size_limit):
    data = b"".join(b"x" * n + b"\r\n" for n in lengths)
    verdict = aiosmtpd_refusal(data, size_limit, 12)
    assert data_refusal(data, size_limit, 12, 12) == verdict
    if size_limit:
        # Far enough past the size limit, a prefix of the data is enough to decide.
        for end in range(size_limit + 12 + 3, len(data)):
            assert data_refusal(data[:end], size_limit, 12, 12) == verdict


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 30), max_size=12), st.sampled_from([20, 50, 100]), st.integers(1, 40))
def test_data_far_past_the_size_limit_is_dropped_with_the_verdict_kept(lengths, size_limit, piece):
    data = b"".join(b"x" * n + b"\r\n" for n in lengths)
    kept = _MessageData(size_limit, 12, 12)
    for start in range(0, len(data), piece):
        kept.add(data[start:start + piece])
    if len(data) >= size_limit + 12 + 3:
        assert kept.chunks == []  # dropped as soon as the verdict was known
    assert kept.finish()[0] == aiosmtpd_refusal(data, size_limit, 12)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 40), max_size=12), st.sampled_from([None, 20, 50, 100]),
       st.lists(st.integers(0, 300), max_size=8), st.booleans())
def test_data_limits_on_pieces_give_data_refusal_s_verdict(lengths, size_limit, cuts, unterminated):
    """The streamed verdict is the whole data's, however the data is cut, as soon as it is known."""
    data = b"".join(b"x" * n + b"\r\n" for n in lengths) + (b"tail" if unterminated else b"")
    whole = data_refusal(data, size_limit, 12, 16)
    limits = DataLimits(size_limit, 12, 16)
    edges = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in zip(edges, edges[1:]):
        early = limits.add(memoryview(data)[a:b])
        if early is not None:
            assert early == whole  # decided early only when the whole data says the same
    assert limits.finish() == whole
    assert limits.size == len(data)


def test_a_long_line_that_ends_within_the_size_limit_is_refused_as_too_long_whatever_follows():
    """aiosmtpd counts a line, then measures it: a line over the line limit that ends before the
    size limit is refused as too long, even when the lines after it (read in the same chunk)
    pass the size limit; one that itself passes the size limit is too much data."""
    from smtpgate.frontends.smtp.data_verdict import LINE_TOO_LONG, TOO_MUCH_DATA, DataLimits, data_refusal

    data = b"x" * 1500 + b"\r\n" + b"y" * 98 + b"\r\n" + b"z" * 300 + b"\r\n"
    limits = dict(size_limit=1600, line_limit=1001, read_limit=4096)
    assert data_refusal(data, **limits) == LINE_TOO_LONG
    assert data_refusal(b"x" * 1700 + b"\r\n" + b"y" * 10 + b"\r\n", **limits) == TOO_MUCH_DATA
    pieces = DataLimits(**limits)
    pieces.add(data)
    assert pieces.refusal == LINE_TOO_LONG
