"""RCPT-time tagging: when the envelope sender names the source and the link
exists, the recipient is relayed tagged at RCPT and the upstream sees no replay."""

from __future__ import annotations

from tests.support.smtp import send
from tests.frontends.smtp.test_relay import code, dot_stuff, send_data, session
from tests.test_mission import STEP1, mission, mission_config  # noqa: F401 - fixtures

RCPTS = ["client@supplier.example", "pl-payroll@corp.example"]
SENDER = "uk-payroll+101203-T@corp.example"


async def send_tagged(mission):
    return await send("127.0.0.1", mission.port, mail_from=SENDER, rcpt_tos=RCPTS, data=STEP1)


async def tagged_transaction(mission, rcpts=RCPTS):
    """A session with MAIL from the tagged sender and every RCPT accepted."""
    wire = await session(mission.port)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    for rcpt in rcpts:
        assert code(await wire.cmd(f"RCPT TO:<{rcpt}>")) == 250
    return wire


async def data_after_upstream_data(mission, wire) -> None:
    """DATA, then the message only once the upstream has had its DATA: accepted."""
    assert code(await wire.cmd("DATA")) == 354
    await mission.sink.wait_for(lambda: "DATA" in mission.sink.commands, what="DATA before the message")
    await wire.send(dot_stuff(STEP1) + b".\r\n")
    assert code(await wire.reply()) == 250


async def test_a_known_link_is_tagged_at_rcpt_and_needs_no_replay(mission):  # noqa: F811
    new = await mission.step1()
    assert mission.sink.commands.count("RSET") >= 1  # the first message created the link: replayed
    mission.sink.commands.clear()
    result = await send_tagged(mission)
    assert result.data[0] == 250
    assert mission.sink.messages[-1].rcpt_tos == ["client@supplier.example", f"pl-payroll+{new}@corp.example"]
    assert "RSET" not in mission.sink.commands
    rcpts = [c for c in mission.sink.commands if c.upper().startswith("RCPT")]
    assert rcpts[1].startswith(f"RCPT TO:<pl-payroll+{new}@corp.example>")


async def test_a_tag_refused_at_rcpt_is_relayed_untagged_everywhere(mission):  # noqa: F811
    new = await mission.step1()
    mission.sink.refuse_plus = True
    result = await send_tagged(mission)
    assert result.rcpts["pl-payroll@corp.example"][0] == 250 and result.data[0] == 250
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", "pl-payroll@corp.example"]
    assert f"+{new}@".encode() not in msg.data  # untagged in Cc too: a reply-all must not bounce
    [refused] = [e for e in mission.log_lines() if e["event"] == "upstream.tag_refused"]
    tagged = f"pl-payroll+{new}@corp.example"
    assert (refused["recipient"], refused["tagged"], refused["reply"]) == (
        "pl-payroll@corp.example", tagged, f"550 5.1.1 <{tagged}>: Recipient address rejected: User unknown")


async def test_the_link_named_at_rcpt_is_the_one_relayed(mission):  # noqa: F811
    """Another node links the source to a newer activity of the same mailbox between this
    transaction's RCPT and its final dot: the message keeps the link its RCPT named upstream
    (no replay, To/Cc and envelope agree), and the next message takes the newer one."""
    first = await mission.step1()
    mission.sink.commands.clear()
    wire = await tagged_transaction(mission)
    store = mission.gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "777777-T", "pl-payroll@corp.example", None)
    assert await store.find_link("101203-T", "pl-payroll@corp.example") == "777777-T"
    assert code(await send_data(wire, STEP1)) == 250
    await wire.cmd("QUIT")
    message = mission.sink.messages[-1]
    assert message.rcpt_tos == ["client@supplier.example", f"pl-payroll+{first}@corp.example"]
    assert f"pl-payroll+{first}@corp.example".encode() in message.data
    assert "RSET" not in mission.sink.commands
    result = await send_tagged(mission)
    assert result.data[0] == 250
    assert mission.sink.messages[-1].rcpt_tos == ["client@supplier.example", "pl-payroll+777777-T@corp.example"]


