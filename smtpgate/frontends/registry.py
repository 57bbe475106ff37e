"""The sessions of every front end, as the runtime drains them (docs/architecture.md).

A front end adds each session it serves and removes it when it ends; a drain
waits for busy sessions, then says goodbye to all. Background work that must
finish even when its client hung up (the relay after the final dot) runs
through `spawn`, which the drain waits for too.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Protocol


class Session(Protocol):
    @property
    def busy(self) -> bool:
        """A transaction is in flight."""

    def say_goodbye(self, line: str) -> None:
        """Tell the client and close, whatever state the session is in."""


class AuthFailures:
    """Failed logins per client address; an address's count is forgotten after `forget`
    seconds without a failure, and the oldest addresses go first beyond `keep` of them."""

    def __init__(self, forget: float = 900.0, keep: int = 10_000) -> None:
        self.forget = forget
        self.keep = keep
        self._seen: dict[str, tuple[int, float]] = {}  # address -> (failures, last failure)

    def fail(self, client: str) -> int:
        """Count one more failure from client; returns its failures so far, this one included."""
        now = time.monotonic()
        failures, last = self._seen.pop(client, (0, now))
        if now - last > self.forget:
            failures = 0
        self._seen[client] = (failures + 1, now)  # re-inserted: the dict stays oldest first
        while len(self._seen) > self.keep:
            del self._seen[next(iter(self._seen))]
        return failures + 1


class SessionRegistry:
    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.tasks: set[asyncio.Task] = set()
        self.draining = False
        self.per_client: Counter[str] = Counter()  # open sessions per client address
        self.auth_failures = AuthFailures()  # for the growing delay after a failed AUTH

    def admit(self, client: str, limit: int) -> bool:
        """Count one more session from client, unless it already has `limit` open; False then."""
        if self.per_client[client] >= limit:
            return False
        self.per_client[client] += 1
        return True

    def release(self, client: str) -> None:
        """One session from client ended (it was admitted)."""
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    def __len__(self) -> int:
        return len(self.sessions)

    def add(self, session: Session) -> None:
        self.sessions.add(session)

    def discard(self, session: Session) -> None:
        self.sessions.discard(session)

    @property
    def busy(self) -> bool:
        return any(s.busy for s in self.sessions)

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """Run coro in the background, keeping a reference until it ends (a drain waits for it)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task
