"""The link service: one decision for every front end (docs/architecture.md).

`LinkService.decide` runs when a front end has the whole header block: it
finds the source activity (the pure steps 1-3, then the store's thread
look-up), asks the store for each mailbox's linked activity (creating it when
the plan allows), and returns a `LinkDecision`: the envelope to relay and the
header edits. Links are committed by the store before it returns, so before
the final dot: a message refused later keeps its links for the retry. `record` (or `record_soon`, which does not wait
for the commit) keeps the message record once the message is accepted. A
store or allocator failure is `LinkUnavailable`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from smtpgate.linking.decision import Envelope, HeaderRewrite, LinkDecision, RecipientDecision, SourceLinks
from smtpgate.linking.inbound import ThreadMapping, plan_inbound, tags_to_check
from smtpgate.linking.share import plan_share
from smtpgate.linking.plan import (
    Directory,
    Plan,
    Source,
    find_source,
    header_addresses,
    make_plan,
    thread_message_ids,
)
from smtpgate.log import get_logger, outage
from smtpgate.mail.addresses import MAX_LOCAL_OCTETS, Address, envelope_key, join_tag, parse_path
from smtpgate.mail.dkim import broken_signatures
from smtpgate.mail.headers import HeaderBlock
from smtpgate.mail.msgid import make_message_id, message_id_of
from smtpgate.mail.stamp import Stamper
from smtpgate.store import AllocationContext, AllocationError, LinkTarget, MessageRecord, Store, StoreError

__all__ = ["LinkService", "LinkUnavailable"]

_log = get_logger()


class LinkUnavailable(Exception):
    """The store or the allocator failed: the front end answers temporarily (451 4.3.0, TEMPFAIL)."""


@dataclass
class _FoundLinks:
    """What the store answered for a plan's mailboxes (LinkService._links)."""

    # mailbox -> the reference of its activity linked to the source; None: it stays untagged
    references: dict[str, str | None] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    would_create: list[str] = field(default_factory=list)  # observe mode: no link yet, one would be made
    untaggable: list[str] = field(default_factory=list)  # no link: the tagged local part would not fit


