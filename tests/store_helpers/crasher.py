"""A writer that stops inside the get-or-create transaction, to be killed there.

Usage: crasher.py URL MODE, MODE `allocated` (after the local sequence was
taken) or `inserted` (after the activity and link rows were written, before
COMMIT). Prints `inside` when it got there, then waits forever.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import structlog

from smtpgate.store.allocation import LocalAllocator
from smtpgate.store import AllocationContext, LinkTarget, open_store


async def hang() -> None:
    print("inside", flush=True)
    await asyncio.Event().wait()


class StallingAllocator(LocalAllocator):
    async def allocate(self, request, numbers):
        reference = await super().allocate(request, numbers)
        await hang()
        return reference


async def main(url: str, mode: str) -> None:
    allocator = StallingAllocator(900000) if mode == "allocated" else LocalAllocator(900000)
    store = await open_store(url, base_dir=Path("/"), allocator=allocator)
    if mode == "inserted":
        insert_link = store._insert_link

        async def stall_after_insert(*args, **kwargs):
            result = await insert_link(*args, **kwargs)
            await hang()
            return result

        store._insert_link = stall_after_insert
    target = LinkTarget("pl-payroll@corp.example", "Team B (Poland)", "{n}-T", True)
    context = AllocationContext(None, None, "<crash@corp.example>")
    await store.get_or_create_link("101203-T", "uk-payroll@corp.example", target, context)


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    asyncio.run(main(sys.argv[1], sys.argv[2]))
