"""Every use of aiosmtpd internals, in one place (docs/architecture.md, "aiosmtpd").

aiosmtpd has public handler hooks for EHLO, DATA, AUTH and PROXY, but none for
"a connection is about to be served", "the transaction ended" (HELO, EHLO,
RSET, or aiosmtpd refusing the data itself), "TLS is on", "the client was
silent too long" or "a command nobody knows"; smtpgate needs them all.
`GlueSMTP` overrides the private methods behind them and turns them into the
hooks `before_serving`, `transaction_ended`, `timed_out`, `unknown_command`
and the `tls_active` property, and keeps the verb of the command being served
(`command`). aiosmtpd knows only STARTTLS as encryption: a session it
serves over an implicit-TLS transport (`implicit_tls`) is told that AUTH's
need for TLS is met, so AUTH is offered and accepted there (RFC 8314).
Refusals are values: the checks aiosmtpd makes in its own `smtp_DATA`
(`check_data`), its verdicts on the message data and the glue's own refusals
reach the client through `refuse`, each a `StockRefusal` or
`smtpgate.mail.replies.SMTPReply` carrying both aiosmtpd's line (what a plain
GlueSMTP says) and smtpgate's reply, so a subclass answers them without
reading any reply text. `check_internals` fails loudly when an aiosmtpd release renames
them; a test runs it, and pyproject.toml pins aiosmtpd to the tested minor
range.

`GlueSMTP.smtp_DATA` reads the message data with smtpgate's own reader
(`read_message_data`): aiosmtpd reads it a line at a time, keeps a list of
lines and joins them, and its stream reader's 1001-octet limit pauses and
resumes the transport every 2 KB. smtpgate reads it in large chunks up to the
final dot, with the reader's limit raised (`DATA_READ_LIMIT`) only while it
does, and keeps everything aiosmtpd's `smtp_DATA` shows a client or a handler:
the same replies, the same refusals (`data_refusal`, decided as aiosmtpd's
line-by-line reader decides them, sent once the final dot is in), the same
dot-unstuffing, `envelope.content` and `original_content`, and the DATA hook.

`PrototypeSMTP` (GlueSMTP's base) spares each connection aiosmtpd's
`SMTP.__init__`, which derives its command, hook and AUTH mechanism tables
from the class and the handler with `inspect.getmembers` and `dir` (and
inspects the EHLO hook's signature) every time a client connects: about a
millisecond of CPU per connection, the same result every time.
The stock `__init__` runs once per (class, handler, loop, settings) on a
prototype that never serves a connection; a new connection copies the
prototype's attributes, binds the prototype's own methods to itself, and
gets a fresh stream reader, exactly as `__init__` would have left it.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import types
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol
from warnings import warn

from aiosmtpd.smtp import MISSING, SMTP, Session, _AuthMechAttr, syntax

from smtpgate.frontends.smtp.data_verdict import LINE_TOO_LONG, TOO_MUCH_DATA, DataLimits, data_refusal
from smtpgate.mail import replies
from smtpgate.mail.dataguard import OFF_LOOP_OCTETS, find_in_slices
from smtpgate.mail.replies import Reply, SMTPReply

__all__ = ["AIOSMTPD_REPLIES", "DATA_READ_LIMIT", "DataLimits", "GlueSMTP", "MessageConsumer", "PrototypeSMTP",
           "StockRefusal", "check_internals", "data_refusal", "read_message_data"]

# The private aiosmtpd members smtpgate relies on, and the kind each must be.
_INTERNALS = {
    "_handle_client": "coroutine",
    "_set_rset_state": "function",
    "_set_post_data_state": "function",
    "_reset_timeout": "function",
    "_timeout_cb": "function",
    "_cb_client_connected": "function",  # PrototypeSMTP hands it to a fresh StreamReaderProtocol
    "_call_handler_hook": "coroutine",  # smtp_DATA calls the DATA hook as aiosmtpd does
    "check_helo_needed": "coroutine",
    "check_auth_needed": "coroutine",
    "smtp_HELP": "coroutine",  # its look-up of a verb must not count as the command being served
    "_create_session": "function",  # GlueSMTP's session has no deprecated login_data property
}

# The instance attributes of aiosmtpd's SMTP that smtp_DATA reads, as its source names them.
_DATA_ATTRIBUTES = ("self._reader", "self._writer", "self._decode_data", "self._handle_hooks",
                    "self.data_size_limit", "self.line_length_limit", "self.enable_SMTPUTF8")

# What SMTP.__init__ builds per connection that PrototypeSMTP copies and rebinds.
_PER_CONNECTION_TABLES = ("self._smtp_methods", "self._auth_methods", "self._handle_hooks",
                          "self.command_size_limits.clear()")

# The reply lines aiosmtpd's own code pushes (commands the glue leaves to it), translated
# to smtpgate's (code, enhanced code, text). What the glue refuses itself is a StockRefusal.
AIOSMTPD_REPLIES = {
    "503 Error: need MAIL command": replies.NEED_MAIL.line(),
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO first",
    "500 Command line too long": "500 5.5.6 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Error: strict ASCII mode": "500 5.6.7 Error: non-ASCII without SMTPUTF8",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "503 Already authenticated": "503 5.5.1 Already authenticated",
    "501 Not enough value": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "501 Too many values": "501 5.5.4 Syntax: AUTH mechanism [initial-response]",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 OK",
}



class StockRefusal(SMTPReply):
    """A refusal aiosmtpd itself would make: its own line (`stock`, what a plain GlueSMTP
    says, as aiosmtpd does) and smtpgate's reply for it. Unless a reason is given, the
    reason is the reply's wording, as for any refusal passed on."""

    def __init__(self, stock: str, reply: Reply, reason: str | None = None, *, rejects_message: bool = False):
        super().__init__(reply, reason or reply.wording, rejects_message=rejects_message)
        self.stock = stock


