"""Locating the header fields of a message without changing a byte of it.

The header block ends where an MTA ends it: at the first empty line, or at
the first line that is neither a header field nor the continuation of one (a
line without a field name and colon, or a first line that starts with white
space). That line, and everything after it, is the body.
"""

from __future__ import annotations

import email.errors
import email.header
import re
from dataclasses import dataclass
from functools import cached_property

__all__ = ["HeaderBlock", "HeaderField", "count_received", "decode_text", "parse_header_block"]

# RFC 5322 ftext, with the obsolete white space before the colon (RFC 5322 4.5).
_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")


@dataclass(frozen=True)
class HeaderField:
    """One header field: ``raw`` is ``data[start:end]``, folding and line end included."""

    name: str
    raw: bytes
    start: int
    end: int
    value_start: int  # offset of the first byte after the colon

    @property
    def raw_value(self) -> bytes:
        """The bytes after the colon, folding and the final line end included."""
        return self.raw[self.value_start - self.start :]

    @cached_property
    def value(self) -> str:
        """The unfolded value without leading white space or line end.

        Bytes are read as UTF-8 (invalid sequences replaced); RFC 2047 encoded
        words are kept as they are, so address parsing sees the real syntax.
        """
        unfolded = re.sub(rb"\r?\n(?=[ \t])", b"", self.raw_value)
        return unfolded.rstrip(b"\r\n").lstrip(b" \t").decode("utf-8", "replace")


@dataclass(frozen=True)
class HeaderBlock:
    """The header fields of a message in order, and ``header_end``, the offset of the body."""

    fields: tuple[HeaderField, ...]
    header_end: int

    def get_all(self, name: str) -> list[str]:
        """The unfolded values (see HeaderField.value) of every field called ``name``, in order."""
        return [f.value for f in self._by_name.get(name.lower(), ())]

    @cached_property
    def _by_name(self) -> dict[str, list[HeaderField]]:
        """The fields by lowercased name, each list in order (built on first use)."""
        index: dict[str, list[HeaderField]] = {}
        for f in self.fields:
            index.setdefault(f.name.lower(), []).append(f)
        return index

    def get(self, name: str) -> str | None:
        """The unfolded value of the first field called ``name``, or None."""
        values = self.get_all(name)
        return values[0] if values else None

    def get_text(self, name: str) -> str | None:
        """Like get(), with RFC 2047 encoded words decoded: for reading, never for parsing addresses."""
        value = self.get(name)
        return None if value is None else decode_text(value)


def parse_header_block(raw: bytes) -> HeaderBlock:
    """Locate the header fields of ``raw`` (a whole message, or only its header)."""
    fields: list[HeaderField] = []
    current: tuple[str, int, int] | None = None  # name, start, value_start
    header_end = len(raw)
    for match in _LINE.finditer(raw):
        line = match.group()
        start = match.start()
        if line[:1] in (b" ", b"\t") and current is not None:
            continue  # a continuation line of the current field
        if current is not None:
            fields.append(_field(raw, current, start))
            current = None
        if line in (b"\r\n", b"\n"):
            header_end = match.end()
            break
        field = _FIELD_START.match(line)
        if field is None:
            header_end = start
            break
        current = (field.group(1).decode("ascii"), start, start + field.end())
    else:
        if current is not None:
            fields.append(_field(raw, current, len(raw)))
    return HeaderBlock(tuple(fields), header_end)


def _field(raw: bytes, current: tuple[str, int, int], end: int) -> HeaderField:
    name, start, value_start = current
    return HeaderField(name, raw[start:end], start, end, value_start)


def count_received(block: HeaderBlock) -> int:
    """The number of ``Received:`` fields: the hop count of RFC 5321 6.3."""
    return sum(1 for f in block.fields if f.name.lower() == "received")


_ENCODED_WORD = r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?="
_ENCODED_RUN = re.compile(rf"{_ENCODED_WORD}(?:[ \t]*{_ENCODED_WORD})*")
_LANGUAGE = re.compile(r"^(=\?[^?*]+)\*[^?]*\?")  # RFC 2231 section 5: =?charset*lang?


def decode_text(value: str) -> str:
    """``value`` with RFC 2047 encoded words decoded, for reading.

    When the whole value does not decode (raw 8-bit text next to encoded
    words, an unknown charset, bytes the declared charset does not have),
    each run of adjacent encoded words is decoded on its own, undecodable
    bytes replaced; a word that still does not decode is kept as it is.
    """
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return _ENCODED_RUN.sub(_decode_run, value)


def _decode_run(run: re.Match[str]) -> str:
    # (charset, bytes) for decodable words, adjacent ones of one charset merged (a
    # character may span two words); (None, the word) for one kept as it is.
    segments: list[tuple[str | None, bytes | str]] = []
    for word in re.findall(_ENCODED_WORD, run.group()):
        try:
            [(chunk, charset)] = email.header.decode_header(_LANGUAGE.sub(r"\1?", word))
            "".encode(charset)  # LookupError for an unknown charset
        except (email.errors.HeaderParseError, LookupError, TypeError, ValueError):
            segments.append((None, word))
            continue
        if segments and segments[-1][0] == charset:
            segments[-1] = (charset, segments[-1][1] + chunk)
        else:
            segments.append((charset, chunk))
    text = ""
    for i, (charset, data) in enumerate(segments):
        # RFC 2047 6.2: white space between encoded words goes; a word kept as it is keeps a space.
        if i and (charset is None or segments[i - 1][0] is None):
            text += " "
        text += data if isinstance(data, str) else data.decode(str(charset), "replace")
    return text
