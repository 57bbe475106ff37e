"""Message bodies streamed through: decided at the end of the header block, the body
relayed as it arrives, what the upstream cannot take yet spooled to an anonymous file."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.frontends.smtp.stream import SPOOL_MEMORY_OCTETS, BodySpool
from smtpgate.upstream.maildir import _MaildirStream
from tests.conftest import write_config
from tests.support.smtp import send
from tests.support.wire import Wire, code, free_port, strip_trace
from tests.frontends.smtp.test_relay import dot_stuff, send_data, session

SENDER = "uk-payroll+101203-T@corp.example"
RCPTS = ["client@supplier.example", "pl-payroll@corp.example"]

HEAD = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: Client Ltd <client@supplier.example>\r\n"
    b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>\r\n"
    b"Subject: Scanned invoices\r\n"
    b"Message-ID: <scan.101203@corp.example>\r\n"
    b"\r\n"
)


def body(octets: int, *, eight_bit: bool = False) -> bytes:
    """CRLF lines of about `octets` octets, some starting with a period (dot-stuffed on the wire)."""
    lines = []
    size = n = 0
    while size < octets:
        if n % 97 == 0:
            line = b"." * (1 + n % 3) + b" a line that starts with periods"
        elif eight_bit and n % 5 == 0:
            line = "Zażółć gęślą jaźń — naïve café ✓ ".encode() + bytes(range(0x80, 0xA0))
        else:
            line = b"%08d " % n + b"x" * 68
        lines.append(line)
        size += len(line) + 2
        n += 1
    return b"\r\n".join(lines) + b"\r\n"


def spool_fds(folder: Path, pid: int | str = "self") -> list[str]:
    """The files a process holds open in folder (anonymous spool files show as deleted)."""
    found = []
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"{folder}/"):
            found.append(str(fd))
    return found


async def until(predicate, what: str, timeout: float = 20) -> None:
    """Wait for a condition that no event announces (files, descriptors), up to timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def spool(tmp_path) -> Path:
    folder = tmp_path / "spool"
    folder.mkdir()
    return folder


@pytest.fixture
async def gate(sink, config_for, start_gate, log_lines, spool):
    """smtpgate relaying to the sink with its spool in a folder of the test's own."""
    extra = f"limits:\n  spool_dir: {spool}\n  max_header_block: 8192\n"
    return await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", extra))


async def open_transaction(port: int, rcpts=("client@supplier.example",), mail_from="a@corp.example",
                           params: str = "") -> Wire:
    wire = await session(port)
    assert code(await wire.cmd(f"MAIL FROM:<{mail_from}>{params}")) == 250
    for rcpt in rcpts:
        assert code(await wire.cmd(f"RCPT TO:<{rcpt}>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    return wire


async def test_a_bare_lf_deep_in_a_large_body_closes_the_upstream_without_a_dot(gate, sink, spool, log_lines):
    _, port = gate
    message = HEAD + body(3_000_000)
    bad = message[:2_500_000].rfind(b"\r\n")
    message = message[:bad] + b"\n" + message[bad + 2:]  # one bare LF, 2.5 MB in
    wire = await open_transaction(port)
    wire_data = dot_stuff(message) + b".\r\n"
    await wire.send(wire_data[:2_000_000])
    await sink.wait_for(lambda: sink.data_octets > 1_000_000, what="the body on its way upstream")
    await wire.send(wire_data[2_000_000:])
    reply = await wire.reply()
    assert reply.startswith("550 5.5.2"), reply
    await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream connection closed")
    assert sink.received == []  # no final dot reached the upstream
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert [e["code"] for e in rejected] == [550] and "bare_lf" in rejected[0]["reason"]
    # The session goes on: the next message is relayed.
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, HEAD + b"fine\r\n")) == 250
    assert spool_fds(spool) == []


