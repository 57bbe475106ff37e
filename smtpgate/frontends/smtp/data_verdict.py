"""aiosmtpd's verdict on message data (its 552 over the size limit, its 500 for a line
too long), decided as its line-by-line reader decides it: on the whole data
(`data_refusal`), or on data that arrives in pieces, as soon as it is known
(`DataLimits`). smtpgate.frontends.smtp.aiosmtpd_glue sends them as aiosmtpd does."""

from __future__ import annotations

__all__ = ["LINE_TOO_LONG", "TOO_MUCH_DATA", "DataLimits", "data_refusal"]

# aiosmtpd's refusals of the message data itself: each is the message's one message.rejected.
TOO_MUCH_DATA = "552 Error: Too much mail data"
LINE_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"


def data_refusal(data: bytes, size_limit: int | None, line_limit: int, read_limit: int) -> str | None:
    """aiosmtpd's refusal of message data (its 552 or its 500 line), or None when it takes it.

    `data` is the message data as sent (dot-stuffed CRLF lines, without the final dot) or,
    once it is longer than size_limit, at least its first size_limit + read_limit + 3
    octets. aiosmtpd reads it a line at a time from a stream reader limited to
    read_limit: a line whose text is longer than that overruns the reader and is refused
    before it is counted; any other line is counted (552 once the count passes
    size_limit) and then measured (500 when it is longer than line_limit with its CRLF).
    The first of these decides, as it does in aiosmtpd.
    """
    pos, end = 0, len(data)
    while pos < end:
        if size_limit and pos > size_limit:
            return TOO_MUCH_DATA
        # Every line that ends within line_limit octets of pos is short enough: past them all.
        crlf = data.rfind(b"\r\n", pos, pos + line_limit)
        if crlf != -1:
            pos = crlf + 2
            continue
        # The line at pos is too long.
        crlf = data.find(b"\r\n", pos, pos + read_limit + 2)
        if crlf == -1:  # it overran aiosmtpd's reader: refused before it was counted
            return LINE_TOO_LONG
        return TOO_MUCH_DATA if size_limit and crlf + 2 > size_limit else LINE_TOO_LONG
    return TOO_MUCH_DATA if size_limit and end > size_limit else None


class DataLimits:
    """data_refusal's verdict on message data that arrives in pieces, known as soon as it is.

    Nothing of the data is kept but the line not yet ended (at most read_limit + 2 octets).
    """

    __slots__ = ("refusal", "size", "_carry", "_base", "_size_limit", "_line_limit", "_read_limit")

    def __init__(self, size_limit: int | None, line_limit: int, read_limit: int) -> None:
        self.refusal: str | None = None
        self.size = 0
        self._carry = b""  # the data from the start of the line not yet judged
        self._base = 0  # the offset of _carry in the data
        self._size_limit = size_limit
        self._line_limit = line_limit
        self._read_limit = read_limit

    def add(self, piece: bytes | memoryview) -> str | None:
        """Judge the next piece; aiosmtpd's refusal once it is known, else None."""
        self.size += len(piece)
        if self.refusal is not None:
            return self.refusal
        data = self._carry + piece if self._carry else bytes(piece)
        size_limit, line_limit, read_limit = self._size_limit, self._line_limit, self._read_limit
        pos, end, base = 0, len(data), self._base
        while pos < end:
            if size_limit and base + pos > size_limit:
                return self._refuse(TOO_MUCH_DATA)
            crlf = data.rfind(b"\r\n", pos, pos + line_limit)
            if crlf != -1:
                pos = crlf + 2
                continue
            if end - pos < line_limit:
                break  # a line not ended yet, short so far
            crlf = data.find(b"\r\n", pos, pos + read_limit + 2)
            if crlf == -1:
                if end - pos >= read_limit + 2:
                    return self._refuse(LINE_TOO_LONG)  # it overran aiosmtpd's reader
                break
            return self._refuse(TOO_MUCH_DATA if size_limit and base + crlf + 2 > size_limit else LINE_TOO_LONG)
        self._carry, self._base = data[pos:], base + pos
        return None

    def finish(self) -> str | None:
        """The verdict on the whole data (the final dot is in)."""
        if self.refusal is None:
            size_limit = self._size_limit
            if self._carry:
                self.refusal = TOO_MUCH_DATA if size_limit and self._base > size_limit else LINE_TOO_LONG
            elif size_limit and self.size > size_limit:
                self.refusal = TOO_MUCH_DATA
        return self.refusal

    def _refuse(self, refusal: str) -> str:
        self.refusal, self._carry = refusal, b""
        return refusal
