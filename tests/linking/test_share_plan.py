"""The pure inbound-sharing planner (smtpgate/linking/share.py)."""

import dataclasses

import pytest

from smtpgate.linking.inbound import ThreadMapping
from smtpgate.linking.plan import CoreSettings, Directory, MailboxInfo
from smtpgate.linking.share import REASONS, plan_share
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block

LONG = "a-very-long-team-mailbox-name-that-fills-almost-all-of-it-xx@corp.example"
DIRECTORY = Directory(CoreSettings(internal_domains=("corp.example",), mailboxes=(
    MailboxInfo("uk-payroll@corp.example", "A"), MailboxInfo("pl-payroll@corp.example", "B"),
    MailboxInfo("fr-payroll@corp.example", "D", new_links="never"), MailboxInfo(LONG, "L"))))
# Team A wrote from 101203-T to the client, copying Team B (tagged), Team D (no link: bare) and HR.
STEP1 = ThreadMapping(
    "<step1@corp.example>", {"uk-payroll@corp.example": "101203-T", "pl-payroll@corp.example": "900001-T"},
    "101203-T", "Team A <uk-payroll@corp.example>",
    ("client@supplier.example", "pl-payroll+900001-T@corp.example", "fr-payroll@corp.example",
     "hr@corp.example", "gone+5-T@corp.example", "not a path"))
REPLY = b"From: Client <client@supplier.example>\r\nSubject: RE: Invoice\r\n\r\n"


def share(*rcpts, mail_from="client@supplier.example", head=REPLY, thread=(STEP1,), stamped=False):
    return plan_share(parse_path(mail_from) if mail_from else None, [parse_path(r) for r in rcpts],
                      parse_header_block(head), DIRECTORY, list(thread), stamped=stamped)


def test_a_reply_to_team_a_only_adds_team_b_tagged_as_the_thread_had_it():
    p = share("uk-payroll+101203-T@corp.example")
    assert p.reason == "shared" and p.why == REASONS["shared"]
    assert [str(a) for a in p.added] == ["pl-payroll+900001-T@corp.example"]
    # The sender's untagged From: was relayed with the source's tag: that is its address.
    assert [str(a) for a in p.present] == ["uk-payroll+101203-T@corp.example"]
    assert p.mapping == (("uk-payroll@corp.example", "101203-T"), ("pl-payroll@corp.example", "900001-T"))
    assert (p.thread_message_id, p.source_reference) == ("<step1@corp.example>", "101203-T")
    assert p.log_fields() == {"in_reply_to": "<step1@corp.example>"}


def test_a_reply_to_team_b_only_adds_team_a():
    p = share("PL-Payroll@corp.example")
    assert [str(a) for a in p.added] == ["uk-payroll+101203-T@corp.example"]


@pytest.mark.parametrize("rcpts", [
    ("uk-payroll+101203-T@corp.example", "pl-payroll+900001-T@corp.example"),  # reply-all
    ("uk-payroll@corp.example", "pl-payroll@CORP.EXAMPLE"),  # both bare, any case
    ("UK-PAYROLL+101203-T@corp.example", "pl-payroll+424242-T@corp.example"),  # another tag of Team B
])
def test_a_reply_naming_every_team_mailbox_in_any_spelling_adds_nothing(rcpts):
    p = share(*rcpts)
    assert p.reason == "complete" and p.added == ()


@pytest.mark.parametrize("head, mail_from, stamped, reason", [
    (REPLY, "", False, "bounce"),
    (REPLY, "uk-payroll+101203-T@corp.example", False, "from_mailbox"),
    (REPLY + b"", "client@supplier.example", True, "stamped"),
    (b"Auto-Submitted: auto-replied (vacation)\r\n" + REPLY, "client@supplier.example", False, "automatic"),
    (b"Auto-Submitted: no\r\nPrecedence: list\r\n" + REPLY, "client@supplier.example", False, "automatic"),
])
def test_bounces_automatic_mail_mailboxes_and_stamped_mail_are_not_shared(head, mail_from, stamped, reason):
    p = share("uk-payroll@corp.example", head=head, mail_from=mail_from, stamped=stamped)
    assert (p.reason, p.added, p.thread_message_id) == (reason, (), None)


def test_auto_submitted_no_is_a_person():
    assert share("uk-payroll@corp.example", head=b"Auto-Submitted: no\r\n" + REPLY).reason == "shared"


def test_mail_outside_any_thread_is_not_shared():
    assert share("uk-payroll@corp.example", thread=()).reason == "no_thread"


