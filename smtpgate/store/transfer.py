"""`smtpgate links export` and `links import`: the store's activities, links and (when
asked) message records as one JSON object, and that object read back.

An export imported into an empty store shows the same in `links show`: each activity's
mailbox, each link with its direction, created_at and Message-ID, and each message
record. Importing changes nothing that is already there (a second run of the same file
adds nothing), never changes an activity's owner the store already knows, and refuses
an export made by an smtpgate whose store schema is newer than this one's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from smtpgate.store.base import ActivityRow, LinkRow, MessageRecord, from_iso, iso_utc

__all__ = ["Backup", "BackupError", "ImportCounts", "TransferMixin", "export_object", "read_backup"]


class BackupError(ValueError):
    """The file is not an export this smtpgate can import; the message says why."""


@dataclass(frozen=True)
class Backup:
    """The content of one export file."""

    schema: int
    activities: list[ActivityRow]
    links: list[LinkRow]
    messages: list[MessageRecord] | None  # None: exported without them


@dataclass
class ImportCounts:
    """What an import changed; all zero on a second run of the same file."""

    activities: int = 0
    owners: int = 0  # activities the store knew without an owner and now have one
    links: int = 0
    messages: int = 0
    conflicts: list[str] = field(default_factory=list)  # owners the store already knew otherwise


def export_object(backup: Backup, teams: Mapping[str, str], exported_at: datetime) -> dict:
    """The `links export --json` object; links as `links list --json` gives them."""

    def side(reference: str, mailbox: str | None) -> dict:
        return {"reference": reference, "mailbox": mailbox, "team": teams.get(mailbox) if mailbox else None}

    shown: dict[str, Any] = {
        "exported_at": iso_utc(exported_at),
        "schema": backup.schema,
        "activities": [dict(side(a.reference, a.mailbox), created_at=iso_utc(a.created_at)) for a in backup.activities],
        "links": [
            {"source": side(row.source_reference, row.source_mailbox),
             "target": side(row.target_reference, row.target_mailbox),
             "created_at": iso_utc(row.created_at), "message_id": row.message_id}
            for row in backup.links
        ],
    }
    if backup.messages is not None:
        shown["messages"] = [
            {"message_id": m.message_id, "date": m.date, "from": m.from_, "subject": m.subject,
             "source_reference": m.source_reference, "recipients": list(m.recipients),
             "mapping": dict(m.mapping), "relayed_at": iso_utc(m.relayed_at), "shared": list(m.shared)}
            for m in backup.messages
        ]
    return shown


# ---------------------------------------------------------------- reading a file


class _Reader:
    """Typed access to the export object; each problem names where it is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, where: str, problem: str) -> BackupError:
        return BackupError(f"{self.name}: {where}: {problem}")

    def get(self, obj: Any, key: str, where: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, "expected an object")
        value = obj.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            wanted = getattr(kind, "__name__", "value")
            raise self.fail(f"{where}.{key}" if where else key, f"expected {_article(wanted)}, got {value!r:.60}")
        return value

    def time(self, obj: Any, key: str, where: str) -> datetime:
        text = self.get(obj, key, where, str)
        try:
            return from_iso(text)
        except ValueError:
            raise self.fail(f"{where}.{key}", f"expected an ISO 8601 date-time, got {text!r:.60}") from None

    def strings(self, obj: Any, key: str, where: str) -> list[str]:
        values = self.get(obj, key, where, list)
        if not all(isinstance(v, str) for v in values):
            raise self.fail(f"{where}.{key}", "expected a list of strings")
        return values


def _article(kind: str) -> str:
    return {"str": "a string", "int": "a whole number", "list": "a list", "dict": "an object"}.get(kind, kind)


