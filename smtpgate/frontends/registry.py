"""The sessions of every front end, as the runtime drains them (docs/architecture.md).

A front end adds each session it serves and removes it when it ends; a drain
waits for busy sessions, then says goodbye to all. Background work that must
finish even when its client hung up (the relay after the final dot) runs
through `spawn`, which the drain waits for too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Protocol


class Session(Protocol):
    @property
    def busy(self) -> bool:
        """A transaction is in flight."""

    def say_goodbye(self, line: str) -> None:
        """Tell the client and close, whatever state the session is in."""


class SessionRegistry:
    def __init__(self) -> None:
        self.sessions: set[Session] = set()
        self.tasks: set[asyncio.Task] = set()
        self.draining = False

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
