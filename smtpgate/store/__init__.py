"""smtpgate's link store: activities, links, relayed messages.

`open_store` picks the backend from `store.url`:

- `sqlite:PATH` (relative to the config file's folder; `sqlite:///abs/path`
  also works): one file, WAL mode, safe for the worker processes of one
  machine;
- `postgresql://...` or `postgres://...`: one database shared by several
  nodes.

Schema: a database smtpgate never used (no `smtpgate_schema` table) is
initialised on open. A database with an older schema is refused with
SchemaOutdated (run `smtpgate db upgrade`) unless auto_upgrade is set; one
with a newer schema than this smtpgate is refused with StoreError.

Read-only (`read_only=True`, the `links show|list|export` commands): nothing
is created or changed; a missing database or one without the schema is
StoreMissing.

On a writable open with the local allocator, the sequence is raised above
every reference its templates gave that the store knows (raise_sequence):
a store restored from an older copy, or seeded by `smtpgate links add`,
never hands out a reference again.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from smtpgate.store.base import (
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
    NumberSource,
    Store,
    ThreadHit,
)
from smtpgate.redact import redact_url
from smtpgate.store.errors import AllocationError, LinkConflict, SchemaOutdated, StoreError, StoreMissing

if TYPE_CHECKING:
    from smtpgate.store.base import Allocator

__all__ = [
    "ActivityRow",
    "ActivityView",
    "AllocationContext",
    "AllocationError",
    "AllocationRequest",
    "LinkConflict",
    "LinkOutcome",
    "LinkRow",
    "LinkTarget",
    "LinkedActivity",
    "MessageRecord",
    "MessageView",
    "NumberSource",
    "SchemaOutdated",
    "Store",
    "StoreError",
    "StoreMissing",
    "ThreadHit",
    "open_store",
    "run_pruner",
    "sqlite_path",
]

log = structlog.get_logger()


def sqlite_path(url: str, base_dir: Path) -> Path:
    """The database file named by a `sqlite:` URL, resolved against base_dir."""
    rest = url[len("sqlite:") :]
    if rest.startswith("//"):
        # URL form: sqlite:///abs/path; sqlite://host/... names no file.
        rest = rest[2:]
        if not rest.startswith("/"):
            raise StoreError(f"store.url {url!r}: use sqlite:PATH or sqlite:///ABSOLUTE/PATH")
    if not rest or rest == ":memory:":
        raise StoreError(
            f"store.url {url!r}: needs a file path (sqlite:var/smtpgate.db); "
            "an in-memory database cannot be shared by connections"
        )
    path = Path(rest).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


async def open_store(
    url: str,
    *,
    base_dir: Path,
    allocator: Allocator | None = None,
    auto_upgrade: bool = False,
    check_schema: bool = True,
    timeout: float = 30.0,
    read_only: bool = False,
    password: str | None = None,
) -> Store:
    """A connected Store for `store.url`, its schema checked.

    With check_schema False the schema is neither checked nor initialised:
    that is how `smtpgate db upgrade` opens a store before calling upgrade().
    timeout bounds waits for locks and connections (seconds); it is raised
    to exceed the allocator's own timeout (the http allocator's), since
    other writers may wait for an allocation in progress.
    With read_only, nothing is created, initialised or upgraded.
    password: PostgreSQL's (store.password_file), kept out of the URL.
    Raises StoreError for a bad URL or an unreachable database, and
    SchemaOutdated and StoreMissing as described in the module docstring.
    """
    store: Store
    allocator_timeout = getattr(allocator, "timeout", None)
    if isinstance(allocator_timeout, (int, float)):
        timeout = max(timeout, allocator_timeout + 10.0)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from smtpgate.store.sqlite import SqliteStore

        sqlite_store = SqliteStore(sqlite_path(url, base_dir), allocator, busy_timeout=timeout,
                                   read_only=read_only)
        await sqlite_store.connect()
        store = sqlite_store
    elif scheme in ("postgresql", "postgres"):
        from smtpgate.store.postgres import PostgresStore

        pg_store = PostgresStore(url, allocator, timeout=timeout, read_only=read_only, password=password)
        await pg_store.connect()
        store = pg_store
    else:
        raise StoreError(
            f"store.url {redact_url(url)!r}: expected sqlite:PATH or postgresql://user@host/database"
        )
    if check_schema:
        try:
            await _check_schema(store, auto_upgrade, read_only)
            if not read_only:
                await _guard_sequence(store, allocator)
        except BaseException:
            await store.close()
            raise
    return store


async def _guard_sequence(store: Store, allocator: Allocator | None) -> None:
    from smtpgate.store.allocation import LocalAllocator

    if isinstance(allocator, LocalAllocator):
        await store.raise_sequence(allocator.templates, allocator.first_number)


async def _check_schema(store: Store, auto_upgrade: bool, read_only: bool) -> None:
    version = await store.schema_version()
    latest = store.latest_version()  # type: ignore[attr-defined]
    if read_only and version == 0:
        raise StoreMissing(
            f"{store.label} has no smtpgate schema; `smtpgate db upgrade` creates it"  # type: ignore[attr-defined]
        )
    if read_only and version < latest:
        raise SchemaOutdated(
            f"the store's schema is version {version}, this smtpgate needs {latest}: "
            "run `smtpgate db upgrade`"
        )
    if version == 0 or (version < latest and auto_upgrade):
        await store.upgrade()
    elif version < latest:
        raise SchemaOutdated(
            f"the store's schema is version {version}, this smtpgate needs {latest}: "
            "run `smtpgate db upgrade`"
        )
    elif version > latest:
        raise StoreError(
            f"the store's schema is version {version}, newer than this smtpgate "
            f"(version {latest}); upgrade smtpgate"
        )


async def run_pruner(store: Store, keep_days: int, every: float = 3600.0) -> None:
    """Prune message records older than keep_days now and then every `every`
    seconds, until cancelled; a failing prune is logged and tried again later."""
    while True:
        try:
            await store.prune_messages(keep_days)
        except StoreError as exc:
            log.warning("store.prune_failed", error=str(exc))
        await asyncio.sleep(every)
