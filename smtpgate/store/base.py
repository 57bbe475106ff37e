"""The link store's value types and the interface every backend provides."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol



# How many links links_of reads at most before it answers None (each mailbox asked alone).
LINKS_OF_LIMIT = 100

@dataclass(frozen=True)
class LinkTarget:
    """An untagged mailbox recipient that may get a linked activity."""

    mailbox: str  # canonical address of the work-management mailbox
    team: str
    new_reference: str  # the mailbox's template, e.g. "{n}-T"
    allow_create: bool  # new_links is `create` and the message is not automatic
    # The longest reference whose tagged address still fits in 64 octets: a longer
    # allocation is rolled back, no link made. None: no limit.
    max_reference_length: int | None = None


@dataclass(frozen=True)
class AllocationContext:
    """Header facts about the message, handed to the http allocator."""

    subject: str | None
    from_: str | None
    message_id: str | None


@dataclass(frozen=True)
class LinkOutcome:
    """The linked activity's reference, and whether this call created the link."""

    reference: str
    created: bool


@dataclass(frozen=True)
class AllocationRequest:
    """Everything an allocator may use to pick a new activity's reference."""

    source_reference: str
    mailbox: str
    team: str
    new_reference: str
    subject: str | None
    from_: str | None
    message_id: str | None


class NumberSource(Protocol):
    """The store's local sequence, bound to the transaction that creates the link."""

    async def next_number(self, first_number: int) -> int:
        """Take the next number, never below first_number; rolled back with the transaction."""

    async def is_known(self, reference: str) -> bool:
        """True when the store already knows an activity with this reference."""


class Allocator(Protocol):
    """Picks the reference of a new linked activity."""

    async def allocate(self, request: AllocationRequest, numbers: NumberSource) -> str:
        """A new reference for request.mailbox; raises AllocationError on any failure."""


@dataclass(frozen=True)
class ThreadHit:
    """An earlier relayed message named by In-Reply-To/References (the source activity of a reply)."""

    message_id: str
    source_reference: str
    source_mailbox: str | None
    mapping: dict[str, str]  # mailbox canonical address -> reference used
    from_: str | None = None  # its From: field as written
    recipients: tuple[str, ...] = ()  # envelope recipients as relayed


@dataclass(frozen=True)
class MessageRecord:
    """Header facts of one relayed message; never its body."""

    message_id: str
    date: str | None
    from_: str | None
    subject: str | None
    source_reference: str | None
    recipients: list[str]  # envelope recipients as relayed
    mapping: dict[str, str]  # mailbox canonical address -> reference used
    relayed_at: datetime
    # inbound sharing: the recipients smtpgate added (envelope only) because the thread had them
    shared: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LinkedActivity:
    """The other side of a link, seen from one activity."""

    reference: str
    mailbox: str | None
    created_at: datetime
    message_id: str | None = None


@dataclass(frozen=True)
class MessageView:
    """A relayed message as the linked-activities view shows it."""

    message_id: str
    date: str | None
    from_: str | None
    subject: str | None
    recipients: list[str]
    source_reference: str | None
    relayed_at: datetime
    shared: list[str] = field(default_factory=list)  # recipients added by inbound sharing


@dataclass(frozen=True)
class ActivityView:
    """One activity, its links (from either side) and its relayed messages."""

    reference: str
    mailbox: str | None
    links: list[LinkedActivity] = field(default_factory=list)
    messages: list[MessageView] = field(default_factory=list)


@dataclass(frozen=True)
class LinkRow:
    """One link as `smtpgate links list` shows it, in the direction it was created."""

    source_reference: str
    source_mailbox: str | None
    target_reference: str
    target_mailbox: str | None
    created_at: datetime
    message_id: str | None


@dataclass(frozen=True)
class ActivityRow:
    """One activity as `smtpgate links export` writes it."""

    reference: str
    mailbox: str | None
    created_at: datetime


@dataclass(frozen=True)
class ListedActivity:
    """One row of the activities list (`GET /api/v1/activities`, the /activities page).

    full: the caller may see this activity's messages; last_message_at and
    last_subject are filled only then.
    """

    reference: str
    mailbox: str | None
    created_at: datetime
    links: list[LinkedActivity]
    full: bool
    last_message_at: datetime | None = None
    last_subject: str | None = None


@dataclass(frozen=True)
class ActivityQuery:
    """What an activities list asks for.

    own: the mailboxes whose activities the caller sees in full, None for
    every one (admin). The list holds those activities and, header
    information only, the activities linked to them; `q` (text in a
    subject or Message-ID) matches only messages of activities seen in full.
    after: the position (created_at, reference) the previous page ended at.
    """

    own: tuple[str, ...] | None
    mailbox: str | None = None
    q: str | None = None
    since: datetime | None = None
    limit: int = 50
    after: tuple[datetime, str] | None = None


@dataclass(frozen=True)
class AdminSession:
    """A sign-in session: the token's team and the token's SHA-256 (hex), until expires_at."""

    team: str
    token: str
    expires_at: datetime


