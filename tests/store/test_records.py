"""Message records (smtpgate/store/records.py): what pruning refuses and logs,
blank Message-IDs, which never match a thread, not even a message recorded
without one, records queued one after another sharing one commit, a record
without a source read back and imported again, and the order of a mapping."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smtpgate.store import MessageRecord, open_store
from smtpgate.store.allocation import LocalAllocator
from smtpgate.store.transfer import Backup
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
DE = "de-payroll@corp.example"


@pytest.fixture
async def store(store_url: str, tmp_path: Path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    yield s
    await s.close()


def message(message_id: str, *, days_ago: int = 0, mapping: dict[str, str] | None = None) -> MessageRecord:
    return MessageRecord(message_id=message_id, date=None, from_="anna@corp.example", subject="Payroll",
                         source_reference="1-T", recipients=["client@supplier.example"],
                         mapping={PL: "2-T"} if mapping is None else mapping,
                         relayed_at=datetime.now(timezone.utc) - timedelta(days=days_ago))


async def test_pruning_refuses_a_negative_age_and_says_which_argument(store):
    with pytest.raises(ValueError, match=r"^keep_days must not be negative$"):
        await store.prune_messages(-1)


async def test_pruning_logs_how_many_messages_went_and_the_age_kept(store, log_lines):
    await store.record_activity("1-T", UK)
    await store.record_message(message("<old@corp.example>", days_ago=500))
    await store.record_message(message("<older@corp.example>", days_ago=600))
    await store.record_message(message("<new@corp.example>"))
    assert await store.prune_messages(400) == 2
    assert await store.prune_messages(400) == 0  # nothing left to prune: no line
    pruned = [line for line in log_lines() if line.get("event") == "store.pruned"]
    assert len(pruned) == 1
    assert pruned[0]["messages"] == 2
    assert pruned[0]["keep_days"] == 400


async def test_a_blank_message_id_matches_no_thread(store):
    await store.record_activity("1-T", UK)
    await store.record_message(message(""))  # a message that came without a Message-ID
    await store.record_message(message("<m1@corp.example>"))
    assert await store.find_thread(["  "]) is None
    assert await store.thread_hits(["", " \t"]) == []
    assert [hit.message_id for hit in await store.thread_hits([" ", "<m1@corp.example>"])] == ["<m1@corp.example>"]


async def test_records_queued_one_after_another_share_one_commit(store):
    """A record nobody waits for waits a little for others: one queued after the
    recorder has taken it up goes into the same transaction, not a second one."""
    await store.record_activity("1-T", UK)
    first = store.queue_message(message("<m1@corp.example>"))
    await asyncio.sleep(0)  # one turn of the loop: the recorder takes up the first record
    second = store.queue_message(message("<m2@corp.example>"))
    await asyncio.gather(first, second)
    assert (store.records.batches, store.records.items) == (1, 2)
    hits = await store.thread_hits(["<m1@corp.example>", "<m2@corp.example>"])
    assert [hit.message_id for hit in hits] == ["<m1@corp.example>", "<m2@corp.example>"]


async def test_a_record_without_a_source_reads_back_as_recorded_and_is_not_imported_again(store):
    record = MessageRecord(message_id="<nosource@corp.example>", date=None, from_="anna@corp.example",
                           subject="Payroll", source_reference=None, recipients=["client@supplier.example"],
                           mapping={}, relayed_at=datetime(2026, 11, 27, 17, 0, 5, tzinfo=timezone.utc))
    await store.record_message(record)
    await store.record_message(record)  # a retry: still one record
    assert await store.export_messages() == [record]
    counts = await store.import_backup(Backup(schema=1, activities=[], links=[], messages=[record]))
    assert counts.messages == 0
    assert await store.export_messages() == [record]


async def test_a_mapping_reads_back_in_address_order(store):
    """Whatever order the relay met the mailboxes in, a record's mapping comes back (in
    `links export --messages`, `explain`) sorted by address."""
    await store.record_activity("1-T", UK)
    await store.record_message(message("<m1@corp.example>", mapping={UK: "1-T", PL: "2-T", DE: "3-T"}))
    [exported] = await store.export_messages()
    assert list(exported.mapping.items()) == [(DE, "3-T"), (PL, "2-T"), (UK, "1-T")]
    hit = await store.find_thread(["<m1@corp.example>"])
    assert hit is not None and list(hit.mapping) == [DE, PL, UK]
