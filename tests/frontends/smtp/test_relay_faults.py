"""Faults during a relay: the upstream refusing the replay, a bug inside smtpgate, a store that
fails after delivery. Whatever breaks, the client gets a clear answer and nothing is lost.

Everything runs over loopback against a real smtpgate and a sink the test controls.
"""

from __future__ import annotations

import asyncio
import sqlite3

import aiosmtplib
import pytest

from smtpgate.config import load_config
from smtpgate.runtime.gate import Gate, Snapshot
from smtpgate.store import StoreError
from smtpgate.store.allocation import LocalAllocator
from smtpgate.store.sqlite import SqliteStore
from smtpgate.upstream.client import UpstreamPool
from smtpgate.upstream.maildir import MaildirSession
from smtpgate.upstream.session import Verdict
from smtpgate.users import Users
from tests.conftest import BASE_CONFIG, write_config
from tests.support.sink import client_tls_context
from tests.frontends.smtp.test_relay import MESSAGE, dot_stuff, send_data, session
from tests.store.test_store import eventually
from tests.frontends.smtp.test_tls_auth import config_with_listener

TAGGED = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: Team B <pl-payroll@corp.example>\r\n"
    b"Subject: faults\r\n"
    b"Message-ID: <faults@corp.example>\r\n"
    b"\r\n"
    b"body\r\n"
)


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


# ---------------------------------------------------------------- the replay refused