# The stock lines of the glue's own refusals, as aiosmtpd's smtp_DATA words them.
_NEED_RCPT = "503 Error: need RCPT command"
_DATA_SYNTAX = "501 Syntax: DATA"
_STRICT_ASCII = "500 Error: strict ASCII mode"
_NON_ASCII = Reply(500, "5.6.7", "Error: non-ASCII without SMTPUTF8")

# aiosmtpd's verdicts on the message data (data_verdict): each refuses the message.
_DATA_REFUSALS = {
    TOO_MUCH_DATA: (replies.MESSAGE_TOO_BIG, "data over limits.max_message_size"),
    LINE_TOO_LONG: (replies.LINE_TOO_LONG, "line over 1000 octets"),
}


def _data_refused(verdict: str) -> StockRefusal:
    reply, reason = _DATA_REFUSALS[verdict]
    return StockRefusal(verdict, reply, reason, rejects_message=True)


# The stream reader's limit while message data is read (commands keep aiosmtpd's
# line_length_limit): the most a chunk holds before it is moved out, and half of
# what the reader buffers before it pauses the transport.
DATA_READ_LIMIT = 64 * 1024

# aiosmtpd's logger, which tells of a connection lost during DATA.
_aiosmtpd_log = logging.getLogger("mail.log")


