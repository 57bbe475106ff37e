"""What the admin listener asks of the SQL stores besides one activity's view:
the activities list and its search, and the sign-in sessions.

The list is ordered by (created_at, reference), newest first, and read with
the indexes `activities_created` and `activities_mailbox_created`; a page
ends where the next one starts (`after`, keyset paging: no OFFSET). The
search finds matching messages through a trigram index first (SQLite FTS5,
PostgreSQL pg_trgm; migration 3), then the activities they were relayed for.
Sessions live in the store so that every worker and node honours them and a
sign-out ends one everywhere.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timezone
from typing import Any

from smtpgate.store.base import ActivityQuery, AdminSession, LinkedActivity, ListedActivity

__all__ = ["Listing", "fts_phrase", "like_pattern"]


def like_pattern(text: str) -> str:
    """`%text%` for LIKE/ILIKE with ESCAPE '\\': the text's own %, _ and \\ match themselves."""
    return "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


# A whole Message-ID as stored: <left@right>.
_WHOLE_MESSAGE_ID = re.compile(r"<[^<>\s@]+@[^<>\s]+>")

# Up to this many search hits (or activities of a team), the list starts from them; past it,
# from the list's index, newest first, checking each activity (see Listing._scope).
FEW = 2000


class Listing(abc.ABC):
    """Mixed into SqlStore: needs its `_read`, `_write`, `_ts`, `_dt` and `records`."""

    records: Any
    # The dialect's case-insensitive LIKE.
    LIKE: str

    @abc.abstractmethod
    def _read(self) -> AbstractAsyncContextManager[Any]: ...

    @abc.abstractmethod
    def _write(self, lock_key: str | None = None) -> AbstractAsyncContextManager[Any]: ...

    @abc.abstractmethod
    def _ts(self, value: datetime) -> Any: ...

    @abc.abstractmethod
    def _dt(self, value: Any) -> datetime: ...

    @abc.abstractmethod
    def _search_hits(self, text: str) -> tuple[str, list[Any]]:
        """A SELECT of the ids of messages whose subject or Message-ID contains text
        (ignoring case), and its arguments: the dialect's trigram index."""

    # -- the list ---------------------------------------------------------

    async def _scope(self, tx: Any, query: ActivityQuery) -> tuple[list[str], list[Any]]:
        """WHERE clauses and arguments for the activities `query` may list.

        Each condition has two shapes and the cheaper is chosen by a bounded count: a
        set of references found first (few search hits, a small team) or a check of
        each activity while the list's index is read newest first (many hits, a large
        team: the page fills after a few hundred rows). That check is a scalar
        subquery with LIMIT 1, not EXISTS: PostgreSQL turns an EXISTS under OR into a
        hashed subplan that reads every link or message of the team first."""
        where: list[str] = []
        args: list[Any] = []
        own = query.own
        if own is not None:
            where.append(f"a.mailbox IN ({_marks(own)})" if query.q else f"(a.mailbox IN ({_marks(own)})")
            args += own
        if query.q:
            # Only activities seen in full: a search reveals nothing of another team's messages.
            if _WHOLE_MESSAGE_ID.fullmatch(query.q):
                # A whole Message-ID: that message, by the messages table's unique index.
                hits, hit_args = "SELECT id FROM messages WHERE message_id = ?", [query.q]
            else:
                hits, hit_args = self._search_hits(query.q)
            if await self._broad(tx, hits, hit_args):
                pattern = like_pattern(query.q)
                where.append("(SELECT 1 FROM message_activities ma JOIN messages m ON m.id = ma.message"
                             f" WHERE ma.reference = a.reference AND (m.subject {self.LIKE} ? ESCAPE '\\'"
                             f" OR m.message_id {self.LIKE} ? ESCAPE '\\') LIMIT 1) IS NOT NULL")
                args += [pattern, pattern]
            else:
                where.append("a.reference IN (SELECT ma.reference FROM message_activities ma"
                             f" WHERE ma.message IN ({hits}))")
                args += hit_args
        elif own is not None:
            # Own activities, and the other side of each of their links (header information).
            marks = _marks(own)
            if await self._more_than(tx, f"SELECT reference FROM activities WHERE mailbox IN ({marks})", own, FEW):
                where[-1] += (
                    f" OR (SELECT 1 FROM links l JOIN activities o ON o.reference = l.lo"
                    f" WHERE l.hi = a.reference AND o.mailbox IN ({marks}) LIMIT 1) IS NOT NULL"
                    f" OR (SELECT 1 FROM links l JOIN activities o ON o.reference = l.hi"
                    f" WHERE l.lo = a.reference AND o.mailbox IN ({marks}) LIMIT 1) IS NOT NULL)")
            else:
                where[-1] += (
                    f" OR a.reference IN ("
                    f"SELECT l.hi FROM links l JOIN activities o ON o.reference = l.lo WHERE o.mailbox IN ({marks})"
                    f" UNION ALL "
                    f"SELECT l.lo FROM links l JOIN activities o ON o.reference = l.hi WHERE o.mailbox IN ({marks})))")
            args += [*own, *own]
        if query.mailbox is not None:
            where.append("a.mailbox = ?")
            args.append(query.mailbox)
        if query.since is not None:
            where.append("a.created_at >= ?")
            args.append(self._ts(query.since))
        if query.after is not None:
            at, reference = query.after
            where.append("(a.created_at < ? OR (a.created_at = ? AND a.reference < ?))")
            args += [self._ts(at), self._ts(at), reference]
        return where, args

    async def _broad(self, tx: Any, hits: str, args: list[Any]) -> bool:
        """True when the search `hits` (a SELECT of message ids) finds more than FEW messages."""
        return await self._more_than(tx, hits, args, FEW)

    @staticmethod
    async def _more_than(tx: Any, select: str, args: list[Any], count: int) -> bool:
        row = await tx.fetchone(f"SELECT count(*) FROM ({select} LIMIT {count + 1}) x", *args)
        return bool(row and int(row[0]) > count)

    async def list_activities(self, query: ActivityQuery) -> tuple[list[ListedActivity], tuple[datetime, str] | None]:
        if query.own is not None and not query.own:
            return [], None  # a team without mailboxes owns nothing, so nothing is linked to it either
        await self.records.settled()
        async with self._read() as tx:
            where, args = await self._scope(tx, query)
            sql = "SELECT a.reference, a.mailbox, a.created_at FROM activities a"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY a.created_at DESC, a.reference DESC LIMIT ?"
            rows = list(await tx.fetchall(sql, *args, query.limit + 1))
            more = len(rows) > query.limit
            rows = rows[: query.limit]
            if not rows:
                return [], None
            own = None if query.own is None else set(query.own)
            full = {r[0] for r in rows if own is None or r[1] in own}
            links = await self._links_of_page(tx, [r[0] for r in rows])
            newest = await self._newest_messages(tx, sorted(full))
        listed = [
            ListedActivity(
                reference=r[0], mailbox=r[1], created_at=self._dt(r[2]), links=links.get(r[0], []),
                full=r[0] in full,
                last_message_at=newest[r[0]][0] if r[0] in newest else None,
                last_subject=newest[r[0]][1] if r[0] in newest else None,
            )
            for r in rows
        ]
        last = listed[-1]
        return listed, ((last.created_at, last.reference) if more else None)

    async def _links_of_page(self, tx: Any, references: list[str]) -> dict[str, list[LinkedActivity]]:
        marks = _marks(references)
        rows = await tx.fetchall(
            "SELECT l.lo, l.hi, l.created_at, l.message_id, lo.mailbox, hi.mailbox FROM links l"
            " LEFT JOIN activities lo ON lo.reference = l.lo LEFT JOIN activities hi ON hi.reference = l.hi"
            f" WHERE l.lo IN ({marks}) OR l.hi IN ({marks}) ORDER BY l.created_at, l.id",
            *references, *references)
        wanted = set(references)
        out: dict[str, list[LinkedActivity]] = {}
        for lo, hi, created_at, message_id, lo_mailbox, hi_mailbox in rows:
            for side, other, mailbox in ((lo, hi, hi_mailbox), (hi, lo, lo_mailbox)):
                if side in wanted:
                    out.setdefault(side, []).append(LinkedActivity(
                        reference=other, mailbox=mailbox, created_at=self._dt(created_at), message_id=message_id))
        return out

    async def _newest_messages(self, tx: Any, references: list[str]) -> dict[str, tuple[datetime, str | None]]:
        """Per reference, the relayed time and subject of its newest message record."""
        if not references:
            return {}
        rows = await tx.fetchall(
            "SELECT ma.reference, m.relayed_at, m.subject, m.id FROM message_activities ma"
            f" JOIN messages m ON m.id = ma.message WHERE ma.reference IN ({_marks(references)})",
            *references)
        best: dict[str, tuple[Any, int, str | None]] = {}
        for reference, relayed_at, subject, message in rows:
            known = best.get(reference)
            if known is None or (relayed_at, message) > (known[0], known[1]):
                best[reference] = (relayed_at, message, subject)
        return {reference: (self._dt(v[0]), v[2]) for reference, v in best.items()}

    # -- sign-in sessions -------------------------------------------------

    async def create_session(self, session_id: str, team: str, token: str, expires_at: datetime) -> None:
        now = datetime.now(timezone.utc)
        async with self._write() as tx:
            await tx.execute("DELETE FROM admin_sessions WHERE expires_at <= ?", self._ts(now))
            await tx.execute(
                "INSERT INTO admin_sessions (id, team, token, created_at, expires_at) VALUES (?, ?, ?, ?, ?)",
                session_id, team, token, self._ts(now), self._ts(expires_at))

    async def find_session(self, session_id: str) -> AdminSession | None:
        async with self._read() as tx:
            row = await tx.fetchone(
                "SELECT team, token, expires_at FROM admin_sessions WHERE id = ? AND expires_at > ?",
                session_id, self._ts(datetime.now(timezone.utc)))
        return AdminSession(team=row[0], token=row[1], expires_at=self._dt(row[2])) if row else None

    async def end_session(self, session_id: str) -> bool:
        async with self._write() as tx:
            rows = await tx.fetchall("DELETE FROM admin_sessions WHERE id = ? RETURNING id", session_id)
        return bool(rows)


def fts_phrase(text: str) -> str:
    """text as one FTS5 phrase: a substring search under the trigram tokenizer."""
    return '"' + text.replace('"', '""') + '"'

