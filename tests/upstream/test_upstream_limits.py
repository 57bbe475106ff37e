"""The connection cap and the MAIL budget: smtpgate answers instead of opening more or waiting longer."""

from __future__ import annotations

import asyncio

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.dns import DnsServer
from tests.support.wire import code
from tests.upstream.test_mx import mx_hosts
from tests.frontends.smtp.test_relay import dot_stuff, session, wait_until
from tests.frontends.smtp.test_streaming import HEAD, body

UPSTREAM = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.0/8]
upstream:
{upstream}internal_domains: [corp.example]
{extra}store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


def config(tmp_path, upstream: str, extra: str = ""):
    return load_config(write_config(tmp_path, UPSTREAM.format(upstream=upstream, extra=extra)))


async def test_over_max_connections_mail_gets_451_4_4_5(sink, tmp_path, start_gate, log_lines):
    gate, port = await start_gate(config(tmp_path, f"  url: smtp://127.0.0.1:{sink.port}\n  max_connections: 2\n"))
    first, second, third = [await session(port) for _ in range(3)]
    assert code(await first.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await second.cmd("MAIL FROM:<b@corp.example>")) == 250
    refused = await third.cmd("MAIL FROM:<c@corp.example>")
    assert refused.startswith("451 4.4.5")
    assert sink.connections == 2  # the start-up probe's connection was reused by the first
    [event] = [e for e in log_lines() if e["event"] == "command.refused"]
    assert event["code"] == 451 and "max_connections" in event["reason"]

    # A transaction that ends gives its connection back; the third client's retry uses it.
    assert code(await first.cmd("RSET")) == 250
    await sink.wait_for(lambda: sum(c == "RSET" for c in sink.commands) == 1, what="RSET upstream")
    await wait_until(lambda: gate.snapshot.pool.idle)
    assert code(await third.cmd("MAIL FROM:<c@corp.example>")) == 250
    assert sink.connections == 2
    for wire in (first, second, third):
        await wire.cmd("QUIT")


async def test_mail_budget_stops_trying_mx_hosts(tmp_path, start_gate, log_lines):
    """Hosts that accept and never greet: each gets timeouts.connect, all together upstream.timeout."""
    async with DnsServer() as dns, mx_hosts(["127.0.0.2", "127.0.0.3", "127.0.0.4"]) as (mx_port, sinks):
        for sink in sinks.values():
            sink.stall = {"greeting"}
        dns.add("corp.example", "MX", "10 a.corp.example.", "20 b.corp.example.", "30 c.corp.example.")
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")):
            dns.add(f"{name}.corp.example", "A", address)
        gate, port = await start_gate(config(tmp_path, f"""\
  url: mx:corp.example:{mx_port}
  resolver: {dns.address}
  timeout: 1.5
  timeouts: {{connect: 1}}
"""))
        log_lines()
        for sink in sinks.values():
            sink.reset()
        wire = await session(port)
        reply = await wire.cmd("MAIL FROM:<a@corp.example>")
        assert reply.startswith("451 4.4.1")
        # The start-up probe found a failing (b's turn was cut by the budget), so a now
        # comes last: b took its whole second, c the half second left, a was not tried.
        assert [len(s.stalled) for s in sinks.values()] == [0, 1, 1]
        refused = [e for e in log_lines() if e["event"] == "command.refused"]
        assert "within upstream.timeout (1.5s)" in refused[0]["reason"]


async def test_stalled_rcpt_times_out_at_timeouts_command(sink, tmp_path, start_gate, log_lines):
    gate, port = await start_gate(config(tmp_path, f"""\
  url: smtp://127.0.0.1:{sink.port}
  timeouts: {{command: 0.5}}
"""))
    sink.stall = {"RCPT"}
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    reply = await wire.cmd("RCPT TO:<b@x.example>")
    assert reply.startswith("451 4.4.2")
    errors = [e for e in log_lines() if e["event"] == "upstream.error"]
    assert errors[-1]["reason"] == "RCPT: no reply within 0.5s"
    # The session goes on with a new upstream connection.
    sink.stall = set()
    assert code(await wire.cmd("RSET")) == 250
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    await wire.cmd("QUIT")


