"""One SMTP transaction relayed in lockstep with the upstream (docs/architecture.md, "One message's path").

The client's MAIL opens an upstream transaction, each RCPT is relayed and the
upstream's verdict is the client's reply, and the client hears 250 for its
message only after the upstream said 250 to the final dot. At the end of DATA
the message is checked, linked and rewritten (smtpgate.linking.service); when the
envelope changed, the upstream transaction is replayed with the rewritten
recipients before the data is sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from dataclasses import dataclass, field
from email.utils import format_datetime, localtime
from typing import NoReturn

from smtpgate.frontends.policy import MessagePolicy, envelope_plan, log_relayed, log_shared
from smtpgate.linking.decision import ClientInfo, Envelope, EnvelopeRecipient, LinkDecision
from smtpgate.mail import replies
from smtpgate.mail.addresses import Address
from smtpgate.mail.dataguard import scan_data
from smtpgate.mail.headers import HeaderBlock, parse_header_block
from smtpgate.mail.params import Param, upstream_size, xtext
from smtpgate.mail.replies import SMTPReply
from smtpgate.mail.queueid import queue_id
from smtpgate.upstream.client import (UpstreamAuthError, UpstreamConnectError, UpstreamError, UpstreamSession,
                                      UpstreamSource, Verdict)

__all__ = ["MAIL_PARAMS", "RCPT_PARAMS", "ClientInfo", "RelayContext", "Transaction"]

# MAIL parameters passed upstream only when the upstream has the extension.
_MAIL_PARAM_EXTENSION = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8",
                         "RET": "dsn", "ENVID": "dsn", "AUTH": "auth"}
_RCPT_PARAM_EXTENSION = {"NOTIFY": "dsn", "ORCPT": "dsn"}
MAIL_PARAMS = set(_MAIL_PARAM_EXTENSION)
RCPT_PARAMS = set(_RCPT_PARAM_EXTENSION)

# The longest a RCPT waits for its RCPT-time tag (the MAIL-time link look-up, seconds);
# the upstream's RCPT gets what is left of upstream.timeouts.command, so a hung store
# never makes a RCPT wait longer than that (docs/upstream.md). Not back in time: the
# recipient goes upstream untagged and the end of DATA decides (and replays).
EARLY_TAG_SECONDS = 2.0


@dataclass(frozen=True)
class RelayContext:
    """What a transaction needs, from one configuration snapshot (docs/architecture.md)."""

    pool: UpstreamSource  # the shared pool, or the client's own upstream login (auth_backend: upstream)
    hostname: str
    policy: MessagePolicy


@dataclass
class Recipient:
    address: Address
    params: dict[str, Param]
    relayed: Address  # what the upstream was last asked to accept
    tag_refused: bool = False  # the upstream refused the tagged form at RCPT time
    reply: str = ""  # the client's reply to this RCPT (the upstream's verdict)
    # relayed at RCPT as the decision will have it (tagged then, or no untagged mailbox): DATA may go early
    final_at_rcpt: bool = False

    def upstream_params(self, extensions: frozenset[str]) -> list[str]:
        out = [str(p) for k, p in self.params.items() if _RCPT_PARAM_EXTENSION[k] in extensions]
        if "dsn" in extensions and "ORCPT" not in self.params and self.relayed != self.address:
            # ORCPT keeps the original address, so a DSN names what the client sent.
            out.append(f"ORCPT=rfc822;{xtext(str(self.address))}")
        return out


@dataclass
class Transaction:
    """The state of one client transaction and its upstream twin."""

    ctx: RelayContext
    client: ClientInfo
    log: object
    mail_from: Address | None = None
    mail_params: dict[str, Param] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    upstream: UpstreamSession | None = None
    broken: str | None = None  # why the upstream transaction can no longer be used
    started: float = field(default_factory=time.monotonic)
    refused: list[tuple[str, str]] = field(default_factory=list)
    # upstream_ms and store_ms for message.relayed/rejected, which feed the latency metrics
    timings: dict[str, float] = field(default_factory=dict)
    # links found at RCPT time, (source reference, mailbox) -> reference: the decision reuses them
    known_links: dict[tuple[str, str], str] = field(default_factory=dict)
    # the envelope sender's source's links, read from MAIL on, beside the upstream's MAIL
    early_links: asyncio.Future[dict[str, str] | None] | None = None
    # inbound sharing: the recipients added (the upstream accepted) and those it refused
    shared: list[Address] = field(default_factory=list)
    shared_refused: list[tuple[str, str]] = field(default_factory=list)
    # the message on its way upstream (start_message .. end_message): the decision as applied,
    # whether it gets a record, and the octets sent so far
    _applied: LinkDecision | None = None
    _record: bool = True
    size: int = 0

    # ----------------------------------------------------------------- MAIL

    async def open(self, sender: Address | None, params: dict[str, Param]) -> str:
        """MAIL: take an upstream connection and relay MAIL; returns the reply line."""
        limits = self.ctx.policy.limits
        if "SIZE" in params and int(params["SIZE"].value or 0) > limits.max_message_size:
            raise SMTPReply(replies.MESSAGE_TOO_BIG, "declared SIZE over limits.max_message_size")
        if self.ctx.policy.mode == "enforce" and self.ctx.policy.direction == "outbound" and sender is not None:
            # RCPT-time tags (_early_tag) start here: the sender's links,
            # read while the upstream connection and its MAIL take their time. Never
            # cancelled (a PostgreSQL statement cancelled midway costs its connection):
            # a transaction that ends first leaves it to finish on its own.
            self.early_links = asyncio.ensure_future(self.ctx.policy.links.early_links(sender))
            self.early_links.add_done_callback(_retrieved)
        try:
            self.upstream = await self.ctx.pool.acquire()
        except UpstreamError as exc:
            self._drop_early_links()
            raise self._not_connected(exc) from None
        try:
            return await self._mail(sender, params)
        except asyncio.CancelledError:
            # The client went away while MAIL waited: the session does not know this
            # transaction yet, so it gives its connection up itself.
            self.drop()
            raise

    async def _mail(self, sender: Address | None, params: dict[str, Param]) -> str:
        """MAIL on the connection open() took."""
        assert self.upstream is not None
        if "SMTPUTF8" in params and sender and not self.upstream.carries(sender):
            await self.release(reusable=True)
            raise SMTPReply(replies.SMTPUTF8_UNSUPPORTED, "non-ASCII sender, upstream lacks SMTPUTF8")
        self.mail_from, self.mail_params = sender, params
        try:
            verdict = await self._upstream_call(self.upstream.mail(self._sender_text(), self._mail_params()))
        except SMTPReply:
            await self.release(reusable=False)
            raise
        if not verdict.ok:
            await self.release(reusable=True)
        return _client_line(verdict)

    def _sender_text(self) -> str:
        return "" if self.mail_from is None else str(self.mail_from)

    def _mail_params(self) -> list[str]:
        assert self.upstream is not None
        ext = self.upstream.extensions
        out = [p for k, p in self.mail_params.items() if _MAIL_PARAM_EXTENSION[k] in ext]
        # The declared SIZE covers what smtpgate adds (Received, tags), for a strict upstream.
        return [f"SIZE={upstream_size(int(p.value or 0), self.upstream.size_limit)}" if p.keyword == "SIZE"
                else str(p) for p in out]

    # ----------------------------------------------------------------- RCPT

    async def add_recipient(self, address: Address, params: dict[str, Param]) -> str:
        """RCPT: relay it (tagged already when the link is known); the upstream's verdict is the reply.

        A recipient given again in the same spelling goes upstream once: the second RCPT
        gets the first one's verdict."""
        if not self.broken:
            for rcpt in self.recipients:
                if rcpt.address == address:
                    return rcpt.reply
        try:
            return await self._add_recipient(address, params)
        except asyncio.CancelledError:
            self.drop()
            raise

    async def _add_recipient(self, address: Address, params: dict[str, Param]) -> str:
        if self.broken or self.upstream is None:
            raise SMTPReply(replies.UPSTREAM_LOST, self.broken or "no upstream transaction")
        if len(self.recipients) >= self.ctx.policy.limits.max_recipients:
            raise SMTPReply(replies.TOO_MANY_RECIPIENTS, "limits.max_recipients reached")
        if not self.upstream.carries(address):
            raise SMTPReply(replies.SMTPUTF8_UNSUPPORTED, "non-ASCII recipient, upstream lacks SMTPUTF8")
        started = time.monotonic()
        tagged = await self._early_tag(address)
        rcpt = Recipient(address=address, params=params, relayed=tagged or address,
                         final_at_rcpt=tagged is not None or not self.ctx.policy.links.directory.untagged_mailbox(address))
        # The RCPT's reply comes within upstream.timeouts.command, the tag's wait included.
        left = None
        if self.early_links is not None:
            left = max(self.ctx.pool.config.timeouts.command - (time.monotonic() - started), 0.001)
        verdict = await self._upstream_call(
            self.upstream.rcpt(str(rcpt.relayed), rcpt.upstream_params(self.upstream.extensions), timeout=left)
        )
        if tagged is not None and verdict.code >= 500:
            # The upstream refuses the tag (plus addressing off): delivery matters more.
            self.log.warning("upstream.tag_refused", recipient=str(address), tagged=str(tagged),
                             reply=f"{verdict.code} {verdict.text}")
            rcpt.relayed, rcpt.tag_refused = address, True
            verdict = await self._upstream_call(
                self.upstream.rcpt(str(address), rcpt.upstream_params(self.upstream.extensions)))
        rcpt.reply = _rcpt_line(verdict)
        if verdict.ok:
            self.recipients.append(rcpt)
        else:
            self.refused.append((str(address), f"{verdict.code} {verdict.text}"))
        return rcpt.reply

    async def _early_tag(self, address: Address) -> Address | None:
        """The tagged form at RCPT time when the envelope sender names the source
        and the link exists, so the common message needs no replay. End of DATA decides again
        (a replay follows if the message says otherwise)."""
        if self.early_links is None or self.mail_from is None:  # started by open() when tagging early
            return None
        found: dict[tuple[str, str], str] = {}
        links = self.early_links
        if links.done() and not links.cancelled() and links.exception() is None and links.result() is not None:
            # The common case: the sender's links are in; the answer needs no store (and no wait).
            tagged = await self.ctx.policy.links.early_target(self.mail_from, address, found, links.result())
            self.known_links.update(found)
            return tagged
        look_up = asyncio.ensure_future(self._early_target(links, self.mail_from, address, found))
        look_up.add_done_callback(_retrieved)
        # asyncio.wait cancels neither on its timeout nor when this RCPT is cancelled (the
        # client gone): the shared look-up always runs to its end (see open).
        wait = min(EARLY_TAG_SECONDS, self.ctx.pool.config.timeouts.command / 4)
        done, _ = await asyncio.wait({look_up}, timeout=wait)
        if not done:
            self.log.info("rcpt.tag_late", recipient=str(address), waited_s=wait)
            return None
        self.known_links.update(found)
        return look_up.result()

    async def _early_target(self, early_links: asyncio.Future, mail_from: Address, address: Address,
                            found: dict[tuple[str, str], str]) -> Address | None:
        return await self.ctx.policy.links.early_target(mail_from, address, found, await early_links)

    def _drop_early_links(self) -> None:
        self.early_links = None  # left to finish (see open)

    def _not_connected(self, exc: UpstreamError) -> SMTPReply:
        """No upstream connection could be had: logged at stage connect, and the reply."""
        if isinstance(exc, UpstreamAuthError):
            self.log.warning("upstream.auth_failed", stage="connect", reason=exc.reason, upstream=self.ctx.pool.label)
            return SMTPReply(replies.UPSTREAM_AUTH_FAILED, exc.reason)
        self.log.warning("upstream.error", stage="connect", reason=exc.reason, upstream=self.ctx.pool.label)
        return SMTPReply(exc.reply or replies.UPSTREAM_UNREACHABLE, exc.reason)

    async def _upstream_call(self, call) -> Verdict:
        try:
            return await call
        except UpstreamError as exc:
            self.broken = exc.reason
            if isinstance(exc, UpstreamConnectError):  # a pooled connection found dropped at MAIL, and no new one
                raise self._not_connected(exc) from None
            self.log.warning("upstream.error", stage="transaction", reason=exc.reason, upstream=self.ctx.pool.label)
            raise SMTPReply(replies.UPSTREAM_LOST, exc.reason) from None

    async def _new_upstream(self) -> None:
        """The replay after DATA went out: that connection closes and the transaction's source
        hands out another, which must carry the envelope as the client gave it."""
        await self.release(reusable=False)
        try:
            self.upstream = await self.ctx.pool.acquire()
        except UpstreamError as exc:
            self.broken = exc.reason
            raise self._not_connected(exc) from None
        if not self.upstream.carries(self._sender_text(), *(r.address for r in self.recipients)):
            # Another MX host, say: MAIL and RCPT were judged against the first one's extensions.
            self.broken = "replay: the new upstream connection lacks SMTPUTF8"
            raise SMTPReply(replies.TEMPORARY_FAILURE, self.broken)

    def sender_text(self) -> str:
        return self._sender_text()

    # ----------------------------------------------------------------- DATA

    def begin_data(self) -> None:
        """The client's DATA: when the end of DATA will relay the envelope as it stands (every
        recipient final at RCPT), DATA goes upstream now and its 354 comes while the client
        sends the message (one round trip less after the final dot). Otherwise, or should
        the end of DATA decide differently after all, DATA waits for the decision."""
        if self.broken or self.upstream is None or not self.recipients:
            return
        policy = self.ctx.policy
        if policy.inbound:
            return
        if not policy.observe and not all(r.final_at_rcpt for r in self.recipients):
            return
        self.upstream.begin_data()

    async def start_message(self, head: bytes, headers: HeaderBlock | None = None) -> str | None:
        """The header block is in (``head``, dot-unstuffed, up to and including the empty line
        that ends it): check, decide (links are committed here, before any final dot), replay
        the envelope when it changed, and send DATA and the rewritten header block upstream.

        Returns None when the body may follow (`write_body`, then `end_message`). Raises
        SMTPReply for every refusal: smtpgate's own (the caller aborts then), or the
        upstream's of DATA (the transaction is reset).
        ``headers``: head parsed already; its bare CR, LF and NUL were looked for by the
        caller's data guard (smtpgate.mail.dataguard.StreamGuard) when given.
        """
        if self.broken or self.upstream is None:
            raise SMTPReply(replies.UPSTREAM_LOST, self.broken or "no upstream transaction")
        headers = self._check(head, headers)
        policy = self.ctx.policy
        stamp = policy.check(headers, self.log)
        if stamp.valid:
            # Relayed exactly as received (its Received field added); recipients tagged at RCPT
            # time go back to what the client gave.
            passed = policy.pass_stamped(headers, [r.address for r in self.recipients], self.log,
                                         mail_from=self._sender_text())
            applied = await self._replay(passed)
            message, self._record = self._trace_fields(applied) + head, False
        else:
            decided = await self._timed("store_ms", policy.decide(self.envelope(), headers, self.log,
                                                                  known_links=self.known_links))
            applied = await self._apply(decided)
            if stamp.removals:  # a stamp that does not verify leaves; this message gets its own
                rewrite = dataclasses.replace(applied.rewrite, edits=applied.rewrite.edits + stamp.removals)
                applied = dataclasses.replace(applied, rewrite=rewrite)
            # The trace fields and the edited header block, then the rest of the head as received.
            first, rest = applied.split(head)
            message = self._trace_fields(applied) + self._stamp_field(applied.message_id) + first + head[rest:]
        self._applied, self.size = applied, len(message)
        verdict = await self._timed("upstream_ms", self._upstream_data(self.upstream.open_data(message)))
        if verdict.code == 354:
            return None
        return await self._refused_data(verdict)

    async def _apply(self, decision: LinkDecision) -> LinkDecision:
        """The decision as it goes upstream: observed (observe mode), or replayed."""
        decision = self.ctx.policy.to_apply(decision, self.log, mail_from=self._sender_text())
        if self.ctx.policy.observe:
            return decision
        for rcpt in self.recipients:
            if rcpt.tag_refused:
                decision = decision.without_tag(rcpt.address)
        applied = await self._replay(decision)
        await self._add_shared(applied)
        return applied

    async def write_body(self, wire: bytes | memoryview) -> None:
        """The next piece of the body as the client sent it (dot-stuffed lines)."""
        assert self.upstream is not None
        self.size += len(wire)
        await self._upstream_data(self.upstream.write_data(wire))

    async def end_message(self, last: bytes = b"") -> str:
        """``last`` (the end of the body) and the final dot; the client's reply is the upstream's."""
        assert self.upstream is not None and self._applied is not None
        self.size += len(last)
        verdict = await self._timed("upstream_ms", self._upstream_data(self.upstream.end_data(last)))
        if not verdict.ok:
            return await self._refused_data(verdict)
        applied, upstream_label = self._applied, self.upstream.label
        await self.release(reusable=True)
        if self._record:
            # Queued, not awaited: the client's 250 does not wait for the record's commit
            # (docs/architecture.md, durability); a drain writes what is queued.
            self.ctx.policy.links.record_soon(applied, [r.relayed for r in self.recipients] + self.shared, log=self.log)
        self._log_relayed(applied, upstream_label, verdict, **({} if self._record else {"already_processed": True}))
        log_shared(self.log, applied, self.shared, self.shared_refused, mail_from=self._sender_text())
        return _client_line(verdict)

    async def _refused_data(self, verdict: Verdict) -> NoReturn:
        """The upstream refused DATA or the final dot: the message's refusal, passed to the
        client unchanged (SMTPReply; the front end's error path logs it)."""
        refusal = SMTPReply(replies.Reply.parse(_client_line(verdict)) or replies.TEMPORARY_FAILURE,
                            f"upstream: {verdict.text}", rejects_message=True,
                            message_id=self._applied.message_id if self._applied else None, **self.timings)
        # A refused DATA command or dot leaves MAIL and RCPT open upstream: reset before reuse.
        await self.abort()
        raise refusal

    def _stamp_field(self, message_id: str) -> bytes:
        stamp = self.ctx.policy.stamp
        return b"" if stamp is None else stamp.field(message_id)

    def _check(self, raw: bytes, headers: HeaderBlock | None = None) -> HeaderBlock:
        """The refusals of the data itself (bare CR/LF or NUL, too big); returns the header block."""
        limits = self.ctx.policy.limits
        if len(raw) > limits.max_message_size:
            raise SMTPReply(replies.MESSAGE_TOO_BIG, f"{len(raw)} octets")
        if headers is None:
            problem = scan_data(raw)
            if problem is not None:
                raise SMTPReply(replies.BAD_LINE_ENDINGS, f"{problem.kind} at octet {problem.offset}")
            headers = parse_header_block(raw)
        return headers

    def envelope(self) -> Envelope:
        """This transaction as the link service sees it."""
        return Envelope(
            mail_from=self.mail_from,
            recipients=tuple(EnvelopeRecipient(r.address, tuple(str(p) for p in r.params.values()))
                             for r in self.recipients),
            mail_params=tuple(str(p) for p in self.mail_params.values()),
        )

    def _log_relayed(self, decision: LinkDecision, upstream: str | None, verdict: Verdict, **extra) -> None:
        log_relayed(
            self.log, decision, [(str(r.address), str(r.relayed)) for r in self.recipients],
            shared=self.shared, started=self.started,
            mail_from=self._sender_text(),
            refused=[{"recipient": a, "reply": why} for a, why in self.refused] or None,
            size=self.size,
            upstream=upstream,
            upstream_reply=f"{verdict.code} {verdict.text}",
            upstream_queue_id=queue_id(verdict.text),
            **self.timings,
            **self.client.log_fields(),
            **extra,
        )

    async def _timed(self, key: str, work):
        """Await work, adding the milliseconds it took to timings[key]."""
        started = time.monotonic()
        try:
            return await work
        finally:
            self.timings[key] = round(self.timings.get(key, 0.0) + (time.monotonic() - started) * 1000, 1)

    async def _add_shared(self, decision: LinkDecision) -> None:
        """Inbound sharing: RCPT of each added recipient on the transaction as replayed. The
        upstream's refusal (4xx or 5xx) of one drops it and never fails the message: the
        sender's own recipients are delivered."""
        assert self.upstream is not None
        upstream = self.upstream
        for address in decision.added:
            verdict = await self._upstream_call(upstream.rcpt(str(address), []))
            if verdict.ok:
                self.shared.append(address)
            else:
                self.shared_refused.append((str(address), f"{verdict.code} {verdict.text}"))

    async def _replay(self, decision: LinkDecision) -> LinkDecision:
        """Replay MAIL and the rewritten RCPTs upstream when the envelope changed.

        Returns the decision as relayed: a tag the upstream refused is dropped from it.
        """
        assert self.upstream is not None
        plan = envelope_plan(decision)  # one per recipient, as envelope() gave them
        if all(target == r.relayed for target, r in zip(plan, self.recipients)):
            return decision
        verdict: Verdict | None = None  # RSET's, on the connection that carries on
        if self.upstream.data_begun:
            # DATA went out at the client's DATA: only a new connection takes other recipients.
            await self._new_upstream()
        else:
            verdict = await self._upstream_call(self.upstream.rset())
        upstream = self.upstream
        if verdict is None or verdict.ok:
            verdict = await self._upstream_call(upstream.mail(self._sender_text(), self._mail_params()))
        if not verdict.ok:
            self.broken = f"replay MAIL: {verdict.code} {verdict.text}"
            raise SMTPReply(replies.TEMPORARY_FAILURE, self.broken)
        kept: list[Recipient] = []
        for rcpt, target in zip(self.recipients, plan):
            if target is None:
                continue  # it goes out once, as another recipient
            verdict = await self._replay_rcpt(upstream, rcpt, target)
            if verdict.code >= 500 and target != rcpt.address:
                # The upstream refuses the tag (plus addressing off): delivery matters more.
                self.log.warning("upstream.tag_refused", recipient=str(rcpt.address), tagged=str(target),
                                 reply=f"{verdict.code} {verdict.text}")
                decision = decision.without_tag(rcpt.address)
                verdict = await self._replay_rcpt(upstream, rcpt, rcpt.address)
            if not verdict.ok:
                self.broken = f"replay RCPT {rcpt.relayed}: {verdict.code} {verdict.text}"
                raise SMTPReply(replies.TEMPORARY_FAILURE, self.broken)
            kept.append(rcpt)
        self.recipients = kept
        return decision

    async def _replay_rcpt(self, upstream: UpstreamSession, rcpt: Recipient, address: Address) -> Verdict:
        rcpt.relayed = address
        return await self._upstream_call(upstream.rcpt(str(address), rcpt.upstream_params(upstream.extensions)))

    async def _upstream_data(self, call) -> Verdict:
        """A step of the message's way upstream; a lost upstream is the client's 451 4.4.2."""
        try:
            return await call
        except UpstreamError as exc:
            self.broken = exc.reason
            self.log.warning("upstream.error", stage="data", reason=exc.reason, upstream=self.ctx.pool.label)
            raise SMTPReply(replies.UPSTREAM_LOST, exc.reason) from None

    def _trace_fields(self, decision: LinkDecision) -> bytes:
        """The Received field (RFC 5321 4.4) and, when the message had none, a Message-ID.

        No `for` clause: it would name a recipient's tag to every reader.
        """
        c = self.client
        proto = "ESMTP" + ("S" if c.tls else "") + ("A" if c.authenticated_as else "")  # RFC 3848
        if not c.esmtp:
            proto = "SMTP"  # HELO: RFC 3848 registers no SMTPS/SMTPA
        helo = _safe(c.helo) or "unknown"
        date = _date_now()
        received = (
            f"Received: from {helo} ([{_address_literal(c.ip)}])\r\n"
            f"\tby {self.ctx.hostname} (smtpgate) with {proto} id {c.session_id};\r\n"
            f"\t{date}\r\n"
        )
        if decision.message_id_added:
            received += f"Message-ID: {decision.message_id}\r\n"
        return received.encode("ascii", errors="replace")

    # ----------------------------------------------------------------- end

    def drop(self) -> None:
        """Cancelled while holding the upstream connection (client gone, drain): give it up
        at once, never reused; nothing is awaited, so nothing can stop it half way."""
        upstream, self.upstream = self.upstream, None
        self._drop_early_links()
        if upstream is not None:
            upstream.discard()

    async def release(self, reusable: bool) -> None:
        """Give the upstream connection back (after RSET when the transaction is unfinished)."""
        upstream, self.upstream = self.upstream, None
        self._drop_early_links()
        if upstream is None:
            return
        if self.broken:
            reusable = False
        await upstream.release(reusable)

    async def abort(self) -> None:
        """RSET, QUIT, a dropped client or a refusal: no final dot is ever sent."""
        # Taken out first: whoever takes the connection out of the transaction gives it back,
        # exactly once, whatever else ends the transaction meanwhile.
        upstream, self.upstream = self.upstream, None
        self._drop_early_links()
        if upstream is None:
            return
        reusable = False
        if not self.broken:
            try:
                reusable = (await upstream.rset()).ok
            except UpstreamError:
                reusable = False
            except asyncio.CancelledError:
                upstream.discard()
                raise
        await upstream.release(reusable)


