"""AUTH PLAIN and AUTH LOGIN whose credential check is awaited.

aiosmtpd calls its `authenticator` synchronously from its built-in PLAIN and
LOGIN mechanisms, so a slow check (scrypt) would stall every session on the
loop. Its documented way out is "AUTH Mechanism Hooks": a handler's async
`auth_PLAIN` / `auth_LOGIN` replace the built-in ones and may check the
credentials however they like. `PasswordMechanisms` is that pair, decoding the
client's answers as aiosmtpd's own do (RFC 4616 for PLAIN, the LOGIN draft's
exchange) and awaiting `check_password` for the verdict.

LOGIN's challenges are "Username:" and "Password:" (base64), as Dovecot, Cyrus
SASL and Exchange send them and clients expect (draft-murchison-sasl-login);
aiosmtpd's own "User Name\0" makes some clients give up. An exchange the
client abandons (`*`, an answer that is not base64, a dropped connection) is an
`auth.result` too, with its reason.
"""

from __future__ import annotations

import asyncio
import binascii
from base64 import b64decode
from collections.abc import Callable

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword

from smtpgate.log import get_logger
from smtpgate.mail.replies import AUTH_TEMPORARY
from smtpgate.upstream.client import UpstreamAuthError, UpstreamError, UpstreamPool
from smtpgate.upstream.passthrough import UserUpstream


# The LOGIN challenges clients are written for (sent base64-encoded).
LOGIN_USERNAME_CHALLENGE = "Username:"
LOGIN_PASSWORD_CHALLENGE = "Password:"


class PasswordMechanisms:
    """aiosmtpd handler mixin: the PLAIN and LOGIN mechanisms with an awaited check."""

    async def check_password(self, server: SMTP, mechanism: str, credentials: LoginPassword) -> AuthResult:
        """The verdict on one login; overridden by the handler."""
        raise NotImplementedError

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            answer = await _challenge(server, "PLAIN", "")
            if answer is MISSING:
                return AuthResult(success=False)  # already answered 501 and logged
        else:
            answer = await _initial_response(server, "PLAIN", args[1])
            if answer is MISSING:
                return AuthResult(success=False)
        # RFC 4616 2: [authzid] NUL authcid NUL passwd; the authzid is not used.
        parts = answer.split(b"\x00")
        if len(parts) != 3:
            _abandoned(server, "PLAIN", "answer is not authzid NUL authcid NUL passwd")
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        _, login, password = parts
        return await self.check_password(server, "PLAIN", LoginPassword(login, password))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await _challenge(server, "LOGIN", LOGIN_USERNAME_CHALLENGE)
        else:
            login = await _initial_response(server, "LOGIN", args[1])
        if login is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes)
        password = await _challenge(server, "LOGIN", LOGIN_PASSWORD_CHALLENGE, login)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(password, bytes)
        return await self.check_password(server, "LOGIN", LoginPassword(login, password))


async def _challenge(server: SMTP, mechanism: str, challenge: str, login: bytes | None = None):
    """The client's decoded answer to a 334 challenge, or MISSING (answered 501, logged)
    when it gave up; a connection lost meanwhile is logged and goes on as cancellation."""
    try:
        answer = await server.challenge_auth(challenge)
    except asyncio.CancelledError:
        _abandoned(server, mechanism, "connection lost during the exchange", login)
        raise
    if answer is MISSING:  # "*" (RFC 4954 4) or an answer that is not base64
        _abandoned(server, mechanism, "the client ended the exchange", login)
    return answer


async def _initial_response(server: SMTP, mechanism: str, text: str):
    """AUTH's initial response decoded, or MISSING (answered 501, logged)."""
    try:
        return b64decode(text.encode(), validate=True)
    except binascii.Error:
        _abandoned(server, mechanism, "initial response is not base64")
        await server.push("501 5.5.2 Can't decode base64")
        return MISSING


def _abandoned(server: SMTP, mechanism: str, reason: str, login: bytes | None = None) -> None:
    """auth.result for an exchange that ended before any password could be checked."""
    log = getattr(server, "log", None) or get_logger()
    user = login.decode("utf-8", "replace") if login else None
    log.warning("auth.result", user=user, success=False, mechanism=mechanism, reason=reason)


def upstream_authenticator(pool: UpstreamPool) -> Callable:
    """auth_backend: upstream: the client's credentials are checked by logging in to the upstream.

    On success the session adopts that logged-in connection (smtpgate.upstream.passthrough)
    for its messages. An upstream that cannot be reached is RFC 4954's temporary failure
    (454 4.7.0), never a wrong password.
    """

    async def authenticate(server, session, envelope, mechanism: str, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        user = UserUpstream(pool, name, auth_data.password.decode("utf-8", "replace"))
        log = getattr(server, "log", None) or get_logger()
        try:
            await user.login()
        except UpstreamAuthError as exc:
            await user.close()
            # The upstream's own words, never the password (docs: SECURITY.md, "Secrets").
            log.warning("auth.result", user=name, success=False, mechanism=mechanism, backend="upstream",
                        reason=exc.reason)
            return AuthResult(success=False, handled=False)
        except UpstreamError as exc:
            await user.close()
            log.warning("auth.result", user=name, success=False, mechanism=mechanism, backend="upstream",
                        reason=exc.reason, temporary=True)
            await server.push(AUTH_TEMPORARY.line())
            return AuthResult(success=False, handled=True)
        server.adopt_upstream(user)
        log.info("auth.result", user=name, success=True, mechanism=mechanism, backend="upstream")
        return AuthResult(success=True, handled=False, auth_data=name)

    return authenticate
