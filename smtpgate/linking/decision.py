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
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from smtpgate.mail.addresses import Address
from smtpgate.mail.headers import HeaderBlock
from smtpgate.mail.rewrite import HeaderEdit, apply_edits, header_edits, split_edits

if TYPE_CHECKING:
    from smtpgate.linking.inbound import InboundPlan
    from smtpgate.linking.share import SharePlan

__all__ = ["ClientInfo", "Envelope", "EnvelopeRecipient", "HeaderEdit", "LinkDecision", "RecipientDecision"]


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
    client: ClientInfo = field(default_factory=ClientInfo)
    direction: str = "outbound"  # "outbound" | "inbound"

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
class LinkDecision:
    """What the link service decided for one message (source activity, recipient classes, links, rewriting;
    docs/architecture.md).

    ``header_mapping`` maps a mailbox's canonical address to the tagged
    addr-spec written in To/Cc/From/Reply-To; ``header_edits`` are the
    resulting field edits for ``headers``. ``mapping`` (mailbox -> reference)
    is what the message record keeps for thread look-ups.
    """

    message_id: str
    headers: HeaderBlock = field(repr=False)
    message_id_added: bool = False  # the message had none: the front end adds this one
    observed: bool = False  # observe mode: nothing was written, nothing is to be applied
    recipients: tuple[RecipientDecision, ...] = ()
    source_reference: str | None = None
    source_found_in: str | None = None
    source_mailbox: str | None = None
    header_mapping: dict[str, str] = field(default_factory=dict)
    header_edits: tuple[HeaderEdit, ...] = ()
    mapping: dict[str, str] = field(default_factory=dict)
    links_created: tuple[str, ...] = ()
    links_reused: tuple[str, ...] = ()
    would_create: tuple[str, ...] = ()  # observe mode: mailboxes that would get a new activity
    untaggable: tuple[str, ...] = ()
    automatic: bool = False
    inbound: InboundPlan | None = None  # direction: inbound: what was re-tagged and why
    share: SharePlan | None = None  # inbound sharing: what the thread adds, and why
    # inbound sharing: the recipients to add to the envelope (never the header block);
    # an upstream refusal of one only drops it
    added: tuple[Address, ...] = ()
    date: str | None = None
    from_: str | None = None
    subject: str | None = None

    @property
    def changed(self) -> bool:
        """True when the envelope or the header differ from what the client sent."""
        return bool(self.header_edits or self.added) or any(r.target != r.original for r in self.recipients)

    def targets(self) -> list[Address]:
        """The envelope to relay: each recipient's target, merged ones left out."""
        return [r.target for r in self.recipients if r.target is not None]

    def target_of(self, original: Address) -> Address | None:
        for r in self.recipients:
            if r.original == original:
                return r.target
        return original

    def apply(self, raw: bytes) -> bytes:
        """The message bytes with the header edits spliced in; every other byte kept."""
        return apply_edits(raw, self.headers, self.header_edits)

    def split(self, raw: bytes) -> tuple[bytes, int]:
        """``apply`` without copying the body: ``(head, rest)``, the message being
        ``head + raw[rest:]`` (smtpgate.mail.rewrite.split_edits)."""
        return split_edits(raw, self.headers, self.header_edits)

    def observation(self) -> dict:
        """What enforce mode would have done: the fields of a `message.observed` event."""
        new = set(self.would_create)
        recipients = []
        for r in self.recipients:
            target = str(r.target) if r.target is not None else None
            if r.mailbox in new and r.target == r.original:
                target = "(new linked activity)"  # its reference is known only once allocated
            recipients.append({"original": str(r.original), "would_relay": target, "class": r.recipient_class})
        return {
            "source_reference": self.source_reference,
            "source_found_in": self.source_found_in,
            "recipients": recipients,
            "header_changes": dict(self.header_mapping),
            "links_would_create": sorted(new) + list(self.links_created),
            "links_would_reuse": list(self.links_reused),
            "automatic": self.automatic,
        } | self._share_observation()

    def _share_observation(self) -> dict:
        """Inbound sharing in observe mode: the recipients enforce mode would add."""
        if self.share is None or not self.added:
            return {}
        return {"in_reply_to": self.share.thread_message_id, "would_share": [str(a) for a in self.added]}

    def without_changes(self) -> LinkDecision:
        """The decision relayed as received (observe mode): every recipient and field unchanged."""
        recipients = tuple(dataclasses.replace(r, target=r.original) for r in self.recipients)
        return dataclasses.replace(self, recipients=recipients, header_edits=(), message_id_added=False, added=())

    def without_tag(self, original: Address) -> LinkDecision:
        """The decision with ``original`` relayed untagged (its upstream refused the tag).

        The tag leaves the header fields too, so a reply-all does not hit the
        address the upstream refuses.
        """
        tagged = self.target_of(original)
        recipients = tuple(
            dataclasses.replace(r, target=r.original) if r.original == original else r for r in self.recipients
        )
        kept = self.header_mapping
        if tagged is not None:
            kept = {k: v for k, v in self.header_mapping.items() if v.lower() != str(tagged).lower()}
        edits = header_edits(self.headers, kept) if kept != self.header_mapping else self.header_edits
        # A reused link no recipient was relayed with any more is not claimed (message.relayed).
        gone = {self.mapping.get(r.mailbox) for r in self.recipients if r.original == original and r.mailbox}
        carried = {self.mapping.get(r.mailbox) for r in recipients
                   if r.mailbox and r.target is not None and r.target.canonical != r.mailbox}
        reused = tuple(ref for ref in self.links_reused if ref not in gone or ref in carried)
        return dataclasses.replace(self, recipients=recipients, header_mapping=kept, header_edits=edits,
                                   links_reused=reused)
