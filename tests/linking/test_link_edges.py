"""Linking edge cases without sockets: where the source activity is found, which mailbox
is the source's own, thread look-ups, encoded subjects, a custom reference pattern,
duplicates and header shapes. LinkService.decide and record against a real SQLite store;
the envelope is what both front ends send (frontends/policy.py's envelope_plan).

The same story on the wire is tests/test_mission.py; tests/test_mission_edges.py keeps
one wire case for each of these behaviours a client sees.
"""

from __future__ import annotations

import pytest

from smtpgate.frontends.policy import envelope_plan
from smtpgate.linking.decision import Envelope, EnvelopeRecipient, LinkDecision
from smtpgate.linking.plan import CoreSettings, Directory, MailboxInfo
from smtpgate.linking.service import LinkService
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block
from smtpgate.store import open_store
from smtpgate.store.allocation import LocalAllocator

FIRST = 900000
NEW, SECOND = f"{FIRST}-T", f"{FIRST + 1}-T"
UK, PENSIONS, PL, DE = ("uk-payroll@corp.example", "uk-pensions@corp.example", "pl-payroll@corp.example",
                        "de-payroll@corp.example")
SETTINGS = CoreSettings(
    internal_domains=("corp.example",),
    reference_pattern="T-[0-9]+|[0-9]{1,12}-[TCA]",
    reference_headers=("X-Enate-Reference", "X-Case"),
    mailboxes=(
        MailboxInfo(UK, "Team A (UK)"),
        MailboxInfo(PENSIONS, "Team A (UK)"),
        MailboxInfo(PL, "Team B (Poland)"),
        MailboxInfo(DE, "Team C (Germany)"),
    ),
)

STEP1 = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: Client Ltd <client@supplier.example>\r\n"
         b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>,\r\n  hr@corp.example (Human Resources)\r\n"
         b"Subject: Invoice 4411\r\nMessage-ID: <step1.101203@corp.example>\r\n\r\nDear client,\r\n")


@pytest.fixture
async def service(tmp_path):
    store = await open_store(f"sqlite:{tmp_path}/s.db", base_dir=tmp_path, allocator=LocalAllocator(FIRST))
    yield LinkService(store, Directory(SETTINGS), hostname="relay.test.example")
    await store.close()


async def relay(service: LinkService, mail_from: str, rcpts: list[str], raw: bytes) -> LinkDecision:
    """Decide, and record what was sent, as a front end does for a message the upstream took."""
    envelope = Envelope(parse_path(mail_from), tuple(EnvelopeRecipient(parse_path(r)) for r in rcpts))
    decision = await service.decide(envelope, parse_header_block(raw))
    await service.record(decision, sent(decision))
    return decision


def sent(decision: LinkDecision) -> list:
    return [a for a in envelope_plan(decision) if a is not None]


def envelope_of(decision: LinkDecision) -> list[str]:
    return [str(a) for a in sent(decision)]


async def links(service: LinkService, reference: str) -> set[tuple[str, str | None]]:
    view = await service.store.show(reference)
    return {(link.reference, link.mailbox) for link in view.links} if view else set()


async def step1(service: LinkService) -> str:
    """Team A writes from 101203-T to a client, copying Team B and HR: Team B's reference (NEW
    when it is the store's first)."""
    decision = await relay(service, "uk-payroll+101203-T@corp.example",
                           ["client@supplier.example", PL, "hr@corp.example"], STEP1)
    return decision.source.references[PL]


# ---------------------------------------------------------------- source detection

@pytest.mark.parametrize(("field", "reference"), [
    (b"X-Enate-Reference: 101203-T\r\n", "101203-T"),
    (b"X-Case: see T-1234\r\n", "T-1234"),  # the second configured header, the pattern's other form
])
async def test_source_from_a_configured_header(service, field, reference):
    raw = (b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\n" + field
           + b"Subject: no reference here\r\n\r\nbody\r\n")
    decision = await relay(service, "jane@corp.example", [PL], raw)
    assert (decision.source.reference, decision.source.found_in) == (reference, "header")
    assert envelope_of(decision) == [f"pl-payroll+{NEW}@corp.example"]
    assert decision.apply(raw) == raw.replace(b"To: pl-payroll@", f"To: pl-payroll+{NEW}@".encode())
    assert await links(service, NEW) == {(reference, None)}


