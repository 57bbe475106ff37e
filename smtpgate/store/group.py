"""Group commit: many callers' writes in one transaction and one commit.

Each caller hands in one item and waits until the batch holding it is
committed, so a write is as durable when `submit` returns as it was with one
transaction per item; only the number of transactions (and fsyncs) shrinks.
Whatever arrives while a commit runs forms the next batch, so a batch is as
large as the load makes it.

`linger` (seconds, 0 by default) lets a batch wait that long for more items
before it is written: items nobody waits for (the message record, queued after
the client's 250) then share a commit even when they come one at a time. An
urgent item (`submit`, `add(urgent=True)`), `settled()`, `close()` and a full
batch end the wait at once, so nobody who waits for a commit waits for the
linger.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from smtpgate.store.errors import StoreError

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Queues items and writes them in batches with `write_batch`, one batch at a time."""

    def __init__(self, write_batch: Callable[[list[T]], Awaitable[None]], max_batch: int = 500,
                 linger: float = 0.0) -> None:
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._linger = linger
        # Set while the flusher lingers: done when the wait is to end early.
        self._hurry: asyncio.Future[None] | None = None
        self._hurry_until = 0  # items up to this count (of _submitted) are waited for: no linger for them
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Items handed in and items whose batch is over (committed or failed), and
        # settled() callers waiting for a count: a cancelled caller's item counts too.
        self._submitted = 0
        self._finished = 0
        self._settling: list[tuple[int, asyncio.Future[None]]] = []
        self.batches = 0  # committed batches, for the benchmark and tests
        self.items = 0  # items in them

    def add(self, item: T, *, urgent: bool = False) -> asyncio.Future[None]:
        """Queue item at once; the future is done when its batch is committed, and
        raises StoreError when the batch failed. ``urgent``: the batch does not
        linger (the caller waits for the commit).

        Cancelling the future does not take the item back: it is written with
        its batch all the same.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, future))
        self._submitted += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        if urgent:
            self._hurry_up()
        elif len(self._pending) >= self._max_batch:
            self._wake()
        return future

    async def submit(self, item: T) -> None:
        """add, returning once item is committed (a cancelled caller's item is still written)."""
        await self.add(item, urgent=True)

    def _hurry_up(self) -> None:
        """Every item queued so far is to be written without lingering."""
        self._hurry_until = self._submitted
        self._wake()

    def _wake(self) -> None:
        if self._hurry is not None and not self._hurry.done():
            self._hurry.set_result(None)

    async def _lingered(self) -> None:
        """Wait up to `linger` for more items, unless some are waited for or a batch is full."""
        taken = self._submitted - len(self._pending)  # written, being written, or given up
        if self._linger <= 0 or taken < self._hurry_until or len(self._pending) >= self._max_batch:
            return
        self._hurry = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait([self._hurry], timeout=self._linger)
        finally:
            self._hurry = None

    async def _flush(self) -> None:
        while self._pending:
            batch: list[tuple[T, asyncio.Future[None]]] = []
            try:
                await self._lingered()
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._write_batch([item for item, _ in batch])
            except asyncio.CancelledError:
                given_up = [*batch, *self._pending]
                self._pending.clear()
                for _, future in given_up:
                    future.cancel()
                self._over(len(given_up))
                raise
            except Exception as exc:  # noqa: BLE001 - every caller of the batch hears of it
                for _, future in batch:
                    if not future.done():
                        # One exception object per caller: each raises and chains its own.
                        error = StoreError(str(exc) if isinstance(exc, StoreError)
                                           else f"{type(exc).__name__}: {exc}")
                        error.__cause__ = exc
                        future.set_exception(error)
                self._over(len(batch))
                continue
            self.batches += 1
            self.items += len(batch)
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
            self._over(len(batch))

    def _over(self, count: int) -> None:
        self._finished += count
        still = []
        for target, waiter in self._settling:
            if self._finished >= target:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((target, waiter))
        self._settling = still

    async def settled(self) -> None:
        """Return once every item submitted before this call is committed or failed,
        so a read that follows sees this process's own writes."""
        if self._finished >= self._submitted:
            return
        self._hurry_up()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settling.append((self._submitted, waiter))
        await waiter

    async def close(self, timeout: float | None = None) -> None:
        """Wait until every queued item is written (or its batch failed)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            self._hurry_up()
            try:
                await asyncio.wait_for(asyncio.shield(flusher), timeout)
            except asyncio.TimeoutError:
                flusher.cancel()
