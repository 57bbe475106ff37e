"""Checks on the DATA of a message before anything of it is relayed (DESIGN.md section 6)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpgate.mail.headers import parse_header_block

__all__ = ["DataProblem", "find_header_end", "scan_data"]

# A CR not followed by LF, an LF not preceded by CR, or a NUL: the smuggling shapes.
_PROBLEM = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
_KINDS = {b"\r": "bare_cr", b"\n": "bare_lf", b"\x00": "nul"}


@dataclass(frozen=True)
class DataProblem:
    """The first offending byte: ``kind`` is "bare_cr", "bare_lf" or "nul"."""

    kind: str
    offset: int


def scan_data(raw: bytes) -> DataProblem | None:
    """The first bare CR, bare LF or NUL in ``raw`` (dot-unstuffed DATA with CRLF line ends), or None."""
    # Every CR and every LF is part of a CRLF exactly when the three counts agree: the
    # common clean message is decided by byte counts (C speed); the regex only finds where.
    if b"\0" not in raw and raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n"):
        return None
    match = _PROBLEM.search(raw)
    assert match is not None  # a NUL, or a CR or LF outside a CRLF: the counts said so
    return DataProblem(_KINDS[match.group()], match.start())


def find_header_end(raw: bytes) -> int:
    """The offset where the body of ``raw`` starts, decided as parse_header_block decides it."""
    return parse_header_block(raw).header_end
