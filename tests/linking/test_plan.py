"""The link decision: source activity, recipient classes, the plan."""

from __future__ import annotations

import pytest

from smtpgate.mail.addresses import Address, parse_path
from smtpgate.mail.headers import HeaderBlock, parse_header_block
from smtpgate.linking.plan import (
    CoreSettings,
    Directory,
    LinkLookup,
    MailboxInfo,
    RecipientClass,
    Source,
    find_source,
    is_automatic,
    make_plan,
    thread_message_ids,
)
from smtpgate.mail.rewrite import rewrite_headers

UK = MailboxInfo("uk-payroll@corp.example", "Team A (UK)")
PL = MailboxInfo("pl-payroll@corp.example", "Team B (Poland)", "create", "{n}-T")
DE = MailboxInfo("de-hr@corp.example", "Team C", "never")
LONG = MailboxInfo("x" * 56 + "@corp.example", "Team L")
IDN = MailboxInfo("pay@xn--bcher-kva.example", "Team I")

SETTINGS = CoreSettings(
    internal_domains=("corp.example", "Bücher.example"),
    separator="+",
    reference_pattern="[0-9]{1,12}-[TCA]",
    reference_headers=("X-Enate-Reference", "X-Case"),
    subject=True,
    mailboxes=(UK, PL, DE, LONG, IDN),
)
DIRECTORY = Directory(SETTINGS)


def addr(text: str) -> Address:
    address = parse_path(text)
    assert address is not None
    return address


def headers(*lines: str) -> HeaderBlock:
    return parse_header_block("".join(f"{line}\r\n" for line in lines).encode() + b"\r\nbody\r\n")


NO_HEADERS = headers()


# --- directory ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (CoreSettings(("corp.example",), separator=""), "separator"),
        (CoreSettings(("corp.example",), separator="@"), "separator"),
        (CoreSettings(("corp.example",), separator=" "), "separator"),
        (CoreSettings(("corp.example",), separator="--"), "separator"),
        (CoreSettings(("corp.example",), mailboxes=(MailboxInfo("a+b@corp.example", "T"),)), "untagged"),
        (CoreSettings(("corp.example",), reference_pattern="["), "pattern"),
        (CoreSettings(("corp..example",)), "internal domain"),
        (CoreSettings(("corp.example",), mailboxes=(MailboxInfo("not an address", "T"),)), "mailbox"),
        (CoreSettings(("corp.example",), mailboxes=(MailboxInfo("<>", "T"),)), "mailbox"),
        (CoreSettings(("corp.example",), mailboxes=(MailboxInfo("postmaster", "T"),)), "mailbox"),
        (CoreSettings(("corp.example",), mailboxes=(UK, MailboxInfo("UK-Payroll@CORP.example", "T"))), "twice"),
    ],
)
def test_directory_refuses_bad_settings(settings: CoreSettings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Directory(settings)


def test_directory_makes_mailbox_addresses_canonical() -> None:
    directory = Directory(CoreSettings(("corp.example",), mailboxes=(MailboxInfo("UK-Payroll@Corp.Example", "A"),)))
    assert directory.mailboxes == (MailboxInfo("uk-payroll@corp.example", "A"),)
    assert directory.mailbox_info("uk-payroll@corp.example") == MailboxInfo("uk-payroll@corp.example", "A")
    assert directory.mailbox_info("hr@corp.example") is None


def test_directory_answers_the_same_from_what_it_remembers_and_when_that_is_full() -> None:
    directory = Directory(SETTINGS)
    tagged, other = addr("pl-payroll+5512-C@corp.example"), addr("client@supplier.example")
    first = [directory.mailbox(tagged), directory.mailbox(other)]
    assert first == [(PL, "5512-C"), None]
    assert [directory.mailbox(tagged), directory.mailbox(other)] == first  # remembered
    for n in range(Directory.MATCHES_KEPT + 1):  # more addresses than it keeps: it starts over
        directory.mailbox(addr(f"x{n}@supplier.example"))
    assert [directory.mailbox(tagged), directory.mailbox(other)] == first
    assert directory.mailbox(addr("PL-Payroll@corp.example")) == (PL, None)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("pl-payroll@corp.example", (PL, None)),
        ("PL-Payroll@CORP.Example", (PL, None)),
        ("pl-payroll+5512-C@corp.example", (PL, "5512-C")),
        ("pl-payroll+5512-c@corp.example", (PL, "5512-c")),
        ("pl-payroll+a+b@corp.example", (PL, "a+b")),
        ("pl-payroll+@corp.example", (PL, None)),
        ('"pl-payroll+5512-C"@corp.example', (PL, "5512-C")),
        ("pay@bücher.example", (IDN, None)),
        ("Pay+1-T@BÜCHER.example", (IDN, "1-T")),
        ("pl-payroll@supplier.example", None),
        ("pl-payroll-x@corp.example", None),
        ("hr+5512-C@corp.example", None),
        ("+pl-payroll@corp.example", None),
        ("postmaster@corp.example", None),
        ("<Postmaster>", None),
    ],
)
def test_mailbox(address: str, expected: tuple[MailboxInfo, str | None] | None) -> None:
    assert DIRECTORY.mailbox(addr(address)) == expected


