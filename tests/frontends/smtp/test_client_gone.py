"""Clients that vanish: whatever a session holds is given back, at every stage, for a
FIN and for a reset; nothing a client was told is lost (docs/architecture.md, "Who
gives back what")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import struct

import pytest
from prometheus_client import REGISTRY

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.store_helpers import pg_database, pg_store_url  # noqa: F401  (fixtures)
from tests.support.configs import TEAMS_A_B
from tests.support.process import ServeProcess
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_relay import send_data, session, wait_until

CONFIG = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: smtp://127.0.0.1:{sink_port}
  max_connections: 2
limits:
  max_connections: 4
""" + TEAMS_A_B + """\
store:
  url: {store}
  auto_upgrade: true
"""

SENDER = "uk-payroll+101203-T@corp.example"
MESSAGE = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
           b"Subject: gone\r\nMessage-ID: <gone.1@corp.example>\r\n\r\nbody\r\n")


def config(tmp_path, sink, store: str | None = None):
    store = store or f"sqlite:{tmp_path}/smtpgate.db"
    return load_config(write_config(tmp_path, CONFIG.format(sink_port=sink.port, store=store)))


def in_use() -> float:
    return REGISTRY.get_sample_value("smtpgate_upstream_connections_in_use") or 0.0


def probe(port: int, how: str) -> None:
    """Connect and go away at once, before reading the greeting: a FIN or a reset."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def all_given_back(gate, in_use_before: float) -> None:
    """Every session ends and every upstream connection closes, the in-use gauge back where it was."""
    pool = gate.snapshot.pool
    await wait_until(lambda: pool.open_connections == 0 and len(gate.registry) == 0, timeout=5)
    assert in_use() == in_use_before


async def go_away(wire: Wire, how: str) -> None:
    if how == "reset":
        wire.reset()
    else:
        await wire.close()


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_probe_that_leaves_before_the_greeting_holds_no_slot(how, sink, tmp_path, monkeypatch):
    """A load balancer's TCP health check against `smtpgate serve` (on uvloop, where the FIN
    is read before the session's first step): each ends its session at once, so twenty of
    them never make limits.max_connections (4) refuse a real client."""
    monkeypatch.setenv("SMTPGATE_EVENT_LOOP", "uvloop")
    async with ServeProcess(write_config(tmp_path, CONFIG.format(
            sink_port=sink.port, store=f"sqlite:{tmp_path}/smtpgate.db"))) as served:
        port = int(served.ready["listeners"][0].rsplit(":", 1)[1])
        for n in range(1, 21):
            await asyncio.to_thread(probe, port, how)
            await served.wait_event("session.closed", lambda e: len(served.named("session.closed")) >= n, timeout=5)
        assert not served.named("session.refused")
        wire = await session(port)
        assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
        await wire.cmd("QUIT")
        await served.wait_event("session.closed", lambda e: len(served.named("session.closed")) >= 21)
        assert len(served.named("session.opened")) == len(served.named("session.closed")) == 21


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_client_gone_while_mail_waits_gives_the_upstream_connection_back(
        how, sink, tmp_path, start_gate, log_lines):
    gate, port = await start_gate(config(tmp_path, sink))
    before = in_use()
    sink.hold["MAIL"] = held = asyncio.Event()
    for n in range(2):  # upstream.max_connections: 2
        wire = await session(port)
        await wire.send("MAIL FROM:<jane@corp.example>\r\n")
        await sink.wait_for(lambda: len(sink.held) == n + 1, what="MAIL held upstream")
        await go_away(wire, how)
    await all_given_back(gate, before)
    held.set()
    del sink.hold["MAIL"]
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250  # not 451 4.4.5
    await wire.cmd("QUIT")


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_client_gone_while_rcpt_waits_gives_the_upstream_connection_back(
        how, sink, tmp_path, start_gate, log_lines):
    gate, port = await start_gate(config(tmp_path, sink))
    before = in_use()
    sink.hold["RCPT"] = held = asyncio.Event()
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    await wire.send("RCPT TO:<client@supplier.example>\r\n")
    await sink.wait_for(lambda: sink.held == ["RCPT"], what="RCPT held upstream")
    await go_away(wire, how)
    await all_given_back(gate, before)
    held.set()


async def test_a_refusal_of_data_after_the_client_left_is_no_error(sink, tmp_path, start_gate, log_lines, caplog):
    """The client goes while the decision waits for the upstream's answer to DATA; the
    upstream then refuses DATA. The refusal has nobody to go to: the upstream transaction is
    reset, nothing is delivered, and no error is logged (an unretrieved exception would be)."""
    gate, port = await start_gate(config(tmp_path, sink))
    sink.data_command_reply = "554 5.7.1 Not now"
    sink.hold["DATA"] = held = asyncio.Event()
    wire = await session(port)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    # Over 64 KB without the final dot: the header block is read and decided meanwhile.
    await wire.send(MESSAGE + b"".join(b"%078d\r\n" % n for n in range(2000)))
    await sink.wait_for(lambda: sink.held == ["DATA"], what="DATA held upstream")
    wire.reset()
    await wait_until(lambda: len(gate.registry) == 0, timeout=5)
    held.set()
    await sink.wait_for(lambda: sink.commands[-1] == "RSET", what="the upstream transaction reset")
    await wait_until(lambda: not gate.registry.tasks, timeout=5)
    gc.collect()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert sink.received == []


async def test_a_recipient_given_twice_goes_upstream_once(sink, tmp_path, start_gate, log_lines):
    """The same spelling twice, tagged at RCPT: one RCPT upstream, listed once in the log."""
    gate, port = await start_gate(config(tmp_path, sink))
    store = gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "900777-T", "pl-payroll@corp.example",
                                   None)
    wire = await session(port)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")
    [message] = sink.messages
    assert message.rcpt_tos == ["pl-payroll+900777-T@corp.example"]
    assert sum(c.upper().startswith("RCPT") for c in sink.commands) == 1
    [relayed] = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert relayed["recipients"] == [{"original": "pl-payroll@corp.example",
                                      "relayed": "pl-payroll+900777-T@corp.example"}]


async def test_a_link_deleted_after_mail_still_carries_the_message(sink, tmp_path, start_gate, log_lines):
    """The links are read once, at MAIL: the RCPT named the link upstream, and the message
    keeps it though the link is deleted before the final dot (the message is ordered before
    the deletion); no replay. The next message, whose MAIL comes after the deletion, does not
    carry it: that recipient is decided afresh."""
    gate, port = await start_gate(config(tmp_path, sink))
    store = gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "900777-T", "pl-payroll@corp.example",
                                   None)
    wire = await session(port)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert sink.commands[-1].startswith("RCPT TO:<pl-payroll+900777-T@corp.example>")
    assert await store.delete_link("101203-T", "900777-T", by="test")
    assert code(await send_data(wire, MESSAGE)) == 250
    assert sink.messages[0].rcpt_tos == ["pl-payroll+900777-T@corp.example"]
    assert not any(c.upper().startswith("RSET") for c in sink.commands)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")
    [rcpt] = sink.messages[1].rcpt_tos
    assert rcpt.startswith("pl-payroll+") and rcpt != "pl-payroll+900777-T@corp.example"
    assert b"900777-T" not in sink.messages[1].data
    new = rcpt.split("+")[1].split("@")[0]
    assert await store.find_link("101203-T", "pl-payroll@corp.example") == new
    relayed = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert [e["links_reused"] for e in relayed] == [["900777-T"], []]
    assert relayed[1]["links_created"] == [new]


# ---------------------------------------------------------------- PostgreSQL: a store that waits

PG_LIMITS = """\
  timeouts: {{command: 2}}
