"""The PostgreSQL store on its own: the links it remembers and the notifications that keep
them honest, its look-up connection, and how long it waits for a server that does not answer.
Other nodes and hand-made changes are real second connections to the same database."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smtpgate.store import AllocationContext, LinkTarget, MessageRecord, StoreError, open_store
from smtpgate.store.allocation import LocalAllocator
from smtpgate.store.postgres import LINKS_CHANNEL, LOOKUPS_APPLICATION, RECORDS_APPLICATION
from tests.store_helpers import pg_database, pg_store_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.postgres

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
DE = "de-hr@corp.example"


async def opened(url: str, tmp_path: Path, timeout: float = 30.0):
    return await open_store(url, base_dir=tmp_path, allocator=LocalAllocator(900000), timeout=timeout)


async def backends(admin, application: str) -> set[int]:
    """The server processes of this test's database with that application_name."""
    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1"
                             " AND datname = current_database()", application)
    return {r["pid"] for r in rows}


async def waiting_for_a_lock(admin, pid: int, timeout: float = 20) -> None:
    """Until the server process pid waits for a lock."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await admin.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) != "Lock":
        assert asyncio.get_running_loop().time() < deadline, f"{pid} never waited for a lock"
        await asyncio.sleep(0.02)


async def background_done(timeout: float = 10) -> None:
    """Until whatever was started in the background (here: by the store) has run its course."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=timeout)


async def heard_its_own_writes(store) -> None:
    """A look-up on the store's own connection: the notifications of its commits so far
    arrive before its answer (the server sends them before it is ready for the next query)."""
    await store.find_link("0-T", PL)


class Ear:
    """A connection listening on the store's channel, as every other node's is, and on a
    channel of its own: a mark sent there after a commit arrives after that commit's
    notifications (PostgreSQL delivers them in commit order)."""

    MARK = "test_mark"

    def __init__(self, conn, sender) -> None:
        self.conn = conn
        self.sender = sender
        self.heard: asyncio.Queue[str] = asyncio.Queue()

    @classmethod
    async def open(cls, url: str) -> Ear:
        import asyncpg

        ear = cls(await asyncpg.connect(url), await asyncpg.connect(url))
        for channel in (LINKS_CHANNEL, cls.MARK):
            await ear.conn.add_listener(channel, lambda _c, _p, channel, _payload: ear.heard.put_nowait(channel))
        return ear

    async def notifications_so_far(self) -> int:
        """How many link notifications were heard since the last call."""
        await self.sender.execute(f"NOTIFY {self.MARK}")
        count = 0
        while (channel := await asyncio.wait_for(self.heard.get(), 20)) != self.MARK:
            count += channel == LINKS_CHANNEL
        return count

    async def close(self) -> None:
        await self.conn.close()
        await self.sender.close()


def record(n: int) -> MessageRecord:
    return MessageRecord(
        message_id=f"<m{n}@corp.example>", date=None, from_="anna@corp.example", subject=f"Invoice {n}",
        source_reference="101203-T", recipients=["client@supplier.example"], mapping={PL: "5512-C"},
        relayed_at=datetime.now(timezone.utc) - timedelta(days=30))


# --------------------------------------------------------------------------- remembered links


async def test_a_write_that_changes_no_link_keeps_the_links_remembered(pg_store_url, tmp_path):  # noqa: F811
    """Sign-in sessions and pruned records are writes, but no link or owner changes:
    what links_of remembers stands (a hand-made DELETE, which notifies nobody, shows it)."""
    import asyncpg

    store = await opened(pg_store_url, tmp_path)
    admin = await asyncpg.connect(pg_store_url)
    try:
        assert await store.record_link("101203-T", UK, "5512-C", PL, None)
        await heard_its_own_writes(store)
        assert await store.links_of("101203-T") == {PL: "5512-C"}
        await admin.execute("DELETE FROM links")
        await store.create_session("s1", "Team B", "token", datetime.now(timezone.utc) + timedelta(hours=1))
        await store.end_session("s1")
        await store.record_message(record(1))
        assert await store.prune_messages(7) == 1
        assert await store.links_of("101203-T") == {PL: "5512-C"}
        await store.record_link("101203-T", UK, "77-A", DE, None)  # a link written: forgotten at once
        assert await store.links_of("101203-T") == {DE: "77-A"}
    finally:
        await admin.close()
        await store.close()


