"""The admin listener's activities list and search against a large store.

A store of 1,000,000 message records and 100,000 links (200,000 activities of
20 team mailboxes, two message-activity rows a message) is loaded in bulk,
then one team's queries are timed through `Store.list_activities`, as
`GET /api/v1/activities` makes them: the first page, the next page by
cursor, a mailbox filter, the last seven days, a subject word, a whole
Message-ID, a text nothing matches, and the admin's first page.

Runnable alone (one JSON line out; the data takes a few minutes to load):

    .venv/bin/python bench/listbench.py sqlite:/tmp/list.db /tmp
    .venv/bin/python bench/listbench.py postgresql://postgres@127.0.0.1/DB /tmp [--messages N --links N]

`make bench` runs it for each store (bench/__main__.py) and reports the p50.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402

from smtpgate.store import open_store  # noqa: E402
from smtpgate.store.base import ActivityQuery  # noqa: E402

MAILBOXES = [f"team-{i:02d}@corp.example" for i in range(20)]
WORDS = [f"{a}{b}" for a in ("invoice", "payroll", "contract", "refund", "visa", "audit", "pension",
                             "leave", "bonus", "tax") for b in ("", "s", "-q1", "-q2", "-q3", "-eu", "-uk",
                                                                 "-pl", "-de", "-fr")]
START = datetime(2025, 11, 1, tzinfo=timezone.utc)
SPAN = timedelta(days=400)
TEAM = MAILBOXES[7]


@dataclass
class ListResult:
    messages: int
    links: int
    load_seconds: float
    p50: float
    p99: float
    per_query: dict[str, float]  # p50 of each query kind


def _data(messages: int, links: int):
    """(activities, links, messages, message_activities) rows; timestamps as aware datetimes."""
    rng = random.Random(29)
    activities = 2 * links
    act = [(f"{n + 100000}-T", MAILBOXES[n % len(MAILBOXES)], START + SPAN * n / activities)
           for n in range(activities)]
    link_rows = []
    for k in range(links):
        one, two = act[2 * k], act[2 * k + 1]
        lo, hi = sorted((one[0], two[0]))
        link_rows.append((one[0], two[0], lo, hi, two[2], None))
    msgs, pairs = [], []
    for k in range(messages):
        n = k % activities
        source = act[n]
        other = act[n ^ 1]
        when = source[2] + timedelta(seconds=rng.randrange(86400 * 20))
        subject = f"{rng.choice(WORDS)} {rng.choice(WORDS)} case {k}"
        mapping = json.dumps({other[1]: other[0]})
        msgs.append((k + 1, f"<{k}.{rng.getrandbits(40):x}@bench.example>", source[0], source[0], None,
                     source[1], subject, json.dumps([other[1]]), mapping, when))
        pairs += [(k + 1, source[0]), (k + 1, other[0])]
    return act, link_rows, msgs, pairs


def _load_sqlite(path: Path, data) -> None:
    import sqlite3

    from smtpgate.store.sqlite import _TS_FORMAT

    def ts(value: datetime) -> str:
        return value.strftime(_TS_FORMAT)

    act, link_rows, msgs, pairs = data
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO activities (reference, mailbox, created_at) VALUES (?, ?, ?)",
                     [(r, m, ts(c)) for r, m, c in act])
    conn.executemany("INSERT INTO links (source_reference, target_reference, lo, hi, created_at, message_id)"
                     " VALUES (?, ?, ?, ?, ?, ?)", [(*row[:4], ts(row[4]), row[5]) for row in link_rows])
    conn.executemany("INSERT INTO messages (id, message_id, source_reference, source_key, date, from_addr,"
                     " subject, recipients, mapping, relayed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [(*row[:9], ts(row[9])) for row in msgs])
    conn.executemany("INSERT INTO message_activities (message, reference) VALUES (?, ?)", pairs)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


async def _load_postgres(url: str, data) -> None:
    import asyncpg

    act, link_rows, msgs, pairs = data
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table("activities", records=act, columns=["reference", "mailbox", "created_at"])
        await conn.copy_records_to_table("links", records=link_rows, columns=[
            "source_reference", "target_reference", "lo", "hi", "created_at", "message_id"])
        await conn.copy_records_to_table("messages", records=[row[1:] for row in msgs], columns=[
            "message_id", "source_reference", "source_key", "date", "from_addr", "subject", "recipients",
            "mapping", "relayed_at"])
        await conn.copy_records_to_table("message_activities", records=pairs, columns=["message", "reference"])
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def _queries(store_first_page_cursor, own: tuple[str, ...], message_id: str) -> list[tuple[str, ActivityQuery]]:
    week = START + SPAN - timedelta(days=7)
    return [
        ("first page", ActivityQuery(own=own)),
        ("next page", ActivityQuery(own=own, after=store_first_page_cursor)),
        ("mailbox", ActivityQuery(own=own, mailbox=own[0])),
        ("last 7 days", ActivityQuery(own=own, since=week)),
        ("subject word", ActivityQuery(own=own, q="refund-pl")),
        ("Message-ID", ActivityQuery(own=own, q=message_id)),
        ("no match", ActivityQuery(own=own, q="nothing-matches-this")),
        ("admin first page", ActivityQuery(own=None)),
    ]


async def _run(url: str, base_dir: Path, messages: int, links: int, rounds: int) -> ListResult:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    store = await open_store(url, base_dir=base_dir, auto_upgrade=True)
    data = _data(messages, links)
    began = time.perf_counter()
    try:
        if url.startswith("sqlite:"):
            await store.close()
            from smtpgate.store import sqlite_path

            await asyncio.to_thread(_load_sqlite, sqlite_path(url, base_dir), data)
            store = await open_store(url, base_dir=base_dir)
        else:
            await _load_postgres(url, data)
        loaded = time.perf_counter() - began
        own = (TEAM,)
        message_id = next(row[1] for row in reversed(data[2]) if row[5] == TEAM)
        first, cursor = await store.list_activities(ActivityQuery(own=own))
        assert first and cursor is not None
        queries = _queries(cursor, own, message_id)
        times: dict[str, list[float]] = {name: [] for name, _ in queries}
        for _ in range(rounds):
            for name, query in queries:
                start = time.perf_counter()
                await store.list_activities(query)
                times[name].append(time.perf_counter() - start)
    finally:
        await store.close()
    every = sorted(t for values in times.values() for t in values)
    return ListResult(messages=messages, links=links, load_seconds=loaded,
                      p50=statistics.median(every), p99=every[min(len(every) - 1, int(0.99 * len(every)))],
                      per_query={name: statistics.median(values) for name, values in times.items()})


def run(url: str, base_dir: Path, messages: int = 1_000_000, links: int = 100_000, rounds: int = 20) -> ListResult:
    return asyncio.run(_run(url, base_dir, messages, links, rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--links", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    result = run(args.url, args.folder, args.messages, args.links, args.rounds)
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