def test_mailbox_of_an_address_with_an_invalid_domain() -> None:
    assert DIRECTORY.mailbox(Address("pl-payroll", "corp..example")) is None


def test_separator_other_than_plus() -> None:
    directory = Directory(CoreSettings(("corp.example",), separator="=", mailboxes=(PL,)))
    assert directory.mailbox(addr("pl-payroll=77-A@corp.example")) == (PL, "77-A")
    assert directory.mailbox(addr("pl-payroll+77-A@corp.example")) is None


OWN = Source("101203-T", "uk-payroll@corp.example", "envelope")


@pytest.mark.parametrize(
    ("address", "source", "expected"),
    [
        ("pl-payroll+5512-C@corp.example", OWN, RecipientClass.TAGGED_MAILBOX),
        ("uk-payroll+101203-T@corp.example", OWN, RecipientClass.TAGGED_MAILBOX),
        ("pl-payroll@corp.example", OWN, RecipientClass.UNTAGGED_MAILBOX),
        ("PL-PAYROLL@corp.example", None, RecipientClass.UNTAGGED_MAILBOX),
        ("uk-payroll@corp.example", OWN, RecipientClass.SOURCE_MAILBOX),
        ("UK-Payroll@Corp.Example", OWN, RecipientClass.SOURCE_MAILBOX),
        ("uk-payroll@corp.example", None, RecipientClass.UNTAGGED_MAILBOX),
        ("uk-payroll@corp.example", Source("1-T", None, "subject"), RecipientClass.UNTAGGED_MAILBOX),
        ("hr@corp.example", OWN, RecipientClass.INTERNAL),
        ("hr@CORP.example", None, RecipientClass.INTERNAL),
        ("hr@bücher.example", None, RecipientClass.INTERNAL),
        ("hr@xn--bcher-kva.example", None, RecipientClass.INTERNAL),
        ("<postmaster>", None, RecipientClass.INTERNAL),
        ("postmaster@corp.example", None, RecipientClass.INTERNAL),
        ("client@supplier.example", OWN, RecipientClass.EXTERNAL),
        ("hr@sub.corp.example", None, RecipientClass.EXTERNAL),
        ("hr@[192.0.2.1]", None, RecipientClass.EXTERNAL),
        # open-relay tricks: a hidden hop outside makes the address external
        ("client%supplier.example@corp.example", None, RecipientClass.EXTERNAL),
        ("supplier.example!client@corp.example", None, RecipientClass.EXTERNAL),
        ('"client@supplier.example"@corp.example', None, RecipientClass.EXTERNAL),
        ("a%corp.example%evil.example@corp.example", None, RecipientClass.EXTERNAL),
        ("hr%corp.example@corp.example", None, RecipientClass.INTERNAL),
        ("@relay.example:hr@corp.example", None, RecipientClass.INTERNAL),
    ],
)
def test_classify(address: str, source: Source | None, expected: RecipientClass) -> None:
    assert DIRECTORY.classify(addr(address), source) is expected


# --- source activity -------------------------------------------------------------


