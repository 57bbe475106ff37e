"""What both front ends do around the one link decision (docs/architecture.md, "The seam").

A front end turns its protocol into an `Envelope` and a header block, and at the end
applies the decision in its protocol: the SMTP session replays MAIL/RCPT upstream and
splices the header edits into the bytes; the milter sends DELRCPT/ADDRCPT and
CHGHEADER. Everything between is here, once: the listener's `MessagePolicy`, the
checks before any decision (hops, the tenant guard, the processing stamp), taking the
decision (or passing a stamped message untouched), observe mode and its report, the
way each client recipient goes out (`envelope_plan`), and the `message.relayed` and
`message.shared` events.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from smtpgate.config import Config, Limits, Listener
from smtpgate.linking.decision import Envelope, LinkDecision
from smtpgate.linking.service import LinkService, LinkUnavailable
from smtpgate.mail import replies
from smtpgate.mail.addresses import Address, envelope_key
from smtpgate.mail.headers import HeaderBlock
from smtpgate.mail.msgid import message_id_of
from smtpgate.mail.replies import SMTPReply
from smtpgate.mail.required_headers import required_header_problem
from smtpgate.mail.stamp import StampCheck, Stamper

__all__ = ["MessagePolicy", "envelope_plan", "log_relayed", "log_shared"]


@dataclass(frozen=True)
class MessagePolicy:
    """How one listener treats a message, from one configuration snapshot: the same for
    the SMTP front end (`RelayContext`) and the milter (`MilterSettings`)."""

    links: LinkService
    limits: Limits
    mode: str = "enforce"  # enforce | observe
    direction: str = "outbound"  # outbound | inbound (restore the tags a reply dropped, never relay out)
    unknown_tags: str = "pass"  # inbound: pass | strip
    stamp: Stamper | None = None  # stamp.secret_file set: stamp every message, pass stamped ones
    required_headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # the tenant guard
    share_with_thread: bool = False  # inbound: add the thread's missing team mailboxes (envelope only)

    @classmethod
    def for_listener(cls, links: LinkService, config: Config, listener: Listener) -> MessagePolicy:
        return cls(links=links, limits=config.limits, mode=listener.mode or config.mode,
                   direction=listener.direction, unknown_tags=config.inbound.unknown_tags,
                   stamp=config.stamp.stamper, required_headers=dict(listener.required_headers),
                   share_with_thread=config.inbound.share_with_thread)

    @property
    def observe(self) -> bool:
        return self.mode == "observe"

    @property
    def inbound(self) -> bool:
        return self.direction == "inbound"

    def check(self, headers: HeaderBlock, log) -> StampCheck:
        """The refusals before any link is looked up (too many hops, the tenant guard), as
        SMTPReply; then the message's stamp (one that does not verify is logged, to be removed)."""
        hops = len(headers.get_all("Received"))
        if hops > self.limits.max_hops:
            raise SMTPReply(replies.TOO_MANY_HOPS, f"{hops} Received fields")
        problem = required_header_problem(headers, self.required_headers)
        if problem is not None:
            raise SMTPReply(replies.NOT_ACCEPTED_SENDER_ORGANISATION, f"required_headers: {problem}")
        if self.stamp is None:
            return StampCheck("none")
        check = self.stamp.check(headers)
        if check.status == "invalid":
            log.warning("stamp.invalid", reason=check.reason, header=self.stamp.header,
                        message_id=message_id_of(headers.get("Message-ID")), action="removed")
        return check

    def pass_stamped(self, headers: HeaderBlock, recipients: Sequence[Address], log, **fields) -> LinkDecision:
        """A valid stamp: the message goes as received, no decision, no rewrite, no record."""
        message_id = message_id_of(headers.get("Message-ID"))
        assert message_id is not None  # a valid stamp binds one
        log.info("message.already_processed", message_id=message_id, **fields,
                 header=self.stamp.header if self.stamp else None, mode=self.mode)
        if self.observe:
            log.info("message.observed", message_id=message_id, **fields,
                     exempt="valid stamp: relayed untouched, no link decision")
        return LinkDecision.unchanged(message_id, headers, recipients)

    async def decide(self, envelope: Envelope, headers: HeaderBlock, log,
                     known_links: Mapping[tuple[str, str], str] | None = None) -> LinkDecision:
        """The link service's decision (inbound: the tags a reply dropped put back); a store
        failure is SMTPReply 451 4.3.0. Links are committed before it returns."""
        try:
            if self.inbound:
                return await self.links.retag(envelope, headers, unknown_tags=self.unknown_tags,
                                              share=self.share_with_thread)
            return await self.links.decide(envelope, headers, observe=self.observe, log=log,
                                           known_links=known_links)
        except LinkUnavailable as exc:
            raise SMTPReply(replies.TEMPORARY_FAILURE, str(exc)) from None

    def to_apply(self, decision: LinkDecision, log, **fields) -> LinkDecision:
        """The decision as the front end applies it, its events logged: inbound, the tags put
        back; in observe mode what enforce mode would have done, and nothing changed."""
        if decision.inbound is not None:
            _log_retagged(log, decision, self.observe, fields)
        if not self.observe:
            return decision
        if decision.inbound is None or decision.added:
            log.info("message.observed", message_id=decision.message_id, **fields, **decision.observation())
        return decision.without_changes()


