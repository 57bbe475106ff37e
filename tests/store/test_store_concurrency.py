"""Races and crashes across processes sharing one database (SQLite file, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from smtpgate.store.allocation import LocalAllocator
from smtpgate.store import AllocationContext, LinkOutcome, LinkTarget, open_store
from tests.store_helpers import PYTHON, helper_env, pg_database, store_url  # noqa: F401

UK = "uk-payroll@corp.example"
PL = "pl-payroll@corp.example"
DE = "de-payroll@corp.example"
CALLS = 50


async def spawn(module: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        f"tests.store_helpers.{module}",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=helper_env(),
    )


async def expect_line(proc: asyncio.subprocess.Process, expected: str) -> None:
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.decode().strip() == expected, f"helper said {line!r}"


async def initialised(store_url: str, tmp_path: Path):  # noqa: F811
    return await open_store(store_url, base_dir=tmp_path, allocator=LocalAllocator(900000))


async def test_two_processes_racing_make_one_link_and_one_reference(store_url, tmp_path):  # noqa: F811
    # The database is empty: the racers also race to initialise the schema.
    racers = [await spawn("racer", store_url, str(CALLS)) for _ in range(2)]
    store = None
    try:
        for proc in racers:
            await expect_line(proc, "ready")
        # Both are connected and waiting: release them together.
        for proc in racers:
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        outcomes = []
        for proc in racers:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0
            outcomes += json.loads(out.decode().strip().splitlines()[-1])
        assert len(outcomes) == 2 * CALLS
        assert {reference for reference, _ in outcomes} == {"900000-T"}
        assert sum(created for _, created in outcomes) == 1
        store = await initialised(store_url, tmp_path)
        assert len(await store.list_links()) == 1
        # Exactly one number was taken from the sequence.
        fresh = LinkTarget(DE, "Team C", "{n}-T", True)
        nxt = await store.get_or_create_link("101203-T", UK, fresh, AllocationContext(None, None, None))
        assert nxt == LinkOutcome("900001-T", created=True)
    finally:
        for proc in racers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if store is not None:
            await store.close()


@pytest.mark.parametrize("mode", ["allocated", "inserted"])
async def test_a_writer_killed_inside_the_transaction_leaves_no_half_link(store_url, tmp_path, mode):  # noqa: F811
    store = await initialised(store_url, tmp_path)
    proc = await spawn("crasher", store_url, mode)
    try:
        await expect_line(proc, "inside")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert await store.list_links() == []
        assert await store.show("101203-T") is None
        assert await store.activity_mailbox("900000-T") is None
        # The killed writer's number was never committed; nothing is stuck locked.
        outcome = await store.get_or_create_link(
            "101203-T", UK, LinkTarget(PL, "Team B", "{n}-T", True), AllocationContext(None, None, None)
        )
        assert outcome == LinkOutcome("900000-T", created=True)
        assert len(await store.list_links()) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.close()


async def test_concurrent_callers_in_one_process_share_the_link(store_url, tmp_path):  # noqa: F811
    one = await initialised(store_url, tmp_path)
    two = await initialised(store_url, tmp_path)  # a second node on the same database
    try:
        target = LinkTarget(PL, "Team B", "{n}-T", True)
        ctx = AllocationContext(None, None, "<m@x>")
        outcomes = await asyncio.gather(
            *(s.get_or_create_link("101203-T", UK, target, ctx) for s in (one, two) for _ in range(20))
        )
        assert {o.reference for o in outcomes} == {"900000-T"}
        assert sum(o.created for o in outcomes) == 1
    finally:
        await one.close()
        await two.close()


async def hold_link_lock(store_url: str, tmp_path: Path):  # noqa: F811
    """Another writer holding the lock get-or-create needs; returns a release function."""
    if store_url.startswith("sqlite:"):
        import sqlite3

        conn = sqlite3.connect(store_url[len("sqlite:") :], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")

        async def release() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        return release
    import asyncpg

    from smtpgate.store.sql import link_lock_key

    conn = await asyncpg.connect(store_url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", link_lock_key("101203-T", PL)
    )

    async def release() -> None:
        await tx.rollback()
        await conn.close()

    return release


async def test_a_cancelled_caller_leaves_the_store_usable(store_url, tmp_path):  # noqa: F811
    store = await initialised(store_url, tmp_path)
    target = LinkTarget(PL, "Team B", "{n}-T", True)
    ctx = AllocationContext(None, None, None)
    release = await hold_link_lock(store_url, tmp_path)
    try:
        # It cannot finish while the lock is held, wherever the cancel lands.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.get_or_create_link("101203-T", UK, target, ctx), 0.3)
    finally:
        await release()
    try:
        assert await store.get_or_create_link("101203-T", UK, target, ctx) == LinkOutcome("900000-T", True)
        assert len(await store.list_links()) == 1
    finally:
        await store.close()
