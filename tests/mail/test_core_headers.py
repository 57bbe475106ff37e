"""Locating header fields without changing them."""

from __future__ import annotations

import pytest

from smtpgate.mail.headers import decode_text, parse_header_block

RAW = (
    b"Received: from a\r\n\tby b\r\n"
    b"From: =?utf-8?q?Smith=2C_J?= <a@b>\r\n"
    b"To: x@y,\r\n z@w\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= 101203-T\r\n"
    b"X-Empty:\r\n"
    b"X-Bytes: \xc3\xa9 \xff\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_fields_and_offsets() -> None:
    block = parse_header_block(RAW)
    assert [f.name for f in block.fields] == ["Received", "From", "To", "Subject", "X-Empty", "X-Bytes"]
    assert b"".join(f.raw for f in block.fields) + b"\r\n" == RAW[: block.header_end]
    assert RAW[block.header_end :] == b"body\r\n"
    for field in block.fields:
        assert RAW[field.start : field.end] == field.raw
        assert RAW[field.start : field.value_start].rstrip(b" \t:").decode() == field.name


def test_values_are_unfolded_but_not_decoded() -> None:
    block = parse_header_block(RAW)
    assert block.get_all("to") == ["x@y, z@w"]
    assert block.get("FROM") == "=?utf-8?q?Smith=2C_J?= <a@b>"
    assert block.get("Received") == "from a\tby b"
    assert block.get("X-Empty") == ""
    assert block.get("X-Bytes") == "é \ufffd"
    assert block.get("Missing") is None
    assert block.get_all("Missing") == []


def test_get_all_gives_a_new_list_each_time() -> None:
    block = parse_header_block(RAW)
    block.get_all("To").append("extra@example.org")
    block.get_all("Missing").append("extra@example.org")
    assert block.get_all("To") == ["x@y, z@w"]
    assert block.get_all("Missing") == []
    assert [f.value for f in block.fields] == [block.get(f.name) for f in block.fields]


def test_get_text_decodes_rfc_2047() -> None:
    block = parse_header_block(RAW)
    assert block.get_text("Subject") == "café 101203-T"
    assert block.get_text("From") == "Smith, J <a@b>"
    assert block.get_text("Missing") is None


def test_decode_text_keeps_what_does_not_decode() -> None:
    assert decode_text("=?x-unknown?q?abc?=") == "=?x-unknown?q?abc?="
    assert decode_text("plain") == "plain"


@pytest.mark.parametrize(("value", "expected"), [
    # One undecodable word sends the value word by word: the others still decode, and adjacent
    # words of one charset are joined first (here "é" is split across two of them).
    ("=?x-unknown?q?abc?= =?utf-8?q?caf=C3?= =?utf-8?q?=A9_101203-T?=", "=?x-unknown?q?abc?= café 101203-T"),
    # Joined with the word just before, not with an earlier one of the same charset.
    ("=?utf-8?q?a?= =?x-unknown?q?b?= =?utf-8?q?caf=C3?= =?utf-8?q?=A9?=", "a =?x-unknown?q?b?= café"),
    # RFC 2047 6.2: no space between two decoded words, even of different charsets.
    ("=?utf-8?q?a?= =?iso-8859-1?q?b?= =?x-unknown?q?c?=", "ab =?x-unknown?q?c?="),
    # Bytes the declared charset does not have are replaced; the plain text around stays.
    ("Re: =?us-ascii?q?caf=E9?= 5512-C", "Re: caf\ufffd 5512-C"),
    # RFC 2231 section 5: a language after the charset.
    ("=?utf-8*en?q?caf=C3=A9?=", "café"),
])
def test_decode_text_word_by_word(value: str, expected: str) -> None:
    assert decode_text(value) == expected


def test_lf_only_lines_are_located_too() -> None:
    block = parse_header_block(b"To: a@b\n c@d\nSubject: s\n\nbody")
    assert block.get_all("To") == ["a@b c@d"]
    assert block.header_end == len(b"To: a@b\n c@d\nSubject: s\n\n")


def test_decode_text_decodes_what_it_can_word_by_word():
    assert decode_text("Réclamation =?utf-8?q?=5B101203-T=5D?=") == "Réclamation [101203-T]"
    assert decode_text("=?utf-8?q?M=E4rz_=5B1-T=5D?=") == "M\ufffdrz [1-T]"
    assert decode_text("=?utf-8*en?q?=5B1-T=5D?=") == "[1-T]"
    # A character split over two words, another charset after it, a word kept as it is.
    assert decode_text("é =?utf-8?q?R=C3?= =?utf-8?q?=A9f?= =?iso-8859-1?q?_=E9?=") == "é Réf é"
    assert decode_text("é =?utf-8?q?a?= =?x-unknown?q?b?= =?utf-8?q?c?= d") == "é a =?x-unknown?q?b?= c d"
    assert decode_text("=?x-unknown?q?abc?=") == "=?x-unknown?q?abc?="
