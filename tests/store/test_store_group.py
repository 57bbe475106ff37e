"""Group commit of message records, and look-ups that never wait behind writes,
on SQLite and PostgreSQL. Another writer holding the database (or a table) is
a real second connection, as another smtpgate process or node would be."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

import pytest

from smtpgate.store import AllocationContext, LinkOutcome, LinkTarget, MessageRecord, StoreError, open_store
from smtpgate.store.allocation import LocalAllocator
from smtpgate.store.group import GroupCommit
from tests.store_helpers import pg_database, pg_store_url, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
CTX = AllocationContext(subject=None, from_=None, message_id=None)


def record(n: int, source: str = "101203-T") -> MessageRecord:
    return MessageRecord(
        message_id=f"<m{n}@corp.example>",
        date=None,
        from_="anna@corp.example",
        subject=f"Invoice {n}",
        source_reference=source,
        recipients=["client@supplier.example", "pl-payroll+900000-T@corp.example"],
        mapping={PL: "900000-T"},
        relayed_at=datetime.now(timezone.utc),
    )


async def opened(url: str, tmp_path: Path, timeout: float = 30.0):
    return await open_store(url, base_dir=tmp_path, allocator=LocalAllocator(900000), timeout=timeout)


async def hold_writes(url: str, tables: str = "messages"):
    """Another connection that keeps writers of `tables` waiting (readers go on);
    returns a release function. SQLite has one write lock for the whole file."""
    if url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(url[len("sqlite:") :], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")

        async def release() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        return release
    import asyncpg

    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    # EXCLUSIVE blocks INSERTs and leaves SELECTs alone.
    await conn.execute(f"LOCK TABLE {tables} IN EXCLUSIVE MODE")

    async def release() -> None:
        await tx.rollback()
        await conn.close()

    return release


async def writers_waiting(url: str, count: int, timeout: float = 20) -> None:
    """Until count connections of the database wait for a lock (PostgreSQL; SQLite's
    waiting writer sits in its busy handler, which no other connection can see)."""
    if url.startswith("sqlite:"):
        return
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'")
            if waiting >= count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{waiting} of {count} writers waiting"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def recorded_ids(url: str, tmp_path: Path, reference: str = "101203-T") -> set[str]:
    """The message ids another connection sees for the activity: what is committed."""
    other = await opened(url, tmp_path)
    try:
        view = await other.show(reference)
        return {m.message_id for m in view.messages} if view else set()
    finally:
        await other.close()


async def test_concurrent_records_are_all_committed_in_fewer_transactions(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    try:
        await asyncio.gather(*(store.record_message(record(n)) for n in range(200)))
        # Each call returned after its commit: a second connection sees every record.
        assert await recorded_ids(store_url, tmp_path) == {f"<m{n}@corp.example>" for n in range(200)}
        assert store.records.items == 200
        assert store.records.batches < 200
        view = await store.show("900000-T")  # the mapping's activity is indexed too
        assert len(view.messages) == 200
    finally:
        await store.close()


async def test_a_record_repeated_within_one_batch_is_stored_once(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    try:
        await asyncio.gather(*(store.record_message(record(1)) for _ in range(5)),
                             store.record_message(record(2)))
        view = await store.show("101203-T")
        assert sorted(m.message_id for m in view.messages) == ["<m1@corp.example>", "<m2@corp.example>"]
    finally:
        await store.close()


async def test_a_failing_batch_is_reported_to_each_caller(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path, timeout=0.5)
    try:
        await store.record_message(record(0))  # schema and connections ready
        release = await hold_writes(store_url)
        try:
            outcomes = await asyncio.gather(*(store.record_message(record(n)) for n in range(1, 11)),
                                            return_exceptions=True)
        finally:
            await release()
        assert all(isinstance(o, StoreError) for o in outcomes), outcomes
        assert len({id(o) for o in outcomes}) == 10  # each caller its own exception
        # Nothing of the failed batch was written, and the next batch goes through.
        await store.record_message(record(11))
        assert await recorded_ids(store_url, tmp_path) == {"<m0@corp.example>", "<m11@corp.example>"}
    finally:
        await store.close()


async def test_a_cancelled_caller_still_gets_its_record_written(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    try:
        await store.record_message(record(0))
        release = await hold_writes(store_url)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(store.record_message(record(1)), 0.3)
        finally:
            await release()
        await store.records.close()
        assert await recorded_ids(store_url, tmp_path) == {"<m0@corp.example>", "<m1@corp.example>"}
    finally:
        await store.close()


async def test_closing_the_store_writes_the_records_still_queued(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    await store.record_message(record(0))
    release = await hold_writes(store_url)
    callers = [asyncio.create_task(store.record_message(record(n))) for n in range(1, 6)]
    await asyncio.sleep(0)  # let them queue their records
    await release()
    await store.close()  # the way a drain ends: queued records go in first
    await asyncio.gather(*callers)
    assert await recorded_ids(store_url, tmp_path) == {f"<m{n}@corp.example>" for n in range(6)}


async def test_a_lookup_answers_while_writers_wait(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    target = LinkTarget(PL, "Team B", "{n}-T", True)
    try:
        existing = await store.get_or_create_link("5512-C", None, target, CTX)
        release = await hold_writes(store_url, "links, activities, allocator_sequence, messages")
        try:
            # More waiting writers than a pool has connections: link creations and records.
            creators = [asyncio.create_task(store.get_or_create_link(f"{n}-T", UK, target, CTX))
                        for n in range(1, 16)]
            recorders = [asyncio.create_task(store.record_message(record(n))) for n in range(5)]
            await writers_waiting(store_url, 10)  # as many as a pool of connections holds
            reused = await asyncio.wait_for(store.get_or_create_link("5512-C", None, target, CTX), 5)
            assert reused == LinkOutcome(existing.reference, created=False)
            assert not any(t.done() for t in creators + recorders)
        finally:
            await release()
        created = await asyncio.gather(*creators)
        await asyncio.gather(*recorders)
        assert all(o.created for o in created)
        assert len({o.reference for o in created}) == 15
    finally:
        await store.close()


async def test_a_known_explicit_link_is_answered_while_writers_wait(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    try:
        assert await store.record_link("101203-T", UK, "5512-C", PL, "<m1@x>") is True
        release = await hold_writes(store_url, "links, activities")
        try:
            # A reply-all naming both tags again writes nothing, so waits for nobody.
            again = await asyncio.wait_for(store.record_link("101203-T", UK, "5512-C", PL, "<m2@x>"), 5)
            assert again is False
            # A new fact (an owner the store did not know) still needs the write.
            learning = asyncio.create_task(store.record_link("5512-C", PL, "77-A", UK, "<m3@x>"))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(learning), 0.3)
        finally:
            await release()
        assert await learning is True
        assert await store.activity_mailbox("77-A") == UK
    finally:
        await store.close()


async def test_an_owner_another_node_records_later_is_seen(store_url, tmp_path):  # noqa: F811
    one = await opened(store_url, tmp_path)
    two = await opened(store_url, tmp_path)
    try:
        await one.record_link("101203-T", None, "5512-C", PL, None)
        assert await one.activity_mailbox("101203-T") is None
        await two.record_activity("101203-T", UK)
        # An activity without an owner is asked again, so the other node's answer counts.
        assert await one.activity_mailbox("101203-T") == UK
        await one.record_activity("101203-T", PL)  # a known owner stays
        assert await two.activity_mailbox("101203-T") == UK
        assert await one.activity_mailbox("5512-C") == PL
    finally:
        await one.close()
        await two.close()



async def test_a_thread_lookup_sees_a_record_still_being_committed(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    try:
        await store.record_message(record(0))
        # A caller that does not wait for its record (it answered its client first)...
        pending = asyncio.create_task(store.record_message(record(1)))
        await asyncio.sleep(0)  # ...has queued it
        hit = await store.find_thread(["<m1@corp.example>"])
        assert hit is not None and hit.source_reference == "101203-T"
        assert "<m1@corp.example>" in {m.message_id for m in (await store.show("101203-T")).messages}
        await pending
    finally:
        await store.close()


async def test_a_thread_lookup_waits_for_a_cancelled_callers_record_too(store_url, tmp_path):  # noqa: F811
    store = await opened(store_url, tmp_path)
    try:
        await store.record_message(record(0))
        release = await hold_writes(store_url)
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(store.record_message(record(1)), 0.3)
            lookup = asyncio.create_task(store.find_thread(["<m1@corp.example>"]))
            with pytest.raises(asyncio.TimeoutError):  # its record is still being written
                await asyncio.wait_for(asyncio.shield(lookup), 0.3)
        finally:
            await release()
        hit = await lookup
        assert hit is not None and hit.message_id == "<m1@corp.example>"
    finally:
        await store.close()


async def test_sqlite_lookups_see_another_process_commit_at_once(tmp_path):
    """The look-up connection on the event loop reads what another connection
    committed, and is not held up by that connection's open write transaction."""
    import sqlite3

    url = f"sqlite:{tmp_path / 'lookups.db'}"
    store = await opened(url, tmp_path)
    other = await opened(url, tmp_path)
    target = LinkTarget(PL, "Team B", "{n}-T", True)
    try:
        assert await store.find_link("101203-T", PL) is None
        made = await other.get_or_create_link("101203-T", UK, target, CTX)
        assert await store.find_link("101203-T", PL) == made.reference
        writer = sqlite3.connect(tmp_path / "lookups.db", isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM links")
        try:
            # Uncommitted: the look-up still sees the link, and answers without waiting.
            assert await asyncio.wait_for(store.find_link("101203-T", PL), 5) == made.reference
        finally:
            writer.execute("COMMIT")
            writer.close()
        assert await store.find_link("101203-T", PL) is None
    finally:
        await store.close()
        await other.close()


async def test_sqlite_lookup_the_database_keeps_busy_waits_off_the_loop(tmp_path):
    """A statement the look-up connection cannot run at once (SQLITE_BUSY) goes to
    the reader's thread, which waits for the lock while the event loop runs on.
    A database in rollback-journal mode, where a writer does keep readers out,
    stands in for the rare busy WAL (one being recovered)."""
    import sqlite3

    import aiosqlite

    from smtpgate.store.sqlite import _LookupTx

    path = tmp_path / "journal.db"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("CREATE TABLE t (x)")
    setup.execute("INSERT INTO t VALUES (1)")
    setup.close()
    now = sqlite3.connect(path, isolation_level=None, timeout=0)
    later = await aiosqlite.connect(path, isolation_level=None)
    await later.execute("PRAGMA busy_timeout = 20000")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO t VALUES (2)")
        with pytest.raises(sqlite3.OperationalError):
            now.execute("SELECT x FROM t").fetchall()  # busy at once, as the look-up connection is
        lookup = asyncio.create_task(_LookupTx(now, later).fetchall("SELECT x FROM t ORDER BY x"))
        ticks = 0
        while ticks < 20:  # the loop runs while the look-up waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not lookup.done()
        holder.execute("COMMIT")
        assert [tuple(r) for r in await asyncio.wait_for(lookup, 20)] == [(1,), (2,)]
    finally:
        holder.close()
        now.close()
        await later.close()


async def test_postgresql_records_survive_their_connection_being_cut(pg_store_url, tmp_path):  # noqa: F811
    """The records' own connection, ended by the server (a restart, an operator's
    pg_terminate_backend), is replaced and the batch goes in on the new one."""
    import asyncpg

    from smtpgate.store.postgres import RECORDS_APPLICATION

    url = pg_store_url
    store = await opened(url, tmp_path)
    admin = await asyncpg.connect(url)
    try:
        await store.record_message(record(0))
        ended = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",  # this test's database only
            RECORDS_APPLICATION)
        assert ended == 1
        await store.record_message(record(1))
        await store.record_message(record(2))
        assert await recorded_ids(url, tmp_path) == {f"<m{n}@corp.example>" for n in range(3)}
    finally:
        await admin.close()
        await store.close()


