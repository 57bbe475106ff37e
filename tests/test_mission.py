"""The mission end to end: cross-team linking on the wire (one test per step of the story).

Team A's mailbox is uk-payroll@corp.example, Team B's pl-payroll@corp.example;
hr@corp.example is internal but not a mailbox. Every test talks SMTP over
loopback to a real smtpgate, which relays to a sink the test controls and
keeps its links in a real SQLite store.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.support.smtp import send
from tests.support.wire import strip_trace

ROOT = Path(__file__).resolve().parent.parent

MISSION_CONFIG = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: {upstream}
  timeout: 10
internal_domains: [corp.example, bücher.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
  - address: pl-payroll@corp.example
    team: Team B (Poland)
  - address: de-payroll@corp.example
    team: Team C (Germany)
  - address: fr-payroll@corp.example
    team: Team D (France)
    new_links: never
  - address: info@bücher.example
    team: Team E (Books)
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
  timeout: {store_timeout}
"""

NEW = re.compile(r"pl-payroll\+(\d+-T)@corp\.example")


@pytest.fixture
def mission_config(tmp_path):
    def build(upstream: str, store_timeout: float = 10):
        return load_config(write_config(tmp_path, MISSION_CONFIG.format(upstream=upstream,
                                                                       store_timeout=store_timeout)))
    return build


@pytest.fixture
async def mission(sink, mission_config, start_gate, log_lines):
    gate, port = await start_gate(mission_config(f"smtp://127.0.0.1:{sink.port}"))
    return Mission(gate, port, sink, log_lines)