@pytest.mark.parametrize(
    ("mail_from", "lines", "expected"),
    [
        ("uk-payroll+101203-T@corp.example", ["Subject: 5512-C"], Source("101203-T", "uk-payroll@corp.example", "envelope")),
        ("UK-Payroll+101203-t@corp.example", [], Source("101203-T", "uk-payroll@corp.example", "envelope")),
        ("uk-payroll@corp.example", ["From: UK <uk-payroll+77-A@corp.example>", "X-Enate-Reference: 5512-C"],
         Source("77-A", "uk-payroll@corp.example", "from")),
        (None, ["From: client@supplier.example, pl-payroll+5-C@corp.example"], Source("5-C", "pl-payroll@corp.example", "from")),
        # a tag that is no reference is not a source
        ("uk-payroll+draft@corp.example", ["From: uk-payroll+x@corp.example", "Subject: Re: 5512-C"],
         Source("5512-C", None, "subject")),
        ("client@supplier.example", ["X-Enate-Reference: 101203-T", "Subject: 5512-C"], Source("101203-T", None, "header")),
        (None, ["X-Case: 5-C", "X-Enate-Reference: 101203-T"], Source("101203-T", None, "header")),
        (None, ["X-Case: 5-C", "X-Enate-Reference: none"], Source("5-C", None, "header")),
        (None, ["X-Enate-Reference: =?utf-8?q?101203-T?="], Source("101203-T", None, "header")),
        (None, ["Subject: Re: [101203-T] payslip"], Source("101203-T", None, "subject")),
        (None, ["Subject: =?utf-8?q?Re=3A_p=C5=82aca_=5B101203-T=5D?="], Source("101203-T", None, "subject")),
        (None, ["Subject: =?utf-8?b?UmU6IDEwMTIwMy1U?="], Source("101203-T", None, "subject")),
        (None, ["Subject: x101203-TT"], None),
        (None, ["Subject: nothing", "Subject: second 5-C"], Source("5-C", None, "subject")),
        (None, [], None),
        ("client@supplier.example", ["From: bad)<uk-payroll+1-T@corp.example>"], None),
    ],
)
def test_find_source(mail_from: str | None, lines: list[str], expected: Source | None) -> None:
    sender = addr(mail_from) if mail_from else None
    assert find_source(sender, headers(*lines), DIRECTORY) == expected


def test_subject_search_can_be_turned_off() -> None:
    directory = Directory(CoreSettings(("corp.example",), subject=False, reference_headers=()))
    assert find_source(None, headers("Subject: 101203-T", "X-Enate-Reference: 5-C"), directory) is None


def test_thread_message_ids() -> None:
    block = headers(
        "In-Reply-To: <c@x> (comment) <b@x>",
        "References: <a@x>",
        " <b@x>\t<c@x> <d@x> <>",
    )
    assert thread_message_ids(block) == ["<c@x>", "<b@x>", "<d@x>", "<a@x>"]
    assert thread_message_ids(NO_HEADERS) == []


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([], False),
        (["Auto-Submitted: no"], False),
        (["Auto-Submitted: No (a person wrote this)"], False),
        (["Auto-Submitted: auto-replied"], True),
        (["Auto-Submitted: auto-generated; owner-email=x@y"], True),
        (["Auto-Submitted: no; owner-email=x@y"], False),  # RFC 3834 5: parameters follow the keyword
        (["Auto-Submitted: auto-notified"], True),
        (["Precedence: bulk"], True),
        (["Precedence: JUNK"], True),
        (["Precedence: list"], True),
        (["Precedence: first-class"], False),
        (["Auto-Submitted: no", "Precedence: list"], True),
    ],
)
def test_is_automatic(lines: list[str], expected: bool) -> None:
    assert is_automatic(headers(*lines)) is expected


# --- plans -------------------------------------------------------------------------

MESSAGE = headers(
    "From: UK Payroll <uk-payroll@corp.example>",
    'To: "Payroll, PL" <pl-payroll@corp.example>, client@supplier.example',
    "Cc: hr@corp.example",
    "Subject: Re: [101203-T] payslip",
)


