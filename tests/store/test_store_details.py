"""The stores' finer points:
the owners a store remembers, the bounds of links_of, the rows list_links gives,
an owner that a repeated link fills in, record_message without the
linger, the UTC helpers in a zone other than UTC, and a link another node
makes while get-or-create waits for the lock of its (source, mailbox) pair."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smtpgate.store import AllocationContext, LinkOutcome, LinkTarget, MessageRecord, StoreError, open_store
from smtpgate.store import sql as sql_module
from smtpgate.store.allocation import LocalAllocator
from smtpgate.store.base import as_utc, iso_utc, utcnow
from tests.store_helpers import pg_database, pg_store_url, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
DE = "de-payroll@corp.example"
CTX = AllocationContext(subject=None, from_=None, message_id="<m1@corp.example>")


@pytest.fixture
async def store(store_url: str, tmp_path: Path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    yield s
    await s.close()


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    path = tmp_path / "db" / "smtpgate.db"
    path.parent.mkdir()
    return path


def set_owner_behind_the_store(path: Path, reference: str, mailbox: str) -> None:
    """Another process rewriting an owner (which smtpgate itself never does)."""
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE activities SET mailbox = ? WHERE reference = ?", (mailbox, reference))


async def owner_in_database(path: Path, reference: str) -> str | None:
    fresh = await open_store(f"sqlite:{path}", base_dir=path.parent)
    try:
        return await fresh.activity_mailbox(reference)
    finally:
        await fresh.close()


async def test_an_owner_once_read_is_answered_without_reading_again(sqlite_path):
    store = await open_store(f"sqlite:{sqlite_path}", base_dir=sqlite_path.parent)
    try:
        await store.record_activity("1-T", UK)
        await store.add_link("2-T", "1-T", UK, by="test")  # 2-T is known, without an owner
        assert await store.activity_mailbox("1-T") == UK
        assert await store.activity_mailbox("2-T") is None
        set_owner_behind_the_store(sqlite_path, "1-T", DE)
        set_owner_behind_the_store(sqlite_path, "2-T", DE)
        assert await owner_in_database(sqlite_path, "1-T") == DE
        assert await store.activity_mailbox("1-T") == UK  # remembered
        assert await store.activity_mailbox("2-T") == DE  # "no owner" is never remembered
    finally:
        await store.close()


async def test_the_remembered_owners_are_bounded_and_the_least_recently_asked_goes(sqlite_path, monkeypatch):
    monkeypatch.setattr(sql_module, "_KNOWN_OWNERS", 2)
    store = await open_store(f"sqlite:{sqlite_path}", base_dir=sqlite_path.parent)
    try:
        for reference in ("1-T", "2-T", "3-T"):
            await store.record_activity(reference, UK)
        assert await store.activity_mailbox("1-T") == UK
        assert await store.activity_mailbox("2-T") == UK
        assert await store.activity_mailbox("1-T") == UK  # asked again: 2-T is now the oldest
        assert await store.activity_mailbox("3-T") == UK  # a third: 2-T is forgotten
        for reference in ("1-T", "2-T", "3-T"):
            set_owner_behind_the_store(sqlite_path, reference, DE)
        assert await store.activity_mailbox("3-T") == UK
        assert await store.activity_mailbox("1-T") == UK
        assert await store.activity_mailbox("2-T") == DE
    finally:
        await store.close()


async def test_recording_a_known_owner_takes_no_write_lock(sqlite_path):
    url = f"sqlite:{sqlite_path}"
    store = await open_store(url, base_dir=sqlite_path.parent, timeout=0.5)
    other = sqlite3.connect(sqlite_path, isolation_level=None)
    try:
        await store.record_activity("1-T", UK)
        assert await store.activity_mailbox("1-T") == UK
        other.execute("BEGIN IMMEDIATE")  # another writer holds the file
        await store.record_activity("1-T", UK)  # returns at once, not after the lock timeout
        await store.record_activity("1-T", DE)  # the first owner is kept
        with pytest.raises(StoreError):
            await store.record_activity("2-T", UK)  # a write: it waits, then fails
        other.execute("ROLLBACK")
        assert await owner_in_database(sqlite_path, "1-T") == UK
    finally:
        other.close()
        await store.close()


async def test_links_of_answers_up_to_its_limit_and_none_beyond(store):
    await store.record_link("1-T", UK, "2-T", PL, None)
    await store.record_link("1-T", UK, "3-T", DE, None)
    assert await store.links_of("1-T", limit=2) == {PL: "2-T", DE: "3-T"}
    assert await store.links_of("1-T", limit=1) is None
    assert await store.links_of("2-T", limit=1) == {UK: "1-T"}


async def test_list_links_gives_both_owners_the_time_and_the_message_id(store):
    await store.record_link("1-T", UK, "2-T", PL, "<m1@corp.example>")
    await store.add_link("3-T", "4-T", DE, by="test")
    rows = await store.list_links()
    assert [(r.source_reference, r.source_mailbox, r.target_reference, r.target_mailbox, r.message_id)
            for r in rows] == [("1-T", UK, "2-T", PL, "<m1@corp.example>"), ("3-T", None, "4-T", DE, None)]
    assert all(isinstance(r.created_at, datetime) and r.created_at.tzinfo is not None for r in rows)
    assert [r.target_reference for r in await store.list_links(mailbox=DE)] == ["4-T"]


async def test_a_repeated_link_fills_in_the_owner_the_first_one_lacked(store):
    await store.add_link("1-T", "2-T", PL, by="test")  # 1-T: no owner yet
    assert await store.activity_mailbox("1-T") is None
    # The same link, from the other side, now naming 1-T's owner: not new, but the owner is recorded.
    assert await store.record_link("2-T", PL, "1-T", UK, None) is False
    assert await store.activity_mailbox("1-T") == UK


async def test_record_message_never_waits_for_the_linger(store_url, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(sql_module, "RECORD_LINGER", 3600.0)  # a record nobody waits for waits an hour
    store = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    try:
        record = MessageRecord(message_id="<m1@corp.example>", date=None, from_=None, subject=None,
                               source_reference="1-T", recipients=["client@supplier.example"],
                               mapping={PL: "2-T"}, relayed_at=utcnow())
        queued = store.queue_message(dataclasses.replace(record, message_id="<m0@corp.example>"))
        await asyncio.wait_for(store.record_message(record), 20)  # the caller waits: no linger
        assert queued.done()  # queued before it: in the same commit
        assert [m.message_id for m in (await store.show("1-T")).messages] == ["<m0@corp.example>", "<m1@corp.example>"]
    finally:
        await store.close()


@pytest.fixture
def warsaw(monkeypatch):
    """The process's local time zone is not UTC (UTC+1 in winter, +2 in summer)."""
    monkeypatch.setenv("TZ", "Europe/Warsaw")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_utc_helpers_answer_utc_whatever_the_local_zone(warsaw):
    assert utcnow().tzinfo is timezone.utc
    assert abs(utcnow() - datetime.now(timezone.utc)) < timedelta(minutes=1)
    plus_two = timezone(timedelta(hours=2))
    assert as_utc(datetime(2026, 6, 1, 12, 0, tzinfo=plus_two)) == datetime(2026, 6, 1, 10, 0, tzinfo=timezone.utc)
    assert as_utc(datetime(2026, 6, 1, 12, 0, tzinfo=plus_two)).tzinfo is timezone.utc
    naive = as_utc(datetime(2026, 6, 1, 12, 0))  # naive: taken to be UTC, not local time
    assert naive.tzinfo is timezone.utc and naive.hour == 12
    assert iso_utc(datetime(2026, 11, 27, 18, 0, 5, 999, tzinfo=timezone(timedelta(hours=1)))) == "2026-11-27T17:00:05Z"
    assert iso_utc(datetime(2026, 11, 27, 17, 0)) == "2026-11-27T17:00:00Z"


