"""What smtpgate/frontends/policy.py checks and logs around the decision, on real sessions: the hop
limit, the stamp events (stamp.invalid, message.already_processed), the decision's events in the
session's log, message.relayed's duration, and inbound's events (message.retagged,
inbound.unknown_tag) in enforce and observe mode."""

from __future__ import annotations

import asyncio
import time

import pytest

from smtpgate.config import load_config
from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.stamp import make_stamp
from tests.conftest import write_config
from tests.support.smtp import send
from tests.support.wire import code
from tests.frontends.smtp.test_connector import SECRET, SENDER, gate_config, message
from tests.frontends.smtp.test_relay import MESSAGE, dot_stuff, send_data, session
from tests.test_inbound import REPLY, config_text
from tests.test_mission import STEP1


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


def hops(count: int) -> bytes:
    return b"".join(b"Received: from h%d by h%d; Fri, 27 Nov 2026 10:00:00 +0000\r\n" % (i, i) for i in range(count))


async def test_a_message_with_max_hops_received_fields_passes_and_one_more_is_refused(sink, config_for, start_gate,
                                                                                      log_lines):
    _, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", "limits:\n  max_hops: 3\n"))
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await send_data(wire, hops(3) + MESSAGE)) == 250
    [received] = sink.messages
    assert received.data.endswith(hops(3) + MESSAGE)  # and smtpgate's own Received field before them
    assert len(parse_header_block(received.data).get_all("Received")) == 4
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert await send_data(wire, hops(4) + MESSAGE) == "554 5.4.6 Too many hops, mail loop suspected"
    assert len(sink.messages) == 1
    [rejected] = events(log_lines, "message.rejected")
    assert (rejected["code"], rejected["reason"]) == (554, "4 Received fields")
    await wire.cmd("QUIT")


async def test_a_stamp_that_does_not_verify_is_logged_removed_with_the_message_id(tmp_path, sink, start_gate,
                                                                                 log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}"))
    copied = f"X-Smtpgate-Processed: {make_stamp(SECRET.encode(), '<original@corp.example>')}"
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=message("<other@corp.example>", copied))
    assert result.data[0] == 250
    [invalid] = events(log_lines, "stamp.invalid")
    assert (invalid["level"], invalid["message_id"], invalid["action"], invalid["header"], invalid["reason"]) == (
        "warning", "<other@corp.example>", "removed", "X-Smtpgate-Processed",
        "the stamp does not verify for this Message-ID")
    [relayed] = events(log_lines, "message.relayed")
    assert invalid["session"] == relayed["session"]


@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_a_stamped_message_is_logged_already_processed_with_the_listeners_mode(mode, tmp_path, sink,
                                                                                    start_gate, log_lines):
    _, port = await start_gate(gate_config(tmp_path, f"smtp://127.0.0.1:{sink.port}", top=f"mode: {mode}\n"))
    stamp = make_stamp(SECRET.encode(), "<twice@corp.example>")
    result = await send("127.0.0.1", port, mail_from=SENDER, rcpt_tos=["pl-payroll@corp.example"],
                        data=message("<twice@corp.example>", f"X-Smtpgate-Processed: {stamp}"))
    assert result.data[0] == 250
    [already] = events(log_lines, "message.already_processed")
    assert (already["message_id"], already["header"], already["mode"], already["mail_from"]) == (
        "<twice@corp.example>", "X-Smtpgate-Processed", mode, SENDER)


TAGGED = (b"From: uk-payroll+101203-T@corp.example\r\nCc: pl-payroll@corp.example\r\n"
          b"Message-ID: <session-log@corp.example>\r\n\r\nbody\r\n")


async def test_the_links_a_decision_creates_are_logged_in_the_sessions_log(relay, sink, log_lines):
    _, port = relay
    result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=["pl-payroll@corp.example"], data=TAGGED)
    assert result.data[0] == 250
    [opened] = events(log_lines, "session.opened")
    [created] = events(log_lines, "link.created")
    assert (created["session"], created["listener"], created["client_ip"]) == (
        opened["session"], "submission", "127.0.0.1")
    assert (created["source_reference"], created["mailbox"], created["message_id"]) == (
        "101203-T", "pl-payroll@corp.example", "<session-log@corp.example>")
    assert sink.messages[0].rcpt_tos == [f"pl-payroll+{created['reference']}@corp.example"]


