"""Byte-preserving rewriting of the addresses in a message's header.

The addresses are located with smtpgate's own address parser and the
replacement is spliced into the original bytes; no header is ever
regenerated, so display names, comments, groups, folding, field order, every
other field and the body keep their exact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from smtpgate.mail.addresses import AddressError, locate_addresses, parse_path
from smtpgate.mail.headers import HeaderBlock, count_received, parse_header_block

__all__ = ["REWRITTEN_FIELDS", "HeaderEdit", "apply_edits", "count_received", "header_edits", "rewrite_headers",
           "split_edits"]

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


@dataclass(frozen=True)
class HeaderEdit:
    """One header field's new value: a front end splices it (SMTP) or sends it (milter CHGHEADER).

    ``index`` counts the fields called ``name`` (case-insensitive) from 1, in
    order; ``old`` and ``new`` are the raw bytes after the colon, folding and
    the final line end included. ``new`` None removes the whole field (a milter sends
    CHGHEADER with an empty value, which deletes it).
    """

    name: str
    index: int
    old: bytes
    new: bytes | None


def header_edits(block: HeaderBlock, mapping: Mapping[str, str]) -> tuple[HeaderEdit, ...]:
    """The edits that replace the addr-specs in To, Cc, From and Reply-To per ``mapping``.

    Keys are compared by ``Address.canonical`` (case and IDNA form do not
    matter); each value is the full addr-spec written in place of the old
    one. Only those addr-spec bytes change. An element that is not a valid
    address, or a field that does not tokenize, is left alone. Raises
    ValueError when a key or value is not a valid address.
    """
    if not mapping:
        return ()
    try:
        replacements = _canonical_mapping(mapping)
    except AddressError as exc:
        raise ValueError(f"invalid rewrite mapping: {exc}") from None
    edits: list[HeaderEdit] = []
    seen: dict[str, int] = {}
    for field in block.fields:
        key = field.name.lower()
        seen[key] = seen.get(key, 0) + 1
        if key not in REWRITTEN_FIELDS:
            continue
        old = field.raw_value
        value = old.decode("latin-1")  # one character per byte: offsets stay byte offsets
        pieces: list[bytes] = []
        done = 0
        for located in locate_addresses(value, _utf8):
            new = replacements.get(located.address.canonical)
            if new is None:
                continue
            pieces += [old[done : located.start], new]
            done = located.end
        if pieces:
            edits.append(HeaderEdit(field.name, seen[key], old, b"".join(pieces) + old[done:]))
    return tuple(edits)


def apply_edits(raw: bytes, block: HeaderBlock, edits: Sequence[HeaderEdit]) -> bytes:
    """``raw`` (whose header ``block`` is) with each edit's field value replaced.

    Raises ValueError when an edit names a field the block does not have or
    whose value is not ``old``.
    """
    head, rest = split_edits(raw, block, edits)
    return head + raw[rest:] if rest else raw


def split_edits(raw: bytes, block: HeaderBlock, edits: Sequence[HeaderEdit]) -> tuple[bytes, int]:
    """``apply_edits`` without copying the rest of the message: ``(head, rest)`` where
    ``head + raw[rest:]`` is the edited message. ``head`` runs to the end of the last
    edited field, line end included; with no edits it is empty and ``rest`` is 0.
    """
    if not edits:
        return b"", 0
    wanted = {(e.name.lower(), e.index): e for e in edits}
    pieces: list[bytes] = []
    done = 0
    seen: dict[str, int] = {}
    for field in block.fields:
        key = field.name.lower()
        seen[key] = seen.get(key, 0) + 1
        edit = wanted.pop((key, seen[key]), None)
        if edit is None:
            continue
        if field.raw_value != edit.old:
            raise ValueError(f"header edit for {edit.name} #{edit.index} does not match the message")
        if edit.new is None:
            pieces.append(raw[done : field.start])
        else:
            pieces += [raw[done : field.value_start], edit.new]
        done = field.end
    if wanted:
        name, index = next(iter(wanted))
        raise ValueError(f"header edit for {name} #{index}: no such field")
    return b"".join(pieces), done


def rewrite_headers(raw: bytes, mapping: Mapping[str, str]) -> bytes:
    """``raw`` with the addr-specs in To, Cc, From and Reply-To replaced per ``mapping``
    (see header_edits); only those addr-spec bytes change."""
    block = parse_header_block(raw)
    return apply_edits(raw, block, header_edits(block, mapping))