async def test_a_client_gone_mid_body_leaves_the_upstream_without_a_dot(gate, sink, spool, log_lines):
    """The links are committed at the end of the header block; the retry reuses the activity
    the first attempt allocated, so one thread never gets two."""
    _, port = gate
    message = dot_stuff(HEAD + body(3_000_000))
    wire = await open_transaction(port, rcpts=RCPTS, mail_from=SENDER)
    await wire.send(message[:2_000_000])
    await sink.wait_for(lambda: sink.data_octets > 1_000_000, what="the body on its way upstream")
    wire.writer.transport.abort()
    await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream connection closed")
    assert sink.received == []
    await until(lambda: spool_fds(spool) == [], "no spool file")
    [created] = [e for e in log_lines() if e["event"] == "link.created"]
    # The retry is relayed once, to the activity the first attempt allocated.
    wire = await open_transaction(port, rcpts=RCPTS, mail_from=SENDER)
    await wire.send(message + b".\r\n")
    assert code(await wire.reply()) == 250
    [msg] = sink.messages
    assert msg.rcpt_tos == ["client@supplier.example", f"pl-payroll+{created['reference']}@corp.example"]
    assert [e for e in log_lines() if e["event"] == "link.created"] == [created]


async def test_the_upstream_refusing_the_dot_after_a_streamed_body(gate, sink, log_lines):
    _, port = gate
    sink.data_reply = "554 5.7.1 Message content refused"
    wire = await open_transaction(port)
    await wire.send(dot_stuff(HEAD + body(3_000_000)) + b".\r\n")
    reply = await wire.reply()
    assert reply.startswith("554 5.7.1 Message content refused"), reply
    assert len(sink.received) == 1 and sink.messages == []
    sink.data_reply = None
    # The upstream transaction was reset, not closed: the next message goes on the same connection.
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, HEAD + b"fine\r\n")) == 250
    assert sink.connections == 1 and "RSET" in sink.commands
    assert [e["code"] for e in log_lines() if e["event"] == "message.rejected"] == [554]


async def test_the_upstream_closing_mid_stream_gives_451(gate, sink, log_lines):
    _, port = gate
    sink.drop_mid_data = 1_000_000
    wire = await open_transaction(port)
    await wire.send(dot_stuff(HEAD + body(3_000_000)) + b".\r\n")
    reply = await wire.reply()
    assert reply.startswith("451 4.4.2"), reply
    assert sink.received == []
    errors = [e for e in log_lines() if e["event"] == "upstream.error"]
    assert errors and errors[0]["stage"] == "data"


