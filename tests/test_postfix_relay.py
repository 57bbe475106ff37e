"""smtpgate relaying to a real Postfix (Debian package) as its upstream."""

from __future__ import annotations

import pytest

from tests.support.smtp import send

pytestmark = pytest.mark.postfix


async def test_relay_to_postfix_delivers_to_maildir(corp_postfix, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{corp_postfix.port}"))
    body = (b"From: Client <client@supplier.example>\r\n"
            b"To: HR <uk-payroll@corp.example>\r\n"
            b"Subject: through postfix\r\n"
            b"Message-ID: <pf1@supplier.example>\r\n"
            b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n\r\n"
            b"line one\r\nline two\r\n")
    result = await send("127.0.0.1", port, mail_from="client@supplier.example",
                        rcpt_tos=["uk-payroll@corp.example"], data=body)
    assert result.data is not None and result.data[0] == 250
    # Postfix chose the queue id: its own 250 text reached the client.
    assert "queued as" in result.data[1]
    [delivered] = await corp_postfix.wait_for_delivery_async("uk-payroll", count=1)
    assert delivered.endswith(b"line one\r\nline two\r\n") or delivered.endswith(b"line one\nline two\n")
    assert b"Message-ID: <pf1@supplier.example>" in delivered
    assert b"(smtpgate)" in delivered


async def test_postfix_refusal_reaches_client(corp_postfix, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{corp_postfix.port}"))
    result = await send("127.0.0.1", port, mail_from="client@supplier.example",
                        rcpt_tos=["nobody@corp.example", "uk-payroll@corp.example"],
                        data=b"Subject: x\r\n\r\nbody\r\n")
    assert result.rcpts["nobody@corp.example"][0] == 550
    assert result.rcpts["uk-payroll@corp.example"][0] == 250
    assert result.data is not None and result.data[0] == 250
    await corp_postfix.wait_for_delivery_async("uk-payroll", count=1)
