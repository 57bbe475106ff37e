"""RCPT-time tagging (DESIGN.md 2.3): when the envelope sender names the source and the link
exists, the recipient is relayed tagged at RCPT and the upstream sees no replay."""

from __future__ import annotations

from tests.support.smtp import send
from tests.test_relay import code, send_data, session
from tests.test_mission import STEP1, mission, mission_config  # noqa: F401 - fixtures

RCPTS = ["client@supplier.example", "pl-payroll@corp.example"]


async def test_a_known_link_is_tagged_at_rcpt_and_needs_no_replay(mission):  # noqa: F811
    new = await mission.step1()
    assert mission.sink.commands.count("RSET") >= 1  # the first message created the link: replayed
    mission.sink.commands.clear()
    result = await send("127.0.0.1", mission.port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=RCPTS, data=STEP1)
    assert result.data[0] == 250
    assert mission.sink.messages[-1].rcpt_tos == ["client@supplier.example", f"pl-payroll+{new}@corp.example"]
    assert "RSET" not in mission.sink.commands
    rcpts = [c for c in mission.sink.commands if c.upper().startswith("RCPT")]
    assert rcpts[1].startswith(f"RCPT TO:<pl-payroll+{new}@corp.example>")


async def test_a_tag_refused_at_rcpt_is_relayed_untagged_everywhere(mission):  # noqa: F811
    new = await mission.step1()
    mission.sink.refuse_plus = True
    result = await send("127.0.0.1", mission.port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=RCPTS, data=STEP1)
    assert result.rcpts["pl-payroll@corp.example"][0] == 250 and result.data[0] == 250
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", "pl-payroll@corp.example"]
    assert f"+{new}@".encode() not in msg.data  # untagged in Cc too: a reply-all must not bounce
    refused = [e for e in mission.log_lines() if e["event"] == "upstream.tag_refused"]
    assert refused[-1]["tagged"] == f"pl-payroll+{new}@corp.example"


async def test_the_link_named_at_rcpt_is_the_one_relayed(mission):  # noqa: F811
    """Another node links the source to a newer activity of the same mailbox between this
    transaction's RCPT and its final dot: the message keeps the link its RCPT named upstream
    (no replay, To/Cc and envelope agree), and the next message takes the newer one."""
    first = await mission.step1()
    mission.sink.commands.clear()
    wire = await session(mission.port)
    assert code(await wire.cmd("MAIL FROM:<uk-payroll+101203-T@corp.example>")) == 250
    for rcpt in RCPTS:
        assert code(await wire.cmd(f"RCPT TO:<{rcpt}>")) == 250
    store = mission.gate.snapshot.links.store
    assert await store.record_link("101203-T", "uk-payroll@corp.example", "777777-T", "pl-payroll@corp.example", None)
    assert await store.find_link("101203-T", "pl-payroll@corp.example") == "777777-T"
    assert code(await send_data(wire, STEP1)) == 250
    await wire.cmd("QUIT")
    message = mission.sink.messages[-1]
    assert message.rcpt_tos == ["client@supplier.example", f"pl-payroll+{first}@corp.example"]
    assert f"pl-payroll+{first}@corp.example".encode() in message.data
    assert "RSET" not in mission.sink.commands
    result = await send("127.0.0.1", mission.port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=RCPTS, data=STEP1)
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
    result = await send("127.0.0.1", mission.port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=RCPTS, data=STEP1)
    assert result.data[0] == 250
    assert mission.sink.messages[-1].rcpt_tos == ["client@supplier.example", f"pl-payroll+{first}@corp.example"]
    assert "RSET" not in mission.sink.commands
