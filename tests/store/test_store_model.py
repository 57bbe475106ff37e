"""Property: any sequence of link operations matches a small in-memory model (SQLite)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.store.allocation import LocalAllocator
from smtpgate.store import AllocationContext, LinkOutcome, LinkTarget, open_store

REFS = [f"{n}-T" for n in range(1, 6)]
MAILBOXES = ["a@corp.example", "b@corp.example", "c@corp.example"]
owner = st.one_of(st.none(), st.sampled_from(MAILBOXES))

get_or_create = st.tuples(
    st.just("get"), st.sampled_from(REFS), owner, st.sampled_from(MAILBOXES), st.booleans()
)
record_link = st.tuples(
    st.just("record"), st.sampled_from(REFS), owner, st.sampled_from(REFS), st.sampled_from(MAILBOXES)
)


class Model:
    def __init__(self, first_number: int) -> None:
        self.owners: dict[str, str | None] = {}
        self.links: list[frozenset[str]] = []  # oldest first
        self.next_number = first_number

    def remember(self, reference: str, mailbox: str | None) -> None:
        if self.owners.get(reference) is None:
            self.owners[reference] = mailbox

    def add_link(self, a: str, b: str) -> bool:
        pair = frozenset((a, b))
        if pair in self.links:
            return False
        self.links.append(pair)
        return True

    def get(self, source, source_mailbox, mailbox, allow):
        for pair in reversed(self.links):
            if source in pair:
                (other,) = pair - {source}
                if self.owners.get(other) == mailbox:
                    return LinkOutcome(other, False)
        if not allow:
            return None
        while True:
            reference = f"{self.next_number}-T"
            self.next_number += 1
            if reference != source and reference not in self.owners:
                break
        self.remember(reference, mailbox)
        self.remember(source, source_mailbox)
        self.add_link(source, reference)
        return LinkOutcome(reference, True)

    def record(self, source, source_mailbox, target, target_mailbox):
        if source == target:
            return False
        self.remember(source, source_mailbox)
        self.remember(target, target_mailbox)
        return self.add_link(source, target)


async def run(operations) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = await open_store("sqlite:s.db", base_dir=Path(folder), allocator=LocalAllocator(3))
        model = Model(3)
        ctx = AllocationContext(None, None, None)
        try:
            for op in operations:
                if op[0] == "get":
                    _, source, source_mailbox, mailbox, allow = op
                    got = await store.get_or_create_link(
                        source, source_mailbox, LinkTarget(mailbox, "T", "{n}-T", allow), ctx
                    )
                    assert got == model.get(source, source_mailbox, mailbox, allow), op
                else:
                    _, source, source_mailbox, target, target_mailbox = op
                    got = await store.record_link(source, source_mailbox, target, target_mailbox, None)
                    assert got == model.record(source, source_mailbox, target, target_mailbox), op
            for reference, mailbox in model.owners.items():
                assert await store.activity_mailbox(reference) == mailbox
                view = await store.show(reference)
                linked = {next(iter(p - {reference})) for p in model.links if reference in p}
                assert {link.reference for link in view.links} == linked
        finally:
            await store.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(get_or_create, record_link), max_size=25))
def test_store_matches_the_model(operations):
    asyncio.run(run(operations))
