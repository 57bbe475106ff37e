"""A plain SMTP client over asyncio streams, for tests that need exact bytes on the wire.

It reads whole replies (multi-line included) and never rewrites what it sends,
so tests can send bare LFs, pipelined commands and protocol violations.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", *, source: str | None = None,
                   timeout: float = 10) -> tuple["Wire", str]:
        local = (source, 0) if source else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, local_addr=local), timeout)
        wire = cls(reader, writer)
        greeting = await wire.reply()
        return wire, greeting

    async def reply(self, timeout: float = 15) -> str:
        """One whole reply; its lines joined with newlines. '' when the server closed."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str) -> str:
        await self.send(line + "\r\n")
        return await self.reply()

    def pending(self) -> bytes:
        """What the server has sent that no reply() read yet, without waiting for more.

        Looks at the stream's buffer and, without consuming it, at the socket's
        receive queue: a test can assert the server said nothing so far.
        """
        buffered = bytes(self.reader._buffer)  # the StreamReader's own buffer (CPython)
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return buffered
        with socket.socket(fileno=os.dup(sock.fileno())) as raw:
            try:
                queued = raw.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                queued = b""
        return buffered + queued

    def reset(self) -> None:
        """Go away with a TCP reset (SO_LINGER 0), as a crashed client or a load balancer does."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def code(reply: str) -> int:
    """The reply code of a (possibly multi-line) reply; 0 when the server hung up."""
    return int(reply[:3]) if reply[:3].isdigit() else 0


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """Split off the fields smtpgate prepends: (Received/Message-ID fields, the rest)."""
    added = []
    while data.startswith(b"Received:") or data.startswith(b"Message-ID:"):
        end = data.index(b"\r\n")
        while data[end + 2:end + 3] in (b" ", b"\t"):
            end = data.index(b"\r\n", end + 2)
        added.append(data[: end + 2])
        data = data[end + 2:]
    return added, data
