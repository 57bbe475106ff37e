"""The admin HTTP listener (`admin.listen`; docs/operations.md).

Health (`/healthz`, `/readyz`), Prometheus metrics (`/metrics`), the
linked-activities API (`/api/v1/activities` — the list and search — and
`/api/v1/activities/{reference}`, the JSON of `smtpgate links show --json`)
and the same as server-rendered pages (`/activities`,
`/activities/{reference}`) with a sign-in form. API and pages apply the team
permissions of smtpgate.admin.auth (single sign-on through a trusted proxy,
bearer tokens, sign-in sessions kept in the store); health and metrics need
no token. Every API call and page view is logged (`admin.request`) with the
person or the token's team, the client address, what was asked and the outcome.

The server takes a callable returning the current `Sources` (config, store,
upstream pool): a reload swaps the snapshot, and the next request sees it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from smtpgate.admin.auth import Grant, ProxyRefusal, Tokens
from smtpgate.admin.identity import COOKIE, Audit, Identities
from smtpgate.admin.lists import MAX_Q, BadQuery, encode_cursor, list_object, parse_list_query
from smtpgate.config import Config
from smtpgate.log import get_logger
from smtpgate.metrics import CONTENT_TYPE_LATEST, exposition
from smtpgate.store import ActivityView, Store, StoreError
from smtpgate.upstream.client import UpstreamError, UpstreamPool
from smtpgate.views import iso_utc, show_object

__all__ = ["AdminServer", "COOKIE", "Sources"]

log = get_logger()

# Readiness answers within this many seconds; a probe's own timeout must be longer.
READY_TIMEOUT = 2.0

_JSON = functools.partial(json.dumps, ensure_ascii=False)
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    # Pages carry one inline style block and no script at all.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}
# Endpoints that scrapers and probes call every few seconds: not worth a log line each.
_QUIET = ("/healthz", "/readyz", "/metrics")
# How much of a query string the audit line keeps.
_LOGGED_QUERY = 300

# Each request runs in its own task, so this is the current request's audit record.
_AUDIT: contextvars.ContextVar[Audit] = contextvars.ContextVar("smtpgate_admin_audit")


@dataclass(frozen=True)
class Sources:
    """What the admin listener reads, as of the current configuration snapshot."""

    config: Config
    store: Store | None
    upstream: UpstreamPool
    draining: bool = False


class AdminServer:
    def __init__(self, sources: Callable[[], Sources], *, ready_timeout: float = READY_TIMEOUT):
        self._sources = sources
        self._ready_timeout = ready_timeout
        self.identities = Identities()
        self._runner: web.AppRunner | None = None
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("smtpgate.admin", "templates"),
            autoescape=True,  # every value is HTML-escaped unless a template says otherwise
            undefined=jinja2.StrictUndefined,
        )
        self._templates.filters["activity_url"] = activity_url
        self.app = web.Application(middlewares=[self._middleware])
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/api/v1/activities", self.api_list),
            web.get("/api/v1/activities/{reference}", self.api_activity),
            web.get("/", self.root),
            web.get("/activities", self.list_page),
            web.get("/activities/{reference}", self.activity_page),
            web.get("/login", self.login_form),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
        ])

    # ------------------------------------------------------------ life

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on host:port (port 0: any free port; see `bound`), HTTPS with ssl_context."""
        self.tokens(self._sources().config)  # token files are read now, not at the first request
        # A shutdown waits at most 5 s for admin requests in flight; nothing there is worth more.
        # A request line up to 64 KiB: a long search text gets smtpgate's own answer (400 naming q),
        # not the HTTP parser's bare refusal at 8 KiB.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=5.0,
                                     max_line_size=65536)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise

    @property
    def bound(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket."""
        if self._runner is None:
            return []
        return [tuple(address[:2]) for address in self._runner.addresses]  # type: ignore[misc]

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------ plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        started = time.monotonic()
        audit = Audit()
        _AUDIT.set(audit)
        try:
            try:
                response = await handler(request)
            except ProxyRefusal as refusal:
                response = self._proxy_refusal(request, refusal, audit)
            except StoreError as exc:
                response = self._store_failure(request, exc)
        except web.HTTPException as exc:
            exc.headers.update(_SECURITY_HEADERS)
            self._log_request(request, exc.status, started, audit)
            raise
        response.headers.update(_SECURITY_HEADERS)
        self._log_request(request, response.status, started, audit)
        return response

    def _log_request(self, request: web.Request, status: int, started: float, audit: Audit) -> None:
        if request.path in _QUIET:
            return
        grant = audit.grant
        log.info("admin.request", method=request.method, path=request.path,
                 query=request.query_string[:_LOGGED_QUERY] or None, status=status,
                 person=grant.person if grant else audit.person, team=grant.team if grant else None,
                 via=grant.via if grant else None, denied=audit.denied, ignored=audit.ignored,
                 peer=request.remote, duration_ms=round((time.monotonic() - started) * 1000, 1))

    def _proxy_refusal(self, request: web.Request, refusal: ProxyRefusal, audit: Audit) -> web.Response:
        audit.denied = refusal.reason
        audit.person = refusal.person
        if request.path.startswith("/api/"):
            return web.json_response({"error": refusal.reason}, status=refusal.status, dumps=_JSON)
        if refusal.status == 403:
            groups = ", ".join(refusal.groups) or "none"
            return self._page("error.html", status=403, grant=None, reference="", title="No team for you here",
                              detail=f"You are signed in as {refusal.person}, but none of your groups "
                                     f"({groups}) is given a team in smtpgate's admin.teams, so there is "
                                     f"nothing this page may show you. Ask smtpgate's administrator to map "
                                     f"one of your groups to your team.")
        return self._page("error.html", status=refusal.status, grant=None, reference="",
                          title="Sign-on headers not usable", detail=refusal.reason)

    def _store_failure(self, request: web.Request, exc: StoreError) -> web.Response:
        if request.path.startswith("/api/"):
            return web.json_response({"error": f"store: {exc}"}, status=503, dumps=_JSON)
        return self._page("error.html", status=503, grant=None, reference="", title="Store unavailable",
                          detail=str(exc))

    def tokens(self, config: Config) -> Tokens:
        """The token table of this config snapshot, read once per snapshot."""
        return self.identities.of(config)[0]

    async def _grant(self, request: web.Request, sources: Sources) -> Grant | None:
        """The caller's grant: the trusted proxy's person, `Authorization: Bearer`, or the
        session cookie. The request's audit record says why there is none."""
        return await self.identities.grant(request, sources.config, sources.store, _AUDIT.get())

    async def _view(self, sources: Sources, reference: str) -> ActivityView | None:
        if sources.store is None:
            raise StoreError("the store is not open")
        return await sources.store.show(reference)

    def _unauthorised(self) -> web.Response:
        denied = _AUDIT.get().denied
        challenge = 'Bearer realm="smtpgate"'
        if denied == "wrong token":
            challenge += ', error="invalid_token"'  # RFC 6750 3.1
        return web.json_response({"error": f"{denied}: send Authorization: Bearer <token>"},
                                 status=401, headers={"WWW-Authenticate": challenge})

    # ------------------------------------------------------------ health and metrics

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(self, request: web.Request) -> web.Response:
        sources = self._sources()
        if sources.draining:
            return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
        store, upstream = await asyncio.gather(self._store_problem(sources), self._upstream_problem(sources))
        body: dict = {"ready": store is None and upstream is None,
                      "store": store or "ok", "upstream": upstream or "ok"}
        if not body["ready"]:
            body["reason"] = "; ".join(f"{name}: {why}" for name, why in
                                       (("store", store), ("upstream", upstream)) if why)
        return web.json_response(body, status=200 if body["ready"] else 503, dumps=_JSON)

    async def _store_problem(self, sources: Sources) -> str | None:
        if sources.store is None:
            return "not open"
        try:
            await asyncio.wait_for(sources.store.schema_version(), self._ready_timeout)
        except TimeoutError:
            return f"no answer within {self._ready_timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - readiness answers whatever the backend raises
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return None

    async def _upstream_problem(self, sources: Sources) -> str | None:
        # The pool's own path: a pooled connection answers NOOP, or a new one
        # is opened (TLS and AUTH included), and stays pooled for the next message.
        try:
            session = await asyncio.wait_for(sources.upstream.acquire(check=True), self._ready_timeout)
        except TimeoutError:
            return f"no answer within {self._ready_timeout:g} s"
        except UpstreamError as exc:
            return exc.reason
        await session.release(True)
        return None

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------ API

    async def api_activity(self, request: web.Request) -> web.Response:
        sources = self._sources()
        grant = await self._grant(request, sources)
        if grant is None:
            return self._unauthorised()
        reference = request.match_info["reference"]
        view = await self._view(sources, reference)
        if view is None:
            return web.json_response({"error": f"no activity {reference}"}, status=404, dumps=_JSON)
        teams = sources.config.teams()
        shown = show_object(view, teams, messages=grant.sees_messages(view.mailbox, teams))
        return web.json_response(shown, dumps=_JSON)

    async def api_list(self, request: web.Request) -> web.Response:
        sources = self._sources()
        grant = await self._grant(request, sources)
        if grant is None:
            return self._unauthorised()
        teams = sources.config.teams()
        try:
            query = parse_list_query(request.query, grant.own_mailboxes(teams))
        except BadQuery as exc:
            _AUDIT.get().denied = f"bad query: {exc}"
            return web.json_response({"error": str(exc)}, status=400, dumps=_JSON)
        if sources.store is None:
            raise StoreError("the store is not open")
        rows, after = await sources.store.list_activities(query)
        return web.json_response(list_object(rows, after, teams), dumps=_JSON)

    # ------------------------------------------------------------ pages

    def _page(self, template: str, status: int = 200, **context) -> web.Response:
        html = self._templates.get_template(template).render(**context)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    def _login_page(self, request: web.Request, *, status: int, next_path: str, error: str | None = None):
        return self._page("login.html", status=status, grant=None, next_path=next_path, error=error,
                          reference="")

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/activities")

    async def list_page(self, request: web.Request) -> web.Response:
        sources = self._sources()
        grant = await self._grant(request, sources)
        if grant is None:
            return self._login_page(request, status=401, next_path=_local_path(request.path_qs),
                                    error=_refusal())
        reference = request.query.get("reference", "").strip()
        if reference:
            raise web.HTTPSeeOther(activity_url(reference))
        teams = sources.config.teams()
        form = {name: request.query.get(name, "") for name in ("q", "mailbox", "since")}
        context = dict(grant=grant, reference="", form=form, max_q=MAX_Q, rows=None, next_url=None,
                       error=None, mailboxes=sorted(teams), teams=teams, first_url=None)
        try:
            query = parse_list_query(request.query, grant.own_mailboxes(teams))
        except BadQuery as exc:
            _AUDIT.get().denied = f"bad query: {exc}"
            return self._page("activities.html", status=400, **{**context, "error": str(exc)})
        if sources.store is None:
            raise StoreError("the store is not open")
        rows, after = await sources.store.list_activities(query)
        kept = {name: value for name, value in form.items() if value}
        if "limit" in request.query:
            kept["limit"] = str(query.limit)
        if after is not None:
            context["next_url"] = "/activities?" + urlencode({**kept, "after": encode_cursor(after)})
        if query.after is not None:
            context["first_url"] = "/activities" + ("?" + urlencode(kept) if kept else "")
        context["rows"] = [_row_for_page(row, teams) for row in rows]
        return self._page("activities.html", **context)

    async def activity_page(self, request: web.Request) -> web.Response:
        sources = self._sources()
        reference = request.match_info["reference"]
        grant = await self._grant(request, sources)
        if grant is None:
            return self._login_page(request, status=401, next_path=activity_url(reference),
                                    error=_refusal())
        view = await self._view(sources, reference)
        if view is None:
            return self._page("error.html", status=404, grant=grant, reference=reference,
                              title=f"No activity {reference}",
                              detail="smtpgate has not relayed or linked an activity with this reference.")
        teams = sources.config.teams()
        full = grant.sees_messages(view.mailbox, teams)
        return self._page(
            "activity.html",
            grant=grant,
            reference=view.reference,
            activity={"reference": view.reference, "mailbox": view.mailbox,
                      "team": teams.get(view.mailbox) if view.mailbox else None},
            links=[{"reference": link.reference, "mailbox": link.mailbox,
                    "team": teams.get(link.mailbox) if link.mailbox else None,
                    "created_at": iso_utc(link.created_at), "created": _readable(link.created_at)}
                   for link in view.links],
            messages=[{"relayed_at": iso_utc(m.relayed_at), "relayed": _readable(m.relayed_at),
                       "date": m.date, "from": m.from_,
                       "subject": m.subject, "recipients": m.recipients, "message_id": m.message_id,
                       "shared": m.shared}
                      for m in view.messages] if full else None,
        )

    async def login_form(self, request: web.Request) -> web.Response:
        return self._login_page(request, status=200, next_path=_local_path(request.query.get("next")))

    async def login(self, request: web.Request) -> web.Response:
        sources = self._sources()
        form = await request.post()
        token = str(form.get("token", "")).strip()
        next_path = _local_path(str(form.get("next", "")))
        grant = self.identities.token(sources.config, token, _AUDIT.get())
        if grant is None:
            return self._login_page(request, status=401, next_path=next_path,
                                    error="That token is not accepted." if token else "Enter a token.")
        response = web.HTTPSeeOther(next_path)
        # The cookie is a new session's random id, never the token.
        await self.identities.sign_in(sources.store, grant, response, secure=request.secure)
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        response = web.HTTPSeeOther("/login")
        await self.identities.sign_out(self._sources().store, request, response)
        raise response


def _readable(value: datetime) -> str:
    """A time for people: `2026-11-27 17:00 UTC`."""
    return iso_utc(value)[:16].replace("T", " ") + " UTC"


def _row_for_page(row, teams) -> dict:
    return {"reference": row.reference, "mailbox": row.mailbox,
            "team": teams.get(row.mailbox) if row.mailbox else None, "full": row.full,
            "created": _readable(row.created_at), "created_at": iso_utc(row.created_at),
            "links": [{"reference": link.reference,
                       "team": teams.get(link.mailbox) if link.mailbox else None} for link in row.links],
            "last": _readable(row.last_message_at) if row.last_message_at else None,
            "last_at": iso_utc(row.last_message_at) if row.last_message_at else None,
            "subject": row.last_subject}


def _refusal() -> str | None:
    """What the sign-in page says after a refused token or an ended session; nothing when none was given."""
    denied = _AUDIT.get().denied
    if denied == "wrong token":
        return "That token is not accepted."
    if denied in ("no session", "token withdrawn"):
        return "Your session has ended. Sign in again."
    return None


def activity_url(reference: str) -> str:
    """The page of one activity; the reference is percent-encoded as one path segment."""
    return "/activities/" + quote(reference, safe="")


def _local_path(value: str | None) -> str:
    """Where to go after login: a path on this server only (no open redirect)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/activities"
