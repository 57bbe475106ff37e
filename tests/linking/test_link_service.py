"""LinkService.decide and record without sockets: an Envelope and a header block in, a
LinkDecision out, against a real SQLite store (the seam of docs/architecture.md)."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from smtpgate.linking.decision import Envelope, EnvelopeRecipient
from smtpgate.linking.plan import CoreSettings, Directory, MailboxInfo
from smtpgate.linking.service import LinkService, LinkUnavailable
from smtpgate.log import _OUTAGES
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.rewrite import rewrite_headers
from smtpgate.store import open_store
from smtpgate.store.allocation import LocalAllocator

FIRST = 900000
UK, PL = "uk-payroll@corp.example", "pl-payroll@corp.example"
LONG = "a-very-long-team-mailbox-name-that-fills-almost-all-of-it@corp.example"
SETTINGS = CoreSettings(
    internal_domains=("corp.example",),
    mailboxes=(
        MailboxInfo(UK, "Team A (UK)"),
        MailboxInfo(PL, "Team B (Poland)"),
        MailboxInfo(LONG, "Team L"),
    ),
)
NEW = f"{FIRST}-T"


@pytest.fixture
async def service(tmp_path):
    store = await open_store(f"sqlite:{tmp_path}/s.db", base_dir=tmp_path, allocator=LocalAllocator(FIRST))
    yield LinkService(store, Directory(SETTINGS), hostname="relay.test.example")
    await store.close()


def envelope(mail_from: str, *rcpts: str) -> Envelope:
    return Envelope(parse_path(mail_from), tuple(EnvelopeRecipient(parse_path(r)) for r in rcpts))


async def decide(service, mail_from, rcpts, raw: bytes, **kw):
    return await service.decide(envelope(mail_from, *rcpts), parse_header_block(raw), **kw)


STEP1 = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
         b"Cc: Team B <pl-payroll@corp.example>,\r\n hr@corp.example\r\nSubject: Invoice 4411\r\n"
         b"Message-ID: <m1@corp.example>\r\n\r\nHello\r\n")


async def test_new_link_then_reuse_splice_exactly_the_rewritten_addr_spec(service):
    rcpts = ["client@supplier.example", PL, "hr@corp.example"]
    first = await decide(service, "uk-payroll+101203-T@corp.example", rcpts, STEP1)
    assert (first.source.reference, first.source.found_in) == ("101203-T", "envelope")
    assert [str(t) for t in first.targets()] == ["client@supplier.example", f"pl-payroll+{NEW}@corp.example",
                                                 "hr@corp.example"]
    assert first.source.created == (NEW,) and first.source.reused == ()
    expected = STEP1.replace(b"<pl-payroll@", f"<pl-payroll+{NEW}@".encode())
    assert first.apply(STEP1) == expected
    assert first.apply(STEP1) == rewrite_headers(STEP1, first.rewrite.tagged)
    [edit] = first.rewrite.edits
    assert (edit.name, edit.index) == ("Cc", 1)
    assert edit.old == b" Team B <pl-payroll@corp.example>,\r\n hr@corp.example\r\n"
    assert edit.new == f" Team B <pl-payroll+{NEW}@corp.example>,\r\n hr@corp.example\r\n".encode()

    second = await decide(service, "uk-payroll+101203-T@corp.example", rcpts, STEP1)
    assert second.source.created == () and second.source.reused == (NEW,)
    assert second.apply(STEP1) == expected


async def test_subject_source_and_thread_reply(service):
    first = await decide(service, "uk-payroll+101203-T@corp.example", ["client@supplier.example", PL], STEP1)
    await service.record(first, first.targets())
    outlook = (b"From: Jane <jane@corp.example>\r\nTo: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
               b"Subject: RE: Invoice 4411 [101203-T]\r\n\r\nx\r\n")
    by_subject = await decide(service, "jane@corp.example", ["client@supplier.example", PL], outlook)
    assert by_subject.source.found_in == "subject"
    assert by_subject.apply(outlook) == outlook.replace(b"Cc: pl-payroll@", f"Cc: pl-payroll+{NEW}@".encode())

    reply = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\nCc: pl-payroll@corp.example\r\n"
             b"In-Reply-To: <m1@corp.example>\r\nSubject: RE: Invoice 4411\r\n\r\nthanks\r\n")
    threaded = await decide(service, "client@supplier.example", [UK, PL], reply)
    assert threaded.source.found_in == "thread"
    assert [str(t) for t in threaded.targets()] == ["uk-payroll+101203-T@corp.example",
                                                    f"pl-payroll+{NEW}@corp.example"]
    assert threaded.apply(reply) == reply.replace(b"To: uk-payroll@", b"To: uk-payroll+101203-T@").replace(
        b"Cc: pl-payroll@", f"Cc: pl-payroll+{NEW}@".encode())
    assert threaded.source.created == ()


async def test_no_source_changes_nothing_and_bcc_changes_only_the_envelope(service):
    plain = b"From: jane@corp.example\r\nTo: pl-payroll@corp.example\r\nSubject: hello\r\n\r\nx\r\n"
    none = await decide(service, "jane@corp.example", [PL], plain)
    assert none.source is None and none.targets() == [parse_path(PL)] and none.apply(plain) == plain
    bcc = b"From: uk-payroll+101203-T@corp.example\r\nTo: client@supplier.example\r\n\r\nx\r\n"
    hidden = await decide(service, "uk-payroll+101203-T@corp.example", ["client@supplier.example", PL], bcc)
    assert hidden.rewrite.edits == () and hidden.apply(bcc) == bcc
    assert str(hidden.targets()[1]) == f"pl-payroll+{NEW}@corp.example"


async def test_owner_from_an_untagged_from_is_not_stored(service):
    """Team B replying from pl-payroll@ with Team A's reference in the subject."""
    raw = (b"From: pl-payroll@corp.example\r\nTo: client@supplier.example\r\n"
           b"Subject: RE: [101203-T]\r\n\r\nx\r\n")
    decision = await decide(service, "pl-payroll@corp.example", ["client@supplier.example"], raw)
    assert decision.source.mailbox == PL  # serves this message: its own mailbox is tagged in From
    assert decision.apply(raw).startswith(b"From: pl-payroll+101203-T@corp.example")
    assert await service.store.activity_mailbox("101203-T") is None

    # Authoritative evidence (a tagged sender) is stored; a later contradiction is logged, not stored.
    await decide(service, "uk-payroll+101203-T@corp.example", ["client@supplier.example"], STEP1)
    assert await service.store.activity_mailbox("101203-T") == UK
    with capture_logs() as logs:
        await decide(service, "pl-payroll+101203-T@corp.example", ["client@supplier.example"],
                     b"From: pl-payroll+101203-T@corp.example\r\n\r\nx\r\n")
    [conflict] = [e for e in logs if e["event"] == "activity.owner_conflict"]
    assert (conflict["stored_owner"], conflict["evidence"]) == (UK, PL)
    assert await service.store.activity_mailbox("101203-T") == UK