async def test_connections_being_opened_count_toward_max_connections(sink, tmp_path, start_gate, log_lines):
    """Two MAILs whose connections are still being opened hold both slots: a third is refused
    at once, and once both are open the cap still counts two."""
    gate, port = await start_gate(config(tmp_path, f"""\
  url: smtp://127.0.0.1:{sink.port}
  max_connections: 2
  pool_size: 0
  timeout: 2
"""))
    await sink.wait_for(lambda: "QUIT" in sink.commands, what="the start-up probe's connection closed")
    greeting = asyncio.Event()
    sink.hold = {"greeting": greeting}
    first, second, third = [await session(port) for _ in range(3)]
    opening = [asyncio.ensure_future(wire.cmd(f"MAIL FROM:<{name}@corp.example>"))
               for wire, name in ((first, "a"), (second, "b"))]
    await sink.wait_for(lambda: len(sink.held) == 2, what="two connections waiting for the greeting")
    assert (await third.cmd("MAIL FROM:<c@corp.example>")).startswith("451 4.4.5")
    greeting.set()
    assert [code(reply) for reply in await asyncio.gather(*opening)] == [250, 250]
    assert (await third.cmd("MAIL FROM:<c@corp.example>")).startswith("451 4.4.5")
    assert gate.snapshot.pool.open_connections == 2 and len(sink.held) == 2
    for wire in (first, second, third):
        await wire.cmd("QUIT")


async def test_a_stalled_data_command_times_out_at_timeouts_data(sink, tmp_path, start_gate, log_lines):
    """DATA waits for the decision (a team mailbox among the recipients), then gets
    upstream.timeouts.data for its 354, not timeouts.command."""
    gate, port = await start_gate(config(tmp_path, f"""\
  url: smtp://127.0.0.1:{sink.port}
  timeouts: {{command: 3, data: 0.5}}
""", extra="mailboxes:\n  - address: pl-payroll@corp.example\n    team: Team B (Poland)\n"))
    sink.stall = {"DATA"}
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(HEAD + b"body\r\n") + b".\r\n")
    reply = await wire.reply()
    assert reply.startswith("451 4.4.2"), reply
    assert sink.stalled == ["DATA"]
    [error] = [e for e in log_lines() if e["event"] == "upstream.error"]
    assert (error["stage"], error["reason"]) == ("data", "DATA: no reply within 0.5s")
    [rejected] = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert (rejected["code"], rejected["reason"]) == (451, "DATA: no reply within 0.5s")
    await wire.cmd("QUIT")


async def test_an_upstream_that_stops_reading_the_body_times_out_at_timeouts_data(
        sink, tmp_path, start_gate, log_lines):
    """The upstream answers DATA with 354 and reads nothing more: once its window and
    smtpgate's buffers are full, smtpgate waits upstream.timeouts.data for room, then
    closes the connection; the client hears 451 4.4.2 after its dot."""
    gate, port = await start_gate(config(tmp_path, f"""\
  url: smtp://127.0.0.1:{sink.port}
  timeouts: {{data: 0.5}}
"""))
    sink.stall = {"body"}
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(HEAD + body(6_000_000)) + b".\r\n")  # more than the kernel buffers hold
    reply = await wire.reply()
    assert reply.startswith("451 4.4.2"), reply
    assert sink.stalled == ["body"] and sink.received == []
    [error] = [e for e in log_lines() if e["event"] == "upstream.error"]
    assert (error["stage"], error["reason"]) == ("data", "DATA: no reply within 0.5s")
    [rejected] = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert (rejected["code"], rejected["reason"]) == (451, "DATA: no reply within 0.5s")
    await wire.cmd("QUIT")