@pytest.mark.parametrize("extra, expected", [(0, 250), (1, 552)])
async def test_a_header_block_over_the_limit_gets_552_and_nothing_is_relayed(gate, sink, log_lines, extra, expected):
    """limits.max_header_block is 8192 here: the header block up to its empty line, included."""
    _, port = gate
    need = 8192 + extra - len(HEAD)
    lines = [b"X-Filler: " + b"f" * 88 + b"\r\n"] * (need // 100 - 1)
    last = need - 100 * len(lines)
    head = b"".join(lines) + b"X-Filler: " + b"f" * (last - 12) + b"\r\n" + HEAD
    assert len(head) == 8192 + extra
    wire = await open_transaction(port)
    await wire.send(dot_stuff(head + body(500_000)) + b".\r\n")
    reply = await wire.reply()
    assert code(reply) == expected, reply
    if expected == 552:
        assert reply.startswith("552 5.3.4")
        assert sink.received == []
        rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
        assert rejected[0]["code"] == 552 and "max_header_block" in rejected[0]["reason"]
    else:
        assert len(sink.messages) == 1


async def test_a_header_block_without_an_end_over_the_limit_gets_552(gate, sink):
    """No empty line: the whole data is the header block."""
    _, port = gate
    head = b"".join(b"X-Field-%05d: value\r\n" % n for n in range(1000))
    wire = await open_transaction(port)
    await wire.send(head + b".\r\n")
    assert (await wire.reply()).startswith("552 5.3.4")
    assert sink.received == []


async def test_8bitmime_and_smtputf8_bodies_are_relayed_byte_for_byte(gate, sink):
    _, port = gate
    head = ("From: Księgowość <księgowość@corp.example>\r\nTo: <klient@dostawca.example>\r\n"
            "Subject: Zeskanowane faktury — łódź\r\nMessage-ID: <utf8.1@corp.example>\r\n\r\n").encode()
    message = head + body(2_000_000, eight_bit=True)
    wire = await open_transaction(port, rcpts=["klient@dostawca.example", "łukasz@dostawca.example"],
                                  mail_from="księgowość@corp.example", params=" SMTPUTF8 BODY=8BITMIME")
    await wire.send(dot_stuff(message) + b".\r\n")
    assert code(await wire.reply()) == 250
    [msg] = sink.messages
    added, relayed = strip_trace(msg.data)
    assert relayed == message
    assert [a.split(b":")[0] for a in added] == [b"Received"]
    assert "SMTPUTF8" in msg.mail_options and "BODY=8BITMIME" in msg.mail_options


async def test_a_streamed_message_that_needed_a_new_upstream_connection(gate, sink, spool):
    """Two spellings of one linked mailbox are tagged at RCPT, so DATA went early; the
    decision merges them, which only a new connection can take. The body waits in the spool
    meanwhile (the new connection's 354 is held) and is relayed whole once it comes."""
    _, port = gate
    first = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=RCPTS, data=HEAD + b"first\r\n")
    assert first.data[0] == 250
    [link] = [r for r in sink.messages[0].rcpt_tos if r.startswith("pl-payroll+")]
    connections = sink.connections
    sink.hold_354 = asyncio.Event()
    message = HEAD + body(2_000_000)
    wire = await open_transaction(port, rcpts=["pl-payroll@corp.example", "PL-Payroll@corp.example"],
                                  mail_from=SENDER)
    await wire.send(dot_stuff(message) + b".\r\n")
    await sink.wait_for(lambda: sink.held_354 == 2, what="DATA on the new connection")
    await until(lambda: spool_fds(spool), "the body in the spool")
    [fd] = spool_fds(spool)
    assert stat.S_IMODE(os.stat(fd).st_mode) == 0o600
    assert os.listdir(spool) == []  # anonymous: no name in the folder
    sink.hold_354.set()
    assert code(await wire.reply()) == 250
    msg = sink.messages[-1]
    assert msg.rcpt_tos == [link]
    assert msg.data.endswith(message[len(HEAD):])
    assert sink.connections == connections + 1
    await sink.wait_for(lambda: sink.closed_after_data == 1, what="the first connection closed without a dot")
    assert spool_fds(spool) == []


OUTCOMES = ["relayed", "dot refused", "bare lf", "client gone", "upstream gone"]


@pytest.mark.parametrize("outcome", OUTCOMES)
async def test_spool_files_are_gone_after_every_outcome(gate, sink, spool, outcome):
    _, port = gate
    sink.hold_354 = asyncio.Event()
    if outcome == "dot refused":
        sink.data_reply = "554 5.7.1 refused"
    if outcome == "upstream gone":
        sink.drop_mid_data = 100_000
    message = dot_stuff(HEAD + body(1_500_000))
    wire = await open_transaction(port)
    await wire.send(message[:1_000_000])
    await until(lambda: spool_fds(spool), "the body in the spool")
    if outcome == "client gone":
        wire.writer.transport.abort()
        await until(lambda: spool_fds(spool) == [], "the spool file closed")
        sink.hold_354.set()
        await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream closed")
        return
    rest = message[1_000_000:]
    if outcome == "bare lf":
        rest = rest[:1000] + b"\n" + rest[1000:]
    await wire.send(rest + b".\r\n")
    if outcome == "bare lf":  # refused as it comes: the spool goes at once
        assert (await wire.reply()).startswith("550 5.5.2")
        assert spool_fds(spool) == []
        sink.hold_354.set()
        await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream closed")
        return
    sink.hold_354.set()
    reply = await wire.reply()
    assert code(reply) == {"relayed": 250, "dot refused": 554, "upstream gone": 451}[outcome], reply
    assert spool_fds(spool) == []



