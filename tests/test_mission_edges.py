"""Linking edge cases on the wire, beyond the story of tests/test_mission.py.

Every test talks SMTP over loopback to a real smtpgate relaying to a sink,
with its links in a real SQLite store: where the source activity is found,
which mailbox is the source's own, thread look-ups, encoded subjects,
custom reference patterns, over-long tags, duplicates and header shapes.
"""

from __future__ import annotations

import re

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.test_mission import MISSION_CONFIG, STEP1, Mission, body_of, mission, mission_config  # noqa: F401

LONG = "a" * 58  # a mailbox local part that cannot take a "+" and an 8-character tag (64 octets)

EDGE_CONFIG = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: {upstream}
  timeout: 10
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
  - address: uk-pensions@corp.example
    team: Team A (UK)
  - address: pl-payroll@corp.example
    team: Team B (Poland)
  - address: {long}@corp.example
    team: Team L (Long)
references:
  pattern: "T-[0-9]+|[0-9]{{1,12}}-[TCA]"
  headers: [X-Enate-Reference, X-Case]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""


@pytest.fixture
async def edge(sink, tmp_path, start_gate, log_lines):
    text = EDGE_CONFIG.format(upstream=f"smtp://127.0.0.1:{sink.port}", long=LONG)
    gate, port = await start_gate(load_config(write_config(tmp_path, text)))
    return Mission(gate, port, sink, log_lines)


def tagged_as(rcpts: list[str], base: str) -> str:
    """The reference ``base`` was tagged with among the relayed recipients."""
    [ref] = [m.group(1) for r in rcpts if (m := re.fullmatch(rf"{re.escape(base)}\+(.+)@corp\.example", r))]
    return ref


# ---------------------------------------------------------------- source detection

async def test_source_from_configured_header(mission):
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"X-Enate-Reference: 101203-T\r\nSubject: no reference here\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    assert body_of(msg.data) == data.replace(b"To: pl-payroll@", f"To: pl-payroll+{new}@".encode())
    event = mission.relayed_events()[-1]
    assert event["source_reference"] == "101203-T" and event["source_found_in"] == "header"
    assert [link["reference"] for link in mission.links_show(new)["links"]] == ["101203-T"]


async def test_source_from_from_tag_when_envelope_sender_is_noreply(mission):
    data = (b"From: Payroll UK <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nReply-To: uk-payroll@corp.example\r\n"
            b"Subject: Invoice\r\n\r\nbody\r\n")
    await mission.send("noreply@corp.example", ["client@supplier.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    assert msg.mail_from == "noreply@corp.example"
    expected = data.replace(b"Cc: pl-payroll@", f"Cc: pl-payroll+{new}@".encode()).replace(
        b"Reply-To: uk-payroll@", b"Reply-To: uk-payroll+101203-T@")
    assert body_of(msg.data) == expected
    event = mission.relayed_events()[-1]
    assert event["source_reference"] == "101203-T" and event["source_found_in"] == "from"
    assert mission.links_show("101203-T")["mailbox"] == "uk-payroll@corp.example"


async def test_precedence_envelope_tag_over_from_header_and_subject(mission):
    data = (b"From: uk-payroll+222-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"X-Enate-Reference: 333-T\r\nSubject: [444-T]\r\n\r\nbody\r\n")
    await mission.send("uk-payroll+111-T@corp.example", ["pl-payroll@corp.example"], data)
    assert mission.relayed_events()[-1]["source_reference"] == "111-T"
    # Without the envelope tag: the From: tag.
    await mission.send("noreply@corp.example", ["pl-payroll@corp.example"], data)
    assert mission.relayed_events()[-1]["source_reference"] == "222-T"
    # Without any tag: the header before the subject.
    plain = data.replace(b"uk-payroll+222-T@", b"jane@")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], plain)
    assert mission.relayed_events()[-1]["source_reference"] == "333-T"
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], plain.replace(b"X-Enate-Reference: 333-T\r\n", b""))
    assert mission.relayed_events()[-1]["source_reference"] == "444-T"
    # A subject reference wins over the thread.
    await mission.step1()
    reply = (b"From: client@supplier.example\r\nTo: pl-payroll@corp.example\r\nSubject: Re: [555-T]\r\n"
             b"In-Reply-To: <step1.101203@corp.example>\r\n\r\nbody\r\n")
    await mission.send("client@supplier.example", ["pl-payroll@corp.example"], reply)
    assert mission.relayed_events()[-1]["source_reference"] == "555-T"
    assert mission.relayed_events()[-1]["source_found_in"] == "subject"


