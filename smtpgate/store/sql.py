"""The link logic shared by the SQL backends, written once against a small
transaction interface; the backends supply connections, locking and the
dialect's few differences."""

from __future__ import annotations

import abc
import json
import re
import string
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from smtpgate.store import migrations as migrations_module
from smtpgate.store.base import (
    LINKS_OF_LIMIT,
    ActivityRow,
    ActivityView,
    AllocationContext,
    AllocationRequest,
    LinkedActivity,
    LinkOutcome,
    LinkRow,
    LinkTarget,
    MessageRecord,
    MessageView,
    Store,
    as_utc,
    utcnow,
)
from smtpgate.store.errors import AllocationError, LinkConflict, StoreError
from smtpgate.store.group import GroupCommit
from smtpgate.store.listing import Listing
from smtpgate.store.records import RECORD_LINGER, MessageRecords
from smtpgate.store.transfer import TransferMixin

if TYPE_CHECKING:
    from smtpgate.store.base import Allocator

log = structlog.get_logger()

# Serialises schema migrations across processes and nodes.
SCHEMA_LOCK_KEY = "smtpgate:schema"

# The activities linked to a source (three parameters: the source reference), newest
# link first: find_link's one mailbox and links_of's every mailbox read the same rows.
_LINKED = (
    "SELECT {columns} FROM links l JOIN activities a"
    " ON a.reference = (CASE WHEN l.lo = ? THEN l.hi ELSE l.lo END)"
    " WHERE (l.lo = ? OR l.hi = ?){mailbox}"
    " ORDER BY l.created_at DESC, l.id DESC"
)

# How many activity owners a process remembers (a few hundred kB).
_KNOWN_OWNERS = 10_000