async def lookup_backends(admin) -> set[int]:
    from smtpgate.store.postgres import LOOKUPS_APPLICATION

    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = $1"
                             " AND datname = current_database()", LOOKUPS_APPLICATION)  # this test's database only
    return {r["pid"] for r in rows}


async def test_postgresql_lookups_go_on_when_their_connection_is_cut(pg_store_url, tmp_path):  # noqa: F811
    """The look-ups' own connection, ended by the server: look-ups go on (on the read pool)
    and a new one is opened for them."""
    import asyncpg

    url = pg_store_url
    store = await opened(url, tmp_path)
    admin = await asyncpg.connect(url)
    try:
        made = await store.get_or_create_link("101203-T", UK, LinkTarget(PL, "Team B", "{n}-T", True), CTX)
        assert await store.find_link("101203-T", PL) == made.reference
        [first] = await lookup_backends(admin)
        await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        answers = []
        for _ in range(200):
            try:
                answers.append(await store.find_link("101203-T", PL))
            except StoreError:
                answers.append(None)  # the one look-up that met the cut, at most
            if (await lookup_backends(admin)) - {first}:
                break
            await asyncio.sleep(0.05)
        assert (await lookup_backends(admin)) - {first}, "no new look-up connection"
        assert answers.count(None) <= 1 and answers[-1] == made.reference
        links = await asyncio.gather(*(store.links_of("101203-T") for _ in range(20)))  # busy: the pool too
        assert links == [{PL: made.reference}] * 20
    finally:
        await admin.close()
        await store.close()


