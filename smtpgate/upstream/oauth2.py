"""OAuth2 access tokens for the upstream's AUTH XOAUTH2, by the client-credentials grant.

The token endpoint is asked with `grant_type=client_credentials` and the
client's id and secret in the form body (RFC 6749 4.4 and 2.3.1); the answer
is read as RFC 6749 5.1 (success) or 5.2 (error). One token serves every
upstream connection until shortly before it expires; then one refresh runs
while sessions keep using the still-valid token, and only a session that
finds no valid token waits, on that same refresh. docs/microsoft-365.md says
how a Microsoft 365 tenant is set up for it.

Neither the client secret nor a token is ever logged or put into an error.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from smtpgate.config import OAuth2
from smtpgate.log import get_logger

log = get_logger()

# Refresh this long before the token expires (Microsoft's tokens live 60-90 minutes).
REFRESH_BEFORE = 300.0
# Stop handing out a token this long before it expires: it must still be valid when the upstream checks it.
EXPIRY_SLACK = 30.0
# RFC 6749 5.1 makes expires_in only RECOMMENDED; without it, assume a short life.
DEFAULT_LIFETIME = 300.0
# No token is trusted for longer than a day, whatever expires_in says.
MAX_LIFETIME = 86400.0
# An answer larger than this is not a token response.
MAX_RESPONSE = 256 * 1024


class TokenError(Exception):
    """No token could be had; `reason` names why, without the secret."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class AccessToken:
    value: str
    generation: int  # 1 for the first token fetched, 2 for the next, ...
    fresh_until: float  # before this, no refresh is started
    usable_until: float  # after this, callers wait for a new token

    def __repr__(self) -> str:
        return f"AccessToken(generation={self.generation}, usable_until={self.usable_until})"


