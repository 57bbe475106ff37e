"""The embedded SQLite backend (`store.url: sqlite:PATH`).

WAL mode lets readers run beside the one writer; every write is a
`BEGIN IMMEDIATE` transaction, which takes SQLite's database write lock
at once, so get-or-create is atomic across all worker processes on the
machine. Each process keeps these connections:

- the look-up connection, used on the event loop itself: the look-ups on a
  message's path are one indexed read each (a few microseconds on pages in
  the OS cache, where a trip to a thread and back costs ~50), and a WAL
  reader never waits for a writer. It waits for nothing else either: its
  busy timeout is zero, and a statement the database keeps busy (a WAL
  being recovered, say) goes to the reader's thread instead;
- two aiosqlite connections, each with its own thread: one for other reads
  (views, exports) and one for write transactions, the latter guarded by an
  asyncio lock because a connection carries one transaction at a time;
- the records connection and its thread: a batch of message records is one
  call to that thread (BEGIN IMMEDIATE, the inserts, COMMIT), under the same
  asyncio lock as the writer's transactions.
"""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from smtpgate.store import migrations
from smtpgate.store.errors import StoreError, StoreMissing
from smtpgate.store.listing import fts_phrase, like_pattern
from smtpgate.store.records import MessageRow, message_inserts
from smtpgate.store.sql import SqlStore, Tx

if TYPE_CHECKING:
    from smtpgate.store.base import Allocator

