"""Observe mode: relay as received, read the store, never write it, and log what enforce
mode would have done (`message.observed`). One config, two listeners on one store: the
enforce listener writes, the observe listener only reads."""

from __future__ import annotations

import sqlite3

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.smtp import send
from tests.support.wire import strip_trace
from tests.test_mission import MISSION_CONFIG, STEP1
from tests.store.test_store import eventually

FIRST = 900000
TWO_LISTENERS = MISSION_CONFIG.replace(
    "    relay_networks: [127.0.0.1/32]\n",
    "    relay_networks: [127.0.0.1/32]\n"
    "  - name: observer\n    address: 127.0.0.1:0\n    relay_networks: [127.0.0.1/32]\n    mode: observe\n", 1,
) + f"allocator:\n  first_number: {FIRST}\n"


@pytest.fixture
async def two(sink, tmp_path, start_gate, log_lines):
    config = load_config(write_config(tmp_path, TWO_LISTENERS.format(upstream=f"smtp://127.0.0.1:{sink.port}",
                                                                      store_timeout=10)))
    gate, _ = await start_gate(config)
    enforce, observe = (port for _, port in gate.bound)
    return enforce, observe, sink, log_lines, tmp_path / "smtpgate.db"


def rows(db) -> tuple[int, int, int]:
    with sqlite3.connect(db) as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("activities", "links", "messages"))


async def relay(port, sink, mail_from, rcpts, data) -> tuple[list[str], bytes]:
    result = await send("127.0.0.1", port, mail_from=mail_from, rcpt_tos=rcpts, data=data)
    assert result.data[0] == 250, result
    msg = sink.messages[-1]
    return msg.rcpt_tos, msg.data


def observed(log_lines) -> dict:
    return [e for e in log_lines() if e["event"] == "message.observed"][-1]


def would_relay(event) -> list[str]:
    return [r["would_relay"] for r in event["recipients"]]


STEP1_RCPTS = ["client@supplier.example", "pl-payroll@corp.example", "hr@corp.example"]


async def test_observe_relays_unchanged_writes_nothing_and_says_what_enforce_would_do(two):
    enforce, observe, sink, log_lines, db = two
    new = f"{FIRST}-T"

    # Step 1 observed on an empty store: unchanged on the wire, a new activity announced.
    rcpts, data = await relay(observe, sink, "uk-payroll+101203-T@corp.example", STEP1_RCPTS, STEP1)
    assert rcpts == STEP1_RCPTS
    received, rest = strip_trace(data)
    assert rest == STEP1 and [f[:9] for f in received] == [b"Received:"]
    event = observed(log_lines)
    assert (event["source_reference"], event["source_found_in"]) == ("101203-T", "envelope")
    assert would_relay(event) == ["client@supplier.example", "(new linked activity)", "hr@corp.example"]
    assert event["links_would_create"] == ["pl-payroll@corp.example"]
    assert rows(db) == (0, 0, 0)

    # Enforce creates the link; then the same message observed names it exactly.
    rcpts, _ = await relay(enforce, sink, "uk-payroll+101203-T@corp.example", STEP1_RCPTS, STEP1)
    assert rcpts[1] == f"pl-payroll+{new}@corp.example"

    async def recorded() -> bool:  # the client's 250 does not wait for the message record
        return rows(db)[2] == 1

    await eventually(recorded, what="the enforced message's record")
    before = rows(db)
    rcpts, data = await relay(observe, sink, "uk-payroll+101203-T@corp.example", STEP1_RCPTS, STEP1)
    assert rcpts == STEP1_RCPTS and strip_trace(data)[1] == STEP1
    event = observed(log_lines)
    assert would_relay(event) == ["client@supplier.example", f"pl-payroll+{new}@corp.example", "hr@corp.example"]
    assert event["links_would_reuse"] == [new] and event["links_would_create"] == []
    assert event["header_changes"] == {"pl-payroll@corp.example": f"pl-payroll+{new}@corp.example"}

    # From Outlook: the source in the subject.
    outlook = (b"From: Jane <jane@corp.example>\r\nTo: client@supplier.example\r\n"
               b"Cc: pl-payroll@corp.example\r\nSubject: RE: Invoice 4411 [101203-T]\r\n\r\nx\r\n")
    rcpts, data = await relay(observe, sink, "jane@corp.example", ["client@supplier.example",
                                                                   "pl-payroll@corp.example"], outlook)
    assert strip_trace(data)[1] == outlook
    event = observed(log_lines)
    assert event["source_found_in"] == "subject"
    assert would_relay(event) == ["client@supplier.example", f"pl-payroll+{new}@corp.example"]

    # The external party's reply: the thread.
    reply = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\nCc: pl-payroll@corp.example\r\n"
             b"In-Reply-To: <step1.101203@corp.example>\r\nSubject: RE: Invoice 4411\r\n\r\nthanks\r\n")
    rcpts, data = await relay(observe, sink, "client@supplier.example",
                              ["uk-payroll@corp.example", "pl-payroll@corp.example"], reply)
    assert rcpts == ["uk-payroll@corp.example", "pl-payroll@corp.example"] and strip_trace(data)[1] == reply
    event = observed(log_lines)
    assert event["source_found_in"] == "thread"
    assert would_relay(event) == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example"]

    # An explicit tag: kept, the link would be recorded.
    explicit = b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n\r\nx\r\n"
    await relay(observe, sink, "uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"], explicit)
    event = observed(log_lines)
    assert would_relay(event) == ["pl-payroll+5512-C@corp.example"]
    assert event["links_would_create"] == ["5512-C"]

    assert rows(db) == before  # the observer wrote nothing
    relayed = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert len(relayed) == 6


async def test_each_listener_start_names_the_mode_it_serves_in(two):
    *_, log_lines, _ = two
    started = {e["listener"]: e["mode"] for e in log_lines() if e["event"] == "listener.started"}
    assert started == {"submission": "enforce", "observer": "observe"}  # the file's (default), the listener's own


def test_check_config_says_the_mode(tmp_path):
    import subprocess
    import sys

    path = write_config(tmp_path, TWO_LISTENERS.format(upstream="smtp://127.0.0.1:25", store_timeout=10))
    out = subprocess.run([sys.executable, "-m", "smtpgate", "check-config", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "mode enforce" in out.stdout and "observer=127.0.0.1:0 (observe)" in out.stdout
