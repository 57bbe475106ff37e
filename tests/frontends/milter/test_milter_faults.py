"""The milter front end when something goes wrong or is only watched: the answer Postfix gets.

Each test asserts what the MTA receives (the modification requests, the reply
code, a closed connection) and the event smtpgate logs, over loopback.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct

from smtpgate.config.sections import Limits
from smtpgate.frontends.milter.server import start_milter_listener
from smtpgate.frontends.milter.session import MilterSettings
from smtpgate.frontends.policy import MessagePolicy
from smtpgate.frontends.registry import SessionRegistry
from smtpgate.linking.plan import CoreSettings, Directory
from smtpgate.linking.service import LinkService
from smtpgate.log import _OUTAGES
from smtpgate.runtime.gate import Gate
from smtpgate.store import open_store
from tests.frontends.smtp.test_relay import wait_until
from tests.support.milter import NR_HELO, POSTFIX_ACTIONS, POSTFIX_STEPS, MilterClient, packet, strings
from tests.frontends.milter.test_milter import (  # noqa: F401 - fixtures
    SENDER, STEP1, STEP1_RCPTS, Milter, closed_session, milter, milter_config)

TEMPFAIL_451 = ("REPLYCODE", "451 4.3.0 Temporary failure, try again later")
WATCH_LISTENER = """\
  - name: watch
    kind: milter
    address: 127.0.0.1:0
    mode: observe
"""
INBOUND_WATCH = """\
  - name: inbound
    kind: milter
    address: 127.0.0.1:0
    direction: inbound
    mode: observe
