"""Observe <-> enforce on SIGHUP: mode (top level and per listener) applies to the sessions that
start after a reload, with no restart; only what the sockets were opened with needs one, and a
change reverted before the restart needs none."""

from __future__ import annotations

import asyncio
import signal

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.configs import SUBMISSION, TEAMS_A_B
from tests.support.sink import make_test_cert
from tests.support.smtp import send
from tests.support.wire import free_port
from tests.runtime.test_serve import start_serve

MESSAGE = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
           b"To: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
           b"Subject: Invoice 4411\r\n\r\nHello\r\n")
RCPTS = ["client@supplier.example", "pl-payroll@corp.example"]


def text(port: int, upstream: str, *, mode: str, listener_mode: str | None = None) -> str:
    listener = SUBMISSION.format(port=port)
    if listener_mode:
        listener += f"    mode: {listener_mode}\n"
    return (listener + TEAMS_A_B + f"upstream:\n  url: {upstream}\nstore:\n  url: sqlite:smtpgate.db\n"
            f"  auto_upgrade: true\nmode: {mode}\n")


async def relayed_to(port: int, sink, number: int) -> list[str]:
    """Send the message from a new session; the envelope recipients the upstream got."""
    result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=RCPTS, data=MESSAGE)
    assert result.data[0] == 250, result
    [*_, received] = await sink.wait_for_messages(number)
    return received.rcpt_tos


async def test_sighup_switches_observe_and_enforce_both_ways_for_new_sessions(tmp_path, sink):
    port, upstream = free_port(), f"smtp://127.0.0.1:{sink.port}"
    config = write_config(tmp_path, text(port, upstream, mode="observe"))
    served = await start_serve(config)
    try:
        await served.wait_event("smtpgate.ready")
        assert await relayed_to(port, sink, 1) == RCPTS  # observed: relayed as received

        async def reload(**modes) -> dict:
            config.write_text(text(port, upstream, **modes))
            served.events.clear()
            served.proc.send_signal(signal.SIGHUP)
            return await served.wait_event("config.reloaded")

        reloaded = await reload(mode="enforce")
        assert reloaded["needs_restart"] is None
        tagged = await relayed_to(port, sink, 2)
        assert tagged[1].startswith("pl-payroll+") and tagged[1] != RCPTS[1]

        # Back to observe, by the listener's own mode this time: no link is used or made.
        reloaded = await reload(mode="enforce", listener_mode="observe")
        assert reloaded["needs_restart"] is None
        assert await relayed_to(port, sink, 3) == RCPTS
        await served.wait_event("message.observed")

        reloaded = await reload(mode="observe", listener_mode="enforce")
        assert reloaded["needs_restart"] is None
        assert await relayed_to(port, sink, 4) == tagged

        # And the top-level mode back to observe: nothing is tagged any more.
        reloaded = await reload(mode="observe")
        assert reloaded["needs_restart"] is None
        assert await relayed_to(port, sink, 5) == RCPTS
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0


async def test_a_listener_change_reverted_before_a_restart_needs_none(tmp_path, sink, start_gate, log_lines):
    upstream = f"smtp://127.0.0.1:{sink.port}"
    original = text(free_port(), upstream, mode="enforce")
    gate, port = await start_gate(load_config(write_config(tmp_path, original)))

    def reload(config_text: str) -> dict:
        gate.reload(load_config(write_config(tmp_path, config_text)))
        return [e for e in log_lines() if e["event"] == "config.reloaded"][-1]

    moved = text(free_port(), upstream, mode="enforce")
    assert reload(moved)["needs_restart"] == ["listeners"]
    assert reload(original)["needs_restart"] is None
    # The per-listener mode is no socket change either; it reaches the next session.
    assert reload(text(port, upstream, mode="enforce", listener_mode="observe"))["needs_restart"] is None
    assert await relayed_to(port, sink, 1) == RCPTS


async def test_an_admin_certificate_change_reverted_before_a_restart_needs_none(tmp_path, sink, start_gate,
                                                                                 log_lines):
    first, second = make_test_cert(tmp_path / "one"), make_test_cert(tmp_path / "two")
    base = (text(free_port(), f"smtp://127.0.0.1:{sink.port}", mode="enforce")
            + f'admin:\n  listen: "127.0.0.1:{free_port()}"\n')

    def with_cert(pair: tuple[str, str]) -> str:
        return base + f"  tls_cert: {pair[0]}\n  tls_key: {pair[1]}\n"

    gate, _ = await start_gate(load_config(write_config(tmp_path, with_cert(first))))

    def reload(config_text: str) -> dict:
        gate.reload(load_config(write_config(tmp_path, config_text)))
        return [e for e in log_lines() if e["event"] == "config.reloaded"][-1]

    assert reload(with_cert(second))["needs_restart"] == ["admin.tls_cert"]
    assert reload(with_cert(first))["needs_restart"] is None  # the certificate serving all along
