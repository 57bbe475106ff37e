"""The connection cap and the MAIL budget: smtpgate answers instead of opening more or waiting longer."""

from __future__ import annotations

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.dns import DnsServer
from tests.support.wire import code
from tests.upstream.test_mx import mx_hosts
from tests.frontends.smtp.test_relay import session, wait_until

UPSTREAM = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.0/8]
upstream:
{upstream}internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


def config(tmp_path, upstream: str):
    return load_config(write_config(tmp_path, UPSTREAM.format(upstream=upstream)))


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
