"""The upstream side of the lockstep relay: connections, a pool, and a Maildir sink.

An `UpstreamSession` is one SMTP transaction's worth of an upstream
connection. Every method returns the upstream's verdict as `(code, text)`;
network faults become `UpstreamError`, never a made-up success. The relay
decides what the client sees (smtpgate.frontends.smtp.relay).

Every wait on the upstream has a timeout shorter than what a client waits for
the reply it feeds (docs/upstream.md): `upstream.timeouts.connect` per host,
`.command` for MAIL/RCPT/RSET/NOOP, `.data` for DATA and the final dot, and
`upstream.timeout` for everything a client's MAIL waits on (every MX host tried
included). The pool opens at most `upstream.max_connections` connections.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable

import aiosmtplib

from smtpgate.config import Upstream
from smtpgate.log import get_logger, outage, plain_words
from smtpgate.mail import replies
from smtpgate.metrics import UPSTREAM_IN_USE
from smtpgate.upstream.certificates import load_client_certificate
from smtpgate.upstream.maildir import MaildirSession
from smtpgate.upstream.mx import MxRoute, RouteError, Target
from smtpgate.upstream.oauth2 import TokenError, TokenSource
from smtpgate.upstream.session import (UpstreamAuthError, UpstreamConnectError, UpstreamError, UpstreamSession,
                                       UpstreamSource, Verdict)
from smtpgate.upstream.wire import stuffed

__all__ = ["FRESH_SECONDS", "IDLE_SECONDS", "MaildirSession", "SmtpSession", "UpstreamAuthError",
           "UpstreamConnectError", "UpstreamError", "UpstreamPool", "UpstreamSession", "UpstreamSource", "Verdict"]

log = get_logger()

# How long an idle pooled connection is kept; servers drop idle clients after
# a few minutes (RFC 5321 4.5.3.2.7), so reuse only recent ones.
IDLE_SECONDS = 30.0
# A connection given back less than this long ago is handed out without a NOOP (as
# Postfix's smtp_connection_cache_time_limit reuses one); should the upstream have
# dropped it meanwhile, the MAIL finds out and goes out once more on a new connection.
FRESH_SECONDS = 2.0
# A streamed message waits for the upstream once this much of it is queued unsent.
STREAM_HIGH_WATER = 64 * 1024


def _encode(text: str) -> bytes:
    # Addresses are ASCII unless the transaction is SMTPUTF8; utf-8 covers both.
    return text.encode("utf-8", errors="surrogateescape")


class SmtpSession(UpstreamSession):
    """One connection opened by `pool`; it goes back to `owner`, the source that handed it
    out (the pool itself, or a client's own login: smtpgate.upstream.passthrough)."""

    def __init__(self, pool: UpstreamPool, client: aiosmtplib.SMTP, label: str | None = None, *,
                 owner: UpstreamSource | None = None):
        self.pool = pool
        self.owner: UpstreamSource = owner or pool
        self.client = client
        self.label = label or pool.config.label
        self.extensions = frozenset(client.esmtp_extensions)
        self.last_used = time.monotonic()
        self.desynced = False  # a reply went missing or was garbled: the connection is only closed
        self.deadline: float | None = None  # the client's MAIL is answered by then (set at acquire)
        self.unchecked = False  # handed out without a NOOP (FRESH_SECONDS): MAIL may reconnect once
        self._data_reply: asyncio.Task[Verdict] | None = None  # begin_data's DATA, its reply not taken
        self.in_use = False  # handed out for a transaction (counted in UPSTREAM_IN_USE) and not yet back
        self._streaming = False  # between open_data's 354 and end_data's final dot
        self._unsent: list[bytes | memoryview] = []  # the streamed message's start, written with what follows

    def taken(self) -> None:
        """Handed out for a transaction: counted in use until `returned`."""
        self.in_use = True
        UPSTREAM_IN_USE.inc()

    def returned(self) -> bool:
        """Back from a transaction; False when it was back already (released exactly once)."""
        if not self.in_use:
            return False
        self.in_use = False
        UPSTREAM_IN_USE.dec()
        return True

    async def _command(self, *parts: bytes, timeout: float | None = None) -> Verdict:
        wait = self.pool.config.timeouts.command if timeout is None else timeout
        try:
            response = await self.client.execute_command(*parts, timeout=wait)
        except asyncio.CancelledError:
            # The reply is still in flight: it would be paired with a later command.
            self.desynced = True
            self.client.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:  # TimeoutError is an OSError
            self.desynced = True
            dropped = isinstance(exc, (aiosmtplib.SMTPServerDisconnected, ConnectionError))
            raise UpstreamError(f"{parts[0].decode()}: {_describe(exc, wait)}", dropped=dropped) from None
        return Verdict(response.code, response.message)

    async def mail(self, sender: str, params: list[str]) -> Verdict:
        deadline, self.deadline = self.deadline, None
        unchecked, self.unchecked = self.unchecked, False
        command = (b"MAIL", b"FROM:<" + _encode(sender) + b">", *map(_encode, params))
        try:
            return await self._command(*command, timeout=self._mail_wait(deadline))
        except UpstreamError as exc:
            if not (unchecked and exc.dropped):
                raise
        # Nothing of this transaction reached the upstream, which had closed the pooled
        # connection: MAIL goes out once more, on a new one (UpstreamConnectError when
        # there is none).
        await self._reconnect(deadline)
        return await self._command(*command, timeout=self._mail_wait(deadline))

    def _mail_wait(self, deadline: float | None) -> float:
        """The first MAIL after acquire shares the client's MAIL budget with the connecting."""
        wait = self.pool.config.timeouts.command
        return wait if deadline is None else max(0.001, min(wait, deadline - time.monotonic()))

    async def _reconnect(self, deadline: float | None) -> None:
        # Only the pool hands a connection out unchecked: the new one is the pool's too.
        self.client.close()
        budget = self.pool.config.timeout if deadline is None else deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.001, budget)):
                fresh = await self.pool.open_session()
        except TimeoutError:
            raise _no_connection(self.pool.config.timeout) from None
        self.client, self.label, self.extensions = fresh.client, fresh.label, fresh.extensions
        self.desynced = False

    @property
    def size_limit(self) -> int | None:
        value = self.client.esmtp_extensions.get("size", "").strip()
        return int(value) if value.isdigit() and int(value) > 0 else None  # SIZE 0: no fixed limit

    async def rcpt(self, recipient: str, params: list[str], *, timeout: float | None = None) -> Verdict:
        return await self._command(b"RCPT", b"TO:<" + _encode(recipient) + b">", *map(_encode, params),
                                   timeout=timeout)

    async def rset(self) -> Verdict:
        if self._streaming:
            self._abandon_stream()
            return Verdict(421, "4.4.2 message abandoned: the connection is closed")
        if self._data_reply is not None:
            # After DATA only the message or a closed connection ends the transaction.
            self._abandon_data()
            return Verdict(421, "4.4.2 DATA begun: the connection is closed")
        return await self._command(b"RSET")

    def begin_data(self) -> None:
        if self._data_reply is None:
            self._data_reply = asyncio.ensure_future(self._command(b"DATA", timeout=self.pool.config.timeouts.data))

    @property
    def data_begun(self) -> bool:
        return self._data_reply is not None

    def _abandon_data(self) -> None:
        """The DATA begun is not followed by the message: the connection may carry nothing
        more (no RSET, no QUIT: either would be read as message content)."""
        pending, self._data_reply = self._data_reply, None
        if pending is None:
            return
        if pending.done():
            if not pending.cancelled():
                pending.exception()  # retrieved: a failed DATA is no news here
        else:
            pending.cancel()
        self.desynced = True
        self.client.close()

    async def noop(self) -> Verdict:
        # The health check of a pooled connection: a dead one must not eat the MAIL budget.
        return await self._command(b"NOOP", timeout=self.pool.config.timeouts.connect)

    async def open_data(self, head: bytes) -> Verdict:
        wait = self.pool.config.timeouts.data
        begun, self._data_reply = self._data_reply, None
        ready = await (begun if begun is not None else self._command(b"DATA", timeout=wait))
        if ready.code != 354:
            return ready
        self._streaming = True
        # Written with what follows (one write for a small message: head, body and dot).
        self._unsent = [stuffed(head)] if head else []
        return ready

    async def write_data(self, wire: bytes | memoryview) -> None:
        protocol = self.client.protocol
        transport = protocol.transport if protocol is not None else None
        if transport is None or transport.is_closing():
            self._abandon_stream()
            raise UpstreamError("DATA: connection lost while the message was sent", dropped=True)
        if self._unsent:
            self._unsent.append(wire)
            transport.writelines(self._unsent)  # uvloop: one writev
            self._unsent = []
        else:
            transport.write(wire)
        if transport.get_write_buffer_size() > STREAM_HIGH_WATER:
            # The upstream takes the body slower than the client sends it: the client waits
            # (its bytes stay in the kernel), not smtpgate's memory.
            wait = self.pool.config.timeouts.data
            try:
                async with asyncio.timeout(wait):
                    await protocol._drain_helper()
            except (ConnectionError, TimeoutError) as exc:
                self._abandon_stream()
                raise UpstreamError(f"DATA: {_describe(exc, wait)}", dropped=not isinstance(exc, TimeoutError)) \
                    from None
            except asyncio.CancelledError:
                self._abandon_stream()
                raise

    async def end_data(self, last: bytes = b"") -> Verdict:
        wait = self.pool.config.timeouts.data
        try:
            if last:
                self._unsent.append(last)
            await self.write_data(b".\r\n")
            self._streaming = False
            response = await self.client.protocol.read_response(timeout=wait)
        except asyncio.CancelledError:
            self._abandon_stream()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._abandon_stream()
            raise UpstreamError(f"DATA: {_describe(exc, wait)}") from None
        return Verdict(response.code, response.message)

    def _abandon_stream(self) -> None:
        """A message streaming upstream ends without its final dot: only closing the
        connection ends it (anything sent now would be read as message content)."""
        self._streaming = False
        self._unsent = []
        self.desynced = True
        self.client.close()

    async def release(self, reusable: bool) -> None:
        self.last_used = time.monotonic()
        self.deadline = None
        self.unchecked = False
        if self._data_reply is not None:
            self._abandon_data()
            reusable = False
        if self._streaming:
            self._abandon_stream()
            reusable = False
        await self.owner.give_back(self, reusable)

    def discard(self) -> None:
        if self._data_reply is not None:
            self._abandon_data()
        self._streaming, self._unsent = False, []
        self.desynced = True
        self.client.close()
        self.returned()
        self.owner.forget(self)

    async def close(self) -> None:
        self.owner.forget(self)
        try:
            if self.client.is_connected and not self.desynced:
                await asyncio.wait_for(self.client.quit(), timeout=min(5.0, self.pool.config.timeouts.command))
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self.client.close()