def test_the_demo_message() -> None:
    rcpts = [addr(a) for a in ("pl-payroll@corp.example", "client@supplier.example", "hr@corp.example")]
    source = find_source(addr("uk-payroll@corp.example"), MESSAGE, DIRECTORY)
    assert source == Source("101203-T", None, "subject")
    plan = make_plan(addr("uk-payroll@corp.example"), rcpts, MESSAGE, source, DIRECTORY)
    assert plan.source == Source("101203-T", "uk-payroll@corp.example", "subject")
    assert plan.source_mailbox == "uk-payroll@corp.example"
    assert [r.cls for r in plan.recipients] == [
        RecipientClass.UNTAGGED_MAILBOX, RecipientClass.EXTERNAL, RecipientClass.INTERNAL]
    assert [r.mailbox for r in plan.recipients] == [PL, None, None]
    assert plan.lookups == (LinkLookup(PL, True),)
    assert plan.explicit_links == ()
    assert plan.automatic is False

    resolution = plan.resolve({"pl-payroll@corp.example": "900001-T"})
    assert [str(t) for t in resolution.targets] == [
        "pl-payroll+900001-T@corp.example", "client@supplier.example", "hr@corp.example"]
    assert resolution.tagged == {
        "uk-payroll@corp.example": "uk-payroll+101203-T@corp.example",
        "pl-payroll@corp.example": "pl-payroll+900001-T@corp.example",
    }
    assert resolution.references == {"pl-payroll@corp.example": "900001-T", "uk-payroll@corp.example": "101203-T"}
    assert resolution.untaggable == []


def test_rewritten_header_of_the_demo_message() -> None:
    raw = (b"From: UK Payroll <uk-payroll@corp.example>\r\n"
           b"To: \"Payroll, PL\" <pl-payroll@corp.example>,\r\n client@supplier.example\r\n\r\nbody\r\n")
    block = parse_header_block(raw)
    plan = make_plan(None, [addr("pl-payroll@corp.example")], block, Source("101203-T", None, "header"), DIRECTORY)
    resolution = plan.resolve({"pl-payroll@corp.example": "900001-T"})
    assert rewrite_headers(raw, resolution.tagged) == (
        b"From: UK Payroll <uk-payroll+101203-T@corp.example>\r\n"
        b"To: \"Payroll, PL\" <pl-payroll+900001-T@corp.example>,\r\n client@supplier.example\r\n\r\nbody\r\n")


def test_no_source_changes_nothing() -> None:
    rcpts = [addr("pl-payroll@corp.example"), addr("pl-payroll@corp.example"), addr("uk-payroll@corp.example")]
    plan = make_plan(addr("uk-payroll@corp.example"), rcpts, MESSAGE, None, DIRECTORY)
    assert plan.source is None and plan.source_mailbox is None
    assert plan.lookups == () and plan.explicit_links == ()
    assert [r.cls for r in plan.recipients] == [RecipientClass.UNTAGGED_MAILBOX] * 3
    resolution = plan.resolve({"pl-payroll@corp.example": "900001-T"})
    assert resolution.targets == rcpts  # each relayed as given, the repeat too: nothing is decided
    assert resolution.tagged == {} and resolution.references == {} and resolution.untaggable == []


@pytest.mark.parametrize(
    ("source", "owner", "from_line", "own"),
    [
        (Source("1-T", "pl-payroll@corp.example", "envelope"), "uk-payroll@corp.example", "From: uk-payroll@corp.example",
         "pl-payroll@corp.example"),
        (Source("1-T", None, "subject"), "DE-HR@corp.example", "From: uk-payroll@corp.example", "de-hr@corp.example"),
        (Source("1-T", None, "subject"), "not an address", "From: uk-payroll@corp.example", "not an address"),
        (Source("1-T", None, "subject"), None, "From: uk-payroll@corp.example, pl-payroll@corp.example",
         "uk-payroll@corp.example"),
        (Source("1-T", None, "subject"), None, "From: uk-payroll+2-T@corp.example", None),
        (Source("1-T", None, "subject"), None, "From: client@supplier.example", None),
        (Source("1-T", None, "subject"), None, "X-None: x", None),
    ],
)
def test_the_source_mailbox(source: Source, owner: str | None, from_line: str, own: str | None) -> None:
    plan = make_plan(None, [], headers(from_line), source, DIRECTORY, source_owner=owner)
    assert plan.source_mailbox == own


def test_own_mailbox_is_tagged_with_the_source_reference_everywhere() -> None:
    block = headers(
        "From: uk-payroll@corp.example",
        "Reply-To: UK <UK-Payroll@corp.example>",
        "Cc: uk-payroll@corp.example",
    )
    source = Source("101203-T", "uk-payroll@corp.example", "envelope")
    plan = make_plan(addr("uk-payroll+101203-T@corp.example"), [addr("UK-Payroll@corp.example")], block, source, DIRECTORY)
    assert plan.recipients[0].cls is RecipientClass.SOURCE_MAILBOX
    assert plan.lookups == ()
    resolution = plan.resolve({})
    assert [str(t) for t in resolution.targets if t is not None] == ["UK-Payroll+101203-T@corp.example"]
    assert resolution.tagged == {"uk-payroll@corp.example": "uk-payroll+101203-T@corp.example"}
    assert resolution.references == {"uk-payroll@corp.example": "101203-T"}


