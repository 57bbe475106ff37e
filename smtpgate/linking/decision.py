"""The seam between front ends and the link service: plain values, no I/O.

A front end (the SMTP relay session, the milter session) builds an
`Envelope` from its protocol, hands it and the message's header block to
`LinkService.decide`, and applies the `LinkDecision` in its own protocol:
the SMTP session splices the header edits into the bytes and replays the
envelope; the milter sends DELRCPT/ADDRCPT_PAR and CHGHEADER.
See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smtpgate.mail.addresses import Address
from smtpgate.mail.headers import HeaderBlock
from smtpgate.mail.rewrite import HeaderEdit, apply_edits, header_edits, split_edits

if TYPE_CHECKING:
    from smtpgate.linking.inbound import InboundPlan
    from smtpgate.linking.share import SharePlan

__all__ = ["ClientInfo", "Envelope", "EnvelopeRecipient", "HeaderEdit", "HeaderRewrite", "LinkDecision",
           "RecipientDecision", "SourceLinks"]


@dataclass(frozen=True)
class ClientInfo:
    """Who handed the message to smtpgate (for logs and the Received field)."""

    session_id: str = ""
    ip: str = "?"
    helo: str = ""
    authenticated_as: str | None = None
    tls: bool = False
    listener: str = ""
    esmtp: bool = True  # EHLO, not HELO
    tls_cipher: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when TLS is on
    client_cert: str | None = None  # the verified client certificate's subject (RFC 4514)
    client_cert_issuer: str | None = None

    def log_fields(self) -> dict:
        """Who sent it, from where, how: the fields message.relayed/rejected carry (README "Logs")."""
        fields = {"client_ip": self.ip, "helo": self.helo, "sasl_username": self.authenticated_as,
                  "tls": self.tls_cipher}
        if self.client_cert is not None:
            fields |= {"client_cert": self.client_cert, "client_cert_issuer": self.client_cert_issuer}
        return fields


@dataclass(frozen=True)
class EnvelopeRecipient:
    """One envelope recipient as the client gave it, with its RCPT parameters as written."""

    address: Address
    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class Envelope:
    """A front-end-neutral envelope: what every front end knows at end of message."""

    mail_from: Address | None
    recipients: tuple[EnvelopeRecipient, ...]
    mail_params: tuple[str, ...] = ()

    @property
    def addresses(self) -> list[Address]:
        return [r.address for r in self.recipients]


@dataclass(frozen=True)
class RecipientDecision:
    """One envelope recipient: ``target`` is what to relay, None when it merges into an
    earlier spelling of the same mailbox (sent once)."""

    original: Address
    target: Address | None
    recipient_class: str | None = None  # a RecipientClass value, None without a source
    mailbox: str | None = None  # the canonical work-management mailbox it belongs to


@dataclass(frozen=True)
class SourceLinks:
    """Outbound, a source activity found: the source and the links this message carries
    (message.relayed, the message record, observe mode's report, explain)."""

    reference: str
    found_in: str  # "envelope" | "from" | "header" | "subject" | "thread"
    mailbox: str | None = None  # the canonical address of the source's own mailbox, when known
    # mailbox -> the reference of its activity linked to the source, as this message uses it:
    # what the message record keeps for thread look-ups
    references: Mapping[str, str] = field(default_factory=dict)
    created: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()
    would_create: tuple[str, ...] = ()  # observe mode: mailboxes that would get a new activity
    untaggable: tuple[str, ...] = ()  # mailboxes whose tagged local part would exceed 64 octets
    automatic: bool = False  # automatic mail (Auto-Submitted/Precedence): no link is created


@dataclass(frozen=True)
class HeaderRewrite:
    """Outbound: the untagged mailboxes of To/Cc/From/Reply-To tagged, and the field edits that do it."""

    tagged: Mapping[str, str] = field(default_factory=dict)  # mailbox -> the tagged addr-spec written
    edits: tuple[HeaderEdit, ...] = ()

    @classmethod
    def of(cls, headers: HeaderBlock, tagged: Mapping[str, str]) -> HeaderRewrite:
        """The rewrite that writes ``tagged`` into ``headers``."""
        return cls(dict(tagged), header_edits(headers, tagged))


@dataclass(frozen=True)
class LinkDecision:
    """What the link service decided for one message (docs/architecture.md, "The seam").

    Every decision: the message's Message-ID and header block, and per envelope recipient
    what to relay. Outbound with a source: ``source`` (the links) and ``rewrite`` (the header
    edits). Inbound: ``inbound`` (the tags put back) and ``share``/``added`` (inbound
    sharing). ``observation()`` is observe mode's report of it.
    """

    message_id: str
    headers: HeaderBlock = field(repr=False)
    message_id_added: bool = False  # the message had none: the front end adds this one
    observed: bool = False  # observe mode or a valid stamp: nothing was written, nothing is to be applied
    recipients: tuple[RecipientDecision, ...] = ()
    source: SourceLinks | None = None
    rewrite: HeaderRewrite = field(default_factory=HeaderRewrite)
    inbound: InboundPlan | None = None  # direction: inbound: what was re-tagged and why
    share: SharePlan | None = None  # inbound sharing: what the thread adds, and why
    # inbound sharing: the recipients to add to the envelope (never the header block);
    # an upstream refusal of one only drops it
    added: tuple[Address, ...] = ()

    @classmethod
    def unchanged(cls, message_id: str, headers: HeaderBlock, recipients: Sequence[Address]) -> LinkDecision:
        """No decision: every recipient relayed as given, nothing written (a message smtpgate
        processed before, its stamp valid)."""
        return cls(message_id=message_id, headers=headers, observed=True,
                   recipients=tuple(RecipientDecision(a, a) for a in recipients))

    def targets(self) -> list[Address]:
        """The envelope to relay: each recipient's target, merged ones left out."""
        return [r.target for r in self.recipients if r.target is not None]

    def apply(self, raw: bytes) -> bytes:
        """The message bytes with the header edits spliced in; every other byte kept."""
        return apply_edits(raw, self.headers, self.rewrite.edits)

    def split(self, raw: bytes) -> tuple[bytes, int]:
        """``apply`` without copying the body: ``(head, rest)``, the message being
        ``head + raw[rest:]`` (smtpgate.mail.rewrite.split_edits)."""
        return split_edits(raw, self.headers, self.rewrite.edits)

    def observation(self) -> dict:
        """What enforce mode would have done: the fields of a `message.observed` event."""
        source = self.source
        new = set(source.would_create) if source else set()
        recipients = []
        for r in self.recipients:
            target = str(r.target) if r.target is not None else None
            if r.mailbox in new and r.target == r.original:
                target = "(new linked activity)"  # its reference is known only once allocated
            recipients.append({"original": str(r.original), "would_relay": target, "class": r.recipient_class})
        return {
            "source_reference": source.reference if source else None,
            "source_found_in": source.found_in if source else None,
            "recipients": recipients,
            "header_changes": dict(self.rewrite.tagged),
            "links_would_create": sorted(new) + list(source.created if source else ()),
            "links_would_reuse": list(source.reused if source else ()),
            "automatic": source.automatic if source else False,
        } | self._share_observation()

    def _share_observation(self) -> dict:
        """Inbound sharing in observe mode: the recipients enforce mode would add."""
        if self.share is None or not self.added:
            return {}
        return {"in_reply_to": self.share.thread_message_id, "would_share": [str(a) for a in self.added]}

    def without_changes(self) -> LinkDecision:
        """The decision relayed as received (observe mode): every recipient and field unchanged."""
        recipients = tuple(dataclasses.replace(r, target=r.original) for r in self.recipients)
        return dataclasses.replace(self, recipients=recipients, rewrite=HeaderRewrite(), message_id_added=False,
                                   added=())

    def without_tag(self, original: Address) -> LinkDecision:
        """The decision with ``original`` relayed untagged (its upstream refused the tag).

        The tag leaves the header fields too, so a reply-all does not hit the
        address the upstream refuses.
        """
        tagged = next((r.target for r in self.recipients if r.original == original), original)
        recipients = tuple(
            dataclasses.replace(r, target=r.original) if r.original == original else r for r in self.recipients
        )
        rewrite = self.rewrite
        if tagged is not None:
            kept = {k: v for k, v in rewrite.tagged.items() if v.lower() != str(tagged).lower()}
            if kept != rewrite.tagged:
                rewrite = HeaderRewrite.of(self.headers, kept)
        return dataclasses.replace(self, recipients=recipients, rewrite=rewrite,
                                   source=self._source_without(original, recipients))

    def _source_without(self, original: Address, recipients: tuple[RecipientDecision, ...]) -> SourceLinks | None:
        """A reused link no recipient is relayed with any more is not claimed (message.relayed)."""
        if self.source is None:
            return None
        references = self.source.references
        gone = {references.get(r.mailbox) for r in self.recipients if r.original == original and r.mailbox}
        carried = {references.get(r.mailbox) for r in recipients
                   if r.mailbox and r.target is not None and r.target.canonical != r.mailbox}
        reused = tuple(ref for ref in self.source.reused if ref not in gone or ref in carried)
        return dataclasses.replace(self.source, reused=reused)
