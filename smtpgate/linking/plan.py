"""The link decision for one message: source activity, recipient classes, rewriting.

Pure: the relay shell gathers the envelope and the header block, asks the
store what the plan says to look up, and hands the answers to
``Plan.resolve``, which says what to relay and how to rewrite the header.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from smtpgate.mail.addresses import (
    Address,
    AddressError,
    check_separator,
    envelope_key,
    join_tag,
    normalize_domain,
    parse_address_list,
    parse_mailbox,
    parse_path,
    split_tag,
)
from smtpgate.mail.headers import HeaderBlock, decode_text
from smtpgate.mail.msgid import find_message_ids
from smtpgate.linking.references import DEFAULT_PATTERN, ReferenceMatcher

__all__ = [
    "CoreSettings",
    "Directory",
    "LinkLookup",
    "MailboxInfo",
    "Plan",
    "RecipientClass",
    "RecipientPlan",
    "Resolution",
    "Source",
    "find_source",
    "header_addresses",
    "is_automatic",
    "make_plan",
    "thread_message_ids",
]

_AUTOMATIC_PRECEDENCE = frozenset({"bulk", "junk", "list"})


@dataclass(frozen=True)
class MailboxInfo:
    """A configured work-management mailbox; ``address`` is its canonical base address."""

    address: str
    team: str
    new_links: str = "create"  # "create" | "never"
    new_reference: str = "{n}-T"


@dataclass(frozen=True)
class CoreSettings:
    """The part of the configuration the core needs."""

    internal_domains: tuple[str, ...]
    separator: str = "+"
    reference_pattern: str = DEFAULT_PATTERN
    reference_headers: tuple[str, ...] = ("X-Enate-Reference",)
    subject: bool = True
    mailboxes: tuple[MailboxInfo, ...] = ()


class RecipientClass(enum.Enum):
    """How a recipient is treated: a tagged mailbox is kept, an untagged one gets its
    linked activity's tag, the source's own mailbox the source reference; internal and
    external addresses stay unchanged."""

    TAGGED_MAILBOX = "tagged_mailbox"
    UNTAGGED_MAILBOX = "untagged_mailbox"
    SOURCE_MAILBOX = "source_mailbox"
    INTERNAL = "internal"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Source:
    """The source activity: its reference, its mailbox when known, and where it was found."""

    reference: str
    mailbox: str | None
    found_in: str  # "envelope" | "from" | "header" | "subject" | "thread"


class MailboxMatch:
    """A configured mailbox an address belongs to: its base local part and its tag (None: untagged)."""

    __slots__ = ("info", "base", "tag")

    def __init__(self, info: MailboxInfo, base: str, tag: str | None) -> None:
        self.info, self.base, self.tag = info, base, tag


class Directory:
    """The configured mailboxes, internal domains and reference pattern, compiled once.

    Raises ValueError for a separator or a mailbox address that
    smtpgate.mail.addresses refuses (check_separator, parse_mailbox), a
    mailbox configured twice or an invalid pattern.
    """

    MATCHES_KEPT = 4096  # addresses whose mailbox match is remembered (emptied when full)

    def __init__(self, settings: CoreSettings) -> None:
        try:
            check_separator(settings.separator)
        except AddressError as exc:
            raise ValueError(f"invalid separator: {exc}") from None
        self.settings = settings
        self.separator = settings.separator
        self.matcher = ReferenceMatcher(settings.reference_pattern)
        try:
            self._internal = frozenset(normalize_domain(d) for d in settings.internal_domains)
        except AddressError as exc:
            raise ValueError(f"invalid internal domain: {exc}") from None
        self._mailboxes: dict[str, MailboxInfo] = {}
        for info in settings.mailboxes:
            try:
                address = parse_mailbox(info.address, settings.separator)
            except AddressError as exc:
                raise ValueError(f"invalid mailbox address {info.address!r}: {exc}") from None
            key = address.canonical
            if key in self._mailboxes:
                raise ValueError(f"mailbox {key} configured twice")
            self._mailboxes[key] = dataclasses.replace(info, address=key)
        self._mailbox_domains = frozenset(key.rpartition("@")[2] for key in self._mailboxes)
        # What match found per address: a message asks about the same few addresses
        # a dozen times (envelope, header fields, RCPT time, the plan).
        self._matches: dict[Address, MailboxMatch | None] = {}

    @property
    def mailboxes(self) -> tuple[MailboxInfo, ...]:
        """The configured mailboxes, their addresses canonical."""
        return tuple(self._mailboxes.values())

    def mailbox_info(self, canonical: str) -> MailboxInfo | None:
        """The mailbox whose canonical base address is ``canonical``, or None."""
        return self._mailboxes.get(canonical)

    def match(self, address: Address) -> MailboxMatch | None:
        """The mailbox ``address`` belongs to, with its base and tag; None for any other address."""
        try:
            return self._matches[address]
        except KeyError:
            pass
        match = self._find_match(address)
        if len(self._matches) >= self.MATCHES_KEPT:
            self._matches.clear()
        self._matches[address] = match
        return match

    def _find_match(self, address: Address) -> MailboxMatch | None:
        try:
            domain = normalize_domain(address.domain) if address.domain else ""
        except AddressError:
            return None
        if domain not in self._mailbox_domains:
            return None
        info = self._mailboxes.get(address.canonical)
        if info is not None:
            return MailboxMatch(info, address.local, None)
        base, tag = split_tag(address.local, self.separator)
        if tag is None:
            return None
        info = self._mailboxes.get(Address(base, address.domain).canonical)
        if info is None:
            return None
        return MailboxMatch(info, base, tag or None)  # "base+" carries no tag

    def mailbox(self, address: Address) -> tuple[MailboxInfo, str | None] | None:
        """The mailbox ``address`` belongs to and its tag (None when untagged), or None."""
        match = self.match(address)
        return None if match is None else (match.info, match.tag)

    def is_internal(self, address: Address) -> bool:
        """True when every domain the address routes through is an internal domain.

        The bare ``postmaster`` path is internal: it is the upstream's own postmaster.
        """
        if not address.domain:
            return True
        return all(domain in self._internal for domain in address.route_domains)

    def classify(self, address: Address, source: Source | None) -> RecipientClass:
        """The section 4 class of ``address``; ``source.mailbox`` is the source's own mailbox."""
        return self._classify(self.match(address), address, source.mailbox if source else None)

    def _classify(self, match: MailboxMatch | None, address: Address, own: str | None) -> RecipientClass:
        if match is not None:
            if match.tag is not None:
                return RecipientClass.TAGGED_MAILBOX
            if match.info.address == own:
                return RecipientClass.SOURCE_MAILBOX
            return RecipientClass.UNTAGGED_MAILBOX
        return RecipientClass.INTERNAL if self.is_internal(address) else RecipientClass.EXTERNAL

    def untagged_mailbox(self, address: Address) -> bool:
        """True when ``address`` is a mailbox without a tag: the one kind of recipient a
        link decision may rewrite."""
        match = self.match(address)
        return match is not None and match.tag is None

    def tag_reference(self, address: Address) -> tuple[MailboxInfo, str] | None:
        """(mailbox, reference) when ``address`` is a mailbox tagged with a reference."""
        match = self.match(address)
        if match is None or match.tag is None:
            return None
        reference = self.matcher.normalize(match.tag)
        return None if reference is None else (match.info, reference)


