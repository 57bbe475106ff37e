"""The Maildir upstream (`upstream.url: maildir:path`): for the demo and dry runs.

A streamed message goes straight into its file in ``tmp/`` as it arrives and is
renamed into ``new/`` at the final dot, so no body is held in memory; a message
abandoned before its final dot leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from smtpgate.upstream.session import UpstreamError, UpstreamSession, Verdict

__all__ = ["MaildirSession"]


@dataclass
class MaildirSession(UpstreamSession):
    """Writes each accepted message into a Maildir.

    The final envelope is recorded in a JSON sidecar beside the message,
    `<maildir>/envelopes/<same name>.json`: {"mail_from", "mail_options",
    "rcpt_tos", "rcpt_options"} — the message file itself holds exactly the
    bytes an SMTP upstream would have received.
    """

    root: Path
    label: str = ""
    extensions: frozenset[str] = frozenset({"8bitmime", "smtputf8", "size", "pipelining"})
    sender: str = ""
    mail_params: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    rcpt_params: list[list[str]] = field(default_factory=list)
    _stream: _MaildirStream | None = None

    async def mail(self, sender: str, params: list[str]) -> Verdict:
        self.sender, self.mail_params, self.recipients, self.rcpt_params = sender, params, [], []
        return Verdict(250, "2.1.0 Sender OK")

    async def rcpt(self, recipient: str, params: list[str], *, timeout: float | None = None) -> Verdict:
        self.recipients.append(recipient)
        self.rcpt_params.append(params)
        return Verdict(250, "2.1.5 Recipient OK")

    async def rset(self) -> Verdict:
        self._abandon()
        self.sender, self.recipients, self.rcpt_params = "", [], []
        return Verdict(250, "2.0.0 OK")

    def _envelope(self) -> dict:
        return {
            "mail_from": self.sender,
            "mail_options": self.mail_params,
            "rcpt_tos": self.recipients,
            "rcpt_options": self.rcpt_params,
        }

    async def open_data(self, head: bytes) -> Verdict:
        self._abandon()
        try:
            self._stream = _MaildirStream(self.root)
            self._stream.write(head)
        except OSError as exc:
            self._abandon()
            raise UpstreamError(f"maildir write failed: {exc}") from None
        return Verdict(354, "End data with <CR><LF>.<CR><LF>")

    async def write_data(self, wire: bytes | memoryview) -> None:
        assert self._stream is not None
        try:
            self._stream.write_wire(bytes(wire))
        except OSError as exc:
            self._abandon()
            raise UpstreamError(f"maildir write failed: {exc}") from None

    async def end_data(self, last: bytes = b"") -> Verdict:
        if last:
            await self.write_data(last)
        stream, self._stream = self._stream, None
        assert stream is not None
        try:
            name = await asyncio.to_thread(stream.deliver, self._envelope())
        except OSError as exc:
            stream.discard()
            raise UpstreamError(f"maildir write failed: {exc}") from None
        return Verdict(250, f"2.0.0 Ok: queued as {name}")

    def _abandon(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.discard()

    async def release(self, reusable: bool) -> None:
        self._abandon()

    def discard(self) -> None:
        self._abandon()


_counter = 0


def _new_name(root: Path) -> str:
    global _counter
    _counter += 1
    for sub in ("tmp", "new", "cur", "envelopes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return f"{time.time_ns()}.P{os.getpid()}Q{_counter}.{socket.gethostname()}"


def _deliver(root: Path, name: str, envelope: dict) -> None:
    side = root / "envelopes" / f"{name}.json"
    side.write_text(json.dumps(envelope, indent=1) + "\n", encoding="utf-8")
    os.rename(root / "tmp" / name, root / "new" / name)


class _MaildirStream:
    """One message being written into tmp/: the head as given, then wire data dot-unstuffed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.name = _new_name(root)
        self.file: BinaryIO | None = open(root / "tmp" / self.name, "wb")  # noqa: SIM115 (closed by deliver/discard)
        self._line_start = True  # the next octet of wire data starts a line
        self._cr = b""  # a CR held back: its LF may start the next piece

    def write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(data)

    def write_wire(self, wire: bytes) -> None:
        """RFC 5321 4.5.2: a line's leading period is dropped; CRLF split between pieces kept whole."""
        data = self._cr + wire
        self._cr = b""
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], b"\r"
        if not data:
            return
        if self._line_start and data.startswith(b"."):
            data = data[1:]
        self._line_start = data.endswith(b"\r\n")  # a period next is a stuffing one
        if b"\r\n." in data:
            data = data.replace(b"\r\n.", b"\r\n")
        self.write(data)

    def deliver(self, envelope: dict) -> str:
        assert self.file is not None
        if self._cr:
            self.write(self._cr)
        file, self.file = self.file, None
        try:
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                file.close()
            _deliver(self.root, self.name, envelope)
        except OSError:
            # Not delivered: nothing of it stays behind (the message in tmp/, its envelope).
            for leftover in (self.root / "tmp" / self.name, self.root / "envelopes" / f"{self.name}.json"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            raise
        return self.name

    def discard(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            file.close()
            try:
                os.unlink(self.root / "tmp" / self.name)
            except OSError:
                pass