async def test_untaggable_mailbox_makes_no_link(service):
    local = LONG.split("@")[0]
    assert len(local) + 1 + len(NEW) > 64 >= len(local) + 1 + len("1-T")
    raw = f"From: uk-payroll+101203-T@corp.example\r\nTo: {LONG}\r\n\r\nx\r\n".encode()
    with capture_logs() as logs:
        decision = await decide(service, "uk-payroll+101203-T@corp.example", [LONG], raw)
    assert [str(t) for t in decision.targets()] == [LONG]
    assert decision.source.created == () and decision.rewrite.edits == ()
    assert await service.store.find_link("101203-T", LONG) is None
    assert [e["address"] for e in logs if e["event"] == "address.untaggable"] == [LONG]


async def test_an_explicit_tag_in_the_message_wins_for_that_message(service):
    await decide(service, "uk-payroll+101203-T@corp.example", [PL], STEP1)  # links NEW
    raw = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
           b"Cc: pl-payroll@corp.example\r\n\r\nx\r\n")
    decision = await decide(service, "uk-payroll+101203-T@corp.example",
                            ["pl-payroll+5512-C@corp.example", PL], raw)
    # The untagged copy becomes the tagged one and merges into it: sent once.
    assert [str(t) for t in decision.targets()] == ["pl-payroll+5512-C@corp.example"]
    assert decision.recipients[1].target is None
    assert decision.apply(raw) == raw.replace(b"Cc: pl-payroll@", b"Cc: pl-payroll+5512-C@")
    assert "5512-C" in decision.source.created


