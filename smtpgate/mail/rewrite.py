"""Byte-preserving rewriting of the addresses in a message's header.

The addresses are located with smtpgate's own address parser and the
replacement is spliced into the original bytes; no header is ever
regenerated, so display names, comments, groups, folding, field order, every
other field and the body keep their exact bytes.
"""

from __future__ import annotations

from typing import Mapping

from smtpgate.mail.addresses import AddressError, locate_addresses, parse_path
from smtpgate.mail.headers import count_received, parse_header_block

__all__ = ["REWRITTEN_FIELDS", "count_received", "rewrite_headers"]

REWRITTEN_FIELDS = frozenset({"to", "cc", "from", "reply-to"})


def _utf8(latin1: str) -> str:
    return latin1.encode("latin-1").decode("utf-8")


def _canonical_mapping(mapping: Mapping[str, str]) -> dict[str, bytes]:
    result: dict[str, bytes] = {}
    for old, new in mapping.items():
        old_address, new_address = parse_path(old), parse_path(new)
        if old_address is None or new_address is None:
            raise ValueError("the null path cannot be rewritten")
        result[old_address.canonical] = str(new_address).encode("utf-8")
    return result


def rewrite_headers(raw: bytes, mapping: Mapping[str, str]) -> bytes:
    """``raw`` with the addr-specs in To, Cc, From and Reply-To replaced per ``mapping``.

    Keys are compared by ``Address.canonical`` (case and IDNA form do not
    matter); each value is the full addr-spec written in place of the old
    one. Only those addr-spec bytes change. An element that is not a valid
    address, or a field that does not tokenize, is left alone. Raises
    ValueError when a key or value is not a valid address.
    """
    if not mapping:
        return raw
    try:
        replacements = _canonical_mapping(mapping)
    except AddressError as exc:
        raise ValueError(f"invalid rewrite mapping: {exc}") from None
    pieces: list[bytes] = []
    done = 0
    for field in parse_header_block(raw).fields:
        if field.name.lower() not in REWRITTEN_FIELDS:
            continue
        value = field.raw_value.decode("latin-1")  # one character per byte: offsets stay byte offsets
        for located in locate_addresses(value, _utf8):
            new = replacements.get(located.address.canonical)
            if new is None:
                continue
            pieces.append(raw[done : field.value_start + located.start])
            pieces.append(new)
            done = field.value_start + located.end
    if not pieces:
        return raw
    pieces.append(raw[done:])
    return b"".join(pieces)