async def test_second_configured_header_and_custom_pattern(edge):
    data = (b"From: jane@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"X-Case: see T-1234\r\nSubject: hello\r\n\r\nbody\r\n")
    await edge.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    assert edge.relayed_events()[-1]["source_reference"] == "T-1234"
    assert edge.relayed_events()[-1]["source_found_in"] == "header"


async def test_custom_pattern_in_subject_and_tag(edge):
    data = (b"From: jane@corp.example\r\nTo: pl-payroll@corp.example\r\n"
            b"Cc: uk-payroll+t-77@corp.example\r\nSubject: RE: [T-4242] salary\r\n\r\nbody\r\n")
    await edge.send("jane@corp.example", ["pl-payroll@corp.example", "uk-payroll+t-77@corp.example"], data)
    msg = edge.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    assert "uk-payroll+t-77@corp.example" in msg.rcpt_tos
    event = edge.relayed_events()[-1]
    assert event["source_reference"] == "T-4242" and event["source_found_in"] == "subject"
    linked = {link["reference"] for link in edge.links_show("T-4242")["links"]}
    assert linked == {new, "T-77"}
    # The other form of the pattern, in a tagged From:.
    data2 = (b"From: uk-payroll+T-9@corp.example\r\nTo: pl-payroll@corp.example\r\nSubject: x\r\n\r\nb\r\n")
    await edge.send("noreply@corp.example", ["pl-payroll@corp.example"], data2)
    assert edge.relayed_events()[-1]["source_reference"] == "T-9"


async def test_rfc2047_encoded_subject_reference(mission):
    new = await mission.step1()
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: =?utf-8?q?Re=3A_R=C3=A9clamation_=5B101203-T=5D?=\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == [f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b"To: pl-payroll@", f"To: pl-payroll+{new}@".encode())
    # Base64, split over two encoded words and folded.
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: =?utf-8?b?UmU6IFvDqXTDqV0g?=\r\n =?utf-8?b?WzEwMTIwMy1UXQ==?=\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    assert mission.sink.messages[-1].rcpt_tos == [f"pl-payroll+{new}@corp.example"]


# ---------------------------------------------------------------- the source's own mailbox

async def test_outlook_user_ccs_source_mailbox_gets_source_tag(mission):
    new = await mission.step1()
    data = (b"From: Jane Doe <jane@corp.example>\r\nTo: client@supplier.example\r\n"
            b"Cc: uk-payroll@corp.example, pl-payroll@corp.example\r\n"
            b"Subject: RE: Invoice 4411 [101203-T]\r\n\r\nfrom outlook\r\n")
    await mission.send("jane@corp.example",
                       ["client@supplier.example", "uk-payroll@corp.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", "uk-payroll+101203-T@corp.example",
                            f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b"Cc: uk-payroll@corp.example, pl-payroll@",
                                             f"Cc: uk-payroll+101203-T@corp.example, pl-payroll+{new}@".encode())
    assert {link["mailbox"] for link in mission.links_show("101203-T")["links"]} == {"pl-payroll@corp.example"}


async def test_untagged_source_mailbox_in_from_and_reply_to_gets_tagged(mission):
    data = (b"From: Payroll UK <uk-payroll@corp.example>\r\nReply-To: uk-payroll@corp.example\r\n"
            b"To: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
            b"Subject: Your payslip [101203-T]\r\n\r\nbody\r\n")
    await mission.send("uk-payroll@corp.example", ["client@supplier.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    expected = data.replace(b"<uk-payroll@", b"<uk-payroll+101203-T@").replace(
        b"Reply-To: uk-payroll@", b"Reply-To: uk-payroll+101203-T@").replace(
        b"Cc: pl-payroll@", f"Cc: pl-payroll+{new}@".encode())
    assert body_of(msg.data) == expected
    assert msg.mail_from == "uk-payroll@corp.example"
    show = mission.links_show("101203-T")
    # An untagged From serves this message only; ownership is never guessed.
    assert show["mailbox"] is None
    assert [link["reference"] for link in show["links"]] == [new]


async def test_message_to_source_mailbox_only(mission):
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: uk-payroll@corp.example\r\n"
            b"Subject: note to self\r\n\r\nbody\r\n")
    await mission.send("uk-payroll+101203-T@corp.example", ["uk-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example"]
    assert body_of(msg.data) == data.replace(b"To: uk-payroll@", b"To: uk-payroll+101203-T@")
    event = mission.relayed_events()[-1]
    assert event["links_created"] == [] and event["links_reused"] == []
    assert mission.links_show("101203-T")["links"] == []


async def test_explicit_tag_equal_to_source_reference(mission):
    data = (b"From: uk-payroll+101203-T@corp.example\r\n"
            b"To: uk-payroll+101203-T@corp.example, pl-payroll+101203-T@corp.example\r\n"
            b"Subject: same\r\n\r\nbody\r\n")
    await mission.send("uk-payroll+101203-T@corp.example",
                       ["uk-payroll+101203-T@corp.example", "pl-payroll+101203-T@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", "pl-payroll+101203-T@corp.example"]
    assert body_of(msg.data) == data
    assert mission.links_show("101203-T")["links"] == []


# ---------------------------------------------------------------- threads

async def test_thread_found_through_references_when_in_reply_to_unknown(mission):
    new = await mission.step1()
    data = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\nCc: pl-payroll@corp.example\r\n"
            b"Subject: Re: Invoice 4411\r\nIn-Reply-To: <never-relayed@supplier.example>\r\n"
            b"References: <step1.101203@corp.example>\r\n <older@supplier.example>\r\n"
            b"\t<never-relayed@supplier.example>\r\n\r\nthanks\r\n")
    await mission.send("client@supplier.example", ["uk-payroll@corp.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example"]
    event = mission.relayed_events()[-1]
    assert event["source_reference"] == "101203-T" and event["source_found_in"] == "thread"


async def test_thread_reply_adding_third_mailbox_links_it_to_thread_source(mission):
    new = await mission.step1()
    data = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\n"
            b"Cc: pl-payroll@corp.example, de-payroll@corp.example\r\n"
            b"Subject: Re: Invoice 4411\r\nIn-Reply-To: <step1.101203@corp.example>\r\n\r\nthanks\r\n")
    await mission.send("client@supplier.example",
                       ["uk-payroll@corp.example", "pl-payroll@corp.example", "de-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    de = tagged_as(msg.rcpt_tos, "de-payroll")
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example",
                            f"de-payroll+{de}@corp.example"]
    assert de != new
    assert {(link["reference"], link["mailbox"]) for link in mission.links_show("101203-T")["links"]} == {
        (new, "pl-payroll@corp.example"), (de, "de-payroll@corp.example")}
    assert [link["reference"] for link in mission.links_show(de)["links"]] == ["101203-T"]
    event = mission.relayed_events()[-1]
    assert event["links_created"] == [de]
    # A reply to that reply finds the third mailbox in its mapping.
    reply = (b"From: client@supplier.example\r\nTo: de-payroll@corp.example\r\nSubject: Re: Re\r\n"
             b"In-Reply-To: " + msg.data.split(b"Message-ID: ")[1].split(b"\r\n")[0] + b"\r\n\r\nmore\r\n"
             if b"Message-ID: " in msg.data else b"")
    assert reply
    await mission.send("client@supplier.example", ["de-payroll@corp.example"], reply)
    assert mission.sink.messages[-1].rcpt_tos == [f"de-payroll+{de}@corp.example"]


async def test_thread_reuses_explicit_tag_mapping(mission):
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
            b"Subject: case\r\nMessage-ID: <explicit@corp.example>\r\n\r\nexplicit\r\n")
    await mission.send("uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"], data)
    reply = (b"From: client@supplier.example\r\nTo: pl-payroll@corp.example, uk-payroll@corp.example\r\n"
             b"Subject: Re: case\r\nIn-Reply-To: <explicit@corp.example>\r\n\r\nreply\r\n")
    await mission.send("client@supplier.example", ["pl-payroll@corp.example", "uk-payroll@corp.example"], reply)
    assert mission.sink.messages[-1].rcpt_tos == ["pl-payroll+5512-C@corp.example",
                                                  "uk-payroll+101203-T@corp.example"]


# ---------------------------------------------------------------- limits, teams, duplicates

async def test_tag_over_64_octets_left_untagged_and_logged(edge):
    long_addr = f"{LONG}@corp.example"
    data = (f"From: uk-payroll+101203-T@corp.example\r\nTo: {long_addr}, pl-payroll@corp.example\r\n"
            f"Subject: long\r\n\r\nbody\r\n").encode()
    await edge.send("uk-payroll+101203-T@corp.example", [long_addr, "pl-payroll@corp.example"], data)
    msg = edge.sink.messages[-1]
    new = tagged_as(msg.rcpt_tos, "pl-payroll")
    assert msg.rcpt_tos == [long_addr, f"pl-payroll+{new}@corp.example"]
    assert body_of(msg.data) == data.replace(b", pl-payroll@", f", pl-payroll+{new}@".encode())
    warnings = [e for e in edge.log_lines() if e["event"] == "address.untaggable"]
    assert [w["address"] for w in warnings] == [long_addr]


async def test_two_mailboxes_of_one_team_each_get_their_own_activity(edge):
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: uk-pensions@corp.example, pl-payroll@corp.example\r\n"
            b"Subject: two\r\n\r\nbody\r\n")
    await edge.send("uk-payroll+101203-T@corp.example", ["uk-pensions@corp.example", "pl-payroll@corp.example"],
                    data)
    msg = edge.sink.messages[-1]
    pens, pl = tagged_as(msg.rcpt_tos, "uk-pensions"), tagged_as(msg.rcpt_tos, "pl-payroll")
    assert pens != pl
    assert {link["mailbox"] for link in edge.links_show("101203-T")["links"]} == {
        "uk-pensions@corp.example", "pl-payroll@corp.example"}
    # A message from the new pensions activity to the payroll mailbox: links back, not to itself.
    data2 = (f"From: uk-pensions+{pens}@corp.example\r\nTo: uk-payroll@corp.example\r\n"
             f"Subject: back\r\n\r\nbody\r\n").encode()
    await edge.send(f"uk-pensions+{pens}@corp.example", ["uk-payroll@corp.example"], data2)
    assert edge.sink.messages[-1].rcpt_tos == ["uk-payroll+101203-T@corp.example"]


async def test_duplicates_after_rewriting_sent_once(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\n"
            b"To: pl-payroll@corp.example, PL-Payroll+" + new.lower().encode() + b"@corp.example\r\n"
            b"Cc: uk-payroll@corp.example\r\nSubject: dup\r\n\r\nbody\r\n")
    rcpts = ["pl-payroll@corp.example", f"PL-Payroll+{new.lower()}@corp.example",
             "uk-payroll@corp.example", "uk-payroll+101203-T@corp.example", "hr@corp.example"]
    await mission.send("uk-payroll+101203-T@corp.example", rcpts, data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == [f"pl-payroll+{new}@corp.example", "uk-payroll+101203-T@corp.example",
                            "hr@corp.example"]
    event = mission.relayed_events()[-1]
    assert len(event["recipients"]) == 3


async def test_groups_and_several_to_fields_rewritten(mission):
    new = await mission.step1()
    data = (b"From: uk-payroll+101203-T@corp.example\r\n"
            b"To: Payroll teams: \"UK\" <uk-payroll@corp.example>,\r\n"
            b"  pl-payroll@corp.example (Poland);, client@supplier.example\r\n"
            b"To: undisclosed-recipients:;\r\n"
            b"To: =?utf-8?q?Pologne?= <pl-payroll@corp.example>\r\n"
            b"Cc: (none) hr@corp.example\r\nSubject: groups\r\n\r\nTo: pl-payroll@corp.example\r\n")
    await mission.send("uk-payroll+101203-T@corp.example",
                       ["uk-payroll@corp.example", "pl-payroll@corp.example", "client@supplier.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{new}@corp.example",
                            "client@supplier.example"]
    head, _, body = data.partition(b"\r\n\r\n")
    expected = head.replace(b"<uk-payroll@", b"<uk-payroll+101203-T@").replace(
        b"pl-payroll@", f"pl-payroll+{new}@".encode()) + b"\r\n\r\n" + body
    assert body_of(msg.data) == expected


# ---------------------------------------------------------------- found bugs

async def test_untagged_copy_of_explicitly_tagged_mailbox_shares_the_named_activity(mission):
    # The message names Team B's activity 5512-C; a second, untagged copy of Team B's
    # mailbox must not allocate another activity for the same team.
    data = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
            b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>\r\nSubject: case\r\n\r\nbody\r\n")
    await mission.send("uk-payroll+101203-T@corp.example",
                       ["pl-payroll+5512-C@corp.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["pl-payroll+5512-C@corp.example"]
    assert body_of(msg.data) == data.replace(b"<pl-payroll@", b"<pl-payroll+5512-C@")
    assert [link["reference"] for link in mission.links_show("101203-T")["links"]] == ["5512-C"]
    event = mission.relayed_events()[-1]
    assert event["links_created"] == ["5512-C"]


async def test_subject_reference_in_mislabelled_encoded_word(mission):
    # A client labels Windows-1252 text as UTF-8: the reference is still plain ASCII in it.
    new = await mission.step1()
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: =?utf-8?q?Re=3A_Geh=E4lter_M=E4rz_=5B101203-T=5D?=\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    assert mission.sink.messages[-1].rcpt_tos == [f"pl-payroll+{new}@corp.example"]
    assert mission.relayed_events()[-1]["source_reference"] == "101203-T"


async def test_subject_reference_in_encoded_word_after_raw_utf8(mission):
    new = await mission.step1()
    data = ("From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            "Subject: [Extérieur] =?utf-8?q?Re=3A_Invoice_=5B101203-T=5D?=\r\n\r\nbody\r\n").encode()
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    assert mission.sink.messages[-1].rcpt_tos == [f"pl-payroll+{new}@corp.example"]


async def test_subject_reference_in_encoded_word_with_language(mission):
    new = await mission.step1()
    data = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n"
            b"Subject: =?utf-8*en?q?Re=3A_Invoice_=5B101203-T=5D?=\r\n\r\nbody\r\n")
    await mission.send("jane@corp.example", ["pl-payroll@corp.example"], data)
    assert mission.sink.messages[-1].rcpt_tos == [f"pl-payroll+{new}@corp.example"]


def test_decode_text_decodes_what_it_can_word_by_word():
    from smtpgate.mail.headers import decode_text

    assert decode_text("Réclamation =?utf-8?q?=5B101203-T=5D?=") == "Réclamation [101203-T]"
    assert decode_text("=?utf-8?q?M=E4rz_=5B1-T=5D?=") == "M\ufffdrz [1-T]"
    assert decode_text("=?utf-8*en?q?=5B1-T=5D?=") == "[1-T]"
    # A character split over two words, another charset after it, a word kept as it is.
    assert decode_text("é =?utf-8?q?R=C3?= =?utf-8?q?=A9f?= =?iso-8859-1?q?_=E9?=") == "é Réf é"
    assert decode_text("é =?utf-8?q?a?= =?x-unknown?q?b?= =?utf-8?q?c?= d") == "é a =?x-unknown?q?b?= c d"
    assert decode_text("=?x-unknown?q?abc?=") == "=?x-unknown?q?abc?="


async def test_reply_to_group_and_quoted_display_name_rewritten_only_in_addr_spec(mission):
    new = await mission.step1()
    data = (b"From: \"uk-payroll@corp.example\" <uk-payroll@corp.example>\r\n"
            b"Reply-To: Teams: uk-payroll@corp.example, \"PL\" <pl-payroll@corp.example>;\r\n"
            b"To: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
            b"Subject: [101203-T] groups\r\n\r\nbody\r\n")
    await mission.send("noreply@corp.example", ["client@supplier.example", "pl-payroll@corp.example"], data)
    msg = mission.sink.messages[-1]
    assert msg.rcpt_tos == ["client@supplier.example", f"pl-payroll+{new}@corp.example"]
    expected = (b"From: \"uk-payroll@corp.example\" <uk-payroll+101203-T@corp.example>\r\n"
                b"Reply-To: Teams: uk-payroll+101203-T@corp.example, \"PL\" <pl-payroll+" + new.encode()
                + b"@corp.example>;\r\n"
                b"To: client@supplier.example\r\nCc: pl-payroll+" + new.encode() + b"@corp.example\r\n"
                b"Subject: [101203-T] groups\r\n\r\nbody\r\n")
    assert body_of(msg.data) == expected


async def test_automatic_thread_reply_adds_no_link_for_a_new_mailbox(mission):
    new = await mission.step1()
    data = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example, de-payroll@corp.example\r\n"
            b"Cc: pl-payroll@corp.example\r\nAuto-Submitted: auto-replied\r\nSubject: Out of office\r\n"
            b"In-Reply-To: <step1.101203@corp.example>\r\n\r\naway\r\n")
    await mission.send("client@supplier.example",
                       ["uk-payroll@corp.example", "de-payroll@corp.example", "pl-payroll@corp.example"], data)
    assert mission.sink.messages[-1].rcpt_tos == ["uk-payroll+101203-T@corp.example", "de-payroll@corp.example",
                                                  f"pl-payroll+{new}@corp.example"]
    assert {link["mailbox"] for link in mission.links_show("101203-T")["links"]} == {"pl-payroll@corp.example"}