async def test_only_a_write_of_links_or_owners_notifies_the_other_nodes(pg_store_url, tmp_path):  # noqa: F811
    store = await opened(pg_store_url, tmp_path)
    ear = await Ear.open(pg_store_url)
    try:
        await store.create_session("s1", "Team B", "token", datetime.now(timezone.utc) + timedelta(hours=1))
        await store.end_session("s1")
        await store.record_message(record(1))
        await store.prune_messages(7)
        assert await ear.notifications_so_far() == 0
        assert await store.record_link("101203-T", UK, "5512-C", PL, None)
        assert await ear.notifications_so_far() == 1
        await store.record_activity("77-A", DE)
        assert await ear.notifications_so_far() == 1
        assert await store.delete_link("101203-T", "5512-C", by="admin")
        assert await ear.notifications_so_far() == 1
    finally:
        await ear.close()
        await store.close()


async def test_a_links_answer_read_while_another_node_changed_them_is_not_remembered(
        pg_store_url, tmp_path):  # noqa: F811
    """A look-up that read the links before another node's commit, and ends after that
    commit's notification, answers what it saw then: the next look-up reads again.
    (A value too long for its row is stored out of line: rebuilding that storage's index
    holds the look-up there, after it took its snapshot, until the rebuild ends.)"""
    import os

    import asyncpg

    url = pg_store_url
    other = await opened(url, tmp_path)  # another node
    admin = await asyncpg.connect(url)
    others = await backends(admin, LOOKUPS_APPLICATION)
    store = await opened(url, tmp_path)
    rebuild = await asyncpg.connect(url)
    try:
        [mine] = await backends(admin, LOOKUPS_APPLICATION) - others
        long = os.urandom(1200).hex() + "@corp.example"  # stored out of line
        assert await other.record_link("101203-T", UK, "77-A", long, None)
        assert await other.add_link("5512-C", "101203-T", UK, by="admin")  # 5512-C: owner unknown
        storage = await admin.fetchval("SELECT reltoastrelid::regclass::text FROM pg_class"
                                       " WHERE oid = 'activities'::regclass")
        await rebuild.execute(f"BEGIN; REINDEX TABLE {storage}")
        stale = asyncio.create_task(store.links_of("101203-T"))
        await waiting_for_a_lock(admin, mine)
        await other.record_activity("5512-C", UK)  # committed, and notified
        await rebuild.execute("ROLLBACK")
        assert await stale == {long: "77-A"}  # what it saw: the owner was not known yet
        assert await store.links_of("101203-T") == {long: "77-A", UK: "5512-C"}
    finally:
        await rebuild.close()
        await admin.close()
        await other.close()
        await store.close()


async def test_an_answer_cut_short_by_a_limit_is_not_remembered(pg_store_url, tmp_path):  # noqa: F811
    store = await opened(pg_store_url, tmp_path)
    try:
        assert await store.record_link("101203-T", UK, "5512-C", PL, None)
        assert await store.record_link("101203-T", UK, "77-A", DE, None)
        await heard_its_own_writes(store)
        assert await store.links_of("101203-T", limit=1) is None  # more links than that
        assert await store.links_of("101203-T") == {PL: "5512-C", DE: "77-A"}
    finally:
        await store.close()


# --------------------------------------------------------------------------- the look-up connection


async def test_a_busy_look_up_connection_is_not_replaced(pg_store_url, tmp_path):  # noqa: F811
    """Look-ups beyond the one its connection serves go to the read pool; the connection
    stays, and so does what it remembers (a hand-made DELETE, which notifies nobody, shows it)."""
    import asyncpg

    store = await opened(pg_store_url, tmp_path)
    admin = await asyncpg.connect(pg_store_url)
    try:
        assert await store.record_link("101203-T", UK, "5512-C", PL, None)
        await heard_its_own_writes(store)
        [first] = await backends(admin, LOOKUPS_APPLICATION)
        assert await asyncio.gather(*(store.find_link("101203-T", PL) for _ in range(10))) == ["5512-C"] * 10
        await background_done()
        assert await backends(admin, LOOKUPS_APPLICATION) == {first}
        assert await store.links_of("101203-T") == {PL: "5512-C"}
        await admin.execute("DELETE FROM links")
        assert await store.links_of("101203-T") == {PL: "5512-C"}
    finally:
        await admin.close()
        await store.close()


# --------------------------------------------------------------------------- a server that does not answer


async def hold_tables(url: str, tables: str):
    """Another connection holding tables against every reader and writer; returns its release."""
    import asyncpg

    conn = await asyncpg.connect(url)
    await conn.execute(f"BEGIN; LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")

    async def release() -> None:
        await conn.execute("ROLLBACK")
        await conn.close()

    return release


async def test_reads_and_writes_held_by_a_lock_fail_within_the_store_timeout(pg_store_url, tmp_path):  # noqa: F811
    store = await opened(pg_store_url, tmp_path, timeout=0.5)
    try:
        release = await hold_tables(pg_store_url, "links, activities")
        try:
            with pytest.raises(StoreError):  # the read pool
                await asyncio.wait_for(store.list_links(), 10)
            with pytest.raises(StoreError):  # the write pool
                await asyncio.wait_for(store.delete_link("101203-T", "5512-C", by="admin"), 10)
        finally:
            await release()
        assert await store.list_links() == []
        assert await store.record_link("101203-T", UK, "5512-C", PL, None)
    finally:
        await store.close()


