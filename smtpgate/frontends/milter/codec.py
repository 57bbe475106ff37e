"""The Sendmail milter protocol, version 6 as Postfix speaks it: bytes in, events out.

Pure: no sockets, no clock. `Decoder.feed` takes whatever a read returned
(part of a packet, several packets) and gives the complete MTA commands as
event values; the `encode_*` functions and the constant reply packets are
what smtpgate answers. See docs/milter.md for the wire format and where each
rule comes from.

A packet is a 4-octet length in network byte order, counting what follows,
then one command octet and its data. Strings are NUL-terminated. Every
octet string is decoded as UTF-8 with surrogate escapes, so an address that
is not valid UTF-8 is echoed back (DELRCPT) octet for octet.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

# Commands from the MTA (docs/milter.md, "Commands").
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies and modification requests from the filter.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_ACCEPT = b"a"
SMFIR_CONTINUE = b"c"
SMFIR_ADDHEADER = b"h"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_REJECT = b"r"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# Actions the filter may ask for (SMFIF_*), offered by the MTA in OPTNEG.
SMFIF_ADDHDRS = 1 << 0
SMFIF_CHGBODY = 1 << 1
SMFIF_ADDRCPT = 1 << 2
SMFIF_DELRCPT = 1 << 3
SMFIF_CHGHDRS = 1 << 4
SMFIF_QUARANTINE = 1 << 5
SMFIF_CHGFROM = 1 << 6
SMFIF_ADDRCPT_PAR = 1 << 7
SMFIF_SETSYMLIST = 1 << 8

# Protocol steps (SMFIP_*): events the filter does not want, replies it will not send.
SMFIP_NOCONNECT = 1 << 0
SMFIP_NOHELO = 1 << 1
SMFIP_NOMAIL = 1 << 2
SMFIP_NORCPT = 1 << 3
SMFIP_NOBODY = 1 << 4
SMFIP_NOHDRS = 1 << 5
SMFIP_NOEOH = 1 << 6
SMFIP_NR_HDR = 1 << 7
SMFIP_NOUNKNOWN = 1 << 8
SMFIP_NODATA = 1 << 9
SMFIP_SKIP = 1 << 10
SMFIP_RCPT_REJ = 1 << 11
SMFIP_NR_CONN = 1 << 12
SMFIP_NR_HELO = 1 << 13
SMFIP_NR_MAIL = 1 << 14
SMFIP_NR_RCPT = 1 << 15
SMFIP_NR_DATA = 1 << 16
SMFIP_NR_UNKN = 1 << 17
SMFIP_NR_EOH = 1 << 18
SMFIP_NR_BODY = 1 << 19
SMFIP_HDR_LEADSPC = 1 << 20

# Macro classes for the OPTNEG macro lists (SETSYMLIST).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

# Postfix sends at most 65535 octets of body per packet and a header field of
# up to header_size_limit (102400 by default): 1 MiB leaves room for both.
MAX_PACKET = 1 << 20

_LENGTH = struct.Struct("!I")
_OPTNEG = struct.Struct("!III")


class ProtocolError(Exception):
    """The MTA sent something that is not the milter protocol; the connection cannot go on."""


# ----------------------------------------------------------------- events


@dataclass(frozen=True)
class Negotiate:
    """OPTNEG: the MTA's protocol version, the actions and the protocol steps it offers."""

    version: int
    actions: int
    protocol: int


@dataclass(frozen=True)
class Macros:
    """DEFINE MACRO: values for the event ``stage`` (its command letter) that follows."""

    stage: str
    values: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Connect:
    """CONNECT: the SMTP client's name and, unless ``family`` is "U", its port and address."""

    hostname: str
    family: str  # "4", "6", "L" (unix socket) or "U" (unknown)
    port: int | None
    address: str | None


@dataclass(frozen=True)
class Helo:
    name: str


@dataclass(frozen=True)
class Mail:
    """MAIL: the sender path as the client wrote it, then its ESMTP parameters."""

    args: tuple[str, ...]


@dataclass(frozen=True)
class Rcpt:
    """RCPT: the recipient path as the client wrote it, then its ESMTP parameters."""

    args: tuple[str, ...]