class Mission:
    def __init__(self, gate, port, sink, log_lines):
        self.gate, self.port, self.sink, self.log_lines = gate, port, sink, log_lines

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
        result = await send("127.0.0.1", self.port, mail_from=mail_from, rcpt_tos=rcpts, data=data)
        assert all(code == 250 for code, _ in result.rcpts.values()), result.rcpts
        assert result.data is not None
        # The 250 does not wait for the message record: other processes (`links show`) read
        # the store, so let it be committed first.
        await self.gate.store.records.settled()
        return result.data

    def relayed_events(self) -> list[dict]:
        return [e for e in self.log_lines() if e["event"] == "message.relayed"]

    def links_show(self, reference: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "smtpgate", "links", "show", reference, "--json",
                              "-c", str(self.gate.config.path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    async def step1(self) -> str:
        """Team A writes from 101203-T to a client, copying Team B and HR; returns Team B's new reference."""
        code, _ = await self.send("uk-payroll+101203-T@corp.example",
                                  ["client@supplier.example", "pl-payroll@corp.example", "hr@corp.example"],
                                  STEP1)
        assert code == 250
        rcpts = self.sink.messages[-1].rcpt_tos
        found = [NEW.fullmatch(r) for r in rcpts]
        [new] = [m.group(1) for m in found if m]
        return new


STEP1 = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: Client Ltd <client@supplier.example>\r\n"
    b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>,\r\n"
    b"  hr@corp.example (Human Resources)\r\n"
    b"Subject: Invoice 4411\r\n"
    b"Message-ID: <step1.101203@corp.example>\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    b"X-Mailer: Enate\r\n"
    b"\r\n"
    b"Dear client,\r\nplease find the invoice.\r\n"
)


def body_of(data: bytes) -> bytes:
    """The message as relayed, without the Received (and Message-ID) fields smtpgate prepends."""
    return strip_trace(data)[1]


async def test_step1_new_link_created_and_tagged(mission):
    new = await mission.step1()
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", f"pl-payroll+{new}@corp.example", "hr@corp.example"]
    assert msg.mail_from == "uk-payroll+101203-T@corp.example"
    expected = STEP1.replace(b"<pl-payroll@corp.example>", f"<pl-payroll+{new}@corp.example>".encode())
    assert body_of(msg.data) == expected
    # The link, from both sides, as an operator sees it.
    a = mission.links_show("101203-T")
    assert a["mailbox"] == "uk-payroll@corp.example" and a["team"] == "Team A (UK)"
    assert [(link["reference"], link["mailbox"], link["team"]) for link in a["links"]] == [
        (new, "pl-payroll@corp.example", "Team B (Poland)")]
    assert a["messages"][0]["message_id"] == "<step1.101203@corp.example>"
    assert f"pl-payroll+{new}@corp.example" in a["messages"][0]["recipients"]
    b = mission.links_show(new)
    assert b["mailbox"] == "pl-payroll@corp.example"
    assert [link["reference"] for link in b["links"]] == ["101203-T"]
    [event] = mission.relayed_events()
    assert event["source_reference"] == "101203-T"
    assert event["links_created"] == [new] and event["links_reused"] == []
    assert {"original": "pl-payroll@corp.example", "relayed": f"pl-payroll+{new}@corp.example"} in event["recipients"]
    assert any(e["event"] == "link.created" for e in mission.log_lines())


async def test_step2_existing_link_reused(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: follow-up\r\n\r\nsecond\r\n")
    assert (await mission.send("uk-payroll+101203-T@corp.example", ["pl-payroll@corp.example"], data))[0] == 250
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == [f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b"To: pl-payroll@", f"To: pl-payroll+{new}@".encode())
    event = mission.relayed_events()[-1]
    assert event["links_created"] == [] and event["links_reused"] == [new]
    assert len(mission.links_show("101203-T")["links"]) == 1


async def test_step3_outlook_subject_reference(mission):
    new = await mission.step1()
    data = (b"From: Jane Doe <jane@corp.example>\r\nTo: client@supplier.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nSubject: RE: Invoice 4411 [101203-T]\r\n\r\nfrom outlook\r\n")
    await mission.send("jane@corp.example", ["client@supplier.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", f"pl-payroll+{new}@corp.example"]
    assert msg.mail_from == "jane@corp.example"
    assert body_of(msg.data) == data.replace(b"Cc: pl-payroll@", f"Cc: pl-payroll+{new}@".encode())
    event = mission.relayed_events()[-1]
    assert event["source_reference"] == "101203-T" and event["links_reused"] == [new]


async def test_step4_external_reply_tagged_from_thread(mission):
    new = await mission.step1()
    data = (b"From: Client Ltd <client@supplier.example>\r\nTo: uk-payroll@corp.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nSubject: Re: Invoice 4411\r\n"
            b"In-Reply-To: <step1.101203@corp.example>\r\n"
            b"References: <step1.101203@corp.example>\r\n\r\nthanks\r\n")
    await mission.send("client@supplier.example", ["uk-payroll@corp.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example"]
    expected = data.replace(b"To: uk-payroll@", b"To: uk-payroll+101203-T@").replace(
        b"Cc: pl-payroll@", f"Cc: pl-payroll+{new}@".encode())
    assert body_of(msg.data) == expected
    event = mission.relayed_events()[-1]
    assert event["source_reference"] == "101203-T" and event["links_created"] == []


async def test_step5_explicit_tag_kept_and_linked(mission):
    await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
            b"Subject: case\r\n\r\nexplicit\r\n")
    await mission.send("uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["pl-payroll+5512-C@corp.example"]
    assert body_of(msg.data) == data
    linked = {link["reference"] for link in mission.links_show("101203-T")["links"]}
    assert "5512-C" in linked
    assert [link["reference"] for link in mission.links_show("5512-C")["links"]] == ["101203-T"]


async def test_step6_automatic_message_creates_no_link(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: de-payroll@corp.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nAuto-Submitted: auto-replied\r\nSubject: out of office\r\n\r\nauto\r\n")
    await mission.send("uk-payroll+101203-T@corp.example", ["de-payroll@corp.example", "pl-payroll@corp.example"],
                       data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["de-payroll@corp.example", f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b"Cc: pl-payroll@", f"Cc: pl-payroll+{new}@".encode())
    assert {link["mailbox"] for link in mission.links_show("101203-T")["links"]} == {"pl-payroll@corp.example"}


async def test_step7_new_links_never(mission):
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: fr-payroll@corp.example\r\n"
            b"Subject: no links for France\r\n\r\nbody\r\n")
    await mission.send("uk-payroll+101203-T@corp.example", ["fr-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["fr-payroll@corp.example"]
    assert body_of(msg.data) == data


async def test_step8_no_source_relayed_byte_for_byte(mission):
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example, client@supplier.example\r\n"
            b"Subject: no reference here\r\nMessage-ID: <plain@corp.example>\r\n\r\nplain\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example", "client@supplier.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["pl-payroll@corp.example", "client@supplier.example"]
    assert msg.data.startswith(b"Received: ")
    assert body_of(msg.data) == data
    assert msg.data.count(b"Received:") == 1


async def test_step9_bcc_mailbox_tagged_in_envelope_only(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\n"
            b"Subject: bcc to team B\r\n\r\nbcc\r\n")
    await mission.send("uk-payroll+101203-T@corp.example", ["client@supplier.example", "pl-payroll@corp.example"],
                       data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data


async def test_step10_case_and_idna_forms_recognised(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: PL-Payroll@CORP.Example\r\n"
            b"Cc: info@xn--bcher-kva.example\r\nSubject: forms\r\n\r\nforms\r\n")
    await mission.send("UK-PAYROLL+101203-T@Corp.Example",
                       ["PL-Payroll@CORP.Example", "info@xn--bcher-kva.example"], data)
    msg = mission.sink.messages[-1]
    tagged = [r for r in msg.rcpt_tos]
    assert tagged[0].lower() == f"pl-payroll+{new}@corp.example".lower()
    m = re.fullmatch(r"info\+(\d+-T)@xn--bcher-kva\.example", tagged[1])
    assert m, tagged
    info_ref = m.group(1)
    assert info_ref != new
    show = mission.links_show("101203-T")
    assert {link["mailbox"] for link in show["links"]} == {"pl-payroll@corp.example", "info@xn--bcher-kva.example"}
    head = body_of(msg.data).split(b"\r\n\r\n")[0]
    assert f"+{new}@".encode() in head.split(b"To: ")[1].split(b"\r\n")[0]
    assert f"info+{info_ref}@".encode() in head


async def test_step11_store_unavailable_then_retry(sink, mission_config, start_gate, log_lines, tmp_path):
    gate, port = await start_gate(mission_config(f"smtp://127.0.0.1:{sink.port}", store_timeout=1))
    mission = Mission(gate, port, sink, log_lines)
    first = await mission.step1()
    data = (b"From: uk-payroll+77-C@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: another case\r\nMessage-ID: <retry@corp.example>\r\n\r\nretry me\r\n")
    await gate.store.records.settled()  # step 1's record, which its 250 did not wait for
    # Another writer holds the store's write lock: smtpgate cannot create the link.
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        result = await send("127.0.0.1", port, mail_from="uk-payroll+77-C@corp.example",
                            rcpt_tos=["pl-payroll@corp.example"], data=data)
    finally:
        blocker.rollback()
        blocker.close()
    assert result.data is not None and result.data[0] == 451 and result.data[1].startswith("4.3.0")
    assert len(sink.messages) == 1 and len(sink.received) == 1  # only step 1; no final dot for this one
    rejected = [e for e in log_lines() if e["event"] == "message.rejected"]
    assert rejected and rejected[-1]["code"] == 451 and "store" in rejected[-1]["reason"]
    # The client retries with the store back: it goes through with the next reference.
    code, _ = await mission.send("uk-payroll+77-C@corp.example", ["pl-payroll@corp.example"], data)
    assert code == 250
    [tagged] = sink.messages[-1].rcpt_tos
    expected = f"{int(first.split('-')[0]) + 1}-T"
    assert tagged == f"pl-payroll+{expected}@corp.example"
    # A second retry of the same message reuses that link.
    await mission.send("uk-payroll+77-C@corp.example", ["pl-payroll@corp.example"], data)
    assert sink.messages[-1].rcpt_tos == [tagged]


async def test_upstream_refusing_tags_gets_untagged_delivery(mission):
    mission.sink.refuse_plus = True
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: no plus addressing upstream\r\n\r\nbody\r\n")
    code, _ = await mission.send("uk-payroll+101203-T@corp.example", ["pl-payroll@corp.example"], data)
    assert code == 250
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["pl-payroll@corp.example"]
    # The header shows what was relayed, so a reply-all does not bounce on the refused tag.
    assert body_of(msg.data) == data
    assert any(e["event"] == "upstream.tag_refused" for e in mission.log_lines())
    event = mission.relayed_events()[-1]
    assert event["recipients"] == [{"original": "pl-payroll@corp.example", "relayed": "pl-payroll@corp.example"}]
    assert event["upstream"] == mission.gate.config.upstream.url
    # Delivered untagged: the link was made (committed before the dot), but no recipient carries it.
    assert len(event["links_created"]) == 1
    # The next message finds that link and is refused its tag again: it claims no reuse.
    code, _ = await mission.send("uk-payroll+101203-T@corp.example", ["pl-payroll@corp.example"], data)
    assert code == 250
    event = mission.relayed_events()[-1]
    assert mission.sink.messages[-1].rcpt_tos == ["pl-payroll@corp.example"]
    assert (event["links_created"], event["links_reused"]) == ([], [])


async def test_replay_refused_temporarily_gives_451_and_no_dot(mission):
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: replay\r\n\r\nbody\r\n")
    # The reference a fresh store allocates for Team B, from the allocator's configuration.
    config = mission.gate.config
    [team_b] = [m for m in config.mailboxes if m.address == "pl-payroll@corp.example"]
    tagged = f"pl-payroll+{team_b.new_reference.format(n=config.allocator.first_number)}@corp.example"
    # The untagged RCPT is accepted, the tagged one on replay deferred.
    mission.sink.rcpt_replies[tagged] = "451 4.3.0 try later"
    result = await send("127.0.0.1", mission.port, mail_from="uk-payroll+101203-T@corp.example",
                        rcpt_tos=["pl-payroll@corp.example"], data=data)
    assert result.rcpts["pl-payroll@corp.example"][0] == 250
    assert result.data is not None and result.data[0] == 451 and result.data[1].startswith("4.3.0")
    assert any(c.startswith(f"RCPT TO:<{tagged}>") for c in mission.sink.commands), mission.sink.commands
    assert mission.sink.received == []


@pytest.mark.postfix
async def test_reply_all_lands_in_both_activities_through_postfix(tmp_path, mission_config,
                                                                  start_gate, log_lines):
    """Postfix with plus addressing as the upstream: step 1 lands tagged, and a reply-all written by
    the external party (straight to Postfix, not through smtpgate) reaches BOTH activities."""
    import asyncio

    from tests.support.postfix import PostfixInstance

    # External mail is discarded by this Postfix: the external party's copy is what pl-payroll got.
    postfix = PostfixInstance(tmp_path / "pf", main_cf={"default_transport": "discard:external mail in tests",
                                                         "relay_transport": "discard:external mail in tests"})
    await asyncio.to_thread(postfix.start)
    try:
        gate, port = await start_gate(mission_config(f"smtp://127.0.0.1:{postfix.port}"))
        result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                            rcpt_tos=["client@supplier.example", "pl-payroll@corp.example", "hr@corp.example"],
                            data=STEP1.replace(b"hr@corp.example (Human Resources)", b"client2@supplier.example"))
        # hr@corp.example has no mailbox on this Postfix: refused there, and so for the client.
        assert result.rcpts["hr@corp.example"][0] == 550
        assert result.data is not None and result.data[0] == 250
        [landed] = await postfix.wait_for_delivery_async("pl-payroll", count=1)
        m = re.search(rb"X-Original-To: pl-payroll\+(\d+-T)@corp\.example", landed)
        assert m, landed[:400]
        new = m.group(1).decode()
        assert f"Delivered-To: pl-payroll+{new}@corp.example".encode() in landed
        assert f"Cc: \"Payroll, Poland\" <pl-payroll+{new}@corp.example>".encode() in landed

        # The external party hits reply-all on what it received: From and Cc as relayed.
        reply = (b"From: Client Ltd <client@supplier.example>\r\n"
                 b"To: Team A <uk-payroll+101203-T@corp.example>\r\n"
                 b"Cc: \"Payroll, Poland\" <pl-payroll+" + new.encode() + b"@corp.example>\r\n"
                 b"Subject: Re: Invoice 4411\r\nIn-Reply-To: <step1.101203@corp.example>\r\n\r\nthanks\r\n")
        direct = await send("127.0.0.1", postfix.port, mail_from="client@supplier.example",
                            rcpt_tos=["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example"],
                            data=reply)
        assert direct.data is not None and direct.data[0] == 250
        [in_a] = await postfix.wait_for_delivery_async("uk-payroll", count=1)
        assert b"X-Original-To: uk-payroll+101203-T@corp.example" in in_a
        both_b = await postfix.wait_for_delivery_async("pl-payroll", count=2)
        [reply_b] = [m for m in both_b if b"thanks" in m]
        assert f"X-Original-To: pl-payroll+{new}@corp.example".encode() in reply_b
        assert b"thanks" in in_a
    finally:
        await asyncio.to_thread(postfix.stop)
