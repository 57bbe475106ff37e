"""What the relay drives an upstream transaction with: `UpstreamSession`, its verdicts and its faults.

`smtpgate.upstream.client.SmtpSession` speaks SMTP to an upstream server;
`smtpgate.upstream.maildir.MaildirSession` writes into a Maildir. A transaction
takes its session from an `UpstreamSource` and gives it back there: the shared
pool (`smtpgate.upstream.client.UpstreamPool`) or one client's own upstream
login (`smtpgate.upstream.passthrough.UserUpstream`). A message goes
upstream whole (`data`) or as a stream (`open_data`, `write_data`, `end_data`):
the header block first, then the body as it arrives from the client, so no more
than a bounded piece of a body is ever held (docs/architecture.md, "Memory").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from smtpgate.config import Upstream
from smtpgate.mail.replies import Reply

__all__ = ["UpstreamAuthError", "UpstreamConnectError", "UpstreamError", "UpstreamSession", "UpstreamSource",
           "Verdict"]


class UpstreamError(Exception):
    """The upstream could not be reached, timed out or dropped the connection.

    `reply`, when set, is what the client should hear instead of the relay's
    default for that stage (a null MX, the connection cap).
    """

    def __init__(self, reason: str, *, reply: Reply | None = None, dropped: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.dropped = dropped  # the connection was closed under the command (not a timeout)


class UpstreamConnectError(UpstreamError):
    """No upstream connection could be had: raised while opening one, by a source's
    `acquire` or by the MAIL that finds its pooled connection dropped and opens another.
    Whenever it comes, the client hears what a MAIL that cannot connect hears."""


class UpstreamAuthError(UpstreamConnectError):
    """The upstream's credentials could not be had (token endpoint) or were refused (AUTH)."""


@dataclass
class Verdict:
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class UpstreamSession:
    """The interface the relay drives; see SmtpSession and MaildirSession."""

    extensions: frozenset[str] = frozenset()
    label: str = ""
    size_limit: int | None = None  # the SIZE the upstream's EHLO declared; None: none

    async def mail(self, sender: str, params: list[str]) -> Verdict: ...
    async def rcpt(self, recipient: str, params: list[str], *, timeout: float | None = None) -> Verdict: ...
    async def rset(self) -> Verdict: ...

    def begin_data(self) -> None:
        """Send DATA now and let `data` (or `open_data`) read its reply: the upstream's 354
        comes while the client still sends the message. Until then the transaction can only
        end with the connection: `rset` answers 421 and `release` closes it unused."""

    @property
    def data_begun(self) -> bool:
        """DATA was sent by begin_data and its reply is not taken yet."""
        return False

    async def open_data(self, head: bytes) -> Verdict:
        """DATA (or begin_data's reply), then ``head``: the start of the message, CRLF line
        ends, ending at a line's end, as it is to be delivered (it may wait to go with what
        follows, so a small message takes one write). On 354 the rest follows as wire
        data (`write_data`) and `end_data` sends the final dot; until then `rset` and `release`
        abandon the message with the connection (no final dot). Any other verdict is DATA's
        refusal: the transaction is as a refused `data` leaves it."""
        raise NotImplementedError

    async def write_data(self, wire: bytes | memoryview) -> None:
        """The next piece of the message as SMTP carries it: dot-stuffed CRLF lines, as a
        client sent them. Returns once the upstream has room for more; UpstreamError when
        it is gone."""
        raise NotImplementedError

    async def end_data(self, last: bytes = b"") -> Verdict:
        """``last`` (wire data, as write_data takes it), the final dot (the message ended at a
        line's end) and the upstream's verdict."""
        raise NotImplementedError

    def carries(self, *addresses: object) -> bool:
        """Whether this connection can carry these envelope addresses: a non-ASCII one
        needs the upstream's SMTPUTF8 (RFC 6531)."""
        return "smtputf8" in self.extensions or all(str(a).isascii() for a in addresses)

    async def release(self, reusable: bool) -> None:
        """Back to where it came from: kept for the next transaction when ``reusable``
        (the transaction ended cleanly, RSET answered 2xx), else closed."""

    def discard(self) -> None:
        """Give the connection up at once, never to be reused: what a transaction cancelled
        while it holds one does (synchronous, so a second cancellation cannot stop it half way)."""


class UpstreamSource(ABC):
    """Where a transaction's upstream session comes from and goes back to.

    The relay asks only this: `acquire` a session ready for MAIL, the upstream's
    `label` for the logs, the `extensions` learnt from its last connection. A
    session goes back through its own `release` and `discard`, which call
    `give_back` and `forget` on the source that handed it out.
    """

    config: Upstream  # the upstream section (timeouts, label)
    extensions: frozenset[str] | None = None  # learnt from the last connection; None: none yet

    @property
    def label(self) -> str:
        """The upstream as the logs name it."""
        return self.config.label

    @abstractmethod
    async def acquire(self) -> UpstreamSession:
        """A session ready for MAIL; UpstreamConnectError when no connection can be had."""

    @abstractmethod
    async def give_back(self, session, reusable: bool) -> None:
        """A session this source handed out is back (its `release`): kept when reusable, else closed."""

    @abstractmethod
    def forget(self, session) -> None:
        """A session this source handed out is closing: its connection is no longer counted."""

    @abstractmethod
    async def close(self) -> None:
        """Nothing more is handed out; idle connections close."""
