"""The upstream side of the lockstep relay: connections, a pool, and a Maildir sink.

An `UpstreamSession` is one SMTP transaction's worth of an upstream
connection. Every method returns the upstream's verdict as `(code, text)`;
network faults become `UpstreamError`, never a made-up success. The relay
decides what the client sees (smtpgate.frontends.smtp.relay).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from smtpgate.config import Upstream, load_client_certificate
from smtpgate.log import get_logger
from smtpgate.metrics import UPSTREAM_IN_USE
from smtpgate.upstream.oauth2 import TokenError, TokenSource

log = get_logger()

# How long an idle pooled connection is kept; servers drop idle clients after
# a few minutes (RFC 5321 4.5.3.2.7), so reuse only recent ones.
IDLE_SECONDS = 30.0


class UpstreamError(Exception):
    """The upstream could not be reached, timed out or dropped the connection."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UpstreamAuthError(UpstreamError):
    """The upstream's credentials could not be had (token endpoint) or were refused (AUTH)."""


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
    def __init__(self, pool: UpstreamPool, client: aiosmtplib.SMTP):
        self.pool = pool
        self.client = client
        self.label = pool.config.label
        self.extensions = frozenset(client.esmtp_extensions)
        self.last_used = time.monotonic()

    async def _command(self, *parts: bytes) -> Verdict:
        try:
            response = await self.client.execute_command(*parts)
        except asyncio.CancelledError:
            # The reply is still in flight: it would be paired with a later command.
            self.client.close()
            raise
        except aiosmtplib.SMTPException as exc:
            raise UpstreamError(f"{parts[0].decode()}: {type(exc).__name__}: {exc}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"{parts[0].decode()}: {type(exc).__name__}: {exc}") from None
        return Verdict(response.code, response.message)

    async def mail(self, sender: str, params: list[str]) -> Verdict:
        return await self._command(b"MAIL", b"FROM:<" + _encode(sender) + b">", *map(_encode, params))

    async def rcpt(self, recipient: str, params: list[str]) -> Verdict:
        return await self._command(b"RCPT", b"TO:<" + _encode(recipient) + b">", *map(_encode, params))

    async def rset(self) -> Verdict:
        return await self._command(b"RSET")

    async def noop(self) -> Verdict:
        return await self._command(b"NOOP")

    async def data(self, content: bytes) -> Verdict:
        try:
            response = await self.client.data(content)
        except asyncio.CancelledError:
            self.client.close()
            raise
        except aiosmtplib.SMTPDataError as exc:
            return Verdict(exc.code, exc.message)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"DATA: {type(exc).__name__}: {exc}") from None
        return Verdict(response.code, response.message)

    async def release(self, reusable: bool) -> None:
        self.last_used = time.monotonic()
        await self.pool.give_back(self, reusable)

    async def close(self) -> None:
        try:
            if self.client.is_connected:
                await asyncio.wait_for(self.client.quit(), timeout=5)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            self.client.close()


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


class UpstreamPool:
    """Connections to one upstream, opened at MAIL and reused when healthy.

    `pool_size` bounds how many idle connections are kept for reuse. A pooled
    connection is checked with NOOP before it is handed out again.
    """

    def __init__(self, config: Upstream, *, local_hostname: str):
        self.config = config
        self.local_hostname = local_hostname
        self.idle: list[SmtpSession] = []
        self.extensions: frozenset[str] | None = None  # learnt from the last connection
        self._closed = False
        self.tokens = (TokenSource(config.oauth2, timeout=config.timeout)
                       if config.auth == "xoauth2" and config.oauth2 is not None else None)
        self._accepted_token = 0  # generation of the newest token the upstream accepted

    async def acquire(self) -> UpstreamSession:
        if self.config.scheme == "maildir":
            assert self.config.path is not None
            self.extensions = MaildirSession.extensions
            return MaildirSession(root=self.config.path, label=self.config.label)
        while self.idle:
            session = self.idle.pop()
            if time.monotonic() - session.last_used > IDLE_SECONDS:
                await session.close()
                continue
            try:
                if (await session.noop()).ok:
                    UPSTREAM_IN_USE.inc()
                    return session
            except UpstreamError:
                pass
            await session.close()
        session = await self._connect()
        UPSTREAM_IN_USE.inc()
        return session

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=str(self.config.ca_file) if self.config.ca_file else None
        )
        if not self.config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        cert, key = self.config.tls_client_cert, self.config.tls_client_key
        if cert and key:
            try:
                # Read at each connection, so a renewed certificate is used without a reload.
                load_client_certificate(context, cert, key)
            except (OSError, ValueError) as exc:
                raise UpstreamError(f"client certificate {cert}: {type(exc).__name__}: {exc}") from None
        return context

    async def _connect(self) -> SmtpSession:
        cfg = self.config
        kwargs: dict = dict(
            hostname=cfg.host,
            port=cfg.port,
            timeout=cfg.timeout,
            local_hostname=self.local_hostname,
        )
        if cfg.scheme == "smtps":
            kwargs.update(use_tls=True, tls_context=self._tls_context())
        elif cfg.scheme == "smtp+starttls":
            kwargs.update(start_tls=True, tls_context=self._tls_context())
        else:
            kwargs.update(start_tls=False)
        client = aiosmtplib.SMTP(**kwargs)
        try:
            await client.connect()
            if not client.supports_esmtp and client.last_ehlo_response is None:
                await _greet(client)
            await self._login(client)
        except UpstreamError:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            client.close()
            raise UpstreamError(f"connect to {cfg.label}: {type(exc).__name__}: {exc}") from None
        except asyncio.CancelledError:
            client.close()
            raise
        session = SmtpSession(self, client)
        self.extensions = session.extensions
        return session

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
            raise UpstreamAuthError(exc.reason) from None

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
        UPSTREAM_IN_USE.dec()
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
