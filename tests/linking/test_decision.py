"""LinkDecision's pure operations: what a front end applies (docs/architecture.md, "The seam")."""

from smtpgate.linking.decision import HeaderRewrite, LinkDecision, RecipientDecision, SourceLinks
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block

RAW = b"To: client@supplier.example\r\nCc: B <pl-payroll@corp.example>\r\n\r\nbody\r\n"
PL, TAGGED, CLIENT = (parse_path(a) for a in ("pl-payroll@corp.example", "pl-payroll+9-T@corp.example",
                                              "client@supplier.example"))


def decision() -> LinkDecision:
    headers = parse_header_block(RAW)
    mapping = {"pl-payroll@corp.example": "pl-payroll+9-T@corp.example"}
    return LinkDecision(
        message_id="<m@x>", headers=headers, message_id_added=True,
        recipients=(RecipientDecision(CLIENT, CLIENT), RecipientDecision(PL, TAGGED),
                    RecipientDecision(PL, None)),
        source=SourceLinks("1-T", "envelope"), rewrite=HeaderRewrite.of(headers, mapping),
    )


def test_targets_leave_out_merged_recipients_and_apply_splices_the_rewrite():
    d = decision()
    assert d.targets() == [CLIENT, TAGGED]
    assert d.apply(RAW) == RAW.replace(b"<pl-payroll@", b"<pl-payroll+9-T@")


def test_without_changes_relays_as_received():
    d = decision().without_changes()
    assert d.targets() == [CLIENT, PL, PL] and d.rewrite == HeaderRewrite()
    assert d.apply(RAW) == RAW and not d.message_id_added


def test_without_tag_drops_it_from_envelope_and_header_only_for_that_recipient():
    d = decision().without_tag(PL)
    assert d.targets() == [CLIENT, PL, PL]
    assert d.rewrite.tagged == {} and d.apply(RAW) == RAW
    same = decision().without_tag(CLIENT)  # untagged already: nothing else changes
    assert same.rewrite == decision().rewrite
    assert same.apply(RAW) == decision().apply(RAW)


def test_without_tag_of_a_merged_recipient_keeps_the_header():
    d = decision()
    merged = LinkDecision(message_id=d.message_id, headers=d.headers, recipients=(RecipientDecision(PL, None),),
                          rewrite=d.rewrite)
    assert merged.without_tag(PL).rewrite == d.rewrite


def test_without_tag_claims_no_reused_link_it_no_longer_carries():
    pl2, tagged2 = parse_path("PL-Payroll@corp.example"), parse_path("PL-Payroll+9-T@corp.example")
    d = LinkDecision(
        message_id="<m@x>", headers=parse_header_block(RAW),
        recipients=(RecipientDecision(CLIENT, CLIENT),
                    RecipientDecision(PL, TAGGED, mailbox="pl-payroll@corp.example"),
                    RecipientDecision(pl2, tagged2, mailbox="pl-payroll@corp.example")),
        source=SourceLinks("1-T", "envelope", references={"pl-payroll@corp.example": "9-T", "hr@corp.example": "5-C"},
                           reused=("9-T", "5-C")))
    # Another spelling still goes out tagged with 9-T: still reused. Once it too is untagged: not.
    assert d.without_tag(PL).source.reused == ("9-T", "5-C")
    assert d.without_tag(PL).without_tag(pl2).source.reused == ("5-C",)
    assert d.without_tag(CLIENT).source.reused == ("9-T", "5-C")


def test_a_decision_without_a_source_untagged_stays_without_one():
    d = LinkDecision.unchanged("<m@x>", parse_header_block(RAW), [CLIENT, PL])
    assert d.observed and d.targets() == [CLIENT, PL] and d.without_tag(PL).source is None


def test_an_envelope_lists_its_addresses():
    from smtpgate.linking.decision import Envelope, EnvelopeRecipient

    envelope = Envelope(None, (EnvelopeRecipient(PL, ("NOTIFY=NEVER",)), EnvelopeRecipient(CLIENT)))
    assert envelope.addresses == [PL, CLIENT]


def test_inbound_sharing_adds_to_the_envelope_only_and_observe_mode_adds_nothing():
    from smtpgate.linking.share import SharePlan

    headers = parse_header_block(RAW)
    plan = SharePlan("shared", "<step1@x>", "1-T", added=(TAGGED,))
    d = LinkDecision(message_id="<r@x>", headers=headers, recipients=(RecipientDecision(CLIENT, CLIENT),),
                     share=plan, added=plan.added)
    assert d.added == (TAGGED,) and d.targets() == [CLIENT] and d.apply(RAW) == RAW
    assert d.observation()["would_share"] == [str(TAGGED)]
    assert d.observation()["in_reply_to"] == "<step1@x>"
    observed = d.without_changes()
    assert observed.added == () and observed.share == plan
    assert "would_share" not in observed.observation()
