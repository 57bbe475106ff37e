"""Searching the activities list (smtpgate/store/listing.py): the searched text
is matched as it is, its quotes, % and _ included."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from smtpgate.store import MessageRecord, open_store
from smtpgate.store.base import ActivityQuery
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"


@pytest.fixture
async def store(store_url: str, tmp_path: Path):  # noqa: F811
    s = await open_store(store_url, base_dir=tmp_path)
    yield s
    await s.close()


async def with_subjects(store, *subjects: str) -> None:
    for n, subject in enumerate(subjects, start=1):
        await store.record_activity(f"{n}-T", UK)
        await store.record_message(MessageRecord(
            message_id=f"<m{n}@corp.example>", date=None, from_="anna@corp.example", subject=subject,
            source_reference=f"{n}-T", recipients=["client@supplier.example"], mapping={PL: f"{n + 100}-T"},
            relayed_at=datetime.now(timezone.utc)))


async def found(store, q: str) -> list[str]:
    rows, _ = await store.list_activities(ActivityQuery(own=(UK,), q=q))
    return sorted(r.reference for r in rows)


@pytest.mark.parametrize("q", ["0%", "5_", '"Q7"', 'Re: "Q7'])
async def test_quotes_percent_signs_and_underscores_match_themselves(store, q):
    await with_subjects(store, 'Re: "Q7" payroll', "Raise of 50% in Q7", "Code 5_A", "Q7 and 507 and 5A")
    expected = {"0%": ["2-T"], "5_": ["3-T"], '"Q7"': ["1-T"], 'Re: "Q7': ["1-T"]}[q]
    assert await found(store, q) == expected


async def test_a_search_ignores_the_case_of_letters_beyond_ascii(store):
    await with_subjects(store, "ŻÓŁW i Ärger", "Zolw und Arger")
    assert await found(store, "żółw") == ["1-T"]
    assert await found(store, "ÄRGER") == ["1-T"]


async def test_a_whole_message_id_finds_its_message_not_a_subject_quoting_it(store):
    await with_subjects(store, "Invoice", "Re: <m1@corp.example>")
    assert await found(store, "<m1@corp.example>") == ["1-T"]
    assert await found(store, "m1@corp.example") == ["1-T", "2-T"]  # text: in a subject too