# Fixed width, so that text order is time order.
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class _SqliteTx:
    # One trip to the connection's thread per statement (execute_fetchall),
    # not three (execute, fetch, close): each trip wakes the event loop.
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute_fetchall(sql, args)

    async def fetchall(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return list(await self._conn.execute_fetchall(sql, args))

    async def fetchone(self, sql: str, *args: Any) -> Sequence[Any] | None:
        rows = await self._conn.execute_fetchall(sql, args)
        return rows[0] if rows else None


def _busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED, with any extended code."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class _LookupTx:
    """Statements on the look-up connection, on the event loop; one the
    database keeps busy runs on the reader's thread, where it may wait."""

    def __init__(self, now: sqlite3.Connection, later: aiosqlite.Connection) -> None:
        self._now = now
        self._later = later

    async def fetchall(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        try:
            return self._now.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
        return list(await self._later.execute_fetchall(sql, args))

    async def fetchone(self, sql: str, *args: Any) -> Sequence[Any] | None:
        rows = await self.fetchall(sql, *args)
        return rows[0] if rows else None

    async def execute(self, sql: str, *args: Any) -> None:
        raise StoreError("the look-up connection does not write")


class SqliteStore(SqlStore):
    """A Store in one SQLite file, shared safely by the processes of one machine."""

    NEXT_NUMBER_SQL = (
        "INSERT INTO allocator_sequence (name, next_number) VALUES ('local', ? + 1)"
        " ON CONFLICT (name) DO UPDATE SET"
        " next_number = max(allocator_sequence.next_number, ?) + 1"
        " RETURNING next_number - 1"
    )
    RAISE_SEQUENCE_SQL = (
        "INSERT INTO allocator_sequence (name, next_number) VALUES ('local', ?)"
        " ON CONFLICT (name) DO UPDATE SET"
        " next_number = max(allocator_sequence.next_number, excluded.next_number)"
    )
    ALL_DIGITS_SQL = "{0} <> '' AND {0} NOT GLOB '*[^0-9]*'"

    def __init__(
        self, path: Path, allocator: Allocator | None, busy_timeout: float = 30.0, read_only: bool = False
    ) -> None:
        super().__init__(allocator)
        self.path = path
        self.label = str(path)
        self.read_only = read_only
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._reader: aiosqlite.Connection | None = None
        self._writer: aiosqlite.Connection | None = None
        self._lookups: sqlite3.Connection | None = None
        self._records: sqlite3.Connection | None = None
        self._records_thread: ThreadPoolExecutor | None = None
        self._write_lock = asyncio.Lock()
        self._cleanups: set[asyncio.Task[None]] = set()

    async def connect(self) -> None:
        """Open both connections and switch the file to WAL mode; read-only, open
        only a reader and create nothing (StoreMissing when the file is absent)."""
        if self.read_only:
            await self._connect_read_only()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._open()
            await self._use_wal(self._writer)
            self._reader = await self._open()
            # No busy timeout: it would be a wait on the event loop.
            self._lookups = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            self._records_thread = ThreadPoolExecutor(1, thread_name_prefix="smtpgate-records")
            self._records = await asyncio.get_running_loop().run_in_executor(
                self._records_thread, self._open_records)
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        except StoreError:  # _use_wal's refusal: what was opened is closed all the same
            await self.close()
            raise

    async def _connect_read_only(self) -> None:
        if not self.path.is_file():
            raise StoreMissing(f"{self.path} does not exist; `smtpgate db upgrade` creates the store")
        # Without a -wal file the database file holds every commit, and
        # immutable=1 keeps SQLite from creating -wal/-shm files: made by root,
        # they would lock the service out of its own store.
        wal = self.path.with_name(self.path.name + "-wal")
        mode = "ro" if wal.exists() else "ro&immutable=1"
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode={mode}"
        try:
            self._reader = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            await self._reader.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    async def _use_wal(self, conn: aiosqlite.Connection) -> None:
        # Switching a new file to WAL needs an exclusive lock and SQLite does
        # not always call the busy handler for it: another process opening
        # the same new file gets "database is locked", so try again.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._busy_timeout_ms / 1000
        delay = 0.01
        while True:
            try:
                row = await (await conn.execute("PRAGMA journal_mode=WAL")).fetchone()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        if row is None or str(row[0]).lower() != "wal":
            raise StoreError(f"sqlite {self.path}: cannot switch to WAL mode")

    async def _open(self) -> aiosqlite.Connection:
        # isolation_level=None: no implicit transactions; this module says BEGIN.
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            # busy_timeout first: the other pragmas may already need the lock.
            await conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            # A committed link must survive a power cut: the tagged mail is already relayed.
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            # Closed here, as nobody else holds it: its thread would keep the process from exiting.
            with suppress(sqlite3.Error):
                await conn.close()
            raise
        return conn

    def _open_records(self) -> sqlite3.Connection:
        # Made and used on the records thread only.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def close(self) -> None:
        if self._writer is not None:
            await self.records.close(self._busy_timeout_ms / 1000)
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)
        lookups, self._lookups = self._lookups, None
        if lookups is not None:
            lookups.close()
        thread, self._records_thread = self._records_thread, None
        records, self._records = self._records, None
        if thread is not None:
            if records is not None:
                # Behind any batch still running there (a cancelled flush's).
                await asyncio.get_running_loop().run_in_executor(thread, records.close)
            thread.shutdown(wait=False)
        for name in ("_reader", "_writer"):
            conn = getattr(self, name)
            setattr(self, name, None)
            if conn is not None:
                try:
                    await conn.close()
                except sqlite3.Error:
                    pass

    def _conn(self, conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None:
            raise StoreError(f"sqlite {self.path}: store is closed")
        return conn

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[Tx]:
        conn = self._conn(self._reader)
        try:
            yield _SqliteTx(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    @asynccontextmanager
    async def _lookup(self) -> AsyncIterator[Tx]:
        if self._lookups is None:  # read-only: the reader answers
            async with self._read() as tx:
                yield tx
            return
        try:
            yield _LookupTx(self._lookups, self._conn(self._reader))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    async def _insert_messages(self, rows: list[MessageRow]) -> None:
        """The batch in one call to the records thread, under the write lock."""
        if self._records is None or self._records_thread is None:
            raise StoreError(f"sqlite {self.path}: store is closed")
        await self._write_lock.acquire()
        done = asyncio.get_running_loop().run_in_executor(self._records_thread, self._insert_now,
                                                          self._records, rows)
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The thread finishes the transaction either way; the lock waits for it.
            done.add_done_callback(self._batch_over)
            raise
        except BaseException as exc:
            self._write_lock.release()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"sqlite {self.path}: {exc}") from exc
            raise
        self._write_lock.release()

    def _batch_over(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()  # its callers were cancelled; the batch's fate is theirs to lose
        self._write_lock.release()

    @staticmethod
    def _insert_now(conn: sqlite3.Connection, rows: list[MessageRow]) -> None:
        # On the records thread: one transaction, committed or rolled back here.
        conn.execute("BEGIN IMMEDIATE")
        try:
            statements = message_inserts(rows)
            result = None
            while True:
                try:
                    sql, args = statements.send(result)
                except StopIteration:
                    break
                result = conn.execute(sql, args).fetchall()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @asynccontextmanager
    async def _write(self, lock_key: str | None = None) -> AsyncIterator[Tx]:
        # lock_key needs no lock of its own: BEGIN IMMEDIATE already excludes
        # every other writer of the file.
        if self.read_only:
            raise StoreError(f"sqlite {self.path}: opened read-only")
        await self._write_lock.acquire()
        release = True
        try:
            conn = self._conn(self._writer)
            try:
                await conn.execute("BEGIN IMMEDIATE")
                yield _SqliteTx(conn)
                await conn.execute("COMMIT")
            except asyncio.CancelledError:
                # The statement in flight still runs on aiosqlite's thread
                # (BEGIN may wait out busy_timeout): roll back behind it
                # without making the cancelled caller wait.
                release = False
                task = asyncio.get_running_loop().create_task(self._rollback_and_release(conn))
                self._cleanups.add(task)
                task.add_done_callback(self._cleanups.discard)
                raise
            except BaseException as exc:
                await self._rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"sqlite {self.path}: {exc}") from exc
                raise
        finally:
            if release:
                self._write_lock.release()

    async def _rollback_and_release(self, conn: aiosqlite.Connection) -> None:
        try:
            await self._rollback(conn)
        finally:
            self._write_lock.release()

    async def _rollback(self, conn: aiosqlite.Connection) -> None:
        # Unconditional: statements queued before it may still open a transaction.
        try:
            await conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError):
            pass  # no transaction was open, or the connection is gone

    def _migrations(self) -> list[migrations.Migration]:
        return migrations.SQLITE

    LIKE = "LIKE"

    def _search_hits(self, text: str) -> tuple[str, list[Any]]:
        if len(text) >= 3:  # the trigram index finds substrings of three characters and more
            return "SELECT rowid FROM messages_search WHERE messages_search MATCH ?", [fts_phrase(text)]
        pattern = like_pattern(text)
        return ("SELECT id FROM messages WHERE subject LIKE ? ESCAPE '\\' OR message_id LIKE ? ESCAPE '\\'",
                [pattern, pattern])

    async def _has_schema_table(self, tx: Tx) -> bool:
        row = await tx.fetchone(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'smtpgate_schema'"
        )
        return row is not None

    def _ts(self, value: datetime) -> str:
        return value.astimezone(timezone.utc).strftime(_TS_FORMAT)

    def _dt(self, value: Any) -> datetime:
        return datetime.strptime(value, _TS_FORMAT).replace(tzinfo=timezone.utc)
