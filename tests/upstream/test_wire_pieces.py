"""The DATA payload smtpgate writes upstream (smtpgate.upstream.wire.wire_pieces).

The reference is aiosmtplib's own preparation (line endings made CRLF, a final
CRLF, periods at line starts doubled), which smtpgate used before writing the
pieces itself; every input must give the same bytes on the wire.
"""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.upstream.wire import wire_pieces


def reference(message: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def wire(head: bytes, content: bytes, start: int) -> bytes:
    return b"".join(bytes(p) for p in wire_pieces(head, content, start))


lines = st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a\r", b"\n", b"Subject: x", b"\r", b" ."]),
                 max_size=8).map(lambda parts: b"\r\n".join(parts) + b"\r\n")
octets = st.binary(max_size=40) | st.lists(st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a"]), max_size=12).map(b"".join)


@given(head=lines | st.just(b""), body=lines | octets, prefix=st.binary(max_size=5))
def test_same_bytes_as_aiosmtplib(head, body, prefix):
    content = prefix + body
    message = head + body
    if message:  # an empty message is just the final dot here; aiosmtplib sends an empty line first
        assert wire(head, content, len(prefix)) == reference(message)


def test_a_clean_body_is_not_copied():
    content = b"Subject: x\r\n\r\n" + b"line\r\n" * 1000
    pieces = wire_pieces(b"Received: by relay\r\n", content, 0)
    assert isinstance(pieces[1], memoryview) and pieces[1].obj is content
    assert wire(b"Received: by relay\r\n", content, 0) == reference(b"Received: by relay\r\n" + content)


def test_dots_at_line_starts_are_doubled_in_head_and_body():
    assert wire(b".h\r\n", b"xx.b\r\n.\r\n..\r\n", 2) == b"..h\r\n..b\r\n..\r\n...\r\n.\r\n"


def test_a_body_without_final_line_end_gets_one():
    assert wire(b"A: b\r\n", b"text", 0) == b"A: b\r\ntext\r\n.\r\n"


def test_an_empty_message_is_the_final_dot():
    assert wire(b"", b"", 0) == b".\r\n"
    assert wire(b"", b"skipped", 7) == b".\r\n"


clean_lines = lines.filter(lambda b: b.count(b"\r") == b.count(b"\n") == b.count(b"\r\n"))


@given(head=clean_lines | st.just(b""), body=clean_lines)
def test_a_clean_body_needs_no_recount(head, body):
    """What the data guard passed (CRLF line ends only) goes out the same with clean=True."""
    if head + body:
        assert b"".join(bytes(p) for p in wire_pieces(head, body, 0, clean=True)) == reference(head + body)
