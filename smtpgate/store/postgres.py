"""The PostgreSQL backend (`store.url: postgresql://...`), for several
smtpgate nodes sharing one database, through asyncpg.

Reads and writes take their connections from two pools, so a look-up never
waits for a connection held by a write (a link creation waiting for the
allocator, say). The look-ups on a message's path use a connection of their
own while it is free (no pool's acquire and release, ~80 µs each), the read
pool when it is busy. Message records, one batch at a time, go through a
connection of their own. Get-or-create for one (source activity, mailbox) pair runs under a
transaction-scoped advisory lock named after the pair, so racers on any node
wait for the first one's commit and then find its link. The lock is held
around the allocator call (local sequence or HTTP): only that pair waits.
The local sequence is a row updated in the same transaction, so a rollback
or a crashed node gives its number back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import asyncpg

from smtpgate.redact import redact_url
from smtpgate.store import migrations
from smtpgate.store.errors import StoreError, StoreMissing
from smtpgate.store import listing
from smtpgate.store.listing import like_pattern
from smtpgate.store.records import MessageRow
from smtpgate.store.sql import LINKS_OF_LIMIT, SCHEMA_LOCK_KEY, SqlStore, Tx

if TYPE_CHECKING:
    from smtpgate.store.base import Allocator

_PLACEHOLDER = re.compile(r"\?")

# pg_stat_activity's application_name of the message records' connection, and of the
# look-ups' own connection.
RECORDS_APPLICATION = "smtpgate records"
LOOKUPS_APPLICATION = "smtpgate look-ups"
READS_APPLICATION = "smtpgate reads"
WRITES_APPLICATION = "smtpgate writes"
# How long after a look-up connection failed the next one is opened (the read pool serves meanwhile).
LOOKUPS_RETRY_SECONDS = 1.0
# Every write transaction notifies this channel at its commit; each process listens on its
# look-up connection and forgets the links it remembered (links_of). A writer that does not
# notify (an older smtpgate, a hand-made UPDATE) is caught up with after LINKS_KEPT_SECONDS.
LINKS_CHANNEL = "smtpgate_links"
LINKS_KEPT_SECONDS = 10.0
_LINKS_KEPT = 10_000  # sources whose links a process remembers at most

# Everything asyncpg and the network raise for a failing server or connection.
# (InternalClientError: a statement on a connection the server just ended, found mid-way.)
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
             asyncio.TimeoutError)


@functools.lru_cache(maxsize=256)
def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (the shared SQL has no `?` in literals)."""
    count = 0

    def number(_match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


# A statement that may change what links_of answers.
_CHANGES_LINKS = re.compile(r"\s*(INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(links|activities)\b", re.IGNORECASE)


class _PgTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    def _sql(self, sql: str) -> str:
        return _numbered(sql)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(self._sql(sql), *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._conn.fetch(self._sql(sql), *args))

    async def fetchone(self, sql: str, *args: Any) -> Sequence[Any] | None:
        return await self._conn.fetchrow(self._sql(sql), *args)


class _PgWriteTx(_PgTx):
    """A write transaction's statements, noting whether one wrote links or activities
    (then the commit notifies LINKS_CHANNEL); look-ups are spared the check."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self.changes_links = False

    def _sql(self, sql: str) -> str:
        if not self.changes_links and _CHANGES_LINKS.match(sql):
            self.changes_links = True
        return _numbered(sql)


# A batch of message records and their activities in one statement (one round
# trip, atomic without BEGIN/COMMIT): the activities of a message already stored
# find no row in RETURNING and are left out with it.
_INSERT_MESSAGES = """
WITH m AS (
    INSERT INTO messages (message_id, source_reference, source_key, date, from_addr, subject,
                          recipients, mapping, relayed_at, shared)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::text[], $8::text[], $9::timestamptz[], $10::text[])
    ON CONFLICT (message_id, source_key) DO NOTHING
    RETURNING id, message_id, source_key
)
INSERT INTO message_activities (message, reference)
SELECT m.id, a.reference
FROM m JOIN unnest($11::text[], $12::text[], $13::text[]) AS a (message_id, source_key, reference)
USING (message_id, source_key)
"""


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A pool reset that sends nothing (asyncpg still rolls back an open transaction)."""


