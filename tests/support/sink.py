"""An upstream SMTP server that tests control and inspect.

`Sink` runs aiosmtpd's protocol on the caller's event loop (no thread), so an
async test can change its behaviour between two commands and wait for what it
recorded without sleeping. It speaks the extensions smtpgate passes through:
DSN (RFC 3461), SMTPUTF8, 8BITMIME, SIZE, PIPELINING, STARTTLS and AUTH
PLAIN/LOGIN/XOAUTH2 (each of DSN, SMTPUTF8, 8BITMIME and PIPELINING can be
switched off to play an upstream without it), and records MAIL/RCPT
parameters with their original case. It can also stand for a
certificate-based connector: MAIL is refused unless the client presented a
TLS certificate naming an expected host.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import collections
import re
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = ["Received", "Sink", "SinkSMTP", "client_tls_context", "make_test_cert", "make_test_tls"]

# esmtp-keyword (RFC 5321 4.1.2)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


@dataclass
class Received:
    """One message whose final dot reached the sink.

    `data` holds the bytes after dot-unstuffing with their CRLF line ends,
    exactly as the client sent them. `reply` is what the sink answered to the
    dot: None while the answer is held (`hold_data`) or when the connection
    was dropped instead (`drop_after_data`).
    """

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[list[str]]
    data: bytes
    peer: Any
    helo: str | None = None
    tls: bool = False
    auth_login: str | None = None
    reply: str | None = None
    client_cert: str | None = None  # subject CN of the TLS client certificate, if one was presented


class _SinkEnvelope(Envelope):
    def __init__(self) -> None:
        super().__init__()
        # One list of parameters per accepted recipient, parallel to rcpt_tos
        # (aiosmtpd's own rcpt_options is one flat list for all of them).
        self.rcpt_params: list[list[str]] = []


class SinkSMTP(SMTP):
    """aiosmtpd's SMTP protocol with the sink's behaviour controls.

    MAIL, RCPT and EHLO are replaced: aiosmtpd 1.4.6 uppercases parameters
    and refuses every one but SIZE, BODY and SMTPUTF8, while an upstream that
    offers DSN must take RET/ENVID/NOTIFY/ORCPT and a test must see them as
    sent.
    """

    # Room for DSN's ENVID and ORCPT (RFC 3461 4: commands may grow by 500
    # octets); aiosmtpd's StreamReader still stops a line at 1001 octets.
    command_size_limits: dict[str, int] = collections.defaultdict(lambda: 1000)

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        self.sink = sink
        # What the next reply answers: "greeting", a command verb, or "dot" (fault knobs).
        self._stage = "greeting"
        self._last_command = ""  # the last command verb, "dot" once a message's dot is in
        self._after_data = bytearray()
        super().__init__(_Hooks(sink), **kwargs)
        self._smtp_methods = {
            name: self._recording(name, method) for name, method in self._smtp_methods.items()
        }

    def _recording(self, name: str, method: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def record_then_run(arg: str | None) -> None:
            shown = arg
            if name == "AUTH" and arg:
                # Keep the mechanism, not the credentials of an initial response.
                mechanism, _, rest = arg.partition(" ")
                shown = mechanism + (" ***" if rest else "")
            self.sink._command(name if shown is None else f"{name} {shown}")
            self._stage = self._last_command = name
            self._after_data = bytearray()
            await method(arg)

        return record_then_run

    def _create_envelope(self) -> Envelope:
        return _SinkEnvelope()

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_last_command", None) == "DATA":
            self._after_data += data  # what the client wrote once DATA was taken
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.sink._protocols.discard(self)
        if self._last_command == "DATA":
            self.sink.abandoned_data.append(bytes(self._after_data))
            self.sink.closed_after_data += 1
        self.sink._changed()

    # -- fault knobs: greeting, stall, raw_replies ------------------------
    async def push(self, status: Any) -> None:
        sink, stage = self.sink, self._stage
        held = sink.hold.get(stage)
        if held is not None:
            sink.held.append(stage)
            sink._changed()
            await held.wait()  # answered late, once the test sets the event
        if stage in sink.stall:
            sink.stalled.append(stage)
            sink._changed()
            # Never answered; connection_lost cancels this task.
            await asyncio.get_running_loop().create_future()
        raw = sink.raw_replies.get(stage)
        if raw is not None:
            self._stage = ""  # one reply replaced, not every line of a multi-line one
            assert self._writer is not None
            self._writer.write(raw)
            await self._writer.drain()
            return
        if stage == "greeting" and sink.greeting is not None:
            self._stage = ""
            await super().push(sink.greeting)
            if not sink.greeting.startswith("2"):
                assert self.transport is not None
                self.transport.close()
            return
        await super().push(status)
        if stage == "DATA" and status.startswith("354") and "body" in sink.stall:
            # The message is never read: the sink's receive window fills, then the sender's.
            sink.stalled.append("body")
            sink._changed()
            await asyncio.get_running_loop().create_future()

    async def smtp_DATA(self, arg: str) -> None:
        reply = self.sink.data_command_reply
        if reply is not None and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(reply)
            return
        hold = self.sink.hold_354
        if hold is not None and self.envelope is not None and self.envelope.rcpt_tos:
            self.sink.held_354 += 1
            self.sink._changed()
            await hold.wait()
        self._data_octets = 0
        await super().smtp_DATA(arg)

    def data_received(self, data: bytes) -> None:
        if self._last_command == "DATA":
            self._data_octets = getattr(self, "_data_octets", 0) + len(data)
            self.sink.data_octets += len(data)
            self.sink._changed()
            limit = self.sink.drop_mid_data
            if limit is not None and self._data_octets > limit and self.transport is not None:
                self.transport.abort()  # an upstream that goes away in the middle of a message
                return
        super().data_received(data)

    # -- EHLO -----------------------------------------------------------
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        sink = self.sink
        keywords = [self.hostname]
        if self.data_size_limit:
            keywords.append(f"SIZE {self.data_size_limit}")
        if sink.eightbitmime:
            keywords.append("8BITMIME")
        if sink.pipelining:
            keywords.append("PIPELINING")
        if self.enable_SMTPUTF8:
            keywords.append("SMTPUTF8")
        if sink.dsn:
            keywords.append("DSN")
        if self.tls_context and not self._tls_protocol:
            keywords.append("STARTTLS")
        mechanisms = (["LOGIN", "PLAIN"] if sink.auth is not None else []) + (
            ["XOAUTH2"] if sink.xoauth2 is not None else [])
        if mechanisms:
            keywords.append("AUTH " + " ".join(mechanisms))
        keywords.append("HELP")
        for i, keyword in enumerate(keywords):
            await self.push(("250 " if i == len(keywords) - 1 else "250-") + keyword)

    async def smtp_AUTH(self, arg: str) -> None:
        if self.sink.auth is None and self.sink.xoauth2 is None:
            await self.push("502 5.5.1 AUTH not available")
            return
        await super().smtp_AUTH(arg)

    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        """SASL XOAUTH2 as Exchange Online answers it.

        The response base64("user=" U ^A "auth=Bearer " T ^A ^A), as an
        initial response or after an empty 334; a refused token gets
        "535 5.7.3 Authentication unsuccessful" at once (Microsoft's
        "Authenticate an IMAP, POP or SMTP connection using OAuth").
        """
        sink = self.sink
        if sink.xoauth2 is None:
            return AuthResult(success=False, handled=False)
        if len(args) == 1:
            response = await self.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False, handled=True)
        else:
            try:
                response = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        fields = dict(
            part.split(b"=", 1) for part in response.split(b"\x01") if b"=" in part
        )
        user = fields.get(b"user", b"").decode("utf-8", "replace")
        scheme, _, token = fields.get(b"auth", b"").decode("utf-8", "replace").partition(" ")
        if not response.endswith(b"\x01\x01") or scheme != "Bearer" or not user or not token:
            await self.push("501 5.5.2 Malformed XOAUTH2 initial response")
            return AuthResult(success=False, handled=True)
        sink.auth_tokens.append(token)
        sink._changed()
        if sink.xoauth2(user, token):
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False, message="535 5.7.3 Authentication unsuccessful")

    # -- MAIL -----------------------------------------------------------
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self._refuse_without_auth():
            return
        if await self._refuse_without_client_cert():
            return
        assert self.session is not None and self.envelope is not None
        syntaxerr = "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
        path = self._strip_command_keyword("FROM:", arg or "")
        if path is None:
            await self.push(syntaxerr)
            return
        address, rest = self._path(path)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if rest and not self.session.extended_smtp:
            await self.push(syntaxerr)
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        options = rest.split()
        refusal = self._check_mail_params(options)
        if refusal:
            await self.push(refusal)
            return
        reply = self.sink.mail_reply
        if reply and not reply.startswith("2"):
            await self.push(reply)
            return
        self.envelope.mail_from = address
        self.envelope.mail_options = options
        self.envelope.smtp_utf8 = any(o.upper() == "SMTPUTF8" for o in options)
        await self.push(reply or "250 2.1.0 Ok")

    def _check_mail_params(self, options: list[str]) -> str | None:
        """Return the refusal for MAIL parameters a real server would refuse, else None."""
        sink = self.sink
        params = self._params(options)
        if params is None:
            return "501 5.5.4 Bad MAIL parameter syntax"
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return "501 5.5.4 Bad SIZE parameter"
                if self.data_size_limit and int(value) > self.data_size_limit:
                    return "552 5.3.4 Message size exceeds fixed limit"
            elif key == "BODY":
                if not sink.eightbitmime:
                    return "555 5.5.4 BODY needs 8BITMIME, which is not offered"
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return "501 5.5.4 SMTPUTF8 takes no value"
                if not self.enable_SMTPUTF8:
                    return "555 5.5.4 SMTPUTF8 not supported"
            elif key == "RET" and sink.dsn:
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return "501 5.5.4 RET must be FULL or HDRS"
            elif key == "ENVID" and sink.dsn:
                if not value:
                    return "501 5.5.4 ENVID needs a value"
            elif key == "AUTH" and (sink.dsn or sink.auth is not None):
                if not value:
                    return "501 5.5.4 AUTH needs a value"
            else:
                return "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
        return None

    # -- RCPT -----------------------------------------------------------
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self._refuse_without_auth():
            return
        assert self.session is not None and self.envelope is not None
        envelope = self.envelope
        assert isinstance(envelope, _SinkEnvelope)
        if envelope.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        syntaxerr = "501 5.5.4 Syntax: RCPT TO:<address> [SP <rcpt-parameters>]"
        path = self._strip_command_keyword("TO:", arg or "")
        if path is None:
            await self.push(syntaxerr)
            return
        address, rest = self._path(path)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return
        if not address or (rest and not self.session.extended_smtp):
            await self.push(syntaxerr)
            return
        options = rest.split()
        refusal = self._check_rcpt_params(options)
        if refusal:
            await self.push(refusal)
            return
        reply = self.sink._rcpt_reply(address)
        if reply and not reply.startswith("2"):
            await self.push(reply)
            return
        envelope.rcpt_tos.append(address)
        envelope.rcpt_params.append(options)
        envelope.rcpt_options.extend(options)
        await self.push(reply or "250 2.1.5 Ok")

    def _check_rcpt_params(self, options: list[str]) -> str | None:
        """Return the refusal for RCPT parameters a real server would refuse, else None."""
        params = self._params(options)
        if params is None:
            return "501 5.5.4 Bad RCPT parameter syntax"
        for key, value in params.items():
            if key == "NOTIFY" and self.sink.dsn:
                words = set((value or "").upper().split(","))
                if words != {"NEVER"} and not (words and words <= _NOTIFY_WORDS):
                    return "501 5.5.4 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY"
            elif key == "ORCPT" and self.sink.dsn:
                addr_type, semicolon, original = (value or "").partition(";")
                if not (addr_type and semicolon and original):
                    return "501 5.5.4 ORCPT must be addr-type;address"
            else:
                return "555 5.5.4 RCPT TO parameters not recognized or not implemented"
        return None

    # -- helpers --------------------------------------------------------
    async def _refuse_without_auth(self) -> bool:
        assert self.session is not None
        if self.sink.require_auth and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False

    async def _refuse_without_client_cert(self) -> bool:
        # As an Exchange Online connector that identifies the sender by its certificate does.
        names = self.sink.client_cert_names
        if names is None or client_cert_names(self.transport) & names:
            return False
        await self.push("550 5.7.64 TenantAttribution; Relay Access Denied")
        return True

    def _path(self, arg: str) -> tuple[str | None, str]:
        """Split `<addr> params` into the address ('' for the null path) and the rest."""
        arg = arg.strip()
        if arg.startswith("<>"):
            return "", arg[2:].strip()
        address, rest = self._getaddr(arg)
        if not address:
            return None, ""
        return address, (rest or "").strip()

    @staticmethod
    def _params(options: list[str]) -> dict[str, str | None] | None:
        """Parse esmtp-params keyed by upper-cased keyword; None on bad syntax or a repeat."""
        params: dict[str, str | None] = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not _KEYWORD.match(key) or (eq and not value) or key.upper() in params:
                return None
            params[key.upper()] = value if eq else None
        return params


class _Hooks:
    """aiosmtpd handler hooks: the end of DATA."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SinkSMTP, session: Session, envelope: Envelope) -> str:
        sink = self.sink
        server._last_command = "dot"
        assert isinstance(envelope, _SinkEnvelope)
        auth = session.auth_data
        received = Received(
            mail_from=envelope.mail_from or "",
            mail_options=list(envelope.mail_options),
            rcpt_tos=list(envelope.rcpt_tos),
            rcpt_options=[list(p) for p in envelope.rcpt_params],
            data=bytes(envelope.original_content or b""),
            peer=session.peer,
            helo=session.host_name,
            tls=session.ssl is not None or server.transport.get_extra_info("sslcontext") is not None,
            auth_login=auth if isinstance(auth, str) else None,
            client_cert=next(iter(sorted(client_cert_names(server.transport, common_name_only=True))), None),
        )
        sink.received.append(received)
        sink._changed()
        server._stage = "dot"
        if "dot" in sink.stall or "dot" in sink.raw_replies:
            return "250 2.0.0 Ok: queued"  # push() stalls or writes the raw reply instead
        hold = sink.hold_data
        if hold is not None:
            await hold.wait()
        if sink.drop_after_data:
            assert server.transport is not None
            server.transport.abort()
            # connection_lost cancels this task; the dot is never answered.
            await asyncio.get_running_loop().create_future()
        reply = sink.data_reply or _over_declared_size(sink, received) or "250 2.0.0 Ok: queued"
        received.reply = reply
        if reply.startswith("2"):
            sink.messages.append(received)
        sink._changed()
        return reply


