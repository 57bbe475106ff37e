"""An OAuth2 token endpoint on loopback that tests control (RFC 6749 4.4, client credentials).

It answers the way Microsoft's identity platform does for a confidential
client: form fields grant_type, client_id, client_secret and scope in, a JSON
object with token_type, expires_in and access_token out; errors as RFC 6749
5.2 JSON. A request whose Accept header does not name application/json gets
406 Not Acceptable, as from a server that answers JSON only to those who ask
for it. Each token it issues is a fresh random string, kept in `valid` until
the test revokes it, so an SMTP sink can accept exactly the tokens that are
live (`TokenEndpoint.accepts`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["TokenEndpoint"]


def accepts_json(accept: str) -> bool:
    """Whether an Accept header names JSON itself (media types ignore case; `*/*` is not enough)."""
    return any(part.split(";")[0].strip().lower() == "application/json" for part in accept.split(","))


class TokenEndpoint:
    """Usage::

        async with TokenEndpoint(client_id="app", client_secret="s3") as endpoint:
            ...  # point upstream.oauth2.token_url at endpoint.url

    Controls, read at each request: `expires_in` (the value sent, any JSON
    type), `failure` ((status, JSON object) answered instead of a token),
    `raw` ((status, body bytes) answered as is), `hold` (an Event the answer
    waits for). Records: `requests` (the form of each request, secret
    included), `issued` (tokens in order), `valid` (tokens not revoked).
    """

    def __init__(self, *, client_id: str, client_secret: str, scope: str = "https://outlook.office365.com/.default",
                 port: int = 0, expires_in: Any = 3599):
        self.client_id = client_id
        self.client_secret = client_secret
        self.scope = scope
        self.port = port
        self.expires_in = expires_in
        self.failure: tuple[int, dict] | None = None
        self.raw: tuple[int, bytes] | None = None
        self.hold: asyncio.Event | None = None
        self.requests: list[dict[str, str]] = []
        self.issued: list[str] = []
        self.valid: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._event = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tenant-id/oauth2/v2.0/token"

    async def __aenter__(self) -> TokenEndpoint:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/tenant-id/oauth2/v2.0/token", self._token)
        app.router.add_post("/moved", self._moved)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def accepts(self, user: str, token: str, *, mailbox: str = "relay@corp.example") -> bool:
        """What an Exchange-like server checks: the mailbox named and a live token."""
        return user == mailbox and token in self.valid

    def revoke_all(self) -> None:
        self.valid.clear()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10, what: str = "") -> None:
        """Return once predicate() is true; TimeoutError after timeout seconds."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._event.wait()
        except TimeoutError:
            raise TimeoutError(f"token endpoint: no {what or 'match'} after {timeout}s; "
                               f"{len(self.requests)} requests, {len(self.issued)} issued") from None

    def _changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def _moved(self, request: web.Request) -> web.Response:
        """Sends the client elsewhere, keeping the method and body (RFC 9110 15.4.8)."""
        self.requests.append({key: str(value) for key, value in (await request.post()).items()})
        self._changed()
        raise web.HTTPTemporaryRedirect(self.url)

    async def _token(self, request: web.Request) -> web.Response:
        form = {key: str(value) for key, value in (await request.post()).items()}
        self.requests.append(form)
        self._changed()
        if self.hold is not None:
            await self.hold.wait()
        if not accepts_json(request.headers.get("Accept", "")):
            return web.Response(status=406, text="Not Acceptable: this endpoint answers application/json")
        if self.raw is not None:
            status, body = self.raw
            return web.Response(status=status, body=body, content_type="application/json")
        if self.failure is not None:
            status, doc = self.failure
            return web.json_response(doc, status=status)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return web.json_response({"error": "invalid_client",
                                      "error_description": "AADSTS7000215: Invalid client secret provided."},
                                     status=401)
        if form.get("scope") != self.scope:
            return web.json_response({"error": "invalid_scope"}, status=400)
        token = f"eyJ0eXAi.{len(self.issued) + 1}.{secrets.token_urlsafe(24)}"
        self.issued.append(token)
        self.valid.add(token)
        self._changed()
        return web.json_response({"token_type": "Bearer", "expires_in": self.expires_in,
                                  "ext_expires_in": self.expires_in, "access_token": token})