class PostgresStore(SqlStore):
    """A Store in a PostgreSQL database shared by several smtpgate nodes."""

    NEXT_NUMBER_SQL = (
        "INSERT INTO allocator_sequence AS s (name, next_number) VALUES ('local', ?::bigint + 1)"
        " ON CONFLICT (name) DO UPDATE SET next_number = GREATEST(s.next_number, ?::bigint) + 1"
        " RETURNING next_number - 1"
    )
    RAISE_SEQUENCE_SQL = (
        "INSERT INTO allocator_sequence AS s (name, next_number) VALUES ('local', ?::bigint)"
        " ON CONFLICT (name) DO UPDATE SET next_number = GREATEST(s.next_number, excluded.next_number)"
    )
    ALL_DIGITS_SQL = "{} ~ '^[0-9]+$'"

    def __init__(
        self,
        dsn: str,
        allocator: Allocator | None,
        timeout: float = 30.0,
        pool_size: int = 10,
        read_only: bool = False,
        password: str | None = None,
    ) -> None:
        super().__init__(allocator)
        self.dsn = dsn
        self._password = password  # store.password_file's; asyncpg lets it override one in the URL
        self.label = redact_url(dsn)
        self.read_only = read_only
        self._timeout = timeout
        self._pool_size = pool_size
        self._reads: asyncpg.Pool | None = None
        self._writes: asyncpg.Pool | None = None
        # Message records go in one batch at a time (group commit): one connection of
        # their own, without a pool's acquire and reset round trip; made again after a failure.
        self._records: asyncpg.Connection | None = None
        # The look-ups' own connection (see _lookup), whether a look-up holds it, and
        # when a new one may be opened after a failure.
        self._lookups: asyncpg.Connection | None = None
        self._lookups_busy = False
        self._lookups_opening: asyncio.Task[None] | None = None
        self._lookups_next_try = 0.0
        # links_of's answers, source -> (when read, answer), kept only while the look-up
        # connection listens on LINKS_CHANNEL; the generation counts the changes heard of.
        self._links: dict[str, tuple[float, dict[str, str] | None]] = {}
        self._links_generation = 0
        self._listening: asyncpg.Connection | None = None

    async def connect(self) -> None:
        """Open the connection pools; StoreError when the server cannot be reached,
        StoreMissing when the database does not exist. Read-only, every
        transaction is READ ONLY: the server refuses any write."""
        try:
            # Look-ups change no session state (no SET, LISTEN, cursor or lock):
            # a connection goes back without asyncpg's reset query, a round trip.
            self._reads = await self._open_pool(READS_APPLICATION, reset=_keep_session)
            # Read-only there are no writes to keep look-ups from: one pool.
            self._writes = self._reads if self.read_only else await self._open_pool(WRITES_APPLICATION)
            self._lookups = await self._listen(await self._connect(LOOKUPS_APPLICATION))
        except asyncpg.InvalidCatalogNameError as exc:
            await self.close()
            raise StoreMissing(f"{self.label}: {exc}") from exc
        except (*_FAILURES, ValueError) as exc:
            await self.close()
            raise StoreError(f"{self.label}: {exc}") from exc

    def _settings(self, application: str) -> dict[str, str]:
        # application_name: pg_stat_activity names each pool and connection ("smtpgate reads", ...).
        settings = {"application_name": application}
        if self.read_only:
            settings["default_transaction_read_only"] = "on"
        return settings

    async def _connect(self, application: str) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, password=self._password, timeout=self._timeout,
                                     command_timeout=self._timeout, server_settings=self._settings(application))

    async def _open_pool(self, application: str, **options: Any) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            self.dsn,
            password=self._password,
            min_size=1,
            max_size=self._pool_size,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings=self._settings(application),
            **options,
        )

    async def close(self) -> None:
        if self._writes is not None:
            await self.records.close(self._timeout)
        if self._lookups_opening is not None:
            self._lookups_opening.cancel()
            self._lookups_opening = None
        for conn in (self._records, self._lookups):
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.close(), self._timeout)
                except _FAILURES:
                    conn.terminate()
        self._records = self._lookups = None
        pools = {id(p): p for p in (self._reads, self._writes) if p is not None}
        self._reads = self._writes = None
        for pool in pools.values():
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except _FAILURES:
                pool.terminate()

    def _pool_or_fail(self, pool: asyncpg.Pool | None) -> asyncpg.Pool:
        if pool is None:
            raise StoreError("postgresql: store is closed")
        return pool

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Tx]:
        pool = self._pool_or_fail(self._reads)
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                yield _PgTx(conn)
        except _FAILURES as exc:
            raise StoreError(f"postgresql: {exc.__class__.__name__}: {exc}") from exc

    @asynccontextmanager
    async def _lookup(self) -> AsyncIterator[Tx]:
        """The look-ups' own connection when it is free, else the read pool's. A statement
        failing on it, or a look-up cancelled under it, takes it out of use (a statement
        cancelled midway leaves a connection busy); a new one is opened in the background."""
        conn = self._lookups
        if conn is None or self._lookups_busy or conn.is_closed():
            if conn is not None and not self._lookups_busy:
                self._drop_lookups()
            self._reopen_lookups()
            async with self._read() as tx:
                yield tx
            return
        self._lookups_busy = True
        try:
            yield _PgTx(conn)
        except _FAILURES as exc:
            self._drop_lookups()
            raise StoreError(f"postgresql: {exc.__class__.__name__}: {exc}") from exc
        except asyncio.CancelledError:
            self._drop_lookups()
            raise
        finally:
            self._lookups_busy = False

    def _drop_lookups(self) -> None:
        conn, self._lookups = self._lookups, None
        self._links_changed()  # nobody listens for changes now
        self._listening = None
        if conn is not None:
            conn.terminate()
        self._lookups_next_try = asyncio.get_running_loop().time() + LOOKUPS_RETRY_SECONDS

    def _reopen_lookups(self) -> None:
        """Open a new look-up connection in the background, once the retry wait is over."""
        if self._lookups is not None or self._reads is None:
            return
        if self._lookups_opening is not None and not self._lookups_opening.done():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._lookups_next_try:
            return

        async def reopen() -> None:
            try:
                conn = await self._listen(await self._connect(LOOKUPS_APPLICATION))
            except _FAILURES:
                self._lookups_next_try = loop.time() + LOOKUPS_RETRY_SECONDS
                return
            if self._reads is None or self._lookups is not None:  # closed, or opened meanwhile
                if self._listening is conn:
                    self._listening = None
                conn.terminate()
                return
            self._lookups = conn

        self._lookups_opening = loop.create_task(reopen())

    @asynccontextmanager
    async def _write(self, lock_key: str | None = None) -> AsyncIterator[Tx]:
        pool = self._pool_or_fail(self._writes)
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                async with conn.transaction():
                    if lock_key is not None:
                        # Released by COMMIT/ROLLBACK, or when a crashed
                        # node's connection drops.
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock_key
                        )
                    tx = _PgWriteTx(conn)
                    yield tx
                    if tx.changes_links:
                        # Delivered at the commit, to every process's look-up connection.
                        await conn.execute("SELECT pg_notify($1, '')", LINKS_CHANNEL)
            if tx.changes_links:
                self._links_changed()  # this process does not wait for its own notification
        except _FAILURES as exc:
            raise StoreError(f"postgresql: {exc.__class__.__name__}: {exc}") from exc

    async def _listen(self, conn: asyncpg.Connection) -> asyncpg.Connection:
        """conn, listening for link changes: links_of may remember what it read while it does.
        Read-only (a hot standby refuses LISTEN) nothing is remembered."""
        if self.read_only:
            return conn
        try:
            await conn.add_listener(LINKS_CHANNEL, self._links_notified)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._listener_gone)
        self._links_changed()
        self._listening = conn
        return conn

    def _listener_gone(self, conn: asyncpg.Connection) -> None:
        """The listening connection closed: what was remembered is no longer kept honest."""
        if self._listening is conn:
            self._listening = None
            self._links_changed()

    def _links_notified(self, _conn, _pid, _channel, _payload) -> None:
        self._links_changed()

    def _links_changed(self) -> None:
        self._links.clear()
        self._links_generation += 1

    async def links_of(self, source_reference: str, limit: int = LINKS_OF_LIMIT) -> dict[str, str] | None:
        """SqlStore.links_of, remembered while the look-up connection listens for changes
        (LINKS_CHANNEL), for at most LINKS_KEPT_SECONDS."""
        listening = (self._listening is not None and self._listening is self._lookups
                     and not self._listening.is_closed())
        now = asyncio.get_running_loop().time()
        if listening and limit == LINKS_OF_LIMIT:  # only the default's answers are kept
            kept = self._links.get(source_reference)
            if kept is not None and now - kept[0] < LINKS_KEPT_SECONDS:
                return None if kept[1] is None else dict(kept[1])
        generation = self._links_generation
        links = await super().links_of(source_reference, limit)
        if listening and limit == LINKS_OF_LIMIT and generation == self._links_generation:
            if len(self._links) >= _LINKS_KEPT:
                self._links.clear()
            self._links[source_reference] = (now, None if links is None else dict(links))
        return links

    async def _insert_messages(self, rows: list[MessageRow]) -> None:
        columns = [list(column) for column in zip(*(row.values for row in rows))]
        activities = [(row.key[0], row.key[1], ref) for row in rows for ref in row.references]
        named = [list(column) for column in zip(*activities)] or [[], [], []]
        self._pool_or_fail(self._writes)
        if self.read_only:
            raise StoreError(f"{self.label}: opened read-only")
        # The statement is idempotent (a record already stored is left alone), so a
        # connection found dead, the server's restart say, is replaced and tried once more.
        while True:
            conn = self._records
            fresh = conn is None or conn.is_closed()
            try:
                if fresh:
                    conn = self._records = await self._connect(RECORDS_APPLICATION)
                await conn.execute(_INSERT_MESSAGES, *columns, *named)
                return
            except asyncio.TimeoutError as exc:
                # asyncpg has the server cancel the statement. The next statement on the
                # connection waits for that to be done: the failed batch is then surely not
                # committed when its callers hear of it (a lock released later cannot let it in).
                try:
                    await conn.execute("SELECT 1")
                except Exception:  # noqa: BLE001 - a connection that cannot even do that is dropped
                    conn.terminate()
                    self._records = None
                raise StoreError(f"postgresql: {exc.__class__.__name__}: {exc}") from exc
            except Exception as exc:  # noqa: BLE001 - any other failure: a new connection
                if conn is not None:
                    conn.terminate()
                self._records = None
                if not fresh:
                    continue  # once: the next try is on a new connection
                raise StoreError(f"postgresql: {exc.__class__.__name__}: {exc}") from exc

    @asynccontextmanager
    async def _schema_write(self) -> AsyncIterator[Tx]:
        # A session lock taken before the transaction starts: a transaction
        # that began before another node's migration committed could still
        # see the old catalog after waiting for an in-transaction lock.
        pool = self._pool_or_fail(self._writes)
        try:
            async with pool.acquire(timeout=self._timeout) as conn:
                await conn.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", SCHEMA_LOCK_KEY)
                try:
                    async with conn.transaction():
                        yield _PgTx(conn)
                finally:
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtextextended($1, 0))", SCHEMA_LOCK_KEY
                    )
        except _FAILURES as exc:
            raise StoreError(f"postgresql: {exc.__class__.__name__}: {exc}") from exc

    def _migrations(self) -> list[migrations.Migration]:
        return migrations.POSTGRES

    LIKE = "ILIKE"

    async def _broad(self, tx: Tx, hits: str, args: list[Any]) -> bool:
        # The planner's estimate, not a count: counting even 2001 hits makes the trigram
        # index read every posting of a common text (100+ ms on a million messages).
        row = await tx.fetchone("EXPLAIN (FORMAT JSON) " + hits, *args)
        plan = json.loads(row[0]) if row and isinstance(row[0], str) else (row[0] if row else None)
        return bool(plan) and float(plan[0]["Plan"]["Plan Rows"]) > listing.FEW

    def _search_hits(self, text: str) -> tuple[str, list[Any]]:
        pattern = like_pattern(text)  # ILIKE '%text%' is what the pg_trgm indexes answer
        return ("SELECT id FROM messages WHERE subject ILIKE ? ESCAPE '\\' OR message_id ILIKE ? ESCAPE '\\'",
                [pattern, pattern])

    async def _has_schema_table(self, tx: Tx) -> bool:
        row = await tx.fetchone("SELECT to_regclass('smtpgate_schema') IS NOT NULL")
        return bool(row and row[0])

    def _ts(self, value: datetime) -> datetime:
        return value.astimezone(timezone.utc)

    def _dt(self, value: Any) -> datetime:
        return value.astimezone(timezone.utc)