def test_own_mailbox_only_in_reply_to_is_tagged() -> None:
    """An agent writing for Team A with Reply-To its mailbox: replies route back."""
    block = headers("From: Jane <jane@corp.example>", "Reply-To: Team A <uk-payroll@corp.example>",
                    "To: client@supplier.example")
    plan = make_plan(addr("jane@corp.example"), [addr("client@supplier.example")], block, OWN, DIRECTORY)
    resolution = plan.resolve({})
    assert resolution.tagged == {"uk-payroll@corp.example": "uk-payroll+101203-T@corp.example"}
    assert [str(t) for t in resolution.targets if t is not None] == ["client@supplier.example"]
    assert resolution.tagged  # the header changes though the envelope does not


def test_an_explicit_tag_is_used_for_untagged_copies_of_that_mailbox() -> None:
    """The same message names the mailbox tagged; its untagged copies get that tag."""
    block = headers("To: pl-payroll+5512-C@corp.example", "Cc: Team B <pl-payroll@corp.example>")
    rcpts = [addr("pl-payroll+5512-C@corp.example"), addr("PL-Payroll@corp.example"), addr("client@x.example")]
    plan = make_plan(None, rcpts, block, OWN, DIRECTORY)
    assert plan.lookups == ()
    resolution = plan.resolve({})
    assert resolution.tagged == {"pl-payroll@corp.example": "pl-payroll+5512-C@corp.example"}
    # Per recipient: the copy merges into the tagged spelling already sent: duplicates go once.
    assert [str(t) if t else None for t in resolution.targets] == [
        "pl-payroll+5512-C@corp.example", None, "client@x.example"]
    assert [str(t) for t in resolution.targets if t is not None] == ["pl-payroll+5512-C@corp.example", "client@x.example"]


def test_lookups_cover_envelope_and_to_cc_once_each() -> None:
    block = headers(
        "To: pl-payroll@corp.example, de-hr@corp.example",
        "Cc: PL-Payroll@corp.example, pay@bücher.example",
        "Bcc: x@corp.example",
        "Reply-To: " + LONG.address,
    )
    rcpts = [addr("pl-payroll@corp.example"), addr("client@supplier.example")]
    plan = make_plan(None, rcpts, block, Source("1-T", "uk-payroll@corp.example", "envelope"), DIRECTORY)
    assert plan.lookups == (LinkLookup(PL, True), LinkLookup(DE, False), LinkLookup(IDN, True))


def test_automatic_messages_never_create_links() -> None:
    block = headers("To: pl-payroll@corp.example", "Auto-Submitted: auto-replied")
    plan = make_plan(None, [addr("pl-payroll@corp.example")], block, OWN, DIRECTORY)
    assert plan.automatic is True
    assert plan.lookups == (LinkLookup(PL, False),)


def test_thread_mapping_replaces_lookups() -> None:
    block = headers("To: pl-payroll@corp.example, de-hr@corp.example")
    rcpts = [addr("pl-payroll@corp.example"), addr("de-hr@corp.example")]
    source = Source("101203-T", "uk-payroll@corp.example", "thread")
    thread = {"pl-payroll@corp.example": "900001-T", "uk-payroll@corp.example": "101203-T"}
    plan = make_plan(None, rcpts, block, source, DIRECTORY, thread_mapping=thread)
    assert plan.lookups == (LinkLookup(DE, False),)
    resolution = plan.resolve({"de-hr@corp.example": None})
    assert [str(t) for t in resolution.targets if t is not None] == ["pl-payroll+900001-T@corp.example", "de-hr@corp.example"]
    assert resolution.tagged == {"pl-payroll@corp.example": "pl-payroll+900001-T@corp.example"}
    assert resolution.references == {"pl-payroll@corp.example": "900001-T", "uk-payroll@corp.example": "101203-T"}