def _describe(exc: BaseException, wait: float) -> str:
    """An upstream fault for the log; a timeout says how long was waited."""
    if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts are TimeoutErrors too
        return f"no reply within {round(wait, 2):g}s"
    if isinstance(exc, (OSError, aiosmtplib.SMTPConnectError)):
        return plain_words(exc)  # "connection refused", not the errno's repr
    return f"{type(exc).__name__}: {exc}"


def _no_connection(budget: float) -> UpstreamConnectError:
    return UpstreamConnectError(f"no upstream connection within upstream.timeout ({budget:g}s)")


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO for a server without ESMTP (then no extension is used)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        await client.helo()


class _NoToken(UpstreamAuthError):
    """No OAuth2 token from the token endpoint: no other MX host would fare better."""


class _TlsFailed(Exception):
    """Opportunistic STARTTLS failed on a host that offered it (the caller may go on in clear)."""


# How a new connection logs in: upstream.auth's own way, or a client's credentials.
Login = Callable[[aiosmtplib.SMTP], Awaitable[None]]


class UpstreamPool(UpstreamSource):
    """Connections to one upstream, opened at MAIL and reused when healthy.

    `pool_size` bounds how many idle connections are kept for reuse. A pooled
    connection is checked with NOOP before it is handed out again. At most
    `max_connections` connections are open (idle, in use or being opened);
    past that, acquire refuses with 451 4.4.5 rather than open another.
    For `mx:` upstreams each new connection goes to the domain's MX hosts in
    the order smtpgate.upstream.mx gives, the first that greets and (with
    `tls: required`) starts TLS wins.
    """

    def __init__(self, config: Upstream, *, local_hostname: str):
        self.config = config
        self.local_hostname = local_hostname
        self.idle: list[SmtpSession] = []
        self.extensions: frozenset[str] | None = None  # learnt from the last connection
        self._closed = False
        # Open sessions; weak, so one a bug never released cannot hold a slot for ever.
        self._live: weakref.WeakSet[SmtpSession] = weakref.WeakSet()
        self._connecting = 0
        self.route: MxRoute | None = None
        if config.scheme == "mx":
            assert config.mx_domain is not None and config.port is not None
            self.route = MxRoute(config.mx_domain, port=config.port, resolver=config.resolver,
                                 lifetime=config.timeouts.connect)
        # The token request waits as long as connecting to one host, so a stalled token
        # endpoint is a 451 4.7.0 within the client's MAIL budget (docs/upstream.md).
        self.tokens = (TokenSource(config.oauth2, timeout=config.timeouts.connect)
                       if config.auth == "xoauth2" and config.oauth2 is not None else None)
        self._accepted_token = 0  # generation of the newest token the upstream accepted

    @property
    def open_connections(self) -> int:
        return len(self._live) + self._connecting

    async def acquire(self, *, check: bool = False) -> UpstreamSession:
        """A session ready for MAIL; the client's MAIL is answered within upstream.timeout.

        ``check``: a pooled connection is checked with NOOP however recently it was used
        (a readiness probe must see the upstream, not the pool). UpstreamConnectError
        (UpstreamAuthError: credentials) when no connection can be had.
        """
        if self.config.scheme == "maildir":
            assert self.config.path is not None
            self.extensions = MaildirSession.extensions
            return MaildirSession(root=self.config.path, label=self.config.label)
        budget = self.config.timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                session = await self._take(check)
        except TimeoutError:
            exc = _no_connection(budget)
            outage("upstream").failed(f"upstream: {self.config.label}: {exc.reason}")
            raise exc from None
        except UpstreamError as exc:
            if exc.reply is not replies.UPSTREAM_BUSY:  # smtpgate's own cap, not the upstream's fault
                outage("upstream").failed(f"upstream: {self.config.label}: {exc.reason}")
            raise
        outage("upstream").ok()
        session.deadline = started + budget
        return session

    async def _take(self, check: bool = False) -> SmtpSession:
        while self.idle:
            session = self.idle.pop()
            idle_for = time.monotonic() - session.last_used
            if idle_for > IDLE_SECONDS:
                await session.close()
                continue
            if idle_for <= FRESH_SECONDS and not check:
                session.unchecked = True
                session.taken()
                return session
            try:
                if (await session.noop()).ok:
                    session.taken()
                    return session
            except UpstreamError:
                pass
            except asyncio.CancelledError:  # the client went away: out of the pool, not leaked
                session.discard()
                raise
            await session.close()
        session = await self._counted(self.open_session)
        session.taken()
        return session

    async def _counted(self, open_session: Callable[[], Awaitable[SmtpSession]]) -> SmtpSession:
        """A new connection from open_session, counted under upstream.max_connections from the start."""
        cap = self.config.max_connections
        if self.open_connections >= cap:
            raise UpstreamConnectError(f"upstream.max_connections ({cap}) connections open",
                                reply=replies.UPSTREAM_BUSY)
        self._connecting += 1
        try:
            session = await open_session()
        finally:
            self._connecting -= 1
        self._live.add(session)
        self.extensions = session.extensions
        return session

    async def open_session(self) -> SmtpSession:
        """A new connection, to the host or the first MX host that takes it; UpstreamConnectError
        when there is none."""
        return await (self._connect_mx() if self.route is not None else self._connect())

    def forget(self, session: SmtpSession) -> None:
        """session is closing: its slot under max_connections is free."""
        self._live.discard(session)

    def _tls_context(self, *, verify: bool = True) -> ssl.SSLContext:
        """The TLS context of a new connection, with the client certificate when one is set.

        verify=False is opportunistic TLS to an MX host (RFC 7435): encrypt, whatever
        certificate the host shows.
        """
        try:
            context = ssl.create_default_context(
                cafile=str(self.config.ca_file) if self.config.ca_file else None
            )
        except OSError as exc:  # ssl.SSLError too: a ca_file gone or garbled since the config was read
            raise UpstreamConnectError(f"upstream.ca_file {self.config.ca_file}: {exc}") from None
        if not (verify and self.config.verify_tls):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        cert, key = self.config.tls_client_cert, self.config.tls_client_key
        if cert and key:
            try:
                # Read at each connection, so a renewed certificate is used without a reload.
                load_client_certificate(context, cert, key)
            except (OSError, ValueError) as exc:
                raise UpstreamConnectError(f"client certificate {cert}: {type(exc).__name__}: {exc}") from None
        return context

    async def _connect(self, login: Login | None = None, owner: UpstreamSource | None = None) -> SmtpSession:
        cfg = self.config
        assert cfg.host is not None and cfg.port is not None
        tls = {"smtps": "implicit", "smtp+starttls": "required"}.get(cfg.scheme, "none")
        client = await self._open(cfg.host, cfg.port, server_name=cfg.host, tls=tls, login=login)
        return SmtpSession(self, client, owner=owner)

    async def connect_as(self, login: Login, owner: UpstreamSource) -> SmtpSession:
        """A new connection that `login` authenticates instead of upstream.auth (a client's own
        credentials, auth_backend: upstream), handed out by `owner` and given back there;
        counted under max_connections, never pooled."""
        return await self._counted(lambda: self._connect(login=login, owner=owner))

    async def _connect_mx(self) -> SmtpSession:
        """The first MX host (RFC 5321 5.1 order) that takes a connection."""
        assert self.route is not None
        try:
            targets = await self.route.targets()
        except RouteError as exc:
            raise UpstreamConnectError(exc.reason, reply=exc.reply) from None
        failures: list[str] = []
        auth_failures = 0
        for target in targets:
            try:
                client = await self._open_mx(target)
            except _NoToken:
                raise  # the token endpoint failed: no other host would fare better
            except UpstreamError as exc:
                self.route.failed(target)
                # stage mx_host: one host of several; the MAIL that gave up is logged at stage connect.
                log.warning("upstream.error", upstream=self.config.label, stage="mx_host", host=target.host,
                            address=target.address, reason=exc.reason)
                failures.append(f"{target.host}[{target.address}]: {exc.reason}")
                auth_failures += isinstance(exc, UpstreamAuthError)
                continue
            self.route.succeeded(target)
            where = f"{target.host}[{target.address}]:{self.route.port}"
            return SmtpSession(self, client, label=f"{self.config.label} via {where}")
        reason = "no MX host took the connection: " + "; ".join(failures)
        if failures and auth_failures == len(failures):
            raise UpstreamAuthError(reason)  # every host refused smtpgate's credentials: 451 4.7.0
        raise UpstreamConnectError(reason)

    async def _open_mx(self, target: Target) -> aiosmtplib.SMTP:
        assert self.route is not None
        if self.config.tls == "required":
            return await self._open(target.address, self.route.port, server_name=target.host, tls="required")
        try:
            return await self._open(target.address, self.route.port, server_name=target.host, tls="opportunistic")
        except _TlsFailed as exc:
            # RFC 7435: opportunistic TLS that fails goes on in clear, as a server without STARTTLS would.
            log.warning("upstream.tls_failed", upstream=self.config.label, host=target.host,
                        address=target.address, reason=str(exc))
            return await self._open(target.address, self.route.port, server_name=target.host, tls="none")

    async def _open(self, host: str, port: int, *, server_name: str, tls: str,
                    login: Login | None = None) -> aiosmtplib.SMTP:
        """Connect, greet and start TLS as `tls` says within upstream.timeouts.connect, then
        log in (each AUTH command, and the token request, waits as long at most).

        tls: none | implicit (smtps) | required (STARTTLS, certificate checked unless
        verify_tls is false) | opportunistic (STARTTLS when offered, certificate not
        checked: RFC 7435; raises _TlsFailed when the handshake fails).
        """
        cfg = self.config
        wait = cfg.timeouts.connect
        where = f"{server_name}[{host}]:{port}" if server_name != host else f"{host}:{port}"
        client = aiosmtplib.SMTP(
            hostname=host, port=port, timeout=wait, local_hostname=self.local_hostname,
            use_tls=tls == "implicit", start_tls=False,
            tls_context=self._tls_context() if tls == "implicit" else None,
        )
        try:
            async with asyncio.timeout(wait):
                await client.connect()
                await _greet(client)
                if tls in ("required", "opportunistic"):
                    await self._starttls(client, server_name, tls)
            # After the connect wait: a token request that runs out is a 451 4.7.0, not a dead host.
            await (login or self._login)(client)
        except _TlsFailed:
            client.close()
            raise
        except UpstreamError:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:  # TimeoutError is an OSError
            client.close()
            raise UpstreamConnectError(f"connect to {where}: {_describe(exc, wait)}") from None
        except asyncio.CancelledError:
            client.close()
            raise
        return client

    async def _starttls(self, client: aiosmtplib.SMTP, server_name: str, tls: str) -> None:
        if not client.supports_extension("starttls"):
            if tls == "required":
                raise UpstreamConnectError(f"{server_name}: STARTTLS not offered and TLS is required")
            return
        context = self._tls_context(verify=tls == "required")
        try:
            await client.starttls(server_hostname=server_name, tls_context=context)
        except (aiosmtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
            if tls == "opportunistic" and not isinstance(exc, TimeoutError):
                raise _TlsFailed(f"STARTTLS: {type(exc).__name__}: {exc}") from None
            raise
        await _greet(client)  # RFC 3207 4.2: forget what was learnt before TLS

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        """AUTH as upstream.auth says; UpstreamAuthError when credentials cannot be had or are refused."""
        cfg = self.config
        if cfg.auth == "none":
            return
        if not client.supports_extension("auth"):
            raise UpstreamAuthError(f"{cfg.label} does not offer AUTH (upstream.auth is {cfg.auth})")
        try:
            if cfg.auth == "password":
                await client.login(cfg.username or "", self._password())
            else:
                await self._xoauth2(client)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise UpstreamAuthError(f"login as {cfg.username} refused: {exc.code} {exc.message}") from None
        except TokenError as exc:
            raise _NoToken(exc.reason) from None

    def _password(self) -> str:
        try:
            return self.config.password() or ""
        except (OSError, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(f"cannot read {self.config.password_file}: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None

    async def _xoauth2(self, client: aiosmtplib.SMTP) -> None:
        assert self.tokens is not None and self.config.username
        if "xoauth2" not in client.server_auth_methods:
            raise UpstreamAuthError(f"{self.config.label} does not offer AUTH XOAUTH2")
        token = await self.tokens.token()
        try:
            await client.auth_xoauth2(self.config.username, token.value)
        except aiosmtplib.SMTPAuthenticationError:
            # Refused: the next login asks for a new token, so a fix in the tenant takes effect.
            self.tokens.discard(token)
            if token.generation != self._accepted_token:
                raise  # never accepted: a setting, not the token's age; one AUTH per MAIL is enough
            # Accepted before, refused now (revoked, or expired early): one new token, one more try.
            token = await self.tokens.token()
            await client.auth_xoauth2(self.config.username, token.value)
        self._accepted_token = max(self._accepted_token, token.generation)

    async def give_back(self, session: SmtpSession, reusable: bool) -> None:
        if not session.returned():
            return  # given back already
        if reusable and not self._closed and session.client.is_connected and len(self.idle) < self.config.pool_size:
            self.idle.append(session)
        else:
            await session.close()

    async def probe(self) -> None:
        """Connect once to learn the upstream's extensions (for EHLO); failures are only logged."""
        try:
            session = await self.acquire()
        except UpstreamError as exc:
            event = "upstream.auth_failed" if isinstance(exc, UpstreamAuthError) else "upstream.error"
            log.warning(event, upstream=self.config.label, reason=exc.reason, stage="probe")
            return
        await session.release(True)

    async def close(self) -> None:
        self._closed = True
        idle, self.idle = self.idle, []
        await asyncio.gather(*(s.close() for s in idle), return_exceptions=True)
        if self.tokens is not None:
            await self.tokens.close()