@pytest.mark.parametrize("refusal", ["451 4.3.2 Try again later", "550 5.7.1 Sender refused"])
async def test_a_refused_mail_on_replay_gives_451_and_no_dot(relay, sink, log_lines, refusal):
    """The rewritten envelope is smtpgate's own doing, so any refusal of its
    replay is temporary for the client; no final dot; the retry reuses the link made first."""
    gate, port = relay
    wire = await session(port)
    assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code_of(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    sink.mail_reply = refusal  # accepted once; refused when smtpgate replays MAIL after RSET
    assert (await send_data(wire, TAGGED)).startswith("451 4.3.0 ")
    [rejected] = events(log_lines, "message.rejected")
    assert rejected["code"] == 451 and f"replay MAIL: {refusal}" in rejected["reason"]
    assert sink.received == [] and "DATA" not in sink.commands
    # That upstream connection is in an unknown state: closed, never pooled.
    await sink.wait_for_command("QUIT")
    assert gate.snapshot.pool.idle == []
    [created] = [e for e in log_lines() if e["event"] == "link.created"]

    sink.mail_reply = None
    assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code_of(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
    assert code_of(await send_data(wire, TAGGED)) == 250
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["links_reused"] == [created["reference"]] and relayed["links_created"] == []
    assert sink.messages[0].rcpt_tos == [f"pl-payroll+{created['reference']}@corp.example"]
    await wire.cmd("QUIT")


def code_of(reply: str) -> int:
    return int(reply[:3])


# ---------------------------------------------------------------- a bug inside smtpgate


class FaultyStore(SqliteStore):
    """A real SQLite store with a bug: asked for a link, it raises what no store may raise."""

    async def get_or_create_link(self, *args, **kwargs):
        raise KeyError("a bug in the store")


async def opened(store_class, path, config):
    """A store of ``store_class`` (a real SQLite store, one method made to fail or wait) at ``path``, upgraded."""
    store = store_class(path, LocalAllocator(config.allocator.first_number))
    await store.connect()
    await store.upgrade()
    return store


async def test_an_internal_error_at_the_dot_is_451_logged_and_resets_the_upstream(sink, config_for, log_lines,
                                                                                 tmp_path):
    """STYLE: an internal fault is temporary (451 4.3.0), never aiosmtpd's 500; it is logged with
    its traceback, the upstream transaction is reset, and the session goes on."""
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    store = await opened(FaultyStore, tmp_path / "faulty.db", config)
    gate = Gate(config, store=store)
    await gate.start()
    try:
        port = gate.bound[0][1]
        wire = await session(port)
        assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
        assert code_of(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
        assert await send_data(wire, TAGGED) == "451 4.3.0 Temporary failure, try again later"
        [rejected] = events(log_lines, "message.rejected")
        assert rejected["code"] == 451 and rejected["reason"] == "internal error"
        assert "KeyError: 'a bug in the store'" in rejected["exception"]
        assert "DATA" not in sink.commands
        assert sink.commands[-1] == "RSET"
        # A message that needs no link still goes through on the same session.
        assert code_of(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
        assert code_of(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
        assert code_of(await send_data(wire, MESSAGE)) == 250
        await wire.cmd("QUIT")
    finally:
        await gate.drain(0)


class FaultyStoreTelling(FaultyStore):
    """FaultyStore that says when it is asked (and about to raise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked = asyncio.Event()

    async def get_or_create_link(self, *args, **kwargs):
        self.asked.set()
        return await super().get_or_create_link(*args, **kwargs)


async def test_an_internal_error_while_the_body_arrives_is_logged_once_with_its_traceback(sink, config_for,
                                                                                        log_lines, tmp_path):
    """The header block is decided while the body still arrives (over 64 KB of it, no dot yet);
    the decision's fault is logged when it happens, with its traceback, and the client hears
    451 4.3.0 once its final dot is in."""
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    store = await opened(FaultyStoreTelling, tmp_path / "faulty.db", config)
    gate = Gate(config, store=store)
    await gate.start()
    try:
        wire = await session(gate.bound[0][1])
        assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
        assert code_of(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
        assert code_of(await wire.cmd("DATA")) == 354
        await wire.send(dot_stuff(TAGGED + b"".join(b"%078d\r\n" % n for n in range(2000))))
        async with asyncio.timeout(10):
            await store.asked.wait()
        await wire.send(b".\r\n")
        assert await wire.reply() == "451 4.3.0 Temporary failure, try again later"
        [rejected] = events(log_lines, "message.rejected")
        assert (rejected["code"], rejected["reason"], rejected["stage"]) == (451, "internal error", "data")
        assert "KeyError: 'a bug in the store'" in rejected["exception"]
        assert "mail_from" not in rejected  # a fault: the client's details, not the message's
        assert "DATA" not in sink.commands and sink.received == []
        assert code_of(await wire.cmd("NOOP")) == 250
        await wire.cmd("QUIT")
    finally:
        await gate.drain(0)


class DotBug(MaildirSession):
    """A Maildir upstream session with a bug: the final dot raises what no session may raise."""

    async def end_data(self, last: bytes = b"") -> Verdict:
        raise RuntimeError("a bug in the upstream session")


class DotBugPool(UpstreamPool):
    async def acquire(self, *, check: bool = False):
        plain = await super().acquire(check=check)
        return DotBug(root=plain.root, label=plain.label)


async def test_an_internal_error_at_the_final_dot_is_451_logged_and_nothing_is_delivered(config_for, start_gate,
                                                                                      log_lines, tmp_path):
    outbox = tmp_path / "outbox"
    gate, port = await start_gate(config_for(f"maildir:{outbox}"))
    # New connections take the current snapshot: one whose upstream sessions have the bug.
    now = gate.snapshot
    gate.snapshot = Snapshot(now.config, DotBugPool(now.config.upstream, local_hostname=now.config.hostname),
                             now.links, now.users)
    wire = await session(port)
    assert code_of(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code_of(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert await send_data(wire, MESSAGE) == "451 4.3.0 Temporary failure, try again later"
    [rejected] = events(log_lines, "message.rejected")
    assert (rejected["code"], rejected["reason"], rejected["stage"]) == (451, "internal error", "data")
    assert "RuntimeError: a bug in the upstream session" in rejected["exception"]
    assert "mail_from" not in rejected
    assert not events(log_lines, "message.relayed")
    # The message being written was given up: nothing delivered, nothing left in tmp/.
    assert list((outbox / "new").iterdir()) == [] and list((outbox / "tmp").iterdir()) == []
    assert code_of(await wire.cmd("NOOP")) == 250
    await wire.cmd("QUIT")


class LinksOfFails(SqliteStore):
    """A real SQLite store whose one-read look-up of a sender's links fails, as a store that
    has just gone away would; every other look-up works."""

    async def links_of(self, source_reference: str, limit: int = 100):
        raise StoreError("the store went away")


async def test_a_store_failing_at_mail_is_not_asked_again_at_rcpt(sink, config_for, log_lines, tmp_path):
    """The look-up at MAIL failed: the RCPTs relay untagged without asking a failing store
    again (each would wait for it), and the end of DATA decides: a replay, and the tag."""
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    store = await opened(LinksOfFails, tmp_path / "links-of.db", config)
    made = await store.record_link("101203-T", "uk-payroll@corp.example", "5512-C", "pl-payroll@corp.example", None)
    assert made
    gate = Gate(config, store=store)
    await gate.start()
    try:
        wire = await session(gate.bound[0][1])
        assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
        assert code_of(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
        assert "RCPT TO:<pl-payroll@corp.example>" in sink.commands  # untagged at RCPT
        assert code_of(await send_data(wire, TAGGED)) == 250
        await wire.cmd("QUIT")
        assert "RSET" in sink.commands
        assert sink.messages[0].rcpt_tos == ["pl-payroll+5512-C@corp.example"]
    finally:
        await gate.drain(0)


class LinksOfHeld(SqliteStore):
    """A real SQLite store whose one-read look-up of a sender's links answers only once the
    test lets it, as a store busy with other work would."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer = asyncio.Event()

    async def links_of(self, source_reference: str, limit: int = 100):
        await self.answer.wait()
        return await super().links_of(source_reference, limit)


async def test_a_tag_late_at_rcpt_is_logged_with_the_wait_and_the_end_of_data_tags(sink, log_lines, tmp_path):
    """The look-up at MAIL is not back: the RCPT waits a quarter of upstream.timeouts.command,
    goes upstream untagged, and the end of DATA decides (a replay, and the tag)."""
    text = BASE_CONFIG.format(upstream=f"smtp://127.0.0.1:{sink.port}", store=f"sqlite:{tmp_path}/smtpgate.db")
    config = load_config(write_config(tmp_path, text.replace("  timeout: 10\n",
                                                               "  timeout: 10\n  timeouts:\n    command: 1\n")))
    store = await opened(LinksOfHeld, tmp_path / "held.db", config)
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "5512-C", "pl-payroll@corp.example", None)
    gate = Gate(config, store=store)
    await gate.start()
    try:
        wire = await session(gate.bound[0][1])
        assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
        assert code_of(await wire.cmd("RCPT TO:<pl-payroll@corp.example>")) == 250
        [late] = events(log_lines, "rcpt.tag_late")
        assert (late["recipient"], late["waited_s"]) == ("pl-payroll@corp.example", 0.25)
        assert "RCPT TO:<pl-payroll@corp.example>" in sink.commands  # untagged at RCPT
        store.answer.set()
        assert code_of(await send_data(wire, TAGGED)) == 250
        await wire.cmd("QUIT")
        assert "RSET" in sink.commands
        assert sink.messages[0].rcpt_tos == ["pl-payroll+5512-C@corp.example"]
    finally:
        store.answer.set()
        await gate.drain(0)


class BrokenUsers(Users):
    """A users table with a bug: checking a password raises."""

    def verify(self, name: str, password: str) -> bool:
        raise RuntimeError("a bug in the users table")


async def test_an_internal_error_in_a_command_is_451_and_logged(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "optional"))
    # New connections take the current snapshot: one whose users table has the bug.
    now = gate.snapshot
    gate.snapshot = Snapshot(now.config, now.pool, now.links, BrokenUsers({}))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                             tls_context=client_tls_context(str(tmp_path / "tls" / "test-cert.pem")))
    await client.connect()
    try:
        await client.ehlo()
        await client.starttls()
        await client.ehlo()
        reply = await client.execute_command(b"AUTH", b"PLAIN", b"AGphbmUAczNjcmV0IHBhc3M=")
        assert (reply.code, reply.message) == (451, "4.3.0 Temporary failure, try again later")
        [error] = events(log_lines, "session.error")
        assert error["reason"] == "RuntimeError" and "a bug in the users table" in error["exception"]
        assert "s3cret" not in str(log_lines())
        assert (await client.noop()).code == 250  # the session goes on
    finally:
        await client.quit()


# ---------------------------------------------------------------- the store after delivery


async def test_a_failed_message_record_is_logged_and_the_client_still_gets_250(sink, config_for, start_gate,
                                                                               log_lines, tmp_path):
    """The message record is written after the upstream's 250; if that write fails, the
    message was still delivered, so the client hears 250 (without waiting for the record)
    and store.error is logged when the write fails."""
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    config = config.model_copy(update={"store": config.store.model_copy(update={"timeout": 0.3})})
    gate, port = await start_gate(config)
    wire = await session(port)
    message = TAGGED.replace(b"Team B <pl-payroll@corp.example>", b"client@supplier.example")
    assert code_of(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    assert code_of(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    sink.hold_data = asyncio.Event()
    assert code_of(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(message) + b".\r\n")
    await sink.wait_for_received(1)
    # The message is upstream, its answer held; now another writer takes the store's lock.
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        sink.hold_data.set()
        assert code_of(await wire.reply()) == 250
        async def failed() -> bool:
            return bool(events(log_lines, "store.error"))

        await eventually(failed, what="store.error")
    finally:
        blocker.rollback()
        blocker.close()
    [error] = events(log_lines, "store.error")
    assert error["stage"] == "record_message" and error["message_id"] == "<faults@corp.example>"
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["message_id"] == "<faults@corp.example>"
    assert error["session"] == relayed["session"]  # logged where the session logs
    assert not events(log_lines, "message.rejected")
    assert await gate.store.find_thread(["<faults@corp.example>"]) is None
    assert len(sink.messages) == 1
    await wire.cmd("QUIT")
