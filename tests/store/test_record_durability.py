"""The message record is committed after the client's 250 (docs/architecture.md,
durability): what a SIGTERM and a kill -9 do to a record whose commit is still
waiting, on SQLite and PostgreSQL, with `smtpgate serve` as a real process.

Another connection holds the store's write lock on the message records, so the
records of the messages sent meanwhile wait: the clients have their 250, the
messages are at the upstream, and their records are not yet in the store."""

from __future__ import annotations

import asyncio

import pytest

from smtpgate.store import open_store
from tests.conftest import write_config
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)
from tests.support.configs import SUBMISSION, TEAMS_A_B
from tests.support.wire import Wire, code, free_port
from tests.store.test_store_group import hold_writes, writers_waiting
from tests.runtime.test_workers import Supervised, start

CONFIG = SUBMISSION + """\
upstream:
  url: smtp://127.0.0.1:{sink_port}
""" + TEAMS_A_B + """\
store:
  url: {store}
  auto_upgrade: true
shutdown_grace: 20
"""

SOURCE = "uk-payroll+101203-T@corp.example"


async def send(port: int, n: int) -> int:
    """Message n from Team A's activity to a supplier and Team B; the reply code to the dot."""
    wire, greeting = await Wire.open(port)
    assert code(greeting) == 220
    try:
        for line in ("EHLO client.test", f"MAIL FROM:<{SOURCE}>", "RCPT TO:<client@supplier.example>",
                     "RCPT TO:<pl-payroll@corp.example>", "DATA"):
            assert code(await wire.cmd(line)) in (250, 354), line
        await wire.send(f"From: <{SOURCE}>\r\nTo: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
                        f"Subject: durability {n}\r\nMessage-ID: <durable-{n}@corp.example>\r\n\r\n"
                        f"body {n}\r\n.\r\n".encode())
        return code(await wire.reply(timeout=20))
    finally:
        await wire.cmd("QUIT")
        await wire.close()


async def recorded(url: str, tmp_path) -> set[str]:
    store = await open_store(url, base_dir=tmp_path)
    try:
        view = await store.show("101203-T")
        return {m.message_id for m in view.messages} if view else set()
    finally:
        await store.close()


async def committed(url: str, tmp_path, message_id: str, timeout: float = 20) -> None:
    """Until another connection sees the record of message_id."""
    async with asyncio.timeout(timeout):
        while message_id not in await recorded(url, tmp_path):
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
async def test_a_record_still_waiting_for_its_commit_on_sigterm_and_kill9(tmp_path, sink, store_url, how):  # noqa: F811
    port = free_port()
    config = write_config(tmp_path, CONFIG.format(port=port, sink_port=sink.port, store=store_url))
    served: Supervised = await start(config)
    release = None
    try:
        await served.event("smtpgate.ready")
        assert await send(port, 0) == 250  # creates the link; its record follows
        await committed(store_url, tmp_path, "<durable-0@corp.example>")
        release = await hold_writes(store_url)
        # The 250 does not wait for the record's commit, which waits for the lock.
        assert await asyncio.wait_for(send(port, 1), 20) == 250
        await writers_waiting(store_url, 1)  # PostgreSQL: the batch with record 1 reached the server
        assert await asyncio.wait_for(send(port, 2), 20) == 250  # its record queues behind
        assert len(sink.messages) == 3
        if how == "SIGTERM":
            served.proc.terminate()
            await served.event("shutdown.started")
            await release()  # the drain ends by writing what is queued
            release = None
            assert await asyncio.wait_for(served.proc.wait(), 60) == 0
            assert served.named("shutdown.complete")
        else:
            served.proc.kill()
            await asyncio.wait_for(served.proc.wait(), 60)
            await release()
            release = None
        assert not served.named("store.error")
    finally:
        if release is not None:
            await release()
        await served.kill()

    # Both messages were delivered with the tag, whatever happened to the record.
    assert all(any(r.startswith("pl-payroll+") for r in m.rcpt_tos) for m in sink.messages)
    ids = await recorded(store_url, tmp_path)
    if how == "SIGTERM":
        assert ids == {f"<durable-{n}@corp.example>" for n in range(3)}
    elif store_url.startswith("sqlite:"):
        # What a kill -9 loses: the records of the messages answered while their commit waited
        # (a reply to one of them that names no tag finds no thread). Their link was
        # committed before the dot, so their tags hold.
        assert ids == {"<durable-0@corp.example>"}
    else:
        # PostgreSQL commits a statement that reached it even when its client is gone: only
        # the record still queued inside smtpgate is lost.
        assert ids == {"<durable-0@corp.example>", "<durable-1@corp.example>"}
