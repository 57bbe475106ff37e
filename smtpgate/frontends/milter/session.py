"""One milter connection from Postfix: negotiation, the envelope and header, the decision at end of message.

`MilterSession.handle` takes the codec's events one at a time and returns the
packets to answer with. It builds the front-end-neutral Envelope from MAIL,
RCPT and the macros, the header block from the header events, calls the link
service at end of message and applies its decision as milter modification
requests: DELRCPT of each rewritten recipient spelled as Postfix gave it,
ADDRCPT_PAR of its target with the original's NOTIFY and ORCPT, CHGHEADER per
header edit, ADDHEADER of a Message-ID the message lacked, then ACCEPT.
Commands out of order raise ProtocolError; the server answers TEMPFAIL and
closes the connection. See docs/milter.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from smtpgate.config import Config, Listener
from smtpgate.frontends.milter import codec
from smtpgate.frontends.milter.codec import ProtocolError
from smtpgate.frontends.policy import MessagePolicy, envelope_plan, log_relayed, log_shared
from smtpgate.linking.decision import ClientInfo, Envelope, EnvelopeRecipient, LinkDecision
from smtpgate.linking.service import LinkService
from smtpgate.mail import replies
from smtpgate.mail.addresses import Address, AddressError, parse_path
from smtpgate.mail.headers import parse_header_block
from smtpgate.mail.params import xtext
from smtpgate.mail.replies import SMTPReply
from smtpgate.mail.stamp import StampCheck

# What smtpgate asks of the MTA (docs/milter.md, "Negotiation"): recipients and
# header fields changed, a missing Message-ID added, its own macro lists.
WANTED_ACTIONS = (codec.SMFIF_ADDRCPT | codec.SMFIF_ADDRCPT_PAR | codec.SMFIF_DELRCPT
                  | codec.SMFIF_CHGHDRS | codec.SMFIF_ADDHDRS | codec.SMFIF_SETSYMLIST)
# Without these the decision cannot be applied: smtpgate refuses the connection.
NEEDED_ACTIONS = codec.SMFIF_DELRCPT | codec.SMFIF_CHGHDRS
# The decision reads the header block only: no body, DATA or unknown commands;
# no reply to the events that smtpgate never refuses (fewer round trips);
# header values with their leading white space, so edits keep every octet.
WANTED_STEPS = (codec.SMFIP_NOBODY | codec.SMFIP_NODATA | codec.SMFIP_NOUNKNOWN | codec.SMFIP_HDR_LEADSPC
                | codec.SMFIP_NR_CONN | codec.SMFIP_NR_HELO | codec.SMFIP_NR_MAIL | codec.SMFIP_NR_RCPT
                | codec.SMFIP_NR_HDR | codec.SMFIP_NR_EOH)
# The macros smtpgate reads, asked for per stage (SETSYMLIST), whatever main.cf lists.
MACRO_LISTS = {
    codec.SMFIM_CONNECT: "{client_addr}",
    codec.SMFIM_HELO: "{tls_version} {cipher}",
    codec.SMFIM_ENVFROM: "i {auth_authen}",
    codec.SMFIM_EOM: "i",
}
PROTOCOL_VERSION = 6

# The step bit that says no reply is sent for an event (codec events by class).
_NO_REPLY = {
    codec.Connect: codec.SMFIP_NR_CONN,
    codec.Helo: codec.SMFIP_NR_HELO,
    codec.Mail: codec.SMFIP_NR_MAIL,
    codec.Rcpt: codec.SMFIP_NR_RCPT,
    codec.Data: codec.SMFIP_NR_DATA,
    codec.Header: codec.SMFIP_NR_HDR,
    codec.EndOfHeaders: codec.SMFIP_NR_EOH,
    codec.Body: codec.SMFIP_NR_BODY,
    codec.Unknown: codec.SMFIP_NR_UNKN,
}
# Events as the protocol names them, for errors and logs.
_COMMAND = {
    codec.Negotiate: "OPTNEG", codec.Macros: "MACRO", codec.Connect: "CONNECT", codec.Helo: "HELO",
    codec.Mail: "MAIL", codec.Rcpt: "RCPT", codec.Data: "DATA", codec.Header: "HEADER",
    codec.EndOfHeaders: "EOH", codec.Body: "BODY", codec.EndOfMessage: "EOM", codec.Abort: "ABORT",
    codec.Quit: "QUIT", codec.QuitNewConnection: "QUIT_NC", codec.Unknown: "UNKNOWN",
}
# RCPT parameters Postfix takes in ADDRCPT_PAR (it ignores others with a warning).
_KEPT_RCPT_PARAMS = ("NOTIFY=", "ORCPT=")


@dataclass(frozen=True)
class MilterSettings:
    """What a milter session uses, from one configuration snapshot."""

    policy: MessagePolicy
    listener: str

    @classmethod
    def for_listener(cls, links: LinkService, config: Config, listener: Listener) -> MilterSettings:
        return cls(policy=MessagePolicy.for_listener(links, config, listener), listener=listener.name)


@dataclass
class _Recipient:
    spelled: str  # the path exactly as Postfix gave it: DELRCPT must match it octet for octet
    params: tuple[str, ...]
    address: Address | None  # None: not a path smtpgate parses; passed through untouched


@dataclass
class _Message:
    mail: tuple[str, ...]
    recipients: list[_Recipient] = field(default_factory=list)
    fields: list[bytes] = field(default_factory=list)
    header_octets: int = 0
    headers_done: bool = False
    started: float = field(default_factory=time.monotonic)


class MilterSession:
    """The protocol state of one MTA connection and the message in it."""

    def __init__(self, settings: MilterSettings, *, session_id: str, log) -> None:
        self.settings = settings
        self.session_id = session_id
        self.log = log
        self.negotiated = False
        self.actions = 0
        self.steps = 0
        self.connected = False
        self.connect_address: str | None = None
        self.helo = ""
        self.macros: dict[str, str] = {}
        self.message: _Message | None = None
        self.finished = False  # QUIT: the MTA closes the connection
        self.messages = 0

    @property
    def busy(self) -> bool:
        """A message is on its way (a drain waits for it)."""
        return self.message is not None

    # ----------------------------------------------------------------- dispatch

    async def handle(self, event: codec.Event) -> list[bytes]:
        """The packets that answer ``event``; ProtocolError when it is out of order."""
        if isinstance(event, codec.Negotiate):
            return [self._negotiate(event)]
        if not self.negotiated:
            raise ProtocolError(f"{_COMMAND[type(event)]} before option negotiation")
        if isinstance(event, codec.Macros):
            self.macros.update((_macro_name(k), v) for k, v in event.values)
            return []
        if isinstance(event, codec.Abort):
            self.message = None
            return []
        if isinstance(event, codec.Quit):
            self.message, self.finished = None, True
            return []
        if isinstance(event, codec.QuitNewConnection):
            self._reset_connection()
            return []
        if isinstance(event, codec.Connect):
            self._connect(event)
        elif not self.connected:
            raise ProtocolError(f"{_COMMAND[type(event)]} before CONNECT")
        elif isinstance(event, codec.Helo):
            self.helo = event.name
        elif isinstance(event, codec.Mail):
            self._mail(event)
        elif isinstance(event, codec.Unknown):
            pass
        elif self.message is None:
            raise ProtocolError(f"{_COMMAND[type(event)]} outside a message (before MAIL)")
        elif isinstance(event, codec.EndOfMessage):
            return await self._end_of_message()
        elif isinstance(event, codec.Rcpt):
            refusal = self._rcpt(self.message, event)
            if refusal is not None:
                return [refusal]
        else:
            self._in_message(self.message, event)
        return [] if self.steps & _NO_REPLY[type(event)] else [codec.CONTINUE]

    def _negotiate(self, offer: codec.Negotiate) -> bytes:
        if self.negotiated:
            raise ProtocolError("a second OPTNEG")
        if offer.version < 2:
            raise ProtocolError(f"MTA protocol version {offer.version}: 2 or later needed")
        missing = NEEDED_ACTIONS & ~offer.actions
        if missing or not offer.actions & (codec.SMFIF_ADDRCPT | codec.SMFIF_ADDRCPT_PAR):
            raise ProtocolError(f"MTA offers actions {offer.actions:#x}: DELRCPT, CHGHEADER and "
                                "ADDRCPT or ADDRCPT_PAR needed")
        self.actions = offer.actions & WANTED_ACTIONS
        # Inbound refuses recipients in other domains at RCPT: RCPT needs its reply.
        wanted = WANTED_STEPS & ~codec.SMFIP_NR_RCPT if self.settings.policy.inbound else WANTED_STEPS
        self.steps = offer.protocol & wanted
        self.negotiated = True
        macros = MACRO_LISTS if self.actions & codec.SMFIF_SETSYMLIST else None
        self.log.debug("milter.negotiated", version=min(offer.version, PROTOCOL_VERSION),
                       actions=f"{self.actions:#x}", steps=f"{self.steps:#x}")
        return codec.encode_negotiate(min(offer.version, PROTOCOL_VERSION), self.actions, self.steps, macros)

    def _reset_connection(self) -> None:
        self.connected, self.message, self.helo = False, None, ""
        self.connect_address = None
        self.macros.clear()

    def _connect(self, event: codec.Connect) -> None:
        if self.connected:
            raise ProtocolError("a second CONNECT")
        self.connected = True
        self.connect_address = event.address if event.family in "46" else None
        self.log = self.log.bind(client_ip=self._client_ip())

    def _mail(self, event: codec.Mail) -> None:
        if self.message is not None:
            raise ProtocolError("MAIL inside a message (no ABORT after the last)")
        self.message = _Message(mail=event.args)

    def _rcpt(self, message: _Message, event: codec.Rcpt) -> bytes | None:
        """Keep the recipient; inbound, refuse one outside the internal domains (the REPLYCODE)."""
        if message.headers_done or message.fields:
            raise ProtocolError("RCPT after the header")
        path, params = event.args[0], event.args[1:]
        address = _parse(path)
        policy = self.settings.policy
        if policy.inbound and address is not None and not policy.links.directory.is_internal(address):
            # An inbound listener serves the mailbox server only; it never relays out.
            return self._refuse(replies.RELAY_DENIED, "inbound listener: not an internal domain",
                                {"recipient": str(address)}, command="rcpt")
        message.recipients.append(_Recipient(path, params, address))
        return None

    def _in_message(self, message: _Message, event: codec.Event) -> None:
        if isinstance(event, codec.Header):
            if message.headers_done:
                raise ProtocolError("HEADER after the end of the header")
            self._header(message, event)
        elif isinstance(event, codec.EndOfHeaders):
            if message.headers_done:
                raise ProtocolError("a second end of header")
            message.headers_done = True
        elif isinstance(event, codec.Body):
            # Asked for no body; an MTA that sends it anyway gets it ignored.
            message.headers_done = True
        # Data needs nothing: the header events follow.

    def _header(self, message: _Message, event: codec.Header) -> None:
        """Keep the field as it is in the message: Postfix joins its lines with LF, the wire has CRLF."""
        value = event.value
        if not self.steps & codec.SMFIP_HDR_LEADSPC:
            value = b" " + value  # the MTA ate one space after the colon
        raw = event.name.encode("utf-8", "surrogateescape") + b":" + value.replace(b"\n", b"\r\n") + b"\r\n"
        message.header_octets += len(raw)
        if message.header_octets <= self.settings.policy.limits.max_message_size:
            message.fields.append(raw)

    # ----------------------------------------------------------------- end of message

    async def _end_of_message(self) -> list[bytes]:
        message, self.message = self.message, None
        assert message is not None
        self.messages += 1
        mail_from = message.mail[0] if message.mail else ""
        client = self._client()
        fields = dict(queue_id=self.macros.get("i"), mail_from=_bare(mail_from), **client.log_fields())
        policy = self.settings.policy
        if message.header_octets > policy.limits.max_message_size:
            return [self._refuse(replies.MESSAGE_TOO_BIG, f"header of {message.header_octets} octets", fields)]
        headers = parse_header_block(b"".join(message.fields) + b"\r\n")
        envelope = self._envelope(message)
        try:
            stamp = policy.check(headers, self.log)
        except SMTPReply as exc:
            return [self._refuse(exc.reply, exc.reason, fields)]
        if stamp.valid:
            decision = policy.pass_stamped(headers, envelope.addresses, self.log, **fields)
            self._log_relayed(message, decision, fields, already_processed=True)
            return [codec.ACCEPT]
        try:
            decision = await policy.decide(envelope, headers, self.log)
        except SMTPReply as exc:
            return [self._refuse(exc.reply, exc.reason, fields)]
        except Exception:  # noqa: BLE001 - an internal fault is a temporary failure, never an accept
            return [self._refuse(replies.TEMPORARY_FAILURE, "internal error", fields, internal=True)]
        decision = policy.to_apply(decision, self.log, **fields)
        packets, relayed = self._apply(message, decision, stamp)
        delivered = [a for a in relayed if isinstance(a, Address)] + list(decision.added)
        await policy.links.record(decision, delivered, log=self.log)
        self._log_relayed(message, decision, fields, relayed)
        log_shared(self.log, decision, decision.added, [], **fields)  # ADDRCPT has no verdict: a refused one bounces
        return [*packets, codec.ACCEPT]

    def _log_relayed(self, message: _Message, decision: LinkDecision, fields: dict, relayed: list | None = None,
                     **extra) -> None:
        """message.relayed: each recipient as Postfix gave it and as relayed (None: sent once,
        as another; ``relayed`` None: every one as given)."""
        if relayed is None:
            relayed = [r.address or r.spelled for r in message.recipients]
        recipients = [(_shown(r.address or r.spelled), _shown(a)) for r, a in zip(message.recipients, relayed)]
        log_relayed(self.log, decision, recipients, shared=decision.added, started=message.started, **fields,
                    **extra)

    def _refuse(self, reply: replies.Reply, reason: str, fields: dict, *, command: str | None = None,
                internal: bool = False) -> bytes:
        """The one way a refusal reaches the MTA: logged once (message.rejected; command.refused
        for one `command`; `internal`: a fault, with its traceback), and its REPLYCODE."""
        if command is not None:
            self.log.info("command.refused", code=reply.code, reason=reason, stage=command, **fields)
        elif internal:
            self.log.exception("message.rejected", code=reply.code, reason=reason, **fields)
        else:
            self.log.info("message.rejected", code=reply.code, reason=reason, **fields)
        return codec.encode_reply_code(reply.line())

    def _client_ip(self) -> str:
        return self.macros.get("client_addr") or self.connect_address or "?"

    def _client(self) -> ClientInfo:
        """The SMTP client as Postfix's macros describe it."""
        tls = self.macros.get("tls_version")
        cipher = " ".join(v for v in (tls, self.macros.get("cipher")) if v)
        return ClientInfo(
            session_id=self.session_id,
            ip=self._client_ip(),
            helo=self.helo,
            authenticated_as=self.macros.get("auth_authen") or None,
            tls=bool(tls),
            listener=self.settings.listener,
            tls_cipher=cipher or None,
        )

    @staticmethod
    def _envelope(message: _Message) -> Envelope:
        return Envelope(
            mail_from=_parse(message.mail[0]) if message.mail else None,
            recipients=tuple(EnvelopeRecipient(r.address, r.params) for r in message.recipients
                             if r.address is not None),
            mail_params=message.mail[1:],
        )

    def _apply(self, message: _Message, decision: LinkDecision, stamp: StampCheck) -> tuple[list[bytes], list]:
        """The modification requests for ``decision`` and what each recipient became.

        Returns (packets, per recipient: the Address relayed, None when it goes out once as
        another recipient, or its spelling when smtpgate cannot parse it and leaves it alone).
        """
        plan = iter(envelope_plan(decision))  # one per parsed recipient, as the envelope has them
        deletes: list[bytes] = []
        adds: list[bytes] = []
        relayed: list = []
        for rcpt in message.recipients:
            if rcpt.address is None:
                relayed.append(rcpt.spelled)
                continue
            target = next(plan)
            relayed.append(target)
            if target == rcpt.address:
                continue
            deletes.append(codec.encode_delete_recipient(rcpt.spelled))
            if target is not None:
                params = self._params(rcpt) if self.actions & codec.SMFIF_ADDRCPT_PAR else None
                adds.append(codec.encode_add_recipient(f"<{target}>", params))
        for address in decision.added:  # inbound sharing: envelope only, no parameters of its own
            adds.append(codec.encode_add_recipient(f"<{address}>", None if self.actions & codec.SMFIF_ADDRCPT else ""))
        # A removal is CHGHEADER with an empty value, which deletes the field.
        edits = [self._change_header(e.name, e.index, e.new or b"") for e in (*decision.rewrite.edits, *stamp.removals)]
        if decision.message_id_added and self.actions & codec.SMFIF_ADDHDRS:
            edits.append(codec.encode_add_header("Message-ID", self._value(f" {decision.message_id}".encode())))
        stamper = self.settings.policy.stamp
        if stamper is not None and self.actions & codec.SMFIF_ADDHDRS:
            edits.append(codec.encode_add_header(stamper.header, self._value(stamper.value(decision.message_id))))
        return [*deletes, *adds, *edits], relayed

    @staticmethod
    def _params(rcpt: _Recipient) -> str:
        """NOTIFY and ORCPT as the client gave them; an ORCPT naming the original when it gave none."""
        kept = [p for p in rcpt.params if p.upper().startswith(_KEPT_RCPT_PARAMS)]
        if not any(p.upper().startswith("ORCPT=") for p in kept):
            kept.append(f"ORCPT=rfc822;{xtext(str(rcpt.address))}")
        return " ".join(kept)

    def _change_header(self, name: str, index: int, new: bytes) -> bytes:
        return codec.encode_change_header(index, name, self._value(new))

    def _value(self, raw: bytes) -> bytes:
        """A field value as the MTA takes it: lines joined by LF, no final line end."""
        value = raw.removesuffix(b"\r\n").replace(b"\r\n", b"\n")
        if not self.steps & codec.SMFIP_HDR_LEADSPC and value.startswith(b" "):
            value = value[1:]  # the MTA puts one space after the colon itself
        return value


def _macro_name(name: str) -> str:
    """``{i}`` and ``i`` are one macro."""
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


def _parse(path: str) -> Address | None:
    try:
        return parse_path(path)
    except AddressError:
        return None


def _bare(path: str) -> str:
    return path[1:-1] if path.startswith("<") and path.endswith(">") else path


def _shown(value: Address | str | None) -> str | None:
    if isinstance(value, str):
        return _bare(value)
    return None if value is None else str(value)

