"""Logs that say who sent a message, from where, and what happened to it (README "Logs"),
on real sessions: relay-network, authenticated over TLS, and behind a PROXY header."""

from __future__ import annotations

import asyncio
import socket

import aiosmtplib
import pytest

from smtpgate import __version__
from tests.support.sink import client_tls_context
from tests.support.smtp import send
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_tls_auth import BODY, config_with_listener


def events(log_lines, name: str) -> list[dict]:
    return [e for e in log_lines() if e["event"] == name]


TAGGED = (b"From: uk-payroll+101203-T@corp.example\r\nCc: pl-payroll@corp.example\r\n"
          b"Message-ID: <fields@corp.example>\r\n\r\nbody\r\n")


async def test_a_relay_network_session(relay, sink, log_lines):
    _, port = relay
    result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=["pl-payroll@corp.example"], data=TAGGED, helo="client.test")
    assert result.data[0] == 250
    for event in log_lines():
        assert event["host"] == socket.gethostname() and event["version"] == __version__
    [opened] = events(log_lines, "session.opened")
    assert opened["client_ip"] == "127.0.0.1"
    [relayed] = events(log_lines, "message.relayed")
    assert (relayed["client_ip"], relayed["helo"], relayed["sasl_username"], relayed["tls"]) == (
        "127.0.0.1", "client.test", None, None)
    [created] = events(log_lines, "link.created")
    assert created["session"] == relayed["session"] and created["message_id"] == "<fields@corp.example>"


async def test_authenticated_over_tls(tmp_path, sink, start_gate, log_lines):
    _, port = await start_gate(config_with_listener(tmp_path, sink.port, "required", "[]"))
    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                   data=BODY, starttls=True, tls_context=tls, login=("jane", "wrong"))
    good = await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                      data=BODY, starttls=True, tls_context=tls, login=("jane", "s3cret pass"))
    assert good.data[0] == 250
    *failed, ok = events(log_lines, "auth.result")  # the client tries PLAIN, then LOGIN
    assert failed and all((f["level"], f["success"]) == ("warning", False) for f in failed)
    assert (ok["level"], ok["success"]) == ("info", True)
    for event in (*failed, ok):
        assert event["session"] and event["client_ip"] == "127.0.0.1" and event["mechanism"] in ("PLAIN", "LOGIN")
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["sasl_username"] == "jane" and relayed["tls"].startswith("TLSv1.")
    assert "wrong" not in str(log_lines()) and "s3cret" not in str(log_lines())


async def test_a_proxied_client_is_named_by_its_real_address(sink, config_for, start_gate, log_lines):
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    listener = config.listeners[0].model_copy(update={"proxy_protocol": True})
    _, port = await start_gate(config.model_copy(update={"listeners": (listener,)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
    wire = Wire(reader, writer)
    assert code(await wire.reply()) == 220
    await wire.cmd("EHLO proxied.test")
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 530
    await wire.cmd("QUIT")
    [refused] = events(log_lines, "message.rejected")
    assert (refused["code"], refused["client_ip"], refused["helo"]) == (530, "192.0.2.7", "proxied.test")
    assert refused["proxy"] == "127.0.0.1"


async def test_a_proxy_header_without_addresses_leaves_the_peer_as_the_client(sink, config_for, start_gate,
                                                                                log_lines):
    config = config_for(f"smtp://127.0.0.1:{sink.port}")
    listener = config.listeners[0].model_copy(update={"proxy_protocol": True})
    _, port = await start_gate(config.model_copy(update={"listeners": (listener,)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY UNKNOWN\r\n")  # a proxy's health check, or a client it cannot describe
    wire = Wire(reader, writer)
    assert code(await wire.reply()) == 220
    await wire.cmd("EHLO unknown.test")
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250  # 127.0.0.1 is a relay network
    assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250
    assert code(await wire.cmd("DATA")) == 354
    assert code(await wire.cmd("Subject: hi\r\n\r\nbody\r\n.")) == 250
    await wire.cmd("QUIT")
    assert events(log_lines, "session.proxied") == []
    [relayed] = events(log_lines, "message.relayed")
    assert relayed["client_ip"] == "127.0.0.1" and "proxy" not in relayed


async def test_every_recipient_refused_upstream_is_one_message_rejected(relay, sink, log_lines):
    _, port = relay
    sink.rcpt_replies["gone@x.example"] = "550 5.1.1 no such user"
    wire, _ = await Wire.open(port)
    await wire.cmd("EHLO client.test")
    assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
    assert code(await wire.cmd("RCPT TO:<gone@x.example>")) == 550
    assert code(await wire.cmd("DATA")) == 554
    await wire.cmd("QUIT")
    [rejected] = events(log_lines, "message.rejected")
    assert rejected["code"] == 554 and rejected["refused"][0]["recipient"] == "gone@x.example"
    assert rejected["client_ip"] == "127.0.0.1"


async def test_a_rewrite_under_a_dkim_signature_is_logged(relay, sink, log_lines):
    _, port = relay
    signed = (b"DKIM-Signature: v=1; a=rsa-sha256; d=corp.example; s=s1; h=from:cc:subject; bh=x; b=y\r\n"
              + TAGGED)
    result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=["pl-payroll@corp.example"], data=signed)
    assert result.data[0] == 250  # still relayed: smtpgate belongs before the signer
    [event] = events(log_lines, "dkim.invalidated")
    assert (event["domain"], event["fields"]) == ("corp.example", ["cc"])
