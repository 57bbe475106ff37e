"""The processing stamp: one header field that says "smtpgate has decided this message".

In a hairpin (docs/connectors.md) the mail system sends its own messages to
smtpgate and takes them back; the stamp lets the mail system's rule, and
smtpgate itself, skip a message already processed. Its value binds the
message's Message-ID to a secret every node shares:

    X-Smtpgate-Processed: v1:<base64url of HMAC-SHA-256(secret, "smtpgate-stamp/v1\\0" + Message-ID)>

The version prefix lets the construction change; a value of another version,
another secret or another Message-ID does not verify. Pure: no I/O, the secret
is given as bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass, field

from smtpgate.mail.headers import HeaderBlock
from smtpgate.mail.msgid import message_id_of
from smtpgate.mail.rewrite import HeaderEdit

__all__ = ["DEFAULT_HEADER", "MAX_VALUE_OCTETS", "MIN_SECRET_OCTETS", "VERSION", "StampCheck", "Stamper",
           "make_stamp", "verify_stamp"]

DEFAULT_HEADER = "X-Smtpgate-Processed"
VERSION = "v1"
MIN_SECRET_OCTETS = 16
# A v1 value is 46 characters; anything much longer is not a stamp (nor worth an HMAC).
MAX_VALUE_OCTETS = 128
_VALUE = re.compile(r"v1:[A-Za-z0-9_-]{43}")
_CONTEXT = b"smtpgate-stamp/v1\0"


def make_stamp(secret: bytes, message_id: str) -> str:
    """The stamp value for ``message_id`` (its ``<id>``, as message_id_of gives it)."""
    digest = hmac.new(secret, _CONTEXT + message_id.encode("utf-8"), hashlib.sha256).digest()
    return f"{VERSION}:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify_stamp(secret: bytes, message_id: str | None, value: str) -> bool:
    """True when ``value`` is the stamp of ``message_id`` under ``secret`` (constant-time)."""
    if message_id is None or not _VALUE.fullmatch(value):
        return False
    return hmac.compare_digest(make_stamp(secret, message_id), value)


@dataclass(frozen=True)
class StampCheck:
    """What a message's stamp fields say.

    ``status``: "none" (no field), "valid" (exactly one field, and it verifies) or
    "invalid" (``reason`` says why: repeated, oversized, malformed, no Message-ID, does
    not verify). ``removals`` are the edits that take every stamp field out.
    """

    status: str
    reason: str | None = None
    removals: tuple[HeaderEdit, ...] = ()

    @property
    def valid(self) -> bool:
        return self.status == "valid"


@dataclass(frozen=True)
class Stamper:
    """``stamp.header`` and the secret read from ``stamp.secret_file``."""

    header: str = DEFAULT_HEADER
    secret: bytes = field(default=b"", repr=False)

    def check(self, block: HeaderBlock) -> StampCheck:
        """The stamp fields of ``block`` judged against the block's own Message-ID."""
        key = self.header.lower()
        found = [f for f in block.fields if f.name.lower() == key]
        if not found:
            return StampCheck("none")
        removals = tuple(HeaderEdit(f.name, i, f.raw_value, None) for i, f in enumerate(found, 1))
        if len(found) > 1:
            return StampCheck("invalid", f"{len(found)} {self.header} fields", removals)
        value = found[0].value
        if len(value) > MAX_VALUE_OCTETS:
            return StampCheck("invalid", f"{self.header} of {len(value)} characters", removals)
        if not _VALUE.fullmatch(value):
            return StampCheck("invalid", f"{self.header} is not a {VERSION} stamp", removals)
        message_id = message_id_of(block.get("Message-ID"))
        if message_id is None:
            return StampCheck("invalid", "a stamp on a message without Message-ID", removals)
        if not verify_stamp(self.secret, message_id, value):
            return StampCheck("invalid", "the stamp does not verify for this Message-ID", removals)
        return StampCheck("valid")

    def field(self, message_id: str) -> bytes:
        """The stamp field for ``message_id``, line end included."""
        return f"{self.header}: {make_stamp(self.secret, message_id)}\r\n".encode("ascii")

    def value(self, message_id: str) -> bytes:
        """The field's value as a milter sends it (ADDHEADER): one leading space."""
        return f" {make_stamp(self.secret, message_id)}".encode("ascii")
