"""Every SMTP reply smtpgate makes up itself, in one place.

A reply is (code, enhanced status code, client text). `SMTPReply` also carries
the internal reason that goes to the log and never to the client, so an
internal fault cannot leak through a reply line.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def line(self) -> str:
        return " ".join(part for part in (str(self.code), self.enhanced, self.text) if part)

    @property
    def wording(self) -> str:
        """The line without its code: what a refusal passed on is logged with as its reason."""
        return " ".join(part for part in (self.enhanced, self.text) if part)

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @classmethod
    def parse(cls, line: str) -> Reply | None:
        """A one-line reply someone else worded (the upstream's, aiosmtpd's own), read once
        where it enters: its line() is `line` again. None when it does not start with a code."""
        code = reply_code(line)
        if code is None:
            return None
        rest = line[4:]
        enhanced, _, text = rest.partition(" ")
        reply = cls(code, enhanced, text)
        if not (enhanced and _is_enhanced(enhanced, code)) or reply.line() != line:
            reply = cls(code, "", rest)
        return reply


class SMTPReply(Exception):
    """An SMTP failure with its client face (reply) and its log face (reason)."""

    def __init__(self, reply: Reply, reason: str | None = None, *, rejects_message: bool = False,
                 **log_fields: object):
        super().__init__(reason or reply.text)
        self.reply = reply
        self.reason = reason or reply.text
        # It refuses the message (logged message.rejected), not only the command (command.refused).
        self.rejects_message = rejects_message
        self.log_fields = log_fields

    def line(self) -> str:
        return self.reply.line()


# RFC 4954 section 6: MAIL without the needed authentication.
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
# RFC 3463 5.7.1: relaying denied.
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
# RFC 3463 5.7.1 (delivery not authorized): the authenticated user's sender list
# (users_file) does not name the envelope sender or the From: address.
SENDER_NOT_ALLOWED = Reply(550, "5.7.1", "Sender address not allowed for this login")
# RFC 3463 5.7.1 (delivery not authorized): the message lacks a listener's required_headers
# value (a connector peer's tenant ID): not this organisation's mail.
NOT_ACCEPTED_SENDER_ORGANISATION = Reply(550, "5.7.1", "Message not accepted from this organisation")
# RFC 5321 4.5.3.1.10 and 3.3: too many recipients is temporary for the client.
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
# RFC 3463 4.4.1: no answer from host.
UPSTREAM_UNREACHABLE = Reply(451, "4.4.1", "Upstream mail server not reachable, try again later")
# RFC 3463 4.4.2: bad connection (dropped or timed out after the dot).
UPSTREAM_LOST = Reply(451, "4.4.2", "Connection to the upstream mail server lost, try again later")
# RFC 3463 X.7.0 (other or undefined security status), temporary as RFC 4954 6 makes a
# temporary authentication failure: smtpgate's own credentials for the upstream (an OAuth2
# token from the token endpoint, a password) could not be had or were refused.
UPSTREAM_AUTH_FAILED = Reply(451, "4.7.0", "Upstream authentication failed, try again later")
# RFC 3463 4.4.5: mail system congestion (upstream.max_connections upstream connections are open).
UPSTREAM_BUSY = Reply(451, "4.4.5", "Too many upstream connections, try again later")
# RFC 3463 4.4.3: directory server failure (the upstream domain's MX could not be looked up).
UPSTREAM_DNS_FAILURE = Reply(451, "4.4.3", "Upstream mail server could not be looked up, try again later")
# RFC 3463 4.4.4: unable to route (the upstream domain has no MX and no address, or no such domain).
# Temporary: it is the configured relay target, and a DNS mistake there is fixed, not bounced.
UPSTREAM_NO_ROUTE = Reply(451, "4.4.4", "No route to the upstream mail server, try again later")
# RFC 7505 section 4.1 and RFC 7504 (556): the upstream domain publishes a null MX, it accepts no mail.
NULL_MX = Reply(556, "5.1.10", "The upstream mail domain accepts no mail (null MX)")
# RFC 4954 6: the credentials could not be checked now (auth_backend: upstream, upstream unreachable).
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure")
# RFC 3463 4.3.0: other or undefined mail system status (store, allocator, internal fault).
TEMPORARY_FAILURE = Reply(451, "4.3.0", "Temporary failure, try again later")
# Smuggling defence (bare CR/LF, NUL): RFC 5321 2.3.8 and 4.1.4.
BAD_LINE_ENDINGS = Reply(550, "5.5.2", "Bare CR, bare LF or NUL in message data refused")
# RFC 5321 6.3: mail loop.
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops, mail loop suspected")
# RFC 1870: message size exceeds fixed maximum.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
# limits.max_header_block: the header block is held whole to decide, so it is bounded.
HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header block exceeds fixed maximum size")
# RFC 5321 4.5.3.1.6: line length limit.
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
# RFC 5321 3.3 / RFC 3463 5.1.3 and 5.1.7: bad destination/sender address syntax.
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
# RFC 5321 4.2.4 / RFC 1869: parameter not recognised.
BAD_PARAMETER = Reply(555, "5.5.4", "Parameter not recognized or not implemented")
BAD_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
# RFC 4954 4: AUTH where the listener offers none, or inside a mail transaction.
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available on this listener")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
# RFC 3207 4: STARTTLS in a session that is encrypted already (STARTTLS done, or implicit TLS).
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
# RFC 3030/6531: the upstream cannot carry what the message needs.
SMTPUTF8_UNSUPPORTED = Reply(553, "5.6.7", "SMTPUTF8 not supported by the upstream")
# RFC 2034 codes for the plain OKs.
OK = Reply(250, "2.0.0", "OK")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
# RFC 5321 4.5.3.2.7: a server may close a silent client (limits.idle_timeout); 421 says so first.
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
# RFC 3463 4.7.0 (other security status), 421 as RFC 5321 3.8: the client's address has
# limits.max_connections_per_client sessions open already.
TOO_MANY_FROM_CLIENT = Reply(421, "4.7.0", "Too many connections from your address, try again later")
# limits.max_bad_commands unknown or malformed commands in one session.
TOO_MANY_BAD_COMMANDS = Reply(421, "4.7.0", "Too many bad commands, closing connection")


def split_reply(code: int, message: str) -> tuple[str | None, str]:
    """Split an upstream reply's text into (enhanced status code, rest)."""
    parts = message.split(None, 1)
    if parts and _is_enhanced(parts[0], code):
        return parts[0], parts[1] if len(parts) > 1 else ""
    return None, message


def reply_code(line: str) -> int | None:
    """The code of a reply line, as `Reply.parse` reads it, without reading the rest."""
    code = line[:3]
    if len(line) > 3 and line[3] != " ":
        return None
    return int(code) if len(code) == 3 and code.isdigit() else None


def _is_enhanced(token: str, code: int) -> bool:
    bits = token.split(".")
    return (
        len(bits) == 3
        and all(b.isdigit() for b in bits)
        and bits[0] == str(code)[0]
    )


def upstream_line(code: int, message: str) -> str:
    """An upstream reply as one line for the client, multi-line text folded to its first line.

    aiosmtpd pushes a single status line; a multi-line upstream reply keeps its
    first line, which carries the code and enhanced code.
    """
    first = message.splitlines()[0] if message else ""
    enhanced, rest = split_reply(code, first)
    if enhanced is None:
        enhanced = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "")
        rest = first
    return f"{code} {enhanced} {rest}".rstrip()
