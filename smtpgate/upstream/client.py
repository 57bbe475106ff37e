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
import json
import os
import socket
import ssl
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from smtpgate.config import Upstream
from smtpgate.log import get_logger
from smtpgate.mail import replies
from smtpgate.mail.replies import Reply
from smtpgate.upstream.mx import MxRoute, RouteError, Target

log = get_logger()

# How long an idle pooled connection is kept; servers drop idle clients after
# a few minutes (RFC 5321 4.5.3.2.7), so reuse only recent ones.
IDLE_SECONDS = 30.0


class UpstreamError(Exception):
    """The upstream could not be reached, timed out or dropped the connection.

    `reply`, when set, is what the client should hear instead of the relay's
    default for that stage (a null MX, the connection cap).
    """

    def __init__(self, reason: str, *, reply: Reply | None = None):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass
class Verdict:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class UpstreamSession:
    """The interface the relay drives; see SmtpSession and MaildirSession."""

    extensions: frozenset[str] = frozenset()
    label: str = ""

    async def mail(self, sender: str, params: list[str]) -> Verdict: ...
    async def rcpt(self, recipient: str, params: list[str]) -> Verdict: ...
    async def rset(self) -> Verdict: ...
    async def data(self, content: bytes) -> Verdict: ...
    async def release(self, reusable: bool) -> None: ...


def _encode(text: str) -> bytes:
    # Addresses are ASCII unless the transaction is SMTPUTF8; utf-8 covers both.
    return text.encode("utf-8", errors="surrogateescape")


