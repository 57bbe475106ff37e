"""inbound.share_with_thread against a real Postfix (Debian's package, a private instance with plus
addressing and a Maildir per team mailbox): a reply the client sent to Team A only lands in Team B's
linked activity too, with the header block as the client wrote it. Once through smtpgate's inbound
SMTP listener (Postfix as its upstream), once through its milter on the inbound Postfix (ADDRCPT)."""

from __future__ import annotations

import asyncio

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.postfix import PostfixInstance
from tests.support.smtp import send
from tests.test_inbound import NEW, config_text
from tests.frontends.milter.test_milter import INBOUND_LISTENER, Milter, milter_config  # noqa: F401 - the fixture
from tests.frontends.milter.test_milter_postfix import DISCARD
from tests.test_mission import STEP1

pytestmark = pytest.mark.postfix

REPLY = (b"From: Client Ltd <client@supplier.example>\r\n"
         b"To: Team A <uk-payroll+101203-T@corp.example>\r\n"
         b"Subject: RE: Invoice 4411\r\n"
         b"Message-ID: <reply.pf@supplier.example>\r\n"
         b"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n"
         b"In-Reply-To: <step1.101203@corp.example>\r\n"
         b"\r\n"
         b"Thanks, paid today.\r\n")


@pytest.fixture
async def postfix(tmp_path):
    """corp.example's mail store; mail for other domains is discarded."""
    instance = PostfixInstance(tmp_path / "pf", main_cf=DISCARD)
    await asyncio.to_thread(instance.start)
    yield instance
    await asyncio.to_thread(instance.stop)


def header_block(landed: bytes) -> bytes:
    """The header block Postfix delivered, less the fields delivery and smtpgate put on top."""
    head = landed.split(b"\n\n", 1)[0] + b"\n"
    return b"".join(line + b"\n" for line in head.split(b"\n")[:-1]
                    if not line.startswith((b"Return-Path:", b"X-Original-To:", b"Delivered-To:", b"Received:",
                                            b"\t", b" ")))


def assert_shared(team_a: bytes, team_b: bytes, team_b_address: str) -> None:
    """Both mailboxes got the reply, Team B at its tagged address, with the client's header block."""
    written = REPLY.split(b"\r\n\r\n")[0].replace(b"\r\n", b"\n") + b"\n"
    assert b"Delivered-To: uk-payroll+101203-T@corp.example\n" in team_a
    assert f"Delivered-To: {team_b_address}\n".encode() in team_b
    for landed in (team_a, team_b):
        assert header_block(landed) == written
        assert landed.endswith(b"\nThanks, paid today.\n")


async def test_a_reply_to_team_a_only_reaches_team_b_through_postfix(postfix, tmp_path, start_gate, log_lines):
    text = config_text(f"smtp://127.0.0.1:{postfix.port}", "pass") + "  share_with_thread: true\n"
    gate, _ = await start_gate(load_config(write_config(tmp_path, text)))
    outbound, inbound = (port for _, port in gate.bound)
    first = await send("127.0.0.1", outbound, mail_from="uk-payroll+101203-T@corp.example", data=STEP1,
                       rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"])
    assert first.data is not None and first.data[0] == 250, first
    await postfix.wait_for_delivery_async("pl-payroll", count=1)

    result = await send("127.0.0.1", inbound, mail_from="client@supplier.example",
                        rcpt_tos=["uk-payroll@corp.example"], data=REPLY)
    assert result.data is not None and result.data[0] == 250, (result, postfix.maillog())
    [team_a] = await postfix.wait_for_delivery_async("uk-payroll", count=1)
    team_b = [m for m in await postfix.wait_for_delivery_async("pl-payroll", count=2) if b"paid today" in m]
    assert len(team_b) == 1, postfix.maillog()
    assert_shared(team_a, team_b[0], f"pl-payroll+{NEW}@corp.example")
    [shared] = [e for e in log_lines() if e["event"] == "message.shared"]
    assert shared["added"] == [f"pl-payroll+{NEW}@corp.example"] and shared["refused"] == []


async def test_the_milter_on_an_inbound_postfix_shares_with_addrcpt(milter_config, start_gate,  # noqa: F811
                                                                    log_lines, tmp_path):
    gate, port = await start_gate(milter_config(listener=INBOUND_LISTENER,
                                                extra="inbound:\n  share_with_thread: true\n"))
    # The thread message went out through smtpgate's outbound milter (another MTA's, played here).
    new, _ = await Milter(gate, port, log_lines).step1()
    inbound_port = gate.bound[1][1]
    postfix = PostfixInstance(tmp_path / "pf", milter=("127.0.0.1", inbound_port), main_cf=DISCARD)
    await asyncio.to_thread(postfix.start)
    try:
        result = await send("127.0.0.1", postfix.port, mail_from="client@supplier.example",
                            rcpt_tos=["uk-payroll@corp.example"], data=REPLY)
        assert result.data is not None and result.data[0] == 250, (result, postfix.maillog())
        [team_a] = await postfix.wait_for_delivery_async("uk-payroll", count=1)
        [team_b] = await postfix.wait_for_delivery_async("pl-payroll", count=1)
        assert_shared(team_a, team_b, f"pl-payroll+{new}@corp.example")
    finally:
        await asyncio.to_thread(postfix.stop)
    [shared] = [e for e in log_lines() if e["event"] == "message.shared"]
    assert shared["added"] == [f"pl-payroll+{new}@corp.example"] and shared["in_reply_to"] == (
        "<step1.101203@corp.example>")
    await gate.store.records.settled()
    view = await gate.store.show(new)
    [listed] = [m for m in view.messages if m.message_id == "<reply.pf@supplier.example>"]
    assert listed.shared == [f"pl-payroll+{new}@corp.example"]