async def test_the_export_gives_each_activity_its_creation_time(store):
    before = utcnow()
    await store.record_link("1-T", UK, "2-T", PL, None)
    activities, links = await store.export()
    assert [(a.reference, a.mailbox) for a in activities] == [("1-T", UK), ("2-T", PL)]
    assert all(before - timedelta(seconds=1) <= a.created_at <= utcnow() for a in activities)
    assert [(link.source_reference, link.target_reference) for link in links] == [("1-T", "2-T")]


async def waiting_for_an_advisory_lock_or_done(conn, task: asyncio.Task, timeout: float = 20.0) -> None:
    """Until a session of this database waits for an advisory lock (read from pg_locks), or task is done."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        if await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
        ):
            return
        assert loop.time() < deadline, "nobody waited for the lock"
        await asyncio.sleep(0.01)


@pytest.mark.postgres
async def test_a_link_another_node_makes_while_get_or_create_waits_for_the_pair_is_the_answer(
        pg_store_url, tmp_path):  # noqa: F811
    """Get-or-create finds no link, then waits for the lock of (source, mailbox), which another
    writer holds; a link of that pair committed meanwhile (a second node) is what it answers, reused."""
    import asyncpg

    one = await open_store(pg_store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    two = await open_store(pg_store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    holder = await asyncpg.connect(pg_store_url)
    try:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                             sql_module.link_lock_key("101203-T", PL))
        pl = LinkTarget(PL, "Team B", "{n}-T", True)
        task = asyncio.create_task(one.get_or_create_link("101203-T", UK, pl, CTX))
        await waiting_for_an_advisory_lock_or_done(holder, task)
        assert await two.record_link("101203-T", UK, "5512-C", PL, "<m0@corp.example>") is True
        await held.rollback()
        assert await task == LinkOutcome("5512-C", created=False)
        assert [(r.source_reference, r.target_reference) for r in await one.list_links()] == [("101203-T", "5512-C")]
        assert await one.activity_mailbox("900000-T") is None  # no number was used
    finally:
        await holder.close()
        await one.close()
        await two.close()
