"""A small SMTP client for tests: one transaction, every reply kept as it came."""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiosmtplib

__all__ = ["Transaction", "send"]


@dataclass
class Transaction:
    """The replies to one transaction, each as (code, text).

    `data` is None when DATA was not sent (no recipient accepted or MAIL
    refused) and (0, reason) when the server hung up instead of answering.
    """

    ehlo: tuple[int, str]
    mail: tuple[int, str]
    rcpts: dict[str, tuple[int, str]] = field(default_factory=dict)
    data: tuple[int, str] | None = None

    @property
    def accepted(self) -> list[str]:
        return [rcpt for rcpt, (code, _) in self.rcpts.items() if 200 <= code < 300]


async def send(
    host: str,
    port: int,
    *,
    mail_from: str,
    rcpt_tos: Sequence[str],
    data: bytes,
    mail_options: Sequence[str] = (),
    rcpt_options: Mapping[str, Sequence[str]] | None = None,
    starttls: bool = False,
    implicit_tls: bool = False,
    tls_context: ssl.SSLContext | None = None,
    login: tuple[str, str] | None = None,
    helo: str = "client.test",
    timeout: float = 30,
) -> Transaction:
    """Run EHLO [STARTTLS] [AUTH] MAIL RCPT... DATA QUIT and return every reply.

    Refusals are returned, not raised; only a failure to connect, to start
    TLS or to log in raises (aiosmtplib's exceptions). `data` is sent as is
    (CRLF line ends expected) with dot-stuffing done by aiosmtplib.
    """
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        local_hostname=helo,
        timeout=timeout,
        use_tls=implicit_tls,
        start_tls=False,
        tls_context=tls_context,
    )
    await client.connect()
    try:
        ehlo = await client.ehlo()
        if starttls:
            await client.starttls(tls_context=tls_context)
            ehlo = await client.ehlo()
        if login is not None:
            await client.login(*login)
        from_arg = f"FROM:<{mail_from}>".encode()
        mail = await client.execute_command(b"MAIL", from_arg, *[o.encode() for o in mail_options])
        result = Transaction(ehlo=(ehlo.code, ehlo.message), mail=(mail.code, mail.message))
        if not 200 <= mail.code < 300:
            return result
        for rcpt in rcpt_tos:
            options = (rcpt_options or {}).get(rcpt, ())
            reply = await client.execute_command(
                b"RCPT", f"TO:<{rcpt}>".encode(), *[o.encode() for o in options]
            )
            result.rcpts[rcpt] = (reply.code, reply.message)
        if not result.accepted:
            await client.rset()
            return result
        try:
            reply = await client.data(data)
            result.data = (reply.code, reply.message)
        except aiosmtplib.SMTPDataError as error:
            result.data = (error.code, error.message)
        except aiosmtplib.SMTPServerDisconnected as error:
            result.data = (0, str(error))
        return result
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except aiosmtplib.SMTPException:
                client.close()
