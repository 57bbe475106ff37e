"""Message records in the SQL backends: written in shared transactions after the
upstream's 250 (group commit), read back for thread look-ups, pruned by age.

`MessageRecords` is the part of `SqlStore` that keeps them; a backend supplies
`_insert_messages` (SQLite runs `message_inserts` on its records thread,
PostgreSQL one statement).
"""

from __future__ import annotations

import abc
import asyncio
import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from smtpgate.mail.msgid import normalize_message_id
from smtpgate.store.base import MessageRecord, ThreadHit, as_utc, utcnow

if TYPE_CHECKING:
    from smtpgate.store.group import GroupCommit

log = structlog.get_logger()

# How long (seconds) a message record nobody waits for waits for others to share its
# commit (group.py's linger). Recorded after the client's 250, it is what a kill -9 can
# lose on top of the commit running then (docs/architecture.md, durability); thread
# look-ups and views do not wait for it.
RECORD_LINGER = 0.02

# Bound parameters per statement: under SQLite's old default limit of 999.
_MAX_PARAMS = 900

_MESSAGE_COLUMNS = (
    "message_id, source_reference, source_key, date, from_addr, subject, recipients, mapping, relayed_at, shared"
)


@dataclass(frozen=True)
class MessageRow:
    """One message record as the messages table stores it, and the activities it names."""

    values: tuple[Any, ...]  # in _MESSAGE_COLUMNS order
    references: list[str]

    @property
    def key(self) -> tuple[str, str]:
        """(message_id, source_key): the unique key of the messages table."""
        return (self.values[0], self.values[2])


class MessageRecords(abc.ABC):
    """Message records over SQL: the part of SqlStore that keeps them. It uses the
    store's `records` (the group commit), `_lookup`, `_write` and `_ts`."""

    records: GroupCommit[MessageRecord]

    async def find_thread(self, message_ids: Sequence[str]) -> ThreadHit | None:
        hits = await self.thread_hits(message_ids)
        return hits[0] if hits else None

    async def thread_hits(self, message_ids: Sequence[str]) -> list[ThreadHit]:
        wanted = [normalize_message_id(m) for m in message_ids if m and m.strip()]
        if not wanted:
            return []
        unique = list(dict.fromkeys(wanted))
        marks = ", ".join("?" for _ in unique)
        # A reply may follow its message before that message's record is committed.
        await self.records.settled()
        async with self._lookup() as tx:
            rows = await tx.fetchall(
                "SELECT m.message_id, m.source_reference, m.mapping, a.mailbox, m.from_addr, m.recipients"
                " FROM messages m LEFT JOIN activities a ON a.reference = m.source_reference"
                f" WHERE m.message_id IN ({marks}) AND m.source_reference IS NOT NULL"
                " ORDER BY m.relayed_at DESC, m.id DESC",
                *unique,
            )
        newest: dict[str, Sequence[Any]] = {}
        for row in rows:
            newest.setdefault(row[0], row)
        return [
            ThreadHit(message_id=message_id, source_reference=row[1], source_mailbox=row[3],
                      mapping=dict(json.loads(row[2])), from_=row[4], recipients=tuple(json.loads(row[5])))
            for message_id in unique
            if (row := newest.get(message_id)) is not None
        ]

    def queue_message(self, record: MessageRecord, *, urgent: bool = False) -> asyncio.Future[None]:
        # Committed with whatever other sessions recorded meanwhile: one
        # transaction and one fsync for the lot.
        return self.records.add(record, urgent=urgent)

    async def _record_batch(self, records: list[MessageRecord]) -> None:
        """Insert the records in one write transaction. A record already stored
        (same Message-ID and source) is left as it is; so is the second of two
        such records in one batch."""
        rows: dict[tuple[str, str], MessageRow] = {}
        for record in records:
            row = MessageRow(
                values=(
                    normalize_message_id(record.message_id),
                    record.source_reference,
                    record.source_reference or "",
                    record.date,
                    record.from_,
                    record.subject,
                    json.dumps(list(record.recipients)),
                    json.dumps(dict(record.mapping), sort_keys=True),
                    self._ts(as_utc(record.relayed_at)),
                    json.dumps(list(record.shared)) if record.shared else None,
                ),
                references=_named_activities(record),
            )
            rows.setdefault(row.key, row)
        await self._insert_messages(list(rows.values()))

    @abc.abstractmethod
    async def _insert_messages(self, rows: list[MessageRow]) -> None:
        """Insert message rows (unique keys) and their activities in one transaction
        (SQLite: `message_inserts` on its records thread; PostgreSQL: one statement)."""

    async def prune_messages(self, keep_days: int) -> int:
        if keep_days < 0:
            raise ValueError("keep_days must not be negative")
        cutoff = self._ts(utcnow() - timedelta(days=keep_days))
        async with self._write() as tx:
            await tx.execute(
                "DELETE FROM message_activities WHERE message IN"
                " (SELECT id FROM messages WHERE relayed_at < ?)",
                cutoff,
            )
            rows = await tx.fetchall("DELETE FROM messages WHERE relayed_at < ? RETURNING id", cutoff)
        if rows:
            log.info("store.pruned", messages=len(rows), keep_days=keep_days)
        return len(rows)


def message_inserts(rows: list[MessageRow]) -> Generator[tuple[str, list[Any]], Any, None]:
    """The statements that insert message rows (unique keys) and their
    activities, as (sql, arguments); each yield takes that statement's rows
    back, so a backend can run them all in one call on its own thread."""
    width = len(rows[0].values)
    ids: dict[tuple[str, str], Any] = {}
    for chunk in _chunks(rows, _MAX_PARAMS // width):
        marks = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk))
        inserted = yield (
            f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES {marks}"
            " ON CONFLICT (message_id, source_key) DO NOTHING"
            " RETURNING id, message_id, source_key",
            [value for row in chunk for value in row.values],
        )
        ids.update({(r[1], r[2]): r[0] for r in inserted})
    # A row not inserted is a retry of a message already recorded: no activities.
    activities = [(ids[row.key], ref) for row in rows if row.key in ids for ref in row.references]
    for chunk in _chunks(activities, _MAX_PARAMS // 2):
        yield (
            "INSERT INTO message_activities (message, reference) VALUES " + ", ".join(["(?, ?)"] * len(chunk)),
            [value for pair in chunk for value in pair],
        )


def _named_activities(record: MessageRecord) -> list[str]:
    """The activities a message record is listed under: its source and every mapped one."""
    references = {ref for ref in record.mapping.values() if ref}
    if record.source_reference:
        references.add(record.source_reference)
    return sorted(references)



def _chunks(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]
