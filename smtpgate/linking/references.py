"""Activity references: the configured pattern, compiled once."""

from __future__ import annotations

import re

__all__ = ["DEFAULT_PATTERN", "ReferenceMatcher"]

DEFAULT_PATTERN = "[0-9]{1,12}-[TCA]"


class ReferenceMatcher:
    """Recognises references matched by one pattern (``references.pattern``).

    Raises ValueError at construction when the pattern is not a regular
    expression or matches the empty string.
    """

    def __init__(self, pattern: str) -> None:
        try:
            self._full = re.compile(f"(?:{pattern})")
            # A reference in free text is a whole word: no letter, digit or _ touches it.
            self._search = re.compile(rf"(?<!\w)(?:{pattern})(?!\w)")
        except re.error as exc:
            raise ValueError(f"invalid reference pattern {pattern!r}: {exc}") from None
        if self._full.fullmatch(""):
            raise ValueError(f"reference pattern {pattern!r} matches the empty string")
        self.pattern = pattern

    def fullmatch(self, text: str) -> bool:
        """True when all of ``text`` is one reference."""
        return self._full.fullmatch(text) is not None

    def search(self, text: str) -> str | None:
        """The first reference standing as a word of its own in ``text``, or None.

        ``Re: [101203-T] pay`` gives ``101203-T``; ``x101203-TT`` and
        ``abc5512-Cx`` give None.
        """
        match = self._search.search(text)
        return match.group() if match else None

    def normalize(self, text: str) -> str | None:
        """``text`` as a reference: itself when it matches, else its upper-case form
        when that matches (local parts are case-insensitive, so a tag may arrive
        lowercased), else None."""
        if self.fullmatch(text):
            return text
        upper = text.upper()
        return upper if self.fullmatch(upper) else None
