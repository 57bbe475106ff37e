"""Counters the main metrics test leaves alone, each moved by its real cause and read from /metrics.

Each step does one thing to a real smtpgate (two links reused by one message,
a session over the connection limit, a refused command, a tag the upstream
refuses, an address too long to tag, a store failure after delivery, AUTH
right and wrong) and checks the exact difference between two scrapes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid

import pytest

from smtpgate.config import load_config
from smtpgate.log import get_logger, setup_logging
from smtpgate.metrics import exposition
from tests.conftest import BASE_CONFIG, write_config
from tests.support.admin import ADMIN_YAML, write_tokens
from tests.support.smtp import send
from tests.support.wire import Wire, code
from tests.test_metrics import delta, scrape, until

LONG = "x" * 60  # a local part with no room for a tag within 64 octets
MAILBOXES = f"""\
mailboxes:
  - address: fr-payroll@corp.example
    team: Team D (France)
  - address: {LONG}@corp.example
    team: Team E (long)
"""
SOURCE = "uk-payroll+101203-T@corp.example"


def message(message_id: str, cc: str) -> bytes:
    return (f"From: Team A <{SOURCE}>\r\nTo: client@supplier.example\r\nCc: {cc}\r\n"
            f"Subject: metrics\r\nMessage-ID: <{message_id}@corp.example>\r\n\r\nHello\r\n").encode()


@pytest.fixture
async def gate(sink, tmp_path, start_gate, log_lines):
    write_tokens(tmp_path)
    text = BASE_CONFIG.format(upstream=f"smtp://127.0.0.1:{sink.port}", store=f"sqlite:{tmp_path}/smtpgate.db")
    text = text.replace("mailboxes:\n", MAILBOXES, 1) + ADMIN_YAML + "limits:\n  max_connections: 1\n"
    gate, port = await start_gate(load_config(write_config(tmp_path, text)))
    host, admin_port = gate.admin.bound[0]
    gate.test_port, gate.admin_url = port, f"http://{host}:{admin_port}"
    return gate


async def relay(gate, message_id: str, rcpts: list[str], cc: str):
    result = await send("127.0.0.1", gate.test_port, mail_from=SOURCE, rcpt_tos=rcpts,
                        data=message(message_id, cc))
    await until(lambda: not gate.registry.sessions)
    return result


async def test_links_reused_count_each_link_and_untaggable_each_address(gate, sink):
    teams = ["pl-payroll@corp.example", "fr-payroll@corp.example"]
    assert (await relay(gate, "first", teams, ", ".join(teams))).data[0] == 250
    before = await scrape(gate.admin_url)
    assert (await relay(gate, "second", teams, ", ".join(teams))).data[0] == 250
    assert (await relay(gate, "long", [f"{LONG}@corp.example"], f"{LONG}@corp.example")).data[0] == 250
    moved = delta(before, await scrape(gate.admin_url))
    assert moved("smtpgate_links_reused_total") == 2  # one message, two links
    assert moved("smtpgate_links_created_total") == 0
    assert moved("smtpgate_addresses_untaggable_total") == 1
    assert moved("smtpgate_messages_relayed_total") == 2


async def test_refused_sessions_commands_and_tags_are_counted(gate, sink):
    before = await scrape(gate.admin_url)
    held, greeting = await Wire.open(gate.test_port)
    assert code(greeting) == 220
    over, greeting = await Wire.open(gate.test_port)
    assert code(greeting) == 421  # limits.max_connections: 1
    await over.close()
    assert code(await held.cmd("EHLO client.test")) == 250
    assert code(await held.cmd("MAIL FROM:<not an address>")) == 501
    assert code(await held.cmd("QUIT")) == 221
    await held.close()
    sink.refuse_plus = True  # the upstream takes no tagged address: relayed untagged
    result = await relay(gate, "untagged", ["pl-payroll@corp.example"], "pl-payroll@corp.example")
    assert result.data[0] == 250 and sink.messages[-1].rcpt_tos == ["pl-payroll@corp.example"]
    moved = delta(before, await scrape(gate.admin_url))
    assert moved("smtpgate_smtp_sessions_refused_total") == 1
    assert moved("smtpgate_commands_refused_total", code="501") == 1
    assert moved("smtpgate_upstream_tag_refused_total") == 1


async def test_a_store_failure_after_delivery_is_counted_by_stage(gate, sink, tmp_path):
    assert (await relay(gate, "before", ["client@supplier.example"], "client@supplier.example")).data[0] == 250
    def records() -> int:
        with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    async with asyncio.timeout(10):  # the first message's record committed: only the next one fails
        while records() == 0:
            await asyncio.sleep(0.01)
    before = await scrape(gate.admin_url)
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        conn.execute("ALTER TABLE messages RENAME TO messages_away")  # the message record cannot be written
    assert (await relay(gate, "after", ["client@supplier.example"], "client@supplier.example")).data[0] == 250
    async with asyncio.timeout(10):
        while delta(before, await scrape(gate.admin_url))("smtpgate_store_errors_total", stage="record_message") < 1:
            await asyncio.sleep(0.01)
    moved = delta(before, await scrape(gate.admin_url))
    assert moved("smtpgate_store_errors_total", stage="record_message") == 1
    assert moved("smtpgate_messages_relayed_total") == 1  # delivered all the same


def _samples() -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(exposition().decode()) for s in f.samples}


def test_auth_results_and_the_sessions_gauge_follow_their_events(capsys):
    setup_logging("json", "debug")
    log = get_logger()
    before = _samples()
    log.info("auth.result", success=True, mechanism="PLAIN")
    log.info("auth.result", success=False, mechanism="PLAIN")
    log.info("auth.result", success=False, mechanism="LOGIN")
    log.info("session.opened")
    log.info("session.opened")
    during = _samples()
    log.info("session.closed")
    moved, now = delta(before, during), delta(before, _samples())
    assert moved("smtpgate_auth_attempts_total", result="success") == 1
    assert moved("smtpgate_auth_attempts_total", result="failure") == 2
    assert moved("smtpgate_smtp_sessions_open") == 2 and now("smtpgate_smtp_sessions_open") == 1
    log.info("session.closed")
    capsys.readouterr()


def test_odd_field_values_count_as_nothing_or_unknown(capsys):
    """The counters take what the events carry: lists or numbers, never a flag or a negative time."""
    setup_logging("json", "debug")
    log = get_logger()
    before = _samples()
    log.info("message.relayed", links_reused=True, duration_ms=-5, size=True)
    log.info("message.relayed", links_reused=3, duration_ms=250, upstream_ms=False, store_ms="1")
    log.info("message.relayed", links_reused=None, duration_ms=None)
    log.info("message.relayed", links_reused="900000-T", size=512)
    for code in ("abc", 700, 99, 600, None):
        log.info("message.rejected", code=code)
    for code in (100, 599):  # the ends of the range of reply codes
        log.info("message.rejected", code=code)
    log.info("message.rejected", code="451", upstream_ms=0, store_ms=-1)
    log.info("message.shared", added=["a@corp.example", "b@corp.example"])
    log.info("message.shared", added=[])
    log.info("upstream.error")
    log.info("store.error", stage="")
    moved = delta(before, _samples())
    assert moved("smtpgate_messages_relayed_total") == 4
    assert moved("smtpgate_links_reused_total") == 3
    assert moved("smtpgate_message_duration_seconds_count") == 1
    assert moved("smtpgate_message_duration_seconds_sum") == pytest.approx(0.25)
    assert moved("smtpgate_upstream_data_seconds_count") == 1  # the 451's 0 ms; False is no time
    assert moved("smtpgate_store_seconds_count") == 0
    assert moved("smtpgate_message_size_bytes_count") == 1 and moved("smtpgate_message_size_bytes_sum") == 512
    assert moved("smtpgate_messages_rejected_total", reply_class="unknown", code="unknown") == 5
    assert moved("smtpgate_messages_rejected_total", reply_class="1xx", code="100") == 1
    assert moved("smtpgate_messages_rejected_total", reply_class="5xx", code="599") == 1
    assert moved("smtpgate_messages_rejected_total", reply_class="4xx", code="451") == 1
    assert moved("smtpgate_messages_shared_total") == 1 and moved("smtpgate_recipients_shared_total") == 2
    assert moved("smtpgate_upstream_errors_total", stage="unknown") == 1
    assert moved("smtpgate_store_errors_total", stage="unknown") == 1
    capsys.readouterr()


def test_each_event_is_counted_once_under_its_level(capsys):
    setup_logging("json", "debug")
    log = get_logger()
    name = f"test.fresh.{uuid.uuid4().hex}"  # an event no earlier test counted
    before = _samples()
    log.info(name)
    log.warning(name)
    log.warning(name)
    try:
        raise ValueError("for the log")
    except ValueError:
        log.exception(name)  # the method is "exception", the level "error"
    moved = delta(before, _samples())
    assert moved("smtpgate_log_events_total", event=name, level="info") == 1
    assert moved("smtpgate_log_events_total", event=name, level="warning") == 2
    assert moved("smtpgate_log_events_total", event=name, level="error") == 1
    assert moved("smtpgate_log_events_total", event=name, level="exception") == 0
    capsys.readouterr()


def test_with_a_metrics_folder_the_exposition_is_what_the_folder_holds(tmp_path, monkeypatch):
    """Workers: /metrics sums the processes' files, not this process's own registry."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    assert exposition() == b""  # no process has written a sample there
    # A worker's counter file, written as prometheus-client's multiprocess mode writes it.
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    written = MmapedDict(str(tmp_path / "counter_4242.db"))
    written.write_value(mmap_key("smtpgate_probe", "smtpgate_probe_total", [], [], "A probe."), 3.0, 0.0)
    written.close()
    assert exposition().decode().splitlines()[-1] == "smtpgate_probe_total 3.0"


def test_a_reload_counts_once_whatever_the_number_of_workers(capsys):
    setup_logging("json", "debug")
    log = get_logger()
    before = _samples()
    log.info("config.reloaded")  # one process
    log.info("config.reloaded", worker=0)  # workers: each logs it, worker 0 counts it
    log.info("config.reloaded", worker=1)
    log.info("config.reloaded", worker=0)  # the next reload: worker 1 has not logged it yet
    log.error("config.rejected")  # the supervisor refused a file
    log.error("config.rejected", worker=2)
    moved = delta(before, _samples())
    assert moved("smtpgate_config_reloads_total", result="reloaded") == 3
    assert moved("smtpgate_config_reloads_total", result="rejected") == 1
    capsys.readouterr()