@dataclass(frozen=True)
class Data:
    pass


@dataclass(frozen=True)
class Header:
    """One header field: its name and the octets after the colon, lines joined by LF."""

    name: str
    value: bytes


@dataclass(frozen=True)
class EndOfHeaders:
    pass


@dataclass(frozen=True)
class Body:
    chunk: bytes


@dataclass(frozen=True)
class EndOfMessage:
    """End of body; old MTAs may send a last body chunk with it."""

    chunk: bytes = b""


@dataclass(frozen=True)
class Abort:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class QuitNewConnection:
    pass


@dataclass(frozen=True)
class Unknown:
    command: str


Event = (Negotiate | Macros | Connect | Helo | Mail | Rcpt | Data | Header | EndOfHeaders | Body
         | EndOfMessage | Abort | Quit | QuitNewConnection | Unknown)


# ----------------------------------------------------------------- decoding


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _strings(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings filling ``data`` exactly."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"{what}: string not NUL-terminated")
    return data[:-1].split(b"\0")


def _empty(data: bytes, what: str) -> None:
    if data:
        raise ProtocolError(f"{what}: {len(data)} unexpected data octets")


def _negotiate(data: bytes) -> Negotiate:
    if len(data) != _OPTNEG.size:
        raise ProtocolError(f"OPTNEG: {len(data)} data octets, expected {_OPTNEG.size}")
    return Negotiate(*_OPTNEG.unpack(data))


def _macros(data: bytes) -> Macros:
    if not data:
        raise ProtocolError("MACRO: no event letter")
    stage = chr(data[0])
    if len(data) == 1:
        return Macros(stage, ())
    words = [_text(w) for w in _strings(data[1:], "MACRO")]
    if len(words) % 2:
        raise ProtocolError("MACRO: a name without a value")
    return Macros(stage, tuple(zip(words[::2], words[1::2])))


def _connect(data: bytes) -> Connect:
    end = data.find(b"\0")
    if end < 0 or end + 1 >= len(data):
        raise ProtocolError("CONNECT: no host name and family")
    hostname, family, rest = _text(data[:end]), chr(data[end + 1]), data[end + 2:]
    if family == "U":
        _empty(rest, "CONNECT")
        return Connect(hostname, family, None, None)
    if family not in "46L" or len(rest) < 3:
        raise ProtocolError(f"CONNECT: bad family {family!r} or no port and address")
    port = int.from_bytes(rest[:2], "big")
    strings = _strings(rest[2:], "CONNECT")
    if len(strings) != 1:
        raise ProtocolError("CONNECT: data after the address")
    return Connect(hostname, family, port, _text(strings[0]))


def _one_string(data: bytes, what: str) -> str:
    strings = _strings(data, what)
    if len(strings) != 1:
        raise ProtocolError(f"{what}: more than one string")
    return _text(strings[0])


def _args(data: bytes, what: str) -> tuple[str, ...]:
    return tuple(_text(w) for w in _strings(data, what))


def _header(data: bytes) -> Header:
    strings = _strings(data, "HEADER")
    if len(strings) != 2 or not strings[0]:
        raise ProtocolError("HEADER: expected a name and a value")
    return Header(_text(strings[0]), strings[1])


def _parse(command: bytes, data: bytes) -> Event:
    """One packet's event; ProtocolError when its data does not fit the command."""
    if command == SMFIC_OPTNEG:
        return _negotiate(data)
    if command == SMFIC_MACRO:
        return _macros(data)
    if command == SMFIC_CONNECT:
        return _connect(data)
    if command == SMFIC_HELO:
        return Helo(_one_string(data, "HELO"))
    if command == SMFIC_MAIL:
        return Mail(_args(data, "MAIL"))
    if command == SMFIC_RCPT:
        return Rcpt(_args(data, "RCPT"))
    if command == SMFIC_HEADER:
        return _header(data)
    if command == SMFIC_BODY:
        return Body(data)
    if command == SMFIC_BODYEOB:
        return EndOfMessage(data)
    if command == SMFIC_UNKNOWN:
        return Unknown(_one_string(data, "UNKNOWN"))
    simple = _SIMPLE.get(command)
    if simple is None:
        raise ProtocolError(f"unknown command {command!r}")
    _empty(data, simple.__name__)
    return simple()


_SIMPLE: dict[bytes, type] = {SMFIC_DATA: Data, SMFIC_EOH: EndOfHeaders, SMFIC_ABORT: Abort,
                              SMFIC_QUIT: Quit, SMFIC_QUIT_NC: QuitNewConnection}


class Decoder:
    """Incremental packet decoder for one connection.

    ``feed`` returns the events of every packet completed so far and keeps
    the rest. A length of zero or over ``max_packet`` is refused as soon as
    its four octets arrive, before any of its data is buffered. After a
    ProtocolError the decoder refuses everything.
    """

    def __init__(self, max_packet: int = MAX_PACKET):
        self.max_packet = max_packet
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def pending(self) -> int:
        """Octets of an unfinished packet held back (non-zero at EOF: a truncated packet)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Event]:
        if self._broken is not None:
            raise ProtocolError(self._broken)
        self._buffer += data
        events: list[Event] = []
        start = 0
        buffer = self._buffer
        try:
            while len(buffer) - start >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(buffer, start)
                if length == 0:
                    raise ProtocolError("packet of length 0 (no command)")
                if length > self.max_packet:
                    raise ProtocolError(f"packet of {length} octets, over the limit of {self.max_packet}")
                end = start + _LENGTH.size + length
                if len(buffer) < end:
                    break
                command = bytes(buffer[start + 4:start + 5])
                events.append(_parse(command, bytes(buffer[start + 5:end])))
                start = end
        except ProtocolError as exc:
            self._broken = str(exc)
            del buffer[:]
            raise
        del buffer[:start]
        return events


# ----------------------------------------------------------------- encoding


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command octet, data."""
    return _LENGTH.pack(1 + len(data)) + command + data


def _c(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError("a milter string cannot hold NUL")
    return raw + b"\0"


CONTINUE = packet(SMFIR_CONTINUE)
ACCEPT = packet(SMFIR_ACCEPT)
TEMPFAIL = packet(SMFIR_TEMPFAIL)
REJECT = packet(SMFIR_REJECT)
PROGRESS = packet(SMFIR_PROGRESS)


def encode_negotiate(version: int, actions: int, protocol: int,
                     macros: Mapping[int, str] | None = None) -> bytes:
    """The filter's OPTNEG: version, actions and steps it takes, macro lists per class (SETSYMLIST)."""
    data = _OPTNEG.pack(version, actions, protocol)
    for stage, names in (macros or {}).items():
        data += _LENGTH.pack(stage) + _c(names)
    return packet(SMFIC_OPTNEG, data)


def encode_reply_code(text: str) -> bytes:
    """A final SMTP reply for the MTA to give its client ("451 4.3.0 ..."); '%' is doubled (sendmail
    reads it as a format string; Postfix undoubles it)."""
    return packet(SMFIR_REPLYCODE, _c(text.replace("%", "%%")))


def encode_add_recipient(address: str, params: str | None = None) -> bytes:
    """ADDRCPT, or ADDRCPT_PAR when ``params`` (space-separated ESMTP parameters) is given."""
    if params is None:
        return packet(SMFIR_ADDRCPT, _c(address))
    return packet(SMFIR_ADDRCPT_PAR, _c(address) + _c(params))


def encode_delete_recipient(address: str) -> bytes:
    """DELRCPT: ``address`` must be spelled as the MTA gave it in RCPT."""
    return packet(SMFIR_DELRCPT, _c(address))


def encode_change_header(index: int, name: str, value: bytes) -> bytes:
    """CHGHEADER: replace the ``index``-th (1-based) field called ``name``; lines of value joined by LF."""
    if not 1 <= index <= 0xFFFFFFFF:
        raise ValueError(f"header index {index} out of range")
    return packet(SMFIR_CHGHEADER, _LENGTH.pack(index) + _c(name) + _c(value))


def encode_add_header(name: str, value: bytes) -> bytes:
    """ADDHEADER: append a field at the end of the header."""
    return packet(SMFIR_ADDHEADER, _c(name) + _c(value))
