"""The one rule for separators and configured mailbox addresses (config and Directory share it)."""

from __future__ import annotations

import pytest

from smtpgate.mail.addresses import SEPARATORS, AddressError, check_separator, parse_mailbox


@pytest.mark.parametrize("separator", list(SEPARATORS))
def test_every_listed_separator_is_accepted(separator: str) -> None:
    assert check_separator(separator) == separator


@pytest.mark.parametrize("separator", ["", "++", "a", "7", "@", ".", " ", '"', "\t", "é"])
def test_other_separators_are_refused(separator: str) -> None:
    with pytest.raises(AddressError, match="expected one of the characters"):
        check_separator(separator)


def test_a_mailbox_is_untagged_with_a_domain() -> None:
    assert parse_mailbox("UK-Payroll@Corp.Example", "+").canonical == "uk-payroll@corp.example"
    with pytest.raises(AddressError, match="untagged"):
        parse_mailbox("uk-payroll+1-T@corp.example", "+")
    with pytest.raises(AddressError, match="untagged"):
        parse_mailbox("uk-payroll@corp.example", "-")
    with pytest.raises(AddressError, match="null path"):
        parse_mailbox("<>", "+")
    with pytest.raises(AddressError, match="needs a domain"):
        parse_mailbox("postmaster", "+")
    with pytest.raises(AddressError):
        parse_mailbox("not an address", "+")