def test_explicit_tags_are_links_to_record_and_are_kept() -> None:
    block = headers("To: pl-payroll+5512-C@corp.example, de-hr+77-a@corp.example, de-hr+draft@corp.example",
                    "Cc: uk-payroll+9-T@corp.example, pl-payroll+101203-T@corp.example")
    rcpts = [addr("pl-payroll+5512-C@corp.example"), addr("PL-Payroll+5512-C@corp.example")]
    plan = make_plan(None, rcpts, block, OWN, DIRECTORY)
    assert [r.cls for r in plan.recipients] == [RecipientClass.TAGGED_MAILBOX] * 2
    assert [r.tag for r in plan.recipients] == ["5512-C", "5512-C"]
    assert plan.explicit_links == (("5512-C", PL), ("77-A", DE))
    assert plan.lookups == ()
    resolution = plan.resolve({})
    # the duplicate after rewriting (here: already identical) is sent once
    assert [str(t) for t in resolution.targets if t is not None] == ["pl-payroll+5512-C@corp.example"]
    assert resolution.tagged == {}
    assert resolution.references == {"uk-payroll@corp.example": "101203-T", "pl-payroll@corp.example": "5512-C",
                                  "de-hr@corp.example": "77-A"}
    assert resolution.targets[1] is None


def test_duplicates_after_rewriting_are_sent_once() -> None:
    rcpts = [addr(a) for a in ("pl-payroll@corp.example", "pl-payroll+900001-T@corp.example",
                               "PL-Payroll@Corp.Example", "Client@supplier.example", "client@supplier.example",
                               "Client@SUPPLIER.example")]
    plan = make_plan(None, rcpts, NO_HEADERS, OWN, DIRECTORY)
    resolution = plan.resolve({"pl-payroll@corp.example": "900001-T"})
    assert [str(t) if t else None for t in resolution.targets] == [
        "pl-payroll+900001-T@corp.example", None, None, "Client@supplier.example", "client@supplier.example", None]
    assert resolution.tagged == {}


def test_mailbox_left_untagged_by_the_store_or_by_length() -> None:
    block = headers(f"To: {LONG.address}, de-hr@corp.example")
    rcpts = [addr(LONG.address), addr("de-hr@corp.example"), addr("X" * 56 + "@corp.example")]
    plan = make_plan(None, rcpts, block, OWN, DIRECTORY)
    resolution = plan.resolve({LONG.address: "900001-T", "de-hr@corp.example": None})
    assert [str(t) for t in resolution.targets if t is not None] == [LONG.address, "de-hr@corp.example"]
    assert resolution.untaggable == [LONG.address]
    assert resolution.tagged == {}
    assert resolution.references == {"uk-payroll@corp.example": "101203-T"}
    assert resolution.targets[2] is None  # the duplicate differing only in case was dropped


def test_nothing_to_change() -> None:
    plan = make_plan(None, [addr("client@supplier.example")], headers("To: client@supplier.example"), OWN, DIRECTORY)
    resolution = plan.resolve({})
    assert resolution.targets == [addr("client@supplier.example")] and resolution.tagged == {}
    assert resolution.references == {"uk-payroll@corp.example": "101203-T"}


def test_source_with_unknown_mailbox_tags_nobody_as_source() -> None:
    plan = make_plan(None, [addr("uk-payroll@corp.example")], NO_HEADERS, Source("1-T", None, "subject"), DIRECTORY)
    assert plan.recipients[0].cls is RecipientClass.UNTAGGED_MAILBOX
    assert plan.lookups == (LinkLookup(UK, True),)
    resolution = plan.resolve({"uk-payroll@corp.example": "2-T", "other@corp.example": None})
    assert [str(t) for t in resolution.targets if t is not None] == ["uk-payroll+2-T@corp.example"]
    assert resolution.references == {"uk-payroll@corp.example": "2-T"}


def test_envelope_keeps_the_written_form_of_a_mailbox() -> None:
    plan = make_plan(None, [addr("Pay@Bücher.example")], headers("To: pay@bücher.example"), OWN, DIRECTORY)
    resolution = plan.resolve({"pay@xn--bcher-kva.example": "3-C"})
    assert [str(t) for t in resolution.targets if t is not None] == ["Pay+3-C@Bücher.example"]
    assert resolution.tagged == {"pay@xn--bcher-kva.example": "pay+3-C@xn--bcher-kva.example"}


def test_recipient_with_an_invalid_domain_is_external_and_kept() -> None:
    bad = Address("a", "corp..example")
    plan = make_plan(None, [bad, bad], NO_HEADERS, OWN, DIRECTORY)
    assert plan.recipients[0].cls is RecipientClass.EXTERNAL
    assert plan.resolve({}).targets == [bad, None]