"""


@contextlib.asynccontextmanager
async def links_locked(url: str):
    """The links table locked by another connection of the test's own database: every
    look-up of the store waits until the block ends."""
    import asyncpg

    admin = await asyncpg.connect(url)
    tx = admin.transaction()
    await tx.start()
    await admin.execute("LOCK TABLE links IN ACCESS EXCLUSIVE MODE")
    try:
        yield admin
    finally:
        await tx.rollback()
        await admin.close()


async def lookup_waiting(admin) -> bool:
    """The store's look-up connection waits for the lock (this database only)."""
    from smtpgate.store.postgres import LOOKUPS_APPLICATION

    return bool(await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = $1 AND wait_event_type = 'Lock'", LOOKUPS_APPLICATION))


async def wait_for_lookup(admin, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not await lookup_waiting(admin):
            await asyncio.sleep(0.02)


@pytest.mark.postgres
async def test_a_client_gone_while_the_mail_time_look_up_runs_leaves_it_running(
        pg_store_url, sink, tmp_path, start_gate, log_lines):
    """The RCPT waiting for the MAIL-time look-up is cancelled with its client; the look-up
    it shares is not: it finishes, and the look-up connection and its memory stay."""
    gate, port = await start_gate(config(tmp_path, sink, store=pg_store_url))
    store = gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "900777-T", "pl-payroll@corp.example",
                                   None)
    connection = store._lookups
    await connection.fetchval("SELECT 1")  # record_link's notification taken in before the look-up
    for _ in range(3):
        await asyncio.sleep(0)
    async with links_locked(pg_store_url) as admin:
        wire = await session(port)
        assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
        await wait_for_lookup(admin)
        await wire.send("RCPT TO:<pl-payroll@corp.example>\r\n")
        await wire.close()  # the RCPT is read, then the FIN
        await wait_until(lambda: len(gate.registry) == 0, timeout=5)
    await wait_until(lambda: "101203-T" in store._links, timeout=5)  # the look-up ran to its end
    assert store._lookups is connection and not connection.is_closed()


@pytest.mark.postgres
async def test_a_link_deleted_by_hand_is_used_within_the_links_memory_window_only(
        pg_store_url, sink, tmp_path, start_gate, log_lines):
    """A hand-made DELETE notifies nobody: the MAIL-time look-up still answers the deleted link
    from memory (for at most LINKS_KEPT_SECONDS, docs/architecture.md) and the message carries
    it, with no second look at the database. The next change smtpgate makes notifies every
    look-up connection: the memory is emptied, and the next message is decided afresh."""
    import asyncpg

    gate, port = await start_gate(config(tmp_path, sink, store=pg_store_url))
    store = gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "900777-T", "pl-payroll@corp.example",
                                   None)
    # record_link's own notification reaches the look-up connection a moment later and
    # empties the memory: a statement on that connection takes it in (PostgreSQL delivers
    # it between transactions), then the links read are remembered.
    await store._lookups.fetchval("SELECT 1")
    for _ in range(3):
        await asyncio.sleep(0)  # the listener callbacks asyncpg scheduled
    assert await store.links_of("101203-T") == {"pl-payroll@corp.example": "900777-T"}
    assert "101203-T" in store._links
    admin = await asyncpg.connect(pg_store_url)
    try:
        await admin.execute("DELETE FROM links WHERE lo = '101203-T' AND hi = '900777-T'")
    finally:
        await admin.close()
    wire = await session(port)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert sink.commands[-1].startswith("RCPT TO:<pl-payroll+900777-T@corp.example>")  # from memory
    assert code(await send_data(wire, MESSAGE)) == 250
    assert sink.messages[0].rcpt_tos == ["pl-payroll+900777-T@corp.example"]
    # A change smtpgate makes (another source's link) notifies: the memory is emptied.
    assert await store.record_link("101204-T", "uk-payroll@corp.example", "900778-T", "pl-payroll@corp.example",
                                   None)
    await store._lookups.fetchval("SELECT 1")
    for _ in range(3):
        await asyncio.sleep(0)
    assert "101203-T" not in store._links
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code(await send_data(wire, MESSAGE)) == 250
    await wire.cmd("QUIT")
    [rcpt] = sink.messages[1].rcpt_tos
    assert rcpt.startswith("pl-payroll+") and rcpt != "pl-payroll+900777-T@corp.example"
    assert b"900777-T" not in sink.messages[1].data