async def test_source_from_the_from_tag_when_the_envelope_sender_is_noreply(service):
    raw = (b"From: Payroll UK <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
           b"Cc: pl-payroll@corp.example\r\nReply-To: uk-payroll@corp.example\r\nSubject: Invoice\r\n\r\nbody\r\n")
    decision = await relay(service, "noreply@corp.example", ["client@supplier.example", PL], raw)
    assert (decision.source.reference, decision.source.found_in) == ("101203-T", "from")
    assert envelope_of(decision) == ["client@supplier.example", f"pl-payroll+{NEW}@corp.example"]
    assert decision.apply(raw) == raw.replace(b"Cc: pl-payroll@", f"Cc: pl-payroll+{NEW}@".encode()).replace(
        b"Reply-To: uk-payroll@", b"Reply-To: uk-payroll+101203-T@")
    assert await service.store.activity_mailbox("101203-T") == UK


async def test_precedence_envelope_tag_then_from_then_header_then_subject_then_thread(service):
    raw = (b"From: uk-payroll+222-T@corp.example\r\nTo: pl-payroll@corp.example\r\n"
           b"X-Enate-Reference: 333-T\r\nSubject: [444-T]\r\n\r\nbody\r\n")
    found = await relay(service, "uk-payroll+111-T@corp.example", [PL], raw)
    assert (found.source.reference, found.source.found_in) == ("111-T", "envelope")
    found = await relay(service, "noreply@corp.example", [PL], raw)
    assert (found.source.reference, found.source.found_in) == ("222-T", "from")
    plain = raw.replace(b"uk-payroll+222-T@", b"jane@")
    found = await relay(service, "jane@corp.example", [PL], plain)
    assert (found.source.reference, found.source.found_in) == ("333-T", "header")
    found = await relay(service, "jane@corp.example", [PL], plain.replace(b"X-Enate-Reference: 333-T\r\n", b""))
    assert (found.source.reference, found.source.found_in) == ("444-T", "subject")
    # A subject reference wins over the thread.
    await step1(service)
    reply = (b"From: client@supplier.example\r\nTo: pl-payroll@corp.example\r\nSubject: Re: [555-T]\r\n"
             b"In-Reply-To: <step1.101203@corp.example>\r\n\r\nbody\r\n")
    found = await relay(service, "client@supplier.example", [PL], reply)
    assert (found.source.reference, found.source.found_in) == ("555-T", "subject")


async def test_custom_pattern_in_subject_and_in_a_tag(service):
    raw = (b"From: jane@corp.example\r\nTo: pl-payroll@corp.example\r\n"
           b"Cc: uk-payroll+t-77@corp.example\r\nSubject: RE: [T-4242] salary\r\n\r\nbody\r\n")
    decision = await relay(service, "jane@corp.example", [PL, "uk-payroll+t-77@corp.example"], raw)
    assert (decision.source.reference, decision.source.found_in) == ("T-4242", "subject")
    assert envelope_of(decision) == [f"pl-payroll+{NEW}@corp.example", "uk-payroll+t-77@corp.example"]
    assert {reference for reference, _ in await links(service, "T-4242")} == {NEW, "T-77"}
    # The pattern's other form, in a tagged From:.
    tagged = b"From: uk-payroll+T-9@corp.example\r\nTo: pl-payroll@corp.example\r\nSubject: x\r\n\r\nb\r\n"
    decision = await relay(service, "noreply@corp.example", [PL], tagged)
    assert (decision.source.reference, decision.source.found_in) == ("T-9", "from")


