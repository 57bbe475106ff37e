"""Abuse limits over real sockets: connections per client address, idle timeout, bad commands.

Each limit is shown from the client's side (the reply it gets and the closed
connection) and from the other side of the line: a second address still
connects, a relay in flight is not cut, a client below the cap is served.
"""

from __future__ import annotations

import asyncio

from tests.support.wire import Wire, code

BODY = b"Subject: limits\r\nMessage-ID: <limits@corp.example>\r\n\r\nbody\r\n.\r\n"


async def until(predicate, timeout: float = 10) -> None:
    """Wait until predicate() holds (the server's bookkeeping runs on this loop)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_21st_connection_from_one_address_refused_another_address_served(
        sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}"))
    held = []
    for _ in range(20):  # the default limits.max_connections_per_client
        wire, greeting = await Wire.open(port)
        assert code(greeting) == 220
        held.append(wire)
    wire, greeting = await Wire.open(port)
    assert greeting.startswith("421 4.7.0 ")
    assert await wire.reply() == ""  # and closed
    await wire.close()
    # Another address is not held back by the first one's sessions.
    other, greeting = await Wire.open(port, source="127.0.0.2")
    assert code(greeting) == 220
    assert code(await other.cmd("EHLO other.test")) == 250
    await other.close()
    # A session that ends gives its slot back.
    await held.pop().close()
    await until(lambda: gate.registry.per_client["127.0.0.1"] < 20)
    again, greeting = await Wire.open(port)
    assert code(greeting) == 220
    for wire in [again, *held]:
        await wire.close()
    refused = [e for e in log_lines() if e["event"] == "session.refused"]
    assert [e["reason"] for e in refused] == ["limits.max_connections_per_client reached"]
    assert refused[0]["client_ip"] == "127.0.0.1"


async def test_per_client_limit_counts_the_proxy_protocol_address(tmp_path, sink, start_gate, log_lines):
    from smtpgate.config import load_config
    from tests.conftest import write_config

    config = load_config(write_config(tmp_path, f"""\
listeners:
  - name: behind-haproxy
    address: 127.0.0.1:0
    proxy_protocol: true
    relay_networks: [10.0.0.0/8]
upstream:
  url: smtp://127.0.0.1:{sink.port}
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
limits:
  max_connections_per_client: 2
"""))
    gate, port = await start_gate(config)

    async def through_proxy(client: str) -> tuple[Wire, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = Wire(reader, writer)
        await wire.send(f"PROXY TCP4 {client} 10.0.0.1 40000 25\r\n")
        return wire, await wire.reply()

    # Every connection comes from the proxy at 127.0.0.1; the limit applies to each client behind it.
    first, second = [await through_proxy("10.1.1.1") for _ in range(2)]
    assert code(first[1]) == 220 and code(second[1]) == 220
    third = await through_proxy("10.1.1.1")
    assert third[1].startswith("421 4.7.0 ")
    other = await through_proxy("10.2.2.2")
    assert code(other[1]) == 220
    assert code(await other[0].cmd("EHLO other.test")) == 250
    for wire, _ in (first, second, third, other):
        await wire.close()
    [refused] = [e for e in log_lines() if e["event"] == "session.refused"]
    assert refused["client_ip"] == "10.1.1.1"


async def test_idle_client_gets_421_and_is_closed(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  idle_timeout: 0.5\n"))
    wire, greeting = await Wire.open(port)
    assert code(await wire.cmd("EHLO client.test")) == 250
    # Nothing more is sent: the server speaks first, then hangs up.
    assert (await wire.reply()).startswith("421 4.4.2 ")
    assert await wire.reply() == ""
    await wire.close()
    [timeout] = [e for e in log_lines() if e["event"] == "session.timeout"]
    assert timeout["idle_timeout"] == 0.5


async def test_idle_timeout_does_not_cut_a_relay_in_flight(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  idle_timeout: 0.5\n"))
    sink.hold_data = asyncio.Event()
    sender, _ = await Wire.open(port)
    for line in ("EHLO client.test", "MAIL FROM:<a@corp.example>", "RCPT TO:<b@x.example>", "DATA"):
        assert code(await sender.cmd(line)) in (250, 354)
    await sender.send(BODY)
    await sink.wait_for_received(1)  # the upstream holds its answer to the dot
    # A client that connected after the dot, and stays silent, times out first: by then
    # the sender's own idle deadline has passed too.
    idle, _ = await Wire.open(port)
    assert (await idle.reply()).startswith("421 4.4.2 ")
    sink.hold_data.set()
    assert code(await sender.reply()) == 250
    assert len(sink.messages) == 1
    for wire in (sender, idle):
        await wire.close()


async def test_bad_command_cap_closes_with_421(sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}"))
    wire, _ = await Wire.open(port)
    assert code(await wire.cmd("EHLO client.test")) == 250
    bad = ["XYZZY", "MAIL FROM:no-brackets", "RCPT TO:<b@x.example>", "FOO BAR", "VRFY"]
    replies = []
    for i in range(19):
        replies.append(await wire.cmd(bad[i % len(bad)]))
        if i == 9:
            assert code(await wire.cmd("NOOP")) == 250  # good commands do not clear the count
    assert all(500 <= code(r) <= 504 for r in replies), replies
    # aiosmtpd's own cap of five unknown verbs does not cut in first.
    assert sum(1 for r in replies if "not recognized" in r) > 5
    last = await wire.cmd("XYZZY")
    assert code(last) == 500
    assert (await wire.reply()).startswith("421 4.7.0 ")
    assert await wire.reply() == ""
    await wire.close()
    # A fresh session starts from zero.
    fresh, _ = await Wire.open(port)
    assert code(await fresh.cmd("XYZZY")) == 500
    assert code(await fresh.cmd("EHLO client.test")) == 250
    await fresh.close()
    [refused] = [e for e in log_lines() if e["event"] == "session.refused"]
    assert refused["reason"] == "limits.max_bad_commands reached" and refused["bad_commands"] == 20


async def test_connection_over_max_connections_refused_and_every_session_names_its_listener(
        sink, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_connections: 1\n"))
    first, greeting = await Wire.open(port)
    assert code(greeting) == 220
    # From another address: the per-client limit is not what refuses it.
    second, greeting = await Wire.open(port, source="127.0.0.2")
    assert greeting.startswith("421 4.7.0 ")
    assert await second.reply() == ""  # and closed
    clients = {wire.writer.get_extra_info("sockname") for wire in (first, second)}  # (address, port)
    for wire in (first, second):
        await wire.close()
    await until(lambda: len([e for e in log_lines() if e["event"] == "session.closed"]) == 2)
    events = log_lines()
    opened = [e for e in events if e["event"] == "session.opened"]
    assert {(e["peer"], e["port"]) for e in opened} == clients
    [refused] = [e for e in events if e["event"] == "session.refused"]
    assert (refused["reason"], refused["client_ip"]) == ("limits.max_connections reached", "127.0.0.2")
    sessions = [e for e in events if e["event"].startswith("session.")]
    assert len(sessions) == 5 and {e["listener"] for e in sessions} == {"submission"}
