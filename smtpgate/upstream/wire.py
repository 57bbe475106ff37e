"""The DATA payload as it goes upstream: the message dot-stuffed (RFC 5321 4.5.2) and
its final dot, written as pieces so a large body is not copied."""

from __future__ import annotations

from aiosmtplib.protocol import normalize_message_line_endings

from smtpgate.mail.dataguard import crlf_only, find_in_slices

__all__ = ["wire_pieces"]


def _stuffed(data: bytes) -> bytes:
    """RFC 5321 4.5.2: a period at the start of a line is doubled (data starts a line)."""
    if find_in_slices(data, b"\r\n.") != -1:
        data = data.replace(b"\r\n.", b"\r\n..")
    return b"." + data if data.startswith(b".") else data


def wire_pieces(head: bytes, content: bytes, start: int = 0, *, clean: bool = False) -> list[bytes | memoryview]:
    """The DATA payload for the message ``head + content[start:]``: dot-stuffed, ending
    in CRLF, then the final dot, as pieces to write in order.

    The body goes out as a view of ``content`` (no copy) unless a line of it starts with
    a period. A message with a bare CR or LF (which the SMTP front end refuses before it
    gets here) has its line endings made CRLF first, as aiosmtplib would; ``clean`` says
    content has none (the data guard passed it), which spares counting them again.
    """
    if (head and not head.endswith(b"\r\n")) or not (crlf_only(head) and (clean or crlf_only(content, start))):
        whole = normalize_message_line_endings(head + content[start:])
        return [_stuffed(whole), b".\r\n"]
    pieces: list[bytes | memoryview] = [_stuffed(head)] if head else []
    if start < len(content):
        if content.startswith(b".", start) or find_in_slices(content, b"\r\n.", start) != -1:
            pieces.append(_stuffed(content[start:]))
        else:
            pieces.append(memoryview(content)[start:])
        if not content.endswith(b"\r\n"):
            pieces.append(b"\r\n")
    pieces.append(b".\r\n")
    return pieces
