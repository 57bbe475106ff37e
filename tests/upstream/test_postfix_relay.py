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
    # message.relayed names Postfix's queue id, the one its own log follows the message by.
    [relayed] = [e for e in log_lines() if e["event"] == "message.relayed"]
    queue_id = relayed["upstream_queue_id"]
    assert result.data[1].endswith(f"queued as {queue_id}")
    assert f" {queue_id}: message-id=<pf1@supplier.example>" in corp_postfix.maillog()


async def test_postfix_refusal_reaches_client(corp_postfix, config_for, start_gate, log_lines):
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{corp_postfix.port}"))
    result = await send("127.0.0.1", port, mail_from="client@supplier.example",
                        rcpt_tos=["nobody@corp.example", "uk-payroll@corp.example"],
                        data=b"Subject: x\r\n\r\nbody\r\n")
    assert result.rcpts["nobody@corp.example"][0] == 550
    assert result.rcpts["uk-payroll@corp.example"][0] == 250
    assert result.data is not None and result.data[0] == 250
    await corp_postfix.wait_for_delivery_async("uk-payroll", count=1)


async def test_tag_refused_by_postfix_without_plus_addressing_is_delivered_untagged(tmp_path, config_for,
                                                                                   start_gate, log_lines):
    """The tag-refused fallback against the real thing: a Postfix with plus addressing off refuses the tagged
    address on replay; smtpgate delivers untagged, logs upstream.tag_refused, and shows and
    records what it relayed."""
    import asyncio

    from tests.support.postfix import PostfixInstance

    postfix = PostfixInstance(tmp_path / "pf", recipient_delimiter="")
    await asyncio.to_thread(postfix.start)
    try:
        gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{postfix.port}"))
        body = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
                b"To: Team B <pl-payroll@corp.example>\r\n"
                b"Subject: no plus addressing here\r\n"
                b"Message-ID: <noplus@corp.example>\r\n\r\nbody\r\n")
        result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                            rcpt_tos=["pl-payroll@corp.example"], data=body)
        assert result.rcpts["pl-payroll@corp.example"][0] == 250
        assert result.data is not None and result.data[0] == 250, result.data
        [landed] = await postfix.wait_for_delivery_async("pl-payroll", count=1)
        assert b"Delivered-To: pl-payroll@corp.example\n" in landed
        # What a reply-all would use is what was delivered: no tag Postfix refuses.
        assert b"To: Team B <pl-payroll@corp.example>\n" in landed
        events = log_lines()
        [refused] = [e for e in events if e["event"] == "upstream.tag_refused"]
        assert refused["recipient"] == "pl-payroll@corp.example"
        assert refused["tagged"].startswith("pl-payroll+") and refused["reply"].startswith("550")
        [relayed] = [e for e in events if e["event"] == "message.relayed"]
        assert relayed["recipients"] == [{"original": "pl-payroll@corp.example",
                                          "relayed": "pl-payroll@corp.example"}]
        view = await gate.store.show("101203-T")
        assert [m.recipients for m in view.messages] == [["pl-payroll@corp.example"]]
        # The link itself was made before the dot, and stays for the next message.
        assert [link.mailbox for link in view.links] == ["pl-payroll@corp.example"]
    finally:
        await asyncio.to_thread(postfix.stop)
