"""Checks on the DATA of a message before anything of it is relayed: bare CR, bare LF
and NUL, hop count, size (the replies are in docs/reference.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpgate.mail.headers import parse_header_block

__all__ = ["OFF_LOOP_OCTETS", "SLICE_OCTETS", "DataProblem", "StreamGuard", "crlf_only", "find_header_end", "find_in_slices",
           "scan_data"]

# From this size on, smtpgate runs whole-message work (this scan, joining and unstuffing the
# data, searching it for dots to stuff) in a thread rather than on the event loop: bytes
# methods hold the GIL per call only, so other sessions get their turns in between.
OFF_LOOP_OCTETS = 1 << 20

# A CR not followed by LF, an LF not preceded by CR, or a NUL: the smuggling shapes.
_PROBLEM = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
_KINDS = {b"\r": "bare_cr", b"\n": "bare_lf", b"\x00": "nul"}


@dataclass(frozen=True)
class DataProblem:
    """The first offending byte: ``kind`` is "bare_cr", "bare_lf" or "nul"."""

    kind: str
    offset: int


# Whole-message searches go a slice at a time: a bytes method holds the GIL for its whole
# call, and a 25 MB message searched in one call would stall the event loop for ~20 ms.
SLICE_OCTETS = 1 << 20


def find_in_slices(data: bytes, sub: bytes, start: int = 0, *, slice_octets: int = SLICE_OCTETS) -> int:
    """``data.find(sub, start)``, one slice of ``slice_octets`` at a time."""
    while start < len(data):
        found = data.find(sub, start, start + slice_octets + len(sub) - 1)
        if found != -1:
            return found
        start += slice_octets
    return -1


def crlf_only(data: bytes, start: int = 0, *, slice_octets: int = SLICE_OCTETS) -> bool:
    """``data[start:]`` has no NUL, and every CR and LF in it is part of a CRLF.

    Decided by byte counts (C speed, a slice at a time): the counts of CR, of LF and of
    CRLF agree exactly when no CR or LF stands alone.
    """
    if len(data) - start <= slice_octets:  # the common message: one slice, no loop
        return (data.find(b"\0", start) == -1
                and data.count(b"\r", start) == data.count(b"\n", start) == data.count(b"\r\n", start))
    cr = lf = pairs = 0
    for begin in range(start, len(data), slice_octets):
        end = begin + slice_octets
        if data.find(b"\0", begin, end) != -1:
            return False
        cr += data.count(b"\r", begin, end)
        lf += data.count(b"\n", begin, end)
        pairs += data.count(b"\r\n", begin, end + 1)  # the pairs that start in this slice
    return cr == lf == pairs


def scan_data(raw: bytes) -> DataProblem | None:
    """The first bare CR, bare LF or NUL in ``raw`` (dot-unstuffed DATA with CRLF line ends), or None."""
    # The common clean message is decided by byte counts; the regex only finds where.
    if crlf_only(raw):
        return None
    match = _PROBLEM.search(raw)
    assert match is not None  # a NUL, or a CR or LF outside a CRLF: the counts said so
    return DataProblem(_KINDS[match.group()], match.start())


def find_header_end(raw: bytes) -> int:
    """The offset where the body of ``raw`` starts, decided as parse_header_block decides it."""
    return parse_header_block(raw).header_end


class StreamGuard:
    """scan_data over data that arrives in pieces: the first bare CR, bare LF or NUL.

    Each piece is judged as it comes, whatever splits a CRLF between two pieces; ``problem``
    is set by the first offending byte (offsets count from the first piece) and stays.
    """

    __slots__ = ("problem", "_offset", "_cr")

    def __init__(self) -> None:
        self.problem: DataProblem | None = None
        self._offset = 0  # octets judged so far
        self._cr = False  # the last octet judged was a CR whose LF may start the next piece

    def add(self, piece: bytes) -> DataProblem | None:
        """Judge the next piece; returns the problem once one is found."""
        if self.problem is not None or not piece:
            return self.problem
        start = 0
        if self._cr:
            if piece[:1] != b"\n":
                return self._found("bare_cr", -1)
            start = 1
        elif piece[:1] == b"\n":
            return self._found("bare_lf", 0)
        end = len(piece) - 1 if piece.endswith(b"\r") else len(piece)
        body = piece[start:end] if start or end < len(piece) else piece
        # With the CRLFs taken out, no CR, LF or NUL may be left: one replace and three memchr
        # searches, about twice as fast as crlf_only's counts on a piece of lines.
        rest = body.replace(b"\r\n", b"")
        if b"\r" in rest or b"\n" in rest or b"\0" in rest:
            match = _PROBLEM.search(body)
            assert match is not None
            return self._found(_KINDS[match.group()], start + match.start())
        self._cr = end < len(piece)
        self._offset += len(piece)
        return None

    def finish(self) -> DataProblem | None:
        """The end of the data: a CR left waiting is a bare CR."""
        if self.problem is None and self._cr:
            return self._found("bare_cr", -1)
        return self.problem

    def _found(self, kind: str, offset: int) -> DataProblem:
        self.problem = DataProblem(kind, self._offset + offset)
        return self.problem
