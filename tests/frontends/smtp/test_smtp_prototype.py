"""Connections set up from a prototype (smtpgate.frontends.smtp.prototype) are
what aiosmtpd's own SMTP.__init__ makes, and share no state."""

from __future__ import annotations

import asyncio
import types

from aiosmtpd.smtp import SMTP, AuthResult, _AuthMechAttr

from smtpgate.frontends.smtp.aiosmtpd_glue import PrototypeSMTP
from tests.support.smtp import send
from tests.support.wire import Wire, code
from tests.frontends.smtp.test_tls_auth import BODY, config_with_listener


class Hooks:
    """A handler with a hook, an EHLO hook and an AUTH mechanism of its own."""

    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        return responses

    async def auth_CUSTOM(self, server, args):
        return AuthResult(success=False)


class Probe(PrototypeSMTP):
    pass


def same_shape(mine, stock, me, stock_self, handler) -> None:
    """mine (an attribute of me) is stock's value, with me in place of stock_self."""
    if isinstance(stock, types.MethodType):
        assert isinstance(mine, types.MethodType) and mine.__func__ is stock.__func__
        assert mine.__self__ is (me if stock.__self__ is stock_self else handler)
    elif isinstance(stock, _AuthMechAttr):
        assert mine.is_builtin == stock.is_builtin
        same_shape(mine.method, stock.method, me, stock_self, handler)
    elif isinstance(stock, dict):
        assert mine.keys() == stock.keys()
        for key in stock:
            same_shape(mine[key], stock[key], me, stock_self, handler)
    else:
        assert type(mine) is type(stock)


async def test_a_connection_is_set_up_as_aiosmtpd_sets_it_up():
    handler = Hooks()
    settings = dict(hostname="relay.test.example", data_size_limit=1000, enable_SMTPUTF8=True,
                    auth_require_tls=False, authenticator=lambda *a: AuthResult(success=False))
    stock = SMTP(handler, **settings)
    first, second = Probe(handler, **settings), Probe(handler, **settings)
    for me, other in ((first, second), (second, first)):
        # One difference: each session has command line limits of its own (aiosmtpd's are class-wide).
        assert me.__dict__.keys() - {"command_size_limits"} == stock.__dict__.keys()
        assert me.command_size_limits is not other.command_size_limits
        assert me.command_size_limits is not SMTP.command_size_limits
        assert me.command_size_limits["MAIL"] == SMTP.command_size_limit
        for name, value in stock.__dict__.items():
            same_shape(me.__dict__[name], value, me, stock, handler)
        # Each has its own stream reader and protocol state.
        assert me._stream_reader is not other._stream_reader
        assert me._closed is not other._closed
        assert me._smtp_methods is not other._smtp_methods
    assert first._auth_methods["PLAIN"].method.__self__ is first
    assert first._auth_methods["CUSTOM"].method.__self__ is handler
    assert first._smtp_methods["MAIL"].__self__ is first
    assert first.loop is asyncio.get_running_loop()


async def test_one_client_authenticating_leaves_the_others_unauthenticated(tmp_path, sink, start_gate,
                                                                         log_lines):
    gate, port = await start_gate(config_with_listener(tmp_path, sink.port, "required", "[]"))
    from tests.support.sink import client_tls_context

    tls = client_tls_context(str(tmp_path / "tls" / "test-cert.pem"))
    waiting, _ = await Wire.open(port)  # connected before the other one authenticates
    try:
        assert "250-STARTTLS" in await waiting.cmd("EHLO early.test")
        good = await send("127.0.0.1", port, mail_from="jane@corp.example", rcpt_tos=["b@x.example"],
                          data=BODY, starttls=True, tls_context=tls, login=("jane", "s3cret pass"))
        assert good.data is not None and good.data[0] == 250
        assert code(await waiting.cmd("MAIL FROM:<jane@corp.example>")) == 530
        late, _ = await Wire.open(port)
        try:
            ehlo = await late.cmd("EHLO late.test")
            assert "250-STARTTLS" in ehlo and "AUTH" not in ehlo
            assert code(await late.cmd("MAIL FROM:<jane@corp.example>")) == 530
        finally:
            await late.close()
    finally:
        await waiting.close()
    assert len(sink.messages) == 1


async def test_aiosmtpd_sets_up_one_prototype_per_handler_and_settings(monkeypatch):
    """SMTP.__init__ runs once for connections with one handler and the same settings, again
    for new settings; a setting that cannot be a key is set up the stock way, every time."""
    made = []
    stock_init = SMTP.__init__

    def counted(self, *args, **kwargs):
        made.append(kwargs.get("hostname"))
        stock_init(self, *args, **kwargs)

    monkeypatch.setattr(SMTP, "__init__", counted)
    handler = Hooks()
    for _ in range(3):
        Probe(handler, hostname="one.test.example")
    assert made == ["one.test.example"]
    for _ in range(2):
        Probe(handler, hostname="two.test.example")
    assert made == ["one.test.example", "two.test.example"]
    for _ in range(2):
        Probe(handler, hostname="three.test.example", auth_exclude_mechanism=["CUSTOM"])
    assert made == ["one.test.example", "two.test.example", "three.test.example", "three.test.example"]
