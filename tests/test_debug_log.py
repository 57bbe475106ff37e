"""logging.level: debug logs each SMTP command and reply of a session (never AUTH's credentials)."""

from __future__ import annotations

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.configs import tls_auth_yaml
from tests.support.sink import client_tls_context
from tests.support.smtp import send
from tests.support.wire import Wire, code

BODY = b"Subject: debug\r\nMessage-ID: <debug@corp.example>\r\n\r\nbody\r\n"


def config(tmp_path, sink, extra: str):
    return load_config(write_config(tmp_path, tls_auth_yaml(tmp_path, sink.port, "optional") + extra))


async def relay(tmp_path, port):
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    result = await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"], data=BODY,
                        starttls=True, tls_context=tls, login=("jane", "s3cret pass"))
    assert result.data[0] == 250


async def test_debug_level_logs_each_command_and_reply(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(config(tmp_path, sink, "logging:\n  level: debug\n"))
    await relay(tmp_path, port)
    events = log_lines()
    commands = [(e["verb"], e["arg"]) for e in events if e["event"] == "smtp.command"]
    assert commands == [("EHLO", "client.test"), ("STARTTLS", ""), ("EHLO", "client.test"), ("AUTH", "PLAIN"),
                        ("MAIL", "FROM:<jane@corp.example>"), ("RCPT", "TO:<b@x.example>"), ("DATA", ""),
                        ("QUIT", "")]
    replies = [e["reply"][:3] for e in events if e["event"] == "smtp.reply"]
    assert replies[0] == "220" and "235" in replies and replies[-1] == "221"
    assert not any("s3cret" in str(e) or "amFuZQ" in str(e) for e in events)  # no password, no base64 of it


async def test_debug_peers_turn_debug_on_for_chosen_clients_only(tmp_path, sink, start_gate, log_lines):
    from smtpgate.log import setup_logging

    setup_logging("json", "info", debug_peers=True)  # as serve sets it up for this config
    try:
        gate, port = await start_gate(config(tmp_path, sink, "logging:\n  debug_peers: [192.0.2.10, 10.1.0.0/16]\n"))
        await relay(tmp_path, port)  # from 127.0.0.1: not a debug peer
        assert not [e for e in log_lines() if e["event"].startswith("smtp.") or e["level"] == "debug"]
        gate.reload(config(tmp_path, sink, "logging:\n  debug_peers: [127.0.0.0/8]\n"))
        await relay(tmp_path, port)
        commands = [e for e in log_lines() if e["event"] == "smtp.command"]
        assert [e["verb"] for e in commands][:2] == ["EHLO", "STARTTLS"]
        assert all(e["level"] == "debug" and e["debug_peer"] and e["client_ip"] == "127.0.0.1" for e in commands)
    finally:
        setup_logging("json", "debug")


async def test_debug_log_keeps_the_first_512_characters_of_a_long_argument(tmp_path, sink, start_gate, log_lines):
    gate, port = await start_gate(config(tmp_path, sink, "logging:\n  level: debug\n"))
    wire, _ = await Wire.open(port)
    assert code(await wire.cmd("EHLO client.test")) == 250
    # After EHLO a MAIL line may be longer than 512 octets (room for SIZE and SMTPUTF8).
    arg = "FROM:<" + "j" * 520 + "@corp.example>"
    assert code(await wire.cmd("MAIL " + arg)) != 500  # read as a command, not refused as too long
    await wire.cmd("QUIT")
    [mail] = [e for e in log_lines() if e["event"] == "smtp.command" and e["verb"] == "MAIL"]
    assert mail["arg"] == arg[:512]