def _retrieved(future: asyncio.Future) -> None:
    """Done callback: the outcome of a future nobody may await is taken, so an unexpected
    exception is not reported as never retrieved (early_links answers store failures)."""
    if not future.cancelled():
        future.exception()


def _client_line(verdict: Verdict) -> str:
    return replies.upstream_line(verdict.code, verdict.text)


def _rcpt_line(verdict: Verdict) -> str:
    """An upstream RCPT verdict for the client: 552 becomes 452 (RFC 5321 4.5.3.1.10)."""
    if verdict.code == 552:
        _, text = replies.split_reply(552, verdict.text.splitlines()[0] if verdict.text else "")
        return f"452 4.5.3 {text or 'Too many recipients'}"
    return replies.upstream_line(verdict.code, verdict.text)


_date_cache: tuple[int, str] = (0, "")


def _date_now() -> str:
    """The RFC 5322 date-time of now, local time, formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, format_datetime(localtime()))
    return _date_cache[1]


def _address_literal(ip: str) -> str:
    """RFC 5321 4.1.3: an IPv6 address literal carries the "IPv6:" tag."""
    return f"IPv6:{ip}" if ":" in ip else ip


_HELO = re.compile(r"[A-Za-z0-9][A-Za-z0-9.\-_]{0,254}|\[[0-9A-Fa-f:.IPv]{1,60}\]")


def _safe(text: str) -> str:
    """The HELO name when it is a domain or an address literal, else "" (Received stays well-formed)."""
    return text if _HELO.fullmatch(text) else ""
