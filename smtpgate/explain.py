"""`smtpgate explain`: the link decision for one message, step by step, read-only.

The same `LinkService.decide` the relay runs, in observe mode (the store is
read, never written), with the reasons spelled out: which source rule
matched or why none did, each recipient's class and what would be done with
it, and the header edits as a unified diff. See README "Trying it safely".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from smtpgate.linking.decision import Envelope, EnvelopeRecipient, LinkDecision, SourceLinks
from smtpgate.linking.plan import Directory, RecipientClass, header_addresses, thread_message_ids
from smtpgate.linking.service import LinkService
from smtpgate.mail.addresses import Address, AddressError, parse_path
from smtpgate.mail.headers import HeaderBlock, decode_text, parse_header_block
from smtpgate.mail.msgid import message_id_of
from smtpgate.mail.stamp import Stamper
from smtpgate.store import Store

__all__ = ["MalformedMessage", "explain_inbound", "explain_message", "explain_recorded", "read_message",
           "render_text"]


class MalformedMessage(ValueError):
    """The file is not a message smtpgate can explain; the text says why."""


def read_message(data: bytes) -> bytes:
    """The message with CRLF line ends (files saved by mail clients often use LF)."""
    if b"\0" in data:
        raise MalformedMessage("it contains NUL bytes: not a mail message")
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if not parse_header_block(text).fields:
        raise MalformedMessage("no header fields: not a mail message (expected 'Name: value' lines first)")
    return text


@dataclass(frozen=True)
class _Facts:
    directory: Directory
    headers: HeaderBlock
    envelope: Envelope
    decision: LinkDecision


def default_envelope(headers: HeaderBlock, mail_from: str | None, rcpts: list[str]) -> Envelope:
    """The envelope given on the command line, else the one the header suggests (From; To, Cc, Bcc)."""
    try:
        sender = parse_path(mail_from) if mail_from is not None else next(
            iter(header_addresses(headers, "From")), None)
        recipients = [parse_path(r) for r in rcpts] if rcpts else header_addresses(headers, "To", "Cc", "Bcc")
    except AddressError as exc:
        raise MalformedMessage(f"bad address: {exc}") from None
    if not recipients:
        raise MalformedMessage("no recipients: give --rcpt, or a message with To, Cc or Bcc")
    return Envelope(sender, tuple(EnvelopeRecipient(r) for r in recipients if r is not None))


async def explain_message(raw: bytes, links: LinkService, *, mail_from: str | None = None,
                          rcpts: list[str] | None = None, stamp: Stamper | None = None) -> dict:
    """The explanation of one message as a JSON-ready dict (shape: README "smtpgate explain").

    With ``stamp`` (stamp.secret_file set) the report says what the message's stamp is; a
    valid one exempts the message from the decision, and the report stops there."""
    headers = parse_header_block(raw)
    envelope = default_envelope(headers, mail_from, rcpts or [])
    stamped = _stamp(headers, stamp)
    if stamped is not None and stamped["status"] == "valid":
        return {"message_id": message_id_of(headers.get("Message-ID")), "envelope": _envelope(envelope),
                "stamp": stamped, "exempt": True}
    report = await _explain_decision(raw, headers, envelope, links)
    if stamped is not None:
        report["stamp"] = stamped
    return report


def _stamp(headers: HeaderBlock, stamp: Stamper | None) -> dict | None:
    if stamp is None:
        return None
    check = stamp.check(headers)
    detail = {"none": f"no {stamp.header} field: the message is decided",
              "valid": f"{stamp.header} verifies: smtpgate processed this message before; it is relayed "
                       "untouched, without a link decision",
              "invalid": f"{stamp.header} does not count ({check.reason}): it is removed and the message decided"}
    return {"header": stamp.header, "status": check.status, "detail": detail[check.status]}


def _envelope(envelope: Envelope) -> dict:
    return {"mail_from": str(envelope.mail_from) if envelope.mail_from else "",
            "recipients": [str(a) for a in envelope.addresses]}


async def _explain_decision(raw: bytes, headers: HeaderBlock, envelope: Envelope, links: LinkService) -> dict:
    decision = await links.decide(envelope, headers, observe=True)
    facts = _Facts(links.directory, headers, envelope, decision)
    source = decision.source
    return {
        "message_id": decision.message_id,
        "envelope": _envelope(envelope),
        "source": {
            "reference": source.reference if source else None,
            "found_in": source.found_in if source else None,
            "mailbox": source.mailbox if source else None,
            "steps": await _source_steps(facts, links.store),
        },
        "automatic": source.automatic if source else False,
        "recipients": [_recipient(facts, r) for r in decision.recipients],
        "links": {"would_create": sorted(set(source.would_create) | set(source.created)) if source else [],
                  "would_reuse": list(source.reused) if source else []},
        "header_diff": _header_diff(raw, decision),
    }


async def explain_inbound(raw: bytes, links: LinkService, *, mail_from: str | None = None,
                          rcpts: list[str] | None = None, unknown_tags: str = "pass",
                          share_with_thread: bool = False) -> dict:
    """The inbound direction's decision for one message (`explain --inbound`): the tags a reply
    dropped that would be put back, and what inbound sharing would add and why. Sharing is
    worked out even when ``share_with_thread`` is off, so its effect can be seen first."""
    headers = parse_header_block(raw)
    envelope = default_envelope(headers, mail_from, rcpts or [])
    decision = await links.retag(envelope, headers, unknown_tags=unknown_tags, share=True)
    plan, share = decision.inbound, decision.share
    assert plan is not None and share is not None
    retagged = {str(o): t for o, _, t in plan.retagged}
    unknown = {str(a): (tag, action) for a, tag, action in plan.unknown}
    recipients = []
    for r in decision.recipients:
        row = {"address": str(r.original), "target": str(r.target) if r.target is not None else None}
        if r.target is None:
            row |= {"action": "merged", "reason": "the same mailbox as an earlier recipient: sent once"}
        elif str(r.original) in retagged:
            row |= {"action": "tag", "reason": f"the tag the thread message {retagged[str(r.original)]} used"}
        elif str(r.original) in unknown:
            tag, action = unknown[str(r.original)]
            row |= {"action": action, "reason": f"tag {tag} unknown for this mailbox (inbound.unknown_tags)"}
        else:
            row |= {"action": "unchanged", "reason": "sent from a team mailbox" if plan.from_mailbox
                    else "nothing to restore"}
        recipients.append(row)
    return {
        "message_id": decision.message_id,
        "direction": "inbound",
        "envelope": _envelope(envelope),
        "recipients": recipients,
        "share": {
            "enabled": share_with_thread,
            "reason": share.reason,
            "detail": share.why,
            "thread_message_id": share.thread_message_id,
            "source_reference": share.source_reference,
            "would_add": [str(a) for a in share.added],
            "already_named": [str(a) for a in share.present],
        },
    }


async def _source_steps(facts: _Facts, store: Store) -> list[dict]:
    """The source-activity rules of find_source and the thread look-up, rule by rule: matched, or why not."""
    d, headers, source = facts.directory, facts.headers, facts.decision.source
    found = source.found_in if source else None
    steps = []
    tagged = "a mailbox tagged with a reference in the envelope sender or From:"
    where = {"envelope": "the envelope sender", "from": "From:"}.get(found or "")
    steps.append(_step("tag", where is not None,
                       f"{where} is mailbox {source.mailbox} tagged {source.reference}"
                       if where else f"no tag: neither the envelope sender nor From: is {tagged}"))
    if found in ("envelope", "from"):
        return steps
    names = d.settings.reference_headers
    present = [n for n in names if headers.get_all(n)]
    steps.append(_step("header", found == "header",
                       f"{', '.join(present)} names {source.reference}" if source and found == "header"
                       else (f"{', '.join(present)} present but holds no reference" if present
                             else f"header absent ({', '.join(names) or 'none configured'})")))
    if found == "header":
        return steps
    if not d.settings.subject:
        steps.append(_step("subject", False, "the subject rule is off (references.subject: false)"))
    elif source and found == "subject":
        steps.append(_step("subject", True, f"Subject names {source.reference}"))
        return steps
    else:
        subject = headers.get("Subject")
        steps.append(_step("subject", False, "no Subject" if subject is None
                           else f"Subject has no reference: {decode_text(subject)!r}"))
    ids = thread_message_ids(headers)
    if source and found == "thread":
        steps.append(_step("thread", True, f"a message smtpgate relayed from {source.reference}"))
    elif not ids:
        steps.append(_step("thread", False, "no In-Reply-To or References"))
    else:
        steps.append(_step("thread", False, f"thread unknown: smtpgate relayed none of {', '.join(ids)}"))
    return steps


def _step(rule: str, matched: bool, detail: str) -> dict:
    return {"rule": rule, "matched": matched, "detail": detail}


def _recipient(facts: _Facts, r) -> dict:
    source = facts.decision.source
    cls = r.recipient_class or facts.directory.classify(r.original, None).value
    out = {"address": str(r.original), "class": cls,
           "target": str(r.target) if r.target is not None else None}
    if source is None:
        return out | {"action": "unchanged", "reason": "no source activity: the message is relayed untouched"}
    if r.target is None:
        return out | {"action": "merged", "reason": "the same mailbox as an earlier recipient: sent once"}
    if cls == RecipientClass.EXTERNAL.value:
        return out | {"action": "unchanged", "reason": "external address"}
    if cls == RecipientClass.INTERNAL.value:
        return out | {"action": "unchanged", "reason": "internal address, not a work-management mailbox"}
    reference = _tag_of(facts, r.target)
    if cls == RecipientClass.TAGGED_MAILBOX.value:
        known = reference in source.reused
        return out | {"action": "kept", "reason": f"tagged mailbox: link {source.reference} <-> "
                      f"{reference} {'exists' if known else 'would be recorded'}"}
    if r.target != r.original:
        return out | {"action": "tag", "reason": _why_tagged(facts, source, cls, reference)}
    return out | _why_untagged(facts, source, r.mailbox)


def _tag_of(facts: _Facts, address: Address) -> str | None:
    tagged = facts.directory.tag_reference(address)
    return tagged[1] if tagged else None


def _why_tagged(facts: _Facts, source: SourceLinks, cls: str, reference: str | None) -> str:
    if cls == RecipientClass.SOURCE_MAILBOX.value:
        return f"the source activity's own mailbox: tagged with {reference} so replies route back to it"
    named = {_tag_of(facts, a) for a in list(facts.envelope.addresses) + header_addresses(facts.headers, "To", "Cc")}
    named.discard(None)
    if reference in named:
        return f"this message names {reference} for this mailbox elsewhere: that activity is used"
    if reference in source.reused:
        return f"existing link {source.reference} <-> {reference} reused"
    return f"the thread's activity {reference} for this mailbox"


def _why_untagged(facts: _Facts, source: SourceLinks, mailbox: str | None) -> dict:
    info = facts.directory.mailbox_info(mailbox) if mailbox else None
    if mailbox in source.would_create:
        return {"action": "new_activity", "reason": "no linked activity yet: a new activity would be allocated "
                f"for {info.team if info else mailbox} and linked to {source.reference}"}
    if mailbox in source.untaggable:
        return {"action": "unchanged", "reason": "untaggable: the tagged address would exceed 64 octets; "
                "no link is made"}
    if info is not None and info.new_links == "never":
        return {"action": "unchanged", "reason": "new_links: never, and no linked activity exists"}
    if source.automatic:
        return {"action": "unchanged", "reason": "automatic mail (Auto-Submitted/Precedence) creates no link, "
                "and no linked activity exists"}
    return {"action": "unchanged", "reason": "no linked activity"}


def _header_diff(raw: bytes, decision: LinkDecision) -> str:
    edits = decision.rewrite.edits
    if not edits:
        return ""
    end = decision.headers.header_end
    before = raw[:end].decode("utf-8", "replace").splitlines(keepends=True)
    after = decision.apply(raw)[: end + sum(len(e.new) - len(e.old) for e in edits)]
    lines = after.decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(before, lines, "header (as sent)", "header (as relayed)"))


async def explain_recorded(message_id: str, store: Store) -> dict | None:
    """What smtpgate did with a message it relayed, from its message record; None when unknown."""
    hit = await store.find_thread([message_id])
    if hit is None:
        return None
    view = await store.show(hit.source_reference)
    record = next((m for m in (view.messages if view else []) if m.message_id == hit.message_id), None)
    return {
        "message_id": hit.message_id,
        "source": {"reference": hit.source_reference, "mailbox": hit.source_mailbox},
        "mapping": dict(hit.mapping),
        "recipients": list(record.recipients) if record else [],
        "shared": list(record.shared) if record else [],
        "from": record.from_ if record else None,
        "subject": record.subject if record else None,
        "date": record.date if record else None,
        "relayed_at": record.relayed_at.isoformat() if record else None,
    }


def _render_inbound(report: dict) -> str:
    env, share = report["envelope"], report["share"]
    lines = [f"inbound message {report['message_id'] or '(no Message-ID)'} from {env['mail_from'] or '<>'}",
             "recipients:"]
    for r in report["recipients"]:
        target = f" -> {r['target']}" if r["target"] and r["target"] != r["address"] else ""
        lines.append(f"  {r['address']}{target}  [{r['action']}] {r['reason']}")
    switch = "on" if share["enabled"] else "off (inbound.share_with_thread: false; shown as it would be)"
    lines.append(f"inbound sharing: {switch}")
    if share["thread_message_id"]:
        lines.append(f"  thread message: {share['thread_message_id']} (activity {share['source_reference']})")
    lines.append(f"  {share['reason']}: {share['detail']}")
    for address in share["would_add"]:
        lines.append(f"  would add (envelope only): {address}")
    for address in share["already_named"]:
        lines.append(f"  already a recipient: {address}")
    return "\n".join(lines) + "\n"


def render_text(report: dict) -> str:
    """The explanation in plain words, one step a line."""
    lines = []
    if "envelope" not in report:  # a recorded message
        src = report["source"]
        lines.append(f"message {report['message_id']}: relayed from activity {src['reference']}"
                     + (f" ({src['mailbox']})" if src["mailbox"] else ""))
        for mailbox, reference in sorted(report["mapping"].items()):
            lines.append(f"  {mailbox} -> {reference}")
        lines.append("relayed to: " + ", ".join(report["recipients"]))
        if report.get("shared"):
            lines.append("added by inbound sharing: " + ", ".join(report["shared"]))
        return "\n".join(lines) + "\n"
    if report.get("direction") == "inbound":
        return _render_inbound(report)
    env = report["envelope"]
    lines.append(f"message {report['message_id']} from {env['mail_from'] or '<>'}")
    if "stamp" in report:
        lines.append(f"stamp: {report['stamp']['status']}: {report['stamp']['detail']}")
    if report.get("exempt"):
        return "\n".join(lines) + "\n"
    src = report["source"]
    lines.append("source activity: " + (f"{src['reference']} (found in {src['found_in']})"
                                        if src["reference"] else "none: the message would be relayed untouched"))
    for step in src["steps"]:
        lines.append(f"  {'matched' if step['matched'] else 'no match'}: {step['rule']}: {step['detail']}")
    if report["automatic"]:
        lines.append("automatic mail: existing links are used, none is created")
    lines.append("recipients:")
    for r in report["recipients"]:
        target = f" -> {r['target']}" if r["target"] and r["target"] != r["address"] else ""
        lines.append(f"  {r['address']}{target}  [{r['class']}, {r['action']}] {r['reason']}")
    if report["header_diff"]:
        lines.append("header edits:")
        lines.append(report["header_diff"].rstrip("\n"))
    else:
        lines.append("header edits: none")
    if report["links"]["would_create"]:
        lines.append("a new activity's reference is known once allocated: its tag is then written in the "
                     "envelope and in To/Cc like the others")
    return "\n".join(lines) + "\n"
