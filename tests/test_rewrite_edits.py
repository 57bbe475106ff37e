"""apply_edits refuses an edit that does not fit the message instead of splicing it somewhere else."""

from __future__ import annotations

import pytest

from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.rewrite import HeaderEdit, apply_edits, header_edits

RAW = b"From: a@corp.example\r\nCc: Team B <pl-payroll@corp.example>\r\n\r\nbody\r\n"


def test_edits_apply_to_the_message_they_were_made_for():
    block = parse_header_block(RAW)
    edits = header_edits(block, {"pl-payroll@corp.example": "pl-payroll+900000-T@corp.example"})
    assert apply_edits(RAW, block, edits) == RAW.replace(b"pl-payroll@", b"pl-payroll+900000-T@")


def test_edit_of_a_changed_field_is_refused():
    block = parse_header_block(RAW)
    edit = HeaderEdit("Cc", 1, b" someone-else@corp.example\r\n", b" x@corp.example\r\n")
    with pytest.raises(ValueError, match="header edit for Cc #1 does not match the message"):
        apply_edits(RAW, block, [edit])


def test_edit_of_a_missing_field_is_refused():
    block = parse_header_block(RAW)
    edit = HeaderEdit("Reply-To", 1, b" a@corp.example\r\n", b" b@corp.example\r\n")
    with pytest.raises(ValueError, match="header edit for reply-to #1: no such field"):
        apply_edits(RAW, block, [edit])
