"""direction: inbound — the tags a reply dropped are put back, in the envelope only, from
the thread smtpgate relayed; nothing is linked; nothing is relayed out."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.smtp import send
from tests.support.wire import strip_trace
from tests.test_mission import MISSION_CONFIG, STEP1

FIRST = 900000
NEW = f"{FIRST}-T"


def config_text(upstream: str, unknown_tags: str) -> str:
    return MISSION_CONFIG.replace(
        "    relay_networks: [127.0.0.1/32]\n",
        "    relay_networks: [127.0.0.1/32]\n"
        "  - name: inbound\n    address: 127.0.0.1:0\n    direction: inbound\n", 1,
    ).format(upstream=upstream, store_timeout=10) + (
        f"allocator:\n  first_number: {FIRST}\ninbound:\n  unknown_tags: {unknown_tags}\n")


@pytest.fixture
async def gate(sink, tmp_path, start_gate, log_lines):
    config = load_config(write_config(tmp_path, config_text(f"smtp://127.0.0.1:{sink.port}", "pass")))
    gate, _ = await start_gate(config)
    outbound, inbound = (port for _, port in gate.bound)
    # The mission's first message goes out through the outbound listener and makes the link.
    result = await send("127.0.0.1", outbound, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"], data=STEP1)
    assert result.data[0] == 250
    assert f"pl-payroll+{NEW}@corp.example" in sink.messages[-1].rcpt_tos
    return gate, outbound, inbound


def counts(tmp_path, *tables: str) -> tuple[int, ...]:
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in tables or ("activities", "links"))


REPLY = (b"From: Client <client@supplier.example>\r\nTo: uk-payroll@corp.example\r\n"
         b"Cc: pl-payroll@corp.example\r\nSubject: RE: Invoice 4411\r\n"
         b"In-Reply-To: <step1.101203@corp.example>\r\n\r\nThanks!\r\n")
BOTH = ["uk-payroll@corp.example", "pl-payroll@corp.example"]


async def deliver(port, rcpts, data, mail_from="client@supplier.example"):
    return await send("127.0.0.1", port, mail_from=mail_from, rcpt_tos=rcpts, data=data)


async def test_a_reply_all_without_tags_gets_both_activities_back(gate, sink, log_lines, tmp_path):
    _, _, inbound = gate
    before = counts(tmp_path)
    result = await deliver(inbound, BOTH, REPLY)
    assert result.data[0] == 250
    msg = sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{NEW}@corp.example"]
    assert strip_trace(msg.data)[1] == REPLY  # the headers the external party wrote stay as they are
    [event] = [e for e in log_lines() if e["event"] == "message.retagged"]
    assert [(r["original"], r["relayed"], r["thread_message_id"]) for r in event["recipients"]] == [
        ("uk-payroll@corp.example", "uk-payroll+101203-T@corp.example", "<step1.101203@corp.example>"),
        ("pl-payroll@corp.example", f"pl-payroll+{NEW}@corp.example", "<step1.101203@corp.example>"),
    ]
    assert counts(tmp_path) == before  # inbound mail creates no link and no activity


async def test_references_naming_only_an_older_message_is_enough(gate, sink):
    _, _, inbound = gate
    older = REPLY.replace(b"In-Reply-To: <step1.101203@corp.example>\r\n",
                          b"References: <step1.101203@corp.example> <unknown.9@supplier.example>\r\n")
    await deliver(inbound, BOTH, older)
    assert sink.messages[-1].rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{NEW}@corp.example"]


async def test_an_unknown_thread_passes_untouched(gate, sink, log_lines):
    _, _, inbound = gate
    stranger = REPLY.replace(b"<step1.101203@corp.example>", b"<never.seen@supplier.example>")
    await deliver(inbound, BOTH, stranger)
    msg = sink.messages[-1]
    assert msg.rcpt_tos == BOTH and strip_trace(msg.data)[1] == stranger
    assert not [e for e in log_lines() if e["event"] == "message.retagged"]


async def test_a_foreign_domain_is_refused_and_nothing_relayed(gate, sink):
    _, _, inbound = gate
    relayed = len(sink.messages)
    result = await deliver(inbound, ["someone@elsewhere.example"], REPLY)
    assert result.rcpts["someone@elsewhere.example"][0] == 554
    assert result.data is None or result.data[0] != 250
    assert len(sink.messages) == relayed
    assert not any(c.upper().startswith("RCPT TO:<SOMEONE@") for c in sink.commands)


async def test_mail_from_a_mailbox_is_relayed_untouched(gate, sink):
    _, _, inbound = gate
    await deliver(inbound, ["pl-payroll@corp.example"], REPLY, mail_from="uk-payroll@corp.example")
    assert sink.messages[-1].rcpt_tos == ["pl-payroll@corp.example"]


@pytest.mark.parametrize("policy", ["pass", "strip"])
async def test_a_guessed_tag_is_kept_or_stripped(gate, sink, log_lines, tmp_path, policy):
    g, _, inbound = gate
    g.reload(load_config(write_config(tmp_path, config_text(f"smtp://127.0.0.1:{sink.port}", policy))))
    guess = REPLY.replace(b"In-Reply-To: <step1.101203@corp.example>\r\n", b"")
    known = f"pl-payroll+{NEW}@corp.example"
    await deliver(inbound, ["pl-payroll+424242-T@corp.example", known], guess)
    relayed = sink.messages[-1].rcpt_tos
    assert relayed == (["pl-payroll+424242-T@corp.example", known] if policy == "pass"
                       else ["pl-payroll@corp.example", known])
    [event] = [e for e in log_lines() if e["event"] == "inbound.unknown_tag"]
    assert (event["recipient"], event["tag"], event["action"]) == ("pl-payroll+424242-T@corp.example",
                                                                   "424242-T", policy)


SECOND = (b"From: uk-payroll+5512-C@corp.example\r\nTo: client@supplier.example\r\n"
          b"Cc: pl-payroll@corp.example\r\nSubject: Invoice 4411, the other case\r\n"
          b"Message-ID: <second.5512@corp.example>\r\n\r\nSecond case.\r\n")


async def test_the_newest_message_of_a_thread_wins(gate, sink, log_lines):
    _, outbound, inbound = gate
    result = await send("127.0.0.1", outbound, mail_from="uk-payroll+5512-C@corp.example",
                        rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"], data=SECOND)
    assert result.data[0] == 250
    other = f"{FIRST + 1}-T"  # the second source activity's own link to Team B
    assert f"pl-payroll+{other}@corp.example" in sink.messages[-1].rcpt_tos
    # References lists the thread oldest first: the last one named is the newest.
    reply = REPLY.replace(b"In-Reply-To: <step1.101203@corp.example>\r\n",
                          b"References: <step1.101203@corp.example> <second.5512@corp.example>\r\n")
    assert (await deliver(inbound, BOTH, reply)).data[0] == 250
    assert sink.messages[-1].rcpt_tos == ["uk-payroll+5512-C@corp.example", f"pl-payroll+{other}@corp.example"]
    # In-Reply-To names the message replied to: it wins over anything References lists.
    reply = REPLY.replace(b"In-Reply-To: <step1.101203@corp.example>\r\n",
                          b"In-Reply-To: <step1.101203@corp.example>\r\n"
                          b"References: <step1.101203@corp.example> <second.5512@corp.example>\r\n")
    assert (await deliver(inbound, BOTH, reply)).data[0] == 250
    assert sink.messages[-1].rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{NEW}@corp.example"]
    retagged = [e for e in log_lines() if e["event"] == "message.retagged"]
    assert [r["thread_message_id"] for r in retagged[0]["recipients"]] == ["<second.5512@corp.example>"] * 2


async def test_a_store_failure_inbound_is_a_temporary_failure_not_an_untagged_relay(gate, sink, log_lines,
                                                                                  tmp_path):
    _, _, inbound = gate
    relayed = len(sink.messages)
    async with asyncio.timeout(10):  # step 1's record committed first: only the read fails
        while counts(tmp_path, "messages") == (0,):
            await asyncio.sleep(0.01)
    with sqlite3.connect(tmp_path / "smtpgate.db") as conn:
        conn.execute("ALTER TABLE messages RENAME TO messages_away")  # the thread records cannot be read
    result = await deliver(inbound, BOTH, REPLY)
    assert result.data[0] == 451
    assert len(sink.messages) == relayed
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert rejected[-1]["code"] == 451 and "store" in rejected[-1]["reason"]