def header_addresses(headers: HeaderBlock, *names: str) -> list[Address]:
    return [a for name in names for value in headers.get_all(name) for a in parse_address_list(value, strict=False)]


def find_source(mail_from: Address | None, headers: HeaderBlock, directory: Directory) -> Source | None:
    """The source activity as the message itself names it, first match wins.

    1. the envelope sender, then each From: mailbox, tagged with a reference;
    2. the headers of ``references.headers``, in configured order;
    3. the Subject, RFC 2047 decoded, when ``references.subject`` is on.
    Step 4 (In-Reply-To/References) needs the store: see thread_message_ids().
    """
    candidates = [(mail_from, "envelope")] if mail_from is not None else []
    candidates += [(a, "from") for a in header_addresses(headers, "From")]
    for address, where in candidates:
        tagged = directory.tag_reference(address)
        if tagged is not None:
            return Source(tagged[1], tagged[0].address, where)
    settings = directory.settings
    for name in settings.reference_headers:
        for value in headers.get_all(name):
            reference = directory.matcher.search(decode_text(value))
            if reference is not None:
                return Source(reference, None, "header")
    if settings.subject:
        for value in headers.get_all("Subject"):
            reference = directory.matcher.search(decode_text(value))
            if reference is not None:
                return Source(reference, None, "subject")
    return None


def thread_message_ids(headers: HeaderBlock) -> list[str]:
    """Message-IDs to look up for section 3 step 4, angle brackets kept, each once:
    those of In-Reply-To first, then those of References newest (last) first."""
    ids = [m for v in headers.get_all("In-Reply-To") for m in find_message_ids(v)]
    ids += reversed([m for v in headers.get_all("References") for m in find_message_ids(v)])
    return list(dict.fromkeys(ids))


def is_automatic(headers: HeaderBlock) -> bool:
    """True for ``Auto-Submitted:`` other than ``no`` or ``Precedence: bulk|junk|list`` (RFC 3834)."""
    for value in headers.get_all("Auto-Submitted"):
        keyword = re.sub(r"\([^)]*\)", "", value).split(";")[0].strip().lower()
        if keyword != "no":
            return True
    return any(v.strip().lower() in _AUTOMATIC_PRECEDENCE for v in headers.get_all("Precedence"))


