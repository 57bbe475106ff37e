"""The shell around the core's link decision: store look-ups, link creation, rewriting.

`Linker.link` runs at the end of DATA, before anything is sent upstream: it
finds the source activity (the core's steps 1-3, then the store's thread
look-up), asks the store for each mailbox's linked activity (creating it when
the plan allows), and rewrites the header block. Links are committed by the
store before this returns, so before the final dot (DESIGN.md 2.4). A store
failure is a `451 4.3.0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from smtpgate.mail import replies
from smtpgate.mail.addresses import Address
from smtpgate.mail.headers import HeaderBlock
from smtpgate.linking.plan import Source, find_source, make_plan, thread_message_ids
from smtpgate.mail.replies import SMTPReply
from smtpgate.mail.rewrite import rewrite_headers
from smtpgate.store import AllocationContext, LinkTarget, MessageRecord, StoreError

if TYPE_CHECKING:
    from smtpgate.runtime.gate import Gate
    from smtpgate.frontends.smtp.relay import Transaction


@dataclass
class Linked:
    """What linking decided for one message."""

    content: bytes
    raw: bytes = b""
    header_mapping: dict[str, str] = field(default_factory=dict)
    relayed: dict[str, Address] = field(default_factory=dict)  # str(original) -> relayed
    source_reference: str | None = None
    source_found_in: str | None = None
    mapping: dict[str, str] = field(default_factory=dict)  # mailbox -> reference used
    links_created: list[str] = field(default_factory=list)
    links_reused: list[str] = field(default_factory=list)

    def tag_refused(self, original: Address, tagged: Address) -> None:
        """The upstream refused the tagged form: relay, show and record the untagged one.

        The tag leaves the header fields too, so a reply-all does not hit the
        address the upstream refuses.
        """
        self.relayed[str(original)] = original
        kept = {k: v for k, v in self.header_mapping.items() if v.lower() != str(tagged).lower()}
        if kept != self.header_mapping:
            self.header_mapping = kept
            self.content = rewrite_headers(self.raw, kept) if kept else self.raw


class Linker:
    def __init__(self, gate: Gate):
        self.gate = gate

    async def link(self, tx: Transaction, raw: bytes, headers: HeaderBlock, message_id: str) -> Linked:
        try:
            return await self._link(tx, raw, headers, message_id)
        except StoreError as exc:
            raise SMTPReply(replies.TEMPORARY_FAILURE, f"store: {exc}") from None

    async def _link(self, tx: Transaction, raw: bytes, headers: HeaderBlock, message_id: str) -> Linked:
        directory = self.gate.directory
        store = self.gate.store
        assert store is not None
        source = find_source(tx.mail_from, headers, directory)
        thread_mapping = None
        if source is None:
            ids = thread_message_ids(headers)
            hit = await store.find_thread(ids) if ids else None
            if hit is not None:
                source = Source(reference=hit.source_reference, mailbox=hit.source_mailbox, found_in="thread")
                thread_mapping = hit.mapping
        if source is None:
            return Linked(content=raw)

        owner = None if source.mailbox else await store.activity_mailbox(source.reference)
        recipients = [r.address for r in tx.recipients]
        plan = make_plan(tx.mail_from, recipients, headers, source, directory,
                         source_owner=owner, thread_mapping=thread_mapping)
        own = plan.source_mailbox
        if own is not None and own != owner:
            await store.record_activity(source.reference, own)

        context = AllocationContext(subject=headers.get_text("Subject"), from_=headers.get("From"),
                                    message_id=message_id)
        found: dict[str, str | None] = {}
        created: list[str] = []
        reused: list[str] = []
        for lookup in plan.lookups:
            mb = lookup.mailbox
            target = LinkTarget(mailbox=mb.address, team=mb.team, new_reference=mb.new_reference,
                                allow_create=lookup.allow_create)
            outcome = await store.get_or_create_link(source.reference, own, target, context)
            found[mb.address] = outcome.reference if outcome else None
            if outcome is not None:
                (created if outcome.created else reused).append(outcome.reference)
        for reference, mb in plan.explicit_links:
            if await store.record_link(source.reference, own, reference, mb.address, message_id):
                created.append(reference)
            else:
                reused.append(reference)

        resolution = plan.resolve(found)
        for address in resolution.untaggable:
            tx.log.warning("address.untaggable", address=address,
                           reason="tagged local part would exceed 64 octets")
        content = rewrite_headers(raw, resolution.header_mapping) if resolution.header_mapping else raw
        return Linked(
            content=content,
            raw=raw,
            header_mapping=dict(resolution.header_mapping),
            relayed={str(orig): new for orig, new in resolution.envelope},
            source_reference=source.reference,
            source_found_in=source.found_in,
            mapping=dict(resolution.mapping),
            links_created=created,
            links_reused=reused,
        )

    async def recorded(self, tx: Transaction, linked: Linked, headers: HeaderBlock, message_id: str) -> None:
        """After the upstream's 250: keep the message record for threads and the links view.

        A failure here is logged only; the message was delivered (DESIGN.md 2.4).
        """
        if linked.source_reference is None:
            return
        store = self.gate.store
        assert store is not None
        record = MessageRecord(
            message_id=message_id,
            date=headers.get("Date"),
            from_=headers.get("From"),
            subject=headers.get_text("Subject"),
            source_reference=linked.source_reference,
            recipients=[str(r.relayed) for r in tx.recipients],
            mapping=dict(linked.mapping),
            relayed_at=datetime.now(timezone.utc),
        )
        try:
            await store.record_message(record)
        except Exception as exc:  # noqa: BLE001 - delivered already: a failure here must not become a 451
            tx.log.error("store.error", stage="record_message", reason=f"{type(exc).__name__}: {exc}",
                         message_id=message_id)
