"""What both front ends do around the decision (smtpgate/frontends/policy.py): the way each
recipient goes out, which the SMTP replay and the milter's DELRCPT/ADDRCPT both follow."""

from smtpgate.frontends.policy import envelope_plan
from smtpgate.linking.decision import LinkDecision, RecipientDecision
from smtpgate.mail.addresses import parse_path
from smtpgate.mail.headers import parse_header_block

PL, TAGGED, CLIENT = (parse_path(a) for a in ("pl-payroll@corp.example", "pl-payroll+9-T@corp.example",
                                              "client@supplier.example"))


def decided(*recipients: RecipientDecision) -> LinkDecision:
    return LinkDecision(message_id="<m@x>", headers=parse_header_block(b"\r\n"), recipients=recipients)


def test_each_recipient_goes_as_decided_and_a_merged_one_not_at_all():
    plan = envelope_plan(decided(RecipientDecision(CLIENT, CLIENT), RecipientDecision(PL, TAGGED),
                                 RecipientDecision(parse_path("PL-Payroll@corp.example"), None)))
    assert plan == [CLIENT, TAGGED, None]


def test_a_rewritten_recipient_that_another_already_is_goes_once():
    # The client named the tagged address too: it stays; the rewritten one is sent once, as it.
    plan = envelope_plan(decided(RecipientDecision(PL, TAGGED), RecipientDecision(TAGGED, TAGGED)))
    assert plan == [None, TAGGED]
    twice = envelope_plan(decided(RecipientDecision(PL, TAGGED), RecipientDecision(PL, TAGGED)))
    assert twice == [TAGGED, None]


def test_recipients_left_as_given_all_go_as_given():
    same = parse_path("client@SUPPLIER.example")  # one envelope address with CLIENT, as given twice
    assert envelope_plan(decided(RecipientDecision(CLIENT, CLIENT), RecipientDecision(same, same))) == [CLIENT, same]
    assert envelope_plan(LinkDecision.unchanged("<m@x>", parse_header_block(b"\r\n"), [PL, PL])) == [PL, PL]