class Store(abc.ABC):
    """The link store: activities, links, relayed messages and the local sequence.

    Every method raises StoreError (or a subclass) when the backend fails;
    the relay answers such a failure with `451 4.3.0`.
    """

    allocator: Allocator | None

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version of the database; 0 for a database smtpgate never used."""

    @abc.abstractmethod
    async def upgrade(self) -> tuple[int, int]:
        """Apply pending migrations; return (version before, version after)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; safe to call twice."""

    @abc.abstractmethod
    async def activity_mailbox(self, reference: str) -> str | None:
        """The canonical address of the mailbox owning the activity, when known."""

    @abc.abstractmethod
    async def record_activity(self, reference: str, mailbox: str) -> None:
        """Remember the activity's owner unless an owner is already known."""

    @abc.abstractmethod
    async def get_or_create_link(
        self,
        source_reference: str,
        source_mailbox: str | None,
        target: LinkTarget,
        context: AllocationContext,
    ) -> LinkOutcome | None:
        """The activity of target.mailbox linked to the source, created when allowed.

        The newest existing link to an activity owned by target.mailbox wins
        (created=False). Otherwise, with target.allow_create, a reference is
        allocated and the activity and link are committed before returning
        (created=True); without it, None. Racers for the same (source,
        mailbox), in any process or node, all get the one reference.
        """

    @abc.abstractmethod
    async def find_link(self, source_reference: str, mailbox: str) -> str | None:
        """The newest activity of ``mailbox`` linked to the source, or None; never writes."""

    @abc.abstractmethod
    async def links_of(self, source_reference: str, limit: int = LINKS_OF_LIMIT) -> dict[str, str] | None:
        """Every mailbox's newest activity linked to the source (what find_link answers for
        each mailbox), in one read; None when the source has more than ``limit`` links."""

    @abc.abstractmethod
    async def record_link(
        self,
        source_reference: str,
        source_mailbox: str | None,
        target_reference: str,
        target_mailbox: str,
        message_id: str | None,
    ) -> bool:
        """Record an explicitly tagged link and its owners; True when the link is new."""

    @abc.abstractmethod
    async def find_thread(self, message_ids: Sequence[str]) -> ThreadHit | None:
        """The first of message_ids (in order) that smtpgate relayed with a source activity."""

    @abc.abstractmethod
    async def thread_hits(self, message_ids: Sequence[str]) -> list[ThreadHit]:
        """Every one of message_ids that smtpgate relayed with a source activity, in the given order."""

    @abc.abstractmethod
    def queue_message(self, record: MessageRecord, *, urgent: bool = False) -> asyncio.Future[None]:
        """Queue the message's header facts to be stored, at once: `close()`
        writes whatever is queued. The future is done when they are committed,
        and raises StoreError when that failed. A second record for the same
        (Message-ID, source reference) changes nothing.

        Records queued together share one transaction (group commit). One that
        is not ``urgent`` may wait a little for others to share it (the SQL
        stores' RECORD_LINGER); ``urgent`` when the caller waits for the commit.
        """

    async def record_message(self, record: MessageRecord) -> None:
        """queue_message, returning once the record is committed."""
        await self.queue_message(record, urgent=True)

    @abc.abstractmethod
    async def add_link(
        self, source_reference: str, target_reference: str, target_mailbox: str, *, by: str
    ) -> bool:
        """Link two activities by hand (`smtpgate links add`); target_mailbox
        becomes the target's owner. True when the link is new, False when it
        existed; StoreError when another mailbox owns the target. Logged as
        `link.added` with `by`, who asked for it."""

    @abc.abstractmethod
    async def delete_link(self, reference: str, other: str, *, by: str) -> bool:
        """Remove the link between two activities, whichever side created it;
        the activities stay. True when there was one; logged as `link.deleted`."""

    @abc.abstractmethod
    async def export(self) -> tuple[list[ActivityRow], list[LinkRow]]:
        """Every activity and every link, oldest first."""

    @abc.abstractmethod
    async def raise_sequence(self, templates: Sequence[str], first_number: int) -> int | None:
        """Lift the local sequence above every number that one of templates
        (`{n}-T`) gives for a reference the store knows, so it never issues
        them again. The new next number when it moved, else None."""

    @abc.abstractmethod
    async def show(self, reference: str) -> ActivityView | None:
        """The linked-activities view of one activity; None when the store never
        saw it. reference is matched case-insensitively when no activity has
        exactly that spelling."""

    @abc.abstractmethod
    async def list_links(
        self, mailbox: str | None = None, since: datetime | None = None
    ) -> list[LinkRow]:
        """Links, oldest first; with mailbox, those with either side owned by it;
        with since, those created at or after it."""

    @abc.abstractmethod
    async def prune_messages(self, keep_days: int) -> int:
        """Delete message records relayed more than keep_days ago; links stay.
        Returns how many records were deleted."""

    # -- the admin listener: lists and sessions (store/listing.py) ----------

    @abc.abstractmethod
    async def list_activities(self, query: ActivityQuery) -> tuple[list[ListedActivity], tuple[datetime, str] | None]:
        """One page of activities, newest first (created_at, then reference, descending),
        and the position to ask the next page `after`, None after the last page."""

    @abc.abstractmethod
    async def create_session(self, session_id: str, team: str, token: str, expires_at: datetime) -> None:
        """Keep a sign-in session (session_id: the SHA-256 hex of the cookie); expired ones go."""

    @abc.abstractmethod
    async def find_session(self, session_id: str) -> AdminSession | None:
        """The session, None when there is none or it expired."""

    @abc.abstractmethod
    async def end_session(self, session_id: str) -> bool:
        """Forget the session everywhere; True when there was one."""


def utcnow() -> datetime:
    """Now, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """value in UTC; a naive datetime is taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def from_iso(text: str) -> datetime:
    """An ISO 8601 date or date-time in UTC: a final Z is UTC, no offset is taken to be UTC,
    a date alone is its midnight. Raises ValueError for anything else."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return as_utc(datetime.fromisoformat(text))


def iso_utc(value: datetime) -> str:
    """ISO 8601 UTC to the second with a Z, as every view writes a time: `2026-11-27T17:00:00Z`."""
    return as_utc(value).strftime("%Y-%m-%dT%H:%M:%SZ")
