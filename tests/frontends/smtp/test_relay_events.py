"""The relay's transaction (smtpgate/frontends/smtp/relay.py) as its events and replies tell it:
no upstream at MAIL, the upstream's refusal of the dot, and what message.relayed names."""

from __future__ import annotations

import pytest

from smtpgate.config import load_config
from tests.conftest import BASE_CONFIG, write_config
from tests.support.sink import Sink
from tests.support.wire import code, free_port
from tests.frontends.smtp.test_relay import MESSAGE, dot_stuff, send_data, session


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


async def test_no_upstream_at_mail_is_logged_at_stage_connect_with_its_reason(config_for, start_gate, log_lines):
    url = f"smtp://127.0.0.1:{free_port()}"
    _, port = await start_gate(config_for(url))
    wire = await session(port)
    reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
    assert reply.startswith("451 4.4.1")
    [error] = [e for e in events(log_lines, "upstream.error") if e["stage"] == "connect"]
    assert error["upstream"] == url and error["reason"]
    [refused] = events(log_lines, "command.refused")
    assert (refused["code"], refused["stage"], refused["reason"]) == (451, "mail", error["reason"])
    await wire.cmd("QUIT")


async def test_an_upstream_refusing_smtpgates_login_is_logged_at_stage_connect(tmp_path, start_gate, log_lines):
    async with Sink(auth={"relay@corp.example": "right"}, require_auth=True) as upstream:
        (tmp_path / "up.secret").write_text("wrong\n")
        url = f"smtp://127.0.0.1:{upstream.port}"
        text = BASE_CONFIG.format(upstream=url, store=f"sqlite:{tmp_path}/smtpgate.db").replace(
            "  timeout: 10\n", "  timeout: 10\n  username: relay@corp.example\n  password_file: up.secret\n")
        _, port = await start_gate(load_config(write_config(tmp_path, text)))
        wire = await session(port)
        reply = await wire.cmd("MAIL FROM:<jane@corp.example>")
        assert reply.startswith("451 4.7.0")
        failed = [e for e in events(log_lines, "upstream.auth_failed") if e.get("stage") == "connect"]
        assert failed and failed[-1]["upstream"] == url and failed[-1]["reason"]
        [refused] = events(log_lines, "command.refused")
        assert (refused["code"], refused["stage"], refused["reason"]) == (451, "mail", failed[-1]["reason"])
        await wire.cmd("QUIT")


async def test_an_upstream_lost_at_rcpt_is_logged_at_stage_transaction_and_refuses_the_message_with_its_reason(
        relay, sink, log_lines):
    _, port = relay
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    await sink.drop_connections()
    assert await wire.cmd("RCPT TO:<other@supplier.example>") == (
        "451 4.4.2 Connection to the upstream mail server lost, try again later")
    [error] = events(log_lines, "upstream.error")
    assert (error["stage"], error["upstream"]) == ("transaction", f"smtp://127.0.0.1:{sink.port}")
    assert error["reason"].startswith("RCPT: ")
    [refused] = events(log_lines, "command.refused")
    assert (refused["code"], refused["stage"], refused["reason"]) == (451, "rcpt", error["reason"])
    # The client goes on with the recipient it has: the message meets the lost transaction.
    assert await send_data(wire, MESSAGE) == "451 4.4.2 Connection to the upstream mail server lost, try again later"
    [rejected] = events(log_lines, "message.rejected")
    assert (rejected["code"], rejected["stage"], rejected["reason"]) == (451, "data", error["reason"])
    assert sink.received == [] and not events(log_lines, "message.relayed")
    await wire.cmd("QUIT")


async def test_message_relayed_names_the_sender_the_refused_the_size_and_the_upstreams_reply(relay, sink, log_lines):
    gate, port = relay
    sink.rcpt_replies["nobody@supplier.example"] = "550 5.1.1 No such user"
    sink.data_reply = "250 2.0.0 Ok: queued as 4XyZ12QrT"
    wire = await session(port)
    assert code(await wire.cmd("MAIL FROM:<jane@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<client@supplier.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<nobody@supplier.example>")) == 550
    assert code(await send_data(wire, MESSAGE)) == 250
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["mail_from"] == "jane@corp.example"
    assert relayed["recipients"] == [{"original": "client@supplier.example", "relayed": "client@supplier.example"}]
    assert relayed["refused"] == [{"recipient": "nobody@supplier.example", "reply": "550 5.1.1 No such user"}]
    # What went upstream: the head with its Received field, the dot-stuffed body, no final dot.
    assert relayed["size"] == len(dot_stuff(sink.messages[0].data))
    assert relayed["upstream"] == f"smtp://127.0.0.1:{sink.port}"
    assert relayed["upstream_reply"] == "250 2.0.0 Ok: queued as 4XyZ12QrT"
    assert relayed["upstream_queue_id"] == "4XyZ12QrT"
    assert relayed["upstream_ms"] >= 0 and relayed["store_ms"] >= 0
    assert relayed["client_ip"] == "127.0.0.1" and relayed["helo"] == "client.test"
    assert "already_processed" not in relayed
    await wire.cmd("QUIT")