class LinkService:
    """The link decision against one store and one configuration snapshot (``directory``)."""

    def __init__(self, store: Store, directory: Directory, *, hostname: str,
                 stamp: Stamper | None = None) -> None:
        self.store = store
        self.directory = directory
        self.hostname = hostname
        self.stamp = stamp  # stamp.secret_file set: the deployment's stamp

    def carries_valid_stamp(self, headers: HeaderBlock) -> bool:
        """True when the message carries this deployment's valid stamp: it was processed
        already, so inbound sharing leaves it alone. (The front ends relay such a message
        untouched before any decision; this keeps `explain --inbound` and any other caller
        of ``retag`` to the same rule.)"""
        return self.stamp is not None and self.stamp.check(headers).valid

    async def decide(
        self,
        envelope: Envelope,
        headers: HeaderBlock,
        *,
        message_id: str | None = None,
        observe: bool = False,
        log=None,
        known_links: Mapping[tuple[str, str], str] | None = None,
    ) -> LinkDecision:
        """The decision for one message; with ``observe`` the store is only read.

        ``message_id`` None: the Message-ID field's ``<id>``, else a new one
        (``message_id_added``). ``known_links``: what ``early_target`` found for this
        transaction, (source reference, mailbox) -> linked reference, read from the store at
        this transaction's MAIL; each is reused as it was read, so the message keeps what its
        RCPT named upstream (the message is ordered before a link deleted after its MAIL; one
        deleted before it was never read). Raises LinkUnavailable when the store fails.
        """
        log = log or _log
        added = False
        if message_id is None:
            message_id = message_id_of(headers.get("Message-ID"))
            if message_id is None:
                message_id, added = make_message_id(self.hostname), True
        try:
            decision = await self._decide(envelope, headers, message_id, added, observe, log, known_links or {})
        except AllocationError as exc:
            raise LinkUnavailable(str(exc)) from None  # the allocator logs its own outage
        except StoreError as exc:
            raise _store_failed(exc) from None
        outage("store").ok()
        return decision

    async def _decide(
        self, envelope: Envelope, headers: HeaderBlock, message_id: str, added: bool, observe: bool, log,
        known_links: Mapping[tuple[str, str], str],
    ) -> LinkDecision:
        facts = dict(message_id=message_id, message_id_added=added, headers=headers, observed=observe)
        source, thread_mapping = await self._source(envelope, headers)
        if source is None:
            recipients = tuple(RecipientDecision(a, a) for a in envelope.addresses)
            return LinkDecision(recipients=recipients, **facts)
        plan, owner = await self._plan(envelope, headers, source, thread_mapping, observe, log)
        context = AllocationContext(subject=headers.get_text("Subject"), from_=headers.get("From"),
                                    message_id=message_id)
        found = await self._links(plan, source, owner, context, message_id, observe, log, known_links)
        resolution = plan.resolve(found.references)
        untaggable = found.untaggable + [m for m in resolution.untaggable if m not in found.untaggable]
        for mailbox in untaggable:
            log.warning("address.untaggable", address=mailbox,
                        reason="tagged local part would exceed 64 octets")
        recipients = tuple(
            RecipientDecision(rp.address, target, rp.cls.value, rp.mailbox.address if rp.mailbox else None)
            for rp, target in zip(plan.recipients, resolution.targets)
        )
        rewrite = HeaderRewrite.of(headers, resolution.tagged)
        for domain, fields in broken_signatures(headers, {e.name.lower() for e in rewrite.edits}):
            # Placed after a signer, smtpgate breaks its signature: say so on day one.
            log.warning("dkim.invalidated", domain=domain, fields=fields, message_id=message_id)
        links = SourceLinks(
            reference=source.reference, found_in=source.found_in, mailbox=plan.source_mailbox,
            references=dict(resolution.references), created=tuple(found.created), reused=tuple(found.reused),
            would_create=tuple(found.would_create), untaggable=tuple(untaggable), automatic=plan.automatic,
        )
        return LinkDecision(recipients=recipients, source=links, rewrite=rewrite, **facts)

    async def _plan(self, envelope: Envelope, headers: HeaderBlock, source: Source, thread_mapping: dict | None,
                    observe: bool, log) -> tuple[Plan, str | None]:
        """The plan for a message with a source, and the owner to record with a new link (only
        from authoritative evidence the store lacks; never a guess). A stored owner that the
        evidence contradicts is kept and the conflict logged."""
        stored = await self.store.activity_mailbox(source.reference)
        evidence = self._owner_evidence(source, envelope, headers)
        if evidence is not None and stored is not None and evidence != stored:
            log.warning("activity.owner_conflict", reference=source.reference, stored_owner=stored,
                        evidence=evidence, kept=stored)
        elif evidence is not None and stored is None and not observe:
            await self.store.record_activity(source.reference, evidence)
        # The store's owner is the activity's; an untagged From serves only this message.
        plan = make_plan(envelope.mail_from, envelope.addresses, headers, source, self.directory,
                         source_owner=stored or evidence, thread_mapping=thread_mapping)
        return plan, (evidence if stored is None else None)

    async def _source(self, envelope: Envelope, headers: HeaderBlock) -> tuple[Source | None, dict | None]:
        """The source activity: from the message itself (find_source), else from the thread its
        In-Reply-To/References name among the messages the store recorded."""
        source = find_source(envelope.mail_from, headers, self.directory)
        if source is not None:
            return source, None
        ids = thread_message_ids(headers)
        hit = await self.store.find_thread(ids) if ids else None
        if hit is None:
            return None, None
        return Source(reference=hit.source_reference, mailbox=hit.source_mailbox, found_in="thread"), hit.mapping

    def _owner_evidence(self, source: Source, envelope: Envelope, headers: HeaderBlock) -> str | None:
        """The mailbox that authoritative evidence names as the source's owner:
        a mailbox tagged with the source reference, as sender, in From:, or as a recipient."""
        if source.found_in in ("envelope", "from"):
            return source.mailbox
        candidates = list(envelope.addresses) + header_addresses(headers, "From", "To", "Cc")
        for address in candidates:
            tagged = self.directory.tag_reference(address)
            if tagged is not None and tagged[1] == source.reference:
                return tagged[0].address
        return None

    async def _links(self, plan: Plan, source: Source, owner: str | None, context: AllocationContext,
                     message_id: str, observe: bool, log,
                     known_links: Mapping[tuple[str, str], str]) -> _FoundLinks:
        """The store's answer for each mailbox of the plan (a link created where the plan allows
        it; in observe mode only read), and the links the message names itself, recorded."""
        found = _FoundLinks()
        for lookup in plan.lookups:
            mb = lookup.mailbox
            if observe:
                reference = await self.store.find_link(source.reference, mb.address)
                found.references[mb.address] = reference
                if reference is not None:
                    found.reused.append(reference)
                elif lookup.allow_create:
                    found.would_create.append(mb.address)
                continue
            known = known_links.get((source.reference, mb.address))
            if known is not None:  # read at this transaction's MAIL: the message keeps what its RCPT named
                found.references[mb.address] = known
                found.reused.append(known)
                continue
            target = LinkTarget(mailbox=mb.address, team=mb.team, new_reference=mb.new_reference,
                                allow_create=lookup.allow_create,
                                max_reference_length=_room_for_tag(mb.address, self.directory.separator))
            outcome = await self.store.get_or_create_link(source.reference, owner, target, context)
            found.references[mb.address] = outcome.reference if outcome else None
            if outcome is None:
                if lookup.allow_create:
                    found.untaggable.append(mb.address)
            elif outcome.created:
                found.created.append(outcome.reference)
                log.info("link.created", source_reference=source.reference, reference=outcome.reference,
                         mailbox=mb.address, message_id=message_id)
            else:
                found.reused.append(outcome.reference)
        for reference, mb in plan.explicit_links:
            if observe:
                known = await self.store.find_link(source.reference, mb.address) == reference
                (found.reused if known else found.created).append(reference)
            elif await self.store.record_link(source.reference, owner, reference, mb.address, message_id):
                found.created.append(reference)
                log.info("link.created", source_reference=source.reference, reference=reference,
                         mailbox=mb.address, message_id=message_id)
            else:
                found.reused.append(reference)
        return found

    async def early_links(self, mail_from: Address | None) -> dict[str, str] | None:
        """At MAIL: the links of the source activity the envelope sender names, mailbox ->
        linked activity, read once for the transaction's RCPTs (``early_target``'s ``links``).
        None when the sender names no source or the source has very many links (each RCPT
        then asks the store itself); empty when the store fails, so no RCPT waits for a
        failing store again (the end of DATA decides)."""
        source = self.directory.tag_reference(mail_from) if mail_from is not None else None
        if source is None:
            return None
        try:
            return await self.store.links_of(source[1])
        except StoreError:
            return {}

    async def early_target(self, mail_from: Address, recipient: Address,
                           found: dict[tuple[str, str], str] | None = None,
                           links: Mapping[str, str] | None = None) -> Address | None:
        """The tagged form of ``recipient`` when the envelope sender names the source and the
        link already exists (or it is the source's own mailbox); None otherwise, and on any
        store failure (end of DATA decides for good). Reads only; a link it finds is added
        to ``found`` (for ``decide``'s ``known_links``). ``links``: what ``early_links``
        read for this sender at MAIL, which answers instead of the store."""
        source = self.directory.tag_reference(mail_from)
        match = self.directory.match(recipient)
        if source is None or match is None or match.tag is not None:
            return None
        owner, source_reference = source
        reference = source_reference  # the source's own mailbox takes the source's tag
        if match.info.address != owner.address:
            if links is not None:
                reference = links.get(match.info.address)
            else:
                try:
                    reference = await self.store.find_link(source_reference, match.info.address)
                except StoreError:
                    return None
            if reference is None:
                return None
            if found is not None:
                found[source_reference, match.info.address] = reference
        local = join_tag(match.base, reference, self.directory.separator)
        return Address(local, recipient.domain) if local is not None else None

    async def retag(self, envelope: Envelope, headers: HeaderBlock, *, unknown_tags: str = "pass",
                    message_id: str | None = None, share: bool = False) -> LinkDecision:
        """Inbound: the envelope with the tags a reply dropped put back; reads the store only.
        With ``share`` (inbound.share_with_thread) also what the thread adds to the envelope
        (``decision.added``, ``decision.share``: smtpgate.linking.share).

        Raises LinkUnavailable when the store fails.
        """
        message_id = message_id or message_id_of(headers.get("Message-ID")) or ""
        try:
            ids = thread_message_ids(headers)
            hits = await self.store.thread_hits(ids) if ids else []
            owners = {ref: await self.store.activity_mailbox(ref)
                      for ref in tags_to_check(envelope.addresses, self.directory)}
        except StoreError as exc:
            raise _store_failed(exc) from None
        outage("store").ok()
        thread = [ThreadMapping(h.message_id, h.mapping, h.source_reference, h.from_, h.recipients, h.source_mailbox)
                  for h in hits]
        plan = plan_inbound(envelope.mail_from, envelope.addresses, self.directory, thread, owners, unknown_tags)
        recipients = tuple(RecipientDecision(a, t) for a, t in zip(envelope.addresses, plan.targets))
        shared = None
        if share:
            shared = plan_share(envelope.mail_from, envelope.addresses, headers, self.directory, thread,
                                stamped=self.carries_valid_stamp(headers))
        return LinkDecision(message_id=message_id, headers=headers, recipients=recipients, inbound=plan,
                            share=shared, added=shared.added if shared else ())

    async def record(self, decision: LinkDecision, delivered: Sequence[Address], *, log=None) -> None:
        """After the message was accepted: the message record for threads and the links view,
        returning once it is committed.

        Never raises: the message was delivered already; a failure is logged.
        """
        queued = self.record_soon(decision, delivered, log=log, urgent=True)
        if queued is not None:
            await asyncio.wait([queued])

    def record_soon(self, decision: LinkDecision, delivered: Sequence[Address], *,
                    log=None, urgent: bool = False) -> asyncio.Future[None] | None:
        """`record` without waiting for the commit: the record is queued at once, so
        the store's close (a drain's last step) writes it; a failure is logged when
        the commit fails. Returns the store's future, None when nothing is recorded.
        Not ``urgent``, the commit may wait a little to be shared (Store.queue_message)."""
        if decision.inbound is not None:
            record = self._shared_record(decision, delivered)
            if record is None:
                return None
            return self._queue(record, decision.message_id, log, urgent)
        if decision.source is None or decision.observed:
            return None
        record = MessageRecord(
            message_id=decision.message_id,
            date=decision.headers.get("Date"),
            from_=decision.headers.get("From"),
            subject=decision.headers.get_text("Subject"),
            source_reference=decision.source.reference,
            recipients=[str(a) for a in delivered],
            mapping=dict(decision.source.references),
            relayed_at=datetime.now(timezone.utc),
        )
        return self._queue(record, decision.message_id, log, urgent)

    def _shared_record(self, decision: LinkDecision, delivered: Sequence[Address]) -> MessageRecord | None:
        """Inbound: the record of a message sharing delivered to more activities, listed under
        each activity of the thread it reached (None when sharing added nobody)."""
        added = {envelope_key(a, True) for a in decision.added}
        shared = [a for a in delivered if envelope_key(a, True) in added]
        if not shared or decision.share is None or not decision.message_id:
            return None
        known = set(decision.share.mapping)
        mapping = {}
        for address in delivered:
            tagged = self.directory.tag_reference(address)
            if tagged is not None and (tagged[0].address, tagged[1]) in known:
                mapping.setdefault(tagged[0].address, tagged[1])
        return MessageRecord(
            message_id=decision.message_id, date=decision.headers.get("Date"),
            from_=decision.headers.get("From"), subject=decision.headers.get_text("Subject"),
            source_reference=decision.share.source_reference, recipients=[str(a) for a in delivered],
            mapping=mapping, relayed_at=datetime.now(timezone.utc), shared=[str(a) for a in shared],
        )

    def _queue(self, record: MessageRecord, message_id: str, log, urgent: bool) -> asyncio.Future[None] | None:
        try:
            queued = self.store.queue_message(record, urgent=urgent)
        except Exception as exc:  # noqa: BLE001 - delivered already: a failure here must not become a 451
            _record_failed(log, message_id, exc)
            return None
        queued.add_done_callback(functools.partial(_record_done, log, message_id))
        return queued


def _record_done(log, message_id: str, queued: asyncio.Future[None]) -> None:
    if not queued.cancelled() and (exc := queued.exception()) is not None:
        _record_failed(log, message_id, exc)


def _store_failed(exc: StoreError) -> LinkUnavailable:
    outage("store").failed(f"store: {exc}")
    return LinkUnavailable(f"store: {exc}")


def _record_failed(log, message_id: str, exc: BaseException) -> None:
    outage("store").failed(f"store: {exc}")
    (log or _log).error("store.error", stage="record_message", reason=f"{type(exc).__name__}: {exc}",
                        message_id=message_id)


def _room_for_tag(mailbox: str, separator: str) -> int | None:
    """How many octets a reference may have so that mailbox+reference fits in 64 octets."""
    address = parse_path(mailbox)
    if address is None:
        return None
    return MAX_LOCAL_OCTETS - len(address.local.encode("utf-8", "surrogatepass")) - len(separator.encode())
