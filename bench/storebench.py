"""The store alone: what each message asks of it under linking traffic (one
link look-up before the dot, one message record after), from 20 concurrent
sessions, without SMTP around it.

Run as a script (`python bench/storebench.py URL MESSAGES`, one JSON line
out) so that PYTHONPATH picks the smtpgate tree it measures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import structlog

from smtpgate.store import AllocationContext, LinkTarget, MessageRecord, open_store
from smtpgate.store.allocation import LocalAllocator

SOURCE = "101203-T"
TARGET = LinkTarget(mailbox="pl-payroll@corp.example", team="Team B", new_reference="{n}-T",
                    allow_create=True)


@dataclass
class StoreResult:
    messages: int
    seconds: float
    lookup_p50: float
    lookup_p99: float
    record_p50: float
    record_p99: float
    batches: int | None  # message record transactions (group commit), when the store counts them

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(url: str, base_dir: Path, messages: int, sessions: int) -> StoreResult:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    store = await open_store(url, base_dir=base_dir, allocator=LocalAllocator(900000), auto_upgrade=True)
    try:
        context = AllocationContext(subject="Invoice", from_=None, message_id=None)
        await store.get_or_create_link(SOURCE, "uk-payroll@corp.example", TARGET, context)
        lookups: list[float] = []
        records: list[float] = []
        queue = iter(range(messages))
        stamp = time.time_ns()

        async def session() -> None:
            for n in queue:
                began = time.perf_counter()
                outcome = await store.get_or_create_link(SOURCE, "uk-payroll@corp.example", TARGET, context)
                looked = time.perf_counter()
                assert outcome is not None
                await store.record_message(MessageRecord(
                    message_id=f"<{stamp}.{n}@bench.example>", date=None, from_="uk-payroll+101203-T@corp.example",
                    subject="Invoice 4411", source_reference=SOURCE,
                    recipients=["2pl-payroll@corp.example", f"pl-payroll+{outcome.reference}@corp.example"],
                    mapping={"pl-payroll@corp.example": outcome.reference},
                    relayed_at=datetime.now(timezone.utc)))
                lookups.append(looked - began)
                records.append(time.perf_counter() - looked)

        batches_before = getattr(getattr(store, "records", None), "batches", None)
        began = time.perf_counter()
        await asyncio.gather(*(session() for _ in range(sessions)))
        seconds = time.perf_counter() - began
        batches_after = getattr(getattr(store, "records", None), "batches", None)
    finally:
        await store.close()
    return StoreResult(
        messages=messages, seconds=seconds,
        lookup_p50=statistics.median(lookups), lookup_p99=_quantile(lookups, 0.99),
        record_p50=statistics.median(records), record_p99=_quantile(records, 0.99),
        batches=None if batches_before is None else batches_after - batches_before,
    )


def run(url: str, base_dir: Path, messages: int, sessions: int = 20) -> StoreResult:
    return asyncio.run(_run(url, base_dir, messages, sessions))


if __name__ == "__main__":
    result = run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(dataclasses.asdict(result)))