@dataclass(frozen=True)
class RecipientPlan:
    """One envelope recipient: the address as given, its class, its mailbox and tag."""

    address: Address
    cls: RecipientClass
    mailbox: MailboxInfo | None
    tag: str | None
    base: str | None = field(default=None, repr=False)  # the local part without the tag


@dataclass(frozen=True)
class LinkLookup:
    """Ask the store for the activity of ``mailbox`` linked to the source; create one if allowed."""

    mailbox: MailboxInfo
    allow_create: bool


@dataclass
class Resolution:
    """What to relay and how to rewrite the header (see Plan.resolve)."""

    # Per plan recipient, in order: the address to relay, None when it merges into an
    # earlier spelling of the same recipient (sent once).
    targets: list[Address | None]
    tagged: dict[str, str]  # untagged mailbox -> its tagged addr-spec, for To/Cc/From/Reply-To
    references: dict[str, str]  # mailbox -> the reference this message uses for it (the message record)
    untaggable: list[str]


@dataclass(frozen=True)
class Plan:
    """The core's decision for one message; the relay executes it.

    ``lookups`` are the store questions to ask, ``explicit_links`` the
    (reference, mailbox) links named by tagged mailbox recipients, to record.
    """

    source: Source | None
    recipients: tuple[RecipientPlan, ...]
    lookups: tuple[LinkLookup, ...]
    explicit_links: tuple[tuple[str, MailboxInfo], ...]
    automatic: bool
    separator: str = field(default="+", repr=False)
    # Untagged mailboxes in To/Cc/From/Reply-To, canonical, in order of appearance.
    header_mailboxes: tuple[MailboxInfo, ...] = field(default=(), repr=False)
    thread_mapping: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def source_mailbox(self) -> str | None:
        """The canonical address of the source activity's own mailbox, when known."""
        return self.source.mailbox if self.source else None

    def resolve(self, found: Mapping[str, str | None]) -> Resolution:
        """Apply the store's answers: ``found`` maps a mailbox's canonical address to the
        reference found or created for it (None: it stays untagged).

        An untagged mailbox gets the reference this message tags it with elsewhere,
        else the thread's reference for it, else the found one; the source's own
        mailbox gets the source reference. A tagged local part
        over 64 octets is not produced: that address stays as it was and is listed
        in ``untaggable``. With no source nothing changes.
        """
        if self.source is None:
            return Resolution([r.address for r in self.recipients], {}, {}, [])
        tagger = _Tagger(self._references(found), self.separator)
        targets, references = self._envelope(tagger)
        tagged = self._header_tags(tagger, references)
        if self.source.mailbox is not None:
            references[self.source.mailbox] = self.source.reference
        for reference, info in self.explicit_links:
            references.setdefault(info.address, reference)
        return Resolution(targets, tagged, references, tagger.untaggable)

    def _references(self, found: Mapping[str, str | None]) -> dict[str, str]:
        """Mailbox -> reference, first rule wins: the message's own tag, the thread, the store."""
        assert self.source is not None
        refs: dict[str, str] = {}
        for reference, info in self.explicit_links:
            refs.setdefault(info.address, reference)
        for mailbox, reference in self.thread_mapping:
            refs.setdefault(mailbox, reference)
        for mailbox, reference in found.items():
            if reference is not None:
                refs.setdefault(mailbox, reference)
        if self.source.mailbox is not None:
            refs[self.source.mailbox] = self.source.reference
        return refs

    def _envelope(self, tagger: _Tagger) -> tuple[list[Address | None], dict[str, str]]:
        """Each recipient's target (None: merged into an earlier one, sent once), and the
        references the tags use."""
        targets: list[Address | None] = []
        references: dict[str, str] = {}
        seen: set[tuple[str, str]] = set()
        for rcpt in self.recipients:
            relayed = rcpt.address
            if rcpt.cls in (RecipientClass.UNTAGGED_MAILBOX, RecipientClass.SOURCE_MAILBOX):
                assert rcpt.mailbox is not None and rcpt.base is not None
                relayed = tagger.tag(rcpt.base, rcpt.address.domain, rcpt.mailbox.address) or relayed
                if relayed is not rcpt.address:
                    references[rcpt.mailbox.address] = tagger.refs[rcpt.mailbox.address]
            key = envelope_key(relayed, rcpt.mailbox is not None)
            if key in seen:
                targets.append(None)
            else:
                seen.add(key)
                targets.append(relayed)
        return targets, references

    def _header_tags(self, tagger: _Tagger, references: dict[str, str]) -> dict[str, str]:
        """Untagged mailbox -> its tagged addr-spec for To/Cc/From/Reply-To; extends ``references``."""
        tagged: dict[str, str] = {}
        for info in self.header_mailboxes:
            address = parse_path(info.address)
            assert address is not None
            new = tagger.tag(address.local, address.domain, info.address)
            if new is not None:
                tagged[info.address] = str(new)
                references[info.address] = tagger.refs[info.address]
        return tagged


