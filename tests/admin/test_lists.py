"""The activities list's parameters, cursor and JSON (smtpgate/admin/lists.py):
the cursor's exact form and bounds, the bounds of `q`, and what a row shows."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest
from multidict import MultiDict

from smtpgate.admin.lists import MAX_Q, BadQuery, decode_cursor, encode_cursor, parse_list_query, row_object
from smtpgate.store.base import ListedActivity

AT = datetime(2026, 1, 15, 9, 30, 5, tzinfo=timezone.utc)


def cursor_of(value: object) -> str:
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def test_a_cursor_is_compact_unpadded_base64url_json_of_the_position():
    text = encode_cursor((AT, "1-Ż"))
    assert text == "WyIyMDI2LTAxLTE1VDA5OjMwOjA1KzAwOjAwIiwiMS3FuyJd"
    assert base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)) == '["2026-01-15T09:30:05+00:00","1-Ż"]'.encode()
    assert not encode_cursor((AT, "1-T")).endswith("=")  # 35 bytes: would be padded


@pytest.mark.parametrize("reference", ["1-T", "12-T", "123-T", "x" * 200])
def test_every_cursor_given_is_read_back(reference):
    assert decode_cursor(encode_cursor((AT, reference))) == (AT, reference)


def test_a_cursor_of_400_characters_is_read_and_a_longer_one_refused():
    reference = "Ż" * 134  # 300 bytes of JSON: 400 characters of base64
    text = encode_cursor((AT, reference))
    assert len(text) == 400
    assert decode_cursor(text) == (AT, reference)
    with pytest.raises(BadQuery, match="^after: not a cursor this server gave"):
        decode_cursor(encode_cursor((AT, reference + "xx")))


def test_a_text_over_400_characters_is_refused_even_when_base64_would_read_it():
    text = encode_cursor((AT, "Ż" * 134))  # 400 characters
    for longer in (text + "=", text + "."):  # surplus padding and a character outside the alphabet
        assert len(longer) == 401
        assert base64.urlsafe_b64decode(longer + "===") == base64.urlsafe_b64decode(text)
        with pytest.raises(BadQuery, match="^after: not a cursor this server gave"):
            decode_cursor(longer)


@pytest.mark.parametrize("value", [
    ["2026-01-15T09:30:05", "1-T"],  # no time zone
    ["2026-01-15T09:30:05+00:00", ""],
    ["2026-01-15T09:30:05+00:00", 5],
    ["2026-01-15T09:30:05+00:00", "x" * 201],
])
def test_a_cursor_this_server_would_not_give_is_refused(value):
    with pytest.raises(BadQuery, match="^after: not a cursor this server gave"):
        decode_cursor(cursor_of(value))


def test_q_may_be_max_q_characters_long_but_hold_no_nul():
    assert parse_list_query(MultiDict(q="x" * MAX_Q), None).q == "x" * MAX_Q
    with pytest.raises(BadQuery, match=f"^q: at most {MAX_Q} characters"):
        parse_list_query(MultiDict(q="x" * (MAX_Q + 1)), None)
    with pytest.raises(BadQuery, match="^q: a NUL character is not text$"):
        parse_list_query(MultiDict(q="a\x00b"), None)


def test_a_row_seen_in_full_gives_its_last_message_time_or_none():
    teams = {"uk@corp.example": "UK payroll"}
    row = ListedActivity(reference="1-T", mailbox="uk@corp.example", created_at=AT, links=[], full=True,
                         last_message_at=AT, last_subject="Payroll")
    shown = row_object(row, teams)
    assert (shown["team"], shown["last_message_at"], shown["last_subject"]) == (
        "UK payroll", "2026-01-15T09:30:05Z", "Payroll")
    empty = row_object(ListedActivity(reference="2-T", mailbox=None, created_at=AT, links=[], full=True), teams)
    assert "last_message_at" in empty and empty["last_message_at"] is None and empty["team"] is None
    assert "last_message_at" not in row_object(ListedActivity(reference="3-T", mailbox=None, created_at=AT,
                                                              links=[], full=False), teams)


@pytest.mark.parametrize("text", ["1", "200", " 200 ", "050"])
def test_limit_is_accepted_from_1_to_200(text):
    assert parse_list_query(MultiDict(limit=text), None).limit == int(text)


@pytest.mark.parametrize("text", ["0", "201", "0200", "0001", "2OO", "+20", "２００"])
def test_limit_is_refused_outside_1_to_200_and_beyond_three_digits(text):
    with pytest.raises(BadQuery, match="^limit: a whole number from 1 to 200$"):
        parse_list_query(MultiDict(limit=text), None)
