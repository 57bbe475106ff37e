"""A separate process racing get-or-create for one (source, mailbox) pair.

Usage: racer.py URL COUNT. Prints `ready` once the store is open, waits for
a line on stdin, then runs COUNT concurrent get_or_create_link calls and
prints their outcomes as one JSON line: [[reference, created], ...].
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import structlog

from smtpgate.store.allocation import LocalAllocator
from smtpgate.store import AllocationContext, LinkTarget, open_store


async def main(url: str, count: int) -> None:
    store = await open_store(url, base_dir=Path("/"), allocator=LocalAllocator(900000))
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    target = LinkTarget("pl-payroll@corp.example", "Team B (Poland)", "{n}-T", True)
    context = AllocationContext("Payroll 101203-T", "a@corp.example", "<race@corp.example>")
    outcomes = await asyncio.gather(
        *(
            store.get_or_create_link("101203-T", "uk-payroll@corp.example", target, context)
            for _ in range(count)
        )
    )
    await store.close()
    print(json.dumps([[o.reference, o.created] for o in outcomes]), flush=True)


if __name__ == "__main__":
    # stdout carries the protocol; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
