"""The SQLite store's connections (smtpgate/store/sqlite.py): switching a new
file to WAL mode while another program holds its lock, a database SQLite keeps
out of WAL mode, the look-up connection (it never writes; a look-up the
database keeps busy goes to the reader; text that is not UTF-8 is an error
naming the file), and closing while a batch of message records outlasts the
busy timeout."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import struct
import threading
from pathlib import Path

import pytest

from smtpgate.store import MessageRecord, StoreError, open_store
from smtpgate.store.sqlite import SqliteStore
from tests.store.test_sqlite import PL, UK, WHEN, path, still_running  # noqa: F401 (path: a fixture)


def message(message_id: str) -> MessageRecord:
    return MessageRecord(message_id=message_id, date=None, from_="anna@corp.example", subject="Payroll",
                         source_reference="1-T", recipients=["client@supplier.example"], mapping={PL: "2-T"},
                         relayed_at=WHEN)


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another program's write transaction on the (new, empty) file. SQLite calls no
    busy handler for a switch to WAL mode that meets it: the switch fails at once."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def journal_mode(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


async def test_a_new_file_another_program_keeps_locked_is_refused_after_the_busy_timeout(path):
    holder = hold_write_lock(path)
    try:
        with pytest.raises(StoreError) as refused:
            await open_store(f"sqlite:{path}", base_dir=path.parent, timeout=0.3)
        assert str(refused.value) == f"sqlite {path}: database is locked"
    finally:
        holder.close()


async def test_a_new_file_another_program_locks_for_a_moment_is_switched_to_wal_once_free(path):
    holder = hold_write_lock(path)
    # The store meets the lock on its first try (a few milliseconds in) and
    # tries again until the busy timeout; the lock goes long before that.
    release = asyncio.get_running_loop().call_later(0.25, holder.close)
    try:
        store = await open_store(f"sqlite:{path}", base_dir=path.parent, timeout=10)
    finally:
        release.cancel()
        holder.close()
    try:
        await store.record_activity("1-T", UK)
        assert await store.activity_mailbox("1-T") == UK
    finally:
        await store.close()
    assert journal_mode(path) == "wal"


async def test_a_database_sqlite_keeps_out_of_wal_mode_is_refused_and_left_closed():
    store = SqliteStore(Path(":memory:"), None)  # an in-memory database has no WAL mode
    before = set(threading.enumerate())
    with pytest.raises(StoreError) as refused:
        await store.connect()
    assert str(refused.value) == "sqlite :memory:: cannot switch to WAL mode"
    # The connection opened before the refusal is closed: its thread would keep a failed start from exiting.
    assert await still_running(before) == []


async def test_the_look_up_connection_refuses_to_write(path):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        async with store._lookup() as tx:
            with pytest.raises(StoreError) as refused:
                await tx.execute("INSERT INTO activities (reference, mailbox, created_at) VALUES (?, ?, ?)",
                                 "1-T", UK, "2026-01-15T09:30:05.123456Z")
        assert str(refused.value) == "the look-up connection does not write"
        assert await store.activity_mailbox("1-T") is None
    finally:
        await store.close()


async def test_a_look_up_meeting_text_that_is_not_utf8_names_the_file(path):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        with sqlite3.connect(path) as conn:  # another program stored Latin-1 bytes as text
            conn.execute("INSERT INTO activities (reference, mailbox, created_at) VALUES ('1-T', CAST(? AS TEXT), ?)",
                         (b"n\xf3wa@corp.example", "2026-01-15T09:30:05.123456Z"))
        with pytest.raises(StoreError) as failed:
            await store.activity_mailbox("1-T")
        assert str(failed.value).startswith(f"sqlite {path}: Could not decode to UTF-8 column 'mailbox'")
    finally:
        await store.close()


# SQLite's unix VFS: the WAL locks are bytes 120 to 127 of the -shm file, the
# recovery lock the third of them; the -shm file starts with two copies of the
# WAL index header (48 bytes each), which must be equal.
_RECOVER_LOCK = 120 + 2
_HEADER_CHANGE_COUNTER = 8


def recover_elsewhere(shm: int) -> None:
    """What the -shm file looks like while another process recovers the WAL: its
    header copies differ and the recovery lock is taken. An open file description
    lock, so that it also holds against this process's own connections."""
    fcntl.fcntl(shm, fcntl.F_OFD_SETLK, struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, _RECOVER_LOCK, 1, 0))
    byte = os.pread(shm, 1, _HEADER_CHANGE_COUNTER)
    os.pwrite(shm, bytes([byte[0] ^ 0xFF]), _HEADER_CHANGE_COUNTER)


@pytest.mark.skipif(not hasattr(fcntl, "F_OFD_SETLK"), reason="needs open file description locks (Linux)")
async def test_a_look_up_while_another_process_recovers_the_wal_is_answered_after_the_recovery(path):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        await store.record_link("1-T", UK, "2-T", PL, "<m1@corp.example>")
        assert await store.find_link("1-T", PL) == "2-T"
        shm = os.open(f"{path}-shm", os.O_RDWR)
        try:
            recover_elsewhere(shm)
            lookup = asyncio.ensure_future(store.find_link("1-T", PL))
            await asyncio.sleep(0)  # it met the recovery on the event loop and went to the reader
        finally:
            os.close(shm)  # the recovery lock goes with it
        assert await lookup == "2-T"
        assert await store.find_link("1-T", UK) is None
    finally:
        await store.close()


async def test_closing_lets_go_of_a_record_batch_that_outlasts_the_busy_timeout_which_still_commits(path):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent, timeout=0.01)
    try:
        await store.record_activity("1-T", UK)
        with sqlite3.connect(path) as conn:  # another program's trigger takes a while: far more than 10 ms
            conn.execute("CREATE TRIGGER slow AFTER INSERT ON messages BEGIN"
                         " WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500000)"
                         " SELECT count(*) FROM n; END")
        queued = store.queue_message(message("<m1@corp.example>"))
    finally:
        await store.close()
    assert queued.cancelled()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT message_id FROM messages").fetchall() == [("<m1@corp.example>",)]