def test_the_spool_holds_up_to_its_memory_limit_again_after_each_drain(tmp_path):
    spool = BodySpool(tmp_path)
    full = b"x" * SPOOL_MEMORY_OCTETS
    for _ in range(2):
        spool.add(full)  # exactly the limit: still in memory
        assert spool.file is None
        assert b"".join(spool.drain()) == full
    spool.add(full)
    spool.add(b"y")  # one octet more: the file
    assert spool.file is not None
    assert b"".join(spool.drain()) == full + b"y"
    assert spool.file is None

async def test_spool_files_are_gone_after_kill_9_and_stale_ones_at_start(tmp_path, sink, spool):
    port = free_port()
    (spool / "smtpgate-spool-stale").write_bytes(b"left by a process killed mid-create")
    config = write_config(tmp_path, f"""\
        listeners:
          - name: submission
            address: 127.0.0.1:{port}
            relay_networks: [127.0.0.0/8]
        upstream:
          url: smtp://127.0.0.1:{sink.port}
        internal_domains: [corp.example]
        store:
          url: sqlite:smtpgate.db
          auto_upgrade: true
        limits:
          spool_dir: {spool}
        """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "smtpgate", "serve", "-c", str(config),
                                                stdout=asyncio.subprocess.PIPE, cwd=str(tmp_path))
    try:
        async with asyncio.timeout(30):
            while b'"smtpgate.ready"' not in (line := await proc.stdout.readline()):
                # at EOF readline returns at once, and the timeout would never fire
                assert line, "smtpgate serve exited before it was ready"
        assert os.listdir(spool) == []  # the stale one was removed at start
        sink.hold_354 = asyncio.Event()
        wire = await open_transaction(port)
        await wire.send(dot_stuff(HEAD + body(1_000_000)))
        await until(lambda: spool_fds(spool, proc.pid), "the body in the spool")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert os.listdir(spool) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if sink.hold_354 is not None:
            sink.hold_354.set()


async def test_the_maildir_upstream_streams_to_its_file(config_for, start_gate, tmp_path, log_lines):
    _, port = await start_gate(config_for(f"maildir:{tmp_path}/outbox"))
    message = HEAD.replace(b"pl-payroll", b"hr") + body(2_000_000, eight_bit=True)
    wire = await open_transaction(port)
    await wire.send(dot_stuff(message) + b".\r\n")
    assert code(await wire.reply()) == 250
    [delivered] = (tmp_path / "outbox" / "new").iterdir()
    assert strip_trace(delivered.read_bytes())[1] == message
    # A message abandoned mid-body leaves nothing in tmp/ and delivers nothing.
    wire = await open_transaction(port)
    await wire.send(dot_stuff(message)[:1_000_000])
    await until(lambda: any((tmp_path / "outbox" / "tmp").iterdir()), "the message being written")
    wire.writer.transport.abort()
    await until(lambda: not any((tmp_path / "outbox" / "tmp").iterdir()), "the partial file removed")
    assert len(list((tmp_path / "outbox" / "new").iterdir())) == 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"x", b"\r"]), max_size=12),
       cuts=st.lists(st.integers(0, 60), max_size=6))
def test_the_maildir_file_gets_the_wire_data_unstuffed_however_it_is_cut(tmp_path_factory, lines, cuts):
    message = b"".join(line + b"\r\n" for line in lines)
    wire = dot_stuff(message)
    stream = _MaildirStream(tmp_path_factory.mktemp("maildir"))
    edges = sorted({0, len(wire), *(c for c in cuts if c <= len(wire))})
    for a, b in zip(edges, edges[1:]):
        stream.write_wire(wire[a:b])
    name = stream.deliver({})
    assert (stream.root / "new" / name).read_bytes() == message


# HEAD with lines that begin with a period: the first line, and one further down.
STUFFED_HEAD = b".X-Scanner: page 1 of 2\r\n" + HEAD.replace(b"Subject:", b".X-Scanner-Job: 4411\r\nSubject:")