async def test_postgresql_a_lookup_cancelled_midway_leaves_its_connection(pg_store_url, tmp_path):  # noqa: F811
    import asyncpg

    url = pg_store_url
    store = await opened(url, tmp_path)
    admin = await asyncpg.connect(url)
    try:
        [first] = await lookup_backends(admin)
        lock = await asyncpg.connect(url)
        await lock.execute("BEGIN; LOCK TABLE links IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.find_link("101203-T", PL), 0.3)  # waits for the lock
        await lock.execute("ROLLBACK")
        await lock.close()
        for _ in range(200):  # answered on the read pool until a new connection is there
            assert await store.find_link("101203-T", PL) is None
            if (await lookup_backends(admin)) - {first}:
                break
            await asyncio.sleep(0.05)
        assert (await lookup_backends(admin)) - {first}, "no new look-up connection"
        assert first not in await lookup_backends(admin)  # the cancelled one is gone
    finally:
        await admin.close()
        await store.close()


async def test_postgresql_links_are_remembered_until_a_writer_says_they_changed(pg_store_url, tmp_path):  # noqa: F811
    """links_of answers from memory while its connection listens; a write transaction of any
    smtpgate process (another node here) notifies at its commit, and the next answer is new."""
    import asyncpg

    from smtpgate.store.postgres import LINKS_CHANNEL

    url = pg_store_url
    store = await opened(url, tmp_path)
    other = await opened(url, tmp_path)  # another node
    admin = await asyncpg.connect(url)
    try:
        assert await store.record_link("101203-T", UK, "5512-C", PL, None)
        assert await store.links_of("101203-T") == {PL: "5512-C"}  # its own write: at once
        assert await other.record_link("101203-T", UK, "77-A", "de-hr@corp.example", None)
        for _ in range(100):  # another node's write notifies: heard within moments
            if await store.links_of("101203-T") == {PL: "5512-C", "de-hr@corp.example": "77-A"}:
                break
            await asyncio.sleep(0.05)
        assert await store.links_of("101203-T") == {PL: "5512-C", "de-hr@corp.example": "77-A"}
        # A writer that does not notify (a hand-made DELETE): the remembered answer stands
        # until a notification (or LINKS_KEPT_SECONDS) says otherwise.
        await admin.execute("DELETE FROM links WHERE lo = '5512-C' OR hi = '5512-C'")
        assert await store.links_of("101203-T") == {PL: "5512-C", "de-hr@corp.example": "77-A"}
        await admin.execute("SELECT pg_notify($1, '')", LINKS_CHANNEL)
        for _ in range(100):
            if await store.links_of("101203-T") == {"de-hr@corp.example": "77-A"}:
                break
            await asyncio.sleep(0.05)
        assert await store.links_of("101203-T") == {"de-hr@corp.example": "77-A"}
        # Its listening connection gone, nothing remembered is trusted: no notification
        # could reach it (a hand-made DELETE again, then the connection cut).
        await admin.execute("DELETE FROM links WHERE lo = '77-A' OR hi = '77-A'")
        assert await store.links_of("101203-T") == {"de-hr@corp.example": "77-A"}
        await other.close()  # its look-up connection too: the one left is this store's
        [first] = await lookup_backends(admin)
        await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        for _ in range(100):
            if await store.links_of("101203-T") == {}:
                break
            await asyncio.sleep(0.05)
        assert await store.links_of("101203-T") == {}
    finally:
        await admin.close()
        await other.close()
        await store.close()


# --------------------------------------------------------------------------- linger
# GroupCommit itself, with a batch writer that keeps what it was given. An hour's
# linger: whatever ends the wait early must, or the test times out.

HOUR = 3600.0


def batches_kept():
    written: list[list[int]] = []

    async def write(batch: list[int]) -> None:
        written.append(batch)

    return written, write


async def loop_turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_items_nobody_waits_for_linger_and_share_one_commit():
    written, write = batches_kept()
    group = GroupCommit(write, linger=HOUR)
    first = group.add(1)
    await loop_turns()
    assert written == [] and not first.done()  # without the linger it would be written by now
    second = group.add(2)
    await asyncio.wait_for(group.settled(), 10)  # a reader that wants them ends the wait
    assert written == [[1, 2]] and first.done() and second.done()


async def test_an_urgent_item_ends_the_linger_for_everything_pending():
    written, write = batches_kept()
    group = GroupCommit(write, linger=HOUR)
    early = group.add(1)
    await loop_turns()
    await asyncio.wait_for(group.submit(2), 10)
    assert written == [[1, 2]] and early.done()


async def test_a_full_batch_does_not_linger():
    written, write = batches_kept()
    group = GroupCommit(write, max_batch=2, linger=HOUR)
    items = [group.add(n) for n in range(3)]
    await asyncio.wait_for(asyncio.gather(*items[:2]), 10)
    assert written[0] == [0, 1]
    assert not items[2].done()  # the rest lingers again
    await asyncio.wait_for(group.close(), 10)  # closing writes it at once
    assert written == [[0, 1], [2]] and items[2].done()


async def test_an_item_added_after_the_hurry_lingers_again():
    written, write = batches_kept()
    group = GroupCommit(write, linger=HOUR)
    await asyncio.wait_for(group.submit(1), 10)
    later = group.add(2)
    await loop_turns()
    assert written == [[1]] and not later.done()
    group._flusher.cancel()  # a cancelled flusher gives up what it held: the futures say so
    await loop_turns()
    assert later.cancelled()


async def test_without_a_linger_each_item_is_written_as_soon_as_the_writer_runs():
    written, write = batches_kept()
    group = GroupCommit(write)
    first = group.add(1)
    await asyncio.sleep(0)  # one turn of the loop: the writer takes the item up and writes it
    assert written == [[1]] and first.done()
    second = group.add(2)
    await asyncio.sleep(0)
    assert written == [[1], [2]] and second.done()
    assert (group.batches, group.items) == (2, 2)


async def test_a_linger_nobody_cuts_short_ends_by_itself():
    written, write = batches_kept()
    group = GroupCommit(write, linger=0.01)
    item = group.add(1)
    await asyncio.wait_for(item, 10)
    assert written == [[1]]


async def test_a_batch_filled_while_it_lingers_is_written_at_once():
    written, write = batches_kept()
    group = GroupCommit(write, max_batch=2, linger=HOUR)
    first = group.add(1)
    await loop_turns()
    assert written == [] and not first.done()  # lingering
    second = group.add(2)  # max_batch items pending: the batch is full
    await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert written == [[1, 2]]


async def test_a_failed_write_reaches_its_callers_as_a_store_error_naming_the_failure():
    async def fail(batch: list[Exception]) -> None:
        raise batch[0]

    group = GroupCommit(fail, max_batch=1)
    cause = ValueError("no such column: tag")
    outcomes = await asyncio.wait_for(
        asyncio.gather(group.add(cause), group.add(StoreError("database is locked")), return_exceptions=True), 10)
    assert [type(o) for o in outcomes] == [StoreError, StoreError]
    # Another exception is named with its type; a StoreError's own text is kept as it is.
    assert [str(o) for o in outcomes] == ["ValueError: no such column: tag", "database is locked"]
    assert outcomes[0].__cause__ is cause
    assert (group.batches, group.items) == (0, 0)  # nothing committed


async def test_a_reader_waiting_for_a_failed_batch_and_the_next_one_is_released():
    written, keep = batches_kept()

    async def write(batch: list[int]) -> None:
        if 1 in batch:
            raise StoreError("database is locked")
        await keep(batch)

    group = GroupCommit(write, max_batch=1, linger=HOUR)
    failing = group.add(1)
    later = group.add(2)
    await asyncio.wait_for(group.settled(), 10)
    assert isinstance(failing.exception(), StoreError)
    assert later.done() and written == [[2]]
    assert (group.batches, group.items) == (1, 1)


async def test_a_reader_is_released_when_closing_gives_up_on_a_write_that_hangs():
    async def hang(batch: list[int]) -> None:
        await asyncio.Event().wait()

    group = GroupCommit(hang)
    item = group.add(1)
    reader = asyncio.create_task(group.settled())
    await loop_turns()
    assert not reader.done()
    await group.close(timeout=0.05)  # the write never ends: closing gives it up
    await asyncio.wait_for(reader, 10)
    assert item.cancelled()
    await asyncio.wait_for(group.settled(), 10)  # nothing is left to wait for
