"""The SMTP front end: aiosmtpd's protocol on smtpgate's own asyncio loop.

`GateSMTP` keeps aiosmtpd's command loop, STARTTLS and AUTH, reads message data
with GlueSMTP's chunked reader (aiosmtpd's replies and refusals, see
aiosmtpd_glue), and replaces MAIL and RCPT (to keep parameters as written and to
relay each one in lockstep), so every reply comes from smtpgate.mail.replies or
from the upstream.

Every refusal takes one path (docs/architecture.md, "Refusals"): it is an
SMTPReply, raised or handed over, and `GateSMTP.refuse` logs it once
(`refused`: message.rejected or command.refused), says it and counts it
against limits.max_bad_commands (`_say`). aiosmtpd's own replies arrive as
text in `push`, which reads each once into a Reply and sends a refusal among
them the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from aiosmtpd.smtp import AuthResult, LoginPassword, TLSSetupException, syntax

from smtpgate.config import Listener
from smtpgate.frontends.registry import SessionRegistry
from smtpgate.frontends.smtp.aiosmtpd_glue import AIOSMTPD_REPLIES, GlueSMTP
from smtpgate.frontends.smtp.auth import PasswordMechanisms
from smtpgate.frontends.smtp.peercert import PeerCertificate, peer_certificate
from smtpgate.frontends.smtp.relay import MAIL_PARAMS, RCPT_PARAMS, ClientInfo, RelayContext, Transaction
from smtpgate.frontends.smtp.stream import MessageStream
from smtpgate.frontends.smtp.tls import server_context
from smtpgate.log import get_logger
from smtpgate.mail import replies
from smtpgate.mail.addresses import Address, AddressError, parse_address_list, parse_path
from smtpgate.mail.headers import HeaderBlock, parse_header_block
from smtpgate.mail.params import parse_params, split_argument
from smtpgate.mail.replies import Reply, SMTPReply, reply_code
from smtpgate.upstream.session import UpstreamSource


@dataclass(frozen=True)
class SmtpSettings:
    """One listener's view of a configuration snapshot; a session keeps the one it started with."""

    relay: RelayContext
    authenticator: Callable | None
    max_connections: int
    # (user, address) -> may that user send as that address (auth_backend: file sender lists)
    sender_rights: Callable[[str, Address | None], bool] | None = None
    # client address -> log this session's commands and replies at debug level
    debug_for: Callable[[str], bool] | None = None


