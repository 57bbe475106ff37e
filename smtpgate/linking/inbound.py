"""The inbound planner: put back the tag a reply dropped (pure; README "Inbound").

Mail coming in to the mailboxes (`direction: inbound`) is never linked: for
each untagged mailbox recipient whose thread names a message smtpgate relayed
with a reference for that mailbox, the recipient gets that reference back, in
the envelope only. A tagged recipient whose reference smtpgate never used for
that mailbox is an unknown tag: passed as is, or stripped (`inbound.unknown_tags`).
Mail from the mailboxes themselves is left alone (no re-tagging of the
work-management system's own mail).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from smtpgate.linking.plan import Directory
from smtpgate.mail.addresses import Address, envelope_key, join_tag

__all__ = ["InboundPlan", "ThreadMapping", "plan_inbound"]


@dataclass(frozen=True)
class ThreadMapping:
    """A message of the thread smtpgate relayed: its Message-ID and mailbox -> reference used;
    for sharing (smtpgate.linking.share) also its source, From: and recipients as relayed."""

    message_id: str
    mapping: Mapping[str, str]
    source_reference: str | None = None
    sender: str | None = None  # its From: field as written
    recipients: tuple[str, ...] = ()
    source_mailbox: str | None = None  # the mailbox owning source_reference, when known


@dataclass(frozen=True)
class InboundPlan:
    targets: tuple[Address | None, ...]  # per recipient; None: merged into an earlier one
    retagged: tuple[tuple[Address, Address, str], ...] = ()  # (original, relayed, thread message id)
    unknown: tuple[tuple[Address, str, str], ...] = ()  # (recipient, its tag, "pass" | "strip")
    from_mailbox: bool = False
    thread_message_ids: tuple[str, ...] = field(default=())


def tags_to_check(recipients: Sequence[Address], directory: Directory) -> list[str]:
    """The references of tagged mailbox recipients, whose owners the store is asked for."""
    out = []
    for address in recipients:
        tagged = directory.tag_reference(address)
        if tagged is not None:
            out.append(tagged[1])
    return out


def plan_inbound(
    mail_from: Address | None,
    recipients: Sequence[Address],
    directory: Directory,
    thread: Sequence[ThreadMapping],
    owners: Mapping[str, str | None],
    unknown_tags: str = "pass",
) -> InboundPlan:
    """The envelope to relay for one inbound message.

    ``thread`` lists the relayed messages the message's In-Reply-To/References
    name, newest first; ``owners`` maps each reference of ``tags_to_check`` to
    the mailbox the store says owns it.
    """
    if mail_from is not None and directory.mailbox(mail_from) is not None:
        return InboundPlan(tuple(recipients), from_mailbox=True)
    targets: list[Address | None] = []
    retagged, unknown = [], []
    seen: set[tuple[str, str]] = set()
    for address in recipients:
        target = address
        found = directory.match(address)
        if found is not None:
            info, tag = found.info, found.tag
            if tag is None:
                hit = next((t for t in thread if info.address in t.mapping), None)
                local = join_tag(found.base, hit.mapping[info.address], directory.separator) if hit else None
                if hit is not None and local is not None:
                    target = Address(local, address.domain)
                    retagged.append((address, target, hit.message_id))
            else:
                reference = directory.matcher.normalize(tag)
                known = reference is not None and (
                    owners.get(reference) == info.address
                    or any(t.mapping.get(info.address) == reference for t in thread)
                )
                if not known:
                    unknown.append((address, tag, unknown_tags))
                    if unknown_tags == "strip":
                        target = Address(found.base, address.domain)
        key = envelope_key(target, found is not None)
        targets.append(None if key in seen else target)
        seen.add(key)
    return InboundPlan(tuple(targets), tuple(retagged), tuple(unknown),
                       thread_message_ids=tuple(t.message_id for t in thread))
