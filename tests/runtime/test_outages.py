"""Outages are the operator's business: an unreachable upstream, a failing store and a failing
allocator are `component.failed` at warning, naming the component and the fault in plain words;
the first success after them is `component.recovered` at info."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from aiohttp import web

from smtpgate.config import load_config
from smtpgate.log import _OUTAGES
from tests.conftest import write_config
from tests.support.sink import Sink
from tests.support.smtp import send
from tests.support.wire import free_port
from tests.test_mission import MISSION_CONFIG

MAIL_FROM = "uk-payroll+101203-T@corp.example"


@pytest.fixture(autouse=True)
def no_outage_yet():
    """The outage records are the process's: earlier tests' failures are not this test's."""
    _OUTAGES.clear()


def message(n: int) -> bytes:
    return (f"From: {MAIL_FROM}\r\nTo: pl-payroll@corp.example\r\nSubject: outage {n}\r\n"
            f"Message-ID: <outage-{n}@corp.example>\r\n\r\nbody\r\n").encode()


async def relay(port: int, n: int, rcpt: str = "pl-payroll@corp.example") -> int:
    result = await send("127.0.0.1", port, mail_from=MAIL_FROM, rcpt_tos=[rcpt], data=message(n))
    return (result.data or result.mail)[0]


def outages(log_lines) -> list[tuple[str, str, str]]:
    return [(e["event"], e["level"], e["component"]) for e in log_lines()
            if e["event"] in ("component.failed", "component.recovered")]


def failed(log_lines, component: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == "component.failed" and e["component"] == component]


async def test_an_upstream_outage_and_its_end(tmp_path, start_gate, log_lines):
    upstream_port = free_port()  # nothing listens there yet
    config = load_config(write_config(tmp_path, MISSION_CONFIG.format(
        upstream=f"smtp://127.0.0.1:{upstream_port}", store_timeout=10)))
    gate, port = await start_gate(config)  # the start's probe fails already
    assert await relay(port, 1) == 451
    [first, *_] = failed(log_lines, "upstream")
    assert first["level"] == "warning"
    assert first["problem"] == f"upstream: smtp://127.0.0.1:{upstream_port}: connect to 127.0.0.1:{upstream_port}: " \
                               "connection refused"
    async with Sink(port=upstream_port) as sink:
        assert await relay(port, 2) == 250
        await sink.wait_for_messages(1)
    assert outages(log_lines)[-1] == ("component.recovered", "info", "upstream")


async def test_a_store_outage_and_its_end(sink, tmp_path, start_gate, log_lines):
    config = load_config(write_config(tmp_path, MISSION_CONFIG.format(
        upstream=f"smtp://127.0.0.1:{sink.port}", store_timeout=0.5)))
    gate, port = await start_gate(config)
    # Another writer holds the database past store.timeout: creating the link fails.
    # (Off the loop: smtpgate's own start-up writes may still need it to finish.)
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(blocker.execute, "BEGIN IMMEDIATE")
    try:
        assert await relay(port, 1) == 451
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    [problem] = [e["problem"] for e in failed(log_lines, "store")]
    assert problem.startswith("store: ") and "locked" in problem
    assert await relay(port, 2) == 250
    assert outages(log_lines) == [("component.failed", "warning", "store"),
                                  ("component.recovered", "info", "store")]


async def test_an_allocator_outage_and_its_end(sink, tmp_path, start_gate, log_lines):
    allocator_port = free_port()
    url = f"http://127.0.0.1:{allocator_port}/linked-activities"
    (tmp_path / "allocator.token").write_text("t\n")
    config = load_config(write_config(tmp_path, MISSION_CONFIG.format(
        upstream=f"smtp://127.0.0.1:{sink.port}", store_timeout=10)
        + f"allocator:\n  kind: http\n  url: {url}\n  token_file: allocator.token\n  timeout: 5\n"))
    gate, port = await start_gate(config)
    assert await relay(port, 1) == 451
    assert [e["problem"] for e in failed(log_lines, "allocator")] == [f"allocator: {url}: connection refused"]
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"][-1]
    assert rejected["reason"] == f"allocator: {url}: connection refused"  # not "store: ..."

    async def allocate(request: web.Request) -> web.Response:
        return web.json_response({"reference": "5512-C"})

    app = web.Application()
    app.router.add_post("/linked-activities", allocate)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", allocator_port).start()
    try:
        assert await relay(port, 2) == 250
    finally:
        await runner.cleanup()
    assert outages(log_lines) == [("component.failed", "warning", "allocator"),
                                  ("component.recovered", "info", "allocator")]
