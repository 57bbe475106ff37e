"""aiosmtpd's SMTP protocol without rebuilding its tables for every connection.

aiosmtpd's `SMTP.__init__` derives its command, hook and AUTH mechanism
tables from the class and the handler with `inspect.getmembers` and `dir`
(and inspects the EHLO hook's signature) each time a client connects: about
a millisecond of CPU per connection, the same result every time. Here the
stock `__init__` runs once per (class, handler, loop, settings) on a
prototype that never serves a connection; a new connection copies the
prototype's attributes, binds the prototype's own methods to itself, and
gets a fresh stream reader, exactly as `__init__` would have left it.
"""

from __future__ import annotations

import asyncio
import types
import weakref
from typing import Any

from aiosmtpd.smtp import SMTP, _AuthMechAttr

# handler -> {(class, loop, settings): prototype}; a handler that goes (a reload
# or a stopped gate) takes its prototypes with it.
_PROTOTYPES: weakref.WeakKeyDictionary[Any, dict[tuple, SMTP]] = weakref.WeakKeyDictionary()


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
