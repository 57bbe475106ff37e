"""The upstream pool: a pooled connection is reused only while it is fresh and alive.

The upstream is a sink the test controls (tests/support/sink.py); the client side
is a real smtpgate on loopback.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest

from smtpgate.upstream.client import FRESH_SECONDS, IDLE_SECONDS
from tests.support.sink import Sink, make_test_tls
from tests.frontends.smtp.test_relay import MESSAGE, send_data, session
from tests.frontends.smtp.test_tls_auth import relay_one, upstream_config


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


async def relay_message(port: int) -> str:
    wire = await session(port)
    assert (await wire.cmd("MAIL FROM:<jane@corp.example>")).startswith("250")
    assert (await wire.cmd("RCPT TO:<client@supplier.example>")).startswith("250")
    reply = await send_data(wire, MESSAGE)
    await wire.cmd("QUIT")
    return reply


async def test_a_pooled_connection_the_upstream_dropped_is_replaced(relay, sink, log_lines):
    """Servers drop idle clients (RFC 5321 4.5.3.2.7). Handed out without a NOOP (it was used
    a moment ago), the dropped connection fails at MAIL, which goes out once more on a new
    connection in the same pool slot; the client never notices."""
    gate, port = relay
    assert (await relay_message(port)).startswith("250")
    assert sink.connections == 1 and len(gate.snapshot.pool.idle) == 1
    [pooled] = gate.snapshot.pool.idle
    assert await sink.drop_connections() == 1
    assert (await relay_message(port)).startswith("250")
    assert sink.connections == 2 and len(sink.messages) == 2
    assert "NOOP" not in sink.commands
    assert not events(log_lines, "upstream.error")
    assert gate.snapshot.pool.idle == [pooled] and gate.snapshot.pool.open_connections == 1


@pytest.mark.parametrize("check", ["noop", "mail"])
async def test_a_pooled_connection_dropped_while_idle_is_replaced(relay, sink, log_lines, check):
    """Idle past FRESH_SECONDS the NOOP finds the drop; within it the MAIL does."""
    gate, port = relay
    assert (await relay_message(port)).startswith("250")
    if check == "noop":
        gate.snapshot.pool.idle[0].last_used -= FRESH_SECONDS + 0.5
    assert await sink.drop_connections() == 1
    assert (await relay_message(port)).startswith("250")
    assert sink.connections == 2 and len(sink.messages) == 2
    assert not events(log_lines, "upstream.error")


async def test_the_upstream_is_greeted_with_smtpgates_hostname(relay, sink):
    gate, port = relay
    assert (await relay_message(port)).startswith("250")
    [msg] = sink.messages
    assert msg.helo == "relay.test.example"
    assert {c for c in sink.commands if c.startswith("EHLO")} == {"EHLO relay.test.example"}


async def test_a_connection_that_got_a_garbled_reply_is_closed_without_quit(relay, sink, log_lines):
    """After a reply smtpgate cannot read, a QUIT's answer could be the late one: the
    connection is only closed, not pooled, and the next transaction gets a new one."""
    gate, port = relay
    sink.raw_replies = {"RCPT": b"this is no reply\r\n"}
    wire = await session(port)
    assert (await wire.cmd("MAIL FROM:<jane@corp.example>")).startswith("250")
    assert (await wire.cmd("RCPT TO:<client@supplier.example>")).startswith("451 4.4.2")
    assert (await wire.cmd("RSET")).startswith("250")
    await sink.wait_for(lambda: sink.open_connections == 0, what="the connection closed")
    assert "QUIT" not in sink.commands
    assert gate.snapshot.pool.idle == [] and gate.snapshot.pool.open_connections == 0
    [error] = events(log_lines, "upstream.error")
    assert error["reason"].startswith("RCPT: SMTPResponseException: ")
    sink.raw_replies = {}
    assert (await wire.cmd("MAIL FROM:<jane@corp.example>")).startswith("250")
    await wire.cmd("QUIT")
    assert sink.connections == 2


async def test_a_pooled_connection_idle_too_long_is_closed_unused(relay, sink):
    gate, port = relay
    assert (await relay_message(port)).startswith("250")
    [pooled] = gate.snapshot.pool.idle
    pooled.last_used -= IDLE_SECONDS + 1  # as if it had waited in the pool that long
    noops = sink.commands.count("NOOP")
    assert (await relay_message(port)).startswith("250")
    assert sink.connections == 2
    # Said goodbye to, not checked with NOOP and not used again.
    await sink.wait_for_command("QUIT")
    assert sink.commands.count("NOOP") == noops
    assert len(sink.messages) == 2 and len(gate.snapshot.pool.idle) == 1 and gate.snapshot.pool.idle[0] is not pooled


async def test_a_pooled_connection_used_a_moment_ago_is_reused_without_a_noop(relay, sink):
    gate, port = relay
    for _ in range(2):
        assert (await relay_message(port)).startswith("250")
    assert sink.connections == 1
    assert [c for c in sink.commands if c in ("NOOP", "QUIT")] == []


async def test_a_pooled_connection_idle_a_while_is_checked_with_a_noop(relay, sink):
    gate, port = relay
    assert (await relay_message(port)).startswith("250")
    [pooled] = gate.snapshot.pool.idle
    pooled.last_used -= FRESH_SECONDS + 0.5  # as if it had waited in the pool that long
    assert (await relay_message(port)).startswith("250")
    assert sink.connections == 1
    assert [c for c in sink.commands if c in ("NOOP", "QUIT")] == ["NOOP"]


@pytest.mark.parametrize("change", ["removed", "garbled"])
async def test_a_ca_file_gone_after_start_is_an_upstream_error(tmp_path, start_gate, log_lines, change):
    """The upstream's trust anchor removed or garbled while smtpgate runs: the next connection
    cannot be made, which is the upstream being unreachable (451 4.4.1, upstream.error naming
    the file), not an internal error."""
    context, cafile = make_test_tls(tmp_path / "up")
    ca = tmp_path / "upstream-ca.pem"
    shutil.copy(cafile, ca)
    async with Sink(implicit_tls=context) as up:
        gate, port = await start_gate(await upstream_config(tmp_path, f"smtps://localhost:{up.port}",
                                                            f"  ca_file: {ca}\n"))
        assert (await relay_one(port))[0] == 250
        if change == "removed":
            ca.unlink()
        else:
            ca.write_text("not a certificate\n")
        await up.drop_connections()  # the pooled connection is gone too: the next MAIL connects
        code, text = await relay_one(port)
        assert code == 451 and text.startswith("4.4.1 "), text
        [error] = [e for e in events(log_lines, "upstream.error") if e["stage"] == "connect"]
        assert str(ca) in error["reason"]
        assert not events(log_lines, "session.error")
        assert len(up.messages) == 1


async def refused_mail(port: int) -> str:
    wire = await session(port)
    reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("QUIT")
    return reply


@pytest.mark.parametrize("timeout", [0.5])
async def test_a_connection_made_again_for_mail_that_gets_no_greeting_is_unreachable_within_upstream_timeout(
        tmp_path, start_gate, log_lines, timeout):
    """The pooled connection was dropped and the new one MAIL opens never greets: the
    client's MAIL is answered 451 4.4.1 once upstream.timeout is spent (the one host's
    connect wait, as long, would come later), and the event says which budget ran out."""
    async with Sink() as up:
        gate, port = await start_gate(await upstream_config(tmp_path, f"smtp://127.0.0.1:{up.port}",
                                                            f"  timeout: {timeout}\n"))
        assert gate.snapshot.pool.config.timeouts.connect == timeout
        assert (await relay_message(port)).startswith("250")
        assert await up.drop_connections() == 1
        up.stall = {"greeting"}
        reply = await refused_mail(port)
        assert reply.startswith("451 4.4.1 "), reply
        assert up.connections == 2 and up.stalled == ["greeting"]
        [error] = events(log_lines, "upstream.error")
        assert (error["stage"], error["reason"]) == (
            "connect", f"no upstream connection within upstream.timeout ({timeout:g}s)")


@pytest.mark.parametrize("timeout", [2.0])
async def test_a_connection_made_again_for_mail_has_only_what_is_left_of_the_mail_budget(
        tmp_path, start_gate, log_lines, timeout):
    """The upstream takes the MAIL on the pooled connection and closes it once idle for
    three quarters of upstream.timeout; the new connection never greets. MAIL's budget
    runs out a quarter later, long before the new connection could fail on its own
    (the upstream closes it as idle only after another three quarters)."""
    idle = timeout * 0.75
    async with Sink(timeout=idle) as up:
        gate, port = await start_gate(await upstream_config(tmp_path, f"smtp://127.0.0.1:{up.port}",
                                                            f"  timeout: {timeout}\n"))
        assert (await relay_message(port)).startswith("250")
        up.hold = {"MAIL": asyncio.Event()}  # never answered: closed as idle
        up.stall = {"greeting"}
        reply = await refused_mail(port)
        assert reply.startswith("451 4.4.1 "), reply
        assert up.connections == 2 and up.held == ["MAIL"] and up.stalled == ["greeting"]
        [error] = events(log_lines, "upstream.error")
        assert (error["stage"], error["reason"]) == (
            "connect", f"no upstream connection within upstream.timeout ({timeout:g}s)")
