"""The SQLite store (smtpgate/store/sqlite.py): a read-only store beside a
running one, a failed record batch and what follows it, time stamps under a
local zone other than UTC, and searches shorter than the trigram index."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from smtpgate.store import MessageRecord, StoreError, open_store
from smtpgate.store.base import ActivityQuery
from tests.store.test_store_details import warsaw  # noqa: F401 (a fixture)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
WHEN = datetime(2026, 1, 15, 9, 30, 5, 123456, tzinfo=timezone.utc)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "smtpgate.db"


def message(message_id: str, subject: str = "Payroll") -> MessageRecord:
    return MessageRecord(message_id=message_id, date=None, from_="anna@corp.example", subject=subject,
                         source_reference="1-T", recipients=["client@supplier.example"], mapping={PL: "2-T"},
                         relayed_at=WHEN)


async def still_running(before: set[threading.Thread]) -> list[str]:
    """The threads started since `before` that have not ended after 10 s each."""
    started = [thread for thread in threading.enumerate() if thread not in before]
    for thread in started:
        await asyncio.to_thread(thread.join, 10)
    return [thread.name for thread in started if thread.is_alive()]


async def test_a_read_only_store_sees_commits_still_in_the_write_ahead_log(path):
    service = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        await service.record_activity("1-T", UK)
        await service.record_message(message("<m1@corp.example>"))
        assert path.with_name(path.name + "-wal").exists()  # the service holds the file open
        reader = await open_store(f"sqlite:{path}", base_dir=path.parent, read_only=True)
        try:
            assert [m.message_id for m in (await reader.show("1-T")).messages] == ["<m1@corp.example>"]
        finally:
            await reader.close()
    finally:
        await service.close()


async def test_a_read_only_store_on_a_file_that_is_no_database_names_the_file_and_why(path):
    path.write_bytes(b"not an SQLite file\n" * 100)
    before = set(threading.enumerate())
    with pytest.raises(StoreError) as info:
        await open_store(f"sqlite:{path}", base_dir=path.parent, read_only=True)
    assert str(info.value) == f"sqlite {path}: file is not a database"
    assert await still_running(before) == []


async def test_a_read_only_store_sqlite_cannot_open_names_the_file_and_why(tmp_path):
    # Longer than SQLite's 512-byte limit on a file name, well within the system's.
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200)
    deep.mkdir(parents=True)
    service = await open_store(f"sqlite:{tmp_path / 'smtpgate.db'}", base_dir=tmp_path, auto_upgrade=True)
    await service.close()
    (deep / "smtpgate.db").write_bytes((tmp_path / "smtpgate.db").read_bytes())
    before = set(threading.enumerate())
    with pytest.raises(StoreError) as info:
        await open_store(f"sqlite:{deep / 'smtpgate.db'}", base_dir=tmp_path, read_only=True)
    assert str(info.value) == f"sqlite {deep / 'smtpgate.db'}: unable to open database file"
    assert await still_running(before) == []


async def test_a_store_file_locked_past_the_timeout_is_a_store_error_and_leaves_no_thread_running(path):
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # say, an operator's sqlite3 shell in the middle of a change
    before = set(threading.enumerate())
    try:
        with pytest.raises(StoreError) as info:
            await open_store(f"sqlite:{path}", base_dir=path.parent, auto_upgrade=True, timeout=0.3)
        assert str(info.value) == f"sqlite {path}: database is locked"
    finally:
        blocker.close()
    # A connection's thread left running would keep the process from exiting after the failed start.
    assert await still_running(before) == []


async def test_a_store_file_another_program_reads_past_the_timeout_cannot_switch_to_wal(path):
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("CREATE TABLE kept (x)")
    blocker.execute("BEGIN")
    blocker.execute("SELECT count(*) FROM kept").fetchall()  # a read in progress: WAL mode must wait for it
    try:
        with pytest.raises(StoreError) as info:
            await open_store(f"sqlite:{path}", base_dir=path.parent, auto_upgrade=True, timeout=0.3)
        assert str(info.value) == f"sqlite {path}: database is locked"
    finally:
        blocker.close()
    store = await open_store(f"sqlite:{path}", base_dir=path.parent, auto_upgrade=True, timeout=0.3)
    await store.close()


async def test_a_failed_record_batch_names_the_file_and_the_next_one_commits(path):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        await store.record_activity("1-T", UK)
        with sqlite3.connect(path) as conn:  # another program's trigger refuses one subject
            conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.subject = 'poison'"
                         " BEGIN SELECT RAISE(ABORT, 'refused by the trigger'); END")
        with pytest.raises(StoreError) as failed:
            await store.record_message(message("<bad@corp.example>", "poison"))
        assert str(failed.value) == f"sqlite {path}: refused by the trigger"
        await store.record_message(message("<good@corp.example>"))  # the failed batch was rolled back
        assert [m.message_id for m in (await store.show("1-T")).messages] == ["<good@corp.example>"]
    finally:
        await store.close()


async def test_recording_into_a_closed_store_says_it_is_closed(path):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.record_message(message("<late@corp.example>"))


async def test_time_stamps_are_stored_in_utc_whatever_the_local_zone(path, warsaw):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        await store.record_activity("1-T", UK)
        await store.record_message(message("<m1@corp.example>"))
        assert [m.relayed_at for m in (await store.show("1-T")).messages] == [WHEN]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT relayed_at FROM messages").fetchall() == [("2026-01-15T09:30:05.123456Z",)]


@pytest.mark.parametrize("q", ["7", "Q7", "q7"])
async def test_a_search_shorter_than_three_characters_finds_substrings(path, q):
    store = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        await store.record_activity("1-T", UK)
        await store.record_activity("3-T", UK)
        await store.record_message(message("<m1@corp.example>", "Invoice Q7 2026"))
        rows, _ = await store.list_activities(ActivityQuery(own=(UK,), q=q))
        assert [r.reference for r in rows] == ["1-T"]
        rows, _ = await store.list_activities(ActivityQuery(own=(UK,), q="%"))  # a wildcard is a character
        assert rows == []
    finally:
        await store.close()