async def test_a_source_with_very_many_links_is_still_tagged_at_rcpt(mission):  # noqa: F811
    """MAIL reads the sender's links in one go, up to a limit; past it, each RCPT asks the store."""
    first = await mission.step1()
    store = mission.gate.snapshot.links.store
    for n in range(120):
        assert await store.record_link("101203-T", "uk-payroll@corp.example", f"{n}-Z", None, None)
    assert await store.links_of("101203-T") is None
    mission.sink.commands.clear()
    result = await send_tagged(mission)
    assert result.data[0] == 250
    assert mission.sink.messages[-1].rcpt_tos == ["client@supplier.example", f"pl-payroll+{first}@corp.example"]
    assert "RSET" not in mission.sink.commands


# ---------------------------------------------------------------- DATA at the client's DATA
# When every recipient is relayed at RCPT as the end of DATA will have it, DATA goes
# upstream with the client's DATA, and the upstream's 354 comes while the message is sent.


async def test_data_goes_upstream_with_the_clients_when_every_recipient_is_settled(mission):  # noqa: F811
    first = await mission.step1()
    mission.sink.commands.clear()
    wire = await tagged_transaction(mission)
    await data_after_upstream_data(mission, wire)
    await wire.cmd("QUIT")
    assert mission.sink.messages[-1].rcpt_tos == ["client@supplier.example", f"pl-payroll+{first}@corp.example"]
    assert mission.sink.commands.count("DATA") == 1 and "RSET" not in mission.sink.commands


async def test_a_decision_that_differs_after_early_data_relays_on_a_new_connection(mission):  # noqa: F811
    """Two spellings of one mailbox are both tagged at RCPT, so DATA went early; the end of
    DATA merges them, which needs other recipients than the upstream has: the message goes
    once, on a new connection, and the first is closed without a dot."""
    first = await mission.step1()
    connections = mission.sink.connections
    wire = await tagged_transaction(mission, ["pl-payroll@corp.example", "PL-Payroll@corp.example"])
    await data_after_upstream_data(mission, wire)
    await wire.cmd("QUIT")
    assert mission.sink.messages[-1].rcpt_tos == [f"pl-payroll+{first}@corp.example"]
    assert mission.sink.connections == connections + 1
    await mission.sink.wait_for(lambda: mission.sink.closed_after_data == 1, what="the first connection closed")


async def test_an_upstream_refusing_early_data_gets_its_reply_to_the_clients_dot(mission):  # noqa: F811
    await mission.step1()
    mission.sink.data_command_reply = "554 5.5.1 No valid recipients"
    wire = await tagged_transaction(mission)
    reply = await send_data(wire, STEP1)
    assert reply.startswith("554 5.5.1"), reply
    mission.sink.data_command_reply = None
    # The upstream transaction was still open (DATA refused): RSET, and the next goes through.
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}>")) == 250
    assert code(await wire.cmd(f"RCPT TO:<{RCPTS[0]}>")) == 250
    assert code(await send_data(wire, STEP1)) == 250
    await wire.cmd("QUIT")
    assert "RSET" in mission.sink.commands and mission.sink.closed_after_data == 0


async def test_nothing_follows_an_early_data_that_is_given_up(mission):  # noqa: F811
    """Once the upstream took DATA, only the message or a closed connection ends its transaction:
    a new decision (two spellings merged) or a client gone mid-message closes the connection
    without writing RSET or QUIT, which the upstream would read as message content."""
    await mission.step1()
    wire = await tagged_transaction(mission, ["pl-payroll@corp.example", "PL-Payroll@corp.example"])
    await data_after_upstream_data(mission, wire)
    await wire.cmd("QUIT")
    await mission.sink.wait_for(lambda: mission.sink.closed_after_data == 1, what="the first connection closed")
    datas = mission.sink.commands.count("DATA")
    wire = await tagged_transaction(mission)
    assert code(await wire.cmd("DATA")) == 354
    await mission.sink.wait_for(lambda: mission.sink.commands.count("DATA") == datas + 1, what="the early DATA")
    await wire.send(b"Subject: cut short\r\n")
    await wire.close()
    await mission.sink.wait_for(lambda: mission.sink.closed_after_data == 2, what="the second connection closed")
    for written in mission.sink.abandoned_data:
        assert not any(line.upper().startswith((b"RSET", b"QUIT")) for line in written.split(b"\r\n")), written
