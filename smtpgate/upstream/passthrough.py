"""auth_backend: upstream: a client's own login at the upstream carries that client's mail.

The client's AUTH PLAIN/LOGIN credentials are tried on a new upstream
connection over TLS; when the upstream accepts them, that connection is kept
for the client's SMTP session and carries each of its messages, so the
upstream applies its own send-as rules to its own user. The password lives in
this object, in memory, for the session only (to log in again when the
upstream closed the idle connection between two messages); it is never logged
and never written anywhere.

`UserUpstream` is an `UpstreamSource`: the client's transactions take their
session from it and give it back to it, as others do with the shared pool.
"""

from __future__ import annotations

import asyncio

import aiosmtplib

from smtpgate.config import Upstream
from smtpgate.upstream.client import (SmtpSession, UpstreamAuthError, UpstreamConnectError, UpstreamError,
                                      UpstreamPool, UpstreamSource)

__all__ = ["UserUpstream"]


class UserUpstream(UpstreamSource):
    """One authenticated client's upstream connection: the source of its transactions' sessions.

    Its connections are opened (and counted under upstream.max_connections) by the shared
    pool, logged in with the client's credentials, and come back here, never to the pool."""

    def __init__(self, pool: UpstreamPool, username: str, password: str):
        self.pool = pool
        self.username = username
        self._password = password
        self.session: SmtpSession | None = None  # idle between two transactions
        self.closed = False

    @property
    def config(self) -> Upstream:
        return self.pool.config

    @property
    def extensions(self) -> frozenset[str] | None:
        return self.pool.extensions

    async def login(self) -> None:
        """Log in at the upstream; UpstreamAuthError when it refuses, UpstreamConnectError when it cannot be reached."""
        self.session = await self._open()

    async def _open(self) -> SmtpSession:
        return await self.pool.connect_as(self._login, owner=self)

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        if not client.supports_extension("auth"):
            raise UpstreamAuthError(f"{self.config.label} does not offer AUTH (auth_backend is upstream)")
        try:
            await client.login(self.username, self._password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise UpstreamAuthError(f"login as {self.username} refused: {exc.code} {exc.message}") from None

    async def acquire(self) -> SmtpSession:
        """The session's connection for one transaction, logged in again if the upstream dropped it."""
        if self.closed:
            raise UpstreamConnectError("the client's session has ended")
        session, self.session = self.session, None
        if session is not None:
            try:
                if session.client.is_connected and (await session.noop()).ok:
                    session.taken()
                    return session
            except UpstreamError:
                pass
            except asyncio.CancelledError:
                session.discard()
                raise
            await session.close()
        session = await self._open()
        session.taken()
        return session

    async def give_back(self, session: SmtpSession, reusable: bool) -> None:
        if not session.returned():
            return  # given back already
        if reusable and not self.closed and self.session is None and session.client.is_connected:
            self.session = session
        else:
            await session.close()

    def forget(self, session: SmtpSession) -> None:
        self.pool.forget(session)  # its place under max_connections is the pool's

    async def close(self) -> None:
        """The client's session ended: the connection closes and the password is dropped."""
        self.closed = True
        self._password = ""
        session, self.session = self.session, None
        if session is not None:
            await session.close()
