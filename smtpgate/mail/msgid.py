"""Message-IDs (RFC 5322 3.6.4): the one place that extracts and normalises them."""

from __future__ import annotations

import os
import re

__all__ = ["MSG_ID", "find_message_ids", "make_message_id", "message_id_of", "normalize_message_id"]

MSG_ID = re.compile(r"<[^<>\s]+>")


def message_id_of(value: str | None) -> str | None:
    """The ``<id>`` of a Message-ID field's value, without comments or white space.

    None for an absent or blank value; a value with no angle brackets is kept trimmed.
    """
    if value is None or not value.strip():
        return None
    bracketed = MSG_ID.search(value)
    return bracketed.group(0) if bracketed else value.strip()


def find_message_ids(value: str) -> list[str]:
    """Every ``<id>`` in an In-Reply-To or References value, in order."""
    return MSG_ID.findall(value)


def normalize_message_id(value: str) -> str:
    """A Message-ID as stored and looked up: trimmed, inside one pair of angle brackets."""
    value = value.strip()
    if not value:
        return value
    if not value.startswith("<"):
        value = "<" + value
    if not value.endswith(">"):
        value = value + ">"
    return value


def make_message_id(hostname: str) -> str:
    """A new, unique Message-ID for a message that has none."""
    return f"<{os.urandom(16).hex()}@{hostname}>"
