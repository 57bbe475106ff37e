"""The activities list of the admin API and page: its query parameters, its cursor and its JSON.

`GET /api/v1/activities?mailbox=M&q=TEXT&since=DATE&limit=N&after=CURSOR`
(docs/operations.md, "Lists and search"). Every parameter is checked here,
so that a bad one is a 400 naming it, never a store error: `limit` is 1 to
MAX_LIMIT, `q` at most MAX_Q characters, `since` a date or an ISO 8601 time,
`after` a cursor this server gave (base64url JSON of the last row's created
time and reference: a position, not a secret — the scope is applied again
to every page, so a forged cursor shows nothing the caller could not see).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import datetime

from smtpgate.store.base import ActivityQuery, ListedActivity
from smtpgate.views import iso_utc, parse_since

__all__ = ["BadQuery", "DEFAULT_LIMIT", "MAX_LIMIT", "MAX_Q", "decode_cursor", "encode_cursor",
           "list_object", "parse_list_query"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
# Longer than any subject or Message-ID worth typing; a longer text is refused, not cut.
MAX_Q = 1000
_PARAMETERS = ("mailbox", "q", "since", "limit", "after")


class BadQuery(ValueError):
    """A list parameter that cannot be used; str() is the answer's text."""


def encode_cursor(position: tuple[datetime, str]) -> str:
    at, reference = position
    raw = json.dumps([at.isoformat(), reference], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, str]:
    """The position a cursor names; BadQuery for anything this server did not make."""
    problem = BadQuery("after: not a cursor this server gave (use the \"next\" value of the previous page)")
    if len(text) > 400:
        raise problem
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        at, reference = json.loads(raw.decode("utf-8"))
        when = datetime.fromisoformat(at)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise problem from None
    if when.tzinfo is None or not isinstance(reference, str) or not reference or len(reference) > 200:
        raise problem
    return when, reference


def _single(query: Mapping, name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise BadQuery(f"{name} given {len(values)} times")
    return values[0] if values else None


def parse_list_query(query: Mapping, own: list[str] | None) -> ActivityQuery:
    """The ActivityQuery of a request's parameters (an aiohttp MultiDict), for a caller who
    sees own in full (None: everything); raises BadQuery naming the first bad one."""
    values = {name: _single(query, name) for name in _PARAMETERS}
    mailbox = (values["mailbox"] or "").strip().lower() or None
    q = values["q"]
    if q is not None and len(q) > MAX_Q:
        raise BadQuery(f"q: at most {MAX_Q} characters (got {len(q)})")
    q = " ".join(q.split()) if q else None
    if q is not None and "\x00" in q:
        raise BadQuery("q: a NUL character is not text")
    since = None
    if values["since"]:
        try:
            since = parse_since(values["since"])
        except ValueError:
            raise BadQuery("since: expected a date (2026-11-27) or an ISO 8601 time") from None
    limit = DEFAULT_LIMIT
    if values["limit"] is not None:
        text = values["limit"].strip()
        if not (text.isascii() and text.isdigit() and len(text) <= 3 and 1 <= int(text) <= MAX_LIMIT):
            raise BadQuery(f"limit: a whole number from 1 to {MAX_LIMIT}")
        limit = int(text)
    after = decode_cursor(values["after"]) if values["after"] else None
    return ActivityQuery(own=None if own is None else tuple(own), mailbox=mailbox, q=q or None,
                         since=since, limit=limit, after=after)


def row_object(row: ListedActivity, teams: Mapping[str, str]) -> dict:
    """One listed activity as the API gives it; messages' facts only when `full`."""
    shown: dict = {
        "reference": row.reference,
        "mailbox": row.mailbox,
        "team": teams.get(row.mailbox) if row.mailbox else None,
        "created_at": iso_utc(row.created_at),
        "full": row.full,
        "links": [{"reference": link.reference, "mailbox": link.mailbox,
                   "team": teams.get(link.mailbox) if link.mailbox else None,
                   "created_at": iso_utc(link.created_at)} for link in row.links],
    }
    if row.full:
        shown["last_message_at"] = iso_utc(row.last_message_at) if row.last_message_at else None
        shown["last_subject"] = row.last_subject
    return shown


def list_object(rows: list[ListedActivity], after: tuple[datetime, str] | None, teams: Mapping[str, str]) -> dict:
    """The `GET /api/v1/activities` answer: the page's activities and the next page's cursor."""
    return {"activities": [row_object(row, teams) for row in rows],
            "next": encode_cursor(after) if after is not None else None}
