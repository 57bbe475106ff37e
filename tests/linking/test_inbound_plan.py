"""The pure inbound planner (smtpgate/linking/inbound.py)."""

from smtpgate.linking.inbound import ThreadMapping, plan_inbound, tags_to_check
from smtpgate.linking.plan import CoreSettings, Directory, MailboxInfo
from smtpgate.mail.addresses import parse_path

LONG = "a-very-long-team-mailbox-name-that-fills-almost-all-of-it@corp.example"
DIRECTORY = Directory(CoreSettings(internal_domains=("corp.example",), mailboxes=(
    MailboxInfo("pl-payroll@corp.example", "B"), MailboxInfo(LONG, "L"))))
THREAD = [ThreadMapping("<new@x>", {"pl-payroll@corp.example": "9-T"}),
          ThreadMapping("<old@x>", {"pl-payroll@corp.example": "8-T", LONG: "900000-T"})]


def plan(*rcpts, owners=None, policy="pass", mail_from="c@supplier.example"):
    return plan_inbound(parse_path(mail_from), [parse_path(r) for r in rcpts], DIRECTORY, THREAD,
                        owners or {}, policy)


def test_the_newest_message_of_the_thread_wins_and_other_addresses_pass():
    p = plan("PL-Payroll@corp.example", "hr@corp.example", "x@supplier.example")
    assert [str(t) for t in p.targets] == ["PL-Payroll+9-T@corp.example", "hr@corp.example", "x@supplier.example"]
    assert p.retagged[0][2] == "<new@x>" and p.unknown == ()


def test_a_tag_that_does_not_fit_stays_off_and_copies_merge():
    p = plan(LONG, "pl-payroll@corp.example", "pl-payroll+9-T@corp.example")
    assert [str(t) if t else None for t in p.targets] == [LONG, "pl-payroll+9-T@corp.example", None]


def test_known_tags_from_the_store_or_the_thread_and_unknown_ones():
    assert tags_to_check([parse_path("pl-payroll+7-T@corp.example"), parse_path("hr@corp.example")],
                         DIRECTORY) == ["7-T"]
    owned = plan("pl-payroll+7-T@corp.example", owners={"7-T": "pl-payroll@corp.example"}, policy="strip")
    assert owned.unknown == () and str(owned.targets[0]) == "pl-payroll+7-T@corp.example"
    in_thread = plan("pl-payroll+8-T@corp.example", policy="strip")
    assert in_thread.unknown == ()
    for tag in ("7-T", "not-a-reference"):
        stripped = plan(f"pl-payroll+{tag}@corp.example", policy="strip")
        assert [str(t) for t in stripped.targets] == ["pl-payroll@corp.example"]
        assert stripped.unknown == ((parse_path(f"pl-payroll+{tag}@corp.example"), tag, "strip"),)


def test_mail_from_a_mailbox_is_left_alone():
    p = plan("pl-payroll@corp.example", mail_from="pl-payroll+9-T@corp.example")
    assert p.from_mailbox and [str(t) for t in p.targets] == ["pl-payroll@corp.example"]


def test_pass_keeps_an_unknown_tag():
    kept = plan("pl-payroll+7-T@corp.example")
    assert [str(t) for t in kept.targets] == ["pl-payroll+7-T@corp.example"]
    assert kept.unknown[0][2] == "pass"
