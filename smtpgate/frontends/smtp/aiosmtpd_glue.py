"""Every use of aiosmtpd internals, in one place (docs/architecture.md, "aiosmtpd").

aiosmtpd has public handler hooks for EHLO, DATA, AUTH and PROXY, but none for
"a connection is about to be served", "the transaction ended" (HELO, EHLO,
RSET, or aiosmtpd refusing the data itself), "TLS is on", "the client was
silent too long" or "a command nobody knows"; smtpgate needs them all.
`GlueSMTP` overrides the private methods behind them and turns them into the
hooks `before_serving`, `transaction_ended`, `timed_out`, `unknown_command`
and the `tls_active` property. `check_internals` fails loudly when an aiosmtpd release renames
them; a test runs it, and pyproject.toml pins aiosmtpd to the tested minor
range.

`PrototypeSMTP` (GlueSMTP's base) spares each connection aiosmtpd's
`SMTP.__init__`, which derives its command, hook and AUTH mechanism tables
from the class and the handler with `inspect.getmembers` and `dir` (and
inspects the EHLO hook's signature) every time a client connects: about a
millisecond of CPU per connection, the same result every time.
The stock `__init__` runs once per (class, handler, loop, settings) on a
prototype that never serves a connection; a new connection copies the
prototype's attributes, binds the prototype's own methods to itself, and
gets a fresh stream reader, exactly as `__init__` would have left it.
"""

from __future__ import annotations

import asyncio
import inspect
import types
import weakref
from functools import partial
from typing import Any

from aiosmtpd.smtp import SMTP, _AuthMechAttr, syntax

from smtpgate.mail import replies

__all__ = ["AIOSMTPD_REPLIES", "DATA_REFUSALS", "GlueSMTP", "PrototypeSMTP", "check_internals"]

# The private aiosmtpd members smtpgate relies on, and the kind each must be.
_INTERNALS = {
    "_handle_client": "coroutine",
    "_set_rset_state": "function",
    "_set_post_data_state": "function",
    "_reset_timeout": "function",
    "_timeout_cb": "function",
    "_cb_client_connected": "function",  # PrototypeSMTP hands it to a fresh StreamReaderProtocol
}

# What SMTP.__init__ builds per connection that PrototypeSMTP copies and rebinds.
_PER_CONNECTION_TABLES = ("self._smtp_methods", "self._auth_methods", "self._handle_hooks",
                          "self.command_size_limits.clear()")

# aiosmtpd's own reply lines, translated to smtpgate's (code, enhanced code, text).
AIOSMTPD_REPLIES = {
    "552 Error: Too much mail data": replies.MESSAGE_TOO_BIG.line(),
    "500 Line too long (see RFC5321 4.5.3.1.6)": replies.LINE_TOO_LONG.line(),
    "503 Error: need RCPT command": replies.NO_VALID_RECIPIENTS.line(),
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: send HELO first": "503 5.5.1 Error: send HELO first",
    "500 Command line too long": "500 5.5.6 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Error: strict ASCII mode": "500 5.6.7 Error: non-ASCII without SMTPUTF8",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 OK",
}

# aiosmtpd's refusals of the message data itself: each is the message's one message.rejected.
DATA_REFUSALS = {
    "552 Error: Too much mail data": "data over limits.max_message_size",
    "500 Line too long (see RFC5321 4.5.3.1.6)": "line over 1000 octets",
}


def check_internals() -> list[str]:
    """The aiosmtpd internals smtpgate uses that are missing or changed; empty when all is well."""
    problems = []
    for name, kind in _INTERNALS.items():
        member = getattr(SMTP, name, None)
        if member is None:
            problems.append(f"aiosmtpd.smtp.SMTP.{name} is gone")
        elif kind == "coroutine" and not inspect.iscoroutinefunction(member):
            problems.append(f"aiosmtpd.smtp.SMTP.{name} is no longer a coroutine function")
        elif kind == "function" and not callable(member):
            problems.append(f"aiosmtpd.smtp.SMTP.{name} is no longer callable")
    source = inspect.getsource(inspect.getmodule(SMTP))
    init = inspect.getsource(SMTP.__init__)
    for table in _PER_CONNECTION_TABLES:
        if table not in init:
            problems.append(f"aiosmtpd.smtp.SMTP.__init__ no longer sets up {table}")
    if "method" not in getattr(_AuthMechAttr, "_fields", ()):
        problems.append("aiosmtpd.smtp._AuthMechAttr no longer has a method field")
    if "self._tls_protocol" not in source:
        problems.append("aiosmtpd.smtp.SMTP no longer keeps _tls_protocol")
    if "method = self._smtp_methods.get(command)" not in source:
        problems.append("aiosmtpd.smtp.SMTP no longer looks commands up in _smtp_methods")
    for line in AIOSMTPD_REPLIES:
        written = line.replace("send HELO first", "send {helo} first")  # an f-string there
        if not any(f"{q}{written}{q}" in source for q in ("'", '"')):
            problems.append(f"aiosmtpd no longer replies {line!r}")
    return problems