class TokenSource:
    """The cached token of one `upstream.oauth2` setting; one refresh in flight at a time.

    `clock` is the monotonic clock the expiry times are measured on.
    """

    def __init__(self, settings: OAuth2, *, timeout: float,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.timeout = timeout
        self.clock = clock
        self._generation = 0  # of the newest token fetched
        self._cached: AccessToken | None = None
        self._closed = False
        self._refresh: asyncio.Task[AccessToken] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def token(self) -> AccessToken:
        """A token valid for at least EXPIRY_SLACK seconds more; raises TokenError.

        A token past its fresh time starts one background refresh and is still
        returned; only when no token is usable does the caller wait, on the one
        refresh in flight.
        """
        if self._closed:
            raise TokenError("no token: the upstream connections are being closed (reload or stop)")
        now = self.clock()
        cached = self._cached
        if cached is not None and now < cached.fresh_until:
            return cached
        refresh = self._refresh
        if refresh is None:
            refresh = self._refresh = asyncio.get_running_loop().create_task(self._fetch())
            refresh.add_done_callback(self._refreshed)
        if cached is not None and now < cached.usable_until:
            return cached
        try:
            # shield: a caller that gives up (its client left) must not cancel the others' refresh.
            return await asyncio.shield(refresh)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if refresh.cancelled() and me is not None and not me.cancelling():
                # close() stopped the refresh, not this caller: a temporary failure for its client.
                raise TokenError("no token: the upstream connections are being closed (reload or stop)") from None
            raise

    async def settle(self) -> None:
        """Return once no refresh is in flight (its outcome is then cached or logged)."""
        refresh = self._refresh
        if refresh is not None:
            await asyncio.wait([refresh])

    def discard(self, token: AccessToken) -> None:
        """Forget token (the upstream refused it) so the next caller gets a new one."""
        if self._cached is not None and self._cached.generation == token.generation:
            self._cached = None

    async def close(self) -> None:
        """Stop a refresh in flight (its waiters get TokenError) and release the HTTP client."""
        self._closed = True
        refresh, self._refresh = self._refresh, None
        if refresh is not None and not refresh.done():
            refresh.cancel()
            await asyncio.gather(refresh, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _refreshed(self, task: asyncio.Task[AccessToken]) -> None:
        if self._refresh is task:
            self._refresh = None
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here too, so a background failure is never left unread
        cached = self._cached
        if isinstance(exc, TokenError) and cached is not None and self.clock() < cached.usable_until:
            # Nobody waited for this refresh: say so once; the next session tries again.
            log.warning("upstream.auth_failed", stage="token_refresh", reason=exc.reason,
                        token_url=self.settings.token_url,
                        valid_for_s=round(cached.usable_until - self.clock()))

    async def _fetch(self) -> AccessToken:
        settings = self.settings
        started = self.clock()
        try:
            secret = settings.client_secret()
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenError(f"cannot read {settings.client_secret_file}: {getattr(exc, 'strerror', None) or exc}") from None
        form = {"grant_type": "client_credentials", "client_id": settings.client_id,
                "client_secret": secret, "scope": settings.scope}
        try:
            status, body = await self._post(form)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise TokenError(_scrub(f"token endpoint {settings.token_url} not reachable: "
                                    f"{type(exc).__name__}: {exc}", secret)) from None
        value, lifetime = _parse(status, body, settings.token_url, secret)
        self._generation += 1
        token = AccessToken(
            value=value,
            generation=self._generation,
            fresh_until=started + max(lifetime - REFRESH_BEFORE, lifetime / 2),
            usable_until=started + max(lifetime - EXPIRY_SLACK, lifetime * 0.9),
        )
        self._cached = token
        log.info("upstream.token_fetched", token_url=settings.token_url, expires_in=round(lifetime),
                 generation=token.generation)
        return token

    async def _post(self, form: dict[str, str]) -> tuple[int, bytes]:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        # No redirects: a 307 would carry the client secret to wherever it points.
        async with self._http.post(self.settings.token_url, data=form, allow_redirects=False,
                                   headers={"Accept": "application/json"}) as response:
            body = await response.content.read(MAX_RESPONSE + 1)
            return response.status, body


def _parse(status: int, body: bytes, url: str, secret: str) -> tuple[str, float]:
    """(access token, lifetime in seconds) from a token endpoint's answer; raises TokenError."""
    try:
        doc = json.loads(body) if len(body) <= MAX_RESPONSE else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if status != 200:
        detail = ""
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            description = doc.get("error_description")
            first = description.strip().splitlines()[0][:200] if isinstance(description, str) and description.strip() else ""
            detail = f": {doc['error']}" + (f": {first}" if first else "")
        raise TokenError(_scrub(f"token endpoint {url} answered HTTP {status}{detail}", secret))
    if not isinstance(doc, dict):
        raise TokenError(f"token endpoint {url} answered 200 without a JSON object")
    value = doc.get("access_token")
    if not isinstance(value, str) or not value or not value.isprintable():
        raise TokenError(f"token endpoint {url} answered 200 without an access_token")
    token_type = doc.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenError(f"token endpoint {url} gave a token of type {str(token_type)[:40]!r}, not Bearer")
    expires_in = doc.get("expires_in", DEFAULT_LIFETIME)
    try:
        # Microsoft's v1 endpoint sends the number as a string.
        lifetime = float(expires_in)
    except (TypeError, ValueError):
        raise TokenError(f"token endpoint {url} gave expires_in {str(expires_in)[:40]!r}, not a number") from None
    except OverflowError:  # an integer beyond any float: a long lifetime, capped like any other
        lifetime = MAX_LIFETIME
    if not lifetime > 0:
        raise TokenError(f"token endpoint {url} gave a token that has already expired")
    return value, min(lifetime, MAX_LIFETIME)


def _scrub(text: str, secret: str) -> str:
    # A second line of defence: an endpoint that echoes the request never puts the secret in a log.
    return text.replace(secret, "[secret]") if secret else text
