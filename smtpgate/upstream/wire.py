"""Message data as it goes upstream: dot-stuffed (RFC 5321 4.5.2)."""

from __future__ import annotations

from smtpgate.mail.dataguard import find_in_slices

__all__ = ["stuffed"]


def stuffed(data: bytes) -> bytes:
    """RFC 5321 4.5.2: a period at the start of a line is doubled (data starts a line)."""
    if find_in_slices(data, b"\r\n.") != -1:
        data = data.replace(b"\r\n.", b"\r\n..")
    return b"." + data if data.startswith(b".") else data