def envelope_plan(decision: LinkDecision) -> list[Address | None]:
    """Per recipient of the decision, in order: the address it goes out as, or None when it
    goes out once as another recipient (merged into an earlier spelling of the same
    mailbox, or the same address as another after rewriting). A recipient the decision
    leaves unchanged always goes as given: the client's envelope holds it already."""
    sent = {envelope_key(r.original) for r in decision.recipients if r.target == r.original}
    plan: list[Address | None] = []
    for r in decision.recipients:
        if r.target == r.original:
            plan.append(r.target)
        elif r.target is None or envelope_key(r.target) in sent:
            plan.append(None)
        else:
            sent.add(envelope_key(r.target))
            plan.append(r.target)
    return plan


def log_relayed(log, decision: LinkDecision, recipients: Iterable[tuple[str | None, str | None]], *,
                shared: Sequence[Address], started: float, **fields) -> None:
    """message.relayed: ``recipients`` (original, relayed) as the front end relayed them,
    ``shared`` the recipients inbound sharing added; the links only when some were used."""
    source = None if decision.observed else decision.source
    log.info(
        "message.relayed",
        message_id=decision.message_id,
        **fields,
        recipients=[{"original": original, "relayed": relayed} for original, relayed in recipients],
        shared=[str(a) for a in shared] or None,
        source_reference=source.reference if source else None,
        source_found_in=source.found_in if source else None,
        links_created=list(source.created) if source else [],
        links_reused=list(source.reused) if source else [],
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )


def log_shared(log, decision: LinkDecision, added: Sequence[Address], refused: Sequence[tuple[str, str]],
               **fields) -> None:
    """message.shared, when inbound sharing added recipients: those accepted and those refused."""
    if not decision.added or decision.share is None:
        return
    log.info("message.shared", message_id=decision.message_id, **fields, **decision.share.log_fields(),
             added=[str(a) for a in added], refused=[{"recipient": a, "reply": why} for a, why in refused])


def _log_retagged(log, decision: LinkDecision, observe: bool, fields: Mapping) -> None:
    """Inbound: which recipients got their tag back (or an unknown tag handled), and from where."""
    plan = decision.inbound
    assert plan is not None
    for address, tag, action in plan.unknown:
        log.warning("inbound.unknown_tag", recipient=str(address), tag=tag,
                    action="observed" if observe else action, message_id=decision.message_id)
    if plan.retagged:
        log.info(
            "message.observed" if observe else "message.retagged",
            message_id=decision.message_id,
            **fields,
            recipients=[{"original": str(o), "relayed": str(n), "thread_message_id": t}
                        for o, n, t in plan.retagged],
        )