class GateSMTP(GlueSMTP):
    """One client connection."""

    def __init__(self, settings: SmtpSettings, registry: SessionRegistry, listener: Listener,
                 handler: Handler, **kwargs):
        self.settings = settings
        self.registry = registry
        self.listener = listener
        self.session_id = os.urandom(8).hex()
        self.log = get_logger(session=self.session_id, listener=listener.name)
        self.tx: Transaction | None = None
        self.stream: MessageStream | None = None  # the message being relayed as it arrives (DATA)
        self.counted = False
        self.admitted: str | None = None  # the address counted against max_connections_per_client
        self.user_upstream = None  # auth_backend: upstream: the client's own upstream login
        self.bad_commands = 0
        self.peer_cert: PeerCertificate | None = None  # the verified client certificate (tls_client_ca)
        super().__init__(handler, **kwargs)

    # -------------------------------------------------------- connection life

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")  # implicit TLS, or STARTTLS done
        if ssl_object is not None:
            self.peer_cert = peer_certificate(ssl_object)
        if first:
            self.registry.add(self)
            self.counted = True
            peer = transport.get_extra_info("peername") or ("?", 0)
            self.log = self.log.bind(client_ip=str(peer[0]))
            self.log.info("session.opened", peer=str(peer[0]), port=peer[1] if len(peer) > 1 else None,
                          **self._cert_fields())
            if self.settings.debug_for is not None and self.settings.debug_for(str(peer[0])):
                self.debug_session()
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            self.log.info("session.tls", tls_version=ssl_object.version(), cipher=cipher[0] if cipher else None,
                          client_cert=self.peer_cert.subject if self.peer_cert else None,
                          client_cert_issuer=self.peer_cert.issuer if self.peer_cert else None,
                          client_cert_admitted=self.cert_admitted if self.peer_cert else None)

    def _cert_fields(self) -> dict:
        cert = self.peer_cert
        return {} if cert is None else {"client_cert": cert.subject, "client_cert_issuer": cert.issuer}

    @property
    def cert_admitted(self) -> bool:
        """The verified client certificate names a peer that may relay (relay_client_cert_names)."""
        return self.peer_cert is not None and self.peer_cert.admitted_by(self.listener.relay_client_cert_names)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.transaction_ended()
        admitted, self.admitted = self.admitted, None
        if admitted is not None:
            self.registry.release(admitted)
        user_upstream, self.user_upstream = self.user_upstream, None
        if user_upstream is not None:
            self.registry.spawn(user_upstream.close())  # after the transaction's abort, on the same loop
        if self.counted:
            self.counted = False
            self.registry.discard(self)
            self.log.info("session.closed", reason=str(error) if error else "closed")

    async def before_serving(self) -> bool:
        if self.registry.draining:
            await self.push(replies.SHUTTING_DOWN.line())
            self.transport.close()
            return False
        if len(self.registry) > self.settings.max_connections:
            await self.push(replies.TOO_MANY_CONNECTIONS.line())
            self.log.warning("session.refused", reason="limits.max_connections reached")
            self.transport.close()
            return False
        if not self.listener.proxy_protocol:  # behind a proxy the client is known after PROXY
            return await self.admit(self.client_ip)
        return True

    async def admit(self, client: str) -> bool:
        """Count this session against its client address; 421 and close when it has too many."""
        limit = self.settings.relay.policy.limits.max_connections_per_client
        if self.registry.admit(client, limit):
            self.admitted = client
            return True
        await self.push(replies.TOO_MANY_FROM_CLIENT.line())
        self.log.warning("session.refused", reason="limits.max_connections_per_client reached", limit=limit)
        self.transport.close()
        return False

    def timed_out(self) -> None:
        if self.stream is not None and self.stream.finishing:
            # The client sent its dot and waits for the upstream's verdict; upstream.timeout bounds that.
            self.restart_timer()
            return
        self.log.info("session.timeout", idle_timeout=self.settings.relay.policy.limits.idle_timeout)
        self.say_goodbye(replies.TIMEOUT.line())

    @property
    def busy(self) -> bool:
        """A transaction is in flight: a drain waits for it."""
        return self.tx is not None or self.stream is not None

    def say_goodbye(self, line: str) -> None:
        """Shutdown: tell the client and close, whatever state the session is in."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing():
            try:
                transport.write(line.encode("ascii") + b"\r\n")
            except (AttributeError, OSError, RuntimeError):
                pass  # a TLS transport whose client went away mid-close: nothing to tell
        transport.close()

    def debug_session(self) -> None:
        """Log this session's commands (never AUTH's credentials) and replies at debug level."""
        self.log = self.log.bind(debug_peer=True)
        self._smtp_methods.seen = lambda verb, arg: self.log.debug(
            "smtp.command", verb=verb, arg=(arg or "").split(" ", 1)[0] if verb == "AUTH" else (arg or "")[:512])

    # -------------------------------------------------------- replies and refusals

    async def push(self, status) -> None:
        """What aiosmtpd's own code says (and the glue's 354 and OKs): aiosmtpd's wording
        becomes smtpgate's, and a refusal among them takes the one error path."""
        if not isinstance(status, str):
            await self._say(status, None)
            return
        status = AIOSMTPD_REPLIES.get(status, status)
        code = reply_code(status)
        if code is not None and code >= 400 and self.command is not None:  # None: before the first command
            reply = _reply_of(status)
            await self.refuse(SMTPReply(reply, reply.wording))
        else:
            await self._say(status, code)

    async def refuse(self, refusal: SMTPReply) -> None:
        """The one way a refusal reaches the client: logged once (`refused`), then said."""
        tx = self.tx or (self.stream.tx if self.stream is not None else None)
        stage = self.command.lower() if self.command is not None else None
        await self._say(self.refused(refusal, stage=stage, tx=tx), refusal.reply.code)

    def refused(self, refusal: SMTPReply, *, stage: str | None, tx: Transaction | None = None,
                rejects_message: bool = False, internal: bool = False) -> str:
        """Log a refusal, once, and give the client's reply line: message.rejected when it refuses
        the message (the refusal says so, or `rejects_message`: the end of the data), else
        command.refused with the command's stage (none before the first command, a greeting
        refused: that is session.refused). `internal`: a fault, logged with its traceback."""
        reply = refusal.reply
        if refusal.rejects_message or rejects_message:
            client = tx.client if tx is not None else self.client_info()
            fields = {"mail_from": tx.sender_text()} if tx is not None and not internal else {}
            fields.update(refusal.log_fields, **client.log_fields())
            if internal:
                self.log.exception("message.rejected", code=reply.code, reason=refusal.reason, stage=stage, **fields)
            else:
                self.log.info("message.rejected", code=reply.code, reason=refusal.reason, stage=stage, **fields)
        elif stage is not None:
            self.log.info("command.refused", code=reply.code, reason=refusal.reason, stage=stage,
                          **refusal.log_fields)
        return refusal.line()

    async def answer(self, status: str) -> None:
        """A reply passed on as it is, logged where it was decided: the upstream's 2xx to MAIL
        or RCPT, the verdict on the final dot (the upstream's, or the stream's refusal)."""
        await self._say(status, reply_code(status))

    async def _say(self, status, code: int | None) -> None:
        """Send a reply. One to a command the client should not have sent as it did counts
        against limits.max_bad_commands; the last one allowed closes the session."""
        if self._smtp_methods.seen is not None:
            self.log.debug("smtp.reply", reply=status if isinstance(status, str) else status.decode("utf-8", "replace"))
        await super().push(status)
        if code not in _BAD_COMMAND_CODES:
            return
        self.bad_commands += 1
        if self.bad_commands >= self.settings.relay.policy.limits.max_bad_commands:
            self.log.warning("session.refused", reason="limits.max_bad_commands reached",
                             bad_commands=self.bad_commands)
            self.say_goodbye(replies.TOO_MANY_BAD_COMMANDS.line())

    def data_starting(self) -> None:
        if self.tx is not None:
            self.tx.begin_data()

    def data_consumer(self) -> MessageStream | None:
        """The message is relayed as it arrives: the stream owns the transaction from now on."""
        tx, self.tx = self.tx, None
        if tx is None:
            return None
        limits = self.settings.relay.policy.limits
        self.stream = MessageStream(tx, max_header_block=limits.max_header_block, spool_dir=limits.spool_dir,
                                    reject=partial(self.refused, stage="data", tx=tx, rejects_message=True),
                                    check_head=self.check_from, spawn=self.registry.spawn)
        return self.stream

    def transaction_ended(self) -> None:
        # HELO, EHLO, RSET, a refused data or a lost client: the upstream transaction ends too
        # (a message stream ends its own: see MessageStream.abandon).
        self.stream = None
        tx, self.tx = self.tx, None
        if tx is not None:
            self.registry.spawn(tx.abort())

    # -------------------------------------------------------- client identity

    @property
    def client_ip(self) -> str:
        proxy = getattr(self.session, "proxy_data", None)
        if proxy is not None and getattr(proxy, "src_addr", None):
            return str(proxy.src_addr)
        peer = self.session.peer if self.session else None
        return str(peer[0]) if peer else "?"

    def client_info(self) -> ClientInfo:
        user = self.session.auth_data if self.session.authenticated else None
        return ClientInfo(
            session_id=self.session_id,
            ip=self.client_ip,
            helo=self.session.host_name or "",
            authenticated_as=str(user) if user else None,
            tls=self.tls_active or self.listener.tls == "implicit",
            listener=self.listener.name,
            esmtp=bool(self.session.extended_smtp),
            tls_cipher=self.tls_cipher,
            client_cert=self.peer_cert.subject if self.peer_cert else None,
            client_cert_issuer=self.peer_cert.issuer if self.peer_cert else None,
        )

    @property
    def tls_cipher(self) -> str | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()} {cipher[0]}" if cipher else ssl_object.version()

    def adopt_upstream(self, user_upstream: UpstreamSource) -> None:
        """auth_backend: upstream: this session's messages go over the client's own upstream login,
        the source its transactions take their upstream session from (in place of the pool)."""
        self.user_upstream = user_upstream

    @property
    def authenticated_user(self) -> str | None:
        data = self.session.auth_data if self.session and self.session.authenticated else None
        return str(data) if data else None

    def may_send_as(self, user: str, address: Address | None) -> bool:
        rights = self.settings.sender_rights
        return rights is None or rights(user, address)

    def check_from(self, raw: bytes) -> None:
        """End of DATA: every From: address must be in the user's sender list (SMTPReply if not)."""
        user = self.authenticated_user
        if user is None or self.settings.sender_rights is None:
            return
        refusal = from_refusal(parse_header_block(raw), lambda address: self.may_send_as(user, address))
        if refusal is not None:
            raise refusal

    # -------------------------------------------------------- commands

    def check_data(self, arg: str | None) -> SMTPReply | None:
        tx = self.tx
        if not self.envelope.rcpt_tos and tx is not None and tx.refused:
            # Every recipient was refused upstream: no message, and the log says why.
            return SMTPReply(replies.NO_VALID_RECIPIENTS, "the upstream refused every recipient",
                             rejects_message=True, refused=[{"recipient": a, "reply": why} for a, why in tx.refused])
        return super().check_data(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        try:
            sender, words, params = self._mail_command(arg)
            tx = self._transaction()
            line = await tx.open(sender, params)
        except SMTPReply as refusal:
            await self.refuse(refusal)
            return
        if reply_code(line) // 100 != 2:
            await self.refuse(_passed_on(_reply_of(line), mail_from=str(sender) if sender else ""))
            return
        self.tx = tx
        self.envelope.mail_from = str(sender) if sender else "<>"
        self.envelope.mail_options.extend(words)
        await self.answer(line)

    def _mail_command(self, arg: str | None) -> tuple[Address | None, list[str], dict]:
        """MAIL's checks, in order: no transaction open, relaying allowed, the syntax, the
        user's sender list. Returns (sender, parameters as written, parameters); SMTPReply if refused."""
        if self.tx is not None:
            raise _refusal(replies.NESTED_MAIL)
        reason = self._relay_refusal()
        if reason is not None:
            raise SMTPReply(replies.AUTH_REQUIRED, reason, rejects_message=True)
        parts = split_argument(arg, "FROM:")
        if parts is None:
            raise _refusal(replies.MAIL_SYNTAX)
        path, words = parts
        try:
            sender = parse_path(path)
            _check_sendable(sender)
            if words and not self.session.extended_smtp:
                raise SMTPReply(replies.BAD_SYNTAX, "parameters need EHLO")
            params = parse_params(words, MAIL_PARAMS)
            if "SMTPUTF8" not in params and sender is not None and not str(sender).isascii():
                raise SMTPReply(replies.BAD_SENDER, "non-ASCII sender without SMTPUTF8")
        except AddressError as exc:
            raise SMTPReply(replies.BAD_SENDER, str(exc)) from None
        user = self.authenticated_user
        if user is not None and not self.may_send_as(user, sender):
            raise SMTPReply(replies.SENDER_NOT_ALLOWED, "envelope sender not in the user's sender list",
                            rejects_message=True, mail_from=str(sender))
        return sender, words, params

    def _relay_refusal(self) -> str | None:
        """Why this client may not relay, or None: no open relay, strangers must authenticate
        first (RFC 4954 6)."""
        if self.session.authenticated:
            return None
        if self.listener.auth == "required":
            return "not authenticated, auth: required"
        if self.listener.direction == "inbound" or self.listener.relays_for(self.client_ip) or self.cert_admitted:
            return None  # inbound accepts anyone, for internal domains only
        return "not authenticated, not in relay_networks" + (
            ", client certificate not in relay_client_cert_names" if self.peer_cert else "")

    def _transaction(self) -> Transaction:
        ctx = self.settings.relay
        if self.user_upstream is not None:
            ctx = dataclasses.replace(ctx, pool=self.user_upstream)
        return Transaction(ctx=ctx, client=self.client_info(), log=self.log)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        try:
            address, params = self._rcpt_command(arg)
            line = await self.tx.add_recipient(address, params)
        except AddressError as exc:
            await self.refuse(SMTPReply(replies.BAD_RECIPIENT, str(exc)))
            return
        except SMTPReply as refusal:
            await self.refuse(refusal)
            return
        if reply_code(line) // 100 != 2:
            await self.refuse(_passed_on(_reply_of(line), recipient=str(address)))
            return
        self.envelope.rcpt_tos.append(str(address))
        await self.answer(line)

    def _rcpt_command(self, arg: str | None) -> tuple[Address, dict]:
        """RCPT's checks, in order: a transaction open, the syntax, the listener's domains.
        Returns (recipient, parameters); SMTPReply (AddressError: the address) if refused."""
        if self.tx is None:
            raise _refusal(replies.NEED_MAIL)
        parts = split_argument(arg, "TO:")
        if parts is None:
            raise _refusal(replies.RCPT_SYNTAX)
        path, words = parts
        address = parse_path(path)
        if address is None:
            raise AddressError("the null path is not a recipient")
        _check_sendable(address)
        if words and not self.session.extended_smtp:
            raise SMTPReply(replies.BAD_SYNTAX, "parameters need EHLO")
        params = parse_params(words, RCPT_PARAMS)
        if self.listener.direction == "inbound" and not self.settings.relay.policy.links.directory.is_internal(address):
            # An inbound listener delivers to the mailbox server only; it never relays out.
            raise SMTPReply(replies.RELAY_DENIED, "inbound listener: not an internal domain")
        if not str(address).isascii() and "SMTPUTF8" not in self.tx.mail_params:
            raise SMTPReply(replies.BAD_RECIPIENT, "non-ASCII recipient without SMTPUTF8")
        return address, params

    async def smtp_AUTH(self, arg: str) -> None:
        if self.listener.auth == "none":
            await self.refuse(_refusal(replies.AUTH_UNAVAILABLE))
            return
        if self.tx is not None:
            await self.refuse(_refusal(replies.AUTH_IN_TRANSACTION))
            return
        await super().smtp_AUTH(arg)


def _refusal(reply: Reply) -> SMTPReply:
    """A refusal whose reason is the reply's own wording."""
    return SMTPReply(reply, reply.wording)


def from_refusal(headers: HeaderBlock, may_send_as: Callable[[Address], bool]) -> SMTPReply | None:
    """The refusal of a message whose From: fields name someone the user may not send as
    (every field, every address), or one that cannot be parsed; None when all are allowed."""
    for value in headers.get_all("From"):
        try:
            addresses = parse_address_list(value)
        except AddressError:
            # Unreadable here may still be shown as someone by a mail client: refused.
            return SMTPReply(replies.SENDER_NOT_ALLOWED, "From: field that cannot be parsed")
        for address in addresses:
            if not may_send_as(address):
                return SMTPReply(replies.SENDER_NOT_ALLOWED, "From: address not in the user's sender list",
                                 header_from=str(address))
    return None


def _reply_of(line: str) -> Reply:
    """The upstream's verdict as the transaction words it for the client (always with a code)."""
    reply = Reply.parse(line)
    assert reply is not None, line
    return reply


def _passed_on(reply: Reply, **fields) -> SMTPReply:
    """The upstream's refusal of a command, passed to the client as it is."""
    return SMTPReply(reply, f"upstream: {reply.wording}", **fields)


# The longest a failed AUTH's answer is held (seconds): well inside limits.idle_timeout's default.
AUTH_DELAY_CAP = 30.0

# Replies to a command the client should not have sent as it did (RFC 5321 4.2.4: unknown,
# syntax, not implemented, out of sequence); each counts against limits.max_bad_commands.
_BAD_COMMAND_CODES = {500, 501, 502, 503, 504}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_sendable(address) -> None:
    """RFC 5321 4.1.2: no control character in a path, not even TAB in a quoted string."""
    if address is not None and _CONTROL.search(str(address)):
        raise AddressError("control character in address")


class Handler(PasswordMechanisms):
    """aiosmtpd hooks for EHLO, DATA, AUTH and errors; MAIL and RCPT live in GateSMTP."""

    def __init__(self, listener: Listener, registry: SessionRegistry):
        self.listener = listener
        self.registry = registry

    async def check_password(self, server: GateSMTP, mechanism: str, credentials: LoginPassword) -> AuthResult:
        authenticate = server.settings.authenticator
        if authenticate is None or self.listener.auth == "none":
            return AuthResult(success=False, handled=False)
        result = await authenticate(server, server.session, server.envelope, mechanism, credentials)
        if not result.success and not result.handled:  # handled: a temporary failure, already answered
            await self._slow_down(server, mechanism)
        return result

    async def _slow_down(self, server: GateSMTP, mechanism: str) -> None:
        """Hold a failed AUTH's answer, longer with each failure from the same client address.

        With limits.max_connections_per_client sessions at most, an address tries at most
        that many passwords per delay, and the delay doubles (up to AUTH_DELAY_CAP) as it fails.
        """
        failures = self.registry.auth_failures.fail(server.client_ip)
        base = server.settings.relay.policy.limits.auth_failure_delay
        delay = min(base * 2 ** min(failures - 1, 32), AUTH_DELAY_CAP)
        server.log.warning("auth.delayed", failures=failures, delay_s=round(delay, 3), mechanism=mechanism)
        if delay > 0:
            await asyncio.sleep(delay)

    async def handle_EHLO(self, server: GateSMTP, session, envelope, hostname: str, responses: list[str]):
        session.host_name = hostname
        out = [responses[0]]
        extensions = server.settings.relay.pool.extensions
        for line in responses[1:-1]:
            keyword = line[4:].split(" ", 1)[0].upper()
            if keyword == "AUTH" and self.listener.auth == "none":
                continue
            if keyword == "SMTPUTF8" and extensions is not None and "smtputf8" not in extensions:
                continue
            if keyword == "8BITMIME" and extensions is not None and "8bitmime" not in extensions:
                continue
            out.append(line)
        out.append("250-PIPELINING")
        out.append("250-ENHANCEDSTATUSCODES")
        if extensions is not None and "dsn" in extensions:
            out.append("250-DSN")
        out.append("250 HELP")
        return out

    async def handle_DATA(self, server: GateSMTP, session, envelope) -> str:
        # Reached only without a transaction: a message with one is relayed as it arrives
        # (GateSMTP.data_consumer, smtpgate.frontends.smtp.stream).
        return replies.BAD_SEQUENCE.line()

    async def handle_PROXY(self, server, session, envelope, proxy_data) -> bool:
        if proxy_data and getattr(proxy_data, "src_addr", None):
            # Behind HAProxy every event names the real client, not the proxy.
            proxy = str(session.peer[0]) if session.peer else None
            server.log = server.log.bind(client_ip=str(proxy_data.src_addr), proxy=proxy)
            server.log.info("session.proxied")
        # Counted on the address the proxy reports (the proxy's own for a PROXY LOCAL health check).
        return bool(proxy_data) and await server.admit(server.client_ip)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client (or a scanner) that shares no suite with the profile: its fault, no traceback.
            cause = error.__cause__
            get_logger().warning("tls.handshake_failed", reason=str(cause or error) or type(error).__name__)
            return replies.TEMPORARY_FAILURE.line()  # aiosmtpd closes the connection instead
        # Never aiosmtpd's "500 Error: (ClassName)": an internal fault is temporary.
        get_logger().exception("session.error", reason=type(error).__name__)
        return replies.TEMPORARY_FAILURE.line()


def tls_context(listener: Listener) -> ssl.SSLContext | None:
    """The listener's server context: Mozilla "intermediate" unless tls_ciphers says otherwise."""
    if listener.tls == "none" or listener.tls_cert is None or listener.tls_key is None:
        return None
    return server_context(listener.tls_cert, listener.tls_key, listener.tls_ciphers, listener.tls_client_ca)


def make_factory(listener: Listener, settings: Callable[[], SmtpSettings], registry: SessionRegistry,
                 tls: ssl.SSLContext | None = None):
    """A protocol factory for loop.create_server, and the TLS context for implicit TLS.

    ``settings`` gives the current snapshot's SmtpSettings; each connection keeps
    the one it started with (a reload applies to new connections). ``tls`` is the
    listener's context, which a reload refreshes in place (new certificate).
    """
    handler = Handler(listener, registry)

    def factory() -> GateSMTP:
        current = settings()
        return GateSMTP(
            current,
            registry,
            listener,
            handler,
            data_size_limit=current.relay.policy.limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=current.relay.hostname,
            ident="smtpgate ESMTP",
            tls_context=tls if listener.tls == "starttls" else None,
            implicit_tls=listener.tls == "implicit",
            require_starttls=False,
            timeout=current.relay.policy.limits.idle_timeout,
            auth_required=listener.auth == "required",
            auth_require_tls=True,
            # No `authenticator`: aiosmtpd would call it without awaiting; Handler's auth_PLAIN
            # and auth_LOGIN (smtpgate.frontends.smtp.auth) await the session's settings.authenticator.
            proxy_protocol_timeout=10 if listener.proxy_protocol else None,
        )

    return factory, (tls if listener.tls == "implicit" else None)


def file_authenticator(users) -> Callable:
    """An awaitable authenticator checking LOGIN/PLAIN against one users file snapshot.

    It has aiosmtpd's authenticator signature but is a coroutine function: the scrypt
    check runs in smtpgate.users' own threads, off the event loop.
    """

    async def authenticate(server, session, envelope, mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        ok = await users.verify_off_loop(name, auth_data.password.decode("utf-8", "replace"))
        log = getattr(server, "log", None) or get_logger()
        # A failure is a warning, so fail2ban-style tools can act on it; never the password.
        (log.info if ok else log.warning)("auth.result", user=name, success=ok, mechanism=mechanism)
        return AuthResult(success=ok, handled=False, auth_data=name if ok else None)

    return authenticate
