"""Who a request to the admin listener is: the trusted proxy's person, a bearer token,
or a sign-in session (smtpgate.admin.auth says what each may see).

A session's cookie is 32 random bytes (base64url), opaque and never the token;
the store keeps only its SHA-256, with the token's team and the token's
SHA-256, so a session ends when it expires, when its person signs out (on every
worker and node: they share the store), and when its token is withdrawn or
rotated (the next request finds no such token in the configuration).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from aiohttp import web

from smtpgate.admin.auth import Grant, SignOn, Tokens
from smtpgate.config import Config
from smtpgate.store import Store, StoreError

__all__ = ["COOKIE", "SESSION_HOURS", "Audit", "Identities"]

COOKIE = "smtpgate_session"
# A session lasts a working day; the cookie's Max-Age says the same to the browser.
SESSION_HOURS = 10


@dataclass
class Audit:
    """Who made the request being served and why access was refused, for its admin.request line."""

    grant: Grant | None = None
    denied: str | None = None
    # Identity headers that were not used: from an address admin.trusted_proxy does not name.
    ignored: str | None = None
    person: str | None = None  # the proxy's user, also when refused (no team)
    groups: list[str] = field(default_factory=list)


def session_id(cookie: str) -> str:
    """What the store keeps of a session cookie: its SHA-256, in hex."""
    return hashlib.sha256(cookie.encode("utf-8", errors="surrogateescape")).hexdigest()


class Identities:
    """Tells who a request is, with the token table and sign-on settings of the current snapshot."""

    def __init__(self) -> None:
        self._cached: tuple[Config, Tokens, SignOn] | None = None

    def of(self, config: Config) -> tuple[Tokens, SignOn]:
        """The token table and sign-on settings of this config snapshot, read once per snapshot."""
        if self._cached is None or self._cached[0] is not config:
            self._cached = (config, Tokens.load(config.admin), SignOn(config.admin))
        return self._cached[1], self._cached[2]

    async def grant(self, request: web.Request, config: Config, store: Store | None, audit: Audit) -> Grant | None:
        """The caller's grant, or None with audit.denied saying why. Raises
        auth.ProxyRefusal for a trusted proxy's request naming nobody usable, and
        StoreError when a session cannot be looked up."""
        tokens, sign_on = self.of(config)
        if sign_on.names_someone(request.headers):
            if sign_on.trusts(request.remote):
                audit.grant = sign_on.identify(request.headers)
                return audit.grant
            audit.ignored = "identity headers from an address admin.trusted_proxy does not name"
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, presented = header.strip().partition(" ")
            return self.token(config, presented.strip() if scheme.lower() == "bearer" else "", audit)
        cookie = request.cookies.get(COOKIE, "")
        if not cookie:
            audit.denied = "no token"
            return None
        return await self._session(tokens, store, cookie, audit)

    def token(self, config: Config, presented: str, audit: Audit) -> Grant | None:
        if not presented:
            audit.denied = "no token"
            return None
        audit.grant = self.of(config)[0].identify(presented)
        if audit.grant is None:
            audit.denied = "wrong token"
        return audit.grant

    async def _session(self, tokens: Tokens, store: Store | None, cookie: str, audit: Audit) -> Grant | None:
        if store is None:
            raise StoreError("the store is not open")
        session = await store.find_session(session_id(cookie))
        if session is None:
            audit.denied = "no session"
            return None
        try:
            grant = tokens.by_digest(bytes.fromhex(session.token), via="session")
        except ValueError:
            grant = None
        if grant is None or session.team not in grant.teams:
            audit.denied = "token withdrawn"
            return None
        audit.grant = grant
        return grant

    @staticmethod
    async def sign_in(store: Store | None, grant: Grant, response: web.StreamResponse, secure: bool) -> None:
        """Start a session for a token's grant and set its cookie on response."""
        if store is None:
            raise StoreError("the store is not open")
        cookie = secrets.token_urlsafe(32)
        expires = datetime.now(timezone.utc) + timedelta(hours=SESSION_HOURS)
        assert grant.token is not None
        await store.create_session(session_id(cookie), grant.team, grant.token, expires)
        # HttpOnly: no script can read it; Strict: no other site's page can make the browser send it;
        # Secure over TLS: never sent in clear once the listener speaks HTTPS.
        response.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/", secure=secure,
                            max_age=SESSION_HOURS * 3600)

    @staticmethod
    async def sign_out(store: Store | None, request: web.Request, response: web.StreamResponse) -> bool:
        """End the request's session everywhere and clear its cookie; True when there was one."""
        cookie = request.cookies.get(COOKIE, "")
        ended = False
        if cookie and store is not None:
            ended = await store.end_session(session_id(cookie))
        response.del_cookie(COOKIE, path="/")
        return ended
