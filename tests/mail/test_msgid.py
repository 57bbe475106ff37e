"""Message-ID helpers (RFC 5322 3.6.4): one place extracts and normalises them."""

import pytest

from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.msgid import find_message_ids, make_message_id, message_id_of, normalize_message_id


def test_message_id_of_keeps_only_the_id():
    assert message_id_of(" <a.b@c.example> (a comment)") == "<a.b@c.example>"
    assert message_id_of("no-brackets@c.example ") == "no-brackets@c.example"
    assert message_id_of("   ") is None
    assert message_id_of(None) is None


@pytest.mark.parametrize("field", [
    b"Message-ID: <trim@corp.example> (sent from a phone)\r\n",
    b"Message-ID:\r\n <trim@corp.example>\r\n",
    b"Message-Id:   <trim@corp.example>   \r\n",
    b"message-id:<trim@corp.example>\r\n",
])
def test_the_id_of_a_message_id_field_however_it_is_written(field: bytes) -> None:
    """A later In-Reply-To names the bare <id>: that is what is logged and recorded
    (on the wire: tests/frontends/smtp/test_relay_params.py)."""
    headers = parse_header_block(b"Subject: x\r\n" + field + b"\r\nbody\r\n")
    assert message_id_of(headers.get("Message-ID")) == "<trim@corp.example>"


def test_find_and_normalize():
    assert find_message_ids("<a@b> <c@d>\r\n <e@f>") == ["<a@b>", "<c@d>", "<e@f>"]
    assert normalize_message_id(" a@b ") == "<a@b>"
    assert normalize_message_id("<a@b>") == "<a@b>"
    assert normalize_message_id("  ") == ""


def test_made_ids_are_unique_and_name_the_host():
    first, second = make_message_id("relay.example"), make_message_id("relay.example")
    assert first != second and first.endswith("@relay.example>") and first.startswith("<")