"""
REPLY = (b"From: Client Ltd <client@supplier.example>\r\n"
         b"To: uk-payroll@corp.example, pl-payroll@corp.example\r\nSubject: Re: Invoice 4411\r\n"
         b"In-Reply-To: <step1.101203@corp.example>\r\nMessage-ID: <reply@supplier.example>\r\n\r\nthanks\r\n")


async def _recorded(db, count: int = 1) -> None:
    """Wait until the store has committed ``count`` message records."""
    def rows() -> int:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    async with asyncio.timeout(10):
        while await asyncio.to_thread(rows) < count:
            await asyncio.sleep(0.01)


async def test_an_internal_error_in_the_decision_is_a_temporary_failure(milter_config, start_gate, log_lines,
                                                                       tmp_path):
    gate, port = await start_gate(milter_config())
    m = Milter(gate, port, log_lines)
    await m.step1()
    await _recorded(tmp_path / "smtpgate.db")
    # A thread record the store cannot read back: not a store outage, a fault in smtpgate's hands.
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        conn.execute("UPDATE messages SET mapping = '{not json'")
    actions = await m.send("client@supplier.example", ["uk-payroll@corp.example"], REPLY)
    assert actions == [TEMPFAIL_451]
    [rejected] = m.events("message.rejected")
    assert rejected["code"] == 451 and rejected["reason"] == "internal error"
    # A fault: logged as an error with its traceback and the message's fields.
    assert rejected["level"] == "error" and "Traceback" in rejected["exception"]
    assert (rejected["queue_id"], rejected["mail_from"], rejected["client_ip"]) == (
        "4ABCDE", "client@supplier.example", "192.0.2.7")
    assert [e["message_id"] for e in m.events("message.relayed")] == ["<step1.101203@corp.example>"]


async def test_observe_mode_leaves_an_existing_link_unused(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(listener=WATCH_LISTENER))
    m = Milter(gate, port, log_lines)
    new, _ = await m.step1()
    watch = Milter(gate, gate.bound[1][1], log_lines)
    data = STEP1.replace(b"<step1.101203@", b"<watched@")
    actions = await watch.send(SENDER, STEP1_RCPTS, data)
    assert actions == [("ACCEPT",)]
    [observed] = m.events("message.observed")
    assert observed["message_id"] == "<watched@corp.example>"
    relayed = m.events("message.relayed")[-1]
    assert relayed["message_id"] == "<watched@corp.example>" and relayed["links_reused"] == []
    assert {r["relayed"] for r in relayed["recipients"]} == set(STEP1_RCPTS)
    # Observe mode writes nothing: still the one link step 1 made.
    assert [link.reference for link in (await gate.store.show("101203-T")).links] == [new]


async def test_an_inbound_milter_in_observe_mode_restores_no_tag(milter_config, start_gate, log_lines):
    gate, port = await start_gate(milter_config(listener=INBOUND_WATCH))
    outbound = Milter(gate, port, log_lines)
    new, _ = await outbound.step1()
    inbound = Milter(gate, gate.bound[1][1], log_lines)
    actions = await inbound.send("client@supplier.example", ["uk-payroll@corp.example", "pl-payroll@corp.example"],
                                 REPLY)
    assert actions == [("CONTINUE",), ("CONTINUE",), ("ACCEPT",)]  # RCPT answered, then no change at all
    assert outbound.events("message.retagged") == []
    [observed] = outbound.events("message.observed")
    assert observed["recipients"] == [
        {"original": "uk-payroll@corp.example", "relayed": "uk-payroll+101203-T@corp.example",
         "thread_message_id": "<step1.101203@corp.example>"},
        {"original": "pl-payroll@corp.example", "relayed": f"pl-payroll+{new}@corp.example",
         "thread_message_id": "<step1.101203@corp.example>"}]


async def test_abort_in_the_middle_of_a_message_forgets_it(milter):
    client = await milter.client()
    await client.send(packet(b"M", strings(f"<{SENDER}>")) + packet(b"R", strings("<pl-payroll@corp.example>"))
                      + packet(b"L", strings("From", f" {SENDER}")))
    await client.abort()
    # The next message on the connection knows nothing of the aborted one's recipient.
    actions = await client.message("jane@corp.example", ["client@supplier.example"],
                                   b"From: jane@corp.example\r\nMessage-ID: <after-abort@corp.example>\r\n\r\n")
    await client.quit()
    assert actions == [("ACCEPT",)]
    [relayed] = milter.events("message.relayed")
    assert relayed["recipients"] == [{"original": "client@supplier.example", "relayed": "client@supplier.example"}]
    assert await milter.link("101203-T", "pl-payroll@corp.example") is None


async def _refused_offer(milter, actions: int) -> str:
    client = await MilterClient.open(milter.port)
    await client.send(packet(b"O", struct.pack("!III", 6, actions, 0x1FFFFF)))
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    return milter.events("milter.session.closed")[-1]["reason"]


async def test_an_mta_that_cannot_change_headers_or_add_recipients_is_refused(milter):
    assert "CHGHEADER" in await _refused_offer(milter, POSTFIX_ACTIONS & ~0x10)  # no CHGHDRS
    assert "ADDRCPT" in await _refused_offer(milter, POSTFIX_ACTIONS & ~(0x04 | 0x80))  # neither ADDRCPT
    # ADDRCPT alone (no ADDRCPT_PAR) is enough.
    client = await MilterClient.open(milter.port)
    assert (await client.negotiate(actions=POSTFIX_ACTIONS & ~0x80))[2] & 0x04
    await client.close()


async def test_a_connection_arriving_while_draining_is_closed_unserved(milter):
    milter.gate.registry.draining = True  # a drain has begun; the listener has not closed yet
    try:
        client = await MilterClient.open(milter.port)
        assert await client.closed()
    finally:
        milter.gate.registry.draining = False
    [refused] = milter.events("milter.session.refused")
    assert refused["reason"] == "draining"
    assert milter.events("milter.session.opened") == []


async def test_a_failed_message_record_is_logged_in_the_session_and_the_message_accepted(milter_config, start_gate,
                                                                                        log_lines, tmp_path):
    _OUTAGES.clear()  # the process's outage records: an earlier test's store outage is not this one
    gate, port = await start_gate(milter_config(store_timeout=0.5))
    m = Milter(gate, port, log_lines)
    new, _ = await m.step1()
    await _recorded(tmp_path / "smtpgate.db")
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Message-ID: <unrecorded@corp.example>\r\n\r\nx\r\n")
    # The link exists (read only); another writer holds the store when the record is written.
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", timeout=10, check_same_thread=False)
    await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")
    try:
        actions = await m.send(SENDER, ["pl-payroll@corp.example"], data)
    finally:
        blocker.rollback()
        blocker.close()
    assert actions[-1] == ("ACCEPT",) and ("ADDRCPT_PAR", f"<pl-payroll+{new}@corp.example>",
                                            "ORCPT=rfc822;pl-payroll@corp.example") in actions
    [error] = m.events("store.error")
    assert error["stage"] == "record_message" and error["message_id"] == "<unrecorded@corp.example>"
    assert error["reason"].startswith("StoreError: ") and "locked" in error["reason"]
    [relayed] = [e for e in m.events("message.relayed") if e["message_id"] == "<unrecorded@corp.example>"]
    assert error["session"] == relayed["session"]  # logged where the session logs
    [failed] = [e for e in m.events("component.failed") if e["component"] == "store"]
    assert failed["problem"] == error["reason"].replace("StoreError: ", "store: ", 1)


async def test_a_connections_lines_name_its_peer_its_session_and_a_protocol_violation(milter):
    """milter.session.opened names the MTA's address; a violation inside a message is
    milter.protocol_error with its reason and in_message, then TEMPFAIL and the close; every
    line of one connection carries the same session id."""
    client = await milter.client()
    await client.send(packet(b"M", strings(f"<{SENDER}>")) + packet(b"M", strings(f"<{SENDER}>")))
    assert await client.read() == ("TEMPFAIL",)
    assert await client.closed()
    [opened] = milter.events("milter.session.opened")
    [error] = milter.events("milter.protocol_error")
    [closed] = milter.events("milter.session.closed")
    host, port = client.writer.get_extra_info("sockname")[:2]
    assert opened["peer"] == f"{host}:{port}"
    assert error["reason"] == "MAIL inside a message (no ABORT after the last)" and error["in_message"] is True
    assert closed["reason"] == f"protocol violation: {error['reason']}"
    assert len(opened["session"]) == 16 and int(opened["session"], 16) >= 0
    assert opened["session"] == error["session"] == closed["session"]


async def test_an_mta_that_resets_the_connection_is_a_lost_connection(milter):
    client = await milter.client()
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()  # a TCP reset, as an MTA that crashed
    await wait_until(lambda: milter.events("milter.session.closed"))
    [closed] = milter.events("milter.session.closed")
    assert closed["reason"] == "connection lost: ConnectionResetError"


async def test_an_mta_gone_after_the_drain_closed_its_connection_is_closed_for_the_shutdown(milter_config, log_lines,
                                                                                            tmp_path):
    """The drain closes a connection whose answers the MTA has not read yet; the MTA then goes
    away without reading them, so smtpgate's write of them fails. That end is the shutdown's,
    not a lost connection."""
    path = tmp_path / "milter.sock"
    gate = Gate(milter_config(address=str(path)))
    await gate.start()
    try:
        client = await MilterClient.open(path=str(path))
        await client.negotiate(steps=POSTFIX_STEPS & ~NR_HELO)
        await client.connect()
        client.writer.transport.pause_reading()  # from now on this MTA reads nothing
        # HELO again and again (an SMTP client saying EHLO over and over): each answered CONTINUE,
        # unread, until smtpgate holds answers the socket would not take.
        await client.send(packet(b"H", strings("again.test")) * 10_000)
        [connection] = gate.registry.sessions
        await wait_until(lambda: connection.writer.transport.get_write_buffer_size() > 0)
        await gate.drain(0)
    except BaseException:
        await gate.drain(0)
        raise
    client.writer.transport.abort()  # gone, the answers unread
    await wait_until(lambda: [e for e in log_lines() if e["event"] == "milter.session.closed"])
    [closed] = [e for e in log_lines() if e["event"] == "milter.session.closed"]
    assert closed["reason"] == "shutting down"


class _RecordFault(LinkService):
    """A link service whose record fails in a way it promises never to (a fault in smtpgate's
    own code after the decision): no input from the MTA can make the real one raise."""

    async def record(self, decision, delivered, *, log=None) -> None:
        raise RuntimeError("record broke")


async def test_an_internal_fault_tempfails_the_connection_and_the_listener_serves_on(milter_config, log_lines,
                                                                                   tmp_path):
    store = await open_store(f"sqlite:{tmp_path}/fault.db", base_dir=tmp_path)
    links = _RecordFault(store, Directory(CoreSettings(internal_domains=("corp.example",))), hostname="relay.test")
    settings = MilterSettings(policy=MessagePolicy(links=links, limits=Limits()), listener="milter")
    [listener] = milter_config().listeners
    server = await start_milter_listener(listener, lambda: settings, SessionRegistry())
    try:
        port = server.sockets[0].getsockname()[1]
        m = Milter(None, port, log_lines)
        client = await m.client()
        actions = await client.message("jane@corp.example", ["client@supplier.example"],
                                       b"From: jane@corp.example\r\nMessage-ID: <fault@x>\r\n\r\n")
        assert actions == [("TEMPFAIL",)]  # never an ACCEPT
        assert await client.closed()
        closed = await closed_session(m)
        [error] = m.events("milter.session.error")
        assert error["level"] == "error" and "RuntimeError: record broke" in error["exception"]
        assert error["session"] == closed["session"] and error["client_ip"] == "192.0.2.7"
        assert (closed["reason"], closed["messages"], closed["listener"]) == ("internal error", 1, "milter")
        await client.close()
        # One connection's fault: the next MTA connection is served.
        again = await MilterClient.open(port)
        assert (await again.negotiate())[1] == 6
        await again.close()
    finally:
        server.close()
        await server.wait_closed()
        await store.close()