async def test_duration_ms_is_the_transactions_time_from_mail_to_the_upstreams_answer(relay, sink, log_lines):
    """The upstream holds its answer to the dot while another whole session goes through
    smtpgate: the duration covers that wait (upstream_ms) and no more than the test saw."""
    _, port = relay
    began = time.monotonic()
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    sink.hold_data = asyncio.Event()
    assert code(await wire.cmd("DATA")) == 354
    await wire.send(dot_stuff(MESSAGE) + b".\r\n")
    await sink.wait_for_received(1)
    other = await session(port)
    assert code(await other.cmd("NOOP")) == 250
    await other.cmd("QUIT")
    sink.hold_data.set()
    assert code(await wire.reply()) == 250
    took_ms = (time.monotonic() - began) * 1000
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["upstream_ms"] > 0
    assert relayed["upstream_ms"] <= relayed["duration_ms"] <= took_ms
    assert isinstance(relayed["duration_ms"], float) and relayed["duration_ms"] == round(relayed["duration_ms"], 1)
    await wire.cmd("QUIT")


@pytest.fixture
async def inbound_gate(sink, tmp_path, start_gate, log_lines):
    """An outbound listener (the mission's first message makes the link), an inbound one and an
    inbound one in observe mode."""
    text = config_text(f"smtp://127.0.0.1:{sink.port}", "strip").replace(
        "    direction: inbound\n",
        "    direction: inbound\n  - name: inbound-observed\n    address: 127.0.0.1:0\n"
        "    direction: inbound\n    mode: observe\n", 1)
    gate, _ = await start_gate(load_config(write_config(tmp_path, text)))
    outbound, inbound, observed = (port for _, port in gate.bound)
    result = await send("127.0.0.1", outbound, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"], data=STEP1)
    assert result.data[0] == 250
    return inbound, observed


GUESSED = "pl-payroll+424242-T@corp.example"
ANSWER = REPLY.replace(b"Subject:", b"Message-ID: <answer.1@supplier.example>\r\nSubject:")


async def test_inbound_events_name_the_message_and_the_sender(inbound_gate, sink, log_lines):
    inbound, _ = inbound_gate
    result = await send("127.0.0.1", inbound, mail_from="client@supplier.example",
                        rcpt_tos=["uk-payroll@corp.example", GUESSED], data=ANSWER)
    assert result.data[0] == 250
    assert sink.messages[-1].rcpt_tos == ["uk-payroll+101203-T@corp.example", "pl-payroll@corp.example"]
    [unknown] = events(log_lines, "inbound.unknown_tag")
    assert (unknown["action"], unknown["message_id"]) == ("strip", "<answer.1@supplier.example>")
    [retagged] = events(log_lines, "message.retagged")
    assert retagged["message_id"] == "<answer.1@supplier.example>"
    assert retagged["mail_from"] == "client@supplier.example"
    assert not [e for e in events(log_lines, "message.observed") if e["listener"] == "inbound"]


async def test_inbound_in_observe_mode_says_what_it_would_do_and_changes_nothing(inbound_gate, sink, log_lines):
    _, observed = inbound_gate
    result = await send("127.0.0.1", observed, mail_from="client@supplier.example",
                        rcpt_tos=["uk-payroll@corp.example", GUESSED], data=ANSWER)
    assert result.data[0] == 250
    assert sink.messages[-1].rcpt_tos == ["uk-payroll@corp.example", GUESSED]
    [unknown] = events(log_lines, "inbound.unknown_tag")
    assert (unknown["action"], unknown["message_id"]) == ("observed", "<answer.1@supplier.example>")
    assert not events(log_lines, "message.retagged")
    [observed_event] = [e for e in events(log_lines, "message.observed") if "thread_message_id" in
                        str(e.get("recipients"))]
    assert observed_event["message_id"] == "<answer.1@supplier.example>"
    assert observed_event["mail_from"] == "client@supplier.example"
    assert observed_event["recipients"] == [{"original": "uk-payroll@corp.example",
                                             "relayed": "uk-payroll+101203-T@corp.example",
                                             "thread_message_id": "<step1.101203@corp.example>"}]
