"""The replay after DATA went upstream early (smtpgate/frontends/smtp/relay.py, _new_upstream): the
new connection that must carry the envelope, and what the client hears when there is none."""

from __future__ import annotations

from tests.support.wire import code
from tests.frontends.smtp.test_early_tag import SENDER, tagged_transaction
from tests.frontends.smtp.test_relay import dot_stuff, send_data
from tests.test_mission import STEP1, mission, mission_config  # noqa: F401 - fixtures

TWO_SPELLINGS = ["pl-payroll@corp.example", "PL-Payroll@corp.example"]


def events(mission, name: str) -> list[dict]:
    return [e for e in mission.log_lines() if e["event"] == name]


async def early_data_then_dot(mission, wire) -> str:
    """DATA (it goes upstream at once: every recipient was tagged at RCPT), then the message."""
    assert code(await wire.cmd("DATA")) == 354
    await mission.sink.wait_for(lambda: "DATA" in mission.sink.commands, what="DATA before the message")
    await wire.send(dot_stuff(STEP1) + b".\r\n")
    return await wire.reply()


async def test_no_new_connection_for_the_replay_is_the_clients_refusal_with_its_reason(mission):  # noqa: F811
    await mission.step1()
    wire = await tagged_transaction(mission, TWO_SPELLINGS)
    mission.sink.greeting = "554 5.3.2 No more connections"  # the replay's new connection is refused
    reply = await early_data_then_dot(mission, wire)
    assert reply.startswith("451 4.4.1")
    [error] = [e for e in events(mission, "upstream.error") if e["stage"] == "connect"]
    assert "5.3.2 No more connections" in error["reason"]
    [rejected] = events(mission, "message.rejected")
    assert (rejected["code"], rejected["stage"], rejected["reason"]) == (451, "data", error["reason"])
    assert len(mission.sink.messages) == 1  # step1's only
    await wire.cmd("QUIT")


async def test_a_new_connection_without_smtputf8_refuses_a_non_ascii_recipient_of_the_replay(mission):  # noqa: F811
    await mission.step1()
    wire = await mission_session_with_smtputf8(mission, TWO_SPELLINGS + ["jörg@supplier.example"])
    mission.sink.smtputf8 = False  # the next connection's EHLO lacks it (another MX host, say)
    reply = await early_data_then_dot(mission, wire)
    assert reply.startswith("451 4.3.0")
    [rejected] = events(mission, "message.rejected")
    assert rejected["reason"] == "replay: the new upstream connection lacks SMTPUTF8"
    assert len(mission.sink.messages) == 1
    await wire.cmd("QUIT")


async def mission_session_with_smtputf8(mission, rcpts):
    from tests.frontends.smtp.test_relay import session

    wire = await session(mission.port)
    assert code(await wire.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8")) == 250
    for rcpt in rcpts:
        assert code(await wire.cmd(f"RCPT TO:<{rcpt}>")) == 250
    return wire


async def test_a_tag_refused_at_rcpt_is_not_tried_again_at_the_end_of_data(mission):  # noqa: F811
    """The upstream refused the tagged form at RCPT and took the address as given: the end
    of DATA relays that recipient as it stands, no replay asks for the tag a second time."""
    new = await mission.step1()
    mission.sink.refuse_plus = True
    mission.sink.commands.clear()
    wire = await tagged_transaction(mission, ["client@supplier.example", "pl-payroll@corp.example"])
    assert code(await early_data_then_dot(mission, wire)) == 250
    assert "RSET" not in mission.sink.commands
    tagged = [c for c in mission.sink.commands if c.startswith(f"RCPT TO:<pl-payroll+{new}@")]
    assert len(tagged) == 1
    [refused] = events(mission, "upstream.tag_refused")
    assert refused["tagged"] == f"pl-payroll+{new}@corp.example"
    await wire.cmd("QUIT")



async def test_a_tag_refused_at_the_end_of_data_replay_is_relayed_untagged(mission):  # noqa: F811
    """The link is made at the end of DATA (none at RCPT): the replay asks for the tagged form,
    the upstream refuses it, and the recipient goes as the client gave it, on the same replay."""
    mission.sink.refuse_plus = True
    wire = await tagged_transaction(mission, ["client@supplier.example", "pl-payroll@corp.example"])
    assert code(await send_data(wire, STEP1)) == 250
    [created] = events(mission, "link.created")
    tagged = f"pl-payroll+{created['reference']}@corp.example"
    [refused] = events(mission, "upstream.tag_refused")
    assert (refused["recipient"], refused["tagged"], refused["reply"]) == (
        "pl-payroll@corp.example", tagged, f"550 5.1.1 <{tagged}>: Recipient address rejected: User unknown")
    [message] = mission.sink.messages
    assert message.rcpt_tos == ["client@supplier.example", "pl-payroll@corp.example"]
    assert tagged.encode() not in message.data
    replayed = [c.split(" ")[1] for c in mission.sink.commands[mission.sink.commands.index("RSET"):]
                if c.startswith("RCPT")]
    assert replayed == ["TO:<client@supplier.example>", f"TO:<{tagged}>", "TO:<pl-payroll@corp.example>"]
    await wire.cmd("QUIT")