class SmtpSession(UpstreamSession):
    def __init__(self, pool: UpstreamPool, client: aiosmtplib.SMTP, label: str | None = None):
        self.pool = pool
        self.client = client
        self.label = label or pool.config.label
        self.extensions = frozenset(client.esmtp_extensions)
        self.last_used = time.monotonic()
        self.desynced = False  # a reply went missing or was garbled: the connection is only closed
        self.deadline: float | None = None  # the client's MAIL is answered by then (set at acquire)

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
            raise UpstreamError(f"{parts[0].decode()}: {_describe(exc, wait)}") from None
        return Verdict(response.code, response.message)

    async def mail(self, sender: str, params: list[str]) -> Verdict:
        wait = self.pool.config.timeouts.command
        if self.deadline is not None:
            # The first MAIL after acquire shares the client's MAIL budget with the connecting.
            wait = max(0.001, min(wait, self.deadline - time.monotonic()))
            self.deadline = None
        return await self._command(b"MAIL", b"FROM:<" + _encode(sender) + b">", *map(_encode, params),
                                   timeout=wait)

    async def rcpt(self, recipient: str, params: list[str]) -> Verdict:
        return await self._command(b"RCPT", b"TO:<" + _encode(recipient) + b">", *map(_encode, params))

    async def rset(self) -> Verdict:
        return await self._command(b"RSET")

    async def noop(self) -> Verdict:
        # The health check of a pooled connection: a dead one must not eat the MAIL budget.
        return await self._command(b"NOOP", timeout=self.pool.config.timeouts.connect)

    async def data(self, content: bytes) -> Verdict:
        wait = self.pool.config.timeouts.data
        try:
            response = await self.client.data(content, timeout=wait)
        except asyncio.CancelledError:
            self.desynced = True
            self.client.close()
            raise
        except aiosmtplib.SMTPDataError as exc:
            return Verdict(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.desynced = True
            raise UpstreamError(f"DATA: {_describe(exc, wait)}") from None
        return Verdict(response.code, response.message)

    async def release(self, reusable: bool) -> None:
        self.last_used = time.monotonic()
        self.deadline = None
        await self.pool.give_back(self, reusable)

    async def close(self) -> None:
        self.pool.forget(self)
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
        return f"no reply within {wait:g}s"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class MaildirSession(UpstreamSession):
    """Writes each accepted message into a Maildir: for the demo and dry runs.

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

    async def mail(self, sender: str, params: list[str]) -> Verdict:
        self.sender, self.mail_params, self.recipients, self.rcpt_params = sender, params, [], []
        return Verdict(250, "2.1.0 Sender OK")

    async def rcpt(self, recipient: str, params: list[str]) -> Verdict:
        self.recipients.append(recipient)
        self.rcpt_params.append(params)
        return Verdict(250, "2.1.5 Recipient OK")

    async def rset(self) -> Verdict:
        self.sender, self.recipients, self.rcpt_params = "", [], []
        return Verdict(250, "2.0.0 OK")

    async def data(self, content: bytes) -> Verdict:
        envelope = {
            "mail_from": self.sender,
            "mail_options": self.mail_params,
            "rcpt_tos": self.recipients,
            "rcpt_options": self.rcpt_params,
        }
        try:
            name = await asyncio.to_thread(write_maildir, self.root, content, envelope)
        except OSError as exc:
            raise UpstreamError(f"maildir write failed: {exc}") from None
        return Verdict(250, f"2.0.0 Ok: queued as {name}")

    async def release(self, reusable: bool) -> None:
        return None


_counter = 0


def write_maildir(root: Path, content: bytes, envelope: dict) -> str:
    """Deliver content into root/new the Maildir way (tmp, fsync, rename); return its name."""
    global _counter
    _counter += 1
    for sub in ("tmp", "new", "cur", "envelopes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns()}.P{os.getpid()}Q{_counter}.{socket.gethostname()}"
    tmp = root / "tmp" / name
    with open(tmp, "wb") as fh:
        fh.write(content)
        fh.flush()
        os.fsync(fh.fileno())
    side = root / "envelopes" / f"{name}.json"
    side.write_text(json.dumps(envelope, indent=1) + "\n", encoding="utf-8")
    os.rename(tmp, root / "new" / name)
    return name


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO for a server without ESMTP (then no extension is used)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        await client.helo()


class _TlsFailed(Exception):
    """Opportunistic STARTTLS failed on a host that offered it (the caller may go on in clear)."""


class UpstreamPool:
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

    @property
    def open_connections(self) -> int:
        return len(self._live) + self._connecting

    async def acquire(self) -> UpstreamSession:
        """A session ready for MAIL; the client's MAIL is answered within upstream.timeout."""
        if self.config.scheme == "maildir":
            assert self.config.path is not None
            self.extensions = MaildirSession.extensions
            return MaildirSession(root=self.config.path, label=self.config.label)
        budget = self.config.timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(budget):
                session = await self._take()
        except TimeoutError:
            raise UpstreamError(f"no upstream connection within upstream.timeout ({budget:g}s)") from None
        session.deadline = started + budget
        return session

    async def _take(self) -> SmtpSession:
        while self.idle:
            session = self.idle.pop()
            if time.monotonic() - session.last_used > IDLE_SECONDS:
                await session.close()
                continue
            try:
                if (await session.noop()).ok:
                    return session
            except UpstreamError:
                pass
            await session.close()
        cap = self.config.max_connections
        if self.open_connections >= cap:
            raise UpstreamError(f"upstream.max_connections ({cap}) connections open",
                                reply=replies.UPSTREAM_BUSY)
        self._connecting += 1
        try:
            session = await (self._connect_mx() if self.route is not None else self._connect())
        finally:
            self._connecting -= 1
        self._live.add(session)
        self.extensions = session.extensions
        return session

    def forget(self, session: SmtpSession) -> None:
        """session is closing: its slot under max_connections is free."""
        self._live.discard(session)

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=str(self.config.ca_file) if self.config.ca_file else None
        )
        if not self.config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _connect(self) -> SmtpSession:
        cfg = self.config
        assert cfg.host is not None and cfg.port is not None
        tls = {"smtps": "implicit", "smtp+starttls": "required"}.get(cfg.scheme, "none")
        client = await self._open(cfg.host, cfg.port, server_name=cfg.host, tls=tls)
        return SmtpSession(self, client)

    async def _connect_mx(self) -> SmtpSession:
        """The first MX host (RFC 5321 5.1 order) that takes a connection."""
        assert self.route is not None
        try:
            targets = await self.route.targets()
        except RouteError as exc:
            raise UpstreamError(exc.reason, reply=exc.reply) from None
        failures = []
        for target in targets:
            try:
                client = await self._open_mx(target)
            except UpstreamError as exc:
                self.route.failed(target)
                log.warning("upstream.error", upstream=self.config.label, stage="connect", host=target.host,
                            address=target.address, reason=exc.reason)
                failures.append(f"{target.host}[{target.address}]: {exc.reason}")
                continue
            self.route.succeeded(target)
            where = f"{target.host}[{target.address}]:{self.route.port}"
            return SmtpSession(self, client, label=f"{self.config.label} via {where}")
        raise UpstreamError("no MX host took the connection: " + "; ".join(failures))

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

    async def _open(self, host: str, port: int, *, server_name: str, tls: str) -> aiosmtplib.SMTP:
        """Connect, greet, start TLS as `tls` says, log in: all within upstream.timeouts.connect.

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
                if cfg.username:
                    await client.login(cfg.username, cfg.password() or "")
        except _TlsFailed:
            client.close()
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise UpstreamError(f"login as {cfg.username} refused by {where}: {exc.code} {exc.message}") from None
        except UpstreamError:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:  # TimeoutError is an OSError
            client.close()
            raise UpstreamError(f"connect to {where}: {_describe(exc, wait)}") from None
        except asyncio.CancelledError:
            client.close()
            raise
        return client

    async def _starttls(self, client: aiosmtplib.SMTP, server_name: str, tls: str) -> None:
        if not client.supports_extension("starttls"):
            if tls == "required":
                raise UpstreamError(f"{server_name}: STARTTLS not offered and TLS is required")
            return
        context = self._tls_context() if tls == "required" else _unverified_context()
        try:
            await client.starttls(server_hostname=server_name, tls_context=context)
        except (aiosmtplib.SMTPException, OSError) as exc:  # ssl.SSLError is an OSError
            if tls == "opportunistic" and not isinstance(exc, TimeoutError):
                raise _TlsFailed(f"STARTTLS: {type(exc).__name__}: {exc}") from None
            raise
        await _greet(client)  # RFC 3207 4.2: forget what was learnt before TLS

    async def give_back(self, session: SmtpSession, reusable: bool) -> None:
        if reusable and not self._closed and session.client.is_connected and len(self.idle) < self.config.pool_size:
            self.idle.append(session)
        else:
            await session.close()

    async def probe(self) -> None:
        """Connect once to learn the upstream's extensions (for EHLO); failures are only logged."""
        try:
            session = await self.acquire()
        except UpstreamError as exc:
            log.warning("upstream.error", upstream=self.config.label, reason=exc.reason, stage="probe")
            return
        await session.release(True)

    async def close(self) -> None:
        self._closed = True
        idle, self.idle = self.idle, []
        await asyncio.gather(*(s.close() for s in idle), return_exceptions=True)


def _unverified_context() -> ssl.SSLContext:
    """Opportunistic TLS to an MX host (RFC 7435): encrypt, whatever certificate it shows."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
