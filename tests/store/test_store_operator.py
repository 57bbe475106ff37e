"""The store side of the operator's tools, on SQLite and PostgreSQL: read-only opens,
links corrected by hand, the export, and the local sequence's guard."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from smtpgate.store import (
    AllocationContext,
    LinkConflict,
    LinkTarget,
    StoreError,
    StoreMissing,
    open_store,
)
from smtpgate.store.allocation import LocalAllocator
from smtpgate.store.sql import template_affixes
from tests.store_helpers import fresh_pg_url, pg_database, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
CTX = AllocationContext(subject="Payroll", from_="anna@corp.example", message_id="<m@corp.example>")
PL_TARGET = LinkTarget(mailbox=PL, team="Team B", new_reference="{n}-T", allow_create=True)


async def new_link(url: str, base: Path, source: str, *, templates=("{n}-T",), first: int = 900000) -> str:
    """Open the store as serve does, create a link from source to a new PL activity, close."""
    store = await open_store(url, base_dir=base, allocator=LocalAllocator(first, templates))
    try:
        outcome = await store.get_or_create_link(source, UK, PL_TARGET, CTX)
        assert outcome is not None and outcome.created
        return outcome.reference
    finally:
        await store.close()


# --- read-only opens


async def test_read_only_open_of_a_missing_sqlite_file_creates_nothing(tmp_path):
    with pytest.raises(StoreMissing) as info:
        await open_store("sqlite:state/smtpgate.db", base_dir=tmp_path, read_only=True)
    assert str(info.value) == (
        f"{tmp_path / 'state' / 'smtpgate.db'} does not exist; `smtpgate db upgrade` creates the store"
    )
    assert list(tmp_path.iterdir()) == []


async def test_read_only_open_of_a_database_without_the_schema(store_url, tmp_path):  # noqa: F811
    # An empty database: for SQLite an empty file, for PostgreSQL an empty schema.
    if store_url.startswith("sqlite:"):
        path = Path(store_url[len("sqlite:"):])
        path.parent.mkdir(parents=True)
        path.touch()
        label = str(path)
    else:
        label = store_url
    with pytest.raises(StoreMissing) as info:
        await open_store(store_url, base_dir=tmp_path, read_only=True)
    assert str(info.value) == f"{label} has no smtpgate schema; `smtpgate db upgrade` creates it"
    if store_url.startswith("sqlite:"):
        assert sorted(p.name for p in path.parent.iterdir()) == ["smtpgate.db"]
        assert path.stat().st_size == 0


@pytest.mark.postgres
async def test_read_only_open_of_a_database_that_does_not_exist(pg_database):  # noqa: F811
    url = pg_database.rsplit("/", 1)[0] + "/smtpgate_no_such_database"
    with pytest.raises(StoreMissing, match="smtpgate_no_such_database"):
        await open_store(url, base_dir=Path("/"), read_only=True)


async def test_a_read_only_store_refuses_writes_and_leaves_no_files(store_url, tmp_path):  # noqa: F811
    await new_link(store_url, tmp_path, "101203-T")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    store = await open_store(store_url, base_dir=tmp_path, read_only=True)
    try:
        assert (await store.show("101203-T")).links[0].reference == "900000-T"
        with pytest.raises(StoreError):
            await store.add_link("1-T", "2-T", PL, by="test")
    finally:
        await store.close()
    # No -wal/-shm left behind: made by root they would lock the service out.
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# --- case-insensitive show


async def test_show_matches_a_reference_ignoring_case(store_url, tmp_path):  # noqa: F811
    await new_link(store_url, tmp_path, "101203-T")
    store = await open_store(store_url, base_dir=tmp_path, read_only=True)
    try:
        view = await store.show("101203-t")
        assert view is not None and view.reference == "101203-T"
        assert [link.reference for link in view.links] == ["900000-T"]
        assert (await store.show("900000-t")).links[0].reference == "101203-T"
        assert await store.show("101204-t") is None
    finally:
        await store.close()


# --- corrections by hand, and the export


async def test_add_delete_and_export(store_url, tmp_path):  # noqa: F811
    store = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    try:
        with capture_logs() as logs:
            assert await store.add_link("101203-T", "5512-C", PL, by="alice") is True
            assert await store.add_link("101203-t", "5512-c", PL, by="alice") is False  # same link
        assert [e for e in logs if e["event"] == "link.added"] == [
            {"event": "link.added", "log_level": "info", "source_reference": "101203-T",
             "reference": "5512-C", "mailbox": PL, "by": "alice"},
        ]
        assert await store.activity_mailbox("5512-C") == PL
        with pytest.raises(LinkConflict, match=f"5512-C belongs to {PL}, not {UK}"):
            await store.add_link("77-A", "5512-C", UK, by="alice")
        with pytest.raises(LinkConflict, match="not linked to itself"):
            await store.add_link("77-A", "77-a", UK, by="alice")

        activities, links = await store.export()
        assert [(a.reference, a.mailbox) for a in activities] == [("101203-T", None), ("5512-C", PL)]
        assert [(row.source_reference, row.target_reference) for row in links] == [("101203-T", "5512-C")]

        with capture_logs() as logs:
            assert await store.delete_link("5512-c", "101203-T", by="bob") is True
            assert await store.delete_link("5512-C", "101203-T", by="bob") is False
        assert [e for e in logs if e["event"] == "link.deleted"] == [
            {"event": "link.deleted", "log_level": "info", "source_reference": "101203-T",
             "reference": "5512-C", "by": "bob"},
        ]
        activities, links = await store.export()
        assert links == [] and len(activities) == 2  # activities stay
    finally:
        await store.close()


# --- the local sequence's guard


async def test_guard_after_restoring_an_older_sqlite_copy(tmp_path):
    url = "sqlite:smtpgate.db"
    db = tmp_path / "smtpgate.db"
    assert await new_link(url, tmp_path, "1-T") == "900000-T"
    shutil.copy(db, tmp_path / "backup.db")  # closed: the file holds every commit
    assert await new_link(url, tmp_path, "2-T") == "900001-T"
    assert await new_link(url, tmp_path, "3-T") == "900002-T"
    shutil.copy(tmp_path / "backup.db", db)  # restore the older copy: 900001/900002 are gone
    # A reply to a thread of the lost period carries its tag back into the store.
    store = await open_store(url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    await store.record_link("3-T", UK, "900002-T", PL, "<reply@supplier.example>")
    await store.close()
    # On the next start the sequence moves above it: 900002-T is never issued twice.
    with capture_logs() as logs:
        assert await new_link(url, tmp_path, "4-T") == "900003-T"
    assert {"event": "allocator.sequence_raised", "log_level": "warning", "next_number": 900003,
            "previous_next_number": 900001, "highest_reference": "900002-T"} in logs


async def test_guard_after_restoring_from_an_export(store_url, tmp_path):  # noqa: F811
    """An export replayed into an empty store with `links add`: the sequence starts above it."""
    store = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    for i, target in enumerate(["900000-T", "900007-T", "900003-T", "5512-C", "900100-t"]):
        await store.add_link(f"{101200 + i}-T", target, PL, by="restore")
    await store.close()
    # 900100-t is not what "{n}-T" writes, 5512-C is no local reference, 101204-T is below first_number.
    assert await new_link(store_url, tmp_path, "1-T") == "900008-T"
    assert await new_link(store_url, tmp_path, "2-T") == "900009-T"


async def test_guard_never_lowers_and_follows_every_template(store_url, tmp_path):  # noqa: F811
    templates = ("{n}-T", "T-{n:06d}")
    store = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(5, templates))
    await store.add_link("1-C", "T-000950", PL, by="restore")
    await store.add_link("2-C", "T-95%", PL, by="restore")  # LIKE wildcards are literal
    await store.close()
    store = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(5, templates))
    try:
        assert await store.raise_sequence(templates, 5) is None  # already above on open
        outcome = await store.get_or_create_link("3-C", UK, PL_TARGET, CTX)
        assert outcome.reference == "951-T"
        assert await store.raise_sequence(templates, 5) is None
    finally:
        await store.close()


async def test_a_known_reference_at_the_first_number_moves_the_sequence_one_past_it(store_url, tmp_path):  # noqa: F811
    """900000-T, seeded by hand into a store whose sequence never moved: the next number is 900001."""
    store = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    try:
        await store.add_link("1-C", "900000-T", PL, by="restore")
        with capture_logs() as logs:
            assert await store.raise_sequence(["{n}-T"], 900000) == 900001
            assert await store.raise_sequence(["{n}-T"], 900000) is None  # moved already
        assert [e for e in logs if e["event"] == "allocator.sequence_raised"] == [
            {"event": "allocator.sequence_raised", "log_level": "warning", "next_number": 900001,
             "previous_next_number": 900000, "highest_reference": "900000-T"}]
    finally:
        await store.close()


@pytest.mark.parametrize(("template", "affixes"), [
    ("{n}-T", ("", "-T")),
    ("T-{n}", ("T-", "")),
    ("C{n:06d}x", ("C", "x")),
    ("{{{n}}}", ("{", "}")),
    ("{n:x}-T", None),
    ("{n}-{n}", None),
    ("{m}-T", None),
    ("{n!r}", None),
    ("{n", None),
])
def test_template_affixes(template, affixes):
    assert template_affixes(template) == affixes
