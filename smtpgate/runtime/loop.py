"""The event loop `smtpgate serve` runs on: asyncio's own, unless uvloop is asked for.

`SMTPGATE_EVENT_LOOP` chooses: `auto` (the default) and `asyncio` take asyncio's own
loop, `uvloop` takes uvloop (`pip install 'smtpgate[uvloop]'`; an error when it is not
installed). asyncio's own loop is the default because it relays more for less CPU in
`make bench` (bench/FINDINGS.md, "uvloop"); uvloop stays a choice for operators who
measure otherwise on their machines.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("auto", "asyncio", "uvloop")


class LoopChoiceError(Exception):
    """SMTPGATE_EVENT_LOOP names no loop that can run here."""


def loop_factory(choice: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for the chosen loop; None means asyncio's default loop."""
    if choice is None:
        choice = os.environ.get("SMTPGATE_EVENT_LOOP", "auto")
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise LoopChoiceError(f"SMTPGATE_EVENT_LOOP: expected one of {', '.join(CHOICES)}, got {choice!r}")
    if choice != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        raise LoopChoiceError("SMTPGATE_EVENT_LOOP=uvloop, but uvloop is not installed "
                              "(pip install 'smtpgate[uvloop]')") from None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the loop SMTPGATE_EVENT_LOOP chooses (LoopChoiceError when it cannot)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
