"""Group commit: many callers' writes in one transaction and one commit.

Each caller hands in one item and waits until the batch holding it is
committed, so a write is as durable when `submit` returns as it was with one
transaction per item; only the number of transactions (and fsyncs) shrinks.
There is no timer: the first item is written at once, and whatever arrives
while that commit runs forms the next batch, so a batch is as large as the
load makes it and an idle relay waits for nobody.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from smtpgate.store.errors import StoreError

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Queues items and writes them in batches with `write_batch`, one batch at a time."""

    def __init__(self, write_batch: Callable[[list[T]], Awaitable[None]], max_batch: int = 500) -> None:
        self._write_batch = write_batch
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # Items handed in and items whose batch is over (committed or failed), and
        # settled() callers waiting for a count: a cancelled caller's item counts too.
        self._submitted = 0
        self._finished = 0
        self._settling: list[tuple[int, asyncio.Future[None]]] = []
        self.batches = 0  # committed batches, for the benchmark and tests
        self.items = 0  # items in them

    def add(self, item: T) -> asyncio.Future[None]:
        """Queue item at once; the future is done when its batch is committed, and
        raises StoreError when the batch failed.

        Cancelling the future does not take the item back: it is written with
        its batch all the same.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._submitted += 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return future

    async def submit(self, item: T) -> None:
        """add, returning once item is committed (a cancelled caller's item is still written)."""
        await self.add(item)

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
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
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settling.append((self._submitted, waiter))
        await waiter

    async def close(self, timeout: float | None = None) -> None:
        """Wait until every queued item is written (or its batch failed)."""
        flusher = self._flusher
        if flusher is not None and not flusher.done():
            try:
                await asyncio.wait_for(asyncio.shield(flusher), timeout)
            except asyncio.TimeoutError:
                flusher.cancel()
