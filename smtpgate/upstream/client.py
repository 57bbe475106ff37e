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

from smtpgate.config import Upstream
from smtpgate.log import get_logger

log = get_logger()

# How long an idle pooled connection is kept; servers drop idle clients after
# a few minutes (RFC 5321 4.5.3.2.7), so reuse only recent ones.
IDLE_SECONDS = 30.0

# Extensions whose MAIL/RCPT parameters smtpgate passes through when the upstream has them.
PASSABLE = ("dsn", "smtputf8", "8bitmime", "size", "auth", "pipelining")


class UpstreamError(Exception):
    """The upstream could not be reached, timed out or dropped the connection."""

    def __init__(self, reason: str, *, after_data: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.after_data = after_data


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
            raise UpstreamError(f"DATA: {type(exc).__name__}: {exc}", after_data=True) from None
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
                    return session
            except UpstreamError:
                pass
            await session.close()
        return await self._connect()

    def _tls_context(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(
                cafile=str(self.config.ca_file) if self.config.ca_file else None
            )
        except OSError as exc:  # ssl.SSLError too: a ca_file gone or garbled since the config was read
            raise UpstreamError(f"upstream.ca_file {self.config.ca_file}: {exc}") from None
        if not self.config.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
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
            if cfg.username:
                await client.login(cfg.username, cfg.password() or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise UpstreamError(f"login as {cfg.username} refused: {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            client.close()
            raise UpstreamError(f"connect to {cfg.label}: {type(exc).__name__}: {exc}") from None
        except asyncio.CancelledError:
            client.close()
            raise
        session = SmtpSession(self, client)
        self.extensions = session.extensions
        return session

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