def check_internals() -> list[str]:
    """The aiosmtpd internals smtpgate uses that are missing or changed; empty when all is well."""
    problems = []
    for name, kind in _INTERNALS.items():
        member = getattr(SMTP, name, None)
        if member is None:
            problems.append(f"aiosmtpd.smtp.SMTP.{name} is gone")
        elif kind == "coroutine" and not inspect.iscoroutinefunction(member):
            problems.append(f"aiosmtpd.smtp.SMTP.{name} is no longer a coroutine function")
        elif kind == "function" and not callable(member):
            problems.append(f"aiosmtpd.smtp.SMTP.{name} is no longer callable")
    source = inspect.getsource(inspect.getmodule(SMTP))
    init = inspect.getsource(SMTP.__init__)
    for table in _PER_CONNECTION_TABLES:
        if table not in init:
            problems.append(f"aiosmtpd.smtp.SMTP.__init__ no longer sets up {table}")
    data = inspect.getsource(SMTP.smtp_DATA)
    for attribute in _DATA_ATTRIBUTES:
        if attribute not in data:
            problems.append(f"aiosmtpd.smtp.SMTP.smtp_DATA no longer uses {attribute}")
    problems.extend(_check_stream_reader_limit())
    if "method" not in getattr(_AuthMechAttr, "_fields", ()):
        problems.append("aiosmtpd.smtp._AuthMechAttr no longer has a method field")
    if "self._tls_protocol" not in source:
        problems.append("aiosmtpd.smtp.SMTP no longer keeps _tls_protocol")
    if "self._auth_require_tls" not in inspect.getsource(SMTP.smtp_AUTH):
        problems.append("aiosmtpd.smtp.SMTP.smtp_AUTH no longer reads _auth_require_tls")
    if "method = self._smtp_methods.get(command)" not in source:
        problems.append("aiosmtpd.smtp.SMTP no longer looks commands up in _smtp_methods")
    for line in (*AIOSMTPD_REPLIES, _NEED_RCPT, _DATA_SYNTAX, _STRICT_ASCII, *_DATA_REFUSALS):
        written = line.replace("send HELO first", "send {helo} first")  # an f-string there
        if not any(f"{q}{written}{q}" in source for q in ("'", '"')):
            problems.append(f"aiosmtpd no longer replies {line!r}")
    return problems


def _check_stream_reader_limit() -> list[str]:
    """asyncio.StreamReader keeps its limit in _limit, and readuntil obeys a changed one."""
    loop = asyncio.new_event_loop()  # never run: readuntil finds what is buffered without waiting
    try:
        reader = asyncio.StreamReader(limit=4, loop=loop)
        if getattr(reader, "_limit", None) != 4:
            return ["asyncio.StreamReader no longer keeps its limit in _limit"]
        reader.feed_data(b"123456\r\n")
        try:
            _run_at_once(reader.readuntil(b"\r\n"))
            return ["asyncio.StreamReader.readuntil no longer enforces its limit"]
        except asyncio.LimitOverrunError:
            pass
        reader._limit = 16
        try:
            obeyed = _run_at_once(reader.readuntil(b"\r\n")) == b"123456\r\n"
        except asyncio.LimitOverrunError:  # still the limit it was made with
            obeyed = False
        if not obeyed:
            return ["asyncio.StreamReader.readuntil no longer obeys a changed _limit"]
        return []
    finally:
        loop.close()


