"""The link store's behaviour, the same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from smtpgate.store.allocation import LocalAllocator
from smtpgate.store import (
    AllocationContext,
    AllocationError,
    LinkOutcome,
    LinkTarget,
    MessageRecord,
    StoreError,
    open_store,
    run_pruner,
)
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
DE = "de-payroll@corp.example"
CTX = AllocationContext(subject="Payroll question", from_="anna@corp.example", message_id="<m1@corp.example>")


def target(mailbox: str = PL, *, allow_create: bool = True, template: str = "{n}-T") -> LinkTarget:
    return LinkTarget(mailbox=mailbox, team="Team", new_reference=template, allow_create=allow_create)


@pytest.fixture
async def store(store_url: str, tmp_path: Path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    yield s
    await s.close()


def message(message_id: str, source: str | None, mapping: dict[str, str], *, when: datetime | None = None, recipients=None) -> MessageRecord:
    return MessageRecord(
        message_id=message_id,
        date="Fri, 27 Nov 2026 17:00:00 +0000",
        from_="anna@corp.example",
        subject="Payroll 101203-T",
        source_reference=source,
        recipients=recipients if recipients is not None else ["client@supplier.example"],
        mapping=mapping,
        relayed_at=when or datetime.now(timezone.utc),
    )


async def test_creates_then_reuses_the_link(store):
    first = await store.get_or_create_link("101203-T", UK, target(), CTX)
    again = await store.get_or_create_link("101203-T", UK, target(), CTX)
    assert first == LinkOutcome("900000-T", created=True)
    assert again == LinkOutcome("900000-T", created=False)
    assert await store.activity_mailbox("900000-T") == PL
    assert await store.activity_mailbox("101203-T") == UK


async def test_each_mailbox_gets_its_own_activity_from_one_sequence(store):
    pl = await store.get_or_create_link("101203-T", UK, target(PL), CTX)
    de = await store.get_or_create_link("101203-T", UK, target(DE, template="T-{n}"), CTX)
    other = await store.get_or_create_link("5512-C", None, target(PL), CTX)
    assert (pl.reference, de.reference, other.reference) == ("900000-T", "T-900001", "900002-T")
    assert await store.activity_mailbox("5512-C") is None


async def test_without_create_an_unlinked_mailbox_gets_nothing(store):
    assert await store.get_or_create_link("101203-T", UK, target(allow_create=False), CTX) is None
    assert await store.show("101203-T") is None
    await store.get_or_create_link("101203-T", UK, target(), CTX)
    reused = await store.get_or_create_link("101203-T", UK, target(allow_create=False), CTX)
    assert reused == LinkOutcome("900000-T", created=False)


async def test_a_link_works_from_both_sides(store):
    created = await store.get_or_create_link("101203-T", UK, target(PL), CTX)
    back = await store.get_or_create_link(created.reference, PL, target(UK), CTX)
    assert back == LinkOutcome("101203-T", created=False)
    view = await store.show(created.reference)
    assert view.mailbox == PL
    assert [link.reference for link in view.links] == ["101203-T"]
    assert view.links[0].mailbox == UK


async def test_the_newest_linked_activity_of_the_mailbox_wins(store):
    assert await store.record_link("101203-T", UK, "5512-C", PL, "<a@x>") is True
    assert await store.record_link("101203-T", UK, "77-A", PL, "<b@x>") is True
    outcome = await store.get_or_create_link("101203-T", UK, target(PL), CTX)
    assert outcome == LinkOutcome("77-A", created=False)


async def test_links_of_answers_for_every_mailbox_what_find_link_does(store):
    assert await store.links_of("101203-T") == {}
    assert await store.record_link("101203-T", UK, "5512-C", PL, "<a@x>") is True
    assert await store.record_link("101203-T", UK, "77-A", PL, "<b@x>") is True  # newer, same mailbox
    de = await store.get_or_create_link("101203-T", UK, target(DE), CTX)
    assert await store.record_link("101203-T", UK, "4-X", None, None) is True  # an activity of no mailbox
    links = await store.links_of("101203-T")
    assert links == {PL: await store.find_link("101203-T", PL), DE: await store.find_link("101203-T", DE)}
    assert links == {PL: "77-A", DE: de.reference}
    assert await store.links_of(de.reference) == {UK: "101203-T"}  # from the other side too
    assert await store.links_of("101203-T", limit=3) is None  # more links than that: ask per mailbox


async def test_record_link_is_idempotent_and_symmetric(store):
    assert await store.record_link("101203-T", UK, "5512-C", PL, "<a@x>") is True
    assert await store.record_link("101203-T", UK, "5512-C", PL, "<a@x>") is False
    assert await store.record_link("5512-C", PL, "101203-T", UK, "<b@x>") is False
    assert await store.record_link("101203-T", UK, "101203-T", UK, None) is False
    rows = await store.list_links()
    assert len(rows) == 1
    assert (rows[0].source_reference, rows[0].target_reference) == ("101203-T", "5512-C")
    assert rows[0].message_id == "<a@x>"


async def test_record_activity_keeps_the_first_owner(store):
    await store.record_activity("101203-T", UK)
    await store.record_activity("101203-T", PL)
    assert await store.activity_mailbox("101203-T") == UK
    assert await store.activity_mailbox("1-T") is None


async def test_a_link_fills_in_an_unknown_owner_but_never_replaces_one(store):
    await store.record_link("101203-T", None, "5512-C", PL, None)
    assert await store.activity_mailbox("101203-T") is None
    await store.record_link("101203-T", UK, "77-A", DE, None)
    assert await store.activity_mailbox("101203-T") == UK
    await store.record_link("101203-T", DE, "78-A", DE, None)
    assert await store.activity_mailbox("101203-T") == UK


async def test_the_sequence_starts_at_a_raised_first_number(store_url, tmp_path):  # noqa: F811
    low = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    await low.get_or_create_link("1-T", UK, target(), CTX)
    await low.close()
    high = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(950000))
    assert (await high.get_or_create_link("2-T", UK, target(), CTX)).reference == "950000-T"
    await high.close()
    # Lowering first_number never reuses numbers.
    low = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    assert (await low.get_or_create_link("3-T", UK, target(), CTX)).reference == "950001-T"
    await low.close()


async def test_a_local_allocator_without_a_first_number_starts_at_900000(store_url, tmp_path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator())
    try:
        assert await s.get_or_create_link("101203-T", UK, target(), CTX) == LinkOutcome("900000-T", created=True)
    finally:
        await s.close()


async def test_the_local_allocator_skips_references_the_store_knows(store):
    await store.record_activity("900000-T", DE)
    await store.record_link("5-T", UK, "900001-T", DE, None)
    assert (await store.get_or_create_link("101203-T", UK, target(), CTX)).reference == "900002-T"


async def test_a_broken_template_fails_without_writing(store):
    with pytest.raises(AllocationError) as caught:
        await store.get_or_create_link("101203-T", UK, target(template="{number}-T"), CTX)
    assert str(caught.value) == (f"new_reference template '{{number}}-T' of {PL} cannot be formatted: "
                                 "KeyError('number')")
    assert await store.show("101203-T") is None
    assert (await store.get_or_create_link("101203-T", UK, target(), CTX)).reference == "900000-T"


async def test_a_template_that_gives_only_known_references_fails_without_writing(store):
    """A template without {n} gives one reference whatever the number: once the store knows
    it, the allocator gives up rather than spin through the sequence."""
    await store.record_activity("5512-C", DE)
    with pytest.raises(AllocationError) as caught:
        await store.get_or_create_link("101203-T", UK, target(template="5512-C"), CTX)
    assert str(caught.value) == "new_reference template '5512-C' gave only known references"
    assert await store.show("101203-T") is None


async def test_no_allocator_means_no_new_links(store_url, tmp_path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path)
    try:
        with pytest.raises(AllocationError) as caught:
            await s.get_or_create_link("101203-T", UK, target(), CTX)
        assert str(caught.value) == "allocator: none configured; cannot create a linked activity"
        assert await s.get_or_create_link("101203-T", UK, target(allow_create=False), CTX) is None
    finally:
        await s.close()


async def test_find_thread_returns_the_first_relayed_id_in_order(store):
    await store.record_message(message("<one@x>", "101203-T", {PL: "900000-T", UK: "101203-T"}))
    await store.record_message(message("<two@x>", "5512-C", {}))
    await store.record_activity("5512-C", DE)
    await store.record_message(message("<none@x>", None, {}))
    hit = await store.find_thread(["<unknown@x>", "<none@x>", "two@x", "<one@x>"])
    assert hit.message_id == "<two@x>"
    assert (hit.source_reference, hit.source_mailbox, hit.mapping) == ("5512-C", DE, {})
    hit = await store.find_thread([" <one@x> "])
    assert hit.source_reference == "101203-T"
    assert hit.source_mailbox is None
    assert hit.mapping == {PL: "900000-T", UK: "101203-T"}
    assert await store.find_thread([]) is None
    assert await store.find_thread(["<unknown@x>", ""]) is None


async def test_record_message_is_idempotent_per_source(store):
    record = message("<one@x>", "101203-T", {PL: "900000-T"}, recipients=["pl-payroll+900000-T@corp.example"])
    await store.record_message(record)
    await store.record_message(record)
    view = await store.show("101203-T")
    assert [m.message_id for m in view.messages] == ["<one@x>"]
    assert view.messages[0].recipients == ["pl-payroll+900000-T@corp.example"]
    # The linked activity sees the message too.
    assert [m.message_id for m in (await store.show("900000-T")).messages] == ["<one@x>"]


async def test_show_lists_links_and_messages(store):
    await store.get_or_create_link("101203-T", UK, target(PL), CTX)
    await store.record_link("101203-T", UK, "5512-C", DE, "<b@x>")
    await store.record_message(message("<m1@corp.example>", "101203-T", {PL: "900000-T"}))
    view = await store.show("101203-T")
    assert view.reference == "101203-T"
    assert view.mailbox == UK
    assert [(link.reference, link.mailbox, link.message_id) for link in view.links] == [
        ("900000-T", PL, "<m1@corp.example>"), ("5512-C", DE, "<b@x>")]
    assert all(link.created_at.tzinfo is not None for link in view.links)
    assert [m.subject for m in view.messages] == ["Payroll 101203-T"]
    assert await store.show("999-T") is None


async def test_list_links_filters_by_mailbox_on_either_side_and_by_date(store):
    await store.record_link("1-T", UK, "2-T", PL, None)
    await store.record_link("3-T", PL, "4-T", DE, None)
    await store.record_link("5-T", UK, "6-T", DE, None)
    assert len(await store.list_links()) == 3
    assert [r.source_reference for r in await store.list_links(mailbox=PL)] == ["1-T", "3-T"]
    assert [r.source_reference for r in await store.list_links(mailbox=UK)] == ["1-T", "5-T"]
    assert await store.list_links(mailbox="nobody@corp.example") == []
    future = datetime.now(timezone.utc) + timedelta(days=1)
    past = datetime.now(timezone.utc) - timedelta(days=1)
    assert await store.list_links(since=future) == []
    assert len(await store.list_links(mailbox=DE, since=past)) == 2
    assert len(await store.list_links(since=past.replace(tzinfo=None))) == 3


async def test_prune_removes_old_messages_and_keeps_links(store):
    await store.get_or_create_link("101203-T", UK, target(PL), CTX)
    old = datetime.now(timezone.utc) - timedelta(days=500)
    await store.record_message(message("<old@x>", "101203-T", {PL: "900000-T"}, when=old))
    await store.record_message(message("<new@x>", "101203-T", {PL: "900000-T"}))
    assert await store.prune_messages(400) == 1
    assert await store.prune_messages(400) == 0
    view = await store.show("101203-T")
    assert [m.message_id for m in view.messages] == ["<new@x>"]
    assert [link.reference for link in view.links] == ["900000-T"]
    assert await store.find_thread(["<old@x>"]) is None
    with pytest.raises(ValueError):
        await store.prune_messages(-1)


async def test_a_closed_store_fails_as_a_store_error(store):
    await store.close()
    await store.close()
    with pytest.raises(StoreError):
        await store.activity_mailbox("1-T")


async def test_a_new_link_is_reported_created_once(store):
    # The link service logs link.created from these answers (tests/linking/test_link_service.py).
    first = await store.get_or_create_link("101203-T", UK, target(), CTX)
    again = await store.get_or_create_link("101203-T", UK, target(), CTX)
    assert (first.created, again.created, again.reference) == (True, False, first.reference)
    assert await store.record_link("101203-T", UK, "5512-C", DE, "<b@x>") is True
    assert await store.record_link("101203-T", UK, "5512-C", DE, "<b@x>") is False


async def test_an_allocation_too_long_to_tag_makes_no_link(store):
    tight = dataclasses.replace(target(), max_reference_length=len("900000-T") - 1)
    assert await store.get_or_create_link("101203-T", UK, tight, CTX) is None
    assert await store.find_link("101203-T", PL) is None
    # Rolled back: the number is not used up, the next allocation that fits gets it.
    outcome = await store.get_or_create_link("101203-T", UK, target(), CTX)
    assert outcome.reference == "900000-T"


async def eventually(check, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait until the async check() is true (the store changes in the background); fail after timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s")
        await asyncio.sleep(0.01)


async def cancelled(task: asyncio.Task) -> str:
    """Cancel a background task; say how it ended: "cancelled", or what it returned or raised before."""
    task.cancel()
    [outcome] = await asyncio.gather(task, return_exceptions=True)
    return "cancelled" if isinstance(outcome, asyncio.CancelledError) else repr(outcome)


def pruned(store, message_id: str):
    async def check() -> bool:
        return await store.find_thread([message_id]) is None
    return check


async def test_the_pruner_prunes_again_until_cancelled(store):
    old = datetime.now(timezone.utc) - timedelta(days=30)
    await store.record_message(message("<old-1@x>", "101203-T", {}, when=old))
    await store.record_message(message("<new@x>", "101203-T", {}))
    task = asyncio.create_task(run_pruner(store, keep_days=7, every=0.01))
    try:
        await eventually(pruned(store, "<old-1@x>"), what="first prune")
        # A record old enough only after that round goes in a later one.
        await store.record_message(message("<old-2@x>", "101203-T", {}, when=old))
        await eventually(pruned(store, "<old-2@x>"), what="a later prune")
    finally:
        ended = await cancelled(task)
    assert ended == "cancelled", f"the pruner stopped by itself: {ended}"
    assert (await store.find_thread(["<new@x>"])).message_id == "<new@x>"


async def test_the_pruner_tries_again_after_a_store_error(tmp_path):
    """A prune that fails (another writer holds SQLite's lock past store.timeout) is logged,
    and the next round prunes."""
    path = tmp_path / "db" / "smtpgate.db"
    store = await open_store(f"sqlite:{path}", base_dir=tmp_path, timeout=0.2)
    task = None
    try:
        old = datetime.now(timezone.utc) - timedelta(days=30)
        await store.record_message(message("<old@x>", "101203-T", {}, when=old))
        blocker = sqlite3.connect(path, timeout=0)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with capture_logs() as logs:
                task = asyncio.create_task(run_pruner(store, keep_days=7, every=0.05))

                async def failed() -> bool:
                    return any(entry["event"] == "store.prune_failed" for entry in logs)

                await eventually(failed, what="store.prune_failed")
            assert await store.find_thread(["<old@x>"]) is not None
        finally:
            blocker.rollback()
            blocker.close()
        await eventually(pruned(store, "<old@x>"), what="prune after the lock is gone")
    finally:
        ended = await cancelled(task) if task is not None else None
        await store.close()
    assert ended == "cancelled", f"the pruner stopped by itself: {ended}"


async def test_a_shared_record_keeps_what_sharing_added_and_a_thread_hit_its_parties(store):
    import dataclasses

    shared = "pl-payroll+900000-T@corp.example"
    record = dataclasses.replace(
        message("<reply@x>", "101203-T", {UK: "101203-T", PL: "900000-T"},
                recipients=["uk-payroll+101203-T@corp.example", shared]), shared=[shared])
    await store.record_message(record)
    await store.record_message(message("<plain@x>", "101203-T", {UK: "101203-T"}))
    for reference in ("101203-T", "900000-T"):
        [listed] = [m for m in (await store.show(reference)).messages if m.message_id == "<reply@x>"]
        assert listed.shared == [shared]
    [plain] = [m for m in (await store.show("101203-T")).messages if m.message_id == "<plain@x>"]
    assert plain.shared == []
    hit = await store.find_thread(["<reply@x>"])
    assert (hit.from_, hit.recipients) == ("anna@corp.example", ("uk-payroll+101203-T@corp.example", shared))