@pytest.mark.parametrize("subject", [
    b"=?utf-8?q?Re=3A_R=C3=A9clamation_=5B101203-T=5D?=",
    b"=?utf-8?b?UmU6IFvDqXTDqV0g?=\r\n =?utf-8?b?WzEwMTIwMy1UXQ==?=",  # base64, two words, folded
    b"=?utf-8?q?Re=3A_Geh=E4lter_M=E4rz_=5B101203-T=5D?=",  # Windows-1252 labelled as UTF-8
    "[Extérieur] =?utf-8?q?Re=3A_Invoice_=5B101203-T=5D?=".encode(),  # after raw UTF-8
    b"=?utf-8*en?q?Re=3A_Invoice_=5B101203-T=5D?=",  # with a language (RFC 2231)
])
async def test_subject_reference_in_encoded_words(service, subject):
    await step1(service)
    raw = b"From: Jane <jane@corp.example>\r\nTo: pl-payroll@corp.example\r\nSubject: " + subject + b"\r\n\r\nbody\r\n"
    decision = await relay(service, "jane@corp.example", [PL], raw)
    assert (decision.source.reference, decision.source.found_in) == ("101203-T", "subject")
    assert envelope_of(decision) == [f"pl-payroll+{NEW}@corp.example"]
    assert decision.apply(raw) == raw.replace(b"To: pl-payroll@", f"To: pl-payroll+{NEW}@".encode())
    assert decision.source.reused == (NEW,)


# ---------------------------------------------------------------- the source's own mailbox

async def test_outlook_user_copying_the_source_mailbox_tags_it_with_the_source(service):
    assert await step1(service) == NEW
    raw = (b"From: Jane Doe <jane@corp.example>\r\nTo: client@supplier.example\r\n"
           b"Cc: uk-payroll@corp.example, pl-payroll@corp.example\r\n"
           b"Subject: RE: Invoice 4411 [101203-T]\r\n\r\nfrom outlook\r\n")
    decision = await relay(service, "jane@corp.example", ["client@supplier.example", UK, PL], raw)
    assert envelope_of(decision) == ["client@supplier.example", "uk-payroll+101203-T@corp.example",
                                     f"pl-payroll+{NEW}@corp.example"]
    assert decision.apply(raw) == raw.replace(b"Cc: uk-payroll@corp.example, pl-payroll@",
                                              f"Cc: uk-payroll+101203-T@corp.example, pl-payroll+{NEW}@".encode())
    assert {mailbox for _, mailbox in await links(service, "101203-T")} == {PL}


async def test_untagged_source_mailbox_in_from_and_reply_to_is_tagged_and_not_made_its_owner(service):
    raw = (b"From: Payroll UK <uk-payroll@corp.example>\r\nReply-To: uk-payroll@corp.example\r\n"
           b"To: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
           b"Subject: Your payslip [101203-T]\r\n\r\nbody\r\n")
    decision = await relay(service, UK, ["client@supplier.example", PL], raw)
    assert decision.apply(raw) == raw.replace(b"<uk-payroll@", b"<uk-payroll+101203-T@").replace(
        b"Reply-To: uk-payroll@", b"Reply-To: uk-payroll+101203-T@").replace(
        b"Cc: pl-payroll@", f"Cc: pl-payroll+{NEW}@".encode())
    assert envelope_of(decision) == ["client@supplier.example", f"pl-payroll+{NEW}@corp.example"]
    # An untagged From serves this message only; ownership is never guessed.
    assert await service.store.activity_mailbox("101203-T") is None
    assert await links(service, "101203-T") == {(NEW, PL)}


async def test_a_message_to_the_source_mailbox_only_makes_no_link(service):
    raw = (b"From: uk-payroll+101203-T@corp.example\r\nTo: uk-payroll@corp.example\r\n"
           b"Subject: note to self\r\n\r\nbody\r\n")
    decision = await relay(service, "uk-payroll+101203-T@corp.example", [UK], raw)
    assert envelope_of(decision) == ["uk-payroll+101203-T@corp.example"]
    assert decision.apply(raw) == raw.replace(b"To: uk-payroll@", b"To: uk-payroll+101203-T@")
    assert (decision.source.created, decision.source.reused) == ((), ())
    assert await links(service, "101203-T") == set()


async def test_an_explicit_tag_equal_to_the_source_reference_changes_nothing(service):
    raw = (b"From: uk-payroll+101203-T@corp.example\r\n"
           b"To: uk-payroll+101203-T@corp.example, pl-payroll+101203-T@corp.example\r\n"
           b"Subject: same\r\n\r\nbody\r\n")
    rcpts = ["uk-payroll+101203-T@corp.example", "pl-payroll+101203-T@corp.example"]
    decision = await relay(service, "uk-payroll+101203-T@corp.example", rcpts, raw)
    assert envelope_of(decision) == rcpts and decision.apply(raw) == raw
    assert await links(service, "101203-T") == set()