def _over_declared_size(sink: Sink, received: Received) -> str | None:
    """strict_size: the refusal of a message longer than its MAIL SIZE= declared, else None."""
    if not sink.strict_size:
        return None
    for option in received.mail_options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit() and len(received.data) > int(value):
            return f"552 5.3.4 Message is {len(received.data)} octets, more than the declared SIZE={value}"
    return None


class Sink:
    """An SMTP server on the running loop that records what it receives.

    Usage::

        async with Sink() as sink:
            ...  # point the client at sink.host, sink.port
            [msg] = await sink.wait_for_messages(1)

    Behaviour controls may be changed at any time and apply from the next
    command that reads them: `rcpt_replies` (address, case-insensitive, to a
    full reply line; a 2xx line accepts with that text), `mail_reply`,
    `data_reply`, `drop_after_data`, `hold_data`, `refuse_plus`,
    `require_auth`, `client_cert_names`, and `dsn`/`pipelining`/`eightbitmime`
    (read at EHLO). `drop_connections()` cuts every open session while the
    sink keeps listening, as an upstream does that times idle clients out.

    `strict_size`: a message longer than the SIZE its MAIL declared is refused
    at the dot (552), as a strict upstream may do (the count is RFC 1870 5's).

    `xoauth2(user, token) -> bool` decides AUTH XOAUTH2 (offered when set);
    `client_cert_names`, when set, refuses MAIL unless the client's verified
    TLS certificate has one of these names as subject CN or DNS SAN (give a
    `starttls_context` that asks for client certificates).

    Faults: `greeting` (a line sent instead of the 220 greeting; a non-2xx one
    then closes), `data_command_reply` (the answer to DATA instead of 354),
    `stall` (stages never answered: "greeting", a command verb such as
    "MAIL", "RCPT", "DATA", or "dot" for the final dot, and "body": DATA
    answered 354, the message after it never read; each stall is noted in
    `stalled`), `hold` (stage to an event: that stage is answered only once
    the test sets it, each wait noted in `held`: an upstream slow at a chosen
    stage), and `raw_replies` (stage to bytes written verbatim instead of
    the reply, e.g. an over-long line). A message whose dot is stalled or
    answered raw is in `received`, never in `messages`.

    Records: `messages` (accepted with a 2xx to the dot), `received` (every
    message whose dot arrived, whatever the answer), `commands` (each command
    line, verb upper-cased, AUTH credentials masked), `connections`,
    `open_connections` (those open now), `closed_after_data` (connections
    the client closed after DATA and before a final dot: a transaction given
    up mid-data), `abandoned_data` (for each
    of those, the octets the client wrote after DATA),
    `auth_tokens` (each XOAUTH2 bearer token presented, accepted or not).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        dsn: bool = True,
        smtputf8: bool = True,
        eightbitmime: bool = True,
        pipelining: bool = True,
        starttls_context: ssl.SSLContext | None = None,
        auth: dict[str, str] | None = None,
        xoauth2: Callable[[str, str], bool] | None = None,
        require_auth: bool = False,
        client_cert_names: set[str] | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        data_size_limit: int | None = None,
        strict_size: bool = False,
        hostname: str = "sink.test",
        timeout: float = 120,
    ) -> None:
        self.host = host
        self.port = port
        self.dsn = dsn
        self.smtputf8 = smtputf8
        self.eightbitmime = eightbitmime
        self.pipelining = pipelining
        self.starttls_context = starttls_context
        self.implicit_tls = implicit_tls
        self.auth = auth
        self.xoauth2 = xoauth2
        self.require_auth = require_auth
        self.client_cert_names = client_cert_names
        self.data_size_limit = data_size_limit
        self.strict_size = strict_size
        self.hostname = hostname
        self.timeout = timeout

        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.drop_after_data = False
        self.hold_data: asyncio.Event | None = None
        self.refuse_plus = False
        self.greeting: str | None = None
        self.data_command_reply: str | None = None
        self.hold_354: asyncio.Event | None = None
        self.held_354 = 0
        self.drop_mid_data: int | None = None
        self.data_octets = 0  # octets that came in after DATA commands, whole messages or not
        self.stall: set[str] = set()
        self.raw_replies: dict[str, bytes] = {}
        self.stalled: list[str] = []
        self.hold: dict[str, asyncio.Event] = {}
        self.held: list[str] = []

        self.messages: list[Received] = []
        self.received: list[Received] = []
        self.commands: list[str] = []
        self.connections = 0
        self.closed_after_data = 0
        self.abandoned_data: list[bytes] = []
        self.auth_tokens: list[str] = []

        self._server: asyncio.AbstractServer | None = None
        self._protocols: set[SinkSMTP] = set()
        self._event = asyncio.Event()

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen on host:port; `port` then holds the bound port (for port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self.host, self.port, ssl=self.implicit_tls
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open session; returns when they are gone."""
        if self._server is None:
            return
        self._server.close()
        await self.drop_connections()
        await self._server.wait_closed()
        self._server = None

    @property
    def open_connections(self) -> int:
        """Connections open now: accepted and not yet closed by either side."""
        return len(self._protocols)

    async def drop_connections(self) -> int:
        """Cut every open session without a reply (the sink keeps listening); return how many."""
        tasks = []
        protocols = list(self._protocols)
        for protocol in protocols:
            # The plain transport under a STARTTLS session, so no TLS goodbye is awaited.
            transport = protocol._original_transport or protocol.transport
            if transport is not None:
                transport.abort()
            if protocol._handler_coroutine is not None:
                tasks.append(protocol._handler_coroutine)
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        return len(protocols)

    def reset(self) -> None:
        """Forget what was recorded (messages, received, commands, connections, stalled, auth_tokens)."""
        self.messages.clear()
        self.received.clear()
        self.commands.clear()
        self.connections = 0
        self.stalled.clear()
        self.auth_tokens.clear()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
        """Return once predicate() is true; raise TimeoutError (with what was seen) after timeout s."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    event = self._event
                    await event.wait()
        except TimeoutError:
            raise TimeoutError(
                f"sink: no {what or 'match'} after {timeout}s; "
                f"{len(self.messages)} accepted, {len(self.received)} received, "
                f"last commands {self.commands[-12:]}"
            ) from None

    async def wait_for_messages(self, n: int, timeout: float = 10) -> list[Received]:
        """Return the first n accepted messages once there are n; TimeoutError after timeout s."""
        await self.wait_for(lambda: len(self.messages) >= n, timeout, f"{n} accepted messages")
        return self.messages[:n]

    async def wait_for_received(self, n: int, timeout: float = 10) -> list[Received]:
        """Return the first n messages whose dot arrived (held, refused or dropped too)."""
        await self.wait_for(lambda: len(self.received) >= n, timeout, f"{n} received messages")
        return self.received[:n]

    async def wait_for_command(self, prefix: str, timeout: float = 10) -> str:
        """Return the first recorded command starting with prefix (case-insensitive)."""
        prefix = prefix.upper()

        def found() -> str | None:
            return next((c for c in self.commands if c.upper().startswith(prefix)), None)

        await self.wait_for(lambda: found() is not None, timeout, f"command {prefix!r}")
        command = found()
        assert command is not None
        return command

    # -- internals ------------------------------------------------------
    def _protocol(self) -> SinkSMTP:
        self.connections += 1
        protocol = SinkSMTP(
            self,
            data_size_limit=self.data_size_limit,
            enable_SMTPUTF8=self.smtputf8,
            decode_data=False,
            hostname=self.hostname,
            tls_context=self.starttls_context,
            timeout=self.timeout,
            # Tests run AUTH over plain TCP too; require_auth covers the policy side.
            auth_require_tls=False,
            authenticator=self._authenticate,
            loop=asyncio.get_running_loop(),
        )
        self._protocols.add(protocol)
        self._changed()
        return protocol

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword) or self.auth is None:
            return AuthResult(success=False, handled=False)
        login = data.login.decode("utf-8", "replace")
        password = data.password.decode("utf-8", "replace")
        if login in self.auth and self.auth[login] == password:
            return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    def _rcpt_reply(self, address: str) -> str | None:
        wanted = address.lower()
        for key, reply in self.rcpt_replies.items():
            if key.lower() == wanted:
                return reply
        local = address.rpartition("@")[0]
        if self.refuse_plus and "+" in local:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        return None

    def _command(self, line: str) -> None:
        self.commands.append(line)
        self._changed()

    def _changed(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._event.set()
        self._event = asyncio.Event()


def client_cert_names(transport: Any, common_name_only: bool = False) -> set[str]:
    """The subject CN and DNS SANs of the verified client certificate on transport (empty: none)."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return set()
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    if not common_name_only:
        names |= {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    return names


# -- TLS for tests ------------------------------------------------------

_cert_cache: tuple[str, str] | None = None


def make_test_cert(directory: str | Path | None = None) -> tuple[str, str]:
    """Create a self-signed certificate for localhost, 127.0.0.1 and ::1.

    Returns (certfile, keyfile) as PEM paths. Without a directory the pair is
    made once per process in a private temporary folder, removed at exit.
    The certificate is its own CA: give certfile to clients as cafile.
    """
    global _cert_cache
    if directory is None:
        if _cert_cache is None:
            folder = tempfile.mkdtemp(prefix="smtpgate-test-tls-")
            atexit.register(shutil.rmtree, folder, True)
            _cert_cache = make_test_cert(folder)
        return _cert_cache
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    certfile, keyfile = folder / "test-cert.pem", folder / "test-key.pem"
    try:
        _cert_with_cryptography(certfile, keyfile)
    except ImportError:
        _cert_with_openssl(certfile, keyfile)
    return str(certfile), str(keyfile)


def make_test_tls(directory: str | Path | None = None) -> tuple[ssl.SSLContext, str]:
    """Return (server_context, cafile) for a self-signed localhost certificate."""
    certfile, keyfile = make_test_cert(directory)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context, certfile


def client_tls_context(cafile: str) -> ssl.SSLContext:
    """A client context that trusts only cafile and checks the host name."""
    return ssl.create_default_context(cafile=cafile)


def _cert_with_cryptography(certfile: Path, keyfile: Path) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyfile.chmod(0o600)
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _cert_with_openssl(certfile: Path, keyfile: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("make_test_cert needs the cryptography package or the openssl command")
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "30", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            "-addext", "extendedKeyUsage=serverAuth",
            "-keyout", str(keyfile), "-out", str(certfile),
        ],
        check=True,
        capture_output=True,
    )
    keyfile.chmod(0o600)