async def test_a_message_with_no_refused_recipient_logs_refused_as_none(relay, sink, log_lines):
    _, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await send_data(wire, MESSAGE)) == 250
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["refused"] is None and relayed["mail_from"] == ""
    await wire.cmd("QUIT")


@pytest.mark.parametrize("reply", ["554 5.7.1 Spam detected", "452 4.3.1 Insufficient storage"])
async def test_the_upstreams_refusal_of_the_dot_is_the_clients_and_message_rejected_names_it(
        relay, sink, log_lines, reply):
    _, port = relay
    sink.data_reply = reply
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert await send_data(wire, MESSAGE) == reply
    [rejected] = events(log_lines, "message.rejected")
    assert rejected["code"] == int(reply[:3]) and rejected["stage"] == "data"
    assert rejected["reason"] == f"upstream: {reply[4:]}"
    assert rejected["message_id"] == "<m1@corp.example>" and rejected["upstream_ms"] >= 0
    assert rejected["mail_from"] == "jane@corp.example" and rejected["client_ip"] == "127.0.0.1"
    assert not events(log_lines, "message.relayed")
    # The refused transaction was reset upstream; the connection carries the next message.
    sink.data_reply = None
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await send_data(wire, MESSAGE)) == 250
    assert "RSET" in sink.commands and sink.connections == 1
    await wire.cmd("QUIT")


# What message.relayed holds for a message relayed in lockstep (docs/reference.md, "Events"):
# a timing under another name, or a field missing, is a change the metrics and operators see.
RELAYED_FIELDS = {
    "event", "level", "timestamp", "host", "version", "session", "listener", "message_id", "mail_from",
    "recipients", "shared", "source_reference", "source_found_in", "links_created", "links_reused",
    "duration_ms", "refused", "size", "upstream", "upstream_reply", "upstream_queue_id", "upstream_ms",
    "store_ms", "client_ip", "helo", "sasl_username", "tls",
}


async def test_message_relayed_holds_its_fields_and_no_other(relay, sink, log_lines):
    _, port = relay
    wire = await session(port)
    await wire.cmd("MAIL FROM:<jane@corp.example>")
    await wire.cmd("RCPT TO:<client@supplier.example>")
    assert code(await send_data(wire, MESSAGE)) == 250
    [relayed] = events(log_lines, "message.relayed")
    assert set(relayed) - {"client_port", "proxied"} == RELAYED_FIELDS, set(relayed) ^ RELAYED_FIELDS
    await wire.cmd("QUIT")


async def test_upstream_ms_and_store_ms_are_milliseconds_to_a_tenth(relay, sink, log_lines):
    """As duration_ms: a tenth of a millisecond, whatever the clock read (three messages, so a
    finer rounding cannot hide behind a value that happens to end in zero)."""
    _, port = relay
    wire = await session(port)
    for _ in range(3):
        await wire.cmd("MAIL FROM:<jane@corp.example>")
        await wire.cmd("RCPT TO:<client@supplier.example>")
        assert code(await send_data(wire, MESSAGE)) == 250
    relayed = events(log_lines, "message.relayed")
    assert len(relayed) == 3
    for timing in [e[key] for e in relayed for key in ("upstream_ms", "store_ms")]:
        assert isinstance(timing, float) and timing == round(timing, 1), timing
    await wire.cmd("QUIT")


async def test_observe_mode_names_the_sender_in_message_observed(tmp_path, sink, start_gate, log_lines):
    from tests.test_observe import TWO_LISTENERS
    from tests.test_mission import STEP1

    config = load_config(write_config(tmp_path, TWO_LISTENERS.format(upstream=f"smtp://127.0.0.1:{sink.port}",
                                                                      store_timeout=10)))
    gate, _ = await start_gate(config)
    _, observe = (port for _, port in gate.bound)
    wire = await session(observe)
    await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")
    await wire.cmd("RCPT TO:<pl-payroll@corp.example>")
    assert code(await send_data(wire, STEP1)) == 250
    [observed] = events(log_lines, "message.observed")
    assert observed["mail_from"] == "uk-payroll+101203-T@corp.example"
    await wire.cmd("QUIT")
