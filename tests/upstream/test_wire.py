"""Message data as it goes upstream (smtpgate/upstream/wire.py): dot-stuffed, RFC 5321 4.5.2."""

from __future__ import annotations

import pytest

from smtpgate.upstream.wire import stuffed


@pytest.mark.parametrize(("data", "wire"), [
    (b"Subject: x\r\n", b"Subject: x\r\n"),
    (b".hidden: x\r\n", b"..hidden: x\r\n"),  # the data starts a line
    (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),  # a line that is only a period is not the end
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n"),
    (b"x\r\n.y", b"x\r\n..y"),  # a period right after a one-octet first line
    (b"a.b\r\nc .\r\n", b"a.b\r\nc .\r\n"),  # periods inside a line stay as they are
    (b"", b""),
])
def test_a_period_that_starts_a_line_is_doubled_and_no_other(data, wire):
    assert stuffed(data) == wire