async def test_observe_reads_and_never_writes(service):
    decision = await decide(service, "uk-payroll+101203-T@corp.example", [PL], STEP1, observe=True)
    assert decision.source.would_create == (PL,) and decision.source.created == ()
    assert await service.store.activity_mailbox("101203-T") is None
    assert await service.store.find_link("101203-T", PL) is None
    await service.record(decision, decision.targets())
    assert await service.store.find_thread(["<m1@corp.example>"]) is None


async def test_without_tag_drops_the_tag_from_envelope_and_header(service):
    decision = await decide(service, "uk-payroll+101203-T@corp.example", ["client@supplier.example", PL], STEP1)
    untagged = decision.without_tag(parse_path(PL))
    assert [str(t) for t in untagged.targets()] == ["client@supplier.example", PL]
    assert untagged.apply(STEP1) == STEP1


async def test_a_failing_store_is_link_unavailable(service):
    await service.store.close()
    with pytest.raises(LinkUnavailable):
        await decide(service, "uk-payroll+101203-T@corp.example", [PL], STEP1)


async def test_a_missing_message_id_is_made_once(service):
    raw = b"From: jane@corp.example\r\nSubject: x\r\n\r\nx\r\n"
    decision = await decide(service, "jane@corp.example", [PL], raw)
    assert decision.message_id_added and decision.message_id.endswith("@relay.test.example>")
    given = await decide(service, "jane@corp.example", [PL], b"Message-ID: <a@b> (comment)\r\n\r\n")
    assert (given.message_id, given.message_id_added) == ("<a@b>", False)


async def test_a_thread_reply_keeps_the_reference_its_thread_used_over_a_newer_link(service):
    first = await decide(service, "uk-payroll+101203-T@corp.example", ["client@supplier.example", PL], STEP1)
    await service.record(first, first.targets())
    await service.store.add_link("101203-T", "777-T", PL, by="admin@corp.example")
    assert await service.store.find_link("101203-T", PL) == "777-T"  # the newest link
    reply = (b"From: client@supplier.example\r\nTo: uk-payroll@corp.example\r\nCc: pl-payroll@corp.example\r\n"
             b"In-Reply-To: <m1@corp.example>\r\nSubject: RE: Invoice 4411\r\n\r\nthanks\r\n")
    threaded = await decide(service, "client@supplier.example", [UK, PL], reply)
    assert threaded.source.found_in == "thread"
    assert [str(t) for t in threaded.targets()] == ["uk-payroll+101203-T@corp.example",
                                                    f"pl-payroll+{NEW}@corp.example"]
    assert threaded.source.references[PL] == NEW and threaded.source.reused == ()


async def test_the_from_tag_names_the_owner_before_a_recipient_tagged_with_the_same_reference(service):
    """Jane sends as Team A (tagged From:) from her own envelope sender; a mistyped copy tags
    Team B with Team A's reference: the From: tag is the evidence."""
    raw = (b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
           b"Cc: pl-payroll+101203-T@corp.example\r\nSubject: Invoice 4411\r\n\r\nx\r\n")
    decision = await decide(service, "jane@corp.example",
                            ["pl-payroll+101203-T@corp.example", "client@supplier.example"], raw)
    assert (decision.source.reference, decision.source.found_in) == ("101203-T", "from")
    assert await service.store.activity_mailbox("101203-T") == UK


