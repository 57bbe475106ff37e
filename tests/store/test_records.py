"""Message records (smtpgate/store/records.py): what pruning refuses and logs,
and blank Message-IDs, which never match a thread, not even a message recorded
without one."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from smtpgate.store import MessageRecord, open_store
from smtpgate.store.allocation import LocalAllocator
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"


@pytest.fixture
async def store(store_url: str, tmp_path: Path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))
    yield s
    await s.close()


def message(message_id: str, *, days_ago: int = 0) -> MessageRecord:
    return MessageRecord(message_id=message_id, date=None, from_="anna@corp.example", subject="Payroll",
                         source_reference="1-T", recipients=["client@supplier.example"], mapping={PL: "2-T"},
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