class _Tagger:
    """Tags a mailbox's local part with its reference, noting the ones that do not fit."""

    def __init__(self, refs: dict[str, str], separator: str) -> None:
        self.refs, self.separator = refs, separator
        self.untaggable: list[str] = []

    def tag(self, base: str, domain: str, mailbox: str) -> Address | None:
        reference = self.refs.get(mailbox)
        if reference is None:
            return None
        local = join_tag(base, reference, self.separator)
        if local is None:
            if mailbox not in self.untaggable:
                self.untaggable.append(mailbox)
            return None
        return Address(local, domain)


def make_plan(
    mail_from: Address | None,
    recipients: Sequence[Address],
    headers: HeaderBlock,
    source: Source | None,
    directory: Directory,
    *,
    source_owner: str | None = None,
    thread_mapping: Mapping[str, str] | None = None,
) -> Plan:
    """The plan for one message (recipient classes, links, rewriting).

    The source's own mailbox is ``source.mailbox``, else ``source_owner``
    (the store's owner of the source reference), else the From: address when
    it is an untagged mailbox; ``Plan.source`` carries it. Lookups are the
    distinct untagged mailboxes, other than the source's, among the envelope
    recipients and To/Cc with no ``thread_mapping`` entry and no tagged form
    in the message naming a reference (that activity is shared instead).
    """
    automatic = is_automatic(headers)
    if source is not None and source.mailbox is None:
        own = _canonical(source_owner) or _from_mailbox(headers, directory)
        source = dataclasses.replace(source, mailbox=own)
    own = source.mailbox if source else None
    rcpt_plans = tuple(_recipient_plan(address, directory, own) for address in recipients)
    if source is None:
        return Plan(None, rcpt_plans, (), (), automatic, directory.separator)
    thread = dict(thread_mapping or {})
    untagged, links = _named_mailboxes(rcpt_plans, headers, directory, source)
    # A mailbox this message tags explicitly shares that activity with its untagged copies.
    named = {info.address for _, info in links}
    lookups = tuple(
        LinkLookup(info, info.new_links == "create" and not automatic)
        for address, info in untagged.items()
        if address not in thread and address not in named
    )
    return Plan(source, rcpt_plans, lookups, links, automatic, directory.separator,
                _untagged_header_mailboxes(headers, directory), tuple(thread.items()))


def _recipient_plan(address: Address, directory: Directory, own: str | None) -> RecipientPlan:
    match = directory.match(address)
    return RecipientPlan(
        address,
        directory._classify(match, address, own),
        match.info if match else None,
        match.tag if match else None,
        match.base if match else None,
    )


def _named_mailboxes(rcpt_plans: Sequence[RecipientPlan], headers: HeaderBlock, directory: Directory,
                     source: Source) -> tuple[dict[str, MailboxInfo], tuple[tuple[str, MailboxInfo], ...]]:
    """Other teams' mailboxes the envelope and To/Cc name: the untagged ones, and the
    (reference, mailbox) links the tagged ones name."""
    untagged: dict[str, MailboxInfo] = {}
    links: dict[tuple[str, str], tuple[str, MailboxInfo]] = {}
    visible = header_addresses(headers, "To", "Cc")
    for address in itertools.chain((r.address for r in rcpt_plans), visible):
        match = directory.match(address)
        if match is None or match.info.address == source.mailbox:
            continue
        if match.tag is None:
            untagged.setdefault(match.info.address, match.info)
            continue
        reference = directory.matcher.normalize(match.tag)
        if reference is not None and reference != source.reference:
            links.setdefault((reference, match.info.address), (reference, match.info))
    return untagged, tuple(links.values())


def _untagged_header_mailboxes(headers: HeaderBlock, directory: Directory) -> tuple[MailboxInfo, ...]:
    """Untagged mailboxes in From/Reply-To/To/Cc, in order of appearance, each once."""
    found: dict[str, MailboxInfo] = {}
    for address in header_addresses(headers, "From", "Reply-To", "To", "Cc"):
        match = directory.match(address)
        if match is not None and match.tag is None:
            found.setdefault(match.info.address, match.info)
    return tuple(found.values())


def _canonical(address: str | None) -> str | None:
    if address is None:
        return None
    try:
        parsed = parse_path(address)
    except AddressError:
        return address
    return parsed.canonical if parsed is not None else None


def _from_mailbox(headers: HeaderBlock, directory: Directory) -> str | None:
    for address in header_addresses(headers, "From")[:1]:
        match = directory.match(address)
        if match is not None and match.tag is None:
            return match.info.address
    return None
