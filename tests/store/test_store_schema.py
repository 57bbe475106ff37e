"""Store URLs, schema versions and migrations."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpgate.store import SchemaOutdated, StoreError, migrations, open_store, sqlite_path
from tests.store_helpers import pg_database, store_url  # noqa: F401


# The version this smtpgate's migrations reach, and the one before it (NEXT: a pretended next one).
LATEST = migrations.latest(migrations.SQLITE)
OLD = LATEST
NEXT = LATEST + 1


@pytest.fixture
def next_version(monkeypatch):
    """Pretend this smtpgate ships one more migration."""
    extra = (NEXT, "an index for tests", ["CREATE INDEX links_message_id ON links (message_id)"])
    monkeypatch.setattr(migrations, "SQLITE", [*migrations.SQLITE, extra])
    monkeypatch.setattr(migrations, "POSTGRES", [*migrations.POSTGRES, extra])


async def test_a_new_database_is_initialised_on_open(store_url, tmp_path):  # noqa: F811
    store = await open_store(store_url, base_dir=tmp_path)
    try:
        assert await store.schema_version() == store.latest_version() == LATEST
        assert await store.upgrade() == (LATEST, LATEST)
    finally:
        await store.close()


async def test_an_old_schema_is_refused_until_upgraded(store_url, tmp_path, next_version):  # noqa: F811
    old = await open_store(store_url, base_dir=tmp_path, check_schema=False)
    # Build a database of this smtpgate's version with its migrations only.
    old._migrations = lambda: [m for m in type(old)._migrations(old) if m[0] <= OLD]
    assert await old.upgrade() == (0, OLD)
    await old.close()

    with pytest.raises(SchemaOutdated, match="smtpgate db upgrade"):
        await open_store(store_url, base_dir=tmp_path)

    cli = await open_store(store_url, base_dir=tmp_path, check_schema=False)
    assert await cli.upgrade() == (OLD, NEXT)
    assert await cli.upgrade() == (NEXT, NEXT)
    await cli.close()
    store = await open_store(store_url, base_dir=tmp_path)
    assert await store.schema_version() == NEXT
    await store.close()


async def test_auto_upgrade_applies_pending_migrations(store_url, tmp_path, next_version):  # noqa: F811
    old = await open_store(store_url, base_dir=tmp_path, check_schema=False)
    old._migrations = lambda: [m for m in type(old)._migrations(old) if m[0] <= OLD]
    await old.upgrade()
    await old.close()
    store = await open_store(store_url, base_dir=tmp_path, auto_upgrade=True)
    try:
        assert await store.schema_version() == NEXT
    finally:
        await store.close()


async def test_a_newer_schema_is_refused(store_url, tmp_path, monkeypatch):  # noqa: F811
    extra = (NEXT, "from the future", ["CREATE TABLE future (x INTEGER)"])
    monkeypatch.setattr(migrations, "SQLITE", [*migrations.SQLITE, extra])
    monkeypatch.setattr(migrations, "POSTGRES", [*migrations.POSTGRES, extra])
    store = await open_store(store_url, base_dir=tmp_path)
    await store.close()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="newer than this smtpgate") as caught:
        await open_store(store_url, base_dir=tmp_path)
    assert not isinstance(caught.value, SchemaOutdated)


# The migration that adds the activities list's indexes and the search index.
SEARCH = next(version for version, description, _ in migrations.SQLITE if description.startswith("activity lists"))


async def test_the_search_index_covers_the_messages_an_older_store_already_holds(store_url, tmp_path):  # noqa: F811
    """The search index covers the records written before its migration, and those after."""
    from datetime import datetime, timezone

    from smtpgate.store import MessageRecord
    from smtpgate.store.base import ActivityQuery

    def record(message_id: str, subject: str) -> MessageRecord:
        return MessageRecord(message_id=message_id, date=None, from_=None, subject=subject,
                             source_reference="101203-T", recipients=[], mapping={},
                             relayed_at=datetime.now(timezone.utc))

    old = await open_store(store_url, base_dir=tmp_path, check_schema=False)
    old._migrations = lambda: [m for m in type(old)._migrations(old) if m[0] < SEARCH]
    assert await old.upgrade() == (0, SEARCH - 1)
    await old.record_activity("101203-T", "uk-payroll@corp.example")
    await old.record_message(record("<before@corp.example>", "Invoice 4411 before the upgrade"))
    await old.close()
    store = await open_store(store_url, base_dir=tmp_path, auto_upgrade=True)
    try:
        await store.record_message(record("<after@corp.example>", "Payslip after the upgrade"))
        own = ("uk-payroll@corp.example",)
        for q in ("invoice 4411", "payslip", "<before@corp.example>", "after@corp"):
            rows, _ = await store.list_activities(ActivityQuery(own=own, q=q))
            assert [r.reference for r in rows] == ["101203-T"], q
        rows, _ = await store.list_activities(ActivityQuery(own=own, q="nowhere"))
        assert rows == []
        assert await store.prune_messages(0) == 2  # pruning keeps the index in step
        rows, _ = await store.list_activities(ActivityQuery(own=own, q="invoice"))
        assert rows == []
    finally:
        await store.close()


def test_sqlite_paths_are_relative_to_the_config_folder(tmp_path):
    assert sqlite_path("sqlite:var/smtpgate.db", tmp_path) == tmp_path / "var/smtpgate.db"
    assert sqlite_path("sqlite:/srv/s.db", tmp_path) == Path("/srv/s.db")
    assert sqlite_path("sqlite:///srv/s.db", tmp_path) == Path("/srv/s.db")


async def test_sqlite_creates_parent_folders_and_uses_wal(tmp_path):
    store = await open_store("sqlite:a/b/smtpgate.db", base_dir=tmp_path)
    await store.close()
    assert (tmp_path / "a/b/smtpgate.db").exists()
    with open(tmp_path / "a/b/smtpgate.db", "rb") as f:
        header = f.read(20)
    assert header[18:20] == b"\x02\x02"  # file format 2 = WAL


@pytest.mark.parametrize(
    "url",
    ["mysql://x/y", "var/smtpgate.db", "sqlite:", "sqlite::memory:", "sqlite://host/x.db", ""],
)
async def test_bad_urls_are_store_errors(url, tmp_path):
    with pytest.raises(StoreError, match="store.url"):
        await open_store(url, base_dir=tmp_path)


async def test_an_unreachable_postgresql_is_a_store_error(tmp_path):
    with pytest.raises(StoreError) as caught:
        await open_store("postgresql://postgres:pw@127.0.0.1:9/none", base_dir=tmp_path, timeout=5)
    assert "pw" not in str(caught.value).replace("postgresql", "")


async def test_an_unwritable_sqlite_path_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreError):
        await open_store("sqlite:file/smtpgate.db", base_dir=tmp_path)


async def test_messages_recorded_before_inbound_sharing_upgrade_to_unshared(tmp_path):
    import sqlite3

    old = await open_store("sqlite:smtpgate.db", base_dir=tmp_path, check_schema=False)
    old._migrations = lambda: [m for m in type(old)._migrations(old) if m[0] == 1]
    assert await old.upgrade() == (0, 1)
    await old.close()
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        conn.execute("INSERT INTO messages (message_id, source_reference, source_key, recipients, mapping,"
                     " relayed_at) VALUES ('<m@x>', '1-T', '1-T', '[\"a@corp.example\"]', '{}',"
                     " '2026-11-27T10:00:00.000000Z')")
        conn.execute("INSERT INTO message_activities (message, reference) VALUES (1, '1-T')")
    store = await open_store("sqlite:smtpgate.db", base_dir=tmp_path, auto_upgrade=True)
    try:
        assert await store.schema_version() == LATEST
        [message] = (await store.show("1-T")).messages
        assert (message.message_id, message.recipients, message.shared) == ("<m@x>", ["a@corp.example"], [])
    finally:
        await store.close()