def read_backup(text: str, name: str, latest_schema: int) -> Backup:
    """An export file's content; BackupError for anything this smtpgate cannot import."""
    r = _Reader(name)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BackupError(f"{name}: not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("links"), list):
        raise BackupError(f"{name}: not an export of `smtpgate links export --json`")
    # Exports older than the "schema" key were all made with schema 1.
    schema = r.get(data, "schema", "", int, optional=True) or 1
    if schema > latest_schema:
        raise BackupError(f"{name}: exported from a store with schema version {schema}, newer than this "
                          f"smtpgate knows ({latest_schema}): import it with that smtpgate version or a newer one")
    activities = []
    for i, item in enumerate(r.get(data, "activities", "", list, optional=True) or []):
        where = f"activities[{i}]"
        activities.append(ActivityRow(reference=r.get(item, "reference", where, str),
                                      mailbox=r.get(item, "mailbox", where, str, optional=True),
                                      created_at=r.time(item, "created_at", where)))
    links = []
    for i, item in enumerate(data["links"]):
        where = f"links[{i}]"
        source, target = r.get(item, "source", where, dict), r.get(item, "target", where, dict)
        links.append(LinkRow(
            source_reference=r.get(source, "reference", f"{where}.source", str),
            source_mailbox=r.get(source, "mailbox", f"{where}.source", str, optional=True),
            target_reference=r.get(target, "reference", f"{where}.target", str),
            target_mailbox=r.get(target, "mailbox", f"{where}.target", str, optional=True),
            created_at=r.time(item, "created_at", where),
            message_id=r.get(item, "message_id", where, str, optional=True)))
    messages = None
    if "messages" in data:
        messages = [_message(r, item, f"messages[{i}]") for i, item in enumerate(r.get(data, "messages", "", list))]
    return Backup(schema=schema, activities=activities, links=links, messages=messages)


def _message(r: _Reader, item: Any, where: str) -> MessageRecord:
    mapping = r.get(item, "mapping", where, dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise r.fail(f"{where}.mapping", "expected an object of strings")
    return MessageRecord(
        message_id=r.get(item, "message_id", where, str), date=r.get(item, "date", where, str, optional=True),
        from_=r.get(item, "from", where, str, optional=True), subject=r.get(item, "subject", where, str, optional=True),
        source_reference=r.get(item, "source_reference", where, str, optional=True),
        recipients=r.strings(item, "recipients", where), mapping=mapping, relayed_at=r.time(item, "relayed_at", where),
        shared=r.strings(item, "shared", where) if item.get("shared") is not None else [])


# ---------------------------------------------------------------- the store side


class TransferMixin:
    """SqlStore's export of message records and its import (uses SqlStore's transactions)."""

    async def export_messages(self) -> list[MessageRecord]:
        """Every message record, oldest first."""
        await self.records.settled()  # type: ignore[attr-defined]
        async with self._read() as tx:  # type: ignore[attr-defined]
            rows = await tx.fetchall(
                "SELECT message_id, date, from_addr, subject, source_reference, recipients, mapping, relayed_at,"
                " shared FROM messages ORDER BY relayed_at, id")
        return [MessageRecord(message_id=r[0], date=r[1], from_=r[2], subject=r[3], source_reference=r[4],
                              recipients=list(json.loads(r[5])), mapping=dict(json.loads(r[6])),
                              relayed_at=self._dt(r[7]),  # type: ignore[attr-defined]
                              shared=list(json.loads(r[8])) if r[8] else [])
                for r in rows]

    async def import_backup(self, backup: Backup) -> ImportCounts:
        """Add what the backup has and the store lacks, in one transaction (messages after it)."""
        counts = ImportCounts()
        owners: dict[str, tuple[str | None, datetime]] = {}
        for row in backup.links:  # activities a link names, should the export lack them
            owners.setdefault(row.source_reference, (row.source_mailbox, row.created_at))
            owners.setdefault(row.target_reference, (row.target_mailbox, row.created_at))
        for activity in backup.activities:
            owners[activity.reference] = (activity.mailbox, activity.created_at)
        async with self._write() as tx:  # type: ignore[attr-defined]
            for reference in sorted(owners):  # one lock order, as every writer
                await self._import_activity(tx, reference, *owners[reference], counts)
            for row in backup.links:
                counts.links += await self._import_link(tx, row)
        if backup.messages:
            counts.messages = await self._import_messages(backup.messages)
        return counts

    async def _import_activity(self, tx, reference: str, mailbox: str | None, created_at: datetime,
                               counts: ImportCounts) -> None:
        row = await tx.fetchone("SELECT mailbox FROM activities WHERE reference = ?", reference)
        if row is None:
            await tx.execute("INSERT INTO activities (reference, mailbox, created_at) VALUES (?, ?, ?)",
                             reference, mailbox, self._ts(created_at))  # type: ignore[attr-defined]
            counts.activities += 1
        elif row[0] is None and mailbox is not None:
            await tx.execute("UPDATE activities SET mailbox = ? WHERE reference = ?", mailbox, reference)
            counts.owners += 1
        elif mailbox is not None and row[0] != mailbox:
            counts.conflicts.append(f"{reference}: the store says {row[0]}, the file {mailbox}; kept {row[0]}")

    async def _import_link(self, tx, row: LinkRow) -> int:
        lo, hi = sorted((row.source_reference, row.target_reference))
        if lo == hi:
            return 0
        inserted = await tx.fetchall(
            "INSERT INTO links (source_reference, target_reference, lo, hi, created_at, message_id)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (lo, hi) DO NOTHING RETURNING id",
            row.source_reference, row.target_reference, lo, hi,
            self._ts(row.created_at), row.message_id)  # type: ignore[attr-defined]
        return len(inserted)

    async def _import_messages(self, messages: Sequence[MessageRecord]) -> int:
        from smtpgate.mail.msgid import normalize_message_id

        async with self._read() as tx:  # type: ignore[attr-defined]
            new = [m for m in messages if await tx.fetchone(
                "SELECT 1 FROM messages WHERE message_id = ? AND source_key = ?",
                normalize_message_id(m.message_id), m.source_reference or "") is None]
        if new:
            await self._record_batch(new)  # type: ignore[attr-defined]
        return len({(normalize_message_id(m.message_id), m.source_reference or "") for m in new})