def test_only_a_party_to_the_thread_message_shares():
    stranger = b"From: someone@elsewhere.example\r\n\r\n"
    p = share("uk-payroll@corp.example", mail_from="someone@elsewhere.example", head=stranger)
    assert (p.reason, p.added, p.thread_message_id) == ("not_a_party", (), "<step1@corp.example>")
    # The envelope sender alone, or From: alone, is enough (any case); so is being the thread's sender.
    assert share("uk-payroll@corp.example", mail_from="CLIENT@supplier.example", head=stranger).added
    assert share("uk-payroll@corp.example", mail_from="bounce-123@lists.example").added
    sent_by_client = ThreadMapping("<in@x>", {}, "101203-T", "client@supplier.example",
                                   ("uk-payroll+101203-T@corp.example", "pl-payroll+900001-T@corp.example"))
    p = share("uk-payroll@corp.example", thread=(sent_by_client,))
    assert [str(a) for a in p.added] == ["pl-payroll+900001-T@corp.example"]


def test_only_the_newest_thread_message_counts():
    older = ThreadMapping("<old@x>", {}, "101203-T", None, ("client@supplier.example", "fr-payroll+77-T@corp.example"))
    p = share("uk-payroll@corp.example", thread=(STEP1, older))
    assert [str(a) for a in p.added] == ["pl-payroll+900001-T@corp.example"]


def test_untagged_mailboxes_gone_mailboxes_and_duplicates_are_never_added():
    # A thread message whose From: was a mailbox with no tag known, a tagged From: and a recipient
    # named twice in two spellings; a mailbox whose tagged form never fit.
    message = ThreadMapping(
        "<m@x>", {LONG: "900000-T"}, "5-T", f"de-payroll@corp.example, pl-payroll+7-T@corp.example, {LONG}",
        ("client@supplier.example", "pl-payroll+7-T@corp.example", "PL-PAYROLL+7-T@corp.example",
         "uk-payroll@corp.example"))
    p = share("client2@corp.example", thread=(message,))
    assert [str(a) for a in p.added] == ["pl-payroll+7-T@corp.example"]
    assert p.mapping == (("pl-payroll@corp.example", "7-T"),)


def test_a_tag_the_pattern_no_longer_reads_is_kept_as_it_was():
    message = ThreadMapping("<m@x>", {}, "5-T", "client@supplier.example", ("pl-payroll+OLD.7@corp.example",))
    p = share("uk-payroll@corp.example", thread=(message,))
    assert [str(a) for a in p.added] == ["pl-payroll+OLD.7@corp.example"]
    assert p.mapping == (("pl-payroll@corp.example", "OLD.7"),)


def test_a_thread_message_with_no_from_is_judged_by_its_recipients():
    message = ThreadMapping("<m@x>", {}, "5-T", None, ("client@supplier.example", "pl-payroll+7-T@corp.example"))
    assert [str(a) for a in share("uk-payroll@corp.example", thread=(message,)).added] == [
        "pl-payroll+7-T@corp.example"]


def test_the_source_activitys_mailbox_counts_as_relayed_from():
    # Team B's agent wrote from the bare pl-payroll with Team A's reference in the subject: the
    # thread message was relayed from Team A's activity, so Team A hears the answer too.
    by_b = ThreadMapping("<b@x>", {"pl-payroll@corp.example": "900001-T", "uk-payroll@corp.example": "101203-T"},
                         "101203-T", "Payroll PL <pl-payroll@corp.example>", ("client@supplier.example",),
                         source_mailbox="uk-payroll@corp.example")
    p = share("pl-payroll+900001-T@corp.example", thread=(by_b,))
    assert [str(a) for a in p.added] == ["uk-payroll+101203-T@corp.example"]
    assert [str(a) for a in p.present] == ["pl-payroll+900001-T@corp.example"]
    # A source the message named already (its From:) is one candidate, not two.
    step1 = dataclasses.replace(STEP1, source_mailbox="UK-Payroll@corp.example")
    assert [str(a) for a in share("client2@corp.example", thread=(step1,)).added] == [
        "uk-payroll+101203-T@corp.example", "pl-payroll+900001-T@corp.example"]


def test_a_new_links_never_source_is_added_only_when_the_message_named_it():
    def thread(recipients, owner="fr-payroll@corp.example", reference="5-T"):
        return (ThreadMapping("<m@x>", {}, reference, "client@supplier.example", recipients,
                              source_mailbox=owner),)
    assert share("uk-payroll@corp.example", thread=thread(("pl-payroll+7-T@corp.example",))).added == (
        parse_path("pl-payroll+7-T@corp.example"),)
    named = share("uk-payroll@corp.example", thread=thread(("pl-payroll+7-T@corp.example", "FR-payroll@corp.example")))
    assert [str(a) for a in named.added] == ["pl-payroll+7-T@corp.example", "fr-payroll+5-T@corp.example"]
    # An owner that is unknown, not configured, tagged or untaggable adds nothing.
    for owner, reference in ((None, "5-T"), ("de-payroll@corp.example", "5-T"), ("pl-payroll+1-T@corp.example", "5-T"),
                             (LONG, "900000-T"), ("pl-payroll@corp.example", None)):
        p = share("uk-payroll@corp.example", thread=thread(("client2@supplier.example",), owner, reference))
        assert p.added == (), owner
