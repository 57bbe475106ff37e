"""Byte-preserving header rewriting: only the addr-spec of a rewritten address changes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgate.mail.headers import count_received, parse_header_block
from smtpgate.mail.rewrite import rewrite_headers

PL = {"pl-payroll@corp.example": "pl-payroll+900001-T@corp.example"}
BODY = b"\r\nTo: pl-payroll@corp.example\r\nFrom: pl-payroll@corp.example\r\n"


def message(*lines: str) -> bytes:
    return "".join(f"{line}\r\n" for line in lines).encode("utf-8") + BODY


# header lines before, header lines expected after (rewriting with PL)
CASES = [
    (["To: pl-payroll@corp.example"], ["To: pl-payroll+900001-T@corp.example"]),
    (["To: PL-Payroll@CORP.example"], ["To: pl-payroll+900001-T@corp.example"]),
    (["TO: <pl-payroll@corp.example>"], ["TO: <pl-payroll+900001-T@corp.example>"]),
    (["To:pl-payroll@corp.example"], ["To:pl-payroll+900001-T@corp.example"]),
    (["To :pl-payroll@corp.example"], ["To :pl-payroll+900001-T@corp.example"]),
    (['Cc: "Payroll, Poland" <pl-payroll@corp.example>'], ['Cc: "Payroll, Poland" <pl-payroll+900001-T@corp.example>']),
    (
        ["To: =?utf-8?q?Payroll=2C_PL_=3Cpl-payroll=40corp=2Eexample=3E?= <pl-payroll@corp.example>"],
        ["To: =?utf-8?q?Payroll=2C_PL_=3Cpl-payroll=40corp=2Eexample=3E?= <pl-payroll+900001-T@corp.example>"],
    ),
    (
        ["To: =?utf-8?q?Evil=0D=0ACc=3A_pl-payroll=40corp=2Eexample?= <client@supplier.example>"],
        ["To: =?utf-8?q?Evil=0D=0ACc=3A_pl-payroll=40corp=2Eexample?= <client@supplier.example>"],
    ),
    (
        ["To: =?utf-8?b?UGF5cm9sbCwgUEw=?= <pl-payroll@corp.example>"],
        ["To: =?utf-8?b?UGF5cm9sbCwgUEw=?= <pl-payroll+900001-T@corp.example>"],
    ),
    (["To: Zoë Płatności <pl-payroll@corp.example>"], ["To: Zoë Płatności <pl-payroll+900001-T@corp.example>"]),
    (["To: pl-payroll@corp.example (pl-payroll@corp.example)"], ["To: pl-payroll+900001-T@corp.example (pl-payroll@corp.example)"]),
    (["To: (c) <(d)pl-payroll@corp.example(e)>"], ["To: (c) <(d)pl-payroll+900001-T@corp.example(e)>"]),
    (["To: undisclosed-recipients:;"], ["To: undisclosed-recipients:;"]),
    (
        ["To: team: a@x.example, pl-payroll@corp.example;, b@y.example"],
        ["To: team: a@x.example, pl-payroll+900001-T@corp.example;, b@y.example"],
    ),
    (
        ["To: client@supplier.example,", "\tPayroll", " <pl-payroll@corp.example>,", "  other@supplier.example"],
        ["To: client@supplier.example,", "\tPayroll", " <pl-payroll+900001-T@corp.example>,", "  other@supplier.example"],
    ),
    (
        ["To: a@x.example", "Subject: pl-payroll@corp.example", "To: pl-payroll@corp.example"],
        ["To: a@x.example", "Subject: pl-payroll@corp.example", "To: pl-payroll+900001-T@corp.example"],
    ),
    (
        ["From: pl-payroll@corp.example", "Reply-To: pl-payroll@corp.example", "Sender: pl-payroll@corp.example",
         "Bcc: pl-payroll@corp.example", "Resent-To: pl-payroll@corp.example"],
        ["From: pl-payroll+900001-T@corp.example", "Reply-To: pl-payroll+900001-T@corp.example",
         "Sender: pl-payroll@corp.example", "Bcc: pl-payroll@corp.example", "Resent-To: pl-payroll@corp.example"],
    ),
    (["To: pl-payroll@corp.example, pl-payroll@corp.example"],
     ["To: pl-payroll+900001-T@corp.example, pl-payroll+900001-T@corp.example"]),
    (["To: pl-payroll+5512-C@corp.example, xpl-payroll@corp.example"],
     ["To: pl-payroll+5512-C@corp.example, xpl-payroll@corp.example"]),
    (['To: "pl-payroll"@corp.example'], ["To: pl-payroll+900001-T@corp.example"]),
    # malformed elements are left alone, the rest still rewritten
    (["To: bad@, pl-payroll@corp.example"], ["To: bad@, pl-payroll+900001-T@corp.example"]),
    # CVE-2023-27043 shapes: nothing is rewritten in a field that does not parse
    (["To: alice@example.org)<pl-payroll@corp.example>"], ["To: alice@example.org)<pl-payroll@corp.example>"]),
    (["To: pl-payroll@corp.example<bob@example.com>"], ["To: pl-payroll@corp.example<bob@example.com>"]),
    (["To: pl-payroll@corp.example (unterminated"], ["To: pl-payroll@corp.example (unterminated"]),
    # a folded addr-spec is never spliced
    (['To: "pl-', ' payroll"@corp.example'], ['To: "pl-', ' payroll"@corp.example']),
]


@pytest.mark.parametrize(("before", "after"), CASES)
def test_rewrite_headers(before: list[str], after: list[str]) -> None:
    assert rewrite_headers(message(*before), PL) == message(*after)


def test_u_label_and_a_label_domains_are_rewritten() -> None:
    mapping = {"pay@xn--bcher-kva.example": "pay+1-T@bücher.example"}
    raw = "To: Pay <PAY@Bücher.example>, pay@xn--bcher-kva.example\r\n\r\n".encode()
    assert rewrite_headers(raw, mapping) == "To: Pay <pay+1-T@bücher.example>, pay+1-T@bücher.example\r\n\r\n".encode()


def test_mapping_keys_are_compared_canonically() -> None:
    raw = b"To: pl-payroll@corp.example\r\n\r\n"
    assert rewrite_headers(raw, {"PL-Payroll@Corp.Example": "pl-payroll+1-T@corp.example"}) == (
        b"To: pl-payroll+1-T@corp.example\r\n\r\n"
    )


def test_quoted_values_are_written_as_addr_specs() -> None:
    raw = b"To: pl-payroll@corp.example\r\n\r\n"
    assert rewrite_headers(raw, {"pl-payroll@corp.example": '"pl payroll+1-T"@corp.example'}) == (
        b'To: "pl payroll+1-T"@corp.example\r\n\r\n'
    )


def test_header_without_body_and_without_final_line_end() -> None:
    assert rewrite_headers(b"To: pl-payroll@corp.example", PL) == b"To: pl-payroll+900001-T@corp.example"


def test_body_after_a_non_header_line_is_not_touched() -> None:
    raw = b"Subject: x\r\nnot a header\r\nTo: pl-payroll@corp.example\r\n\r\n"
    assert rewrite_headers(raw, PL) == raw


@pytest.mark.parametrize(
    "mapping",
    [{"pl-payroll@corp.example": "a\r\nBcc: x@y"}, {"pl-payroll@corp.example": "<>"}, {"<>": "a@b"}, {"bad": "a@b"}],
)
def test_invalid_mapping_is_refused(mapping: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        rewrite_headers(b"To: pl-payroll@corp.example\r\n\r\n", mapping)


def test_a_mapping_that_is_no_address_is_named_when_refused() -> None:
    with pytest.raises(ValueError, match="^invalid rewrite mapping: "):
        rewrite_headers(b"To: pl-payroll@corp.example\r\n\r\n", {"bad": "a@b"})


@pytest.mark.parametrize("mapping", [{"pl-payroll@corp.example": "<>"}, {"<>": "a@b"}])
def test_the_null_path_is_named_when_refused(mapping: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="^the null path cannot be rewritten$"):
        rewrite_headers(b"To: pl-payroll@corp.example\r\n\r\n", mapping)


def test_count_received() -> None:
    block = parse_header_block(b"Received: a\r\nreceived: b\r\n  c\r\nX-Received: d\r\n\r\nReceived: e\r\n")
    assert count_received(block) == 2


# --- properties -------------------------------------------------------------

_MAILBOXES = ["pl-payroll@corp.example", "PL-Payroll@Corp.Example", "uk-payroll@corp.example", "client@supplier.example"]
_MAPPING = {
    "pl-payroll@corp.example": "pl-payroll+900001-T@corp.example",
    "uk-payroll@corp.example": "uk-payroll+101203-T@corp.example",
}

_display = st.sampled_from(
    ["", "Pay ", '"Payroll, PL" ', "=?utf-8?q?a=2C_b=0D=0A?= ", "(c) ", "Zoë ", '"x\\"y" ', "John Q. Public "]
)
_mailbox = st.builds(
    lambda display, address, angle, comment: (f"{display}<{address}>" if angle or display else address) + comment,
    _display,
    st.sampled_from(_MAILBOXES),
    st.booleans(),
    st.sampled_from(["", " (note)", " (a (b) c)"]),
)
_noise = st.text(st.sampled_from(list("ab@<>(),;:\"\\ .") + ["ü"]), max_size=12)
_element = st.one_of(
    _mailbox,
    _mailbox,
    st.lists(_mailbox, max_size=3).map(lambda ms: "team: " + ", ".join(ms) + ";"),
    st.just("undisclosed-recipients:;"),
    _noise,
)
_separator = st.sampled_from([", ", ",\r\n ", ",\r\n\t", ","])
_value = st.builds(lambda els, seps: "".join(e + s for e, s in zip(els, seps)).rstrip(",\r\n\t "),
                   st.lists(_element, min_size=1, max_size=4), st.lists(_separator, min_size=4, max_size=4))
_name = st.sampled_from(["To", "Cc", "From", "Reply-To", "cc", "Subject", "X-Enate-Reference", "Bcc", "Received"])
_field = st.builds(lambda name, value: f"{name}: {value}\r\n", _name, _value)
_body = st.sampled_from(["", "\r\n", "\r\nTo: pl-payroll@corp.example\r\n", "\r\nbody\r\n.\r\n"])
_message = st.builds(lambda fields, body: ("".join(fields) + body).encode("utf-8"), st.lists(_field, max_size=6), _body)


def _lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n")


@settings(max_examples=300)
@given(_message)
def test_rewrite_keeps_every_header_line_in_place(raw: bytes) -> None:
    new = rewrite_headers(raw, _MAPPING)
    old_block, new_block = parse_header_block(raw), parse_header_block(new)
    assert [f.name for f in new_block.fields] == [f.name for f in old_block.fields]
    assert len(_lines(new)) == len(_lines(raw))
    assert new[new_block.header_end :] == raw[old_block.header_end :]
    for old_field, new_field in zip(old_block.fields, new_block.fields):
        if old_field.name.lower() not in ("to", "cc", "from", "reply-to"):
            assert new_field.raw == old_field.raw


@settings(max_examples=300)
@given(_message)
def test_only_rewritten_addr_specs_change(raw: bytes) -> None:
    # Undoing each replacement (new -> old text, in order) must give back the original bytes.
    assert _undo(raw, rewrite_headers(raw, _MAPPING)) == raw


def _undo(raw: bytes, new: bytes) -> bytes:
    """Walk both byte strings; every difference must be an old addr-spec replaced by its mapped value."""
    values = {v.encode(): [k.encode() for k in _MAILBOXES if k.lower() == key] for key, v in _MAPPING.items()}
    out, i, j = bytearray(), 0, 0
    while j < len(new):
        if i < len(raw) and raw[i] == new[j] and not _replacement_at(new, j, values, raw, i):
            out.append(new[j])
            i += 1
            j += 1
            continue
        for value, olds in values.items():
            if new.startswith(value, j):
                old = next(o for o in olds if raw.startswith(o, i))
                out += old
                i += len(old)
                j += len(value)
                break
        else:
            raise AssertionError(f"unexpected byte change at {j}: {new[j:j + 20]!r}")
    return bytes(out)


def _replacement_at(new: bytes, j: int, values: dict[bytes, list[bytes]], raw: bytes, i: int) -> bool:
    return any(new.startswith(v, j) and any(raw.startswith(o, i) for o in olds) for v, olds in values.items())


@given(_message)
def test_empty_mapping_is_the_identity(raw: bytes) -> None:
    assert rewrite_headers(raw, {}) is raw


@given(_message)
def test_mapping_to_itself_is_the_identity_for_canonical_addresses(raw: bytes) -> None:
    mapping = {"client@supplier.example": "client@supplier.example"}
    assert rewrite_headers(raw, mapping) == raw


@given(st.binary(max_size=200), st.dictionaries(st.sampled_from(_MAILBOXES), st.sampled_from(list(_MAPPING.values()))))
def test_arbitrary_bytes_never_break_the_rewriter(raw: bytes, mapping: dict[str, str]) -> None:
    new = rewrite_headers(raw, mapping)
    block = parse_header_block(raw)
    assert new[len(new) - (len(raw) - block.header_end) :] == raw[block.header_end :]
    assert new.count(b"\n") == raw.count(b"\n")


def test_header_edits_name_the_field_by_occurrence_and_splice_back():
    from smtpgate.mail.rewrite import apply_edits, header_edits

    raw = (b"To: a@x.example\r\nCc: other@x.example\r\nCc: Team B <pl-payroll@corp.example>\r\n"
           b"Subject: s\r\n\r\nbody To: pl-payroll@corp.example\r\n")
    block = parse_header_block(raw)
    [edit] = header_edits(block, {"pl-payroll@corp.example": "pl-payroll+1-T@corp.example"})
    assert (edit.name, edit.index) == ("Cc", 2)
    assert (edit.old, edit.new) == (b" Team B <pl-payroll@corp.example>\r\n",
                                    b" Team B <pl-payroll+1-T@corp.example>\r\n")
    assert apply_edits(raw, block, [edit]) == raw.replace(b"<pl-payroll@", b"<pl-payroll+1-T@")
    assert apply_edits(raw, block, []) is raw


def test_an_edit_that_does_not_match_the_message_is_refused():
    from smtpgate.mail.rewrite import HeaderEdit, apply_edits

    raw = b"Cc: a@x.example\r\n\r\n"
    block = parse_header_block(raw)
    with pytest.raises(ValueError, match="does not match"):
        apply_edits(raw, block, [HeaderEdit("Cc", 1, b" b@x.example\r\n", b" c@x.example\r\n")])
    with pytest.raises(ValueError, match="no such field"):
        apply_edits(raw, block, [HeaderEdit("Cc", 2, b" a@x.example\r\n", b" c@x.example\r\n")])