def tagged(message: bytes, log_lines) -> bytes:
    """message as the decision relays it: the Cc's team mailbox tagged with the link it made."""
    [created] = [e for e in log_lines() if e["event"] == "link.created"]
    return message.replace(b"pl-payroll@", f"pl-payroll+{created['reference']}@".encode())


def relayed_with_its_received_field_only(sink, message: bytes, log_lines) -> None:
    """The one message the upstream got is ``message`` as tagged, below smtpgate's Received field alone."""
    [msg] = sink.messages
    added, relayed = strip_trace(msg.data)
    assert [a.split(b":")[0] for a in added] == [b"Received"]
    assert relayed == tagged(message, log_lines)


async def test_a_header_block_with_dot_stuffed_lines_is_decided_whole_and_relayed_unstuffed(gate, sink, log_lines):
    """The first line arrives on its own (the reader reads a line that starts with a period
    alone): the header block is decided once its empty line is in, every line without its
    stuffing period. The message has its Message-ID, so only the Received field is added."""
    _, port = gate
    message = STUFFED_HEAD + b"..a body line with periods\r\nend\r\n"
    wire = await open_transaction(port)
    await wire.send(dot_stuff(message) + b".\r\n")
    assert code(await wire.reply()) == 250
    relayed_with_its_received_field_only(sink, message, log_lines)


async def test_a_message_that_is_all_header_block_is_relayed(gate, sink, log_lines):
    """No empty line and no body: the whole data is the header block, decided at the final dot."""
    _, port = gate
    message = HEAD[:-2]  # the header fields without the empty line that would end them
    wire = await open_transaction(port)
    await wire.send(dot_stuff(message) + b".\r\n")
    assert code(await wire.reply()) == 250
    relayed_with_its_received_field_only(sink, message, log_lines)


async def test_the_upstream_gone_between_two_parts_of_the_body_gives_451_at_the_dot(gate, sink, log_lines):
    """The body's first part went upstream, then the upstream went away: the next part finds
    it gone. The client hears 451 4.4.2 once its final dot is in, the refusal is logged once,
    and the session goes on."""
    _, port = gate
    sink.drop_mid_data = 20_000
    wire = await open_transaction(port)
    await wire.send(dot_stuff(HEAD + body(100_000)))
    await sink.wait_for(lambda: sink.closed_after_data == 1, what="the upstream gone mid-body")
    await wire.send(dot_stuff(body(200_000)) + b".\r\n")
    reply = await wire.reply()
    assert reply.startswith("451 4.4.2"), reply
    lost = "DATA: connection lost while the message was sent"
    [rejected] = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert (rejected["code"], rejected["stage"], rejected["reason"]) == (451, "data", lost)
    assert [(e["stage"], e["reason"]) for e in log_lines() if e["event"] == "upstream.error"] == [("data", lost)]
    assert sink.received == []
    sink.drop_mid_data = None
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await send_data(wire, HEAD + b"fine\r\n")) == 250


async def test_stale_spool_files_are_removed_at_start_and_counted(spool, sink, config_for, start_gate, log_lines):
    for n in range(3):
        (spool / f"smtpgate-spool-stale{n}").write_bytes(b"left by a process killed mid-create")
    (spool / "not-a-spool-file").write_bytes(b"kept")
    await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", f"limits:\n  spool_dir: {spool}\n"))
    [cleaned] = [e for e in log_lines() if e["event"] == "spool.cleaned"]
    assert (cleaned["removed"], cleaned["spool_dir"]) == (3, str(spool))
    assert os.listdir(spool) == ["not-a-spool-file"]


def test_a_closed_spool_is_empty_and_holds_its_memory_limit_again(tmp_path):
    spool = BodySpool(tmp_path)
    spool.add(b"x" * SPOOL_MEMORY_OCTETS)
    spool.add(b"y")  # into the file
    spool.close()
    assert (spool.chunks, spool.memory, spool.file) == ([], 0, None)
    full = b"z" * SPOOL_MEMORY_OCTETS
    spool.add(full)  # exactly the limit: in memory again
    assert spool.file is None
    assert b"".join(spool.drain()) == full