# handler -> {(class, loop, settings): prototype}; a handler that goes (a stopped
# gate) takes its prototypes with it, and a reload's new settings replace the oldest.
_PROTOTYPES: weakref.WeakKeyDictionary[Any, dict[tuple, SMTP]] = weakref.WeakKeyDictionary()
_PROTOTYPES_PER_HANDLER = 8


class PrototypeSMTP(SMTP):
    """aiosmtpd.smtp.SMTP whose per-connection set-up is a copy of a prototype."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        loop = kwargs.get("loop") or asyncio.get_event_loop()
        try:
            key = (type(self), loop, tuple(sorted(kwargs.items())))
            prototypes = _PROTOTYPES.setdefault(handler, {})
            prototype = prototypes.get(key)
        except TypeError:  # a setting that cannot be a key: the stock way
            super().__init__(handler, **kwargs)
            return
        if prototype is None:
            prototype = object.__new__(type(self))
            SMTP.__init__(prototype, handler, **kwargs)
            if len(prototypes) >= _PROTOTYPES_PER_HANDLER:
                del prototypes[next(iter(prototypes))]
            prototypes[key] = prototype
        self._adopt(prototype)

    def _adopt(self, prototype: SMTP) -> None:
        for name, value in prototype.__dict__.items():
            if name not in self.__dict__:  # what a subclass set before calling us stays
                self.__dict__[name] = _rebound(value, prototype, self)
        # SMTP.__init__ empties the (class-wide) command size limits each time.
        self.command_size_limits.clear()
        # A fresh stream reader and protocol state, as StreamReaderProtocol.__init__ makes them.
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )


def _rebound(value: Any, old: object, new: object) -> Any:
    """value with the methods bound to old bound to new instead (in dicts and AUTH entries too)."""
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, _AuthMechAttr):
        return value._replace(method=_rebound(value.method, old, new))
    if isinstance(value, dict):
        return {k: _rebound(v, old, new) for k, v in value.items()}
    return value


class _Commands(dict):
    """aiosmtpd's command table, answering every verb: an unknown one goes to `unknown`.

    aiosmtpd closes a session after five unknown verbs with a 502 of its own; smtpgate
    counts them with its other bad commands against limits.max_bad_commands instead.
    """

    def __init__(self, table: dict, unknown) -> None:
        super().__init__(table)
        self.unknown = unknown

    def get(self, verb, default=None):
        found = super().get(verb)
        return found if found is not None else partial(self.unknown, verb)


class GlueSMTP(PrototypeSMTP):
    """aiosmtpd's protocol with the hooks smtpgate needs; see the module docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._smtp_methods = _Commands(self._smtp_methods, self.unknown_command)
        self.receiving_data = False  # between DATA's 354 and the final dot

    async def unknown_command(self, verb: str, arg: str | None) -> None:
        """A verb aiosmtpd does not know (HELP's lookup of one never gets here: no syntax)."""
        await self.push(f'500 5.5.2 Error: command "{verb}" not recognized')

    def timed_out(self) -> None:
        """limits.idle_timeout passed without a command (or message data); the default closes."""
        super()._timeout_cb()

    def restart_timer(self) -> None:
        self._reset_timeout()

    def _timeout_cb(self) -> None:
        self.timed_out()

    def data_received(self, data: bytes) -> None:
        # Message data is not a command, so aiosmtpd would not restart the timer for it; a
        # big message on a slow link must not time out while its bytes keep coming.
        if self.receiving_data:
            self._reset_timeout()
        super().data_received(data)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        self.receiving_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.receiving_data = False

    async def before_serving(self) -> bool:
        """Called before the greeting; False closes the connection (the hook pushed a reply)."""
        return True

    def transaction_ended(self) -> None:
        """HELO, EHLO, RSET, or a refusal of the data: the transaction is over."""

    @property
    def tls_active(self) -> bool:
        return getattr(self, "_tls_protocol", None) is not None

    async def _handle_client(self) -> None:
        if await self.before_serving():
            await super()._handle_client()

    def _set_rset_state(self) -> None:
        self.transaction_ended()
        super()._set_rset_state()

    def _set_post_data_state(self) -> None:
        # Also reached when aiosmtpd refuses the data itself (size, line length).
        self.transaction_ended()
        super()._set_post_data_state()