async def test_a_batch_of_records_that_timed_out_keeps_its_connection(pg_store_url, tmp_path):  # noqa: F811
    """The batch fails to its callers and is not written; the next batch goes in on the same
    connection (the server ended the timed-out statement before it was used again)."""
    import asyncpg

    store = await opened(pg_store_url, tmp_path, timeout=0.5)
    admin = await asyncpg.connect(pg_store_url)
    try:
        await store.record_message(record(0))
        kept = await backends(admin, RECORDS_APPLICATION)
        release = await hold_tables(pg_store_url, "messages")
        try:
            with pytest.raises(StoreError):
                await asyncio.wait_for(store.record_message(record(1)), 10)
        finally:
            await release()
        await store.record_message(record(2))
        assert await backends(admin, RECORDS_APPLICATION) == kept
        written = {r[0] for r in await admin.fetch("SELECT message_id FROM messages")}
        assert written == {"<m0@corp.example>", "<m2@corp.example>"}
    finally:
        await admin.close()
        await store.close()


class Allocation:
    """A loopback HTTP allocator that answers only when released."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request):
        from aiohttp import web

        self.asked.set()
        await self.release.wait()
        return web.json_response({"reference": "900000-T"})


@pytest.fixture
async def allocation():
    from aiohttp import web

    service = Allocation()
    app = web.Application()
    app.router.add_post("/api/linked-activities", service.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    service.url = f"http://{host}:{port}/api/linked-activities"
    yield service
    service.release.set()
    await runner.cleanup()


async def test_closing_waits_at_most_the_timeout_for_a_transaction_in_progress(
        pg_store_url, tmp_path, allocation):  # noqa: F811
    """A link creation waiting for a slow allocator holds a write connection: closing the
    store ends it after the store's timeout, and the link is not written."""
    from smtpgate.store.allocation import HttpAllocator
    from smtpgate.store.postgres import PostgresStore

    await (await opened(pg_store_url, tmp_path)).close()  # the schema
    allocator = HttpAllocator(allocation.url, None, timeout=60, matcher=str.isascii)
    store = PostgresStore(pg_store_url, allocator, timeout=0.5)
    await store.connect()
    creating = asyncio.create_task(store.get_or_create_link(
        "101203-T", UK, LinkTarget(PL, "Team B", "{n}-T", True), AllocationContext(None, None, None)))
    try:
        await asyncio.wait_for(allocation.asked.wait(), 20)
        await asyncio.wait_for(store.close(), 10)  # not the allocator's 60 s
        allocation.release.set()
        with pytest.raises(StoreError):
            await asyncio.wait_for(creating, 20)
    finally:
        creating.cancel()
        await store.close()
    check = await opened(pg_store_url, tmp_path)
    try:
        assert await check.list_links() == []
    finally:
        await check.close()


# --------------------------------------------------------------------------- the activities list


async def test_a_whole_message_id_stored_exactly_few_times_finds_only_its_messages(
        pg_store_url, tmp_path):  # noqa: F811
    """The search starts from the Message-ID's own messages while the planner expects at
    most listing.FEW of them (here exactly that many, its statistics up to date): a
    message whose subject merely quotes the Message-ID is not found."""
    import asyncpg

    from smtpgate.store.base import ActivityQuery
    from smtpgate.store.listing import FEW

    store = await opened(pg_store_url, tmp_path)
    admin = await asyncpg.connect(pg_store_url)

    def sent(message_id: str, source: str, subject: str) -> MessageRecord:
        return MessageRecord(message_id=message_id, date=None, from_="anna@corp.example", subject=subject,
                             source_reference=source, recipients=[], mapping={},
                             relayed_at=datetime.now(timezone.utc))

    try:
        await store.record_activity("1-T", UK)
        await store.record_activity("2-T", UK)
        await asyncio.gather(store.record_message(sent("<dup@corp.example>", "1-T", "Invoice")),
                             *(store.record_message(sent("<dup@corp.example>", f"{n}-S", "Invoice"))
                               for n in range(1, FEW)))
        await store.record_message(sent("<m2@corp.example>", "2-T", "Re: <dup@corp.example>"))
        await admin.execute("ANALYZE messages")
        rows, _ = await store.list_activities(ActivityQuery(own=(UK,), q="<dup@corp.example>"))
        assert [r.reference for r in rows] == ["1-T"]
    finally:
        await admin.close()
        await store.close()
