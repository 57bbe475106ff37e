"""AUTH PLAIN and AUTH LOGIN whose credential check is awaited.

aiosmtpd calls its `authenticator` synchronously from its built-in PLAIN and
LOGIN mechanisms, so a slow check (scrypt) would stall every session on the
loop. Its documented way out is "AUTH Mechanism Hooks": a handler's async
`auth_PLAIN` / `auth_LOGIN` replace the built-in ones and may check the
credentials however they like. `PasswordMechanisms` is that pair, decoding the
client's answers as aiosmtpd's own do (RFC 4616 for PLAIN, the LOGIN draft's
"Username:"/"Password:" exchange) and awaiting `check_password` for the verdict.
"""

from __future__ import annotations

import binascii
from base64 import b64decode

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword


class PasswordMechanisms:
    """aiosmtpd handler mixin: the PLAIN and LOGIN mechanisms with an awaited check."""

    async def check_password(self, server: SMTP, mechanism: str, credentials: LoginPassword) -> AuthResult:
        """The verdict on one login; overridden by the handler."""
        raise NotImplementedError

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            answer = await server.challenge_auth("")
            if answer is MISSING:
                return AuthResult(success=False)  # challenge_auth already replied 501
        else:
            try:
                answer = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        # RFC 4616 2: [authzid] NUL authcid NUL passwd; the authzid is not used.
        parts = answer.split(b"\x00")
        if len(parts) != 3:
            await server.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        _, login, password = parts
        return await self.check_password(server, "PLAIN", LoginPassword(login, password))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            if login is MISSING:
                return AuthResult(success=False)
        else:
            try:
                login = b64decode(args[1].encode(), validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False)
        assert isinstance(login, bytes) and isinstance(password, bytes)
        return await self.check_password(server, "LOGIN", LoginPassword(login, password))
