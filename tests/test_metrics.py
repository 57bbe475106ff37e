"""/metrics over a real socket: counters move with the messages smtpgate relays and rejects.

Metrics are process-wide, so every test compares two scrapes of the admin
listener around what it does and checks the differences exactly.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from smtpgate.log import get_logger, setup_logging
from tests.conftest import write_config
from tests.support.admin import SOURCE, admin_relay  # noqa: F401 - fixture
from tests.support.wire import free_port
from tests.runtime.test_serve import config_text, start_serve

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(base_url: str) -> Samples:
    async with aiohttp.ClientSession() as client:
        async with client.get(base_url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=")
            text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)
    return moved


async def until(condition: Callable[[], object], timeout: float = 10) -> None:
    """Yield to the loop until condition() holds (server callbacks run in between)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


HOPS = b"".join(b"Received: from hop%d.example by relay.example; Fri, 27 Nov 2026 10:00:00 +0000\r\n" % i
                for i in range(51))


def message(subject: str, extra: bytes = b"") -> bytes:
    return (extra + b"From: Team A <uk-payroll+" + SOURCE.encode() + b"@corp.example>\r\n"
            b"To: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
            b"Subject: " + subject.encode() + b"\r\n\r\nHello\r\n")


async def test_metrics_move_when_messages_are_relayed_and_rejected(admin_relay, log_lines):
    relay = admin_relay
    rcpts = ["client@supplier.example", "pl-payroll@corp.example"]
    log_lines()
    seen = len(log_lines.seen)
    before = await scrape(relay.admin_url)

    # Relayed: reuses the link the fixture created ...
    assert (await relay.send(f"uk-payroll+{SOURCE}@corp.example", rcpts, message("again"))).data[0] == 250
    # ... and creates a new one for another source activity.
    other = (b"From: uk-payroll+5512-C@corp.example\r\nCc: pl-payroll@corp.example\r\n"
             b"Subject: new\r\n\r\nHello\r\n")
    assert (await relay.send("uk-payroll+5512-C@corp.example", rcpts, other)).data[0] == 250
    # Rejected by smtpgate itself: too many hops.
    assert (await relay.send(f"uk-payroll+{SOURCE}@corp.example", rcpts, message("loop", HOPS))).data[0] == 554
    # Rejected by the upstream at the final dot, permanently and temporarily.
    relay.sink.data_reply = "550 5.7.1 Refused by policy"
    assert (await relay.send(f"uk-payroll+{SOURCE}@corp.example", rcpts, message("spam"))).data[0] == 550
    relay.sink.data_reply = "451 4.3.2 Try again later"
    assert (await relay.send(f"uk-payroll+{SOURCE}@corp.example", rcpts, message("busy"))).data[0] == 451
    relay.sink.data_reply = None

    await until(lambda: not relay.gate.registry.sessions)
    after = await scrape(relay.admin_url)
    moved = delta(before, after)
    events = log_lines()[seen:]

    assert moved("smtpgate_messages_relayed_total") == 2
    assert moved("smtpgate_messages_rejected_total", reply_class="5xx", code="554") == 1
    assert moved("smtpgate_messages_rejected_total", reply_class="5xx", code="550") == 1
    assert moved("smtpgate_messages_rejected_total", reply_class="4xx", code="451") == 1
    assert moved("smtpgate_links_created_total") == 1
    assert moved("smtpgate_links_reused_total") == 1  # 101203-T -> Team B again; 5512-C got a new link
    assert moved("smtpgate_smtp_sessions_total") == 5
    assert moved("smtpgate_smtp_sessions_open") == 0

    # One emission feeds both: the counters equal what the log says.
    relayed = [e for e in events if e["event"] == "message.relayed"]
    rejected = [e for e in events if e["event"] == "message.rejected"]
    assert len(relayed) == 2 and len(rejected) == 3
    assert moved("smtpgate_links_reused_total") == sum(len(e["links_reused"]) for e in relayed)
    assert moved("smtpgate_links_created_total") == len([e for e in events if e["event"] == "link.created"])
    for name in ("message.relayed", "message.rejected", "session.opened", "session.closed", "link.created"):
        level = {e["level"] for e in events if e["event"] == name}.pop()
        assert moved("smtpgate_log_events_total", event=name, level=level) == \
            len([e for e in events if e["event"] == name]), name
    assert moved("smtpgate_message_size_bytes_count") == 2
    assert moved("smtpgate_message_size_bytes_sum") == sum(e["size"] for e in relayed)
    assert moved("smtpgate_message_duration_seconds_count") == 2
    assert moved("smtpgate_upstream_data_seconds_count") == 4  # two relayed, two refused at the dot
    assert moved("smtpgate_store_seconds_count") == 4


