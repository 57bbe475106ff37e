"""The processing stamp and the tenant guard as plain functions (smtpgate.mail.stamp,
smtpgate.mail.required_headers): no socket."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.required_headers import required_header_problem
from smtpgate.mail.rewrite import HeaderEdit, apply_edits
from smtpgate.mail.stamp import MAX_VALUE_OCTETS, Stamper, make_stamp, verify_stamp

SECRET = b"0123456789abcdef-shared-by-every-node"
MSGID = "<m1@corp.example>"


def _message(*fields: str, body: str = "body\r\n") -> bytes:
    return ("".join(f + "\r\n" for f in fields) + "\r\n" + body).encode()


def test_the_stamp_is_the_versioned_hmac_of_the_message_id():
    # Computed here from the definition (docs/connectors.md), not copied from a run.
    digest = hmac.new(SECRET, b"smtpgate-stamp/v1\0" + MSGID.encode(), hashlib.sha256).digest()
    assert make_stamp(SECRET, MSGID) == "v1:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert verify_stamp(SECRET, MSGID, make_stamp(SECRET, MSGID))


@pytest.mark.parametrize("secret, message_id", [(b"another secret, just as long", MSGID),
                                                (SECRET, "<m2@corp.example>")])
def test_another_secret_or_message_id_does_not_verify(secret, message_id):
    assert not verify_stamp(secret, message_id, make_stamp(SECRET, MSGID))


def test_no_message_id_or_another_version_does_not_verify():
    good = make_stamp(SECRET, MSGID)
    assert not verify_stamp(SECRET, None, good)
    assert not verify_stamp(SECRET, MSGID, "v2" + good[2:])


def test_check_valid_none_and_the_field_added():
    stamper = Stamper(secret=SECRET)
    field = stamper.field(MSGID).decode()
    assert field.startswith("X-Smtpgate-Processed: v1:") and field.endswith("\r\n")
    assert stamper.value(MSGID) == b" " + field.split(": ", 1)[1].rstrip().encode()
    raw = _message(f"Message-ID: {MSGID}", field.rstrip("\r\n"), "Subject: s")
    check = stamper.check(parse_header_block(raw))
    assert check.valid and check.removals == ()
    assert stamper.check(parse_header_block(_message(f"Message-ID: {MSGID}"))).status == "none"


def test_a_custom_header_name_is_matched_without_regard_to_case():
    stamper = Stamper(header="X-Corp-Filtered", secret=SECRET)
    raw = _message(f"Message-ID: {MSGID}", f"x-corp-filtered: {make_stamp(SECRET, MSGID)}")
    assert stamper.check(parse_header_block(raw)).valid


@pytest.mark.parametrize("fields, reason", [
    (["Message-ID: <m2@corp.example>", "X-Smtpgate-Processed: {stamp}"], "does not verify"),
    (["Message-ID: {msgid}", "X-Smtpgate-Processed: {stamp}", "X-Smtpgate-Processed: {stamp}"], "2 X-Smtpgate"),
    (["Message-ID: {msgid}", "X-Smtpgate-Processed: v1:" + "A" * MAX_VALUE_OCTETS], "characters"),
    (["Message-ID: {msgid}", "X-Smtpgate-Processed: v1:not-base64!"], "not a v1 stamp"),
    (["Message-ID: {msgid}", "X-Smtpgate-Processed: "], "not a v1 stamp"),
    (["X-Smtpgate-Processed: {stamp}"], "without Message-ID"),
])
def test_bad_stamps_are_invalid_and_every_stamp_field_is_removed(fields, reason):
    stamp = make_stamp(SECRET, MSGID)
    raw = _message(*(f.format(stamp=stamp, msgid=MSGID) for f in fields), "Subject: kept")
    block = parse_header_block(raw)
    check = Stamper(secret=SECRET).check(block)
    assert check.status == "invalid" and reason in check.reason
    cleaned = apply_edits(raw, block, check.removals)
    assert b"X-Smtpgate-Processed" not in cleaned
    # Every other byte stays: only the stamp lines left.
    kept = b"".join(line for line in raw.splitlines(keepends=True) if not line.startswith(b"X-Smtpgate"))
    assert cleaned == kept


def test_a_removal_edit_takes_out_a_folded_field_whole():
    raw = _message("A: 1", "X-Gone: first\r\n\tsecond", "B: 2")
    block = parse_header_block(raw)
    field = block.fields[1]
    assert apply_edits(raw, block, [HeaderEdit("X-Gone", 1, field.raw_value, None)]) == _message("A: 1", "B: 2")


GUARD = {"X-MS-Exchange-CrossTenant-Id": ("6f1c7c4e-1d2b-4c5e-9a3f-2b7c1d0e9a11",)}


@pytest.mark.parametrize("fields, problem", [
    ([], "missing"),
    (["X-MS-Exchange-CrossTenant-Id: 00000000-0000-0000-0000-000000000000"], "not an accepted value"),
    (["X-MS-Exchange-CrossTenant-Id: 6f1c7c4e-1d2b-4c5e-9a3f-2b7c1d0e9a11",
      "X-MS-Exchange-CrossTenant-Id: 00000000-0000-0000-0000-000000000000"], "present 2 times with different"),
])
def test_the_tenant_guard_refuses(fields, problem):
    block = parse_header_block(_message("Subject: s", *fields))
    assert problem in required_header_problem(block, GUARD)


@pytest.mark.parametrize("fields", [
    ["X-MS-Exchange-CrossTenant-Id: 6f1c7c4e-1d2b-4c5e-9a3f-2b7c1d0e9a11"],
    ["x-ms-exchange-crosstenant-id:  6F1C7C4E-1D2B-4C5E-9A3F-2B7C1D0E9A11 "],
    ["X-MS-Exchange-CrossTenant-Id: 6f1c7c4e-1d2b-4c5e-9a3f-2b7c1d0e9a11"] * 2,
])
def test_the_tenant_guard_accepts(fields):
    assert required_header_problem(parse_header_block(_message(*fields)), GUARD) is None
