"""The upstream's queue id in its reply to the final dot, for `message.relayed`
(`upstream_queue_id`): what to search the upstream's own log for.

Forms (the reply text after the code):
- Postfix, smtp-sink: `2.0.0 Ok: queued as 4Q7mXk2Z1Tz9vQ`
- Exim: `OK id=1tSgqB-000Abc-Xy`
- Sendmail: `2.0.0 4B3Hx1aB012345 Message accepted for delivery`
- Exchange (Server and Online): `2.6.0 <id@host> [InternalId=123456, Hostname=...] Queued mail for
  delivery`: the InternalId (Get-MessageTrackingLog's InternalMessageId), else the `<id>`
- Gmail: `2.0.0 OK  1733300000 a1b2c3-20020a05 - gsmtp`
"""

from __future__ import annotations

import re

__all__ = ["queue_id"]

_FORMS = (
    re.compile(r"\bqueued as ([0-9A-Za-z]+)", re.IGNORECASE),
    re.compile(r"\[InternalId=(\d+)"),
    re.compile(r"^\d\.\d\.\d+ (<[^<>\s]+>)"),
    re.compile(r"\bid=([0-9A-Za-z-]+)"),
    re.compile(r"^2\.0\.0 ([0-9A-Za-z]{8,}) Message accepted", re.IGNORECASE),
    re.compile(r" (\S+) - gsmtp\s*$"),
)


def queue_id(reply_text: str) -> str | None:
    """The queue id named in a reply's text (without its code), or None."""
    for form in _FORMS:
        found = form.search(reply_text)
        if found:
            return found.group(1)
    return None