async def test_upstream_connections_in_use_while_a_transaction_is_open(admin_relay):
    relay = admin_relay
    before = await scrape(relay.admin_url)
    relay.sink.hold_data = asyncio.Event()
    sending = asyncio.create_task(relay.send(f"uk-payroll+{SOURCE}@corp.example", ["client@supplier.example"],
                                             b"Subject: held\r\n\r\nbody\r\n"))
    try:
        await relay.sink.wait_for_received(2)
        during = await scrape(relay.admin_url)
        assert delta(before, during)("smtpgate_upstream_connections_in_use") == 1
        assert delta(before, during)("smtpgate_smtp_sessions_open") == 1
    finally:
        relay.sink.hold_data.set()
    assert (await sending).data[0] == 250
    await until(lambda: not relay.gate.registry.sessions)
    after = await scrape(relay.admin_url)
    assert delta(before, after)("smtpgate_upstream_connections_in_use") == 0
    assert delta(before, after)("smtpgate_smtp_sessions_open") == 0


async def test_upstream_errors_are_counted_by_stage(admin_relay):
    relay = admin_relay
    before = await scrape(relay.admin_url)
    await relay.sink.stop()
    result = await relay.send(f"uk-payroll+{SOURCE}@corp.example", ["client@supplier.example"], b"\r\nbody\r\n")
    assert result.mail[0] == 451
    after = await scrape(relay.admin_url)
    moved = delta(before, after)
    assert moved("smtpgate_upstream_errors_total", stage="connect") == 1
    assert moved("smtpgate_messages_relayed_total") == 0


async def test_process_metrics_are_exposed(admin_relay):
    samples = await scrape(admin_relay.admin_url)
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"} <= names
    assert any(name == "python_info" for name in names)


def test_info_events_are_counted_below_the_log_level(capsys):
    """logging.level: warning hides info lines, not the counts."""
    from prometheus_client import REGISTRY

    def relayed() -> float:
        return REGISTRY.get_sample_value("smtpgate_messages_relayed_total") or 0.0

    setup_logging("json", "warning")
    try:
        start = relayed()
        get_logger().info("message.relayed", links_reused=[], size=10)
        get_logger().warning("upstream.tag_refused", recipient="x@corp.example")
        assert relayed() == start + 1
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [e["event"] for e in lines] == ["upstream.tag_refused"]
    finally:
        setup_logging("json", "debug")


async def test_serve_starts_admin_and_counts_reloads(tmp_path):
    """`smtpgate serve` with admin.listen: SIGHUP with a good and a bad file moves config_reloads."""
    port, admin_port = free_port(), free_port()
    text = config_text(port, f"admin:\n  listen: 127.0.0.1:{admin_port}\n")
    config = write_config(tmp_path, text)
    served = await start_serve(config)
    base = f"http://127.0.0.1:{admin_port}"

    async def next_event(name: str) -> dict:
        async with asyncio.timeout(20):
            while True:
                line = await served.proc.stdout.readline()
                assert line, f"serve exited before {name}"
                event = json.loads(line)
                if event["event"] == name:
                    return event

    try:
        ready = await next_event("smtpgate.ready")
        assert ready["listeners"] == [f"127.0.0.1:{port}"]
        before = await scrape(base)
        served.proc.send_signal(signal.SIGHUP)
        await next_event("config.reloaded")
        config.write_text(text + "bogus_key: 1\n", encoding="utf-8")
        served.proc.send_signal(signal.SIGHUP)
        await next_event("config.rejected")
        moved = delta(before, await scrape(base))
        assert moved("smtpgate_config_reloads_total", result="reloaded") == 1
        assert moved("smtpgate_config_reloads_total", result="rejected") == 1
        async with aiohttp.ClientSession() as client:
            async with client.get(base + "/readyz") as response:
                assert response.status == 200, await response.text()
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
