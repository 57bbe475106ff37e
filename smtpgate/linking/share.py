"""Inbound sharing: a reply that reaches only some of its thread's team mailboxes (pure).

With ``inbound.share_with_thread`` on, a reply from outside that answers a
message smtpgate relayed, but names only some of the team mailboxes that
message was relayed from or to, also goes to the others: their tagged
addresses, as the thread message had them, are added to the envelope (never
to the header block). README "Inbound sharing" lists the rules; each refusal
has a reason in ``REASONS`` so `smtpgate explain` and the logs can say why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smtpgate.linking.inbound import ThreadMapping
from smtpgate.linking.plan import Directory, is_automatic
from smtpgate.mail.addresses import Address, AddressError, envelope_key, join_tag, parse_address_list, parse_path
from smtpgate.mail.headers import HeaderBlock

__all__ = ["REASONS", "SharePlan", "plan_share"]

# Why a reply is (or is not) shared, in words for `explain` and the logs.
REASONS = {
    "shared": "the reply misses team mailboxes its thread message was relayed from or to",
    "complete": "every team mailbox the thread message was relayed from or to is already a recipient",
    "no_thread": "In-Reply-To/References name no message smtpgate relayed",
    "from_mailbox": "the envelope sender is a team mailbox: mail from the mailboxes is left alone",
    "bounce": "empty envelope sender (a bounce): automatic mail is not shared",
    "automatic": "automatic mail (Auto-Submitted other than no, or Precedence bulk/junk/list) is not shared",
    "stamped": "the message carries this deployment's valid stamp: it was processed already",
    "not_a_party": "neither From: nor the envelope sender was a party to the thread message "
                   "(its sender or one of its recipients)",
}


@dataclass(frozen=True)
class SharePlan:
    """What sharing adds to one inbound message, and why (``reason``, a key of REASONS).

    ``added``: the tagged addresses to add to the envelope; ``present``: the thread's
    team mailbox addresses the reply already names (tagged or bare); ``mapping``:
    (mailbox, reference) of every team mailbox of the thread message, for the record.
    """

    reason: str
    thread_message_id: str | None = None
    source_reference: str | None = None
    added: tuple[Address, ...] = ()
    present: tuple[Address, ...] = ()
    mapping: tuple[tuple[str, str], ...] = ()

    @property
    def why(self) -> str:
        return REASONS[self.reason]

    def log_fields(self) -> dict:
        """The thread message it answers, as `message.shared` names it."""
        return {"in_reply_to": self.thread_message_id}


def plan_share(
    mail_from: Address | None,
    recipients: Sequence[Address],
    headers: HeaderBlock,
    directory: Directory,
    thread: Sequence[ThreadMapping],
    *,
    stamped: bool = False,
) -> SharePlan:
    """The recipients sharing adds to a reply.

    ``recipients`` are the reply's envelope recipients as the client gave them;
    ``thread`` the relayed messages its In-Reply-To/References name, newest
    first (the first is the thread message); ``stamped``: the message carries a
    valid stamp of this deployment.
    """
    if mail_from is None:
        return SharePlan("bounce")
    if directory.mailbox(mail_from) is not None:
        return SharePlan("from_mailbox")
    if is_automatic(headers):
        return SharePlan("automatic")
    if stamped:
        return SharePlan("stamped")
    if not thread:
        return SharePlan("no_thread")
    message = thread[0]
    facts = dict(thread_message_id=message.message_id, source_reference=message.source_reference)
    if not _was_party(mail_from, headers, message):
        return SharePlan("not_a_party", **facts)
    named = {found[0].address for a in recipients if (found := directory.mailbox(a)) is not None}
    added: list[Address] = []
    present: list[Address] = []
    mapping: list[tuple[str, str]] = []
    for address, mailbox, reference in _candidates(message, directory):
        mapping.append((mailbox, reference))
        (present if mailbox in named else added).append(address)
    return SharePlan("shared" if added else "complete", added=tuple(added), present=tuple(present),
                     mapping=tuple(mapping), **facts)


def _was_party(mail_from: Address, headers: HeaderBlock, message: ThreadMapping) -> bool:
    """True when the reply's envelope sender or a From: address sent or received the thread message."""
    parties = {a.canonical for a in _addresses(message.sender)}
    parties.update(a.canonical for a in map(_path, message.recipients) if a is not None)
    repliers = [mail_from, *(a for v in headers.get_all("From") for a in _addresses(v))]
    return any(a.canonical in parties for a in repliers)


def _candidates(message: ThreadMapping, directory: Directory) -> list[tuple[Address, str, str]]:
    """(tagged address, mailbox, reference) of each team mailbox the thread message was relayed
    from (its From:, tagged as relayed, and its source activity's mailbox) or to (its recipients
    as relayed, tagged), still configured, each address once. A mailbox the message reached
    untagged is left out: sharing only ever adds an activity's tagged address. The source's
    mailbox, when the message did not name it, is left out too if its team has
    ``new_links: never``: such a team gets only what was sent to it."""
    found: dict[tuple[str, str], tuple[Address, str, str]] = {}
    named: set[str] = set()
    senders = [(a, True) for a in _addresses(message.sender)]
    for address, sender in senders + [(a, False) for a in map(_path, message.recipients) if a is not None]:
        match = directory.match(address)
        if match is None:
            continue
        mailbox = match.info.address
        named.add(mailbox)
        if match.tag is not None:
            reference = directory.matcher.normalize(match.tag) or match.tag
        elif sender and mailbox in message.mapping:
            # An untagged From: was relayed tagged with the reference the message used for it.
            reference = message.mapping[mailbox]
            local = join_tag(match.base, reference, directory.separator)
            if local is None:
                continue
            address = Address(local, address.domain)
        else:
            continue
        found.setdefault(envelope_key(address, True), (address, mailbox, reference))
    source = _source_candidate(message, directory, named)
    if source is not None:
        found.setdefault(envelope_key(source[0], True), source)
    return list(found.values())


def _source_candidate(message: ThreadMapping, directory: Directory,
                      named: set[str]) -> tuple[Address, str, str] | None:
    """The source activity's own mailbox, tagged with the source reference."""
    address = _path(message.source_mailbox or "")
    match = directory.match(address) if address is not None else None
    if match is None or match.tag is not None or message.source_reference is None:
        return None
    if match.info.new_links == "never" and match.info.address not in named:
        return None
    local = join_tag(match.base, message.source_reference, directory.separator)
    if local is None:
        return None
    return Address(local, address.domain), match.info.address, message.source_reference


def _addresses(value: str | None) -> list[Address]:
    return parse_address_list(value, strict=False) if value else []


def _path(text: str) -> Address | None:
    try:
        return parse_path(text)
    except AddressError:
        return None