@pytest.mark.postgres
async def test_a_hung_store_costs_a_rcpt_no_more_than_timeouts_command(
        pg_store_url, sink, tmp_path, start_gate, log_lines):
    """The MAIL-time look-up waits for a lock and the upstream holds its RCPT reply: the
    client's RCPT is still answered within upstream.timeouts.command (2 s here), not
    store.timeout plus that."""
    text = CONFIG.format(sink_port=sink.port, store=pg_store_url).replace(
        "  max_connections: 2\n", "  max_connections: 2\n" + PG_LIMITS.format()) + "  timeout: 5\n"
    gate, port = await start_gate(load_config(write_config(tmp_path, text)))
    assert gate.snapshot.pool.config.timeouts.command == 2
    store = gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "900777-T", "pl-payroll@corp.example",
                                   None)
    sink.hold["RCPT"] = held = asyncio.Event()
    async with links_locked(pg_store_url) as admin:
        wire = await session(port)
        assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
        await wait_for_lookup(admin)
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await wire.cmd("RCPT TO:<pl-payroll@corp.example>")
        waited = loop.time() - started
        assert reply.startswith("451 4.4.2")
        assert waited < 2.5
        # Untagged: the tag was not known in time (the end of DATA would decide).
        assert sink.commands[-1].startswith("RCPT TO:<pl-payroll@corp.example>")
        await wire.close()
    held.set()