async def test_a_recipient_tagged_with_the_subject_reference_names_the_owner(service):
    raw = (b"From: jane@corp.example\r\nTo: Team A <uk-payroll+101203-T@corp.example>\r\n"
           b"Subject: RE: Invoice 4411 [101203-T]\r\n\r\nx\r\n")
    decision = await decide(service, "jane@corp.example", ["uk-payroll+101203-T@corp.example"], raw)
    assert (decision.source.found_in, decision.source.mailbox) == ("subject", UK)
    assert await service.store.activity_mailbox("101203-T") == UK


EXPLICIT = (b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
            b"Subject: case\r\nMessage-ID: <explicit@corp.example>\r\n\r\nx\r\n")


async def test_observe_tells_a_new_explicit_link_from_a_known_one(service):
    before = await decide(service, "uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"],
                          EXPLICIT, observe=True)
    assert (before.source.created, before.source.reused) == (("5512-C",), ())
    assert await service.store.find_link("101203-T", PL) is None
    await decide(service, "uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"], EXPLICIT)
    after = await decide(service, "uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"],
                         EXPLICIT, observe=True)
    assert (after.source.created, after.source.reused) == ((), ("5512-C",))


async def test_an_explicit_link_keeps_the_message_that_made_it(service):
    with capture_logs() as logs:
        decision = await decide(service, "uk-payroll+101203-T@corp.example",
                                ["pl-payroll+5512-C@corp.example"], EXPLICIT)
    assert decision.source.created == ("5512-C",)
    assert [e for e in logs if e["event"] == "link.created"] == [
        {"event": "link.created", "log_level": "info", "source_reference": "101203-T", "reference": "5512-C",
         "mailbox": PL, "message_id": "<explicit@corp.example>"}]
    [row] = await service.store.list_links()
    assert (row.source_reference, row.source_mailbox, row.target_reference, row.target_mailbox, row.message_id) == (
        "101203-T", UK, "5512-C", PL, "<explicit@corp.example>")


INBOUND_REPLY = (b"From: client@supplier.example\r\nTo: jane@corp.example\r\nSubject: RE: Invoice 4411\r\n"
                 b"In-Reply-To: <jane.1@corp.example>\r\nMessage-ID: <reply.1@supplier.example>\r\n\r\nx\r\n")


async def test_a_successful_inbound_look_up_ends_a_store_outage(service, tmp_path):
    _OUTAGES.clear()  # the outage records are the process's
    closed = await open_store(f"sqlite:{tmp_path}/closed.db", base_dir=tmp_path, allocator=LocalAllocator(FIRST))
    await closed.close()
    failing = LinkService(closed, Directory(SETTINGS), hostname="relay.test.example")
    with capture_logs() as logs:
        with pytest.raises(LinkUnavailable):
            await failing.retag(envelope("client@supplier.example", "jane@corp.example"),
                                parse_header_block(INBOUND_REPLY))
        await service.retag(envelope("client@supplier.example", "jane@corp.example"),
                            parse_header_block(INBOUND_REPLY))
    assert [(e["event"], e["component"]) for e in logs if e["event"].startswith("component.")] == [
        ("component.failed", "store"), ("component.recovered", "store")]


async def test_sharing_adds_the_source_mailbox_the_thread_message_did_not_name(service):
    await decide(service, "uk-payroll+101203-T@corp.example", ["client@supplier.example", PL], STEP1)  # owner UK
    # Jane answers from her own address, the reference in the subject: Team A is not a party.
    jane = (b"From: jane@corp.example\r\nTo: client@supplier.example\r\nCc: pl-payroll@corp.example\r\n"
            b"Subject: RE: Invoice 4411 [101203-T]\r\nMessage-ID: <jane.1@corp.example>\r\n\r\nx\r\n")
    thread = await decide(service, "jane@corp.example", ["client@supplier.example", PL], jane)
    assert [str(t) for t in thread.targets()] == ["client@supplier.example", f"pl-payroll+{NEW}@corp.example"]
    await service.record(thread, thread.targets())
    decision = await service.retag(envelope("client@supplier.example", "jane@corp.example"),
                                   parse_header_block(INBOUND_REPLY), share=True)
    assert decision.share.reason == "shared"
    assert [str(a) for a in decision.added] == [f"pl-payroll+{NEW}@corp.example", "uk-payroll+101203-T@corp.example"]
