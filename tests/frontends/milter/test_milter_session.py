"""The milter session's protocol state without a socket (frontends/milter/session.py): the
packets decoded as the server decodes them, handed to MilterSession.handle one by one.

A command out of order is a ProtocolError, which the server answers with TEMPFAIL and a
closed connection: that is shown on the wire once in tests/frontends/milter/test_milter.py
(test_violation_out_of_order); here is every order the session refuses, and why.
"""

from __future__ import annotations

import struct

import pytest

from smtpgate.config.sections import Limits
from smtpgate.frontends.milter import codec
from smtpgate.frontends.milter.codec import ProtocolError
from smtpgate.frontends.milter.session import MilterSession, MilterSettings
from smtpgate.frontends.policy import MessagePolicy
from smtpgate.linking.plan import CoreSettings, Directory
from smtpgate.linking.service import LinkService
from smtpgate.log import get_logger
from smtpgate.store import open_store
from tests.support.milter import POSTFIX_ACTIONS, POSTFIX_STEPS, packet, strings

OPTNEG = packet(b"O", struct.pack("!III", 6, POSTFIX_ACTIONS, POSTFIX_STEPS))
CONNECT = packet(b"C", strings("h") + b"U")


@pytest.fixture
async def session(tmp_path):
    store = await open_store(f"sqlite:{tmp_path}/s.db", base_dir=tmp_path)
    try:
        links = LinkService(store, Directory(CoreSettings(internal_domains=("corp.example",))), hostname="relay.test")
        settings = MilterSettings(policy=MessagePolicy(links=links, limits=Limits()), listener="milter")
        yield MilterSession(settings, session_id="s1", log=get_logger())
    finally:
        await store.close()


async def feed(session: MilterSession, *packets: bytes) -> list[bytes]:
    """Every packet's answers, in order; ProtocolError as the session raises it."""
    answers: list[bytes] = []
    for event in codec.Decoder().feed(b"".join(packets)):
        answers += await session.handle(event)
    return answers


@pytest.mark.parametrize(("packets", "reason"), [
    ([CONNECT], "CONNECT before option negotiation"),
    ([packet(b"O", struct.pack("!III", 1, POSTFIX_ACTIONS, 0x7F))], "MTA protocol version 1: 2 or later needed"),
    ([packet(b"O", struct.pack("!III", 6, 0x1FF & ~codec.SMFIF_DELRCPT, POSTFIX_STEPS))], "MTA offers actions 0x1f7: DELRCPT, CHGHEADER and ADDRCPT or ADDRCPT_PAR needed"),
    ([packet(b"O", struct.pack("!III", 6, codec.SMFIF_DELRCPT | codec.SMFIF_CHGHDRS, POSTFIX_STEPS))],
     "MTA offers actions 0x18: DELRCPT, CHGHEADER and ADDRCPT or ADDRCPT_PAR needed"),
    ([OPTNEG, OPTNEG], "a second OPTNEG"),
    ([OPTNEG, packet(b"M", strings("<a@corp.example>"))], "MAIL before CONNECT"),
    ([OPTNEG, CONNECT, CONNECT], "a second CONNECT"),
    ([OPTNEG, CONNECT, packet(b"R", strings("<pl-payroll@corp.example>"))], "RCPT outside a message (before MAIL)"),
    ([OPTNEG, CONNECT, packet(b"M", strings("<a@b>")), packet(b"M", strings("<a@b>"))], "MAIL inside a message (no ABORT after the last)"),
    ([OPTNEG, CONNECT, packet(b"M", strings("<a@b>")), packet(b"L", strings("X", " y")), packet(b"R", strings("<c@d>"))],
     "RCPT after the header"),
    ([OPTNEG, CONNECT, packet(b"M", strings("<a@b>")), packet(b"N"), packet(b"N")], "a second end of header"),
    ([OPTNEG, CONNECT, packet(b"M", strings("<a@corp.example>")), packet(b"N"), packet(b"L", strings("X", " y"))],
     "HEADER after the end of the header"),
    ([OPTNEG, CONNECT, packet(b"E")], "EOM outside a message (before MAIL)"),
    ([OPTNEG, CONNECT, packet(b"M", strings("<a@b>")), packet(b"A"), packet(b"E")], "EOM outside a message (before MAIL)"),
    ([OPTNEG, CONNECT, packet(b"K"), packet(b"M", strings("<a@b>"))], "MAIL before CONNECT"),
])
async def test_a_command_out_of_order_is_a_protocol_error(session, packets, reason):
    with pytest.raises(ProtocolError) as refused:
        await feed(session, *packets)
    assert str(refused.value) == reason


async def test_in_order_every_step_is_taken_and_quit_ends_the_session(session):
    # An ABORT ends the message and QUIT_NC the connection: each may start again.
    await feed(session, OPTNEG, CONNECT, packet(b"M", strings("<a@b>")), packet(b"A"),
               packet(b"M", strings("<a@b>")), packet(b"R", strings("<c@d>")), packet(b"L", strings("X", " y")),
               packet(b"N"), packet(b"A"), packet(b"K"), CONNECT, packet(b"H", strings("client.test")))
    assert session.negotiated and session.connected and session.message is None and not session.finished
    await feed(session, packet(b"K"))  # QUIT_NC forgets the connection's HELO
    assert not session.connected and session.helo == "" and session.connect_address is None
    await feed(session, packet(b"Q"))
    assert session.finished
