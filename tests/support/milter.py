"""An MTA-side milter client for tests, speaking the wire format the way Postfix's milter8.c does.

Written from the protocol, not from smtpgate's codec, so that a test of the
server is not a test of the codec against itself. It sends each event only
when the negotiated steps ask for it, waits for a reply only where one is due,
and returns the filter's answers as readable tuples:
("DELRCPT", "<a@b>"), ("ADDRCPT_PAR", "<a+1-T@b>", "ORCPT=..."),
("CHGHEADER", 1, "Cc", b" ..."), ("ADDHEADER", "Message-ID", b" <...>"),
("ACCEPT",), ("CONTINUE",), ("TEMPFAIL",), ("REPLYCODE", "451 4.3.0 ...").
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

# What Postfix 3.x offers with milter_protocol = 6 (milter8.c: my_actions, MILTER8_V6_PROTO_MASK).
POSTFIX_ACTIONS = 0x1FF
POSTFIX_STEPS = 0x1FFFFF
NO_CONNECT, NO_HELO, NO_MAIL, NO_RCPT, NO_BODY, NO_HDRS, NO_EOH = (1 << i for i in range(7))
NR_HDR, NO_UNKNOWN, NO_DATA = 1 << 7, 1 << 8, 1 << 9
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY = (1 << i for i in range(12, 20))
HDR_LEADSPC = 1 << 20

_NAMES = {b"+": "ADDRCPT", b"-": "DELRCPT", b"2": "ADDRCPT_PAR", b"a": "ACCEPT", b"c": "CONTINUE",
          b"h": "ADDHEADER", b"m": "CHGHEADER", b"p": "PROGRESS", b"r": "REJECT", b"t": "TEMPFAIL",
          b"y": "REPLYCODE", b"O": "OPTNEG", b"d": "DISCARD", b"i": "INSHEADER", b"e": "CHGFROM"}
_FINAL = {"ACCEPT", "CONTINUE", "TEMPFAIL", "REJECT", "REPLYCODE", "DISCARD"}


def packet(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def strings(*words: str | bytes) -> bytes:
    return b"".join((w if isinstance(w, bytes) else w.encode()) + b"\0" for w in words)


def describe(command: bytes, data: bytes) -> tuple:
    """A reply packet as a tuple a test can compare."""
    name = _NAMES.get(command, repr(command))
    if name in ("ADDRCPT", "DELRCPT"):
        return (name, data.rstrip(b"\0").decode())
    if name == "ADDRCPT_PAR":
        address, params = data[:-1].split(b"\0")
        return (name, address.decode(), params.decode())
    if name == "CHGHEADER":
        (index,) = struct.unpack("!I", data[:4])
        field, value = data[4:-1].split(b"\0")
        return (name, index, field.decode(), value)
    if name == "ADDHEADER":
        field, value = data[:-1].split(b"\0")
        return (name, field.decode(), value)
    if name == "REPLYCODE":
        return (name, data.rstrip(b"\0").decode())
    if name == "OPTNEG":
        return (name, *struct.unpack("!III", data[:12]), data[12:])
    return (name,) if not data else (name, data)


class MilterClient:
    """One milter connection, as Postfix's smtpd (or cleanup) opens it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.steps = 0
        self.actions = 0
        self.macro_lists = b""

    @classmethod
    async def open(cls, port: int | None = None, *, path: str | None = None, host: str = "127.0.0.1",
                   timeout: float = 10) -> MilterClient:
        if path is not None:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def read(self, timeout: float = 15) -> tuple | None:
        """The next reply packet described, or None when the filter closed the connection."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
            (length,) = struct.unpack("!I", head)
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except asyncio.IncompleteReadError as exc:
            assert not exc.partial, f"filter closed inside a packet: {exc.partial!r}"
            return None
        except ConnectionResetError:
            return None
        return describe(body[:1], body[1:])

    async def closed(self, timeout: float = 15) -> bool:
        """True when the filter has closed the connection (after any packets still unread)."""
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    async def negotiate(self, version: int = 6, actions: int = POSTFIX_ACTIONS,
                        steps: int = POSTFIX_STEPS) -> tuple:
        await self.send(packet(b"O", struct.pack("!III", version, actions, steps)))
        reply = await self.read()
        assert reply is not None and reply[0] == "OPTNEG", reply
        _, _, self.actions, self.steps, self.macro_lists = reply
        return reply

    async def event(self, command: bytes, data: bytes = b"", *, skip: int = 0, no_reply: int = 0,
                    macros: Sequence[tuple[str, str]] = ()) -> list[tuple]:
        """Macros for the event, then the event unless the filter asked not to get it; its replies."""
        if macros:
            await self.send(packet(b"D", command + strings(*[w for pair in macros for w in pair])))
        if skip and self.steps & skip:
            return []
        await self.send(packet(command, data))
        if no_reply and self.steps & no_reply:
            return []
        return await self.replies()

    async def replies(self) -> list[tuple]:
        """Replies up to and including a final one (modification requests come before it)."""
        out = []
        while True:
            reply = await self.read()
            if reply is None:
                out.append(("CLOSED",))
                return out
            out.append(reply)
            if reply[0] in _FINAL:
                return out

    async def connect(self, client_addr: str = "192.0.2.7", helo: str = "client.test",
                      tls: tuple[str, str] | None = None) -> list[tuple]:
        """CONNECT and HELO; ``tls`` (version, cipher) as Postfix's HELO macros give them after STARTTLS."""
        out = await self.event(b"C", strings("client.test") + b"4" + struct.pack("!H", 40000)
                               + strings(client_addr), skip=NO_CONNECT, no_reply=NR_CONN,
                               macros=[("{client_addr}", client_addr)])
        helo_macros = [("{tls_version}", tls[0]), ("{cipher}", tls[1])] if tls else []
        out += await self.event(b"H", strings(helo), skip=NO_HELO, no_reply=NR_HELO, macros=helo_macros)
        return out

    async def message(self, mail_from: str, rcpts: Sequence[str | tuple[str, ...]], data: bytes, *,
                      queue_id: str = "4ABCDE", auth: str | None = None) -> list[tuple]:
        """MAIL, RCPT..., the header fields of ``data`` (CRLF message) and end of message.

        Returns every reply, the end-of-message answers last. Header values are sent
        as Postfix sends them: lines joined by LF, the leading space kept when the
        filter asked for HDR_LEADSPC (else one space eaten).
        """
        mail_macros = [("i", queue_id)] + ([("{auth_authen}", auth)] if auth else [])
        out = await self.event(b"M", strings(f"<{mail_from}>"), skip=NO_MAIL, no_reply=NR_MAIL,
                               macros=mail_macros)
        return out + await self.rest(rcpts, data, queue_id=queue_id)

    async def rest(self, rcpts: Sequence[str | tuple[str, ...]], data: bytes, *,
                   queue_id: str = "4ABCDE") -> list[tuple]:
        """What follows MAIL: RCPT..., the header fields of ``data`` and end of message; every reply."""
        out = []
        for rcpt in rcpts:
            words = (rcpt,) if isinstance(rcpt, str) else rcpt
            out += await self.event(b"R", strings(f"<{words[0]}>", *words[1:]), skip=NO_RCPT,
                                    no_reply=NR_RCPT)
        out += await self.event(b"T", skip=NO_DATA, no_reply=NR_DATA)
        for name, value in header_fields(data):
            if not self.steps & HDR_LEADSPC and value.startswith(b" "):
                value = value[1:]
            out += await self.event(b"L", name + b"\0" + value + b"\0", skip=NO_HDRS, no_reply=NR_HDR)
        out += await self.event(b"N", skip=NO_EOH, no_reply=NR_EOH)
        body = data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""
        if body:
            out += await self.event(b"B", body, skip=NO_BODY, no_reply=NR_BODY)
        out += await self.event(b"E", macros=[("i", queue_id)])
        return out

    async def abort(self) -> None:
        await self.send(packet(b"A"))

    async def quit(self) -> None:
        """QUIT, then wait until the filter has closed its end."""
        await self.send(packet(b"Q"))
        assert await self.closed(), "the filter did not close after QUIT"
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def header_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value after the colon with lines joined by LF) for each field of a CRLF message."""
    head = data.split(b"\r\n\r\n", 1)[0]
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += b"\n" + line
        else:
            name, _, value = line.partition(b":")
            fields.append([name, value])
    return [(n, v) for n, v in fields]
