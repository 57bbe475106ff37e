"""DKIM-Signature fields (RFC 6376 3.5), read only to warn: smtpgate never verifies or signs.

smtpgate belongs before any DKIM signer (README "Deploying"); a signature
whose h= covers a field smtpgate rewrites no longer verifies downstream.
"""

from __future__ import annotations

import re

from smtpgate.mail.headers import HeaderBlock

__all__ = ["broken_signatures"]

_FWS = re.compile(r"\s+")


def _tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        name, sep, text = part.partition("=")
        if sep:
            tags[_FWS.sub("", name).lower()] = text.strip()
    return tags


def broken_signatures(headers: HeaderBlock, edited: set[str]) -> list[tuple[str, list[str]]]:
    """(signing domain, signed fields smtpgate edits) for each DKIM-Signature an edit breaks.

    ``edited`` holds the lower-case names of the fields smtpgate changes.
    """
    broken = []
    for value in headers.get_all("DKIM-Signature"):
        tags = _tags(value)
        signed = [f.lower() for f in _FWS.sub("", tags.get("h", "")).split(":") if f]
        hit = sorted({f for f in signed if f in edited})
        if hit:
            broken.append((tags.get("d", "?"), hit))
    return broken