# ---------------------------------------------------------------- threads

async def test_thread_found_through_references_when_in_reply_to_is_unknown(service):
    await step1(service)
    raw = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\nCc: pl-payroll@corp.example\r\n"
           b"Subject: Re: Invoice 4411\r\nIn-Reply-To: <never-relayed@supplier.example>\r\n"
           b"References: <step1.101203@corp.example>\r\n <older@supplier.example>\r\n"
           b"\t<never-relayed@supplier.example>\r\n\r\nthanks\r\n")
    decision = await relay(service, "client@supplier.example", [UK, PL], raw)
    assert (decision.source.reference, decision.source.found_in) == ("101203-T", "thread")
    assert envelope_of(decision) == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{NEW}@corp.example"]


async def test_a_thread_reply_adding_a_third_mailbox_links_it_and_its_reply_finds_it(service):
    await step1(service)
    raw = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\n"
           b"Cc: pl-payroll@corp.example, de-payroll@corp.example\r\n"
           b"Subject: Re: Invoice 4411\r\nIn-Reply-To: <step1.101203@corp.example>\r\n"
           b"Message-ID: <reply.1@supplier.example>\r\n\r\nthanks\r\n")
    decision = await relay(service, "client@supplier.example", [UK, PL, DE], raw)
    assert envelope_of(decision) == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{NEW}@corp.example",
                                     f"de-payroll+{SECOND}@corp.example"]
    assert decision.source.created == (SECOND,)
    assert await links(service, "101203-T") == {(NEW, PL), (SECOND, DE)}
    assert await links(service, SECOND) == {("101203-T", UK)}
    # A reply to that reply finds the third mailbox in that message's mapping.
    again = (b"From: client@supplier.example\r\nTo: de-payroll@corp.example\r\nSubject: Re: Re\r\n"
             b"In-Reply-To: <reply.1@supplier.example>\r\n\r\nmore\r\n")
    decision = await relay(service, "client@supplier.example", [DE], again)
    assert envelope_of(decision) == [f"de-payroll+{SECOND}@corp.example"]


async def test_a_thread_reuses_the_mapping_of_an_explicit_tag(service):
    raw = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
           b"Subject: case\r\nMessage-ID: <explicit@corp.example>\r\n\r\nexplicit\r\n")
    await relay(service, "uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"], raw)
    reply = (b"From: client@supplier.example\r\nTo: pl-payroll@corp.example, uk-payroll@corp.example\r\n"
             b"Subject: Re: case\r\nIn-Reply-To: <explicit@corp.example>\r\n\r\nreply\r\n")
    decision = await relay(service, "client@supplier.example", [PL, UK], reply)
    assert envelope_of(decision) == ["pl-payroll+5512-C@corp.example", "uk-payroll+101203-T@corp.example"]


async def test_an_automatic_thread_reply_adds_no_link_for_a_new_mailbox(service):
    await step1(service)
    raw = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example, de-payroll@corp.example\r\n"
           b"Cc: pl-payroll@corp.example\r\nAuto-Submitted: auto-replied\r\nSubject: Out of office\r\n"
           b"In-Reply-To: <step1.101203@corp.example>\r\n\r\naway\r\n")
    decision = await relay(service, "client@supplier.example", [UK, DE, PL], raw)
    assert envelope_of(decision) == ["uk-payroll+101203-T@corp.example", DE, f"pl-payroll+{NEW}@corp.example"]
    assert {mailbox for _, mailbox in await links(service, "101203-T")} == {PL}


# ---------------------------------------------------------------- teams, duplicates, header shapes

async def test_two_mailboxes_of_one_team_each_get_their_own_activity(service):
    raw = (b"From: uk-payroll+101203-T@corp.example\r\nTo: uk-pensions@corp.example, pl-payroll@corp.example\r\n"
           b"Subject: two\r\n\r\nbody\r\n")
    decision = await relay(service, "uk-payroll+101203-T@corp.example", [PENSIONS, PL], raw)
    assert envelope_of(decision) == [f"uk-pensions+{NEW}@corp.example", f"pl-payroll+{SECOND}@corp.example"]
    assert {mailbox for _, mailbox in await links(service, "101203-T")} == {PENSIONS, PL}
    # From the new pensions activity to the payroll mailbox: links back, not to itself.
    back = (f"From: uk-pensions+{NEW}@corp.example\r\nTo: uk-payroll@corp.example\r\n"
            f"Subject: back\r\n\r\nbody\r\n").encode()
    decision = await relay(service, f"uk-pensions+{NEW}@corp.example", [UK], back)
    assert envelope_of(decision) == ["uk-payroll+101203-T@corp.example"]