def _run_at_once(coroutine):
    """The result of a coroutine that finishes without waiting."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine waited")


class _MessageData:
    """Message data as it arrives, dot-stuffed, and aiosmtpd's verdict on it.

    Once the data is far enough past the size limit for the verdict to be known, it is
    dropped: what follows is read up to the final dot and counted, no longer kept.
    """

    __slots__ = ("chunks", "size", "refusal", "_size_limit", "_line_limit", "_read_limit", "_decide_at")

    def __init__(self, size_limit: int | None, line_limit: int, read_limit: int) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self.refusal: str | None = None
        self._size_limit = size_limit
        self._line_limit = line_limit
        self._read_limit = read_limit
        self._decide_at = size_limit + read_limit + 3 if size_limit else None

    def add(self, piece: bytes | memoryview) -> None:
        self.size += len(piece)
        if self.refusal is not None:
            return
        self.chunks.append(piece)
        if self._decide_at is not None and self.size >= self._decide_at:
            self.refusal = self._verdict(b"".join(self.chunks))
            self.chunks = []

    def _verdict(self, data: bytes) -> str | None:
        return data_refusal(data, self._size_limit, self._line_limit, self._read_limit)

    def finish(self) -> tuple[str | None, bytes]:
        """(aiosmtpd's refusal, b"") or (None, the data dot-unstuffed as RFC 5321 4.5.2 says)."""
        if self.refusal is not None:
            return self.refusal, b""
        data = b"".join(self.chunks)
        self.chunks = []
        refusal = self._verdict(data)
        if refusal is not None:
            return refusal, b""
        # A line that begins with "." loses that ".": the first line, and each after a CRLF.
        if find_in_slices(data, b"\r\n.") != -1:
            data = data.replace(b"\r\n.", b"\r\n")
        if data[:1] == b".":
            data = data[1:]
        return None, data


class MessageConsumer(Protocol):
    """Where a streamed message's data goes (GlueSMTP.data_consumer): the octets as sent."""

    async def feed(self, piece: bytes | memoryview) -> None: ...
    async def finish(self) -> str: ...  # the reply to the final dot, logged by the consumer
    def abandon(self) -> None: ...


async def read_message_data(reader: asyncio.StreamReader,
                            add: Callable[[bytes | memoryview], Awaitable[None] | None]) -> None:
    """Read message data up to and including its final dot, handing `add` what precedes the dot.

    The final dot is a line "." (RFC 5321 4.1.1.4), the first line included; lines end at
    CRLF only. `add` gets the octets as sent (dot-stuffed), in order, in pieces no longer
    than the reader's limit allows; whatever follows the final dot stays in the reader.
    An `add` that returns an awaitable is awaited before more is read (a streamed message
    waits for its upstream).
    """
    async def put(piece: bytes | memoryview) -> None:
        pending = add(piece)
        if pending is not None:
            await pending

    while True:  # at the start of a line
        first = await reader.readexactly(1)
        if first != b"." and first != b"\r":
            await put(first)
            break
        # The final dot, a dot-stuffed line, or a line whose first octet is a CR that the
        # next may make a CRLF: read to the next LF, so no separator begins in what was read.
        head = first
        while True:
            try:
                rest = await reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as exc:
                # A long run without LF: move it out but for its last octet (maybe a CR),
                # so no CRLF is split between two pieces.
                if head:
                    await put(head)
                    head = b""
                await put(await reader.read(exc.consumed - 1))
        line = head + rest
        if head and line == b".\r\n":
            return
        await put(line)
        if not line.endswith(b"\r\n"):
            break  # within a line, after a bare LF
    # No separator begins in what was read: the first CRLF "." CRLF from here ends the data.
    while True:
        try:
            chunk = await reader.readuntil(b"\r\n.\r\n")
            break
        except asyncio.LimitOverrunError as exc:
            # CPython leaves the last len(separator) - 1 octets in the reader, so a
            # separator that arrives in pieces is still found.
            await put(await reader.read(exc.consumed))
    await put(memoryview(chunk)[:-3])  # the last line keeps its CRLF; ".\r\n" is the final dot


# handler -> {(class, loop, settings): prototype}; a handler that goes (a stopped
# gate) takes its prototypes with it, and a reload's new settings replace the oldest.
_PROTOTYPES: weakref.WeakKeyDictionary[Any, dict[tuple, _Prototype]] = weakref.WeakKeyDictionary()
_PROTOTYPES_PER_HANDLER = 8


class _Prototype:
    """A connection set up by aiosmtpd's own __init__, and its attributes sorted once:
    those a new connection shares as they are, and those it gets its own copy of (bound
    methods, rebound to it; dicts, which may hold them or be changed per connection)."""

    __slots__ = ("instance", "shared", "own")

    def __init__(self, instance: SMTP) -> None:
        self.instance = instance
        self.shared = {}
        own = []
        for name, value in instance.__dict__.items():
            if isinstance(value, (dict, types.MethodType, _AuthMechAttr)):
                own.append((name, value))
            else:
                self.shared[name] = value
        self.own = tuple(own)


class PrototypeSMTP(SMTP):
    """aiosmtpd.smtp.SMTP whose per-connection set-up is a copy of a prototype."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        loop = kwargs.get("loop") or asyncio.get_event_loop()
        try:
            key = (type(self), loop, tuple(sorted(kwargs.items())))
            prototypes = _PROTOTYPES.setdefault(handler, {})
            prototype = prototypes.get(key)
        except TypeError:  # a setting that cannot be a key: the stock way
            super().__init__(handler, **kwargs)
        else:
            if prototype is None:
                instance = object.__new__(type(self))
                SMTP.__init__(instance, handler, **kwargs)
                if len(prototypes) >= _PROTOTYPES_PER_HANDLER:
                    del prototypes[next(iter(prototypes))]
                prototype = prototypes[key] = _Prototype(instance)
            self._adopt(prototype)
        self._own_command_limits()

    def _own_command_limits(self) -> None:
        """Command line limits of this session alone.

        aiosmtpd keeps them in one class-wide dict that each new connection empties and
        each EHLO raises (MAIL by 26 octets for SIZE, 10 for SMTPUTF8): a connection
        arriving would shrink the MAIL limit of every session already past EHLO, and
        repeated EHLOs would raise it without end (smtp_EHLO starts MAIL's afresh).
        """
        base = self.command_size_limit
        self.command_size_limits = collections.defaultdict(lambda: base)

    def _adopt(self, prototype: _Prototype) -> None:
        mine = self.__dict__
        old = prototype.instance
        for name, value in prototype.shared.items():
            if name not in mine:  # what a subclass set before calling us stays
                mine[name] = value
        for name, value in prototype.own:
            if name not in mine:
                mine[name] = _rebound(value, old, self)
        # A fresh stream reader and protocol state, as StreamReaderProtocol.__init__ makes them.
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )


def _rebound(value: Any, old: object, new: object) -> Any:
    """value with the methods bound to old bound to new instead (in dicts and AUTH entries too)."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, _AuthMechAttr):
        return value._replace(method=_rebound(value.method, old, new))
    if isinstance(value, dict):
        return {k: _rebound(v, old, new) for k, v in value.items()}
    return value


class _Commands(dict):
    """aiosmtpd's command table, answering every verb: an unknown one goes to `unknown`.

    aiosmtpd closes a session after five unknown verbs with a 502 of its own; smtpgate
    counts them with its other bad commands against limits.max_bad_commands instead.
    `verb` is the last verb looked up for serving ("UNKNOWN" for one not in the table).
    """

    def __init__(self, table: dict, unknown) -> None:
        super().__init__(table)
        self.unknown = unknown
        self.verb: str | None = None
        self.recording = True
        self.seen: Callable[[str, str | None], None] | None = None  # debugging: told of each command

    def get(self, verb, default=None):
        found = super().get(verb)
        if self.recording:
            self.verb = verb if found is not None else "UNKNOWN"
        method = found if found is not None else partial(self.unknown, verb)
        seen = self.seen
        if seen is None or not self.recording:
            return method

        async def traced(arg: str | None) -> None:
            seen(verb, arg)
            await method(arg)

        return traced


class GlueSession(Session):
    """aiosmtpd's Session with `login_data` a plain attribute.

    aiosmtpd's smtp_AUTH sets `Session.login_data`, a deprecated property that logs
    a warning on every successful AUTH; smtpgate reads `auth_data` only.
    """

    login_data: Any = None


class GlueSMTP(PrototypeSMTP):
    """aiosmtpd's protocol with the hooks smtpgate needs; see the module docstring."""

    data_read_limit = DATA_READ_LIMIT

    def __init__(self, *args, implicit_tls: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._smtp_methods = _Commands(self._smtp_methods, self.unknown_command)
        self.receiving_data = False  # between DATA's 354 and the final dot
        # Served over TLS from the first byte: the encryption AUTH asks for is there, so
        # aiosmtpd, which counts only STARTTLS, must not ask for it (no 538, AUTH in EHLO).
        self.implicit_tls = implicit_tls
        if implicit_tls:
            self._auth_require_tls = False

    @property
    def command(self) -> str | None:
        """The verb of the command being served (upper case; "UNKNOWN"), None before the first."""
        return self._smtp_methods.verb

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_active:  # implicit TLS, or STARTTLS done: no second handshake
            await self.refuse(SMTPReply(replies.TLS_ACTIVE, replies.TLS_ACTIVE.wording))
            return
        await super().smtp_STARTTLS(arg)

    async def push(self, status) -> None:
        await super().push(status)
        if isinstance(status, str) and status[:1] != "3" and status[3:4] != "-":
            # The command is answered: a refusal before the next verb is read (a line too
            # long, an empty line) refuses a line that is no known command.
            self._smtp_methods.verb = "UNKNOWN"

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self.command_size_limits.pop("MAIL", None)  # no SIZE or SMTPUTF8 after HELO
        await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.pop("MAIL", None)  # aiosmtpd adds SIZE's and SMTPUTF8's room to it
        await super().smtp_EHLO(hostname)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        self._smtp_methods.recording = False  # HELP MAIL is still HELP
        try:
            await super().smtp_HELP(arg)
        finally:
            self._smtp_methods.recording = True

    def _create_session(self) -> Session:
        return GlueSession(self.loop)

    async def unknown_command(self, verb: str, arg: str | None) -> None:
        """A verb aiosmtpd does not know (HELP's lookup of one never gets here: no syntax)."""
        reply = Reply(500, "5.5.2", f'Error: command "{verb}" not recognized')
        await self.refuse(SMTPReply(reply, reply.wording))

    def timed_out(self) -> None:
        """limits.idle_timeout passed without a command (or message data); the default closes."""
        super()._timeout_cb()

    def restart_timer(self) -> None:
        self._reset_timeout()

    def _timeout_cb(self) -> None:
        self.timed_out()

    def eof_received(self) -> bool:
        # aiosmtpd cancels the session at the client's FIN but keeps a plain transport half
        # open, and before the command loop (a FIN before the greeting: a load balancer's
        # health check, a port scan) nothing closes it. Closed here, whatever the stage, so
        # connection_lost ends the session and gives back what it holds.
        super().eof_received()
        return False

    def data_received(self, data: bytes) -> None:
        # Message data is not a command, so aiosmtpd would not restart the timer for it; a
        # big message on a slow link must not time out while its bytes keep coming.
        if self.receiving_data:
            self._reset_timeout()
        super().data_received(data)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        self.receiving_data = True
        try:
            await self._serve_data(arg)
        finally:
            self.receiving_data = False

    async def _serve_data(self, arg: str | None) -> None:
        """aiosmtpd's smtp_DATA (1.4), but for how the message data is read."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        refusal = self.check_data(arg)
        if refusal is not None:
            await self.refuse(refusal)
            return
        self.data_starting()
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        consumer = self.data_consumer()
        if consumer is not None:
            await self._stream_data(consumer)
            return
        original_content = await self._read_whole()
        if original_content is not None:
            await self._hand_over(original_content)

    def check_data(self, arg: str | None) -> SMTPReply | None:
        """aiosmtpd's checks of a DATA command from a client past HELO and AUTH: the refusal, or None."""
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            return StockRefusal(_NEED_RCPT, replies.NO_VALID_RECIPIENTS)
        if arg:
            return StockRefusal(_DATA_SYNTAX, Reply(501, "", "Syntax: DATA"))
        return None

    async def _read_whole(self) -> bytes | None:
        """The message data, read whole and dot-unstuffed; None when aiosmtpd's verdict refused it."""
        reader = self._reader
        command_limit = reader._limit
        data = _MessageData(self.data_size_limit, self.line_length_limit, command_limit)
        reader._limit = max(command_limit, self.data_read_limit)
        try:
            await read_message_data(reader, data.add)
        except asyncio.CancelledError:
            _aiosmtpd_log.info("Connection lost during DATA")
            self._writer.close()
            raise
        finally:
            reader._limit = command_limit

        # As aiosmtpd: a refusal of the data is sent once the final dot is in.
        # Joining, checking and unstuffing a large message takes tens of milliseconds of
        # CPU: off the event loop, so other sessions are served meanwhile.
        refusal, original_content = (await asyncio.to_thread(data.finish) if data.size > OFF_LOOP_OCTETS
                                     else data.finish())
        if refusal is not None:
            await self.refuse(_data_refused(refusal))
            self._set_post_data_state()
            return None
        return original_content

    async def _hand_over(self, original_content: bytes) -> None:
        """The data to the handler's DATA hook (or its process_message), as aiosmtpd hands it."""
        content: str | bytes
        if self._decode_data:
            if self.enable_SMTPUTF8:
                content = original_content.decode("utf-8", errors="surrogateescape")
            else:
                try:
                    content = original_content.decode("ascii", errors="strict")
                except UnicodeDecodeError:
                    await self.refuse(StockRefusal(_STRICT_ASCII, _NON_ASCII))
                    return
        else:
            content = original_content
        self.envelope.content = content
        self.envelope.original_content = original_content

        if "DATA" in self._handle_hooks:
            status = await self._call_handler_hook("DATA")
        else:
            status = MISSING
            if hasattr(self.event_handler, "process_message"):
                warn("Use handler.handle_DATA() instead of .process_message()", DeprecationWarning)
                args = (self.session.peer, self.envelope.mail_from, self.envelope.rcpt_tos, self.envelope.content)
                if asyncio.iscoroutinefunction(self.event_handler.process_message):
                    status = await self.event_handler.process_message(*args)
                else:
                    status = self.event_handler.process_message(*args)
                if status is None:
                    status = MISSING
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _stream_data(self, consumer: MessageConsumer) -> None:
        """The message data handed to `consumer` as it arrives; its finish() is the reply.

        aiosmtpd's own refusals (size, line length) are decided on the way: once one is
        known the consumer is abandoned, the rest is read and counted only, and the refusal
        is sent after the final dot, as aiosmtpd sends it.
        """
        reader = self._reader
        command_limit = reader._limit
        limits = DataLimits(self.data_size_limit, self.line_length_limit, command_limit)
        reader._limit = max(command_limit, self.data_read_limit)

        def add(piece: bytes | memoryview) -> Awaitable[None] | None:
            if limits.refusal is not None:
                return None
            if limits.add(piece) is not None:
                consumer.abandon()
                return None
            return consumer.feed(piece)

        try:
            await read_message_data(reader, add)
        except asyncio.CancelledError:
            consumer.abandon()
            _aiosmtpd_log.info("Connection lost during DATA")
            self._writer.close()
            raise
        except BaseException:
            consumer.abandon()
            raise
        finally:
            reader._limit = command_limit
        refusal = limits.finish()
        if refusal is not None:
            consumer.abandon()
            await self.refuse(_data_refused(refusal))
            self._set_post_data_state()
            return
        status = await consumer.finish()
        self._set_post_data_state()
        await self.answer(status)

    async def refuse(self, refusal: SMTPReply) -> None:
        """Refuse the command being served; a StockRefusal in aiosmtpd's own words."""
        await self.push(refusal.stock if isinstance(refusal, StockRefusal) else refusal.line())

    async def answer(self, status: str) -> None:
        """The consumer's reply to the final dot (see MessageConsumer.finish)."""
        await self.push(status)

    def data_consumer(self) -> MessageConsumer | None:
        """Where this message's data goes as it arrives; None: collected whole, as aiosmtpd does."""
        return None

    async def before_serving(self) -> bool:
        """Called before the greeting; False closes the connection (the hook pushed a reply)."""
        return True

    def data_starting(self) -> None:
        """DATA is accepted: the 354 goes out next, then the message is read."""

    def transaction_ended(self) -> None:
        """HELO, EHLO, RSET, or a refusal of the data: the transaction is over."""

    @property
    def tls_active(self) -> bool:
        """The session is encrypted: an implicit-TLS transport, or STARTTLS done."""
        return self.implicit_tls or getattr(self, "_tls_protocol", None) is not None

    async def _handle_client(self) -> None:
        if await self.before_serving():
            await super()._handle_client()

    def _set_rset_state(self) -> None:
        self.transaction_ended()
        super()._set_rset_state()

    def _set_post_data_state(self) -> None:
        # Also reached when aiosmtpd refuses the data itself (size, line length).
        self.transaction_ended()
        super()._set_post_data_state()