class Tx(Protocol):
    """One connection, inside or outside a transaction; SQL uses `?` placeholders."""

    async def execute(self, sql: str, *args: Any) -> None: ...

    async def fetchall(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...

    async def fetchone(self, sql: str, *args: Any) -> Sequence[Any] | None: ...


def template_affixes(template: str) -> tuple[str, str] | None:
    """(prefix, suffix) around the one `{n}` field of a new_reference template
    whose numbers are plain decimal digits (`{n}`, `{n:06d}`), else None."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        return None
    fields = [i for i, part in enumerate(parts) if part[1] is not None]
    if len(fields) != 1:
        return None
    _, name, spec, conversion = parts[fields[0]]
    if name != "n" or conversion is not None or not re.fullmatch(r"0?[0-9]*d?", spec or ""):
        return None
    prefix = "".join(part[0] for part in parts[: fields[0] + 1])
    suffix = "".join(part[0] for part in parts[fields[0] + 1 :])
    return prefix, suffix


def _like_literal(text: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", text)


def link_lock_key(source_reference: str, mailbox: str) -> str:
    """The lock name that serialises get-or-create for one (source, mailbox) pair."""
    return f"smtpgate:link:{source_reference} {mailbox}"


class _Untaggable(Exception):
    """The allocated reference cannot tag the mailbox: the transaction rolls back."""


class _Numbers:
    """The local sequence, bound to one write transaction."""

    def __init__(self, store: SqlStore, tx: Tx) -> None:
        self._store = store
        self._tx = tx

    async def next_number(self, first_number: int) -> int:
        row = await self._tx.fetchone(self._store.NEXT_NUMBER_SQL, first_number, first_number)
        assert row is not None
        return int(row[0])

    async def is_known(self, reference: str) -> bool:
        row = await self._tx.fetchone("SELECT 1 FROM activities WHERE reference = ?", reference)
        return row is not None


class SqlStore(TransferMixin, Listing, MessageRecords, Store):
    """A Store over SQL; subclasses provide `_read`, `_write` and the dialect."""

    # Takes the next number atomically; parameters: first_number twice.
    NEXT_NUMBER_SQL: str
    # Sets the next number to at least the parameter, never lowering it.
    RAISE_SEQUENCE_SQL: str
    # True when the SQL expression `{}` is one or more ASCII digits.
    ALL_DIGITS_SQL: str

    def __init__(self, allocator: Allocator | None) -> None:
        self.allocator = allocator
        # Message records of concurrent sessions share one transaction (group.py);
        # one nobody waits for lingers RECORD_LINGER for more to share it.
        self.records: GroupCommit[MessageRecord] = GroupCommit(self._record_batch, linger=RECORD_LINGER)
        # Activity owners read from the store, newest last. A recorded owner never
        # changes (the stored owner is kept against contrary evidence), so
        # what was read once holds for every process and node; see _learn_owner.
        self._owners: OrderedDict[str, str] = OrderedDict()

    # -- what a backend provides ------------------------------------------

    @abc.abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for reads, outside any write transaction."""

    def _lookup(self) -> AbstractAsyncContextManager[Tx]:
        """A connection for the look-ups on a message's path (links, owners,
        threads): short reads by index. A backend may answer them faster than
        `_read`; by default they are reads like any other."""
        return self._read()

    @abc.abstractmethod
    def _write(self, lock_key: str | None = None) -> AbstractAsyncContextManager[Tx]:
        """A write transaction, committed on normal exit, rolled back on any
        exception; with lock_key, no other transaction holding the same key
        runs at the same time (in any process or node)."""

    @abc.abstractmethod
    def _migrations(self) -> list[migrations_module.Migration]:
        """The dialect's migrations."""

    @abc.abstractmethod
    async def _has_schema_table(self, tx: Tx) -> bool:
        """True when the smtpgate_schema table exists."""

    @abc.abstractmethod
    def _ts(self, value: datetime) -> Any:
        """A timestamp as the database stores it."""

    @abc.abstractmethod
    def _dt(self, value: Any) -> datetime:
        """A stored timestamp as an aware UTC datetime."""

    # -- schema -----------------------------------------------------------

    def latest_version(self) -> int:
        """The schema version this smtpgate expects."""
        return migrations_module.latest(self._migrations())

    async def _version(self, tx: Tx) -> int:
        if not await self._has_schema_table(tx):
            return 0
        row = await tx.fetchone("SELECT MAX(version) FROM smtpgate_schema")
        return int(row[0]) if row and row[0] is not None else 0

    async def schema_version(self) -> int:
        async with self._read() as tx:
            return await self._version(tx)

    def _schema_write(self) -> AbstractAsyncContextManager[Tx]:
        """The write transaction migrations run in, exclusive across processes and nodes."""
        return self._write(SCHEMA_LOCK_KEY)

    async def upgrade(self) -> tuple[int, int]:
        async with self._schema_write() as tx:
            # Read again under the lock: another process may have just upgraded.
            before = await self._version(tx)
            if before > self.latest_version():
                raise StoreError(
                    f"database schema version {before} is newer than this smtpgate "
                    f"(version {self.latest_version()}); upgrade smtpgate"
                )
            if before == 0 and not await self._has_schema_table(tx):
                await tx.execute(
                    "CREATE TABLE smtpgate_schema ("
                    " version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
                    " applied_at TEXT NOT NULL)"
                )
            after = before
            for version, description, statements in sorted(self._migrations()):
                if version <= before:
                    continue
                for statement in statements:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO smtpgate_schema (version, description, applied_at) VALUES (?, ?, ?)",
                    version,
                    description,
                    utcnow().isoformat(),
                )
                after = version
        if after != before:
            log.info("store.upgraded", from_version=before, to_version=after)
        return before, after

    # -- activities -------------------------------------------------------

    async def _canonical_reference(self, tx: Tx, reference: str) -> str:
        """The spelling the store knows reference by: itself when it is known as
        written, else a known reference equal to it ignoring case (the
        upper-case spelling first), else itself."""
        row = await tx.fetchone(
            "SELECT reference FROM activities WHERE reference = ?"
            " UNION ALL SELECT reference FROM message_activities WHERE reference = ? LIMIT 1",
            reference,
            reference,
        )
        if row is not None:
            return reference
        row = await tx.fetchone(
            "SELECT reference FROM activities WHERE lower(reference) = lower(?)"
            " UNION SELECT reference FROM message_activities WHERE lower(reference) = lower(?)"
            " ORDER BY 1 LIMIT 1",
            reference,
            reference,
        )
        return row[0] if row else reference

    async def activity_mailbox(self, reference: str) -> str | None:
        known = self._known_owner(reference)
        if known is not None:
            return known
        async with self._lookup() as tx:
            row = await tx.fetchone("SELECT mailbox FROM activities WHERE reference = ?", reference)
        mailbox = row[0] if row else None
        self._learn_owner(reference, mailbox)
        return mailbox

    def _known_owner(self, reference: str) -> str | None:
        mailbox = self._owners.get(reference)
        if mailbox is not None:
            self._owners.move_to_end(reference)
        return mailbox

    def _learn_owner(self, reference: str, mailbox: str | None) -> None:
        # Only owners: an activity without one may get one any time, from any node.
        if mailbox is None:
            return
        self._owners[reference] = mailbox
        self._owners.move_to_end(reference)
        if len(self._owners) > _KNOWN_OWNERS:
            self._owners.popitem(last=False)

    async def _remember(self, tx: Tx, owners: dict[str, str | None], now: datetime) -> None:
        # Sorted, so that concurrent transactions lock activity rows in one
        # order and cannot deadlock each other.
        for reference in sorted(owners):
            mailbox = owners[reference]
            await tx.execute(
                "INSERT INTO activities (reference, mailbox, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (reference) DO UPDATE SET mailbox = excluded.mailbox "
                "WHERE activities.mailbox IS NULL AND excluded.mailbox IS NOT NULL",
                reference,
                mailbox,
                self._ts(now),
            )

    async def record_activity(self, reference: str, mailbox: str) -> None:
        if await self.activity_mailbox(reference) is not None:
            return  # the common case needs no write lock
        async with self._write() as tx:
            await self._remember(tx, {reference: mailbox}, utcnow())

    # -- links ------------------------------------------------------------

    async def _linked_owned_by(self, tx: Tx, reference: str, mailbox: str) -> str | None:
        row = await tx.fetchone(
            _LINKED.format(columns="a.reference", mailbox=" AND a.mailbox = ?") + " LIMIT 1",
            reference,
            reference,
            reference,
            mailbox,
        )
        return row[0] if row else None

    async def links_of(self, source_reference: str, limit: int = LINKS_OF_LIMIT) -> dict[str, str] | None:
        async with self._lookup() as tx:
            rows = await tx.fetchall(
                _LINKED.format(columns="a.mailbox, a.reference", mailbox="") + " LIMIT ?",
                source_reference,
                source_reference,
                source_reference,
                limit + 1,
            )
        if len(rows) > limit:
            return None
        newest: dict[str, str] = {}
        for mailbox, reference in rows:
            if mailbox is not None:
                newest.setdefault(mailbox, reference)
        return newest

    async def _insert_link(
        self, tx: Tx, source: str, target: str, message_id: str | None, now: datetime
    ) -> bool:
        lo, hi = sorted((source, target))
        rows = await tx.fetchall(
            "INSERT INTO links (source_reference, target_reference, lo, hi, created_at, message_id)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (lo, hi) DO NOTHING RETURNING id",
            source,
            target,
            lo,
            hi,
            self._ts(now),
            message_id,
        )
        return bool(rows)

    async def find_link(self, source_reference: str, mailbox: str) -> str | None:
        async with self._lookup() as tx:
            return await self._linked_owned_by(tx, source_reference, mailbox)

    async def get_or_create_link(
        self,
        source_reference: str,
        source_mailbox: str | None,
        target: LinkTarget,
        context: AllocationContext,
    ) -> LinkOutcome | None:
        async with self._lookup() as tx:
            existing = await self._linked_owned_by(tx, source_reference, target.mailbox)
        if existing is not None:
            return LinkOutcome(existing, created=False)
        if not target.allow_create:
            return None
        if self.allocator is None:
            raise AllocationError("allocator: none configured; cannot create a linked activity")
        try:
            return await self._create_link(source_reference, source_mailbox, target, context)
        except _Untaggable:
            return None  # allow_create and None: the caller reports the mailbox untaggable

    async def _create_link(
        self,
        source_reference: str,
        source_mailbox: str | None,
        target: LinkTarget,
        context: AllocationContext,
    ) -> LinkOutcome:
        async with self._write(link_lock_key(source_reference, target.mailbox)) as tx:
            # Again under the lock: a racer may have created it meanwhile.
            existing = await self._linked_owned_by(tx, source_reference, target.mailbox)
            if existing is not None:
                return LinkOutcome(existing, created=False)
            request = AllocationRequest(
                source_reference=source_reference,
                mailbox=target.mailbox,
                team=target.team,
                new_reference=target.new_reference,
                subject=context.subject,
                from_=context.from_,
                message_id=context.message_id,
            )
            reference = await self.allocator.allocate(request, _Numbers(self, tx))
            if target.max_reference_length is not None and len(reference.encode()) > target.max_reference_length:
                raise _Untaggable(reference)
            if reference == source_reference:
                raise AllocationError(f"allocator: answered the source reference {reference}")
            row = await tx.fetchone("SELECT mailbox FROM activities WHERE reference = ?", reference)
            if row is not None and row[0] is not None and row[0] != target.mailbox:
                raise AllocationError(
                    f"allocator: allocated reference {reference} belongs to {row[0]}, not {target.mailbox}"
                )
            now = utcnow()
            await self._remember(tx, {reference: target.mailbox, source_reference: source_mailbox}, now)
            await self._insert_link(tx, source_reference, reference, context.message_id, now)
        return LinkOutcome(reference, created=True)

    async def _link_known(
        self, source: str, source_mailbox: str | None, target: str, target_mailbox: str
    ) -> bool:
        """True when the link exists and recording it would change no owner either."""
        lo, hi = sorted((source, target))
        async with self._lookup() as tx:
            rows = await tx.fetchall(
                "SELECT a.reference, a.mailbox FROM links l JOIN activities a"
                " ON a.reference IN (l.lo, l.hi) WHERE l.lo = ? AND l.hi = ?",
                lo,
                hi,
            )
        owners = {row[0]: row[1] for row in rows}
        return all(
            reference in owners and (owners[reference] is not None or mailbox is None)
            for reference, mailbox in ((source, source_mailbox), (target, target_mailbox))
        )

    async def record_link(
        self,
        source_reference: str,
        source_mailbox: str | None,
        target_reference: str,
        target_mailbox: str,
        message_id: str | None,
    ) -> bool:
        if source_reference == target_reference:
            return False  # an activity is not linked to itself
        if await self._link_known(source_reference, source_mailbox, target_reference, target_mailbox):
            return False  # a reply-all naming both tags again: nothing to write
        async with self._write() as tx:
            now = utcnow()
            await self._remember(
                tx, {source_reference: source_mailbox, target_reference: target_mailbox}, now
            )
            created = await self._insert_link(tx, source_reference, target_reference, message_id, now)
        return created

    # -- corrections by hand (smtpgate links add|delete) -------------------

    async def add_link(
        self, source_reference: str, target_reference: str, target_mailbox: str, *, by: str
    ) -> bool:
        async with self._write() as tx:
            source = await self._canonical_reference(tx, source_reference)
            target = await self._canonical_reference(tx, target_reference)
            if source.lower() == target.lower():
                raise LinkConflict(f"an activity is not linked to itself ({source})")
            row = await tx.fetchone("SELECT mailbox FROM activities WHERE reference = ?", target)
            if row is not None and row[0] is not None and row[0] != target_mailbox:
                raise LinkConflict(f"{target} belongs to {row[0]}, not {target_mailbox}")
            now = utcnow()
            await self._remember(tx, {source: None, target: target_mailbox}, now)
            created = await self._insert_link(tx, source, target, None, now)
        if created:
            log.info("link.added", source_reference=source, reference=target, mailbox=target_mailbox, by=by)
        return created

    async def delete_link(self, reference: str, other: str, *, by: str) -> bool:
        async with self._write() as tx:
            one = await self._canonical_reference(tx, reference)
            two = await self._canonical_reference(tx, other)
            lo, hi = sorted((one, two))
            rows = await tx.fetchall(
                "DELETE FROM links WHERE lo = ? AND hi = ? RETURNING source_reference, target_reference",
                lo,
                hi,
            )
        if not rows:
            return False
        log.info("link.deleted", source_reference=rows[0][0], reference=rows[0][1], by=by)
        return True

    async def export(self) -> tuple[list[ActivityRow], list[LinkRow]]:
        # Links first: an activity is written with its link and never deleted,
        # so every exported link finds both its activities in the second read.
        links = await self.list_links()
        async with self._read() as tx:
            rows = await tx.fetchall(
                "SELECT reference, mailbox, created_at FROM activities ORDER BY created_at, reference"
            )
        activities = [ActivityRow(reference=r[0], mailbox=r[1], created_at=self._dt(r[2])) for r in rows]
        return activities, links

    # -- the local sequence -----------------------------------------------

    async def _highest_number(self, tx: Tx, template: str) -> tuple[int, str] | None:
        """The highest n for which template.format(n=n) is a reference the store knows."""
        affixes = template_affixes(template)
        if affixes is None:
            return None
        prefix, suffix = affixes
        middle = f"substr(reference, {len(prefix) + 1}, length(reference) - {len(prefix) + len(suffix)})"
        rows = await tx.fetchall(
            "SELECT reference FROM activities WHERE reference LIKE ? ESCAPE '\\'"
            f" AND length(reference) > ? AND {self.ALL_DIGITS_SQL.format(middle)}"
            " ORDER BY length(reference) DESC, reference DESC LIMIT 20",
            _like_literal(prefix) + "%" + _like_literal(suffix),
            len(prefix) + len(suffix),
        )
        for (reference,) in rows:
            number = int(reference[len(prefix) : len(reference) - len(suffix)])
            if template.format(n=number) == reference:  # LIKE may ignore case, padding may differ
                return number, reference
        return None

    async def raise_sequence(self, templates: Sequence[str], first_number: int) -> int | None:
        highest: tuple[int, str] | None = None
        async with self._read() as tx:
            for template in dict.fromkeys(templates):
                found = await self._highest_number(tx, template)
                if found is not None and (highest is None or found[0] > highest[0]):
                    highest = found
        if highest is None or highest[0] < first_number:
            return None
        async with self._write() as tx:
            row = await tx.fetchone("SELECT next_number FROM allocator_sequence WHERE name = 'local'")
            current = int(row[0]) if row else None
            if current is not None and current > highest[0]:
                return None
            await tx.execute(self.RAISE_SEQUENCE_SQL, highest[0] + 1)
        # A restored older store, or references seeded by hand: never issue them again.
        log.warning(
            "allocator.sequence_raised",
            next_number=highest[0] + 1,
            previous_next_number=current if current is not None else first_number,
            highest_reference=highest[1],
        )
        return highest[0] + 1

    # -- views ------------------------------------------------------------

    async def show(self, reference: str) -> ActivityView | None:
        await self.records.settled()
        async with self._read() as tx:
            reference = await self._canonical_reference(tx, reference)
            activity = await tx.fetchone("SELECT mailbox FROM activities WHERE reference = ?", reference)
            link_rows = await tx.fetchall(
                "SELECT x.other, a.mailbox, x.created_at, x.message_id FROM"
                " (SELECT CASE WHEN lo = ? THEN hi ELSE lo END AS other, created_at, message_id, id"
                "  FROM links WHERE lo = ? OR hi = ?) x"
                " LEFT JOIN activities a ON a.reference = x.other"
                " ORDER BY x.created_at, x.id",
                reference,
                reference,
                reference,
            )
            message_rows = await tx.fetchall(
                "SELECT m.message_id, m.date, m.from_addr, m.subject, m.recipients,"
                " m.source_reference, m.relayed_at, m.shared"
                " FROM messages m JOIN message_activities ma ON ma.message = m.id"
                " WHERE ma.reference = ? ORDER BY m.relayed_at, m.id",
                reference,
            )
        if activity is None and not link_rows and not message_rows:
            return None
        return ActivityView(
            reference=reference,
            mailbox=activity[0] if activity else None,
            links=[
                LinkedActivity(reference=r[0], mailbox=r[1], created_at=self._dt(r[2]), message_id=r[3])
                for r in link_rows
            ],
            messages=[
                MessageView(
                    message_id=r[0],
                    date=r[1],
                    from_=r[2],
                    subject=r[3],
                    recipients=list(json.loads(r[4])),
                    source_reference=r[5],
                    relayed_at=self._dt(r[6]),
                    shared=list(json.loads(r[7])) if r[7] else [],
                )
                for r in message_rows
            ],
        )

    async def list_links(
        self, mailbox: str | None = None, since: datetime | None = None
    ) -> list[LinkRow]:
        where: list[str] = []
        args: list[Any] = []
        if mailbox is not None:
            where.append("(s.mailbox = ? OR t.mailbox = ?)")
            args += [mailbox, mailbox]
        if since is not None:
            where.append("l.created_at >= ?")
            args.append(self._ts(as_utc(since)))
        sql = (
            "SELECT l.source_reference, s.mailbox, l.target_reference, t.mailbox,"
            " l.created_at, l.message_id FROM links l"
            " LEFT JOIN activities s ON s.reference = l.source_reference"
            " LEFT JOIN activities t ON t.reference = l.target_reference"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY l.created_at, l.id"
        async with self._read() as tx:
            rows = await tx.fetchall(sql, *args)
        return [
            LinkRow(
                source_reference=r[0],
                source_mailbox=r[1],
                target_reference=r[2],
                target_mailbox=r[3],
                created_at=self._dt(r[4]),
                message_id=r[5],
            )
            for r in rows
        ]