async def test_duplicates_after_rewriting_are_sent_once(service):
    await step1(service)
    raw = (b"From: uk-payroll+101203-T@corp.example\r\n"
           b"To: pl-payroll@corp.example, PL-Payroll+" + NEW.lower().encode() + b"@corp.example\r\n"
           b"Cc: uk-payroll@corp.example\r\nSubject: dup\r\n\r\nbody\r\n")
    rcpts = [PL, f"PL-Payroll+{NEW.lower()}@corp.example", UK, "uk-payroll+101203-T@corp.example",
             "hr@corp.example"]
    decision = await relay(service, "uk-payroll+101203-T@corp.example", rcpts, raw)
    assert envelope_of(decision) == [f"pl-payroll+{NEW}@corp.example", "uk-payroll+101203-T@corp.example",
                                     "hr@corp.example"]


async def test_groups_and_several_to_fields_are_rewritten_and_the_body_is_not(service):
    await step1(service)
    raw = (b"From: uk-payroll+101203-T@corp.example\r\n"
           b"To: Payroll teams: \"UK\" <uk-payroll@corp.example>,\r\n"
           b"  pl-payroll@corp.example (Poland);, client@supplier.example\r\n"
           b"To: undisclosed-recipients:;\r\n"
           b"To: =?utf-8?q?Pologne?= <pl-payroll@corp.example>\r\n"
           b"Cc: (none) hr@corp.example\r\nSubject: groups\r\n\r\nTo: pl-payroll@corp.example\r\n")
    decision = await relay(service, "uk-payroll+101203-T@corp.example", [UK, PL, "client@supplier.example"], raw)
    assert envelope_of(decision) == ["uk-payroll+101203-T@corp.example", f"pl-payroll+{NEW}@corp.example",
                                     "client@supplier.example"]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert decision.apply(raw) == head.replace(b"<uk-payroll@", b"<uk-payroll+101203-T@").replace(
        b"pl-payroll@", f"pl-payroll+{NEW}@".encode()) + b"\r\n\r\n" + body


async def test_reply_to_group_and_quoted_display_name_rewritten_only_in_the_addr_spec(service):
    await step1(service)
    raw = (b"From: \"uk-payroll@corp.example\" <uk-payroll@corp.example>\r\n"
           b"Reply-To: Teams: uk-payroll@corp.example, \"PL\" <pl-payroll@corp.example>;\r\n"
           b"To: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
           b"Subject: [101203-T] groups\r\n\r\nbody\r\n")
    decision = await relay(service, "noreply@corp.example", ["client@supplier.example", PL], raw)
    assert envelope_of(decision) == ["client@supplier.example", f"pl-payroll+{NEW}@corp.example"]
    assert decision.apply(raw) == (
        b"From: \"uk-payroll@corp.example\" <uk-payroll+101203-T@corp.example>\r\n"
        b"Reply-To: Teams: uk-payroll+101203-T@corp.example, \"PL\" <pl-payroll+" + NEW.encode()
        + b"@corp.example>;\r\n"
        b"To: client@supplier.example\r\nCc: pl-payroll+" + NEW.encode() + b"@corp.example\r\n"
        b"Subject: [101203-T] groups\r\n\r\nbody\r\n")


async def test_an_untagged_copy_of_an_explicitly_tagged_mailbox_shares_the_named_activity(service):
    raw = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
           b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>\r\nSubject: case\r\n\r\nbody\r\n")
    decision = await relay(service, "uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example", PL], raw)
    assert envelope_of(decision) == ["pl-payroll+5512-C@corp.example"]
    assert decision.apply(raw) == raw.replace(b"<pl-payroll@", b"<pl-payroll+5512-C@")
    assert await links(service, "101203-T") == {("5512-C", PL)}
    assert decision.source.created == ("5512-C",)
